"""The two real catalog models: a few NEAT training steps each, then inference with the saved artifact."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from neat_core.artifacts import load_artifact
from neat_core.inference import classify, generate
from neat_core.train import TrainSpec, train
from tests.conftest import MINILM, SMOLLM2, chat_rows, classification_rows, write_jsonl
from tests.neat_core.test_heat import expected_rows

pytestmark = pytest.mark.real_model


def test_neat_on_minilm_trains_and_classifies(tmp_path, model_cache):
    data = write_jsonl(tmp_path / "train.jsonl", classification_rows(32))
    result = train(
        TrainSpec(
            base_model=MINILM,
            training_file=data,
            validation_file=data,
            output_dir=tmp_path / "run",
            batch_size=8,
            max_steps=4,
            seed=0,
            cache_dir=model_cache,
        )
    )
    assert result.status == "succeeded" and result.steps == 4
    assert result.hyperparameters["adapter"]["target_modules"] == ["query", "value"]
    assert {"train_loss", "full_valid_loss", "full_valid_accuracy"} <= set(result.metrics)

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    assert loaded.manifest["method"] == "neat" and loaded.manifest["labels"] == ["negative", "positive"]
    predictions = classify(loaded.model, loaded.tokenizer, ["love it", "awful support"])
    assert [p["label"] in ("negative", "positive") for p in predictions] == [True, True]
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for p in predictions)
    # The trained adapter is not a no-op: NEAT's B moved away from its zero initialisation.
    weights = loaded.model.state_dict()
    assert any(w.abs().max() > 0 for n, w in weights.items() if "peanut_B" in n)


def test_neat_on_smollm2_trains_and_generates(tmp_path, model_cache):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    result = train(
        TrainSpec(
            base_model=SMOLLM2,
            training_file=data,
            output_dir=tmp_path / "run",
            batch_size=2,
            max_steps=2,
            max_seq_len=64,
            seed=0,
            cache_dir=model_cache,
        )
    )
    assert result.status == "succeeded" and result.steps == 2 and result.trained_tokens > 0
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["base_model"] == SMOLLM2 and manifest["task"] == "causal_lm"
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEANUT" and config["base_model_name_or_path"] == SMOLLM2
    lora_config = json.loads((result.adapter_dir / "lora" / "adapter_config.json").read_text())
    assert lora_config["peft_type"] == "LORA" and lora_config["base_model_name_or_path"] == SMOLLM2
    # The layout LoRA-serving engines load (vLLM's --lora-modules, LoRAX, stock peft; docs/serving.md): rank,
    # alpha and target modules filled in, plain LoRA, safetensors keys "base_model.model.<module>.lora_{A,B}.weight".
    assert lora_config["r"] == 8 and lora_config["lora_alpha"] == 8
    assert sorted(lora_config["target_modules"]) == ["q_proj", "v_proj"]
    assert not lora_config.get("use_dora") and not lora_config.get("modules_to_save")
    assert lora_config["bias"] == "none" and lora_config["task_type"] == "CAUSAL_LM"
    keys = list(safe_open(result.adapter_dir / "lora" / "adapter_model.safetensors", "pt").keys())
    pattern = re.compile(r"^base_model\.model\.model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]\.weight$")
    assert len(keys) == 2 * 2 * 30 and all(pattern.match(k) for k in keys), keys[:4]

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    text, prompt_tokens, completion_tokens = generate(
        loaded.model,
        loaded.tokenizer,
        [{"role": "user", "content": "What colour is item 3?"}],
        max_new_tokens=6,
    )
    assert isinstance(text, str) and prompt_tokens > 5 and 1 <= completion_tokens <= 6
    with torch.no_grad():
        assert any(w.abs().max() > 0 for n, w in loaded.model.state_dict().items() if "peanut_B" in n)


@pytest.mark.parametrize("model", [MINILM, SMOLLM2])
def test_pear_prunes_and_serves_on_the_real_models(model, tmp_path, model_cache):
    """Default Pear (r=8, q/v, half the positions pruned) past its prune step on each real model; the parameter
    counts before and after pruning are recorded in the manifest."""
    classification = model == MINILM
    rows = classification_rows(32) if classification else chat_rows(8)
    result = train(
        TrainSpec(
            base_model=model,
            training_file=write_jsonl(tmp_path / "train.jsonl", rows),
            output_dir=tmp_path / "run",
            method="pear",
            adapter={"warmup_steps": 2},
            batch_size=8 if classification else 2,
            max_steps=3,
            max_seq_len=64,
            seed=0,
            cache_dir=model_cache,
        )
    )
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    prune = manifest["method_state"]["prune"]
    positions = 12 if classification else 60
    assert prune["step"] == 2 and len(prune["shares"]) == positions // 2
    counts = prune["adapter_parameters"]
    print(f"\n{model}: Pear adapter parameters {counts['before']} before pruning, {counts['after']} after")
    assert counts["before"] == (73_728 if classification else 460_800) and counts["after"] < counts["before"]
    assert manifest["adapter_parameters"] == counts["after"]

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    if classification:
        predictions = classify(loaded.model, loaded.tokenizer, ["love it", "awful support"])
        assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for p in predictions)
    else:
        text, _, completion_tokens = generate(
            loaded.model, loaded.tokenizer, [{"role": "user", "content": "What colour is item 3?"}], max_new_tokens=4
        )
        assert isinstance(text, str) and 1 <= completion_tokens <= 4


def test_heat_on_minilm_scores_heads_trains_and_classifies(tmp_path, model_cache):
    data = write_jsonl(tmp_path / "train.jsonl", classification_rows(32))
    result = train(
        TrainSpec(
            base_model=MINILM,
            training_file=data,
            output_dir=tmp_path / "run",
            method="heat",
            adapter={"score_batches": 2},
            batch_size=8,
            max_steps=4,
            seed=0,
            cache_dir=model_cache,
        )
    )
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    kept = manifest["method_state"]["kept_heads"]
    assert manifest["method"] == "heat" and manifest["method_state"]["heads"]["query"] == 12 and len(kept) == 6
    assert sum(map(len, kept)) == 36  # keep_fraction 0.5 of 6 × 12 heads, globally
    # q and v, r = 8, d = 384, head_dim 32: A whole, B only on kept heads' rows; a layer with none is frozen.
    expected = sum(2 * (8 * 384 + 8 * 32 * len(layer)) for layer in kept if layer)
    assert manifest["adapter_parameters"] == expected < 2 * 6 * 8 * (384 + 384)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    for layer, heads in enumerate(kept):
        b = weights[f"base_model.model.bert.encoder.layer.{layer}.attention.self.query.lora_B.weight"]
        rows = expected_rows(heads, "q", 12, 12, 32)
        assert not b[~rows].any() and (b[rows].abs().sum(1) > 0).all()

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    predictions = classify(loaded.model, loaded.tokenizer, ["love it", "awful support"])
    assert all(p["label"] in ("negative", "positive") for p in predictions)


def test_heat_on_smollm2_keeps_kv_heads_of_kept_query_heads_and_generates(tmp_path, model_cache):
    """SmolLM2-135M has grouped-query attention: 9 query heads share 3 kv heads (head_dim 64) in 30 layers."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    result = train(
        TrainSpec(
            base_model=SMOLLM2,
            training_file=data,
            output_dir=tmp_path / "run",
            method="heat",
            adapter={"score_batches": 1, "selection": "per_layer", "top_k": 2},
            batch_size=2,
            max_steps=2,
            max_seq_len=64,
            seed=0,
            cache_dir=model_cache,
        )
    )
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    state = manifest["method_state"]
    assert state["heads"] == {"query": 9, "key_value": 3, "head_dim": 64}
    assert [len(layer) for layer in state["kept_heads"]] == [2] * 30
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    for layer, heads in enumerate(state["kept_heads"]):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        for role in ("q", "v"):
            b = weights[f"{prefix}.{role}_proj.lora_B.weight"]
            rows = expected_rows(heads, role, 9, 3, 64)
            assert not b[~rows].any() and (b[rows].abs().sum(1) > 0).all()
    lora_config = json.loads((result.adapter_dir / "lora" / "adapter_config.json").read_text())
    assert lora_config["peft_type"] == "LORA"

    loaded = load_artifact(result.adapter_dir, cache_dir=model_cache)
    text, prompt_tokens, completion_tokens = generate(
        loaded.model, loaded.tokenizer, [{"role": "user", "content": "What colour is item 3?"}], max_new_tokens=4
    )
    assert isinstance(text, str) and 1 <= completion_tokens <= 4
