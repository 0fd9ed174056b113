"""A CPU engine re-stores a causal LM's projections and head packed for oneDNN (neat_core.serving.layout): the model
must compute what it computed before, on every decoder architecture we serve, adapters included, and a row's result
must not depend on the rows beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from neat_core.methods import attach
from neat_core.serving import AdapterRef, BatchEngine, SamplingParams
from neat_core.serving.layout import FusedLinears, FusedPart, PackedLinear, pack_linears
from tests.conftest import DECODER_KINDS


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_packed_projections_compute_what_the_linear_ones_did(kind, tiny_architectures):
    model = AutoModelForCausalLM.from_pretrained(tiny_architectures[kind], dtype=torch.float32).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        weights = {n: m.weight.clone() for n, m in model.named_modules() if type(m) is nn.Linear}
        assert weights and pack_linears(model) == len(weights)  # the head included
        after = model(input_ids=ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    modules = dict(model.named_modules())
    for name, weight in weights.items():  # what adapters and merged copies read: the same W (d_out, d_in), exactly
        assert torch.equal(modules[name].weight, weight), name
    assert (after - before).abs().max() <= 1e-4


def test_q_k_v_and_gate_up_run_as_one_matmul_each(tiny_architectures):
    """A llama layer's seven projections become four matmuls per forward: each fused group computes once per input
    and hands each sibling its columns."""
    model = AutoModelForCausalLM.from_pretrained(tiny_architectures["llama"], dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    pack_linears(model)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert all(isinstance(m, FusedPart) for m in (attention.q_proj, attention.k_proj, attention.v_proj))
    assert attention.q_proj.group is attention.v_proj.group is not mlp.gate_proj.group is mlp.up_proj.group
    assert isinstance(attention.o_proj, PackedLinear) and isinstance(mlp.down_proj, PackedLinear)
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(input_ids=torch.tensor([[5, 17, 33]]))
    calls = sum(e.count for e in profile.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls == 4 * n_layers + 1  # q/k/v, o, gate/up, down per layer; the head


def test_a_fused_sibling_called_on_another_input_gets_that_inputs_result():
    """The group reuses its output only for the tensor it computed it from, and once per sibling."""
    generator = torch.Generator().manual_seed(0)
    linears = [nn.Linear(16, n, bias=i == 1) for i, n in enumerate((16, 8, 8))]
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
        group = FusedLinears(linears)
        parts = [FusedPart(group, i) for i in range(3)]
        x, other = torch.randn(2, 16, generator=generator), torch.randn(2, 16, generator=generator)
        assert torch.allclose(parts[0](x), linears[0](x), atol=1e-5)
        assert torch.allclose(parts[1](other), linears[1](other), atol=1e-5)  # another input: computed anew
        assert torch.allclose(parts[1](other), linears[1](other), atol=1e-5)  # the same sibling twice: anew
        assert torch.allclose(parts[2](other), linears[2](other), atol=1e-5)
        assert all(torch.equal(part.weight, linear.weight) for part, linear in zip(parts, linears, strict=True))


def test_a_packed_rows_result_does_not_depend_on_its_batch():
    """What lets a batched row answer what it would answer alone: row i of x W for 1, 8 or 32 rows is bit-equal."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 1536)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1536, 576, generator=generator))
    layer = PackedLinear(linear)
    x = torch.randn(32, 576, generator=generator)
    with torch.no_grad():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(32)])
        assert torch.equal(layer(x[:8]), alone[:8])
        assert torch.equal(layer(x), alone)


def test_an_engine_serves_adapters_on_the_packed_layout_as_peft_does_on_the_original(tiny_architectures, tmp_path):
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
        assert any(isinstance(m, PackedLinear) for m in base.modules())
        got = list(engine.generate(prompt, AdapterRef("neat", tmp_path / "neat"), SamplingParams(max_tokens=6)))
    finally:
        engine.close()
    assert got == expected


def test_the_engines_own_the_torch_threads_when_the_process_says_so(tiny_architectures):
    """`engines_own_the_threads` (the inference server's first call): the engine's scheduler thread keeps the
    process's torch threads, every other thread started later runs torch on one (one OpenMP team per engine)."""
    script = f"""
import threading, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from neat_core.serving import BatchEngine, SamplingParams
from neat_core.serving.scheduler import engines_own_the_threads
torch.set_num_threads(2)
engines_own_the_threads()
seen = {{}}
other = threading.Thread(target=lambda: seen.update(other=torch.get_num_threads()))
other.start(); other.join()
path = {str(tiny_architectures["llama"])!r}
engine = BatchEngine(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), "causal_lm")
decode = engine._decode
def counting(*args):
    seen["engine"] = torch.get_num_threads()  # on the scheduler thread
    return decode(*args)
engine._decode = counting
list(engine.generate([5, 17, 33], None, SamplingParams(max_tokens=3)))
engine.close()
print(torch.get_num_threads(), seen["other"], seen["engine"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["1", "1", "2"]
