"""A process stopped (SIGSTOP) in the middle of a transaction on Postgres: the server ends its session after
`idle_in_transaction_session_timeout` (control.db, `Settings.idle_transaction_seconds`, by default the lease), so
the row lock it held goes with it and the reaper takes the job back, instead of waiting for as long as the process
stays stopped. Resumed, the process finds its connection gone and its write rolled back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from control import jobs
from control.db import session_scope
from control.jobs import JobStatus, Lease
from control.orm import Job
from tests.faults.test_leases import attempts, new_job, row, run
from worker.lease import REAPER_LOCK_WAIT, reap

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 2.0  # the stopped process's lease, and so (by default) its idle-in-transaction timeout

# A worker's write, stopped before its commit: a fenced UPDATE of the job row (locked until the transaction ends).
STOPPED_WRITER = """
import sys, time
from control import jobs
from control.db import session_factory
session = session_factory()()
assert jobs.record_progress(session, jobs.Lease(sys.argv[1], "stopped", 1), trained_tokens=7)
print("locked", flush=True)
time.sleep(3)  # SIGSTOPped here; resumed, it goes on to its commit
try:
    session.commit()
except Exception as e:
    print("terminated:", type(e).__name__, e, flush=True)
    sys.exit(3)
print("committed", flush=True)
"""


def test_a_stopped_transaction_is_ended_by_postgres_and_its_lock_released(settings):
    url = settings.resolved_database_url
    job_id = new_job(settings)
    assert run(settings, jobs.claim, job_id, "stopped", LEASE_S) == 1
    env = {**os.environ, "NEAT_DATABASE_URL": url, "NEAT_LEASE_SECONDS": str(LEASE_S),
           "NEAT_DATA_DIR": str(settings.data_dir)}  # fmt: skip
    writer = subprocess.Popen([sys.executable, "-c", STOPPED_WRITER, job_id], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "locked"
        os.kill(writer.pid, signal.SIGSTOP)
        stopped = time.monotonic()

        # The reaper waits REAPER_LOCK_WAIT for a row lock, then skips the job until its next round: without the
        # timeout the stopped writer's lock would outlast every round, and the job would stay running.
        reaper = settings.model_copy(update={"lease_seconds": LEASE_S})
        bound = LEASE_S + LEASE_S + int(REAPER_LOCK_WAIT.removesuffix("s")) + 5  # lease out, session ended, slack
        while row(settings, job_id).status == JobStatus.RUNNING:
            assert time.monotonic() - stopped < bound, "the stopped transaction still holds the job row"
            reap(reaper)
            time.sleep(0.2)
        released = time.monotonic() - stopped
        assert row(settings, job_id).status == JobStatus.QUEUED
        assert [a.outcome for a in attempts(settings, job_id)] == ["lost"]
        # Lost at the lease's end plus the idle timeout at most (and the reaper's round), not when it resumes.
        assert released < bound

        os.kill(writer.pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 3 and "terminated" in out, out
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGCONT)
            writer.kill()
            writer.wait()
    with session_scope(url) as session:  # its write never landed
        assert session.scalar(select(Job.trained_tokens).where(Job.id == job_id)) is None
    assert not run(settings, jobs.record_progress, Lease(job_id, "stopped", 1), trained_tokens=7)
