"""NEAT's factored forward against peft's own PEANuT forward, and the property that makes it fast: training
never builds the dense d_out × d_in update."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeanutConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from neat_core.methods import attach
from neat_core.methods.neat.layer import NeatLinear


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return model.eval()


def _pair(base, depth: int, act_fn: str, targets: list[str]):
    ours = attach(copy.deepcopy(base), "neat", r=6, depth=depth, act_fn=act_fn, scaling=0.7, target_modules=targets)
    peft_ref = get_peft_model(
        copy.deepcopy(base),
        PeanutConfig(r=6, depth=depth, act_fn=act_fn, scaling=0.7, target_modules=targets, task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B (and everything else) so the adapter path is really exercised
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_ref.load_state_dict(ours.state_dict())
    return ours, peft_ref


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_factored_forward_and_gradients_equal_peft_peanut(base, depth, act_fn):
    # k_proj/v_proj have d_out < d_in here (grouped-query attention): the non-square case
    ours, peft_ref = _pair(base, depth, act_fn, ["q_proj", "k_proj", "v_proj", "down_proj"])
    assert any(isinstance(m, NeatLinear) for m in ours.modules())
    assert not any(isinstance(m, NeatLinear) for m in peft_ref.modules())
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(2))

    out_ours = ours(input_ids=ids, labels=ids)
    out_ref = peft_ref(input_ids=ids, labels=ids)
    assert (out_ours.logits - out_ref.logits).abs().max() <= 1e-5
    with ours.disable_adapter():
        assert (ours(input_ids=ids).logits - out_ours.logits).abs().max() > 1e-2  # the adapter does something

    out_ours.loss.backward()
    out_ref.loss.backward()
    grads_ref = {n: p.grad for n, p in peft_ref.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads_ref[name], atol=1e-5, rtol=1e-4), name


def test_training_step_never_materialises_the_dense_update(base, monkeypatch):
    ours, _ = _pair(base, 1, "relu", ["q_proj", "v_proj"])

    def dense_update(*_args, **_kwargs):
        raise AssertionError("the dense ΔW was built during training")

    monkeypatch.setattr(NeatLinear, "_compute_delta_weight", dense_update)
    ids = torch.randint(0, 128, (2, 7))
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()  # raises if any layer takes the dense path
    layer = next(m for m in ours.modules() if isinstance(m, NeatLinear))
    assert layer.hidden("default").shape == (48, 6)  # H: (d_in, r)
