"""/v1/methods (ours): the adapter methods a job may use, and each one's hyperparameters, for clients that build
their forms from the server (the web console's job form). Everything is read from where it is defined: the
methods' torch-free specs (neat_core.methods.specs) and the job body's schema (api.schemas); nothing is restated.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentOrg, SessionClosingRoute
from api.pagination import known_params
from api.schemas import Adapter, DpoHyperparameters, Hyperparameters
from neat_core.methods.quality import measured, ranking
from neat_core.methods.specs import AUTO, TASKS, MethodSpec, all_specs

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1/methods", tags=["methods"])


def _hyperparameter(spec: MethodSpec, name: str) -> dict[str, Any]:
    param = spec.params[name]
    # `default` is the value "auto" (or leaving it out) stands for; a task may override it (NEAT's scaling).
    per_task = {task: spec.defaults_for(task)[name] for task in TASKS}
    return {
        "name": name,
        **param.schema,
        "allowed": param.allowed,
        "default": spec.defaults[name],
        "task_defaults": {t: v for t, v in per_task.items() if v != spec.defaults[name]},
    }


def method_object(spec: MethodSpec) -> dict[str, Any]:
    return {
        "object": "method",
        "id": spec.name,
        "description": spec.description,
        "default": spec.name == Adapter.model_fields["type"].default,
        # the base learning rate per task, which learning_rate_multiplier scales
        "learning_rates": dict(spec.learning_rates),
        "batched_serving": spec.serving.batched,
        "hyperparameters": [_hyperparameter(spec, name) for name in spec.params],
        # model_type -> why job creation refuses this method on that architecture (docs/methods.md, "Architectures")
        "refused_architectures": dict(spec.refused_architectures),
        # what bench/quality.py measured, each entry linking its row of docs/quality.md (README: which method)
        "quality": measured(spec.name),
    }


def _hyperparameters(schema: type[Hyperparameters]) -> list[dict[str, Any]]:
    """OpenAI's job hyperparameters (n_epochs, ...; a DPO job's beta too), and ours, each `"auto"` (or, without
    one, its default: n_devices 1) or a value within the bounds api.schemas sets."""
    out = []
    for name, prop in schema.model_json_schema()["properties"].items():
        (value,) = [branch for branch in prop.get("anyOf", [prop]) if branch.get("const") != AUTO]
        value = {k: v for k, v in value.items() if k not in ("default", "title")}
        out.append({"name": name, **value, "default": prop["default"]})
    return out


@router.get("", dependencies=[known_params()])
def list_methods(org: CurrentOrg) -> dict:
    methods = [method_object(spec) for _, spec in sorted(all_specs().values(), key=lambda p: p[1].name)]
    names = [m["id"] for m in methods]
    automatic = {  # not a method of its own: the service picks one of the above on the job's data (docs/methods.md)
        "adapter": {"type": AUTO},
        "description": "The service races the methods, in their measured order, on a development split of the "
        "training file when the job is long enough (within 30% of its steps), and trains the best; a shorter job "
        "takes the first in the order.",
        "order": {task: ranking(task, names) for task in ("classification", "causal_lm")},
        "quality": measured(AUTO),
    }
    return {"object": "list", "data": methods, "has_more": False,
            "supervised_hyperparameters": _hyperparameters(Hyperparameters),
            "dpo_hyperparameters": _hyperparameters(DpoHyperparameters), "automatic_choice": automatic}  # fmt: skip
