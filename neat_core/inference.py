"""Single-request inference with a loaded adapter: classification and chat generation. (The batched serving
engine builds on the same model objects.)"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def classify(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 128
) -> list[dict]:
    """[{"label", "probabilities": {label: p}}] per text, labels from the model config's id2label."""
    device = next(model.parameters()).device
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    probs = model(**batch).logits.float().softmax(-1)  # (B, n_labels)
    id2label = model.config.id2label
    return [
        {
            "label": id2label[int(row.argmax())],
            "probabilities": {id2label[i]: float(p) for i, p in enumerate(row)},
        }
        for row in probs
    ]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[str, int, int]:
    """Reply to a chat; returns (text, prompt_tokens, completion_tokens). temperature 0 is greedy."""
    device = next(model.parameters()).device
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    if seed is not None:
        torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    new = out[0, ids["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), ids["input_ids"].shape[1], int(new.numel())
