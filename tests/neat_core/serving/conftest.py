from __future__ import annotations

import json

import pytest

from neat_core.methods import attach
from tests.neat_core.serving.adapters import ADAPTERS, fresh_base, randomise, task_of


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """kind -> {adapter id: (method, directory, labels)}, saved the way training saves them (plus a manifest)."""
    out = {}
    for kind, adapters in ADAPTERS.items():
        root = tmp_path_factory.mktemp(f"adapters-{kind}")
        out[kind] = {}
        for seed, (adapter_id, method, hp, labels) in enumerate(adapters):
            model = attach(fresh_base(kind, tiny_models, labels), method, **hp)
            randomise(model, method, seed + 1)
            model.save_pretrained(root / adapter_id)
            manifest = {"method": method, "task": task_of(kind), "base_model": str(tiny_models[kind])}
            (root / adapter_id / "manifest.json").write_text(json.dumps({**manifest, "labels": labels}))
            out[kind][adapter_id] = (method, root / adapter_id, labels)
    return out
