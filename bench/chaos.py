"""Chaos soak of the distributed topology on this machine: fine-tuning jobs submitted with the stock `openai`
client while workers are SIGKILLed and paused, the API is killed, Redis restarts empty and Postgres crashes.

    python bench/chaos.py --duration 900          # the recorded run (15 minutes of faults, then the drain)
    python bench/chaos.py --duration 150 --seed 3 # a short one while developing

What runs: a Postgres server and a Redis server (tests/services.py, on loopback), the API as a `uvicorn` process,
and `--workers` (2) `celery worker` processes (solo pool), all sharing one artifact root, with short leases (4 s,
heartbeat 0.5 s, reaper 1 s) so that every fault is recovered within the run. Jobs fine-tune MiniLM (the catalog
classifier) on small classification files, NEAT and LoRA in turn, a few variants (`--specs`); workers sleep
`--pace-ms` after every step (`NEAT_FAULT_POINT=pace:<ms>`, which kills nothing) so that a job trains for about
half a minute and faults land mid-training. `--concurrent` (3) jobs are kept unfinished until `--duration` is up:
each finished job is replaced by a new one. Each job uploads its own file; uploads and job creations carry an
Idempotency-Key and are retried by the client until they get an answer; job polls use the openai client's own
retries (2) and are counted. Meanwhile a slow client uploads `--upload-mb` (4) files at `--upload-rate` (1) MB/s
one after another (each deleted once stored), so that an API kill lands mid-upload: its partial temporary file is
the sweep's to remove, and the retry with the same Idempotency-Key must be stored.

Faults, one at a time, at seeded random gaps (`--fault-gap` on average), the kinds in shuffled rounds so that each
occurs: `worker_kill` (SIGKILL a worker, a busy one when there is one; a new one starts a second later),
`worker_pause` (SIGSTOP a busy worker past its lease, SIGCONT it once its job was taken back: a zombie),
`api_kill` (SIGKILL the API, a new one on the same port), `redis_restart` (a fresh Redis on the same port, without
persistence: every queued message is gone) and `postgres_restart` (`pg_ctl restart -m immediate`: a crash and WAL
recovery).

Measured, and printed as markdown at the end (goals marked; the exit status is 1 when one is missed):
- jobs submitted / succeeded / failed (error codes): goal, all succeed;
- each adapter against a quiet run of the same job row (in this process, `worker.runner.run_job` on a fresh
  SQLite database, as the fault tests do): byte-equal files, and goal max |difference| <= 1e-6;
- writes after lease loss: triggers installed on the soak's database record every insert into `job_events` and
  `checkpoints` and every update of `jobs`, with the writing connection's `application_name` (each worker process
  gets its own through PGAPPNAME) and the job row as that statement saw it. A worker's write counts as after lease
  loss when the row was not leased to that worker process, unless the same transaction moved it out of that
  worker's lease (its outcome) or is a reaper's (taking back another worker's job, resending a message). And a
  file in a lost attempt's folder modified after its hand-over (the audited update that took the lease away). Goal 0;
- leaked bytes: once every job has finished and temporary entries have aged past `NEAT_TEMP_MAX_AGE_SECONDS` (30)
  and the processes' sweepers (every 5 s) have run, whatever is left under `.tmp/`, and any `.<name>.<hex>.tmp`
  folder neat_core writes a checkpoint or an adapter into (`.step-*`, `.adapter.*`). Goal 0. (Each kill's line in
  the fault table says what was on disk right after it, so the count is not vacuous.) Lost attempts' folders are
  kept by design, a later attempt resumes from their recorded checkpoints: reported, not counted;
- faults by kind, `job_restarted` events, attempts per job;
- the API's answers: 5xx responses on the wire (503 while Postgres is away is by design: `Retry-After`), 5xx and
  connection failures left after the client's retries on polls; goal: no 500 at all;
- wall time.

Logs of every process and the run's own log (every fault with its time) are kept in the printed run directory.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from control.db import session_scope  # noqa: E402
from control.jobs import FINISHED, LEASED, AttemptOutcome, JobStatus  # noqa: E402
from control.orm import Checkpoint, Job, JobAttempt, JobEvent  # noqa: E402
from control.settings import Settings  # noqa: E402
from tests.conftest import MINILM, classification_rows  # noqa: E402
from tests.services import free_port, postgres, postgres_ctl, process, redis, restart_redis  # noqa: E402
from tests.worker.conftest import start_worker  # noqa: E402

KEY, ORG, QUEUE = "sk-chaos-soak", "org-chaos", "training"
LEASE = {"NEAT_LEASE_SECONDS": "4", "NEAT_HEARTBEAT_SECONDS": "0.5", "NEAT_REAPER_SECONDS": "1",
         "NEAT_RETRY_BACKOFF_SECONDS": "0.5", "NEAT_RETRY_BACKOFF_MAX_SECONDS": "4",
         "NEAT_REDELIVER_SECONDS": "15"}  # fmt: skip
TEMP = {"NEAT_TEMP_MAX_AGE_SECONDS": "30", "NEAT_SWEEP_SECONDS": "5", "NEAT_UPLOAD_IDLE_SECONDS": "20"}
KINDS = ("worker_kill", "worker_pause", "api_kill", "redis_restart", "postgres_restart")
NOT_WINNING = (AttemptOutcome.LOST, AttemptOutcome.RELEASED)  # attempts whose job went on elsewhere
TOLERANCE = 1e-6  # the fault tests' bound on an adapter's difference from its quiet run


# ---------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Spec:
    """One kind of job: the file's rows and what the job asks for."""

    name: str
    method: str
    r: int
    rows: int
    seed: int

    def data(self) -> bytes:
        return "".join(json.dumps(row) + "\n" for row in classification_rows(self.rows)).encode()


def make_specs(n: int) -> list[Spec]:
    """NEAT and LoRA in turn, 32 or 48 rows (16 or 24 steps of 4 over 2 epochs), r 4 or 8."""
    return [Spec(f"s{i}", ("neat", "lora")[i % 2], (4, 8)[i // 2 % 2], (32, 48)[i // 4 % 2], 100 + i) for i in range(n)]


@dataclass
class Submitted:
    spec: Spec
    job_id: str
    status: str = JobStatus.QUEUED
    error: dict | None = None


# ---------------------------------------------------------------------------------------------------- the log

START = time.monotonic()
_log_lock = threading.Lock()
_log_file: Path | None = None


def say(message: str) -> None:
    line = f"[{time.monotonic() - START:7.1f} s  {time.strftime('%H:%M:%S')}] {message}"
    with _log_lock:
        print(line, flush=True)
        if _log_file is not None:
            with open(_log_file, "a") as out:
                out.write(line + "\n")


# ---------------------------------------------------------------------------------------------------- services


class Cluster:
    """The processes under test and the faults done to them. Worker `slot`s keep their place across restarts; each
    process gets a fresh `application_name` (PGAPPNAME), which the audit maps back to its pid."""

    def __init__(self, stack: ExitStack, run: Path, args):
        self.stack, self.run, self.args = stack, run, args
        self.pg = stack.enter_context(postgres(run / "pg"))
        self.broker = stack.enter_context(redis(run / "redis"))
        self.data = run / "data"
        self.settings = Settings(data_dir=self.data, NEAT_DATABASE_URL=self.pg, NEAT_BROKER_URL=self.broker,
                                 queue=QUEUE, artifact_root=run / "artifacts")  # fmt: skip
        self.env = {**LEASE, **TEMP, "NEAT_ARTIFACT_ROOT": str(self.settings.resolved_artifact_root),
                    "NEAT_MAX_ATTEMPTS": str(args.max_attempts)}  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: dict[int, subprocess.Popen] = {}
        self.apps: dict[str, int] = {}  # application_name -> pid
        self._api: tuple | None = None
        self._generation = 0
        self.lock = threading.Lock()  # one fault at a time touches the processes; the final stop waits for it

    def app_name(self, role: str) -> str:
        self._generation += 1
        return f"chaos-{role}-{self._generation}"

    # --- API
    def start_api(self) -> None:
        name = self.app_name("api")
        env = {**os.environ, **self.env, "NEAT_DATA_DIR": str(self.data), "NEAT_DATABASE_URL": self.pg,
               "NEAT_BROKER_URL": self.broker, "NEAT_QUEUE": QUEUE, "NEAT_SERVING": "false", "PGAPPNAME": name,
               "NEAT_BOOTSTRAP_API_KEY": KEY, "NEAT_BOOTSTRAP_ORG": ORG, "PYTHONPATH": str(ROOT)}  # fmt: skip
        command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--http", "api.http:OpenAIErrorsHTTP", "--log-level", "warning"]  # fmt: skip
        context = process(command, env, self.run / f"{name}.log", cwd=ROOT)
        proc = context.__enter__()
        self._api, self.apps[name] = (context, proc), proc.pid
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not come up; see {self.run / f'{name}.log'}")

    def kill_api(self) -> None:
        context, proc = self._api
        _kill(proc)
        context.__exit__(None, None, None)

    # --- workers
    def start_worker(self, slot: int) -> None:
        name = self.app_name(f"worker{slot}")
        env = {**self.env, "PGAPPNAME": name, "NEAT_FAULT_POINT": f"pace:{self.args.pace_ms}"}
        proc = start_worker(self.settings, self.run / f"{name}.log", **env)
        self.workers[slot], self.apps[name] = proc, proc.pid

    def busy_slots(self) -> list[int]:
        """Slots whose worker holds a job's lease now (its owner name is host:pid:run)."""
        try:
            with session_scope(self.pg) as session:
                owners = session.scalars(select(Job.lease_owner).where(Job.status.in_(LEASED))).all()
        except Exception:  # noqa: BLE001  (the database is away: any worker will do)
            return []
        pids = {int(o.rsplit(":", 2)[1]) for o in owners if o}
        return [slot for slot, proc in self.workers.items() if proc.pid in pids]

    def stop_all(self) -> None:
        with self.lock:
            for proc in self.workers.values():
                _kill(proc)
            if self._api is not None:
                self.kill_api()
                self._api = None


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process's group (a stopped process dies too) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class Faults(threading.Thread):
    """Injects faults until `deadline`: seeded gaps and targets, the kinds in shuffled rounds."""

    def __init__(self, cluster: Cluster, deadline: float, args):
        super().__init__(name="faults", daemon=True)
        self.cluster, self.deadline, self.args = cluster, deadline, args
        self.rng = random.Random(args.seed)
        self.done: list[tuple[float, str, str]] = []  # (seconds since start, kind, what)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        kinds: list[str] = []
        wait = self.args.warmup
        try:
            while not self.stop.wait(wait) and time.monotonic() < self.deadline:
                if not kinds:
                    kinds = self.rng.sample(KINDS, len(KINDS))
                kind, at = kinds.pop(), time.monotonic() - START
                with self.cluster.lock:
                    what = getattr(self, kind)()
                self.done.append((at, kind, what))
                wait = self.args.fault_gap * self.rng.uniform(0.5, 1.5)
        except BaseException as e:  # reported by the main thread: a fault that cannot be undone ends the soak
            self.error = e
            say(f"fault injection failed: {type(e).__name__}: {e}")

    def _pick_worker(self) -> tuple[int, str]:
        busy = self.cluster.busy_slots()
        return self.rng.choice(sorted(busy or self.cluster.workers)), "training" if busy else "idle"

    def _temporary(self) -> str:
        """What is on disk right after a kill: the partial upload or half-written checkpoint the sweep must
        remove (and any other writer's live one)."""
        found = leftovers(self.cluster.settings.resolved_artifact_root)
        return f"{len(found)} temporary entries on disk after it ({sum(b for _, b in found):,} bytes)"

    def worker_kill(self) -> str:
        slot, state = self._pick_worker()
        proc = self.cluster.workers[slot]
        say(f"FAULT worker_kill: SIGKILL worker {slot} (pid {proc.pid}, {state})")
        _kill(proc)
        left = self._temporary()
        time.sleep(1)  # a supervisor's restart delay
        self.cluster.start_worker(slot)
        return f"worker {slot} ({state}); {left}"

    def worker_pause(self) -> str:
        slot, state = self._pick_worker()
        proc = self.cluster.workers[slot]
        # past the lease (4 s), the reaper's round (1 s) and its backoff: the job is taken back meanwhile
        seconds = self.rng.uniform(8, 14)
        say(f"FAULT worker_pause: SIGSTOP worker {slot} (pid {proc.pid}, {state}) for {seconds:.1f} s")
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            self.stop.wait(seconds)
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        say(f"       worker_pause: SIGCONT worker {slot}")
        return f"worker {slot} ({state}), {seconds:.1f} s"

    def api_kill(self) -> str:
        say("FAULT api_kill: SIGKILL the API")
        self.cluster.kill_api()
        left = self._temporary()
        time.sleep(1)
        self.cluster.start_api()
        say("       api_kill: a new API answers")
        return left

    def redis_restart(self) -> str:
        say("FAULT redis_restart: a fresh Redis on the same port, without persistence")
        restart_redis(self.cluster.broker)
        return "restarted empty"

    def postgres_restart(self) -> str:
        say("FAULT postgres_restart: pg_ctl restart -m immediate")
        began = time.monotonic()
        postgres_ctl(self.cluster.pg, "restart", mode="immediate")
        return f"back in {time.monotonic() - began:.1f} s"


# ---------------------------------------------------------------------------------------------------- the client


class Client:
    """The stock openai client, with every response's status counted on the wire."""

    def __init__(self, url: str):
        self.wire: Counter[str] = Counter()  # "<poll | the path> <status>" of 5xx responses
        self.polls = 0
        self.poll_failures: Counter[str] = Counter()  # what a poll raised after the client's own retries
        self.retries: Counter[str] = Counter()  # our retries of uploads and creations, by cause
        hooks = {"response": [self._count]}
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60,
                                    http_client=httpx.Client(event_hooks=hooks, timeout=60))  # fmt: skip
        # the background uploads' own: a throttled file cannot be read twice, so they are retried by us only
        self.bulk = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0,
                                  http_client=httpx.Client(event_hooks=hooks, timeout=60))  # fmt: skip

    def _count(self, response: httpx.Response) -> None:
        if response.status_code >= 500:
            kind = "poll" if response.request.method == "GET" else response.request.url.path
            self.wire[f"{kind} {response.status_code}"] += 1

    def until_answered(self, what: str, call, seconds: float = 300):
        """`call` again (same Idempotency-Key) while the API is down or answers 5xx / 409 in-flight."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return call()
            except (openai.APIConnectionError, openai.InternalServerError, openai.ConflictError) as e:
                cause = type(e).__name__ if not isinstance(e, openai.APIStatusError) else str(e.status_code)
                self.retries[cause] += 1
                if time.monotonic() > deadline:
                    raise
                say(f"{what}: {cause}; retrying")
                time.sleep(1)

    def submit(self, spec: Spec) -> str:
        file_key, job_key = f"chaos-{uuid.uuid4().hex}", f"chaos-{uuid.uuid4().hex}"
        uploaded = self.until_answered(f"upload for {spec.name}", lambda: self.openai.files.create(
            file=(f"{spec.name}.jsonl", spec.data()), purpose="fine-tune",
            extra_headers={"Idempotency-Key": file_key}))  # fmt: skip
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}
        job = self.until_answered(f"job for {spec.name}", lambda: self.openai.fine_tuning.jobs.create(
            model=MINILM, training_file=uploaded.id, seed=spec.seed, suffix=spec.name, method=method,
            extra_body={"adapter": {"type": spec.method, "r": spec.r}},
            extra_headers={"Idempotency-Key": job_key}))  # fmt: skip
        return job.id

    def poll(self, job: Submitted) -> None:
        self.polls += 1
        try:
            answer = self.openai.fine_tuning.jobs.retrieve(job.job_id)
        except openai.APIStatusError as e:
            self.poll_failures[f"{e.status_code} {getattr(e, 'code', None) or ''}".strip()] += 1
            return
        except openai.APIConnectionError as e:
            self.poll_failures[type(e).__name__] += 1
            return
        job.status, job.error = answer.status, answer.error.model_dump() if answer.error else None


class Throttled(io.BytesIO):
    """An upload's body, read at `rate` bytes/s (httpx reads a multipart file in 64 KiB chunks): a slow client,
    so that an API kill lands mid-upload."""

    def __init__(self, data: bytes, rate: float):
        super().__init__(data)
        self.rate = rate

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        time.sleep(len(chunk) / self.rate)
        return chunk


class Uploads(threading.Thread):
    """Uploads of `--upload-mb` at `--upload-rate` MB/s, one after another until stopped, each deleted once
    stored: an API killed mid-upload leaves a partial temporary file (the sweep's to remove), and the retry with the
    same Idempotency-Key must succeed."""

    def __init__(self, client: Client, args):
        super().__init__(name="uploads", daemon=True)
        self.client, self.rate = client, args.upload_rate * 1e6
        block = "".join(json.dumps(row) + "\n" for row in classification_rows(1000)).encode()
        self.data = block * max(1, round(args.upload_mb * 1e6 / len(block)))
        self.stored, self.stop = 0, threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        bulk = self.client.bulk
        try:
            while not self.stop.is_set():
                key = f"chaos-bulk-{uuid.uuid4().hex}"
                stored = self.client.until_answered("bulk upload", lambda k=key: bulk.files.create(
                    file=("bulk.jsonl", Throttled(self.data, self.rate)), purpose="fine-tune",
                    extra_headers={"Idempotency-Key": k}))  # fmt: skip
                if stored.bytes != len(self.data):
                    raise AssertionError(f"upload stored {stored.bytes} bytes of {len(self.data)}")
                self.stored += 1
                self.client.until_answered("bulk delete", lambda f=stored.id: _delete(bulk, f))
        except BaseException as e:  # reported with the results
            self.error = e
            say(f"background uploads failed: {type(e).__name__}: {e}")


def _delete(client: openai.OpenAI, file_id: str) -> None:
    try:
        client.files.delete(file_id)
    except openai.NotFoundError:  # deleted by an attempt whose answer the API's kill cut off
        pass


def drive(client: Client, specs: list[Spec], deadline: float, args, stop: list[threading.Event]) -> list[Submitted]:
    """Keep `args.concurrent` jobs unfinished until `deadline`, then (the `stop` events set) wait for all to
    finish, for `args.drain` seconds at most."""
    submitted: list[Submitted] = []
    next_spec = 0
    while True:
        unfinished = [j for j in submitted if j.status not in FINISHED]
        if time.monotonic() >= deadline:
            for event in stop:
                event.set()
        if time.monotonic() < deadline:
            while len(unfinished) < args.concurrent:
                spec = specs[next_spec % len(specs)]
                next_spec += 1
                job = Submitted(spec, client.submit(spec))
                say(f"submitted {job.job_id} ({spec.name}: {spec.method} r={spec.r}, {spec.rows} rows)")
                submitted.append(job)
                unfinished.append(job)
        elif not unfinished:
            return submitted
        elif time.monotonic() > deadline + args.drain:
            say(f"{len(unfinished)} jobs still unfinished {args.drain} s after the faults stopped")
            return submitted
        for job in unfinished:
            before = job.status
            client.poll(job)
            if job.status != before and job.status in FINISHED:
                say(f"{job.job_id} {job.status}" + (f": {job.error}" if job.error else ""))
        time.sleep(1)


# ---------------------------------------------------------------------------------------------------- the audit

AUDIT_SQL = """
CREATE TABLE chaos_writes (
    seq bigserial PRIMARY KEY, at double precision NOT NULL, txid bigint NOT NULL, app text NOT NULL,
    tbl text NOT NULL, job_id text NOT NULL, what text,
    old_status text, new_status text, old_owner text, new_owner text,  -- jobs updates
    cur_status text, cur_owner text                                    -- inserts: the job row as the statement saw it
);
CREATE FUNCTION chaos_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE what text;
BEGIN
    IF TG_TABLE_NAME = 'jobs' THEN
        INSERT INTO chaos_writes (at, txid, app, tbl, job_id, what, old_status, new_status, old_owner, new_owner)
        SELECT extract(epoch FROM clock_timestamp()), txid_current(), current_setting('application_name'), 'jobs',
               NEW.id, (SELECT string_agg(n.key, ',' ORDER BY n.key) FROM jsonb_each(to_jsonb(NEW)) n
                        WHERE to_jsonb(OLD) -> n.key IS DISTINCT FROM n.value),
               OLD.status, NEW.status, OLD.lease_owner, NEW.lease_owner;
    ELSE  -- NEW.message or NEW.storage_key: a record's field is looked up only where that statement runs
        IF TG_TABLE_NAME = 'job_events' THEN what := NEW.message; ELSE what := TG_OP || ' ' || NEW.storage_key; END IF;
        INSERT INTO chaos_writes (at, txid, app, tbl, job_id, what, cur_status, cur_owner)
        SELECT extract(epoch FROM clock_timestamp()), txid_current(), current_setting('application_name'),
               TG_TABLE_NAME, NEW.job_id, what, j.status, j.lease_owner
        FROM jobs j WHERE j.id = NEW.job_id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_jobs AFTER UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION chaos_audit();
CREATE TRIGGER chaos_events AFTER INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION chaos_audit();
CREATE TRIGGER chaos_checkpoints AFTER INSERT OR UPDATE ON checkpoints FOR EACH ROW EXECUTE FUNCTION chaos_audit();
"""


def install_audit(url: str) -> None:
    with session_scope(url) as session:
        session.execute(text(AUDIT_SQL))


def _pid(owner: str | None) -> int | None:
    return int(owner.rsplit(":", 2)[1]) if owner else None


def writes_after_lease_loss(url: str, apps: dict[str, int]) -> tuple[int, list[dict]]:
    """(worker writes audited, those made without the lease): see the module's docstring for the rule."""
    leased = {s.value for s in LEASED}
    with session_scope(url) as session:
        rows = [dict(r._mapping) for r in session.execute(text("SELECT * FROM chaos_writes ORDER BY seq"))]
    by_tx = defaultdict(list)
    for row in rows:
        by_tx[row["txid"]].append(row)
    audited, late = 0, []
    for tx in by_tx.values():
        pid = apps.get(tx[0]["app"])
        if pid is None or not tx[0]["app"].startswith("chaos-worker"):
            continue  # the API's, or this script's
        updates = [r for r in tx if r["tbl"] == "jobs"]
        reaper = any(r["old_status"] in leased and r["new_owner"] is None and _pid(r["old_owner"]) != pid
                     for r in updates) or any(r["what"] == "sent_at" for r in updates)  # fmt: skip
        if reaper:
            continue  # a reaper thread's transaction (in any worker): taking back someone else's job, a resend
        # this worker's leases the transaction ended (its outcome, a release): the rows after it are its own
        ending = {r["job_id"] for r in updates if _pid(r["old_owner"]) == pid and r["old_status"] in leased}
        for r in tx:
            audited += 1
            if r["tbl"] == "jobs":
                held = _pid(r["old_owner"]) == pid and r["old_status"] in leased
                claim = r["old_status"] == JobStatus.QUEUED and _pid(r["new_owner"]) == pid
                ok = held or claim
            else:
                ok = _pid(r["cur_owner"]) == pid and (r["cur_status"] in leased or r["job_id"] in ending)
            if not ok:
                late.append(r)
    return audited, late


def handovers(url: str) -> dict[tuple[str, int], float]:
    """(job, attempt) -> when the lease of a lost or released attempt was taken away (the audited update)."""
    leased = {s.value for s in LEASED}
    out = {}
    with session_scope(url) as session:
        attempts = session.scalars(select(JobAttempt).where(JobAttempt.outcome.in_(NOT_WINNING))).all()
        for a in attempts:
            at = session.scalar(text(
                "SELECT min(at) FROM chaos_writes WHERE tbl = 'jobs' AND job_id = :job AND old_owner = :owner "
                "AND old_status = ANY(:leased) AND new_owner IS DISTINCT FROM old_owner"
            ), {"job": a.job_id, "owner": a.worker, "leased": list(leased)})  # fmt: skip
            out[(a.job_id, a.attempt)] = at if at is not None else a.ended_at
    return out


def late_files(url: str, root: Path) -> list[str]:
    """Files in a lost attempt's folder modified after its hand-over."""
    found = []
    with session_scope(url) as session:
        orgs = dict(session.execute(select(Job.id, Job.organization_id)).all())
    for (job_id, attempt), at in handovers(url).items():
        folder = root / orgs[job_id] / "jobs" / job_id / f"attempt-{attempt}"
        for path in folder.rglob("*") if folder.is_dir() else []:
            if not path.is_file():  # a folder's time moves when a sweeper removes a temporary entry from it
                continue
            mtime = path.lstat().st_mtime
            if mtime > at:
                found.append(f"{path.relative_to(root)} ({mtime - at:+.3f} s after the hand-over)")
    return found


# ---------------------------------------------------------------------------------------------------- bytes


def leftovers(root: Path) -> list[tuple[str, int]]:
    """Temporary entries anywhere under the artifact root, with their bytes. (os.walk: it skips what vanishes
    under it, as temporary entries do while the service runs.)"""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            # neat_core's temporary folders are `.<final name>.<hex>.tmp` (.step-*, .adapter.*, .lora.*)
            if Path(folder) == root / ".tmp" or (name.startswith(".") and name.endswith(".tmp") and name != ".tmp"):
                found.append((str(path.relative_to(root)), _bytes(path)))
    return found


def _bytes(path: Path) -> int:
    files = [Path(d) / f for d, _, names in os.walk(path) for f in names] if path.is_dir() else [path]
    total = 0
    for file in files:
        try:
            total += file.lstat().st_size
        except OSError:  # removed meanwhile
            continue
    return total


def kept_attempts(url: str, root: Path) -> tuple[int, int]:
    """(folders, bytes) of attempts that did not finish their job: kept by design beside the winning one."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Job.organization_id, JobAttempt.job_id, JobAttempt.attempt)
            .join(Job, Job.id == JobAttempt.job_id)
            .where(JobAttempt.outcome.in_(NOT_WINNING))
        ).all()
    folders = [root / org / "jobs" / job / f"attempt-{n}" for org, job, n in rows]
    return sum(f.is_dir() for f in folders), sum(_bytes(f) for f in folders if f.is_dir())


# ---------------------------------------------------------------------------------------------------- adapters


def compare_adapters(pg: str, jobs: list[Submitted], root: Path, work: Path) -> dict[str, tuple[bool, float]]:
    """job id -> (byte-equal, max |difference|) of its adapter against a quiet run of its row (one per distinct
    spec), trained here with the worker's own `run_job` on a fresh SQLite database."""
    from safetensors.torch import load_file
    from transformers.utils import logging

    logging.set_verbosity_error()  # the base model's load report, once per quiet run
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from tests.worker.conftest import get_job, insert_job, make_settings
    from worker.runner import run_job

    quiet_settings = make_settings(work / "quiet")
    quiet_root = quiet_settings.resolved_artifact_root
    with session_scope(pg) as session:
        rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([s.job_id for s in jobs])))}
    quiet: dict[str, Path] = {}
    out = {}
    for job in jobs:
        row = rows[job.job_id]
        if row.status != JobStatus.SUCCEEDED:
            continue
        key = json.dumps([row.model, row.hyperparameters, row.adapter, row.seed, job.spec.rows], sort_keys=True)
        if key not in quiet:
            quiet_id = insert_job(quiet_settings, row.model, classification_rows(job.spec.rows), seed=row.seed,
                                  hyperparameters=row.hyperparameters, adapter=row.adapter)  # fmt: skip
            began = time.monotonic()
            status = run_job(quiet_id, quiet_settings)
            say(f"quiet run of {job.spec.name}: {status} in {time.monotonic() - began:.1f} s")
            quiet[key] = quiet_root / get_job(quiet_settings, quiet_id).artifact_key / "adapter_model.safetensors"
        ours = root / row.artifact_key / "adapter_model.safetensors"
        same_bytes = hashlib.sha256(ours.read_bytes()).digest() == hashlib.sha256(quiet[key].read_bytes()).digest()
        a, b = load_file(ours), load_file(quiet[key])
        diff = float("inf") if a.keys() != b.keys() else max((a[k] - b[k]).abs().max().item() for k in a)
        out[job.job_id] = (same_bytes, diff)
    return out


# ---------------------------------------------------------------------------------------------------- report


def listed(counts: Counter) -> str:
    return ", ".join(f"{key}: {n}" for key, n in sorted(counts.items(), key=str)) or "none"


def report(args, cluster: Cluster, faults: Faults, uploads: Uploads, client: Client, jobs: list[Submitted],
           work: Path, wall: float) -> bool:  # fmt: skip
    root = cluster.settings.resolved_artifact_root
    with session_scope(cluster.pg) as session:
        ids = [j.job_id for j in jobs]
        final = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids)))}
        events = session.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids))).all()
        checkpoints = session.scalar(select(func.count()).select_from(Checkpoint).where(Checkpoint.job_id.in_(ids)))
    restarted = sum((e.data or {}).get("type") == "job_restarted" for e in events)
    statuses = Counter(final[i].status for i in ids if final[i].status != JobStatus.SUCCEEDED)
    codes = Counter((final[i].error or {}).get("code") for i in ids if final[i].status == JobStatus.FAILED)
    succeeded = len(ids) - statuses.total()
    attempts = Counter(final[i].attempts for i in ids)

    say("comparing adapters with quiet runs")
    adapters = compare_adapters(cluster.pg, jobs, root, work)
    equal = sum(d <= TOLERANCE for _, d in adapters.values())
    byte_equal = sum(b for b, _ in adapters.values())
    worst = max((d for _, d in adapters.values()), default=0.0)

    audited, late_rows = writes_after_lease_loss(cluster.pg, cluster.apps)
    files = late_files(cluster.pg, root)
    leaked = leftovers(root)
    kept_folders, kept_bytes = kept_attempts(cluster.pg, root)
    by_kind = Counter(kind for _, kind, _ in faults.done)
    dropped = sum(log.read_text(errors="replace").count("leaving the job to its new worker")
                  for log in work.glob("chaos-worker*.log"))  # fmt: skip
    errors_500 = sum(n for key, n in client.wire.items() if key.endswith(" 500"))

    goals = {
        f"all {len(jobs)} jobs succeeded": succeeded == len(jobs) and len(jobs) > 0,
        f"every adapter equals its quiet run (≤ {TOLERANCE:g})": equal == len(jobs),
        "0 writes after lease loss": not late_rows and not files,
        "0 leaked bytes": not leaked,
        "no 500 from the API": errors_500 == 0,
        "every background upload stored (retried with its Idempotency-Key)": uploads.error is None,
        "every fault kind injected": set(by_kind) == set(KINDS),
    }
    lines = [
        f"## Chaos soak: {args.duration:g} s of faults, seed {args.seed}, {args.workers} workers, "
        f"{os.cpu_count()} CPUs",
        "",
        "| | |",
        "|---|---|",
        f"| jobs submitted | {len(jobs)} ({args.concurrent} at a time; {len(make_specs(args.specs))} specs, "
        f"NEAT and LoRA on MiniLM, paced {args.pace_ms} ms/step) |",
        f"| succeeded | {succeeded} |",
        f"| not succeeded | {len(jobs) - succeeded} ({listed(statuses)}; error codes: {listed(codes)}) |",
        f"| adapters equal to their quiet run | {equal} of {len(jobs)} ({byte_equal} byte-equal; max abs "
        f"difference {worst:.2e}) |",
        f"| faults injected | {len(faults.done)}: " + ", ".join(f"{k} {by_kind[k]}" for k in KINDS) + " |",
        f"| `job_restarted` events | {restarted} |",
        f"| zombies that woke up, found their lease gone and dropped the job | {dropped} |",
        f"| jobs by attempts taken | {listed(attempts)} |",
        f"| writes after lease loss | {len(late_rows)} rows (of {audited:,} audited worker writes), {len(files)} "
        f"files |",
        f"| leaked bytes after the sweep | {sum(b for _, b in leaked):,} ({len(leaked)} entries) |",
        f"| lost attempts' folders (kept by design) | {kept_folders}, {kept_bytes:,} bytes; {checkpoints} "
        f"checkpoint rows |",
        f"| API 5xx on the wire | {listed(client.wire)} |",
        f"| job polls | {client.polls:,}; failed after the client's retries: {listed(client.poll_failures)} |",
        f"| background uploads stored | {uploads.stored} of {args.upload_mb:g} MB at {args.upload_rate:g} MB/s |",
        f"| uploads/creations/deletes retried by the client | {listed(client.retries)} |",
        f"| wall time | {wall:.0f} s (faults {args.duration:g} s, the drain, the sweepers' wait; not the quiet runs) |",
        "",
        "Goals: " + "; ".join(f"{'✓' if ok else '✗'} {name}" for name, ok in goals.items()),
        "",
        "| at (s) | fault | target |",
        "|---|---|---|",
        *[f"| {at:.1f} | {kind} | {what} |" for at, kind, what in faults.done],
    ]
    for name, items in (("writes after lease loss", [str(r) for r in late_rows] + files),
                        ("leaked", [f"{p} ({b} bytes)" for p, b in leaked])):  # fmt: skip
        if items:
            lines += ["", f"{name}:", *[f"- {item}" for item in items[:20]]]
    print("\n".join(lines), flush=True)
    (work / "report.md").write_text("\n".join(lines) + "\n")
    return all(goals.values())


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    global _log_file
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=900, help="seconds of faults (jobs keep coming meanwhile)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the faults' kinds, gaps and targets")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=3, help="jobs kept unfinished while the faults go on")
    parser.add_argument("--specs", type=int, default=6, help="distinct job specs (each gets one quiet run)")
    parser.add_argument("--fault-gap", type=float, default=20, help="mean seconds between faults")
    parser.add_argument("--warmup", type=float, default=15, help="seconds before the first fault")
    parser.add_argument("--pace-ms", type=int, default=1000, help="workers sleep this long after every step")
    parser.add_argument("--max-attempts", type=int, default=3, help="NEAT_MAX_ATTEMPTS (losses in a row at a point)")
    parser.add_argument("--upload-mb", type=float, default=4, help="background uploads' size (0: none)")
    parser.add_argument("--upload-rate", type=float, default=1, help="background uploads' speed, MB/s")
    parser.add_argument("--drain", type=float, default=600, help="seconds to wait for the last jobs after the faults")
    parser.add_argument("--out", type=Path, help="run directory (default: a new temporary one)")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="neat-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    _log_file = work / "chaos.log"
    say(f"run directory {work} ({socket.gethostname()}, {os.cpu_count()} CPUs)")
    os.environ["PGAPPNAME"] = "chaos-driver"  # this process's own connections: not audited as a worker's
    began = time.monotonic()
    with ExitStack() as stack:
        cluster = Cluster(stack, work, args)
        from control.migrate import upgrade

        upgrade(cluster.pg)
        install_audit(cluster.pg)
        stack.callback(cluster.stop_all)
        cluster.start_api()
        for slot in range(args.workers):
            cluster.start_worker(slot)
        say(f"API {cluster.url}, Postgres {cluster.pg}, Redis {cluster.broker}, {args.workers} workers")

        client = Client(cluster.url)
        deadline = time.monotonic() + args.duration
        faults = Faults(cluster, deadline, args)
        uploads = Uploads(client, args)
        faults.start()
        if args.upload_mb > 0:
            uploads.start()
        try:
            jobs = drive(client, make_specs(args.specs), deadline, args, stop=[faults.stop, uploads.stop])
        finally:
            faults.stop.set()
            uploads.stop.set()
            faults.join()
            if uploads.is_alive():
                uploads.join()
        if faults.error is not None:
            raise faults.error
        # Temporary bytes a killed process left age past NEAT_TEMP_MAX_AGE_SECONDS; the sweepers then take them.
        settle = float(TEMP["NEAT_TEMP_MAX_AGE_SECONDS"]) + 3 * float(TEMP["NEAT_SWEEP_SECONDS"])
        say(f"all jobs finished; waiting {settle:g} s for the sweepers")
        time.sleep(settle)
        wall = time.monotonic() - began
        cluster.stop_all()
        ok = report(args, cluster, faults, uploads, client, jobs, work, wall)
    say(f"logs and report in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
