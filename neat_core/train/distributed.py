"""Data-parallel training: one run as N torch.distributed processes ("ranks"), each holding a replica of the model
and taking 1/N of every global batch; `DistributedDataParallel` averages their gradients. Everything that differs
from a single-process run lives here; the loop (`neat_core.train.loop`) asks `current()` for it and reads the same
either way (in one process `current()` is `Replicas()`, whose every method is the identity).

Processes. `launch` (in the caller's process, e.g. the Celery task) starts N rank processes, runs the caller's
callbacks for rank 0, and returns rank 0's `TrainResult`. Each rank runs the ordinary `train` with `current()` set
to its `Replicas`. Rank 0 alone has callbacks (a proxy: each hook call is sent to the launcher, which runs the real
callbacks and answers), so rank 0 alone reports progress, hears of a cancel or pause and writes checkpoints and the
artifact. A stop decision is rank 0's `should_stop`, broadcast to every rank after each step, so all ranks stop
after the same step. Any rank that fails or dies ends the whole group; so does the launcher's exit, whatever its
cause, and a rank whose launcher is killed dies with it (PR_SET_PDEATHSIG).

Why plain subprocesses (`python -c ... rank_main(...)`) and not `torch.multiprocessing.spawn` or torchrun:
the launcher is a Celery prefork pool child, which is daemonic, and `multiprocessing` refuses to start children from
a daemonic process; torchrun's elastic agent restarts failed groups itself, which the service's leases and exact
resume already do, and would put a second supervisor between the job and its ranks. A socketpair per rank
(multiprocessing's `Pipe`) carries the spec, the callback calls and the outcome; a file store in a temporary folder
is the rendezvous (no port to pick, none to collide).

Equal to one process. The global batch is collated once, on every rank, exactly as one process collates it (same
rows, same padding); rank r takes its rows r, r+N, r+2N, ... (for preference pairs, the same pairs' chosen and
rejected rows). The model's loss on a shard is a mean over the shard's units (rows; pairs for DPO; labelled
next-token positions for causal LM), so each rank back-propagates `loss_r * share_r * N`, share_r = its units / the
global batch's units: DDP's average over N ranks is then sum_r share_r * grad(loss_r) = the gradient of the global
mean, as in one process. Logged loss and statistics are the same share-weighted sums (one all-reduce). What differs:
floating-point summation order; dropout masks (each rank draws its own), so a model with dropout trains like
another seed, not identically; and anything computed across a batch's rows (Lily's "batch" router mixes its experts
by a mean over the batch: each rank mixes over its own rows).

Resume. Every rank's generator states go into the checkpoint (rank 0's under the usual keys, rank r's under
"rank{r}."), so a resumed group replays the same batches and the same random draws; the device count is part of the
run's fingerprint.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from neat_core.devices import resolve_device
from neat_core.errors import InvalidHyperparameterError, NeatCoreError
from neat_core.train.callbacks import Callback

if TYPE_CHECKING:
    from neat_core.train.loop import TrainResult
    from neat_core.train.spec import TrainSpec

log = logging.getLogger(__name__)

MAX_DEVICES = 64  # as control.queue.MAX_DEVICES, which the API checks (neat_core imports no service code)
# A collective waits this long for its peers: rank 0 validates and writes checkpoints while the others wait at the
# next step's collective. A rank that dies is noticed at once (its sockets close, the launcher sees it exit).
COLLECTIVE_TIMEOUT = timedelta(hours=2)
STOP_GRACE_SECONDS = 10.0  # after a terminate, before a kill
# A rank's command line, after `python -c`; its arguments: its end of the launcher's pipe (a file descriptor), the
# launcher's pid
RANK = "import sys; from neat_core.train.distributed import rank_main; rank_main(int(sys.argv[1]), int(sys.argv[2]))"


class Replicas:
    """The single process: one replica, every method the identity. `_Group` is the N-process version."""

    rank, world, is_main = 0, 1, True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop runs its training forward passes through (DDP's wrapper, in a group)."""
        return model

    def shard(self, batch: dict[str, torch.Tensor], units: Callable[[dict], int], pairs: bool):
        """(this rank's part of the global `batch`, its share of the loss's denominator)."""
        return batch, 1.0

    def backward(self, loss: torch.Tensor, stats: dict[str, float], share: float) -> tuple[float, dict[str, float]]:
        """Back-propagate this rank's loss; returns the global batch's loss and statistics (what one process logs)."""
        loss.backward()
        return float(loss.detach()), stats

    def agree(self, stop: bool) -> bool:
        """Rank 0's decision, on every rank."""
        return stop

    def rng_states(self) -> dict[str, torch.Tensor] | None:
        """Every rank's generator states, for rank 0's checkpoint (None: this process's, as `save_checkpoint` reads
        them)."""
        return None


class _DDP(DistributedDataParallel):
    """DDP that lets attribute lookups through to the peft model (DPO's reference pass calls `disable_adapter()` on
    the module it is given)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class _Group(Replicas):
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.is_main, self.device = rank, world, rank == 0, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Buffers are not synchronised at each forward: every replica was built from the same weights and seed, and
        # none changes them.
        ids = [self.device] if self.device.type == "cuda" else None
        return _DDP(model, device_ids=ids, forward_sync_buffers=False)

    def shard(self, batch: dict[str, torch.Tensor], units: Callable[[dict], int], pairs: bool):
        n = batch["input_ids"].shape[0] // (2 if pairs else 1)  # rows of [B, T]; pairs of [2B, T] (chosen, rejected)

        def rows(indices: list[int]) -> dict[str, torch.Tensor]:
            index = torch.tensor(indices + [i + n for i in indices] if pairs else indices, dtype=torch.long)
            return {k: v.index_select(0, index) for k, v in batch.items()}

        part = rows(list(range(self.rank, n, self.world)))
        if units(part) > 0:
            return part, units(part) / units(batch)
        # None of the loss's denominator is here (a last batch with fewer rows than ranks, or rows whose labels are
        # all masked, whose mean loss would be 0/0): DDP still needs this rank's forward and backward, so it runs a
        # row that has some, counted for nothing.
        stand_in = next((i for i in range(n) if units(rows([i])) > 0), 0)
        return rows([stand_in]), 0.0

    def backward(self, loss: torch.Tensor, stats: dict[str, float], share: float) -> tuple[float, dict[str, float]]:
        (loss * (share * self.world)).backward()  # DDP divides the summed gradients by world
        # [1 + S]: the share-weighted loss and statistics, summed over ranks = the global batch's
        summed = torch.tensor([float(loss.detach()), *stats.values()], dtype=torch.float64) * share
        dist.all_reduce(summed)
        values = summed.tolist()
        return values[0], dict(zip(stats, values[1:], strict=True))

    def agree(self, stop: bool) -> bool:
        flag = [stop]
        dist.broadcast_object_list(flag, src=0)
        return bool(flag[0])

    def rng_states(self) -> dict[str, torch.Tensor] | None:
        mine = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda0"] = torch.cuda.get_rng_state(self.device)  # each rank sees its own GPU only, as cuda:0
        everyone: list[dict | None] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        states = dict(everyone[0])
        for rank, theirs in enumerate(everyone[1:], start=1):
            states.update({f"rank{rank}.{key}": value for key, value in theirs.items()})
        return states


_current: Replicas = Replicas()


def current() -> Replicas:
    """This process's replicas: a rank's group, or the single process."""
    return _current


def check_devices(n_devices: Any) -> int:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or not 1 <= n_devices <= MAX_DEVICES:
        raise InvalidHyperparameterError("n_devices", f"invalid value {n_devices!r}", f"an integer 1..{MAX_DEVICES}")
    return n_devices


# --- the launcher -----------------------------------------------------------------------------------------------


def launch(spec: TrainSpec, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `spec` as `spec.n_devices` processes; the caller's `callbacks` run here, for rank 0. Returns rank 0's
    result; raises what a rank raised (or what a callback raised), after every rank has stopped."""
    world = check_devices(spec.n_devices)
    gpus = _gpus(spec.device, world)
    threads = max(1, torch.get_num_threads() // world)  # CPU ranks share this process's cores
    store = Path(tempfile.mkdtemp(prefix="neat-ddp-"))
    ranks: list[subprocess.Popen] = []
    pipes = []
    try:
        for rank in range(world):
            ours, theirs = multiprocessing.Pipe(duplex=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if gpus is not None:  # each rank sees one GPU, its own, as cuda:0
                env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
            command = [sys.executable, "-c", RANK, str(theirs.fileno()), str(os.getpid())]
            ranks.append(subprocess.Popen(command, env=env, pass_fds=[theirs.fileno()]))
            theirs.close()
            ours.send((rank, world, str(store / "rendezvous"), threads, gpus is not None, spec))
            pipes.append(ours)
        return _serve(ranks, pipes, list(callbacks))
    finally:
        _stop(ranks)
        for pipe in pipes:
            pipe.close()
        shutil.rmtree(store, ignore_errors=True)


def _gpus(preference: str, world: int) -> list[str] | None:
    """The GPU each rank gets (None: the ranks run on the CPU, with gloo)."""
    device = resolve_device(preference)
    if device.type != "cuda":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    ids = ids or [str(i) for i in range(torch.cuda.device_count())]
    first = device.index or 0
    if first + world > len(ids):
        raise InvalidHyperparameterError("n_devices", f"{world} GPUs asked for from {device}, {len(ids)} visible",
                                         f"at most {len(ids) - first}")  # fmt: skip
    return ids[first : first + world]


def _serve(ranks: list[subprocess.Popen], pipes: list, callbacks: list[Callback]) -> TrainResult:
    """Answer rank 0's callback calls until every rank has finished; the first failure ends it."""
    result, finished = None, set()
    waiting = {pipe: rank for rank, pipe in enumerate(pipes)}
    while len(finished) < len(ranks):
        ready = multiprocessing.connection.wait(list(waiting), timeout=1.0)
        for pipe in ready:
            rank = waiting[pipe]
            try:
                kind, *body = pipe.recv()
            except (EOFError, OSError):  # its end closed without a word: it died
                code = ranks[rank].wait()
                raise RuntimeError(f"training rank {rank} of {len(ranks)} exited with code {code}") from None
            if kind == "hook":
                name, args = body
                pipe.send(_call(callbacks, name, args))  # an exception here ends the group (launch's finally)
            elif kind == "done":
                result = body[0] if rank == 0 else result
                finished.add(rank)
                del waiting[pipe]
            else:  # "error": what the rank raised, re-raised here
                error, trace = body
                log.error("training rank %d failed:\n%s", rank, trace)
                raise error
    return result


def _call(callbacks: list[Callback], name: str, args: tuple) -> Any:
    if name == "should_stop":
        return any(cb.should_stop(*args) for cb in callbacks)
    for cb in callbacks:
        getattr(cb, name)(*args)
    return None


def _stop(ranks: list[subprocess.Popen]) -> None:
    """Every rank ended: already done, or terminated, then killed after STOP_GRACE_SECONDS."""
    for proc in ranks:
        if proc.poll() is None:
            proc.terminate()
    for proc in ranks:
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a rank -----------------------------------------------------------------------------------------------------


def _forward(name: str):
    def hook(self, *args):
        self.pipe.send(("hook", name, args))
        return self.pipe.recv()

    hook.__name__ = name
    return hook


class _ToLauncher(Callback):
    """Rank 0's callbacks: every hook is a call to the launcher, which runs the caller's callbacks and answers."""

    def __init__(self, pipe):
        self.pipe = pipe

    on_train_begin = _forward("on_train_begin")
    on_step_end = _forward("on_step_end")
    on_evaluate = _forward("on_evaluate")
    on_epoch_end = _forward("on_epoch_end")
    before_save = _forward("before_save")
    on_checkpoint = _forward("on_checkpoint")
    should_stop = _forward("should_stop")
    on_selection = _forward("on_selection")


def _die_with_parent(launcher: int) -> None:
    """A rank whose launcher is gone (SIGKILLed with its worker) must not train on as an orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher died before the line above
        os._exit(1)


def rank_main(fd: int, launcher: int) -> None:
    """A rank process: receive the run from the launcher, join the group, train, report the outcome."""
    global _current
    _die_with_parent(launcher)
    pipe = multiprocessing.connection.Connection(fd)
    rank, world, rendezvous, threads, on_gpu, spec = pipe.recv()
    torch.set_num_threads(threads)
    try:
        from neat_core.train.loop import train  # the loop imports this module

        device = torch.device("cuda:0" if on_gpu else "cpu")  # on a GPU, its own is the only one it sees
        if on_gpu:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world, timeout=COLLECTIVE_TIMEOUT)  # fmt: skip
        _current = _Group(rank, world, device)
        result = train(replace(spec, device=str(device)), [_ToLauncher(pipe)] if rank == 0 else [])
        dist.destroy_process_group()
        pipe.send(("done", result if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001  (reported to the launcher, which ends the group and raises it)
        pipe.send(("error", _picklable(e), traceback.format_exc()))
        raise SystemExit(1) from None


def _picklable(e: BaseException) -> BaseException:
    """`e` if it survives pickling (neat_core's errors do: NeatCoreError.__reduce__), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        wrapped = NeatCoreError if isinstance(e, NeatCoreError) else RuntimeError
        return wrapped(f"{type(e).__name__}: {e}")
