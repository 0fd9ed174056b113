"""/v1/methods: every method's hyperparameters, read from the specs; what it publishes is what job creation checks,
and the web console is served from the same origin."""

from __future__ import annotations

import pytest

from neat_core.methods.quality import ranking
from neat_core.methods.specs import AUTO, all_specs
from tests.api import assert_error, chat_rows, sqlite_only


def _samples(schema: dict) -> tuple[list, list]:
    """Values the JSON Schema fragment admits and refuses, at its bounds."""
    kind = schema["type"]
    if kind == "string":
        return list(schema["enum"]), ["not-a-choice", 1]
    if kind == "array":
        return [["q_proj"]], [[], [""], "q_proj"]
    good, bad = [], ["1", True]
    if "minimum" in schema:
        good.append(schema["minimum"]), bad.append(schema["minimum"] - (1 if kind == "integer" else 1e-9))
    if "exclusiveMinimum" in schema:
        bad.append(schema["exclusiveMinimum"])
    if "maximum" in schema:
        good.append(schema["maximum"]), bad.append(schema["maximum"] + (1 if kind == "integer" else 1e-9))
    if "exclusiveMaximum" in schema:
        bad.append(schema["exclusiveMaximum"])
    if kind == "integer":
        bad.append(float(good[0]) + 0.5)
    return good, bad


def test_every_parameter_publishes_a_schema_its_check_agrees_with():
    for _, spec in all_specs().values():
        assert spec.description, spec.name
        for name, param in spec.params.items():
            good, bad = _samples(param.schema)
            assert good and all(param.check(v) for v in good), (spec.name, name, good)
            assert not any(param.check(v) for v in bad), (spec.name, name, bad)


@sqlite_only
def test_methods_lists_each_method_from_its_spec(api):
    body = api.get("/v1/methods").json()
    assert body["object"] == "list" and body["has_more"] is False
    by_id = {m["id"]: m for m in body["data"]}
    specs = {name: spec for name, (_, spec) in all_specs().items()}
    assert set(by_id) == set(specs)
    assert [m["id"] for m in body["data"] if m["default"]] == ["neat"]
    neat = by_id["neat"]
    assert neat["learning_rates"] == dict(specs["neat"].learning_rates) and neat["batched_serving"] is True
    params = {p["name"]: p for p in neat["hyperparameters"]}
    assert list(params) == list(specs["neat"].params)
    assert params["r"].items() >= {"type": "integer", "minimum": 1, "maximum": 4096, "default": 8}.items()
    assert params["act_fn"]["type"] == "string" and "relu" in params["act_fn"]["enum"]
    assert params["scaling"]["default"] == 1.0 and params["scaling"]["task_defaults"] == {"classification": 2.0}
    assert params["target_modules"]["default"] == AUTO and params["target_modules"]["type"] == "array"
    assert {p["name"] for p in by_id["heat"]["hyperparameters"]} >= {"top_k", "keep_fraction"}
    assert set(by_id["heat"]["refused_architectures"]) == {"gpt_neox"} and by_id["neat"]["refused_architectures"] == {}
    supervised = {p["name"]: p for p in body["supervised_hyperparameters"]}
    assert supervised["n_epochs"] == {"name": "n_epochs", "type": "integer", "minimum": 1, "maximum": 50,
                                      "default": "auto"}  # fmt: skip
    assert supervised["learning_rate_multiplier"]["type"] == "number"
    assert supervised["n_devices"] == {
        "name": "n_devices",
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "default": 1,
    }
    dpo = {p["name"]: p for p in body["dpo_hyperparameters"]}
    assert set(dpo) == {*supervised, "beta"} and dpo["beta"]["default"] == "auto"
    assert dpo["beta"]["exclusiveMinimum"] == 0 and dpo["beta"]["maximum"] == 2  # what job creation enforces
    # the order `auto` tries the methods in, per task kind: the measured ranking, every method once
    order = body["automatic_choice"]["order"]
    assert order["classification"][0] == ranking("classification", [m["id"] for m in body["data"]])[0]
    assert all(sorted(names) == sorted(by_id) for names in order.values())


@sqlite_only
@pytest.mark.parametrize("method", sorted(all_specs()))
def test_the_published_bounds_are_what_job_creation_enforces(api, method):
    body = api.get("/v1/methods").json()
    (published,) = [m for m in body["data"] if m["id"] == method]
    file_id = api.upload_ok(chat_rows())["id"]
    for param in published["hyperparameters"]:
        if param["type"] not in ("integer", "number") or "maximum" not in param:
            continue
        over = param["maximum"] + 1
        response = api.create_job(file_id, adapter={"type": method, param["name"]: over})
        assert_error(response, 400, code="invalid_hyperparameter", param=f"adapter.{param['name']}")


@sqlite_only
def test_methods_needs_a_key_and_takes_no_parameters(api):
    assert_error(api.client.get("/v1/methods"), 401)
    assert_error(api.get("/v1/methods", params={"limit": 5}), 400, code="unsupported_parameter", param="limit")


@sqlite_only
def test_the_console_is_served_from_the_same_origin(api):
    page = api.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/console/app.js"' in page.text and "://" not in page.text  # nothing from another origin
    for asset in ("/console/app.js", "/console/style.css", "/console/vendor/uPlot.iife.min.js"):
        assert api.client.get(asset).status_code == 200, asset
    # the console takes `/` and `/console/` only: an unknown path is still the API's own 404
    assert_error(api.client.get("/nothing-here"), 404)


@sqlite_only
def test_methods_carry_their_measured_quality_and_link_their_table_rows(api):
    """Each method (and the automatic choice) carries what bench/quality.py measured, per task, with the anchor of
    its row in docs/quality.md: a client choosing a method sees the table's own figures."""
    import json
    from pathlib import Path

    from neat_core.methods.quality import SUMMARY

    summary = json.loads(SUMMARY.read_text())["methods"]
    table = (Path(__file__).parents[2] / "docs" / "quality.md").read_text()
    body = api.get("/v1/methods").json()
    served = {m["id"]: m["quality"] for m in body["data"]} | {"auto": body["automatic_choice"]["quality"]}
    assert set(served) == {*(spec.name for _, spec in all_specs().values()), "auto"}
    for method, entries in served.items():
        assert entries == summary[method], method
        assert {"tweets", "bbc"} <= {e["task"] for e in entries} <= {"tweets", "bbc", "smollm2"}, method
        for entry in entries:
            assert 0 <= entry["mean"] <= 1 and entry["seeds"] >= 1
            anchor = entry["table"].split("#")[1]
            assert f'<a id="{anchor}"></a>{method} |' in table, anchor
            assert f"{entry['mean']:.4f} ± {entry['std']:.4f}" in table, (method, entry["task"])
