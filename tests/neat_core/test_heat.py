"""HEAT's own checks beside the method matrix: the masks freeze exactly the unselected heads (grouped-query k/v
included) through real AdamW steps, the selection is the scores' top-k, the gate score is the gradient it claims
to be, and a trained artifact is a plain LoRA whose method the manifest names."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from neat_core.artifacts import load_artifact, parameter_counts
from neat_core.errors import InvalidHyperparameterError
from neat_core.methods import attach, get_method, method_of
from neat_core.methods.heat.heads import (
    attention_blocks,
    gate_scores,
    head_gates,
    head_shape,
    select_heads,
    weight_scores,
)
from neat_core.models import load_base
from neat_core.train import TrainSpec, train

HEAT = get_method("heat")
LABELS = ["negative", "positive"]


def bare(kind: str, tiny_models):
    torch.manual_seed(0)
    model, _ = load_base(str(tiny_models[kind]), task="classification" if kind == "bert" else "causal_lm",
                         labels=LABELS)  # fmt: skip
    return model.eval()


def batches(kind: str, n: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 200, (3, 10), generator=generator)
        out.append({"input_ids": ids, "labels": torch.tensor([0, 1, 1]) if kind == "bert" else ids})
    return out


def heat(kind: str, tiny_models, **hp):
    """(wrapped model, resolved hyperparameters): HEAT attached to a fresh tiny model."""
    model = bare(kind, tiny_models)
    resolved = HEAT.resolve(model, {"r": 4, **hp})
    torch.manual_seed(0)
    return HEAT.wrap(model, HEAT.peft_config(model, resolved)), resolved


def expected_rows(kept: list[int], role: str, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Kept rows (q, k, v) or input columns (o) written out head by head, independently of heat.head_mask."""
    if role in ("k", "v"):
        group = heads // kv_heads
        units = [any(h in kept for h in range(j * group, (j + 1) * group)) for j in range(kv_heads)]
    else:
        units = [h in kept for h in range(heads)]
    return torch.tensor([u for u in units for _ in range(head_dim)])


def test_masks_freeze_exactly_the_unselected_heads_through_adamw(tiny_models):
    """Tiny Llama has grouped-query attention (4 query heads, 2 kv heads): with one query head kept per layer, one
    kv head is kept (the one serving it) and the other frozen."""
    model, hp = heat("llama", tiny_models, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     selection="per_layer", top_k=1)  # fmt: skip
    shape = head_shape(model)
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (4, 2, 8)
    state = HEAT.before_training(model, hp, iter(batches("llama")))
    kept = state["kept_heads"]
    assert [len(layer) for layer in kept] == [1, 1]
    for scores, layer in zip(state["head_scores"], kept, strict=True):  # the selection is the scores' top-1
        assert layer == [int(torch.tensor(scores).argmax())]

    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decoupled decay must not move zeros either
    for batch in batches("llama", 3):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    checked = set()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        layer, role = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1][0]
        rows = expected_rows(kept[layer], role, 4, 2, 8)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, d_in), (d_out, r)
        a0 = initial[f"{name}.lora_A.default.weight"]
        if role == "o":  # a head is a set of A's input columns; B is shared by all heads and trains
            assert torch.equal(a[:, ~rows], torch.zeros_like(a[:, ~rows]))
            assert (a[:, rows] != a0[:, rows]).all()
            assert (b != 0).any()
        else:  # a head is a set of B's rows; A is shared and trains
            assert torch.equal(b[~rows], torch.zeros_like(b[~rows]))
            assert (b[rows] != 0).all()
            assert not torch.equal(a, a0)
        if role in ("k", "v"):
            assert int(rows.sum()) == 8  # one kv head of two kept
        checked.add(role)
    assert checked == {"q", "k", "v", "o"}
    # Trainable count: A whole, plus the kept heads' rows of B (q/k/v) or columns of A (o's B is whole).
    counts = parameter_counts(model)["adapter_parameters"]
    expected = 2 * (4 * 32 + 4 * 8) + 2 * 2 * (4 * 32 + 4 * 8) + 2 * (4 * 8 + 4 * 32)  # q; k and v; o
    assert counts == expected


def test_restore_reapplies_a_saved_selection(tiny_models):
    model, hp = heat("llama", tiny_models)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(1.0)
    HEAT.restore(model, hp, {"kept_heads": [[3], []]})
    q0 = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_B["default"].weight
    v0 = model.get_submodule("base_model.model.model.layers.0.self_attn.v_proj").lora_B["default"].weight
    assert torch.equal(q0[:, 0].ne(0), expected_rows([3], "q", 4, 2, 8))
    assert torch.equal(v0[:, 0].ne(0), expected_rows([3], "v", 4, 2, 8))  # kv head 1 serves query head 3
    q1 = model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj")
    assert not q1.lora_A["default"].weight.requires_grad and not q1.lora_B["default"].weight.requires_grad
    with pytest.raises(ValueError, match="does not fit"):
        HEAT.restore(model, hp, {"kept_heads": [[4], []]})


def test_selection_is_the_top_k_of_the_scores():
    scores = torch.tensor([[5.0, 1.0, 4.0, 0.0], [3.0, 9.0, 2.0, 8.0]])
    assert select_heads(scores, "global", 3, None) == [[0], [1, 3]]
    assert select_heads(scores, "per_layer", 2, None) == [[0, 2], [1, 3]]
    assert select_heads(scores, "global", None, 0.25) == [[], [1, 3]]  # ceil(0.25 · 8) = 2
    assert select_heads(scores, "per_layer", None, 0.3) == [[0, 2], [1, 3]]  # ceil(0.3 · 4) = 2 per layer
    assert select_heads(torch.zeros(1, 4), "global", 2, None) == [[0, 1]]  # ties: lower index first
    random = torch.rand(6, 12, generator=torch.Generator().manual_seed(0))
    kept = select_heads(random, "global", 20, None)
    top = set(torch.topk(random.flatten(), 20).indices.tolist())
    assert {layer * 12 + h for layer, heads in enumerate(kept) for h in heads} == top


def test_gate_score_matches_finite_differences(tiny_models):
    """Central differences of the loss in each gate, in float64 (BERT: its loss stays in the logits' dtype, where
    Llama's upcasts to float32, too coarse for a difference quotient)."""
    model = bare("bert", tiny_models).double()
    blocks, shape = attention_blocks(model), head_shape(model)
    batch = batches("bert", 1)[0]
    score = gate_scores(model, [batch], blocks, shape)  # (L, H)
    assert score.shape == (2, 4) and (score > 0).all()
    eps = 1e-6
    with torch.no_grad(), head_gates(model, blocks, shape) as gates:
        gates.data = gates.data.double()  # 1 ± 1e-6 in float32 would be off by up to 5%
        for layer in range(2):
            for h in range(4):
                gates[layer, h] = 1 + eps
                up = model(**batch).loss
                gates[layer, h] = 1 - eps
                down = model(**batch).loss
                gates[layer, h] = 1
                assert abs(float(up - down) / (2 * eps)) == pytest.approx(float(score[layer, h]), rel=1e-6)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gate_score_is_the_gradient_on_the_heads_outputs(kind, tiny_models):
    """|Σ x·∂L/∂x| over each head's slice of the output projection's input x (B, T, H·d), by plain autograd
    without any gate: the Taylor term of switching the head off."""
    model = bare(kind, tiny_models).double()
    blocks, shape = attention_blocks(model), head_shape(model)
    batch = batches(kind, 1)[0]
    score = gate_scores(model, [batch], blocks, shape)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # something upstream of the heads needs a gradient
    inputs = []

    def keep(module, args):
        args[0].retain_grad()
        inputs.append(args[0])

    handles = [model.get_submodule(b.o).register_forward_pre_hook(keep) for b in blocks]
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    assert len(inputs) == 2
    for layer, x in enumerate(inputs):  # x: (B, T, H·d)
        per_head = (x * x.grad).sum((0, 1)).view(4, 8).sum(1).abs()
        assert torch.allclose(per_head, score[layer], rtol=1e-6, atol=0)


def test_weight_score_is_the_taylor_term_of_the_qkv_rows(tiny_models):
    model = bare("bert", tiny_models).double()
    blocks, shape = attention_blocks(model), head_shape(model)
    batch = batches("bert", 1)[0]
    score = weight_scores(model, [batch], blocks, shape)
    weights = [model.get_submodule(getattr(b, role)).weight for b in blocks for role in "qkv"]
    for w in weights:
        w.requires_grad_(True)
    model(**batch).loss.backward()
    for layer, b in enumerate(blocks):
        total = sum((model.get_submodule(getattr(b, role)).weight.detach()
                     * model.get_submodule(getattr(b, role)).weight.grad).sum(1) for role in "qkv")  # fmt: skip
        assert torch.allclose(total.view(4, 8).sum(1).abs(), score[layer], rtol=1e-9)


def test_adapter_score_warms_up_then_resets_the_adapter(tiny_models):
    model, hp = heat("bert", tiny_models, score="adapter", score_batches=3, selection="per_layer", top_k=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    state = HEAT.before_training(model, hp, iter(batches("bert", 3)))
    scores = torch.tensor(state["head_scores"])
    assert state["scored_batches"] == 3 and (scores > 0).all()  # steps 2 and 3 see a non-zero B
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert torch.equal(p, initial[n])
        if "lora_B" in n:
            assert not p.any()


@pytest.mark.parametrize(
    ("hp", "field"),
    [
        ({"score": "taylor"}, "score"),
        ({"selection": "random"}, "selection"),
        ({"keep_fraction": 0}, "keep_fraction"),
        ({"keep_fraction": 1.5}, "keep_fraction"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2, "keep_fraction": 0.5}, "top_k"),
        ({"top_k": 9}, "top_k"),  # 8 heads in all
        ({"top_k": 5, "selection": "per_layer"}, "top_k"),  # 4 per layer
        ({"target_modules": ["q_proj", "up_proj"]}, "target_modules"),  # not an attention projection
        ({"score_batches": 0}, "score_batches"),
        ({"warmup_learning_rate": 2.0}, "warmup_learning_rate"),
    ],
)
def test_bad_heat_hyperparameters_name_the_field(hp, field, tiny_models):
    with pytest.raises(InvalidHyperparameterError) as err:
        attach(bare("llama", tiny_models), "heat", **hp)
    assert err.value.field == field


def test_trained_artifact_is_a_plain_lora_that_the_manifest_names_heat(tiny_models, datasets, tmp_path):
    spec = TrainSpec(
        base_model=str(tiny_models["llama"]),
        training_file=datasets["llama"],
        output_dir=tmp_path / "run",
        method="heat",
        adapter={"r": 4, "selection": "per_layer", "top_k": 1, "score_batches": 2},
        batch_size=4,
        max_steps=3,
        seed=0,
        device="cpu",
    )
    result = train(spec)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == "heat"
    kept = manifest["method_state"]["kept_heads"]
    assert manifest["method_state"]["scored_batches"] == 2 and [len(k) for k in kept] == [1, 1]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert json.loads((result.adapter_dir / "lora" / "export.json").read_text())["source_method"] == "heat"
    # q: A (4·32) + one head's B rows (8·4); v: A (4·32) + one kv head's rows (8·4); LoRA would be 4·(32+32+32+16)
    assert manifest["adapter_parameters"] == 2 * (2 * (128 + 32)) < 2 * 4 * (64 + 48)

    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    for layer in (0, 1):
        for role in ("q", "v"):
            b = weights[f"base_model.model.model.layers.{layer}.self_attn.{role}_proj.lora_B.weight"]
            rows = expected_rows(kept[layer], role, 4, 2, 8)
            assert not b[~rows].any() and b[rows].abs().min() > 0

    loaded = load_artifact(result.adapter_dir)  # through neat_core: known as HEAT
    assert method_of(loaded.model).name == "heat"
    stock = PeftModel.from_pretrained(bare("llama", tiny_models), str(result.adapter_dir))  # stock peft: a LoRA
    assert method_of(stock).name == "lora"
    ids = batches("llama", 1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(stock.eval()(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-6)
