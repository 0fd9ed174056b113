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
# Every architecture of docs/methods.md "Architectures", by transformers model_type (tests/neat_core/
# test_architectures.py); the encoders train classification on MiniLM's tokenizer, the decoders chat on SmolLM2's.
ENCODER_KINDS = ("bert", "roberta", "deberta-v2", "modernbert", "distilbert")
DECODER_KINDS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "opt", "gpt2")
ARCHITECTURE_KINDS = DECODER_KINDS + ENCODER_KINDS


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
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
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
    if kind == "gpt2":
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
    # The other architectures, each as small as its config allows: 2 layers, 4 query heads of 8 dimensions.
    special = {"pad_token_id": tokenizer.pad_token_id, "vocab_size": vocab}
    if kind in ENCODER_KINDS:  # MiniLM's [CLS] and [SEP] (ModernBERT's defaults are ids of its own 50k vocabulary)
        marks = {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
                 "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}  # fmt: skip
        config = AutoConfig.for_model(kind, **special, **marks, **TINY_ENCODERS[kind])
        return AutoModel.from_config(config)  # a bare encoder: loading for classification adds a fresh head
    ids = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **special, **ids, **TINY_DECODERS[kind]))


_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256}  # fmt: skip
_GQA = {**_DECODER, "num_key_value_heads": 2}  # grouped-query attention: 2 kv heads serve 4 query heads
TINY_DECODERS = {
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 8},  # its default head_dim is 128, whatever the hidden size
    "mistral": _GQA,
    "gemma2": {**_GQA, "head_dim": 8, "sliding_window": 4},  # layer 0 slides over 4 tokens, layer 1 is global
    "gemma3_text": {**_GQA, "head_dim": 8, "sliding_window": 4},  # both layers slide (every 6th is global)
    "phi3": _GQA,  # qkv_proj: [q (4·8) | k (2·8) | v (2·8)]
    "gpt_neox": _DECODER,  # query_key_value: [q_h | k_h | v_h] per head
    "opt": {
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 256,
    },
}
_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 128, "initializer_range": 0.2}  # fmt: skip
TINY_ENCODERS = {
    "roberta": {**_ENCODER, "max_position_embeddings": 130},  # positions start after the padding index
    "deberta-v2": {
        **_ENCODER,
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
    },  # DeBERTa-v3's disentangled attention
    "modernbert": {**_ENCODER, "local_attention": 4, "global_attn_every_n_layers": 2},  # layer 1 is local
    "distilbert": {
        "dim": 32,
        "hidden_dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
    },
}


def _build_tiny(root: Path, kinds: tuple[str, ...], model_cache: Path) -> dict[str, Path]:
    """kind -> local directory with a tiny random model and a real tokenizer (MiniLM's for the encoders, SmolLM2's
    for the causal LMs, which gives them a chat template)."""
    import torch
    from transformers import AutoTokenizer

    from neat_core.models import resolve

    encoder, decoder = AutoTokenizer.from_pretrained(resolve(MINILM)), None
    out = {}
    for kind in kinds:
        if kind not in ENCODER_KINDS and decoder is None:
            decoder = AutoTokenizer.from_pretrained(resolve(SMOLLM2, model_cache))
        tokenizer = encoder if kind in ENCODER_KINDS else decoder
        torch.manual_seed(0)
        model = _tiny_model(kind, tokenizer)
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where the catalog converts SmolLM2 from GGUF; the user-level cache, so the conversion happens once per
    machine rather than once per test session."""
    from neat_core.models.loading import DEFAULT_CACHE_DIR

    return DEFAULT_CACHE_DIR


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, model_cache) -> dict[str, Path]:
    """kind -> local directory with a tiny random model of TINY_KINDS (`_build_tiny`)."""
    return _build_tiny(tmp_path_factory.mktemp("tiny-models"), TINY_KINDS, model_cache)


@pytest.fixture(scope="session")
def tiny_architectures(tmp_path_factory, model_cache) -> dict[str, Path]:
    """model_type -> local directory with a tiny random model of every architecture in ARCHITECTURE_KINDS."""
    return _build_tiny(tmp_path_factory.mktemp("tiny-architectures"), ARCHITECTURE_KINDS, model_cache)


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
