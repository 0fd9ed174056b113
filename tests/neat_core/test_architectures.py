"""Architecture coverage: every method × every architecture of docs/methods.md "Architectures" (tiny models built
from configs, `tiny_architectures` in tests/conftest.py), through the method matrix's own checks
(tests/neat_core/test_method_matrix.py), kept to a step or two each. A pair that cannot work is refused, torch-free
and by name, and the test asserts the refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods import method_names
from neat_core.methods.base import adaptable_modules, auto_target_modules
from neat_core.methods.specs import check_architecture, get_spec, usable_methods
from neat_core.models.architectures import ARCHITECTURES
from tests.conftest import ARCHITECTURE_KINDS, chat_rows, classification_rows, write_jsonl
from tests.neat_core import test_method_matrix as matrix  # its checks, run here on more architectures
from tests.neat_core.test_method_matrix import (
    AUTO_TARGETS,
    assert_reloads_exactly,
    assert_resume_is_exact,
    build,
    randomise_adapter,
    sample_ids,
    task_of,
)

# Refused by design (the method's spec says why; docs/methods.md has the table): HEAT slices a fused q/k/v layer as
# [q | k | v], and GPT-NeoX interleaves them head by head.
REFUSED = {("heat", "gpt_neox")}
CASES = [(method, kind) for kind in ARCHITECTURE_KINDS for method in method_names()]
IDS = [f"{m}-{k}" for m, k in CASES]
WORKING = [case for case in CASES if case not in REFUSED]
# Resume checks stay short: HEAT scores on 2 batches, and Pear prunes after step 1 so that the resumed run must
# re-apply the pruning it recorded.
SHORT = {"heat": {"score_batches": 2}, "pear": {"warmup_steps": 1}}


def test_the_table_covers_every_architecture_and_its_refusals_are_the_documented_ones():
    assert set(ARCHITECTURES) == set(ARCHITECTURE_KINDS) == set(AUTO_TARGETS)
    assert {(m, t) for m in method_names() for t in get_spec(m).refused_architectures} == REFUSED


@pytest.mark.parametrize("kind", ARCHITECTURE_KINDS)
def test_auto_targets_the_attention_query_and_value_of_every_layer(kind, tiny_architectures):
    model = build(kind, tiny_architectures)
    assert model.config.model_type == kind
    assert auto_target_modules(model) == AUTO_TARGETS[kind]
    names = [name for name, _ in adaptable_modules(model)]
    for target in AUTO_TARGETS[kind]:  # once in each of the 2 layers, nowhere else
        assert sum(name.endswith("." + target) for name in names) == 2, target


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_a_step_trains_only_the_adapter_and_reload_merge_export_are_exact(method, kind, tiny_architectures, tmp_path):
    name = ARCHITECTURES[kind].name
    if (method, kind) in REFUSED:  # refused before torch (the web tier) and when attaching (the library)
        with pytest.raises(InvalidHyperparameterError, match=f"{method} cannot fine-tune {name}") as err:
            check_architecture(method, kind)
        assert err.value.field == "method" and err.value.allowed == usable_methods(kind)
        assert method not in err.value.allowed
        with pytest.raises(InvalidHyperparameterError, match=f"{method} cannot fine-tune {name}"):
            build(kind, tiny_architectures, method)
        return
    check_architecture(method, kind)
    matrix.test_attach_trains_only_adapter_and_head(method, kind, tiny_architectures)
    matrix.test_one_training_step_changes_only_adapter_weights(method, kind, tiny_architectures)
    matrix.test_merge_is_exact_and_unmerge_restores_bit_for_bit(method, kind, tiny_architectures)
    matrix.test_lora_export_is_exact_and_tied_to_its_base_weights(method, kind, tiny_architectures, tmp_path)

    model = build(kind, tiny_architectures, method)
    randomise_adapter(model, method)
    ids = sample_ids(kind)  # (2, 9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    assert (expected - bare).abs().max() / bare.abs().max() > 0.05, "the adapter must change the output"
    model.save_pretrained(tmp_path / "native")
    assert_reloads_exactly(method, kind, tiny_architectures, tmp_path / "native", ids, expected)


@pytest.mark.parametrize("kind", ["phi3", "modernbert"])
def test_heat_masks_a_fused_qkv_layer_by_its_q_k_v_blocks(kind, tiny_architectures):
    """Phi-3's qkv_proj rows are [q (4·8) | k (2·8) | v (2·8)] (grouped-query), ModernBERT's Wqkv [q | k | v] of 4·8
    each: keeping query head 1 keeps its q rows and the rows of the kv head serving it, in each block."""
    from peft.tuners.lora import LoraLayer

    from neat_core.methods.heat.heads import apply_selection, attention_blocks, head_shape, roles, weight_scores
    from tests.neat_core.test_heat import expected_rows

    model = build(kind, tiny_architectures, "heat")
    shape = head_shape(model)
    assert (shape.heads, shape.kv_heads, shape.head_dim) == ((4, 2, 8) if kind == "phi3" else (4, 4, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(1.0)
    kept = [[1], [3]]  # query heads kept in layers 0 and 1
    apply_selection(model, kept)
    layer_of = roles(attention_blocks(model))
    fused = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and name in layer_of]
    assert len(fused) == 2 and all(layer_of[name][1] == "qkv" for name, _ in fused)
    for name, module in fused:
        layer = layer_of[name][0]
        rows = torch.cat([expected_rows(kept[layer], r, shape.heads, shape.kv_heads, shape.head_dim) for r in "qkv"])
        b = module.lora_B["default"].weight  # (H·d + 2·K·d, r)
        assert b.shape[0] == rows.numel()
        assert torch.equal(b[rows], torch.ones_like(b[rows])) and torch.equal(b[~rows], torch.zeros_like(b[~rows]))
    # The weight score splits the fused rows the same way, into (layers, query heads).
    ids = sample_ids(kind)
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1]) if task_of(kind) == "classification" else ids}
    scores = weight_scores(model, [batch], attention_blocks(model), shape)
    assert scores.shape == (2, 4) and (scores > 0).all()


@pytest.fixture(scope="module")
def training_files(tmp_path_factory) -> dict[str, Path]:
    """task -> 8 examples: 2 steps of 4 per epoch, so a run stopped at step 2 resumes into the next epoch."""
    root = tmp_path_factory.mktemp("architecture-data")
    return {
        "classification": write_jsonl(root / "cls.jsonl", classification_rows(8)),
        "causal_lm": write_jsonl(root / "chat.jsonl", chat_rows(8)),
    }


@pytest.mark.parametrize(("method", "kind"), WORKING, ids=[f"{m}-{k}" for m, k in WORKING])
def test_resume_equals_the_uninterrupted_run(method, kind, tiny_architectures, training_files, tmp_path):
    data = training_files[task_of(kind)]
    resumed = assert_resume_is_exact(method, tiny_architectures[kind], data, tmp_path, max_steps=3, stop_at=2,
                                     adapter=SHORT.get(method), interrupt=False)  # fmt: skip
    state = json.loads((resumed.adapter_dir / "manifest.json").read_text())["method_state"]
    if method == "pear":  # pruned at step 1, before the checkpoint the run resumed from
        assert state["prune"]["step"] == 1 and state["prune"]["shares"]
    if method == "heat":  # half the heads kept (keep_fraction 0.5 of 2 layers x 4 heads)
        assert sum(len(layer) for layer in state["kept_heads"]) == 4


def test_auto_leaves_out_the_methods_an_architecture_refuses(tiny_architectures, training_files, tmp_path):
    from neat_core.train import TrainSpec, train

    spec = TrainSpec(base_model=str(tiny_architectures["gpt_neox"]), training_file=training_files["causal_lm"],
                     output_dir=tmp_path, method="auto", batch_size=4, n_epochs=1, seed=0, device="cpu")  # fmt: skip
    result = train(spec)  # 2 steps: too short to race, so the first in the order trains at no selection cost
    assert result.status == "succeeded"
    assert sorted(result.selection["order"]) == [m for m in method_names() if m != "heat"]
