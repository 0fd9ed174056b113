"""Checking a local transformers directory before an operator registers it as a base model, without loading it.

Torch-free (the web tier and the admin CLI run it): config.json, the safetensors headers (each file's first bytes:
its tensor table, which gives the exact parameter count and dtype and proves the file is safetensors at all), the
tokenizer files and the chat template. Pickle weights (`*.bin`, `*.pt`, ...) are refused outright, even beside
safetensors ones: loading a pickle runs whatever code it holds, and a directory with both would leave the choice
to transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from neat_core.models.architectures import ARCHITECTURES, architecture_name
from neat_core.models.catalog import CAUSAL_LM, tasks_of

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


class InvalidModelDirectory(ValueError):
    """A directory that cannot be registered; the message names the problem and what to do about it."""


@dataclass(frozen=True)
class ModelDirectory:
    path: Path
    model_type: str
    tasks: tuple[str, ...]
    parameters: int  # counted in the safetensors headers
    dtype: str  # the weights' dtype as safetensors names it ("F32", "BF16", ...), the most common one if mixed


def inspect_model_dir(path: str | Path) -> ModelDirectory:
    """What a registered base model needs, checked in order; InvalidModelDirectory for the first thing missing."""
    path = Path(path)
    if not path.is_absolute():
        raise InvalidModelDirectory(f"{path}: give an absolute path (on storage every worker and server mounts)")
    if not path.is_dir():
        raise InvalidModelDirectory(f"{path} is not a directory")
    config = _config(path)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise InvalidModelDirectory(f"{path}: unsupported architecture {architecture_name(model_type)}; supported "
                                    f"model_types: {supported}")  # fmt: skip
    parameters, dtype = _weights(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidModelDirectory(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one "
                                    "beside the model with tokenizer.save_pretrained")  # fmt: skip
    tasks = tasks_of(config)
    if CAUSAL_LM in tasks and not _has_chat_template(path):
        raise InvalidModelDirectory(f"{path} is a causal LM without a chat template (chat_template.jinja, or "
                                    "chat_template in tokenizer_config.json): chat fine-tuning and chat completions "
                                    "render conversations with it")  # fmt: skip
    return ModelDirectory(path, model_type, tasks, parameters, dtype)


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidModelDirectory(f"{path} has no config.json: not a transformers model directory") from None
    except (OSError, ValueError) as e:
        raise InvalidModelDirectory(f"{path}/config.json cannot be read as JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidModelDirectory(f"{path}/config.json is not a JSON object")
    return config


def _weights(path: Path) -> tuple[int, str]:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidModelDirectory(f"{path} holds pickle weights ({', '.join(pickles[:3])}): refused, loading a "
                                    "pickle can run arbitrary code; convert them to safetensors (save_pretrained "
                                    "with safe_serialization=True) and remove them")  # fmt: skip
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidModelDirectory(f"{path} has no *.safetensors weights")
    parameters, by_dtype = 0, {}
    for file in files:
        for name, tensor in _header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for size in tensor["shape"]:
                count *= size
            parameters += count
            by_dtype[tensor["dtype"]] = by_dtype.get(tensor["dtype"], 0) + count
    if not parameters:
        raise InvalidModelDirectory(f"{path}: its safetensors files hold no tensors")
    return parameters, max(by_dtype, key=by_dtype.get)


def _header(file: Path) -> dict:
    """A safetensors file's tensor table: an 8-byte little-endian length, then that many bytes of JSON."""
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        if not isinstance(header, dict) or not all(
            isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)
            for k, t in header.items()
            if k != "__metadata__"
        ):
            raise ValueError("unexpected tensor table")
    except (OSError, ValueError, struct.error) as e:
        raise InvalidModelDirectory(f"{file} is not a readable safetensors file: {e}") from None
    return header


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
