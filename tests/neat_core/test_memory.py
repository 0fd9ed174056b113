"""neat_core.memory: parameter counts read from configs (no weights loaded) against the real models, and the
estimate's rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from neat_core.memory import (
    CHECKPOINTING_MIN_PARAMETERS,
    ModelShape,
    estimate_job_memory,
    estimate_training_memory,
    model_shape,
    resolve_gradient_checkpointing,
)
from tests.conftest import MINILM, SMOLLM2, TINY_KINDS


def _real_count(path) -> int:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    causal = any("CausalLM" in a or "LMHead" in a for a in AutoConfig.from_pretrained(path).architectures or [])
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, local_files_only=True)
    return model.num_parameters()  # tied embeddings counted once


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_the_config_count_is_exact_for_each_tiny_family(kind, tiny_models):
    assert model_shape(str(tiny_models[kind])).parameters == _real_count(tiny_models[kind])


@pytest.mark.real_model
def test_the_config_count_matches_the_catalog_models(model_cache):
    from neat_core.models import resolve

    for model_id in (SMOLLM2, MINILM):
        real = _real_count(resolve(model_id, model_cache))
        assert model_shape(model_id, model_cache).parameters == pytest.approx(real, rel=0.02)


@pytest.mark.real_model
def test_an_unconverted_gguf_model_is_counted_from_its_header_without_torch(tmp_path, model_cache):
    # an empty cache: the GGUF file's tensor table is read; the same shape as the converted model's config.json
    code = (
        "import json, sys; from neat_core.memory import model_shape; "
        f"s = model_shape({SMOLLM2!r}, sys.argv[1]); "
        "print(json.dumps([s.parameters, s.hidden, s.layers, s.intermediate, s.vocab, 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    *shape, torch_loaded = json.loads(out.stdout)
    converted = model_shape(SMOLLM2, model_cache)
    assert shape == [converted.parameters, converted.hidden, converted.layers, converted.intermediate, converted.vocab]
    assert not torch_loaded


def test_auto_checkpointing_starts_at_the_threshold():
    assert resolve_gradient_checkpointing("auto", CHECKPOINTING_MIN_PARAMETERS) is True
    assert resolve_gradient_checkpointing("auto", CHECKPOINTING_MIN_PARAMETERS - 1) is False
    assert resolve_gradient_checkpointing(False, 10 * CHECKPOINTING_MIN_PARAMETERS) is False
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        resolve_gradient_checkpointing("yes", 1)


SMOL = ModelShape(134_515_008, hidden=576, layers=30, intermediate=1536, vocab=49152)


def test_the_estimate_adds_weights_adapter_and_activations():
    plain = estimate_training_memory(SMOL, batch_size=8, seq_len=512, causal_lm=True, gradient_checkpointing=False)
    assert plain.weights == SMOL.parameters * 4
    assert plain.adapter == 2 * 30 * 8 * 2 * 576 * 16  # q,v x layers x r x (d_in + d_out) x 16 bytes
    tokens = 8 * 512
    assert plain.activations == 30 * tokens * (10 * 576 + 4 * 1536) * 4 + 4 * tokens * 49152 * 4
    assert plain.total == plain.weights + plain.adapter + plain.activations
    checkpointed = estimate_training_memory(
        SMOL, batch_size=8, seq_len=512, causal_lm=True, gradient_checkpointing=True
    )
    assert checkpointed.activations < plain.activations / 2  # layers keep their inputs only; the logits remain
    # a classifier has no (B, T, V) logits; activations scale with the tokens
    cls = estimate_training_memory(SMOL, batch_size=16, seq_len=128, causal_lm=False, gradient_checkpointing=False)
    assert cls.activations == 30 * 16 * 128 * (10 * 576 + 4 * 1536) * 4
    assert "GiB" in plain.describe() and "activation checkpointing off" in plain.describe()


def test_a_job_estimate_uses_its_batch_and_the_files_typical_line(tiny_models):
    model = str(tiny_models["llama"])
    auto = estimate_job_memory(model, task="causal_lm", n_examples=100, mean_example_bytes=400)
    assert (auto.batch_size, auto.seq_len) == (8, 100)  # "auto": 8 rows; 400 bytes ~ 100 tokens
    long = estimate_job_memory(model, task="causal_lm", n_examples=100, mean_example_bytes=10**6, batch_size=2)
    assert (long.batch_size, long.seq_len) == (2, 512)  # capped at the task's max_seq_len
    dpo = estimate_job_memory(model, task="causal_lm", n_examples=100, mean_example_bytes=400, preference_pairs=True)
    assert dpo.batch_size == 16 and dpo.activations == 2 * auto.activations  # two sequences a pair
    four = ["q_proj", "k_proj", "v_proj", "o_proj"]
    wider = estimate_job_memory(model, task="causal_lm", n_examples=100, mean_example_bytes=400,
                                adapter={"r": 16, "target_modules": four})  # fmt: skip
    assert wider.adapter == 2 * 2 * auto.adapter  # twice the rank on twice the modules
    assert estimate_job_memory("/no/such/model", task="causal_lm", n_examples=1, mean_example_bytes=1) is None
