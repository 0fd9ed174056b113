"""Attempt folders: each claim of a job trains in a folder of its own, `<org>/jobs/<job>/attempt-<n>/` (its
checkpoints/ and adapter/; worker.trainspec), so that a worker that lost its lease cannot write into its
successor's. Once the job is final, the folders of the attempts that lost are removed here.

What a final job keeps: the attempt whose adapter it publishes (`artifact_key`, succeeded), and the attempt holding
its newest recorded checkpoint (the one listed as its last checkpoint, and "kept" by a cancelled job; often the same
attempt). Every other attempt folder goes, and the checkpoint rows that pointed into it are marked pruned.

`prune` runs in the sweeper (control.sweeper: every API and worker process, at start and every `sweep_seconds`),
for jobs final for at least `grace` seconds. It cannot race a zombie, a worker still running an attempt that lost
its lease: such a worker writes no row (every write is fenced on its lease), and it renews its lease before every
checkpoint and adapter write, so it stops there. Only a write it was already inside when it was paused finishes,
into its own attempt's folder, which no row names: if that lands after its folder was removed, the next sweep
removes it again. The grace lets a worker that is merely slow notice its lease is gone before its folder goes.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from control.jobs import FINISHED
from control.orm import Checkpoint, Job
from control.storage import Storage, job_key

log = logging.getLogger(__name__)
_ATTEMPT = re.compile(r"/attempt-(\d+)(/|$)")
_CHUNK = 500  # job ids per query


def attempt_key(org_id: str, job_id: str, attempt: int) -> str:
    """An attempt's working directory: its checkpoints/ and adapter/."""
    return f"{job_key(org_id, job_id)}/attempt-{attempt}"


def kept_attempts(session: Session, job: Job) -> set[int]:
    """The attempts whose folders a final job keeps: its adapter's, and its newest recorded checkpoint's."""
    newest = session.scalars(
        select(Checkpoint.storage_key)
        .where(Checkpoint.job_id == job.id, Checkpoint.pruned.is_(False))
        .order_by(Checkpoint.step_number.desc(), Checkpoint.seq.desc())
        .limit(1)
    ).first()
    return {int(m.group(1)) for key in (job.artifact_key, newest) if key and (m := _ATTEMPT.search(key))}


def prune(session: Session, storage: Storage, *, grace: float) -> list[Path]:
    """Remove the attempt folders final jobs do not keep (only jobs with more than one attempt folder on disk, and
    final for at least `grace` seconds). Returns the folders removed. Commits its row updates itself, before the
    folders go, so that no row ever points at a removed folder."""
    folders: dict[str, list[Path]] = defaultdict(list)  # job id -> its attempt folders
    for folder in storage.root.glob("*/jobs/*/attempt-*"):
        if folder.is_dir() and _ATTEMPT.search(f"/{folder.name}"):
            folders[folder.parent.name].append(folder)
    candidates = sorted(job_id for job_id, found in folders.items() if len(found) > 1)
    finished_before = time.time() - grace
    removed = []
    for start in range(0, len(candidates), _CHUNK):
        chunk = candidates[start : start + _CHUNK]
        final = select(Job).where(Job.id.in_(chunk), Job.status.in_(FINISHED), Job.finished_at <= finished_before)
        doomed = [f for job in session.scalars(final).all() for f in _unkept(session, storage, job, folders[job.id])]
        session.commit()
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)  # another sweeper may be removing it too
            removed.append(folder)
    if removed:
        log.info("removed %d attempt folders of finished jobs under %s", len(removed), storage.root)
    return removed


def _unkept(session: Session, storage: Storage, job: Job, folders: list[Path]) -> list[Path]:
    """The folders of `job`'s attempts it does not keep, their checkpoint rows marked pruned (not committed)."""
    kept = kept_attempts(session, job)
    doomed = []
    for folder in folders:
        if folder.parent.parent.parent.name != job.organization_id:  # not laid out by us: leave it alone
            continue
        if int(folder.name.removeprefix("attempt-")) in kept:
            continue
        inside = Checkpoint.storage_key.startswith(f"{storage.key(folder)}/", autoescape=True)
        session.execute(update(Checkpoint).where(Checkpoint.job_id == job.id, inside).values(pruned=True))
        doomed.append(folder)
    return doomed
