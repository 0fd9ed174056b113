"""Where training and inference run: CUDA when present, the CPU otherwise, overridable by the caller."""

from __future__ import annotations

import torch

from neat_core.errors import InvalidHyperparameterError


def resolve_device(preference: str = "auto") -> torch.device:
    """ "auto" picks cuda:0 when a GPU is visible, else the CPU; "cpu", "cuda", "cuda:N" force one."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidHyperparameterError("device", f"{preference!r} requested but no GPU is visible", "auto, cpu")
    try:
        return torch.device(preference)
    except RuntimeError as e:
        raise InvalidHyperparameterError("device", f"invalid device {preference!r}", "auto, cpu, cuda[:N]") from e


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (adapter weights stay fp32 master copies); none on the CPU, where
    fp32 is both the fastest and the exact choice."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
