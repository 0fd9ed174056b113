"""Multi-adapter batching: a batch whose rows use different NEAT / LoRA adapters (or none) through ONE base model
gives, row by row, what each row gets alone through peft with its adapter loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from neat_core.errors import ArtifactError
from neat_core.export import adapted_layers
from neat_core.methods import attach, get_method
from neat_core.models import load_base
from neat_core.serving import MultiAdapterLinear, MultiAdapterModel, load_factors
from neat_core.serving.batched import MERGE_AFTER
from neat_core.serving.engine import KV_CACHE
from neat_core.serving.layout import pack_linears
from tests.neat_core.serving.adapters import BASE_LABELS, fresh_base, randomise, reference

ROWS = ["neat-a", "neat-b", None, "lora-c", "neat-a", "neat-b"]  # two rows per NEAT adapter, one base row
LENGTHS = [7, 5, 9, 4, 9, 6]


def serving_model(kind, tiny_models, saved, *, packed: bool = False) -> MultiAdapterModel:
    """The saved adapters served over a fresh base; `packed`: its linears packed for oneDNN first, as a CPU engine
    serves a causal LM (neat_core.serving.layout)."""
    base = fresh_base(kind, tiny_models)
    if packed:
        assert pack_linears(base) > 0
    served = MultiAdapterModel(base)
    for adapter_id, (_, directory, _) in saved[kind].items():
        served.add(load_factors(directory, base, adapter_id=adapter_id))
    return served


def padded_batch(lengths: list[int], seed: int = 2, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask, (N, max(lengths)) each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 200, (n,), generator=generator)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("depth", [0, 1])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # nn.Linear and Conv1D
def test_neat_factors_equal_neat_linear(kind, depth, tiny_models, tmp_path):
    model = attach(fresh_base(kind, tiny_models), "neat", r=4, depth=depth, act_fn="gelu", scaling=0.7)
    randomise(model, "neat", seed=3)
    model.save_pretrained(tmp_path)
    base = fresh_base(kind, tiny_models)
    factors = load_factors(tmp_path, base).factors

    layers = adapted_layers(model)
    assert sorted(factors) == sorted(name.removeprefix("base_model.model.") for name, _ in layers)
    with torch.no_grad():
        for name, layer in layers:
            a, b = factors[name.removeprefix("base_model.model.")]
            assert (a - layer.hidden("default").t()).abs().max() <= 1e-6
            assert (b - 0.7 * layer.peanut_B["default"].weight).abs().max() <= 1e-6
    assert not any(isinstance(m, MultiAdapterLinear) for m in base.modules()), "load_factors changed the base"


@pytest.mark.parametrize(("kind", "packed"), [("llama", False), ("gpt2", False), ("bert", False), ("llama", True)])
def test_mixed_batch_equals_each_row_alone_through_peft(kind, packed, tiny_models, saved):
    served = serving_model(kind, tiny_models, saved, packed=packed)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        if kind == "bert":
            batched = served.classify(ids, mask, adapter_ids=ROWS)
        else:
            batched = served(ids, mask, adapter_ids=ROWS).logits  # (N, T, V)
        references = {a: reference(kind, tiny_models, saved, a) for a in set(ROWS)}
        bare = references[None]
        for i, (adapter_id, n) in enumerate(zip(ROWS, LENGTHS, strict=True)):
            alone = references[adapter_id](input_ids=ids[i : i + 1, :n]).logits[0]  # (n, V) or (n_labels,)
            row = batched[i] if kind == "bert" else batched[i, :n]
            assert row.shape == alone.shape
            assert (row - alone).abs().max() <= 1e-4, f"row {i} ({adapter_id})"
            if adapter_id is not None and kind != "bert":  # the adapter must matter for the check to mean anything
                assert (alone - bare(input_ids=ids[i : i + 1, :n]).logits[0]).abs().max() > 1e-2
    if kind == "bert":
        assert [len(row) for row in batched] == [len(served.labels(a)) for a in ROWS] == [2, 3, 2, 4, 2, 3]
        assert served.labels("neat-b") == ["low", "mid", "high"]
        assert served.labels(None) == BASE_LABELS


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_with_kv_cache_equals_peft_generate(kind, tiny_models, saved):
    served = serving_model(kind, tiny_models, saved)
    rows = ["neat-a", "neat-b", "lora-c", None]
    ids, mask = padded_batch([6] * len(rows), seed=4)
    steps = 5
    with torch.no_grad():
        out = served(ids, mask, adapter_ids=rows, use_cache=True)  # prefill
        logits = [out.logits[:, -1]]  # (N, V) per step
        for _ in range(steps - 1):  # one token per step; the same rows every step
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            token = logits[-1].argmax(-1)[:, None]  # (N, 1)
            cache = {KV_CACHE: getattr(out, KV_CACHE)}  # the name depends on the transformers release
            out = served(token, mask, adapter_ids=rows, use_cache=True, **cache)
            logits.append(out.logits[:, -1])
        generated = torch.stack([step.argmax(-1) for step in logits], dim=1)  # (N, steps)

        def greedy(model, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(tokens (n,), logits (n, V)); n ≤ steps, as generate stops at an end-of-sequence token."""
            prompt = ids[i : i + 1]
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            return out.sequences[0, prompt.shape[1] :], torch.cat(out.logits)

        bare = reference(kind, tiny_models, saved, None)
        for i, adapter_id in enumerate(rows):
            tokens, expected = greedy(reference(kind, tiny_models, saved, adapter_id), i)
            n = tokens.numel()
            assert n > 0 and torch.equal(generated[i, :n], tokens), f"row {i} ({adapter_id})"
            # Logits too, at every step: greedy tokens of a tiny random model barely depend on the adapter.
            ours = torch.stack([step[i] for step in logits[:n]])  # (n, V)
            assert (ours - expected).abs().max() <= 1e-4, f"row {i} ({adapter_id})"
            if adapter_id is not None:  # the adapter must matter for the check to mean anything
                assert (greedy(bare, i)[1][0] - expected[0]).abs().max() > 1e-2


def test_decoder_classifier_heads_per_row(tiny_models, tmp_path):
    """Llama's `score` head runs on every token (B, T, L) before pooling at the last non-pad token: the per-row
    head must keep each row's own width through that pooling."""
    adapters = {"cls-3": ("neat", {"r": 4}, ["x", "y", "z"]), "cls-5": ("lora", {"r": 2}, list("abcde"))}

    def classifier(labels=None):
        torch.manual_seed(0)
        model, _ = load_base(str(tiny_models["llama"]), task="classification", labels=labels or BASE_LABELS)
        return model.eval()

    references = {None: classifier()}
    base = classifier()
    served = MultiAdapterModel(base)
    for seed, (adapter_id, (method, hp, labels)) in enumerate(adapters.items()):
        model = attach(classifier(labels), method, **hp)
        randomise(model, method, seed + 1)
        model.save_pretrained(tmp_path / adapter_id)
        served.add(load_factors(tmp_path / adapter_id, base, adapter_id=adapter_id))
        references[adapter_id] = get_method(method).load(classifier(labels), str(tmp_path / adapter_id)).eval()

    rows, lengths = ["cls-5", None, "cls-3", "cls-5"], [6, 8, 3, 8]
    ids, mask = padded_batch(lengths, pad_id=base.config.pad_token_id)
    with torch.no_grad():
        batched = served.classify(ids, mask, adapter_ids=rows)
        for i, (adapter_id, n) in enumerate(zip(rows, lengths, strict=True)):
            alone = references[adapter_id](input_ids=ids[i : i + 1, :n]).logits[0]  # (n_labels,)
            assert batched[i].shape == alone.shape
            assert (batched[i] - alone).abs().max() <= 1e-4, f"row {i} ({adapter_id})"
    assert [served.num_labels(a) for a in rows] == [5, 2, 3, 5]


def test_eviction_reload_and_base_rows_are_exact(tiny_models, saved):
    kind = "llama"
    base = fresh_base(kind, tiny_models)
    ids, mask = padded_batch(LENGTHS)
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    storage = {name: p.data_ptr() for name, p in base.named_parameters()}
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits

        served = MultiAdapterModel(base)
        factors = {a: load_factors(d, base, adapter_id=a) for a, (_, d, _) in saved[kind].items()}
        for f in factors.values():
            served.add(f)
        assert served.slots() == {"neat-a": 1, "neat-b": 2, "lora-c": 3}
        assert torch.equal(served(ids, mask, adapter_ids=[None] * len(ROWS)).logits, plain)
        mixed = served(ids, mask, adapter_ids=ROWS).logits

        served.remove("neat-b")
        with pytest.raises(KeyError, match="neat-b"):
            served(ids, mask, adapter_ids=ROWS)
        others = [a if a != "neat-b" else None for a in ROWS]
        without = served(ids, mask, adapter_ids=others).logits
        assert served.add(factors["neat-b"]) == 2  # the freed slot is reused
        assert torch.equal(served(ids, mask, adapter_ids=ROWS).logits, mixed)
        assert not torch.equal(without, mixed)

    after = {name.replace(".base_layer", ""): p for name, p in base.named_parameters()}
    assert after.keys() == original.keys(), "wrapping must add no parameters"
    assert all(torch.equal(after[name], p) for name, p in original.items())
    assert all(after[name].data_ptr() == ptr for name, ptr in storage.items()), "base weights must not be copied"


def test_load_factors_refuses_pickle_and_missing_weights(tiny_models, saved, tmp_path):
    _, source, _ = saved["llama"]["neat-a"]
    base = fresh_base("llama", tiny_models)

    pickled = shutil.copytree(source, tmp_path / "pickled")
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(ArtifactError, match="pickle"):
        load_factors(pickled, base)

    missing = shutil.copytree(source, tmp_path / "missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="safetensors"):
        load_factors(missing, base)

    elsewhere = shutil.copytree(source, tmp_path / "elsewhere")
    (elsewhere / "manifest.json").write_text(json.dumps({"base_model": "some/other-model"}))
    with pytest.raises(ArtifactError, match="some/other-model"):
        load_factors(elsewhere, base)


def test_unsupported_lora_features_are_listed_in_one_error(tiny_models, tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], use_dora=True, bias="lora_only")
    get_peft_model(fresh_base("llama", tiny_models), config).save_pretrained(tmp_path)
    with pytest.raises(ArtifactError) as err:
        load_factors(tmp_path, fresh_base("llama", tiny_models))
    message = str(err.value)
    assert "use_dora=True" in message and "bias='lora_only'" in message and "embed_tokens" in message


@pytest.mark.parametrize(("kind", "packed"), [("llama", False), ("gpt2", False), ("llama", True)])
def test_batch_on_one_adapter_takes_the_plain_path_and_equals_peft(kind, packed, tiny_models, saved):
    served = serving_model(kind, tiny_models, saved, packed=packed)
    lengths = [7, 5, 9]
    ids, mask = padded_batch(lengths)
    seen = []
    for layer in served._layers.values():  # record which path each wrapped layer took
        layer.register_forward_hook(lambda m, *_: seen.append(m.context.only))
    with torch.no_grad():
        batched = served(ids, mask, adapter_ids=["neat-b"] * len(lengths)).logits
        model = reference(kind, tiny_models, saved, "neat-b")
        for i, n in enumerate(lengths):
            alone = model(input_ids=ids[i : i + 1, :n]).logits[0]
            assert (batched[i, :n] - alone).abs().max() <= 1e-4, f"row {i}"
    assert seen and set(seen) == {served.slots()["neat-b"]}


@pytest.mark.parametrize(("kind", "packed"), [("llama", False), ("gpt2", False), ("llama", True)])  # Linear, Conv1D
def test_the_hot_adapter_runs_on_a_merged_copy_equal_to_the_low_rank_path(kind, packed, tiny_models, saved):
    served = serving_model(kind, tiny_models, saved, packed=packed)
    linears = [layer for layer in served._layers.values() if isinstance(layer, MultiAdapterLinear)]
    slots = served.slots()
    ids, mask = padded_batch([7, 5, 9])

    def merged_on(name: str) -> bool:  # `name`'s copy, and only it, on every layer `name` adapts
        return all(layer.merged_slots() == [slots[name]] for layer in linears if slots[name] in layer.occupied)

    def alone(name: str, times: int = 1) -> torch.Tensor:
        for _ in range(times):
            logits = served(ids, mask, adapter_ids=[name] * 3).logits
        return logits

    with torch.no_grad():
        for _ in range(MERGE_AFTER):  # two adapters taking turns alone on a layer: no copy there (no rebuild per
            alone("neat-a"), alone("neat-b")  # step); a layer only one of them adapts sees that one's run
        shared = [layer for layer in linears if {slots["neat-a"], slots["neat-b"]} <= layer.occupied]
        assert shared and not any(layer.merged_slots() for layer in shared)
        for layer in linears:
            layer.forget_merged()
        low_rank = alone("neat-b", MERGE_AFTER - 1)  # not yet: the copy comes with the MERGE_AFTER-th batch
        assert not any(layer.merged_slots() for layer in linears)
        merged = alone("neat-b")
        assert merged_on("neat-b") and any(layer.merged_slots() for layer in linears)
        base_weights = [layer.base_layer.weight.clone() for layer in linears]
        alone("neat-a", MERGE_AFTER)  # another adapter's run: it takes the one merged place
        assert merged_on("neat-a")
        served(ids, mask, adapter_ids=["neat-a", None, "neat-b"])  # a mixed batch: the low-rank path, no copy
        assert merged_on("neat-a")
        served.set_merged_adapters(0)
        off = alone("neat-b", MERGE_AFTER)
        assert all(not layer.merged_slots() for layer in linears)
    assert (merged - low_rank).abs().max() <= 1e-5 and torch.equal(off, low_rank)
    assert all(torch.equal(layer.base_layer.weight, w) for layer, w in zip(linears, base_weights, strict=True))

    # a slot loaded anew (an evicted adapter's slot reused) never serves the old merged copy
    served.set_merged_adapters(1)
    with torch.no_grad():
        alone("neat-b", MERGE_AFTER)
        served.remove("neat-b")
        served.add(load_factors(saved[kind]["neat-a"][1], served.model, adapter_id="neat-b"))  # neat-a's factors
        again_low_rank = alone("neat-b")  # before its run: the low-rank path, on the new factors
        again = alone("neat-b", MERGE_AFTER - 1)
        assert merged_on("neat-b")
        expected = served(ids, mask, adapter_ids=["neat-a", "neat-b", "neat-a"]).logits
    assert (again - expected).abs().max() <= 1e-5 and (again - merged).abs().max() > 1e-3
    assert (again_low_rank - expected).abs().max() <= 1e-5
