"""Shared fixtures: tiny models built from configs (saved as local model directories with real tokenizers, so they
go through the same catalog/loading path as real models), and small JSONL datasets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_KINDS = ("bert", "llama", "gpt2")


@pytest.fixture(autouse=True)
def _openai_conformance() -> Iterator[None]:
    """Fails the test when a response it received through a client hooked by `tests.conformance` (the API and
    end-to-end suites' clients) did not conform to the `openai` SDK's type for its route, even where the test (or
    the SDK) caught the error the check raised."""
    from tests import conformance

    conformance.MISMATCHES.clear()
    yield
    conformance.assert_no_mismatches()


def _tiny_model(kind: str, tokenizer):
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    vocab = len(tokenizer)
    if kind == "bert":  # MiniLM-shaped, 2 layers
        return BertModel(
            BertConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=128,
                initializer_range=0.2,
            )  # larger than default so adapter effects on logits are big
        )
    if kind == "llama":  # grouped-query attention: k/v have fewer heads than q
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                attention_dropout=0.1,
            )
        )
    return GPT2LMHeadModel(  # Conv1D layers, fused q/k/v in c_attn
        GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    )


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where the catalog converts SmolLM2 from GGUF; the user-level cache, so the conversion happens once per
    machine rather than once per test session."""
    from neat_core.models.loading import DEFAULT_CACHE_DIR

    return DEFAULT_CACHE_DIR


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, model_cache) -> dict[str, Path]:
    """kind -> local directory with a tiny random model and a real tokenizer (MiniLM's for BERT, SmolLM2's for
    the causal LMs, which gives them a chat template)."""
    import torch
    from transformers import AutoTokenizer

    from neat_core.models import resolve

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizers = {
        "bert": AutoTokenizer.from_pretrained(resolve(MINILM)),
        "llama": AutoTokenizer.from_pretrained(resolve(SMOLLM2, model_cache)),
    }
    tokenizers["gpt2"] = tokenizers["llama"]
    out = {}
    for kind in TINY_KINDS:
        torch.manual_seed(0)
        model = _tiny_model(kind, tokenizers[kind])
        model.save_pretrained(root / kind)
        tokenizers[kind].save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def classification_rows(n: int = 24) -> list[dict]:
    good = [
        "great product, works well",
        "love it",
        "excellent service",
        "very happy with this",
        "superb quality",
    ]
    bad = ["terrible, broke at once", "hate it", "awful support", "very disappointed", "poor quality"]
    return [
        {"text": (good if i % 2 else bad)[i % 5] + f" #{i}", "label": "positive" if i % 2 else "negative"}
        for i in range(n)
    ]


def chat_rows(n: int = 16) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You answer with the colour of things."},
                {"role": "user", "content": f"What colour is item {i}?"},
                {"role": "assistant", "content": ["red", "green", "blue", "yellow"][i % 4]},
            ]
        }
        for i in range(n)
    ]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def tool_chat_rows(n: int = 16) -> list[dict]:
    """OpenAI's full chat format: `tools`, an assistant call with content null, its `role: tool` result, and an
    answer that every other line leaves untrained (`weight` 0)."""
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    rows = []
    for i in range(n):
        city, call = cities[i % 4], f"call_{i}"
        arguments = json.dumps({"city": city})
        rows.append(
            {
                "tools": [WEATHER_TOOL],
                "messages": [
                    {"role": "system", "content": "You look up the weather."},
                    {"role": "user", "content": f"What is the weather in {city}?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                    ]},
                    {"role": "tool", "tool_call_id": call, "content": f"{10 + i}C, clear"},
                    {"role": "assistant", "content": f"It is {10 + i}C and clear in {city}.", "weight": i % 2},
                ],
            }
        )  # fmt: skip
    return rows


def preference_rows(n: int = 16) -> list[dict]:
    """OpenAI preference lines: the right parity is preferred over the wrong one."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Is {i} even or odd?"}]},
            "preferred_output": [{"role": "assistant", "content": "even" if i % 2 == 0 else "odd"}],
            "non_preferred_output": [{"role": "assistant", "content": "odd" if i % 2 == 0 else "even"}],
        }
        for i in range(n)
    ]


def text_rows(n: int = 16) -> list[dict]:
    return [{"text": f"The number {i} comes after {i - 1} and before {i + 1}."} for i in range(n)]


@pytest.fixture
def datasets(tmp_path) -> dict[str, Path]:
    """kind of tiny model -> a training file in a format that model trains on (one format per architecture
    family, so the matrix covers classification, chat and plain text)."""
    return {
        "bert": write_jsonl(tmp_path / "cls.jsonl", classification_rows()),
        "llama": write_jsonl(tmp_path / "chat.jsonl", chat_rows()),
        "gpt2": write_jsonl(tmp_path / "text.jsonl", text_rows()),
    }
