"""The training loop. `train` reads top to bottom: set-up (data → model → adapter, `_set_up`) → the method's set-up
(or, resuming, its saved state) → optimiser → (resume) → for each step: forward/backward → method hook → clip →
step → method hook (rebuild the optimiser if the trainable set changed) → log → evaluate/checkpoint → stop? →
artifact. The objective (supervised, or DPO on preference pairs: `neat_core.train.dpo`) only changes how a batch
becomes a loss and how a validation pass scores.

Determinism is what makes resume exact: the batch order of epoch e is a permutation drawn from a generator
seeded with (seed, e), and the global RNG (dropout) is checkpointed, so a run continued from step k replays
exactly the batches and random draws the uninterrupted run would have made.

A run on several devices (`spec.n_devices`) is this loop in each of N processes: `replicas` (from
`neat_core.train.distributed`, which launches them) shards each global batch, wraps the model in DDP, combines the
ranks' losses, and agrees on stopping; only its main rank has callbacks and writes. In one process each of those
is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neat_core.artifacts import file_sha256, parameter_counts, save_artifact, write_adapter
from neat_core.data.encode import Collator, encode_examples, label_vocabulary
from neat_core.data.formats import read_examples
from neat_core.devices import autocast_dtype, base_weights_dtype, resolve_device
from neat_core.errors import DataFormatError
from neat_core.export import base_weights_sha256
from neat_core.memory import resolve_gradient_checkpointing
from neat_core.methods import AUTO, get_method
from neat_core.models.loading import load_base
from neat_core.train import distributed, dpo
from neat_core.train.callbacks import Callback
from neat_core.train.checkpoint import LoopState, load_checkpoint, read_checkpoint_state, save_checkpoint
from neat_core.train.spec import Schedule, TrainSpec, resolve_beta, resolve_schedule


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled"
    adapter_dir: Path | None  # the artifact, when succeeded
    last_checkpoint: Path | None
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]  # resolved: the schedule and the method's hyperparameters
    trained_tokens: int
    steps: int
    selection: dict[str, Any] | None = None  # method "auto": the choice and its candidates (neat_core.train.select)

    @property
    def cancelled(self) -> bool:
        """A callback stopped the run (`should_stop`) before its last step; `last_checkpoint` holds where it got."""
        return self.status == "cancelled"


def _batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _linear_warmup_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _optimiser(model, schedule: Schedule, previous=None) -> tuple[list, torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (adapter, and head: fp32 master weights) with the warm-up/decay
    schedule. With `previous` (optimiser, scheduler), a rebuild mid-run: surviving parameters keep their moments
    and the schedule continues from the step it had reached."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(schedule.warmup_steps, schedule.total_steps)
    )
    if previous is not None:
        old_optimizer, old_scheduler = previous
        for p in params:
            if p in old_optimizer.state:
                optimizer.state[p] = old_optimizer.state[p]
        scheduler.load_state_dict(old_scheduler.state_dict())
        for group in optimizer.param_groups:
            group["lr"] = old_scheduler.get_last_lr()[0]
    return params, optimizer, scheduler


def _correct(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[int, int]:
    """(correct, counted): examples for classification, next-token predictions on labelled tokens otherwise."""
    if task == "classification":
        return int((logits.argmax(-1) == labels).sum()), labels.numel()
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = target != -100
    return int(((predicted == target) & mask).sum()), int(mask.sum())


@torch.no_grad()
def evaluate(model, dataset: list[dict], collate: Collator, batch_size: int, task: str, device, amp) -> dict:
    """Loss summed over examples (classification) or labelled tokens (causal LM), then averaged: batch-size
    independent, unlike a mean of per-batch means."""
    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate(dataset[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        with _autocast(device, amp):
            logits = model(**batch).logits.float()
        if task == "classification":
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        else:
            loss_sum += float(
                F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")
            )
        c, n = _correct(logits, labels, task)
        correct, counted = correct + c, counted + n
    model.train()
    accuracy = "full_valid_accuracy" if task == "classification" else "full_valid_mean_token_accuracy"
    return {"full_valid_loss": loss_sum / max(1, counted), accuracy: correct / max(1, counted)}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@dataclass
class _Run:
    """Everything `train` sets up before its first step: the data (encoded), the wrapped model, the method's
    resolved hyperparameters and the schedule."""

    fmt: Any  # neat_core.data.formats.DataFormat
    task: str
    beta: float | None  # DPO's, resolved; None for supervised runs
    labels: list[str] | None
    model: Any  # peft.PeftModel, on the device, in train mode
    adapter_hp: dict[str, Any]
    gradient_checkpointing: bool  # resolved: each decoder/encoder layer recomputes its activations in the backward
    base_dtype: torch.dtype  # resolved: the frozen base's weights (neat_core.devices.base_weights_dtype)
    schedule: Schedule
    train_set: list[dict]
    valid_set: list[dict]
    collate: Collator


def _read_data(spec: TrainSpec) -> tuple[Any, list[dict], list[dict], list[str] | None]:
    """(format, training examples, validation examples, labels): the format fixes the task; classification labels
    fix the head."""
    fmt, train_examples = read_examples(spec.training_file)
    valid_examples: list[dict] = []
    if spec.validation_file is not None:
        valid_fmt, valid_examples = read_examples(spec.validation_file)
        if valid_fmt != fmt:
            raise DataFormatError(f"validation file is {valid_fmt.value}, training file is {fmt.value}")
    labels = label_vocabulary(train_examples) if fmt.task == "classification" else None
    if labels is not None and len(labels) < 2:
        raise DataFormatError("classification needs at least two distinct labels")
    return fmt, train_examples, valid_examples, labels


def _enable_checkpointing(model) -> None:
    """Activation checkpointing on the base model's repeated layers (transformers' GradientCheckpointingLayer:
    each layer keeps only its input, (B, T, h), and reruns its forward in the backward), before the adapter is
    attached, so the adapter's layers inside each block are recomputed with it. Non-reentrant checkpointing: the
    recomputation tracks gradients to parameters whatever their inputs require, so peft's frozen embeddings need no
    `enable_input_require_grads()`, and it restores the RNG state, so dropout draws the same masks twice and the
    global RNG (checkpointed for resume) advances exactly as without it. Only in train mode: evaluation runs
    under no_grad and keeps nothing."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is meaningless while training and defeats the recomputation


def _set_up(spec: TrainSpec, method, device: torch.device) -> _Run:
    """Data, base model, adapter, schedule, encoded datasets. The seed fixes the initialisation of a new
    classification head and of the adapter."""
    fmt, train_examples, valid_examples, labels = _read_data(spec)
    beta = resolve_beta(spec)
    if fmt.objective != spec.objective:  # the file's format and the job's method type must agree
        wanted = "the preference format" if spec.objective == "dpo" else "a supervised format, not preference pairs"
        raise DataFormatError(f"a {spec.objective} run needs {wanted}; the training file is {fmt.value}")
    torch.manual_seed(spec.seed)
    weights = base_weights_dtype(device, spec.base_dtype)
    model, tokenizer = load_base(spec.base_model, task=fmt.task, labels=labels, cache_dir=spec.cache_dir,
                                 model_dir=spec.base_model_dir, dtype=weights)  # fmt: skip
    checkpointing = resolve_gradient_checkpointing(spec.gradient_checkpointing, model.num_parameters())
    if checkpointing:
        _enable_checkpointing(model)
    adapter_hp = method.resolve(model, spec.adapter)
    schedule: Schedule = resolve_schedule(
        spec, task=fmt.task, n_examples=len(train_examples), base_learning_rate=method.learning_rate(fmt.task)
    )
    model = method.wrap(model, method.peft_config(model, adapter_hp)).to(device)
    _fp32_masters(model)
    model.train()
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    encode = {"max_length": schedule.max_seq_len, "label2id": label2id}
    return _Run(
        fmt=fmt,
        task=fmt.task,
        beta=beta,
        labels=labels,
        model=model,
        adapter_hp=adapter_hp,
        gradient_checkpointing=checkpointing,
        base_dtype=weights,
        schedule=schedule,
        train_set=encode_examples(train_examples, fmt, tokenizer, **encode),
        valid_set=encode_examples(valid_examples, fmt, tokenizer, **encode),
        collate=Collator(tokenizer.pad_token_id),
    )


def _fp32_masters(model) -> None:
    """Every trainable weight in fp32, whatever the base's dtype: the adapter (peft casts its own layers, not a
    classification head it copies from a bf16 base) and the head. A bf16 weight would round away an update below
    2^-8 of its size, which is most of AdamW's late steps; the frozen base stays as loaded."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _batch(run: _Run, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in run.collate([run.train_set[i] for i in indices]).items()}


def _loss_units(run: _Run, batch: dict[str, torch.Tensor]) -> int:
    """What the batch's loss is a mean over: preference pairs (DPO), rows (classification), or labelled next-token
    positions (causal LM: position t predicts token t+1)."""
    if run.beta is not None:
        return batch["input_ids"].shape[0] // 2
    if run.task == "classification":
        return batch["labels"].shape[0]
    return int((batch["labels"][:, 1:] != -100).sum())


def _method_state(spec: TrainSpec, method, run: _Run, device: torch.device) -> dict[str, Any]:
    """The method's data-dependent set-up (HEAT's head selection) on epoch 0's batches, or on resume the state the
    first run saved, re-applied."""
    if spec.resume_from is not None:
        state = read_checkpoint_state(spec.resume_from).get("method_state", {})
        method.restore(run.model, run.adapter_hp, state)
        return state
    first_epoch = _batches_of_epoch(len(run.train_set), run.schedule.batch_size, spec.seed, 0)
    return method.before_training(run.model, run.adapter_hp, (_batch(run, b, device) for b in first_epoch))


def _step_loss(run: _Run, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss (with gradients) and its statistics, by objective: the model's own loss and an accuracy, or
    DPO's loss and rewards."""
    if run.beta is not None:
        return dpo.step_loss(model, batch, run.beta)
    out = model(**batch)
    correct, counted = _correct(out.logits.detach(), batch["labels"], run.task)
    accuracy_key = "accuracy" if run.task == "classification" else "mean_token_accuracy"
    return out.loss, {accuracy_key: correct / max(1, counted)}


def _log_step(loop: LoopState, metrics: dict, loss: float, stats: dict, batch: dict, lr: float, n_batches: int) -> None:
    """Advance the loop position and record the step's metrics."""
    loop.step += 1
    loop.batch_in_epoch += 1
    loop.trained_tokens += int(batch["attention_mask"].sum())
    metrics.update(
        train_loss=loss,
        learning_rate=lr,
        epoch=loop.epoch + loop.batch_in_epoch / n_batches,
        **{f"train_{name}": value for name, value in stats.items()},
    )


def _manifest(spec: TrainSpec, run: _Run, loop: LoopState, metrics: dict, hyperparameters: dict, state: dict) -> dict:
    return {
        "task": run.task,
        "labels": run.labels,
        "hyperparameters": hyperparameters,
        "metrics": dict(metrics),
        "trained_tokens": loop.trained_tokens,
        "steps": loop.step,
        "training_file_sha256": file_sha256(spec.training_file),
        "validation_file_sha256": file_sha256(spec.validation_file) if spec.validation_file else None,
        "data_format": run.fmt.value,
        "method_state": state,
    }


def train(spec: TrainSpec, callbacks: Sequence[Callback] = ()) -> TrainResult:
    if spec.method == AUTO:  # the method is chosen on the data; imported here: select imports this module
        from neat_core.train.select import train_auto

        return train_auto(spec, callbacks)  # candidates and winner each come back here: one device or several
    replicas = distributed.current()
    if distributed.check_devices(spec.n_devices) != replicas.world:  # the caller's process: start the ranks
        return distributed.launch(spec, callbacks)
    device = resolve_device(spec.device)
    method = get_method(spec.method)
    run = _set_up(spec, method, device)
    amp = autocast_dtype(device, run.base_dtype)
    model, schedule, adapter_hp = run.model, run.schedule, run.adapter_hp
    with _autocast(device, amp):  # its forwards (HEAT's scoring) meet the base in the training steps' dtype
        method_state = _method_state(spec, method, run, device)
    params, optimizer, scheduler = _optimiser(model, schedule)
    hyperparameters = {"method": method.name, **asdict(schedule), "seed": spec.seed, "adapter": adapter_hp}
    if run.beta is not None:  # only DPO runs carry these, so supervised checkpoints keep their fingerprint
        hyperparameters.update(objective="dpo", beta=run.beta)
    if run.gradient_checkpointing:  # likewise only when on: runs without it keep the fingerprint they always had
        hyperparameters["gradient_checkpointing"] = True
    if run.base_dtype != torch.float32:  # likewise: a bf16 base computes other numbers than the fp32 one
        hyperparameters["base_dtype"] = str(run.base_dtype).removeprefix("torch.")
    if replicas.world > 1:  # and the device count: a checkpoint holds every rank's generators, resumed by as many
        hyperparameters["n_devices"] = replicas.world
    fingerprint = {  # a checkpoint only resumes into the run that wrote it
        "base_model": spec.base_model,
        "training_file_sha256": file_sha256(spec.training_file),
        "hyperparameters": hyperparameters,
    }
    loop, metrics = LoopState(), {}
    if spec.resume_from is not None:
        loop, metrics = load_checkpoint(spec.resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                        fingerprint=fingerprint, rank=replicas.rank)  # fmt: skip
    for cb in callbacks:
        cb.on_train_begin(loop, {"hyperparameters": hyperparameters, **parameter_counts(model), "task": run.task})

    hashed: list[str] = []

    def weights_hash() -> str:  # the frozen base's hash, for every checkpoint's manifest: computed once
        if not hashed:
            hashed.append(base_weights_sha256(model))
        return hashed[0]

    def validate() -> None:
        if not run.valid_set or not replicas.is_main:  # the other ranks wait at the next step's all-reduce
            return
        if run.beta is not None:
            autocast = partial(_autocast, device, amp)
            scores = dpo.evaluate(model, run.valid_set, run.collate, schedule.batch_size, device, autocast, run.beta)
        else:
            scores = evaluate(model, run.valid_set, run.collate, schedule.batch_size, run.task, device, amp)
        metrics.update(scores)
        for cb in callbacks:
            cb.on_evaluate(loop, metrics)

    def checkpoint() -> Path | None:
        rng = replicas.rng_states()  # a collective: every rank checkpoints at the same steps; the main one writes
        if not replicas.is_main:
            return None
        for cb in callbacks:
            cb.before_save(loop, "checkpoint")
        manifest = _manifest(spec, run, loop, metrics, hyperparameters, method_state)
        adapter = partial(write_adapter, model, base_model=spec.base_model, manifest=manifest,
                          weights_hash=weights_hash(), export=False)  # servable as a model of its own  # fmt: skip
        path = save_checkpoint(
            spec.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, loop=loop,
            metrics=metrics, fingerprint=fingerprint, method_state=method_state, keep_last=spec.keep_checkpoints,
            write_adapter=adapter, rng=rng,
        )  # fmt: skip
        for cb in callbacks:
            cb.on_checkpoint(loop, path, metrics)
        return path

    def result(status: str, adapter_dir: Path | None) -> TrainResult:
        return TrainResult(
            status, adapter_dir, last_checkpoint, dict(metrics), hyperparameters, loop.trained_tokens, loop.step
        )

    last_checkpoint, saved_at = spec.resume_from, loop.step
    net = replicas.wrap(model)  # what the training forward passes run through: DDP's wrapper on several devices
    units, pairs = partial(_loss_units, run), run.beta is not None
    while loop.step < schedule.total_steps:
        batches = _batches_of_epoch(len(run.train_set), schedule.batch_size, spec.seed, loop.epoch)
        for indices in batches[loop.batch_in_epoch :]:
            whole = run.collate([run.train_set[i] for i in indices])  # the global batch, [B, T], on every rank
            batch, share = replicas.shard(whole, units, pairs)  # this rank's rows of it: all of them in one process
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, amp):
                loss, stats = _step_loss(run, net, batch)
            loss, stats = replicas.backward(loss, stats, share)  # the global batch's loss and statistics
            method.after_backward(model, adapter_hp, method_state, loop.step + 1)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if method.after_step(model, adapter_hp, method_state, loop.step + 1):  # trainable set changed (Pear)
                params, optimizer, scheduler = _optimiser(model, schedule, previous=(optimizer, scheduler))
                net = replicas.wrap(model)  # DDP registers the trainable parameters when it wraps
            _log_step(loop, metrics, loss, stats, whole, scheduler.get_last_lr()[0], len(batches))
            for cb in callbacks:
                cb.on_step_end(loop, metrics)

            finished = loop.step >= schedule.total_steps
            due = spec.checkpoint_every and loop.step % spec.checkpoint_every == 0
            if due or loop.batch_in_epoch == len(batches) or finished:  # every N steps, each epoch's end, the end
                validate()
                last_checkpoint, saved_at = checkpoint(), loop.step
            if not finished and replicas.agree(any(cb.should_stop(loop) for cb in callbacks)):
                if saved_at != loop.step:  # stopping between checkpoints: save where it stopped, unvalidated
                    last_checkpoint = checkpoint()
                return result("cancelled", None)
            if finished:
                break
        if loop.batch_in_epoch == len(batches):
            for cb in callbacks:
                cb.on_epoch_end(loop, metrics)
            loop.epoch, loop.batch_in_epoch = loop.epoch + 1, 0

    if not replicas.is_main:
        return result("succeeded", None)
    for cb in callbacks:
        cb.before_save(loop, "artifact")
    manifest = _manifest(spec, run, loop, metrics, hyperparameters, method_state)
    adapter_dir = save_artifact(model, spec.adapter_dir, base_model=spec.base_model, manifest=manifest)
    return result("succeeded", adapter_dir)
