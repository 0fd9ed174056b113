"""DPO jobs at the API, OpenAI's way: `method: {"type": "dpo", "dpo": {"hyperparameters": {...beta...}}}` on a
preference-format training file; the refusals (each naming its param), the row it writes and the echo the stock
`openai` client parses. No worker runs: a worker's resolved values are written into the row directly (the worker's
side: tests/worker/test_runner.py, tests/e2e/test_dpo.py)."""

from __future__ import annotations

import openai
import pytest
from sqlalchemy import select

from control.orm import Job
from tests.api import MINILM, assert_error, chat_rows, preference_rows, sqlite_only

pytestmark = sqlite_only

AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


@pytest.fixture
def pairs(api) -> str:
    return api.upload_ok(preference_rows())["id"]


def _dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_a_dpo_job_keeps_its_method_and_beta(api, pairs):
    hyperparameters = {"beta": 0.2, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    job = api.create_job_ok(pairs, method=_dpo(**hyperparameters))

    assert job["status"] == "queued"
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}
    # OpenAI's deprecated top-level form has the schedule only: beta is a DPO setting
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    with api.session() as session:
        row = session.scalar(select(Job).where(Job.id == job["id"]))
        assert (row.method_type, row.task, row.hyperparameters) == ("dpo", "causal_lm", hyperparameters)
    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job


def test_a_dpo_job_without_settings_is_all_auto(api, pairs):
    job = api.create_job_ok(pairs, method={"type": "dpo"})
    assert job["method"] == {"type": "dpo", "dpo": {"hyperparameters": {**AUTO, "beta": "auto"}}}
    assert job["hyperparameters"] == AUTO
    # all-"auto" top-level hyperparameters ask for nothing: accepted with a dpo method
    assert api.create_job(pairs, method={"type": "dpo"}, hyperparameters=AUTO).status_code == 200


def test_the_echo_shows_the_values_the_worker_resolved(api, pairs):
    job = api.create_job_ok(pairs, method=_dpo(beta="auto"))
    resolved = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0, "learning_rate": 0.001,
                "max_seq_len": 512, "total_steps": 2, "warmup_steps": 1, "beta": 0.1}  # fmt: skip
    api.set_job(job["id"], resolved_hyperparameters=resolved)
    again = api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert again["method"] == {"type": "dpo", "dpo": {"hyperparameters": resolved}}
    assert again["hyperparameters"] == {k: v for k, v in resolved.items() if k != "beta"}


def test_the_stock_openai_client_creates_and_reads_a_dpo_job(api, pairs):
    client = openai.OpenAI(api_key=api.a.key, base_url=f"{api.client.base_url}/v1", http_client=api.client,
                           max_retries=0)  # fmt: skip
    job = client.fine_tuning.jobs.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=pairs,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})  # fmt: skip
    assert job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == "auto"
    assert client.fine_tuning.jobs.retrieve(job.id).method.dpo.hyperparameters.beta == 0.2


@pytest.mark.parametrize(
    "rows, body, code, param, words",
    [
        # the training file's format must be the method's: pairs for dpo, and only for dpo
        (chat_rows, {"method": {"type": "dpo"}}, "format_mismatch", "training_file", ("dpo", "preference", "chat")),
        (preference_rows, {}, "format_mismatch", "training_file", ("supervised", "preference")),
        (preference_rows, {"method": {"type": "supervised"}}, "format_mismatch", "training_file", ("supervised",)),
        # a classifier cannot be trained on chat pairs
        (preference_rows, {"method": {"type": "dpo"}, "model": MINILM}, "incompatible_model", "model", ("causal_lm",)),
        # one type's settings under another type would be ignored: refused by name
        (preference_rows, {"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}},
         "invalid_request", "method.dpo", ("supervised",)),
        (preference_rows, {"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}},
         "invalid_request", "method.supervised", ("dpo",)),
        # the deprecated top-level hyperparameters are supervised-only (OpenAI's)
        (preference_rows, {"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 2}}, "invalid_request",
         "hyperparameters", ("supervised", "method.dpo.hyperparameters")),
        (preference_rows, {"method": _dpo(beta=0.2, frobnicate=1)}, "unknown_parameter",
         "method.dpo.hyperparameters.frobnicate", ()),
        (preference_rows, {"method": {"type": "reinforcement"}}, "unsupported_parameter", "method.type",
         ("reinforcement",)),
    ],
)  # fmt: skip
def test_dpo_refusals_name_their_param(api, rows, body, code, param, words):
    file_id = api.upload_ok(rows())["id"]
    error = assert_error(api.create_job(file_id, **body), 400, code=code, param=param)
    assert all(word in error["message"] for word in words), error
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created


@pytest.mark.parametrize("beta", [0, -0.1, 2.01, 100, "x"])
def test_beta_out_of_openais_bounds_is_refused(api, pairs, beta):
    error = assert_error(api.create_job(pairs, method=_dpo(beta=beta)), 400, code="invalid_request")
    assert error["param"] == "method.dpo.hyperparameters.beta", error
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("name, value", [("n_epochs", 0), ("batch_size", 257), ("learning_rate_multiplier", 0)])
def test_the_dpo_schedule_has_the_supervised_bounds(api, pairs, name, value):
    error = assert_error(api.create_job(pairs, method=_dpo(**{name: value})), 400, code="invalid_request")
    assert error["param"] == f"method.dpo.hyperparameters.{name}", error


@pytest.mark.parametrize("beta", [2, 1e-6])
def test_beta_at_openais_bounds_is_accepted(api, pairs, beta):
    assert api.create_job_ok(pairs, method=_dpo(beta=beta))["method"]["dpo"]["hyperparameters"]["beta"] == beta
