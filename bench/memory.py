"""Peak memory of a few training steps, for the benchmarks that compare it side by side (each variant in its own
subprocess: peak RSS is a per-process high-water mark).

On CPU a sampling thread polls the process's resident set during the steps; the baseline is the RSS just before
them (model loaded and wrapped), so "growth" is what the steps themselves add. On CUDA: torch's peak allocated bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(step: Callable[[], None], steps: int, device) -> dict[str, int]:
    """Run `step` `steps` times; {"peak": bytes, "growth": bytes over the baseline}."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        peak = torch.cuda.max_memory_allocated()
        return {"peak": peak, "growth": peak - base}
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(steps):
        step()
    done.set()
    sampler.join()
    return {"peak": peak[0], "growth": peak[0] - base}


def train_step(model, batch: dict) -> Callable[[], float]:
    """One optimiser step on `batch` (AdamW over the trainable parameters, the loop's autocast), as a closure that
    returns its wall seconds (CUDA synchronised): the step the memory and speed benchmarks measure."""
    import torch

    from neat_core.devices import autocast_dtype

    device = batch["input_ids"].device
    amp = autocast_dtype(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step
