"""What a method is before torch is loaded: its `MethodSpec` (hyperparameters and their checks, cross-field rules,
defaults, learning rates, how it is served), and where methods are found. Pure data, no torch, so the web tier
rejects a bad job spec at creation (a 400) instead of the worker failing it later. Model-dependent checks (does a
target module exist?) happen in `AdapterMethod.resolve` once the model is loaded.

One method is one package (peft's layout): `<package>/spec.py` defines `SPEC` (torch-free), `<package>/model.py`
defines `METHOD` (its `AdapterMethod`), and the layers live beside them. The package's `__init__.py` must stay
torch-free too, since importing `<package>.spec` runs it. Methods are discovered, not listed:

    - every subpackage of `neat_core.methods` (the built-ins: neat, lora, lily, heat, pear);
    - every package named in the `NEAT_METHOD_PACKAGES` environment variable (comma-separated import paths),
      read at each lookup, so a deployment adds a method without editing neat_core;
    - every package passed to `register_package()` (a library user's own methods, or a test's).

docs/methods.md describes each built-in method, and "Adding a method" the layout.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from neat_core.errors import InvalidHyperparameterError, MethodDefinitionError
from neat_core.models.architectures import architecture_name

AUTO = "auto"
ENV_PACKAGES = "NEAT_METHOD_PACKAGES"
TASKS = ("classification", "causal_lm")

# transformers.activations.ACT2FN's keys (peft's PEANuT accepts exactly these); a test keeps the copy in sync.
ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu", "relu",
    "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu",
)  # fmt: skip


@dataclass(frozen=True)
class Param:
    """One user-facing hyperparameter: its check, a short description of the values it accepts, and the same
    values as a JSON Schema fragment (`schema`: type, range, enum), which `GET /v1/methods` publishes so that
    clients (the web console's job form) build their fields from it. The constructors below write all three from
    one set of bounds; a test checks that `check` and `schema` agree at the bounds."""

    check: Callable[[Any], bool]
    allowed: str
    schema: Mapping[str, Any] = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def int_range(low: int, high: int, allowed: str | None = None) -> Param:
    return Param(lambda v: _is_int(v) and low <= v <= high, allowed or f"an integer {low}..{high}",
                 {"type": "integer", "minimum": low, "maximum": high})  # fmt: skip


def positive_int() -> Param:
    return int_range(1, 4096)


def non_negative_int(limit: int) -> Param:
    return int_range(0, limit)


def positive_float(limit: float = 1e4) -> Param:
    return Param(lambda v: _is_number(v) and 0 < v <= limit, f"a number > 0 and <= {limit:g}",
                 {"type": "number", "exclusiveMinimum": 0, "maximum": limit})  # fmt: skip


def probability() -> Param:
    return Param(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)",
                 {"type": "number", "minimum": 0, "exclusiveMaximum": 1})  # fmt: skip


def fraction() -> Param:
    return Param(lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]",
                 {"type": "number", "exclusiveMinimum": 0, "maximum": 1})  # fmt: skip


def one_of(choices: list[str] | tuple[str, ...]) -> Param:
    choices = list(choices)
    allowed = ", ".join(choices) if len(choices) < 12 else f"one of {len(choices)} names"
    return Param(lambda v: v in choices, allowed, {"type": "string", "enum": choices})


def module_names() -> Param:
    return Param(
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) and s for s in v),
        "a non-empty list of module names",
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    )


@dataclass(frozen=True)
class Serving:
    """How a finished adapter is served. `batched`: the multi-adapter engine (neat_core.serving) runs it as
    low-rank factors beside other adapters over one base model; otherwise it is served alone on a whole peft model.
    `factors`: a regex over the parts of the method's saved tensor names after its prefix (NEAT: `A|B|encoders.N|
    decoders.N`) when the engine turns the method's *own* format into factors (`AdapterMethod.saved_factors`);
    None when the engine reads another format: HEAT saves plain LoRA, Pear is served from its exact LoRA export.
    `export_dir`: the artifact subdirectory served instead of the artifact itself (Pear: "lora"), recognised by the
    manifest's method or, without a manifest, by `config_marker`, a key only this method's adapter_config has."""

    batched: bool = False
    factors: str | None = None
    export_dir: str | None = None
    config_marker: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A method's torch-free half. `defaults` holds every hyperparameter's value when left out or "auto"
    (`target_modules: "auto"` is resolved from the model's architecture once it is loaded); `task_defaults`
    overrides some per task; `learning_rates` is the measured base rate per task (docs/benchmarks.md); `rules`
    checks across fields on the explicitly given values, raising `InvalidHyperparameterError`. `description`: one
    sentence for users (`GET /v1/methods`, the console); docs/methods.md has the rest."""

    name: str
    params: Mapping[str, Param]
    defaults: Mapping[str, Any]
    learning_rates: Mapping[str, float]
    description: str = ""
    serving: Serving = field(default_factory=Serving)
    task_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rules: Callable[[dict[str, Any]], None] | None = None
    # model_type -> why this method cannot work there (docs/methods.md, "Architectures"); refused at job creation.
    refused_architectures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A spec is shared by every caller: freeze its tables so nobody edits another method's view by accident.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        missing = sorted(set(self.params) - set(self.defaults))
        if missing or set(self.learning_rates) != set(TASKS):
            raise MethodDefinitionError(
                f"method {self.name!r}: defaults must cover every hyperparameter (missing {missing}) and "
                f"learning_rates every task {TASKS} (has {sorted(self.learning_rates)})"
            )

    def defaults_for(self, task: str) -> dict[str, Any]:
        return {**self.defaults, **self.task_defaults.get(task, {})}

    def check(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """The explicitly given (non-"auto") hyperparameters, checked; raises naming the bad field."""
        unknown = sorted(set(hyperparameters) - set(self.params))
        if unknown:
            raise InvalidHyperparameterError(
                unknown[0], f"not a hyperparameter of method {self.name!r}", sorted(self.params)
            )
        explicit = {}
        for key, value in hyperparameters.items():
            if value is None or value == AUTO:
                continue
            if isinstance(value, tuple | set):
                value = list(value)
            if not self.params[key].check(value):
                raise InvalidHyperparameterError(key, f"invalid value {value!r}", self.params[key].allowed)
            explicit[key] = value
        if self.rules is not None:
            self.rules(explicit)
        return explicit


# ---- discovery ----

_REGISTERED_PACKAGES: list[str] = []


def register_package(package: str) -> None:
    """Make the method package `package` (an import path: `<package>.spec` and `<package>.model` must import)
    discoverable in this process, beside the built-ins and `NEAT_METHOD_PACKAGES`."""
    if package not in _REGISTERED_PACKAGES:
        _REGISTERED_PACKAGES.append(package)


def unregister_package(package: str) -> None:
    if package in _REGISTERED_PACKAGES:
        _REGISTERED_PACKAGES.remove(package)


def method_packages() -> list[str]:
    """Every method package's import path: the built-ins, then `NEAT_METHOD_PACKAGES`, then `register_package`."""
    here = importlib.import_module("neat_core.methods")
    builtins = [f"neat_core.methods.{m.name}" for m in pkgutil.iter_modules(here.__path__) if m.ispkg]
    extra = [p.strip() for p in os.environ.get(ENV_PACKAGES, "").split(",") if p.strip()]
    return list(dict.fromkeys([*sorted(builtins), *extra, *_REGISTERED_PACKAGES]))


def all_specs() -> dict[str, tuple[str, MethodSpec]]:
    """name -> (package, spec) for every discovered method. Imports only the spec modules (torch-free)."""
    found: dict[str, tuple[str, MethodSpec]] = {}
    for package in method_packages():
        try:
            spec = importlib.import_module(f"{package}.spec").SPEC
        except (ImportError, AttributeError) as e:
            raise MethodDefinitionError(f"method package {package!r} has no importable spec.SPEC: {e}") from e
        if not isinstance(spec, MethodSpec):
            raise MethodDefinitionError(f"{package}.spec.SPEC is a {type(spec).__name__}, not a MethodSpec")
        if spec.name == AUTO:  # the name of the automatic choice (check_auto_options): no method may take it
            raise MethodDefinitionError(f"{package}: a method cannot be called {AUTO!r}")
        if spec.name in found and found[spec.name][0] != package:
            raise MethodDefinitionError(f"method {spec.name!r} is defined by both {found[spec.name][0]} and {package}")
        found[spec.name] = (package, spec)
    return found


def spec_names() -> list[str]:
    return sorted(all_specs())


def get_spec(method: str) -> MethodSpec:
    specs = all_specs()
    if method not in specs:
        raise InvalidHyperparameterError("method", f"unknown adapter method {method!r}", sorted(specs))
    return specs[method][1]


def is_batched(method: str | None) -> bool:
    """Whether `method`'s adapters are served by the multi-adapter engine; False for an unknown method."""
    specs = all_specs()
    return method in specs and specs[method][1].serving.batched


def check_hyperparameters(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The explicitly given (non-"auto") hyperparameters of `method`, checked; raises naming the bad field.
    `method` "auto" (the service picks the method, neat_core.train.select) takes only `candidates`."""
    if method == AUTO:
        return check_auto_options(hyperparameters)
    return get_spec(method).check(hyperparameters)


def check_architecture(method: str, model_type: str | None, hyperparameters: dict[str, Any] | None = None) -> None:
    """Refuse, naming the architecture and the method, a method that cannot work on models of `model_type` (its
    spec's `refused_architectures`; docs/methods.md, "Architectures"). For method "auto", every candidate it names
    must work there (unnamed candidates are filtered by the selection instead: `usable_methods`)."""
    named = (hyperparameters or {}).get("candidates") if method == AUTO else [method]
    for candidate in named if isinstance(named, list) else []:
        why = get_spec(candidate).refused_architectures.get(model_type or "")
        if why:
            raise InvalidHyperparameterError(
                "method" if method != AUTO else "candidates",
                f"{candidate} cannot fine-tune {architecture_name(model_type)} models: {why}",
                usable_methods(model_type),
            )


def usable_methods(model_type: str | None) -> list[str]:
    """The methods no spec refuses on `model_type`, in name order."""
    return [n for n in spec_names() if (model_type or "") not in get_spec(n).refused_architectures]


# What `adapter: {"type": "auto"}` accepts besides its type (neat_core.train.select). Anything else is refused by
# name: a method's hyperparameter would be meaningless before the method is known, and silently ignoring it is worse.
AUTO_OPTIONS = ("candidates",)


def check_auto_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of method "auto", checked: `candidates`, a non-empty list of distinct method names (in the
    caller's order), or left out / "auto" (every method). Raises `InvalidHyperparameterError` naming the field."""
    unknown = sorted(set(options) - set(AUTO_OPTIONS))
    if unknown:
        raise InvalidHyperparameterError(unknown[0], "not an option of adapter type 'auto'", list(AUTO_OPTIONS))
    candidates = options.get("candidates", AUTO)
    if candidates is None or candidates == AUTO:
        return {}
    names = spec_names()
    if not isinstance(candidates, list) or not candidates:
        raise InvalidHyperparameterError(
            "candidates", f"invalid value {candidates!r}", "a non-empty list of " + ", ".join(names)
        )
    bad = [c for c in candidates if not isinstance(c, str) or c not in names]
    if bad:
        raise InvalidHyperparameterError("candidates", f"unknown adapter method {bad[0]!r}", names)
    if len(set(candidates)) != len(candidates):
        raise InvalidHyperparameterError("candidates", "a method is named twice", names)
    return {"candidates": list(candidates)}
