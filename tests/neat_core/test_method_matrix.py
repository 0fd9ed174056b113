"""The method matrix: every registered method × every tiny architecture runs the same checks (peft's TEST_CASES
idea), so a newly registered method gets all of them for free."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from neat_core.errors import ArtifactError, InvalidHyperparameterError
from neat_core.export import base_weights_sha256, check_base, export_lora
from neat_core.methods import attach, get_method, method_names
from neat_core.models import load_base
from neat_core.train import StopAtStep, TrainResult, TrainSpec, train
from tests.conftest import ENCODER_KINDS, TINY_KINDS

LABELS = ["negative", "positive"]
CASES = [(method, kind) for method in method_names() for kind in TINY_KINDS]
IDS = [f"{m}-{k}" for m, k in CASES]
PROBE = Path(__file__).with_name("stock_peft_probe.py")

# Stock peft's PEANuT and Lily layers handle nn.Linear only; GPT-2's Conv1D NEAT and Lily adapters load through
# neat_core, and NEAT's exact LoRA export (below) loads in stock peft.
STOCK_PEFT_CANNOT_LOAD = {("neat", "gpt2"), ("lily", "gpt2")}
# How neat_core.load must reload an adapter to reproduce the training-time forward (Lily loads with its serving
# router by default; the comparison below is against the batch-mean router it was attached with).
RELOAD_AS_TRAINED = {"lily": {"router": "batch"}}


# What "auto" must adapt per architecture: the attention query and value projections, or the one fused layer that
# computes q, k and v. Written out, not read from neat_core.models.architectures, so that a wrong entry there fails.
AUTO_TARGETS = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"],
    "modernbert": ["Wqkv"], "distilbert": ["q_lin", "v_lin"],
}  # fmt: skip


def task_of(kind: str) -> str:
    return "classification" if kind in ENCODER_KINDS else "causal_lm"


_BASES: dict[tuple[str, str], torch.nn.Module] = {}


def build(kind: str, tiny_models, method: str | None = None, *, fresh: bool = False, **hp):
    """The tiny base model of `kind` (with `method` attached at r=4). Loaded once per test session and copied: the
    tokenizer load_base also reads costs ~20x the copy. `fresh`: a classifier loaded anew, so the head layers its
    checkpoint lacks get new random weights (what an adapter reloaded in another process meets)."""
    key = (str(tiny_models[kind]), task_of(kind))
    if fresh and key[1] == "classification":  # the model alone: its head is what must be new, not the tokenizer
        loaded = AutoModelForSequenceClassification.from_pretrained(key[0], num_labels=len(LABELS)).eval()
        return loaded if method is None else _attach(loaded, method, **hp)
    if key not in _BASES:
        torch.manual_seed(0)  # the head's random init: the same whichever tests ran before in this session
        _BASES[key], _ = load_base(key[0], task=key[1], labels=LABELS)
    model = copy.deepcopy(_BASES[key]).eval()
    return model if method is None else _attach(model, method, **hp)


def _attach(model, method: str, **hp):
    torch.manual_seed(0)
    return attach(model, method, r=4, **hp)


def randomise_adapter(model, method: str) -> None:
    """Fresh adapters are exact no-ops (B = 0); give them weights so every comparison below means something."""
    prefix = get_method(method).prefix
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def sample_ids(kind: str) -> torch.Tensor:
    return torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(2))


def assert_reloads_exactly(method: str, kind: str, tiny_models, adapter_dir: Path, ids, expected) -> None:
    """The saved adapter, loaded through neat_core onto a fresh base, gives the logits it gave before saving."""
    reloaded = (
        get_method(method)
        .load(build(kind, tiny_models, fresh=True), str(adapter_dir), **RELOAD_AS_TRAINED.get(method, {}))
        .eval()
    )
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_attach_trains_only_adapter_and_head(method, kind, tiny_models):
    model = build(kind, tiny_models, method)
    prefix = get_method(method).prefix
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if prefix in n}
    assert adapter, "no adapter parameters were created"
    assert all(prefix in n or "modules_to_save" in n for n in trainable), sorted(trainable - adapter)[:3]
    assert set(model.peft_config["default"].target_modules) == set(AUTO_TARGETS[kind])


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_one_training_step_changes_only_adapter_weights(method, kind, tiny_models):
    model = build(kind, tiny_models, method)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(kind)
    labels = torch.tensor([0, 1]) if task_of(kind) == "classification" else ids
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "the step changed nothing"
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    assert any(get_method(method).prefix in n for n in changed), "no adapter weight changed"


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_save_and_export_reload_in_stock_peft(method, kind, tiny_models, tmp_path):
    base = build(kind, tiny_models)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)  # the same weights (incl. the random head) the adapter was attached to
    model = build(kind, tiny_models, method)
    randomise_adapter(model, method)
    ids = sample_ids(kind)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    changed_by = (expected - bare).abs().max() / bare.abs().max()
    assert changed_by > 0.05, "the adapter must change the output for this test to mean anything"

    model.save_pretrained(tmp_path / "native")
    adapters = {"native": str(tmp_path / "native")}
    if get_method(method).exportable_to_lora:
        export_lora(model, tmp_path / "lora", base_model_id="tiny")
        assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        adapters["lora"] = str(tmp_path / "lora")
    else:
        with pytest.raises(ArtifactError, match="no exact LoRA form"):
            export_lora(model, tmp_path / "lora", base_model_id="tiny")
        assert not (tmp_path / "lora").exists()
    spec = {
        "base_dir": str(base_dir),
        "task": task_of(kind),
        "num_labels": len(LABELS),
        "input_ids": ids.tolist(),
        "out": str(tmp_path / "probe"),
        "adapters": adapters,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(PROBE), str(tmp_path / "spec.json")], check=True, timeout=300)
    logits = load_file(tmp_path / "probe.safetensors")
    errors = json.loads((tmp_path / "probe.json").read_text())

    if "lora" in adapters:
        assert (logits["lora"] - expected).abs().max() <= 1e-5
    if (method, kind) in STOCK_PEFT_CANNOT_LOAD:
        assert "native" in errors and "NotImplementedError" in errors["native"]
        assert_reloads_exactly(method, kind, tiny_models, tmp_path / "native", ids, expected)
    else:
        assert not errors, errors
        assert (logits["native"] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_merge_is_exact_and_unmerge_restores_bit_for_bit(method, kind, tiny_models):
    model = build(kind, tiny_models, method)
    randomise_adapter(model, method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = sample_ids(kind)
    if not get_method(method).mergeable:  # an input-dependent update: merging must refuse, and change nothing
        with torch.no_grad():
            before = model(input_ids=ids).logits
            with pytest.raises(NotImplementedError, match="cannot be merged"):
                model.merge_adapter()
            with pytest.raises(NotImplementedError, match="cannot be merged"):
                model.merge_and_unload()
            assert torch.equal(model(input_ids=ids).logits, before)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        return
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        assert any(not torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        model.unmerge_adapter()
        again = model(input_ids=ids).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    restored = [(p, frozen[n]) for n, p in model.named_parameters() if n in frozen]
    if get_method(method).exact_unmerge:
        assert all(torch.equal(p, original) for p, original in restored)
        assert torch.equal(again, unmerged)
    else:  # unmerge subtracts the update again: exact up to float rounding only
        assert max(float((p - original).abs().max()) for p, original in restored) <= 1e-5
        assert (again - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_lora_export_is_exact_and_tied_to_its_base_weights(method, kind, tiny_models, tmp_path):
    from peft import PeftModel

    model = build(kind, tiny_models, method)
    randomise_adapter(model, method)
    ids = sample_ids(kind)
    if not get_method(method).exportable_to_lora:
        with pytest.raises(ArtifactError, match="no exact LoRA form"):
            export_lora(model, tmp_path / "lora")
        assert not (tmp_path / "lora").exists()
        return
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = export_lora(model, tmp_path / "lora")
    info = json.loads((out / "export.json").read_text())
    assert info["base_weights_sha256"] == base_weights_sha256(model)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4

    lora = PeftModel.from_pretrained(build(kind, tiny_models, fresh=True), out).eval()
    with torch.no_grad():
        assert (lora(input_ids=ids).logits - expected).abs().max() <= 1e-5
    if get_method(method).exact_unmerge:  # a merged NEAT layer still hashes (and exports from) its original W0
        model.merge_adapter()
        assert base_weights_sha256(model) == info["base_weights_sha256"]
        model.unmerge_adapter()

    check_base(model, out)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "base_layer" in n).add_(1e-3)
    with pytest.raises(Exception, match="different base weights"):
        check_base(model, out)


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
def test_resume_from_checkpoint_equals_uninterrupted_run(method, kind, tiny_models, datasets, tmp_path):
    # 16-24 examples in batches of 4: the interruption (step 5) and the resume straddle an epoch boundary.
    assert_resume_is_exact(method, tiny_models[kind], datasets[kind], tmp_path, max_steps=7, stop_at=5)


def assert_resume_is_exact(method: str, base: Path, data: Path, tmp_path: Path, *, max_steps: int, stop_at: int,
                           adapter: dict | None = None, interrupt: bool = True) -> TrainResult:  # fmt: skip
    """A run stopped at `stop_at` (a checkpoint every 2 steps) and resumed ends where the uninterrupted run ends.
    `interrupt` False resumes from the uninterrupted run's checkpoint at `stop_at` instead of stopping a second run
    there (one training run fewer; how a run stops is the method matrix's business). Returns the resumed run."""

    def spec(out: Path, resume: Path | None = None) -> TrainSpec:
        return TrainSpec(
            base_model=str(base),
            training_file=data,
            output_dir=out,
            method=method,
            adapter={"r": 4, **(adapter or {})},
            batch_size=4,
            n_epochs=2,
            max_steps=max_steps,
            checkpoint_every=2,
            seed=3,
            device="cpu",
            resume_from=resume,
        )

    full = train(spec(tmp_path / "full"))
    assert full.status == "succeeded" and full.steps == max_steps

    if interrupt:
        stopped = train(spec(tmp_path / "split"), callbacks=[StopAtStep(stop_at)])
        assert stopped.status == "cancelled" and stopped.adapter_dir is None
        assert stopped.last_checkpoint.name == f"step-{stop_at:06d}"
        checkpoint = stopped.last_checkpoint
    else:  # the uninterrupted run's own checkpoint: what a run stopped there would have written
        checkpoint = tmp_path / "full" / "checkpoints" / f"step-{stop_at:06d}"
    resumed = train(spec(tmp_path / "split", resume=checkpoint))
    assert resumed.status == "succeeded" and resumed.steps == max_steps

    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert full.metrics["train_loss"] == pytest.approx(resumed.metrics["train_loss"], abs=1e-6)
    assert full.trained_tokens == resumed.trained_tokens
    # The artifact names its method (HEAT saves peft_type "LORA", like LoRA), and so does its LoRA export.
    manifest = json.loads((resumed.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == method
    assert manifest["method_state"] == json.loads((full.adapter_dir / "manifest.json").read_text())["method_state"]
    if get_method(method).exportable_to_lora:
        assert json.loads((resumed.adapter_dir / "lora" / "export.json").read_text())["source_method"] == method
    return resumed


@pytest.mark.parametrize(("method", "kind"), CASES, ids=IDS)
@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"target_modules": ["no_such_layer"]}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_hyperparameters_are_rejected_naming_the_field(method, kind, hp, field, tiny_models):
    model = build(kind, tiny_models)
    with pytest.raises(InvalidHyperparameterError) as err:
        attach(model, method, **hp)
    assert err.value.field == field
    assert field in str(err.value) and "allowed" in str(err.value)


@pytest.mark.parametrize(
    ("method", "hp", "field"),
    [
        ("neat", {"depth": -1}, "depth"),
        ("neat", {"act_fn": "nope"}, "act_fn"),
        ("neat", {"scaling": 0}, "scaling"),
        ("neat", {"lora_alpha": 8}, "lora_alpha"),
        ("lora", {"lora_dropout": 1.5}, "lora_dropout"),
        ("lora", {"depth": 1}, "depth"),
        ("lily", {"num_B": 1}, "num_B"),
        ("lily", {"stride_A": 0}, "stride_A"),
        ("lily", {"scaling": -1.0}, "scaling"),
        ("lily", {"router_mode": "per_token"}, "router_mode"),
        ("lily", {"lora_alpha": 8}, "lora_alpha"),
        ("pear", {"sharing": "random"}, "sharing"),
        ("pear", {"knowledge": "merge"}, "knowledge"),
        ("pear", {"prune_fraction": 1}, "prune_fraction"),
        ("pear", {"warmup_steps": 0}, "warmup_steps"),
        ("lora", {"warmup_steps": 10}, "warmup_steps"),
        ("lora", {"score": "gate"}, "score"),
        ("heat", {"score": "taylor"}, "score"),
        ("heat", {"top_k": 2, "keep_fraction": 0.5}, "top_k"),
        ("heat", {"target_modules": ["up_proj"]}, "target_modules"),  # HEAT adapts attention projections only
        ("heat", {"depth": 1}, "depth"),
    ],
)
def test_method_specific_hyperparameters_are_checked(method, hp, field, tiny_models):
    with pytest.raises(InvalidHyperparameterError) as err:
        attach(build("llama", tiny_models), method, **hp)
    assert err.value.field == field


def test_unknown_method_lists_the_registry(tiny_models):
    with pytest.raises(InvalidHyperparameterError) as err:
        attach(build("bert", tiny_models), "dora")
    assert err.value.field == "method" and set(method_names()) <= set(err.value.allowed)


# --- DPO: every method, on the tiny causal LMs ------------------------------------------------------------------

DPO_CASES = [(method, kind) for method, kind in CASES if task_of(kind) == "causal_lm"]
DPO_IDS = [f"{m}-{k}" for m, k in DPO_CASES]


def preference_batch(kind: str, tiny_models) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from neat_core.data import DataFormat
    from neat_core.data.encode import Collator, encode_examples
    from tests.conftest import preference_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    rows = encode_examples(preference_rows(3), DataFormat.PREFERENCE, tokenizer, max_length=128)
    return Collator(tokenizer.pad_token_id)(rows)  # 3 pairs -> [6, T]


@pytest.mark.parametrize(("method", "kind"), DPO_CASES, ids=DPO_IDS)
def test_dpo_reference_is_the_base_with_the_adapter_off_and_a_step_trains_only_the_adapter(method, kind, tiny_models):
    from neat_core.train import dpo

    batch = preference_batch(kind, tiny_models)
    base = build(kind, tiny_models)
    with torch.no_grad():
        base_logps = dpo.sequence_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                        .logits, batch["labels"])  # fmt: skip
    model = build(kind, tiny_models, method).eval()
    # A fresh adapter is a no-op: policy == reference, so every reward is 0 and the loss is log 2 (in eval mode: the
    # tiny Llama has attention dropout, which the policy's pass applies in train mode and the reference's never; the
    # tolerance is float32 noise between the gradient and no-gradient attention kernels, summed over a reply).
    loss, stats = dpo.step_loss(model, batch, beta=0.1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    assert stats["rewards_chosen"] == pytest.approx(0, abs=1e-4)
    assert not model.training, "the reference pass must leave the model in the mode it found it"
    model.train()
    randomise_adapter(model, method)
    # The reference is the base model itself (no second copy): the adapter switched off, whatever its weights.
    assert torch.allclose(dpo.reference_logps(model, batch), base_logps, atol=1e-5)
    assert model.training, "the reference pass must leave the model in train mode"

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        policy = dpo.sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                    .logits, batch["labels"])  # fmt: skip
    assert (policy - base_logps).abs().max() > 1e-3, "a randomised adapter moves the policy off the reference"
    loss, stats = dpo.step_loss(model, batch, beta=0.1)
    assert set(stats) == {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"}
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, sorted(changed - trainable)[:3]
    assert any(get_method(method).prefix in n for n in changed), "no adapter weight changed"


@pytest.mark.parametrize(("method", "kind"), DPO_CASES, ids=DPO_IDS)
def test_dpo_resume_equals_uninterrupted_run(method, kind, tiny_models, tmp_path):
    from tests.conftest import preference_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(12))
    held_out = write_jsonl(tmp_path / "held-out.jsonl", preference_rows(4))

    def spec(out: Path, resume: Path | None = None) -> TrainSpec:
        return TrainSpec(
            base_model=str(tiny_models[kind]), training_file=data, validation_file=held_out, output_dir=out,
            method=method, adapter={"r": 4}, objective="dpo", beta=0.5, batch_size=4, n_epochs=2, max_steps=5,
            checkpoint_every=2, seed=3, device="cpu", resume_from=resume,
        )  # fmt: skip

    full = train(spec(tmp_path / "full"))
    assert full.status == "succeeded" and full.steps == 5
    assert full.hyperparameters["objective"] == "dpo" and full.hyperparameters["beta"] == 0.5
    for key in ("train_loss", "train_reward_margin", "train_preference_accuracy", "full_valid_loss",
                "full_valid_rewards_chosen", "full_valid_rewards_rejected",
                "full_valid_preference_accuracy"):  # fmt: skip
        assert key in full.metrics, key
    stopped = train(spec(tmp_path / "split"), callbacks=[StopAtStep(3)])
    assert stopped.status == "cancelled"
    resumed = train(spec(tmp_path / "split", resume=stopped.last_checkpoint))
    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert full.metrics["full_valid_reward_margin"] == pytest.approx(resumed.metrics["full_valid_reward_margin"])
