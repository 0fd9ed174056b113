"""Tiny-model adapters for the serving tests: NEAT and LoRA adapters with random weights, saved the way training
saves them, and the single-adapter peft references they are compared against."""

from __future__ import annotations

import torch

from neat_core.methods import get_method
from neat_core.models import load_base

BASE_LABELS = ["negative", "positive"]

# kind -> adapters: (id, method, hyperparameters, labels). Different ranks, depths, activations and targets, so
# the tables hold zero-padded ranks and layers that only some adapters touch.
ADAPTERS = {
    "llama": [
        ("neat-a", "neat", {"r": 4}, None),
        ("neat-b", "neat", {"r": 2, "depth": 1, "act_fn": "tanh", "scaling": 0.5,
                            "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"]}, None),
        ("lora-c", "lora", {"r": 3, "lora_alpha": 8, "target_modules": ["v_proj", "up_proj"]}, None),
    ],
    "gpt2": [  # Conv1D everywhere
        ("neat-a", "neat", {"r": 4}, None),
        ("neat-b", "neat", {"r": 2, "depth": 1, "act_fn": "tanh", "scaling": 0.5,
                            "target_modules": ["c_attn", "c_fc"]}, None),
        ("lora-c", "lora", {"r": 3, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]}, None),
    ],
    "bert": [  # each classifier has its own head, with its own number of labels
        ("neat-a", "neat", {"r": 4}, ["no", "yes"]),
        ("neat-b", "neat", {"r": 2, "depth": 1, "act_fn": "tanh", "target_modules": ["query", "key", "dense"]},
         ["low", "mid", "high"]),
        ("lora-c", "lora", {"r": 3, "lora_alpha": 8, "target_modules": ["value", "intermediate.dense"]},
         ["a", "b", "c", "d"]),
    ],
}  # fmt: skip


def task_of(kind: str) -> str:
    return "classification" if kind == "bert" else "causal_lm"


def fresh_base(kind, tiny_models, labels=None):
    torch.manual_seed(0)  # the same random classification head whenever the same labels are asked for
    model, _ = load_base(str(tiny_models[kind]), task=task_of(kind), labels=labels or BASE_LABELS)
    return model.eval()


def randomise(model, method: str, seed: int) -> None:
    """Fresh adapters are no-ops (B = 0); random weights make every comparison mean something."""
    prefix = get_method(method).prefix
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def reference(kind, tiny_models, saved, adapter_id):
    """A fresh base model with one adapter loaded by peft (the bare base for base rows)."""
    if adapter_id is None:
        return fresh_base(kind, tiny_models)
    method, directory, labels = saved[kind][adapter_id]
    return get_method(method).load(fresh_base(kind, tiny_models, labels), str(directory)).eval()
