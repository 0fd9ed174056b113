"""Lily's own checks beyond the method matrix: the per-sample router makes a request's output independent of its
batch-mates (and the faithful batch-mean router does not), in a padded forward and in cached generation; the
artifact records the router modes and loads for serving in per-sample mode; real-model parameter budgets."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from neat_core.artifacts import load_artifact, parameter_counts
from neat_core.methods import attach
from neat_core.methods.lily.layer import install_routing, router_mode
from neat_core.models import load_base
from neat_core.train import TrainSpec, train
from tests.conftest import MINILM, SMOLLM2, chat_rows, classification_rows, write_jsonl

LABELS = ["negative", "positive"]
# Different lengths, so each one is padded differently in a batch with the others.
TEXTS = [
    "love it",
    "a much longer request about the service, which was excellent in nearly every way we could think of",
    "awful support, never again",
]


def lily(kind: str, tiny_models, router: str):
    """A tiny model with a Lily adapter whose weights are random (a fresh one is a no-op: B = 0)."""
    task = "classification" if kind == "bert" else "causal_lm"
    model, tokenizer = load_base(str(tiny_models[kind]), task=task, labels=LABELS)
    torch.manual_seed(0)
    peft_model = attach(model.eval(), "lily", r=4, router_mode=router)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lily_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return peft_model.eval(), tokenizer


def alone_and_batched(model, tokenizer, kind: str) -> float:
    """Max |logit difference| between each text run alone and the same text inside a padded batch of all three
    (classification: the label logits; causal LM: the logits at every real token, right padding)."""
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        assert batch["attention_mask"].min() == 0, "the batch must contain padding"
        together = model(**batch).logits
        worst = 0.0
        for i, text in enumerate(TEXTS):
            alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
            n = int(batch["attention_mask"][i].sum())
            inside = together[i] if kind == "bert" else together[i, :n]
            worst = max(worst, float((alone - inside).abs().max()))
    return worst


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_per_sample_router_gives_a_request_the_same_output_alone_and_in_a_mixed_batch(kind, tiny_models):
    model, tokenizer = lily(kind, tiny_models, "per_sample")
    tokenizer.padding_side = "right"
    assert alone_and_batched(model, tokenizer, kind) <= 1e-5

    # The faithful router averages over the batch (padding included): the same comparison must fail there,
    # or the check above would prove nothing.
    install_routing(model, "batch")
    assert router_mode(model) == "batch"
    assert alone_and_batched(model, tokenizer, kind) > 1e-3


def test_per_sample_router_in_cached_generation_with_left_padding(tiny_models):
    """Decode steps feed one token per row with a growing mask: each row of a left-padded batched generation gets
    exactly the tokens and logits it gets alone."""
    model, tokenizer = lily("llama", tiny_models, "per_sample")
    tokenizer.padding_side = "left"
    prompts = [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in TEXTS]
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        assert batch["attention_mask"].min() == 0
        together = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **settings)
        width = batch["input_ids"].shape[1]
        for i, prompt in enumerate(prompts):
            single = tokenizer([prompt], return_tensors="pt")
            alone = model.generate(**single, pad_token_id=tokenizer.pad_token_id, **settings)
            new = alone.sequences[0, single["input_ids"].shape[1] :]
            assert torch.equal(together.sequences[i, width : width + new.numel()], new)
            steps = len(alone.logits)
            diff = max(float((alone.logits[s][0] - together.logits[s][i]).abs().max()) for s in range(steps))
            assert diff <= 1e-5


def test_artifact_records_the_router_modes_and_loads_per_sample_for_serving(tiny_models, tmp_path):
    result = train(
        TrainSpec(
            base_model=str(tiny_models["bert"]),
            training_file=write_jsonl(tmp_path / "train.jsonl", classification_rows(8)),
            output_dir=tmp_path / "run",
            method="lily",
            adapter={"r": 4},
            batch_size=4,
            max_steps=2,
            seed=0,
            device="cpu",
        )
    )
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == "lily"
    assert manifest["hyperparameters"]["adapter"]["router_mode"] == "batch"
    assert manifest["method_state"] == {"router_mode": "batch", "serving_router_mode": "per_sample"}
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LILY" and "router_mode" not in json.dumps(config)  # stays peft's own format
    assert not (result.adapter_dir / "lora").exists()  # no LoRA form exists

    loaded = load_artifact(result.adapter_dir)
    assert router_mode(loaded.model) == "per_sample"
    assert alone_and_batched(loaded.model, loaded.tokenizer, "bert") <= 1e-5


@pytest.mark.real_model
def test_lily_on_minilm_trains_classifies_and_matches_loras_budget(tmp_path, model_cache):
    data = write_jsonl(tmp_path / "train.jsonl", classification_rows(32))
    result = train(
        TrainSpec(
            base_model=MINILM,
            training_file=data,
            validation_file=data,
            output_dir=tmp_path / "run",
            method="lily",
            batch_size=8,
            max_steps=4,
            seed=0,
            cache_dir=model_cache,
        )
    )
    assert result.status == "succeeded" and result.steps == 4
    adapter = result.hyperparameters["adapter"]
    assert adapter == {
        "r": 24,
        "stride_A": 3,
        "num_B": 2,
        "scaling": 1.0,
        "router_mode": "batch",
        "target_modules": ["query", "value"],
    }
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    # 2 types × (2 A · 384·24 + 2 experts · 24·384 + 6 routers · 24·2) = 74,304; the head adds 384·2 + 2.
    assert manifest["adapter_parameters"] == 74_304 and manifest["trainable_parameters"] == 74_304 + 770
    base, _ = load_base(MINILM, task="classification", labels=LABELS, cache_dir=model_cache)
    assert parameter_counts(attach(base, "lora"))["adapter_parameters"] == 73_728  # LoRA r=8 on query,value

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    assert router_mode(loaded.model) == "per_sample"
    assert any(w.abs().max() > 0 for n, w in loaded.model.state_dict().items() if "lily_B" in n)
    # Stock peft reads the same directory (its layer is the faithful router; one text: the modes agree).
    stock, tokenizer = load_base(MINILM, task="classification", labels=LABELS, cache_dir=model_cache)
    stock = PeftModel.from_pretrained(stock, str(result.adapter_dir)).eval()
    with torch.no_grad():
        ids = tokenizer(["love it"], return_tensors="pt")
        assert (stock(**ids).logits - loaded.model(**ids).logits).abs().max() <= 1e-5


@pytest.mark.real_model
def test_lily_on_smollm2_trains_and_generates(tmp_path, model_cache):
    from neat_core.inference import generate

    result = train(
        TrainSpec(
            base_model=SMOLLM2,
            training_file=write_jsonl(tmp_path / "chat.jsonl", chat_rows(8)),
            output_dir=tmp_path / "run",
            method="lily",
            batch_size=2,
            max_steps=2,
            max_seq_len=64,
            seed=0,
            cache_dir=model_cache,
        )
    )
    assert result.status == "succeeded" and result.steps == 2
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    # q: 10 A · 576·24 + 2 · 24·576 + 30 · 24·2; v (GQA, d_out 192): 10 · 576·24 + 2 · 24·192 + 30 · 24·2.
    assert manifest["adapter_parameters"] == 316_224
    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    text, prompt_tokens, completion_tokens = generate(
        loaded.model, loaded.tokenizer, [{"role": "user", "content": "What colour is item 3?"}], max_new_tokens=6
    )
    assert isinstance(text, str) and prompt_tokens > 5 and 1 <= completion_tokens <= 6
