"""Real, throw-away Postgres and Redis servers for tests: started on loopback on a free port, waited for until they
accept connections, and stopped (killed if need be) and deleted on exit.

    with postgres(tmp_path) as url:            # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        test_url = create_database(url, "t1")  # same server, a fresh database
    with redis(tmp_path) as url:               # redis://127.0.0.1:PORT/0
        ...

Each server writes its log to `tmpdir` (`postgres.log`, `redis.log`); a server that fails to start raises
`ServiceError` with the log's tail. The data directories live in short-named temporary directories (a Unix socket
path must stay under ~100 bytes; in /dev/shm when it is roomy, or $NEAT_TEST_TMP) and, when running as root, belong
to the `postgres` user (initdb refuses root). $PG_BIN and $REDIS_SERVER override where the binaries are found.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 30
PORT_ATTEMPTS = 5  # a free port can be taken by someone else between choosing it and binding it


class ServiceError(RuntimeError):
    """A throw-away server could not be started."""


# ---------------------------------------------------------------------------------------------------- discovery


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: $PG_BIN, else PATH, else the newest /usr/lib/postgresql/*."""
    candidates = [os.environ.get("PG_BIN"), os.path.dirname(shutil.which("pg_ctl") or "")]
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for directory in [*candidates, *versions]:
        if directory and all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def _run_as() -> str | None:
    """The user to run Postgres as: None (ourselves) unless we are root, which Postgres refuses."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return ""  # root without a postgres user: cannot run it
    return "postgres"


def postgres_available() -> bool:
    return postgres_bin_dir() is not None and _run_as() != ""


def postgres_unavailable_reason() -> str:
    if postgres_bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in $PG_BIN, on PATH or in "
            "/usr/lib/postgresql/*/bin"
        )
    return "running as root and there is no 'postgres' user to run the server as"


def redis_server_bin() -> str | None:
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


def redis_available() -> bool:
    return redis_server_bin() is not None


# ---------------------------------------------------------------------------------------------------- helpers


@contextmanager
def process(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A service process in its own session (its children go with it), output to `log`; stopped on exit with
    SIGTERM, then SIGKILL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, log: Path, timeout: float = 120, path: str = "/healthz") -> None:
    """Wait for a service started by `process` to answer 200 at `path`; fail with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"service did not come up:\n{log.read_text(errors='replace')[-4000:]}")


def _scratch_root() -> str | None:
    """Where server data directories go: $NEAT_TEST_TMP, else /dev/shm when it is a roomy tmpfs (creating and
    deleting a few hundred databases' files is much faster in memory), else the system's temporary directory."""
    if os.environ.get("NEAT_TEST_TMP"):
        return os.environ["NEAT_TEST_TMP"]
    try:
        stat = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and stat.f_bavail * stat.f_frsize > 2 << 30:  # Docker's default is 64 MiB
            return "/dev/shm"
    except OSError:
        pass
    return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _keep_log(log: Path, tmpdir: Path, name: str) -> None:
    try:
        Path(tmpdir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, Path(tmpdir) / name)
    except OSError:
        pass


def _env() -> dict[str, str]:
    """Our environment minus libpq variables that would redirect pg_ctl, in a locale every machine has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


# ---------------------------------------------------------------------------------------------------- postgres


def _pg(args: list[str], user: str | None, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    kwargs = {"user": user, "group": user, "extra_groups": []} if user else {}
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _wait_for_postgres(url: str, deadline: float) -> None:
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop_postgres(bin_dir: Path, data: Path, user: str | None, base: Path) -> None:
    try:
        _pg([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "10", "stop"], user, base, 20)
    except (subprocess.SubprocessError, OSError):
        pass
    pid_file = data / "postmaster.pid"  # still there: pg_ctl could not stop it, so kill it
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@contextmanager
def postgres(tmpdir: str | os.PathLike) -> Iterator[str]:
    """A fresh Postgres cluster (trust auth, fsync off) on 127.0.0.1; yields a SQLAlchemy URL of its `postgres`
    database, as the `postgres` superuser. Its log ends up in `tmpdir/postgres.log`."""
    bin_dir, user = postgres_bin_dir(), _run_as()
    if bin_dir is None or user == "":
        raise ServiceError(postgres_unavailable_reason())
    base = Path(tempfile.mkdtemp(prefix="neat-pg-", dir=_scratch_root()))
    data, log = base / "data", base / "postgres.log"
    if user:
        shutil.chown(base, user, user)
    started = False
    try:
        init = _pg([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                    "--locale=C", "--no-sync"], user, base)  # fmt: skip
        if init.returncode != 0:
            raise ServiceError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        for _attempt in range(PORT_ATTEMPTS):
            port = free_port()
            options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                       "-c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB")  # fmt: skip
            start = _pg([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
                         "-t", str(START_TIMEOUT_S), "start"], user, base, START_TIMEOUT_S + 10)  # fmt: skip
            started = start.returncode == 0
            if started:
                break
            _stop_postgres(bin_dir, data, user, base)
            if "already in use" not in _tail(log):
                break
        if not started:
            raise ServiceError(f"Postgres did not start:\n{start.stdout}\n{start.stderr}\nlog:\n{_tail(log)}")
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        _CLUSTERS[port] = (bin_dir, data, user, base, log, options)
        try:
            _wait_for_postgres(url, time.monotonic() + START_TIMEOUT_S)
        except Exception as e:
            raise ServiceError(f"Postgres started but refuses connections: {e}\nlog:\n{_tail(log)}") from e
        yield url
    finally:
        if data.exists():
            _stop_postgres(bin_dir, data, user, base)
        _keep_log(log, Path(tmpdir), "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


_CLUSTERS: dict[int, tuple] = {}  # port -> (bin dir, data dir, user, base dir, log, server options)


def postgres_ctl(url: str, action: str, mode: str | None = None) -> None:
    """`pg_ctl stop` / `start` / `restart` the cluster behind `url` (one that `postgres()` started): the outage
    tests take the database away under running services. `mode` is pg_ctl's shutdown mode for stop and restart
    (`fast` unless given; `immediate` is a crash: no checkpoint, recovery from the WAL at the next start)."""
    from sqlalchemy.engine import make_url

    bin_dir, data, user, base, log, options = _CLUSTERS[make_url(url).port]
    command = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S)]
    command += ["-m", mode or "fast"] if action in ("stop", "restart") else []
    command += [] if action == "stop" else ["-o", options]
    done = _pg([*command, action], user, base, START_TIMEOUT_S + 10)
    if done.returncode != 0:
        raise ServiceError(f"pg_ctl {action} failed:\n{done.stdout}\n{done.stderr}\nlog:\n{_tail(log)}")


def _admin(url: str, statement: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_database(url: str, name: str, template: str | None = None) -> str:
    """Create database `name` on the server of `url` (optionally as a copy of `template`, which nobody may be
    connected to); returns its URL."""
    from sqlalchemy.engine import make_url

    statement = f"CREATE DATABASE {_quote(name)}"
    if template:
        statement += f" TEMPLATE {_quote(template)}"
    _admin(url, statement)
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, name: str) -> None:
    """Drop database `name` on the server of `url`, disconnecting anyone still connected to it."""
    _admin(url, f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------------- redis


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis(tmpdir: str | os.PathLike) -> Iterator[str]:
    """A fresh Redis (no persistence) on 127.0.0.1; yields `redis://127.0.0.1:PORT/0`. Its log ends up in
    `tmpdir/redis.log`."""
    binary = redis_server_bin()
    if binary is None:
        raise ServiceError("redis-server not found on PATH or in $REDIS_SERVER")
    base = Path(tempfile.mkdtemp(prefix="neat-redis-", dir=_scratch_root()))
    log = base / "redis.log"
    process: subprocess.Popen | None = None
    try:

        def start(port: int) -> subprocess.Popen:
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no", "--save", "",
                     "--appendonly", "no", "--dir", str(base)],  # fmt: skip
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base,
                    start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops us in order
                )  # fmt: skip
            deadline = time.monotonic() + START_TIMEOUT_S
            while process.poll() is None and not _redis_ping(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            return process

        for _attempt in range(PORT_ATTEMPTS):
            port = free_port()
            process = start(port)
            if process.poll() is None and _redis_ping(port):
                break
            _stop_process(process)
            process = None
            if "in use" not in _tail(log):
                break
        if process is None:
            raise ServiceError(f"Redis did not start; log:\n{_tail(log)}")
        url = f"redis://127.0.0.1:{port}/0"
        _REDIS[url] = holder = {"process": process, "start": start}
        yield url
        process = holder["process"]
    finally:
        if process is not None:
            _stop_process(process)
        _keep_log(log, Path(tmpdir), "redis.log")
        shutil.rmtree(base, ignore_errors=True)


_REDIS: dict[str, dict] = {}


def restart_redis(url: str) -> None:
    """Stop the Redis behind `url` (one that `redis()` started) and start a fresh one on the same port: without
    persistence, so everything it held is gone, as after a crash."""
    holder = _REDIS[url]
    _stop_process(holder["process"])
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    holder["process"] = holder["start"](port)
    if holder["process"].poll() is not None or not _redis_ping(port):
        raise ServiceError(f"Redis did not come back on port {port}")


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
