"""Fault injection for the crash tests: with `NEAT_FAULT_POINT=<point>[:<n>]` the worker process SIGKILLs itself the
n-th time (default 1st) it reaches <point>, exactly as the kernel would kill it. Off unless that setting is given.

Points, in the order a job meets them:
    claimed     the job is claimed, nothing loaded yet
    loading     the base model is loaded, the adapter not yet attached
    step        after training step n (mid-epoch, between checkpoints)
    checkpoint  inside the n-th checkpoint write: files written, not yet renamed into place
    artifact    inside the artifact write: adapter weights written, LoRA export and manifest not yet, no rename
    trained     training finished and the artifact stored; the outcome not yet recorded
and one that kills nothing: `pace:<ms>` sleeps that long after every step, so that the outage tests can take
Redis, Postgres or the API away while a tiny model is still training.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections import Counter
from typing import Any

from control.settings import Settings

log = logging.getLogger(__name__)

POINTS = ("claimed", "loading", "step", "checkpoint", "artifact", "trained", "pace")
_seen: Counter[str] = Counter()
_installed = False


def _parse(settings: Settings) -> tuple[str, int] | None:
    if not settings.fault_point:
        return None
    point, _, n = settings.fault_point.partition(":")
    if point not in POINTS:
        raise ValueError(f"NEAT_FAULT_POINT: unknown point {point!r}; one of {', '.join(POINTS)}")
    return point, int(n or 1)


def reached(point: str, settings: Settings) -> None:
    """Count a visit to `point`; die here if this is the configured visit."""
    fault = _parse(settings)
    if fault is None or fault[0] != point:
        return
    _seen[point] += 1
    if _seen[point] == fault[1]:
        _kill(f"{point}:{fault[1]}")


def _kill(where: str) -> None:
    log.error("fault injection: SIGKILL at %s", where)
    os.kill(os.getpid(), signal.SIGKILL)


def callbacks(settings: Settings) -> list[Any]:
    """Training callbacks for the points inside the loop, after wrapping the library calls the other points sit
    in. Empty (and nothing wrapped) unless a fault is configured."""
    fault = _parse(settings)
    if fault is None:
        return []
    _install(settings)
    from neat_core.train import Callback

    class AtStep(Callback):
        def on_step_end(self, loop: Any, metrics: dict[str, float]) -> None:
            if loop.step == fault[1]:
                _kill(f"step:{fault[1]}")

    class Pace(Callback):
        def on_step_end(self, loop: Any, metrics: dict[str, float]) -> None:
            time.sleep(fault[1] / 1000)

    return {"step": [AtStep()], "pace": [Pace()]}.get(fault[0], [])


def _install(settings: Settings) -> None:
    global _installed
    if _installed:
        return
    import neat_core.artifacts as artifacts
    import neat_core.train.checkpoint as checkpoint
    import neat_core.train.loop as loop

    def after(point: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            reached(point, settings)
            return result

        return wrapper

    def before(point: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            reached(point, settings)
            return fn(*args, **kwargs)

        return wrapper

    loop.load_base = after("loading", loop.load_base)
    checkpoint._fsync_tree = after("checkpoint", checkpoint._fsync_tree)  # files written, rename not yet done
    artifacts.export_lora = before("artifact", artifacts.export_lora)  # adapter weights written, no manifest yet
    _installed = True
