"""Adding a method touches one folder: a toy method package written into a temporary directory (its torch-free
spec, its layer, its model) is discovered, validated in job specs, attached, and trained, with no edit anywhere
in neat_core. The toy is "tanh-LoRA": y = base(x) + s · B tanh(A x), its own layer over peft's LoRA machinery."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from api.schemas import Adapter
from neat_core.errors import InvalidHyperparameterError, MethodDefinitionError
from neat_core.methods import attach, get_method, method_names, method_of
from neat_core.methods.specs import (
    ENV_PACKAGES,
    check_hyperparameters,
    get_spec,
    is_batched,
    register_package,
    spec_names,
    unregister_package,
)
from neat_core.models import load_base

PACKAGE = "toy_tanh_lora"  # unique: imported once per test session, from a temporary directory

FILES = {
    "__init__.py": '"""tanh-LoRA: a toy method. Empty, so that `.spec` imports without torch."""\n',
    "spec.py": """
        from neat_core.errors import InvalidHyperparameterError
        from neat_core.methods.specs import AUTO, MethodSpec, Serving, module_names, positive_float, positive_int


        def _rules(explicit):
            if explicit.get("r", 1) > 64 and "alpha" not in explicit:
                raise InvalidHyperparameterError("alpha", "give alpha explicitly when r > 64", "a number")


        SPEC = MethodSpec(
            name="tanh_lora",
            params={"r": positive_int(), "alpha": positive_float(), "target_modules": module_names()},
            defaults={"r": 4, "alpha": 4.0, "target_modules": AUTO},
            learning_rates={"classification": 1e-3, "causal_lm": 1e-3},
            serving=Serving(batched=False),
            rules=_rules,
        )
    """,
    "layer.py": """
        import dataclasses
        from typing import ClassVar

        import torch
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
        from torch import nn


        class TanhLinear(LoraLinear):
            # y = base(x) + s · B tanh(A x); lora_A (r, d_in), lora_B (d_out, r)
            def forward(self, x, *args, **kwargs):
                result = self.base_layer(x, *args, **kwargs)
                if self.disable_adapters or self.merged:
                    return result
                for adapter in self.active_adapters:
                    if adapter in self.lora_A:
                        hidden = torch.tanh(self.lora_A[adapter](x.to(self.lora_A[adapter].weight.dtype)))
                        result = result + (self.scaling[adapter] * self.lora_B[adapter](hidden)).to(result.dtype)
                return result


        @dataclasses.dataclass
        class TanhConfig(LoraConfig):
            neat_method: ClassVar[str] = "tanh_lora"

            def __post_init__(self):
                super().__post_init__()
                self._register_custom_module({nn.Linear: TanhLinear})
    """,
    "model.py": """
        from neat_core.methods.base import AdapterMethod, task_type_of

        from .layer import TanhConfig
        from .spec import SPEC


        class TanhLora(AdapterMethod):
            spec = SPEC
            peft_type = "LORA"
            owns_peft_type = False
            prefix = "lora_"
            mergeable = False

            def peft_config(self, model, hp):
                return TanhConfig(
                    r=hp["r"], lora_alpha=hp["alpha"], target_modules=list(hp["target_modules"]),
                    task_type=task_type_of(model),
                )


        METHOD = TanhLora()
    """,
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    (root / PACKAGE).mkdir()
    for name, text in FILES.items():
        (root / PACKAGE / name).write_text(textwrap.dedent(text).lstrip())
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture
def toy(toy_dir):
    register_package(PACKAGE)
    yield "tanh_lora"
    unregister_package(PACKAGE)


def test_an_unregistered_package_is_unknown(toy_dir):
    assert "tanh_lora" not in spec_names()
    with pytest.raises(InvalidHyperparameterError) as err:
        check_hyperparameters("tanh_lora", {})
    assert err.value.field == "method"


def test_job_spec_validation_accepts_its_hyperparameters_and_names_bad_ones(toy):
    assert toy in spec_names() and toy in method_names()
    adapter = Adapter.model_validate({"type": toy, "r": 8, "alpha": 2.5, "target_modules": ["q_proj"]})
    assert check_hyperparameters(adapter.type, adapter.model_extra) == {
        "r": 8,
        "alpha": 2.5,
        "target_modules": ["q_proj"],
    }
    assert check_hyperparameters(toy, {"r": "auto"}) == {}
    for bad, field in [({"r": 0}, "r"), ({"alpha": -1}, "alpha"), ({"depth": 2}, "depth"), ({"r": 100}, "alpha")]:
        with pytest.raises(InvalidHyperparameterError) as err:
            check_hyperparameters(toy, bad)
        assert err.value.field == field and field in str(err.value)
    assert not is_batched(toy) and get_spec(toy).defaults_for("classification")["r"] == 4


def test_attach_wraps_a_tiny_model_and_one_step_changes_only_its_parameters(toy, tiny_models):
    model, _ = load_base(str(tiny_models["llama"]), task="causal_lm")
    torch.manual_seed(0)
    model = attach(model, toy, r=4)
    assert method_of(model) is get_method(toy)
    layers = [m for m in model.modules() if type(m).__name__ == "TanhLinear"]
    assert layers and {type(m).__module__ for m in layers} == {f"{PACKAGE}.layer"}
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 4.0  # the spec's defaults

    with torch.no_grad():  # B starts at zero; give it weights so the tanh path is seen in the forward
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_discovered_through_the_environment_and_its_spec_is_torch_free(toy_dir):
    code = (
        "import sys; from neat_core.methods.specs import check_hyperparameters, spec_names; "
        "assert 'tanh_lora' in spec_names(); assert check_hyperparameters('tanh_lora', {'r': 2}) == {'r': 2}; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, ENV_PACKAGES: PACKAGE, "PYTHONPATH": os.pathsep.join([str(root), str(toy_dir)])}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=60)


def test_a_package_without_a_spec_or_a_clashing_name_is_refused(toy_dir, monkeypatch):
    (toy_dir / "toy_empty").mkdir(exist_ok=True)
    (toy_dir / "toy_empty" / "__init__.py").write_text("")
    (toy_dir / "toy_clash").mkdir(exist_ok=True)
    (toy_dir / "toy_clash" / "__init__.py").write_text("")
    (toy_dir / "toy_clash" / "spec.py").write_text("from neat_core.methods.lora.spec import SPEC\n")
    (toy_dir / "toy_auto").mkdir(exist_ok=True)  # "auto" is the automatic choice (neat_core.train.select)
    (toy_dir / "toy_auto" / "__init__.py").write_text("")
    (toy_dir / "toy_auto" / "spec.py").write_text(
        "import dataclasses\nfrom neat_core.methods.lora.spec import SPEC as LORA\n"
        "SPEC = dataclasses.replace(LORA, name='auto')\n"
    )
    refused = [("toy_empty", "no importable spec.SPEC"), ("toy_clash", "defined by both"), ("toy_auto", "cannot be")]
    for package, message in refused:
        monkeypatch.setenv(ENV_PACKAGES, package)
        with pytest.raises(MethodDefinitionError, match=message):
            spec_names()
