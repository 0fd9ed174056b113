"""Base-model catalog (offline, fails fast) and the resolution of "auto" training hyperparameters."""

from __future__ import annotations

import time

import pytest

from neat_core.errors import IncompatibleTaskError, InvalidHyperparameterError, ModelNotFoundError
from neat_core.models import catalog, load_base, resolve, supported_tasks
from neat_core.train import TrainSpec, resolve_schedule
from tests.conftest import MINILM, SMOLLM2


def test_unknown_model_fails_at_once_listing_the_catalog(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        resolve("meta-llama/Llama-2-7b-hf")
    assert time.perf_counter() - start < 2.0  # no hub lookup, no 50 s wait
    assert MINILM in str(err.value) and SMOLLM2 in str(err.value)
    with pytest.raises(ModelNotFoundError):
        resolve(str(tmp_path))  # a directory without config.json is not a model


def test_catalog_lists_both_models_with_their_tasks():
    entries = {e.id: e for e in catalog()}
    assert entries[MINILM].tasks == ("classification",)
    assert "causal_lm" in entries[SMOLLM2].tasks


def test_local_directories_work_and_tasks_are_inferred(tiny_models):
    assert supported_tasks(str(tiny_models["llama"])) == ("causal_lm", "classification")
    assert supported_tasks(str(tiny_models["bert"])) == ("classification",)
    model, tokenizer = load_base(str(tiny_models["llama"]), task="causal_lm")
    assert model.config.name_or_path == str(tiny_models["llama"]) and tokenizer.pad_token is not None


def test_encoder_cannot_be_trained_as_a_causal_lm():
    with pytest.raises(IncompatibleTaskError, match="supports: classification"):
        load_base(MINILM, task="causal_lm")


def _spec(**kw) -> TrainSpec:
    return TrainSpec(base_model="x", training_file="x", output_dir="x", **kw)


def test_auto_schedule_scales_epochs_with_data_and_reports_concrete_values():
    small = resolve_schedule(_spec(), task="classification", n_examples=100, base_learning_rate=5e-3)
    large = resolve_schedule(_spec(), task="classification", n_examples=20000, base_learning_rate=5e-3)
    assert small.n_epochs == 10 and large.n_epochs == 1
    assert small.batch_size == 16 and small.learning_rate == 5e-3 and small.learning_rate_multiplier == 1.0
    assert small.total_steps == 10 * 7 and 1 <= small.warmup_steps < small.total_steps
    lm = resolve_schedule(_spec(learning_rate_multiplier=2), task="causal_lm", n_examples=5, base_learning_rate=1e-3)
    assert lm.batch_size == 5 and lm.learning_rate == 2e-3 and lm.max_seq_len == 512


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_epochs", 0),
        ("n_epochs", "many"),
        ("batch_size", -1),
        ("learning_rate_multiplier", 0),
        ("learning_rate_multiplier", 1e9),
        ("max_seq_len", 2),
        ("max_steps", 0),
    ],
)
def test_bad_schedule_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(InvalidHyperparameterError) as err:
        resolve_schedule(_spec(**{field: value}), task="classification", n_examples=50, base_learning_rate=1e-3)
    assert err.value.field == field
