"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically, no pickle.

A checkpoint is a directory `step-000123/` holding
    adapter/              the adapter in peft's format (loadable as is: a checkpoint is a usable adapter)
    optimizer.safetensors optimizer state tensors, keyed "<param index>.<name>"
    rng.safetensors       torch CPU (and CUDA) generator states
    state.json            loop position, scheduler state, optimizer param groups and scalars, metrics
It is written under a temporary name, fsynced, and renamed into place, so a directory named `step-*` is always
complete: a crash mid-write leaves only a `.tmp` directory, which `latest_checkpoint` ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from neat_core.errors import CheckpointError

_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class LoopState:
    """Where the loop is. `batch_in_epoch` batches of epoch `epoch` are done; the data order is a function of
    (seed, epoch), so this position is all it takes to continue with the very next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    trained_tokens: int = 0


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_to_safe(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    *,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loop: LoopState,
    metrics: dict[str, float],
    fingerprint: dict[str, Any],
    method_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    write_adapter: Callable[[Path], None] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint for `loop.step` under `root`; returns its final path. `write_adapter(directory)` writes
    the adapter's files (the training loop makes `adapter/` a servable artifact); by default peft's alone. `rng`:
    the generator states to save (a data-parallel run's, every rank's: neat_core.train.distributed); by default
    this process's."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{loop.step:06d}"
    tmp = root / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:  # a write that fails (a full disk, an interrupt) removes its temporary directory; a killed one is swept
        tmp.mkdir()
        if write_adapter is None:
            model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        else:
            (tmp / "adapter").mkdir()
            write_adapter(tmp / "adapter")
        opt_tensors, opt_meta = _optimizer_to_safe(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if rng is None:
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        state = {
            "loop": asdict(loop),
            "scheduler": scheduler.state_dict(),
            "optimizer": opt_meta,
            "metrics": metrics,
            "fingerprint": fingerprint,
            "method_state": method_state or {},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. a cancel right after a scheduled save) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint directory (from `save_checkpoint` or `list_checkpoints`) was saved at."""
    match = _NAME.match(path.name)
    if match is None:
        raise CheckpointError(f"{path.name} is not a checkpoint directory")
    return int(match.group(1))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable checkpoint {path.name}: {e}") from e


def load_checkpoint(
    path: Path,
    *,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
    rank: int = 0,
) -> tuple[LoopState, dict[str, float]]:
    """Restore adapter, optimizer, scheduler and RNG from `path` into a freshly built run; returns the loop state.
    `rank`: a data-parallel run's rank, whose own generator states it restores (rank r's are saved as "rank{r}.*")."""
    state = read_checkpoint_state(path)
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {path.name} belongs to a different run (method, model, data or hyperparameters differ)"
        )
    device = next(p.device for p in model.parameters())
    weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(device))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path.name} has weights this model lacks: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(
        _optimizer_from_safe(load_file(path / "optimizer.safetensors", device=str(device)), state["optimizer"])
    )
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(path / "rng.safetensors")
    if rank:
        rng = {key.removeprefix(f"rank{rank}."): value for key, value in rng.items() if key.startswith(f"rank{rank}.")}
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return LoopState(**state["loop"]), state["metrics"]
