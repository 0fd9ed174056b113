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


def autocast_dtype(device: torch.device, weights: torch.dtype = torch.float32) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (adapter weights stay fp32 master copies), and wherever the base
    weights are bf16 (an fp32 adapter's output must meet a bf16 layer's in one dtype); none for fp32 weights on the
    CPU, where fp32 is both the fastest and the exact choice."""
    if weights == torch.bfloat16 or _bf16_gpu(device):
        return torch.bfloat16
    return None


def _bf16_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_weights_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """The dtype the frozen base weights are loaded in. "auto": bf16 on GPUs that support it, where it halves the
    weights' memory (a 7B model: 14 GB instead of 28) and the loop's autocast computes in bf16 anyway; fp32 on the
    CPU, where bf16 matmuls are slower on most cores and fp32 keeps training exact. The adapter's (trainable)
    weights are fp32 either way: `neat_core.train.loop` keeps them as master copies, so small updates are not
    rounded away. "float32" or "bfloat16" force one (bf16 on a CPU halves memory at a time cost)."""
    if preference == "auto":
        return torch.bfloat16 if _bf16_gpu(device) else torch.float32
    if preference not in BASE_DTYPES:
        raise InvalidHyperparameterError("base_dtype", f"unknown dtype {preference!r}", "auto, float32, bfloat16")
    return BASE_DTYPES[preference]
