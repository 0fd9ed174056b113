"""Pear's own behaviour beyond the method matrix (whose short runs end before the prune step): the prune step
itself (sharing by identity, the optimiser rebuilt with each parameter once, the residual preserving the output),
the sharing rules, resume across the prune point, and the pruned artifact through loading, export and serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from neat_core.artifacts import load_artifact, parameter_counts
from neat_core.methods import attach, get_method
from neat_core.methods.pear.layer import choose_pruning, pear_layers
from neat_core.models import load_base
from neat_core.serving import MultiAdapterModel, load_factors
from neat_core.train import StopAtStep, TrainSpec, train
from neat_core.train.loop import _optimiser
from neat_core.train.spec import Schedule

LABELS = ["negative", "positive"]


def base(kind: str, tiny_models):
    model, _ = load_base(
        str(tiny_models[kind]), task="classification" if kind == "bert" else "causal_lm", labels=LABELS
    )
    return model.eval()


def warm_up_and_prune(kind: str, tiny_models, **hp):
    """Attach Pear (r=4, warm-up 3 steps), run the loop's step sequence by hand, return what the prune step saw."""
    pear = get_method("pear")
    resolved = pear.resolve(base(kind, tiny_models), {"r": 4, "warmup_steps": 3, **hp})
    torch.manual_seed(0)
    model = attach(base(kind, tiny_models), "pear", r=4, warmup_steps=3, **hp)
    schedule = Schedule(
        n_epochs=1,
        batch_size=2,
        learning_rate=2e-2,
        learning_rate_multiplier=1.0,
        max_seq_len=16,
        warmup_steps=1,
        total_steps=10,
        steps_per_epoch=10,
    )
    params, optimizer, scheduler = _optimiser(model, schedule)
    state = pear.before_training(model, resolved, iter(()))
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1]) if kind == "bert" else ids
    seen = {}
    for step in (1, 2, 3):
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        pear.after_backward(model, resolved, state, step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        if step == 3:
            seen["params_before"] = list(params)
            seen["counts_before"] = parameter_counts(model)
            with torch.no_grad():
                seen["before"] = model(input_ids=ids).logits
        if pear.after_step(model, resolved, state, step):
            seen["rebuilt_at"] = step
            params, optimizer, scheduler = _optimiser(model, schedule, previous=(optimizer, scheduler))
    with torch.no_grad():
        seen["after"] = model(input_ids=ids).logits
    return model, state, params, optimizer, seen


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_pruned_positions_share_parameters_and_the_optimiser_holds_each_once(kind, tiny_models):
    model, state, params, optimizer, seen = warm_up_and_prune(kind, tiny_models)
    assert seen["rebuilt_at"] == 3 and state["prune"]["step"] == 3
    layers = dict(pear_layers(model))
    shares = state["prune"]["shares"]
    assert len(shares) == len(layers) // 2  # prune_fraction 0.5
    assert all(v > 0 for v in state["importance"].values()), "importance never accumulated"
    for pruned, keeper in shares.items():
        assert pruned.rsplit(".", 1)[-1] == keeper.rsplit(".", 1)[-1] and keeper not in shares
        for part in ("lora_A", "lora_B"):
            assert getattr(layers[pruned], part)["default"].weight is getattr(layers[keeper], part)["default"].weight
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in held}) == len(held), "a parameter appears twice in the optimiser"
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    # surviving parameters kept their Adam moments; exactly the pruned adapters' own A and B left the optimiser
    assert all(int(optimizer.state[p]["step"]) == 3 for p in held)
    assert len({id(p) for p in seen["params_before"]} - {id(p) for p in held}) == 2 * len(shares)
    own = sum(layers[n].lora_A["default"].weight.numel() + layers[n].lora_B["default"].weight.numel() for n in shares)
    before, after = seen["counts_before"]["adapter_parameters"], parameter_counts(model)["adapter_parameters"]
    assert before - after == own
    assert state["prune"]["adapter_parameters"] == {"before": before, "after": after}

    # gradients from both positions train a shared adapter: without the pruned position's use, its grad differs
    pruned, keeper = next(iter(shares.items()))
    shared_a = layers[keeper].lora_A["default"].weight
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1]) if kind == "bert" else ids

    def grad_of_shared() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        return shared_a.grad.clone()

    model.eval()  # no dropout: the two backward passes differ only in who uses the shared factors
    both = grad_of_shared()
    users = [n for n, k in shares.items() if k == keeper]
    for name in users:
        layers[name].lora_A["default"].weight = torch.nn.Parameter(shared_a.detach().clone())
    keeper_only = grad_of_shared()
    for name in users:
        layers[name].lora_A["default"].weight = shared_a
    assert (both - keeper_only).abs().max() > 1e-8


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_residual_knowledge_checkpoint_preserves_the_output_at_the_prune_step(kind, tiny_models):
    _, _, _, _, seen = warm_up_and_prune(kind, tiny_models, knowledge="residual")
    assert (seen["after"] - seen["before"]).abs().max() <= 1e-6
    _, _, _, _, dropped = warm_up_and_prune(kind, tiny_models, knowledge="none")
    assert (dropped["after"] - dropped["before"]).abs().max() > 1e-4, "without a residual pruning must show"


def test_sharing_rules():
    names = [f"l{i}.q" for i in range(4)] + [f"l{i}.v" for i in range(4)]
    importance = dict(zip(names, [5.0, 1.0, 9.0, 2.0, 0.1, 0.2, 0.3, 8.0], strict=True))
    shapes = dict.fromkeys(names, (8, 8))
    best = choose_pruning(importance, shapes, 0.5, "same_type_best")
    # the 4 least important: v0, v1, v2 (v keeps v3) and q1; each pruned position calls the best kept of its type
    assert best == {"l0.v": "l3.v", "l1.v": "l3.v", "l2.v": "l3.v", "l1.q": "l2.q"}
    importance["l0.q"] = 9.5
    nearest = choose_pruning(importance, shapes, 0.5, "nearest")
    assert nearest["l1.q"] == "l0.q"  # depth 0 and 2 are both one away: the more important wins
    assert choose_pruning(importance, shapes, 0.5, "same_type_best")["l1.q"] == "l0.q"
    importance = dict.fromkeys(names, 1.0) | {"l3.q": 0.0}
    assert choose_pruning(importance, shapes, 0.3, "nearest") == {"l3.q": "l2.q", "l0.q": "l1.q"}
    assert choose_pruning(importance, shapes, 0.0, "nearest") == {}


def run_spec(kind, tiny_models, datasets, out: Path, resume: Path | None = None, **adapter) -> TrainSpec:
    return TrainSpec(
        base_model=str(tiny_models[kind]),
        training_file=datasets[kind],
        output_dir=out,
        method="pear",
        adapter={"r": 4, "warmup_steps": 3, **adapter},
        batch_size=4,
        n_epochs=2,
        max_steps=7,
        checkpoint_every=2,
        seed=3,
        device="cpu",
        resume_from=resume,
    )


@pytest.mark.parametrize(("kind", "sharing"), [("llama", "same_type_best"), ("bert", "nearest")])
def test_resume_before_and_after_the_prune_step_equals_the_uninterrupted_run(
    kind, sharing, tiny_models, datasets, tmp_path
):
    full = train(run_spec(kind, tiny_models, datasets, tmp_path / "full", sharing=sharing))
    manifest = json.loads((full.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == "pear" and manifest["method_state"]["prune"]["step"] == 3
    weights_full = load_file(full.adapter_dir / "adapter_model.safetensors")
    for stop in (2, 4):  # a checkpoint mid-warm-up (importance half accumulated) and one after pruning
        out = tmp_path / f"stop{stop}"
        stopped = train(run_spec(kind, tiny_models, datasets, out, sharing=sharing), callbacks=[StopAtStep(stop)])
        state = json.loads((stopped.last_checkpoint / "state.json").read_text())["method_state"]
        assert (state["prune"] is None) == (stop < 3)
        resumed = train(run_spec(kind, tiny_models, datasets, out, resume=stopped.last_checkpoint, sharing=sharing))
        again = json.loads((resumed.adapter_dir / "manifest.json").read_text())
        assert again["method_state"] == manifest["method_state"]
        weights = load_file(resumed.adapter_dir / "adapter_model.safetensors")
        assert weights.keys() == weights_full.keys()
        assert max((weights[k] - weights_full[k]).abs().max().item() for k in weights) <= 1e-6
        assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-6)


def test_pruned_artifact_loads_exports_and_serves_exactly(tiny_models, datasets, tmp_path):
    kind = "llama"
    result = train(run_spec(kind, tiny_models, datasets, tmp_path / "run"))
    artifact = result.adapter_dir
    manifest = json.loads((artifact / "manifest.json").read_text())
    shares = manifest["method_state"]["prune"]["shares"]
    assert shares and manifest["adapter_parameters"] == manifest["method_state"]["prune"]["adapter_parameters"]["after"]
    config = json.loads((artifact / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["pear"]["shares"] == shares

    # native: kept factors once, a residual per pruned position, nothing saved twice
    saved = load_file(artifact / "adapter_model.safetensors")
    for pruned in shares:
        name = pruned.removeprefix("base_model.model.")
        assert f"base_model.model.{name}.lora_A.weight" not in saved
        assert saved[f"base_model.model.{name}.lora_residual_A"].shape[0] == 8  # 2r
    loaded = load_artifact(artifact, device="cpu").model
    layers = dict(pear_layers(loaded))
    for pruned, keeper in shares.items():
        assert layers[pruned].lora_B["default"].weight is layers[keeper].lora_B["default"].weight
    ids = torch.randint(5, 200, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            bare = loaded(input_ids=ids).logits
    assert (expected - bare).abs().max() > 1e-3, "the adapter must matter for the comparisons to mean anything"

    # the exact LoRA export: stock peft, rank 3r at pruned positions
    export = json.loads((artifact / "lora" / "adapter_config.json").read_text())
    assert set(export["rank_pattern"]) == {p.removeprefix("base_model.model.") for p in shares}
    assert set(export["rank_pattern"].values()) == {12}
    stock = PeftModel.from_pretrained(base(kind, tiny_models), artifact / "lora").eval()
    assert type(stock.peft_config["default"]).__name__ == "LoraConfig"
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - expected).abs().max() <= 1e-5

    # the batched serving engine, one row with the Pear adapter beside a base-model row
    served_base = base(kind, tiny_models)
    served = MultiAdapterModel(served_base)
    factors = load_factors(artifact, served_base, adapter_id="pear")
    assert factors.method == "pear" and factors.rank == 12
    served.add(factors)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        batched = served(ids, mask, adapter_ids=["pear", None, "pear"]).logits
    assert (batched[0] - expected[0]).abs().max() <= 1e-4 and (batched[2] - expected[2]).abs().max() <= 1e-4
    assert (batched[1] - bare[1]).abs().max() <= 1e-4


def test_pear_hyperparameters_are_checked(tiny_models):
    from neat_core.errors import InvalidHyperparameterError

    for hp, field in [
        ({"sharing": "random"}, "sharing"),
        ({"knowledge": "merge"}, "knowledge"),
        ({"prune_fraction": 1.0}, "prune_fraction"),
        ({"warmup_steps": 0}, "warmup_steps"),
    ]:
        with pytest.raises(InvalidHyperparameterError) as err:
            attach(base("llama", tiny_models), "pear", **hp)
        assert err.value.field == field
