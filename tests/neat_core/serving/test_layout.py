"""A CPU engine re-stores a causal LM's projections input-major (neat_core.serving.layout): the model must compute
what it computed before, on every decoder architecture we serve, adapters included."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from neat_core.methods import attach
from neat_core.serving import AdapterRef, BatchEngine, SamplingParams
from neat_core.serving.layout import InputMajorLinear, input_major
from tests.conftest import DECODER_KINDS


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_input_major_projections_compute_what_the_linear_ones_did(kind, tiny_architectures):
    model = AutoModelForCausalLM.from_pretrained(tiny_architectures[kind], dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        linears = sum(type(m) is nn.Linear for m in model.modules()) - (
            type(model.get_output_embeddings()) is nn.Linear
        )
        assert input_major(model) == linears
        after = model(input_ids=ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules() if m is not model.get_output_embeddings())
    assert (after - before).abs().max() <= 1e-5


def test_an_engine_serves_adapters_on_the_input_major_layout_as_peft_does_on_the_original(tiny_architectures, tmp_path):
    """NEAT's factors are computed from the base weights, so they must read the re-stored ones right."""
    path = tiny_architectures["llama"]
    peft_model = attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "neat", r=4)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:  # a NEAT adapter that changes the output (B starts at zero)
            p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "neat")
    (tmp_path / "neat" / "manifest.json").write_text('{"method": "neat", "task": "causal_lm"}')
    prompt = [5, 17, 33, 8]
    with torch.no_grad():
        expected = (
            peft_model.eval()
            .generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
            )[0, len(prompt) :]
            .tolist()
        )

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = BatchEngine(base, AutoTokenizer.from_pretrained(path), "causal_lm")
    engine._eos = set()
    try:
        assert any(isinstance(m, InputMajorLinear) for m in base.modules())
        got = list(engine.generate(prompt, AdapterRef("neat", tmp_path / "neat"), SamplingParams(max_tokens=6)))
    finally:
        engine.close()
    assert got == expected
