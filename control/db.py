"""Engine and sessions. SQLite (embedded) gets WAL, foreign keys and a busy timeout so the API and a worker
process can share the file. Postgres gets `idle_in_transaction_session_timeout` (`Settings.idle_transaction_seconds`):
a process stopped in the middle of a transaction (SIGSTOP, a frozen VM) is disconnected by the server and its row
locks released, instead of holding up everyone who needs those rows until it is resumed."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from control.settings import get_settings


def make_engine(url: str, *, idle_transaction_seconds: float | None = None) -> Engine:
    """An engine for `url`; on Postgres, sessions idle in a transaction for `idle_transaction_seconds` (default: the
    settings') are ended by the server (0: never)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # Sync routes run in anyio's thread pool (40 threads): the pool keeps a connection for each, so that a burst of
    # requests waits on the database rather than on opening connections (Postgres forks a process per connection).
    if idle_transaction_seconds is None:
        idle_transaction_seconds = get_settings().idle_transaction_seconds
    # Set at connection start (libpq `options`), so every connection of the pool has it from its first statement.
    # A connection the server ended this way fails its next statement with an OperationalError: `with_retries`
    # runs the work again on a fresh one, and `pool_pre_ping` keeps such connections from being handed out.
    options = f"-c idle_in_transaction_session_timeout={round(idle_transaction_seconds * 1000)}"
    engine = create_engine(url, pool_pre_ping=True, pool_size=40, max_overflow=10, pool_timeout=10,
                           connect_args={"options": options})  # fmt: skip

    @event.listens_for(engine, "engine_disposed")
    def _close_async_reads(_engine) -> None:  # its connections go with the engine's own (tests drop the database)
        reads = _ASYNC_READS.pop(url, None)
        if reads is not None:
            reads.close()

    return engine


@lru_cache(maxsize=8)
def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """One engine (connection pool) per database URL per process."""
    return sessionmaker(make_engine(url or get_settings().resolved_database_url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for the worker and scripts)."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


T = TypeVar("T")
log = logging.getLogger(__name__)


def with_retries(url: str, work: Callable[[Session], T], *, seconds: float = 300.0) -> T:
    """Run `work(session)` in one transaction, running it again while the database is unreachable (a restart, a
    fail-over), for up to `seconds`. For the worker, whose writes must outlive a database blip: a training step's
    events are kept, not lost, and an outcome is recorded once the database is back. `work` must be safe to run
    again after a rollback (every write of the worker is a conditional update or an insert of a new row)."""
    deadline, delay = time.monotonic() + seconds, 0.2
    while True:
        try:
            with session_scope(url) as session:
                return work(session)
        except (OperationalError, DBAPIError) as e:
            if not _disconnected(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1f s", type(e.orig).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _disconnected(e: DBAPIError) -> bool:
    return isinstance(e, OperationalError) or bool(e.connection_invalidated)


# ---------------------------------------------------------------------------------------------- reads on the loop


class Read:
    """A read-only Core `select` the API runs on its event loop (`fetch`), its varying values as named
    `bindparam`s. Built once, at import: on Postgres it is compiled once, and psycopg prepares it server-side on
    each connection after a few runs. Label every column with the name its reader uses (`row.<name>`)."""

    def __init__(self, statement: Select):
        self.statement = statement
        self._sql: dict[str, str] = {}  # dialect name -> SQL

    def sql(self, engine: Engine) -> str:
        sql = self._sql.get(engine.dialect.name)
        if sql is None:
            sql = self._sql[engine.dialect.name] = str(self.statement.compile(dialect=engine.dialect))
        return sql


async def fetch(url: str, read: Read, **params: Any) -> Sequence[Any]:
    """The rows of `read` with `params`, each with its columns as attributes.

    Postgres: on the running event loop, over psycopg's async connections (`AsyncReads`): no thread, no ORM. A
    sync route costs a trip through the thread pool and back, and under a burst of requests those threads contend
    for the interpreter with the event loop; the hot polling reads (a job, its events) are cheaper here. SQLite
    (the embedded default) has no async driver in this project, so there it runs on the engine in a thread."""
    engine = session_factory(url).kw["bind"]
    if engine.dialect.name != "postgresql":
        return await asyncio.to_thread(_fetch_sync, engine, read, params)
    reads = _ASYNC_READS.get(url)
    if reads is None:
        reads = _ASYNC_READS.setdefault(url, AsyncReads(engine))
    return await reads.fetch(read.sql(engine), params)


def _fetch_sync(engine: Engine, read: Read, params: dict[str, Any]) -> Sequence[Any]:
    with engine.connect() as connection:
        return connection.execute(read.statement, params).all()


class AsyncReads:
    """A small pool of psycopg async connections for one database, in autocommit (a read holds no transaction
    open), made with the engine's own connection arguments (its JSON loaders included, so values decode as the
    ORM's do).

    The connections are shared by every event loop of the process (psycopg finds the running loop each time it
    waits; a TestClient runs a new loop per request); how many are used at once is bounded per loop, by
    `size`. A request that waits `timeout` seconds for one gets the engine's pool timeout (503, retry shortly);
    an unreachable database, its OperationalError (503, database unavailable)."""

    def __init__(self, engine: Engine, size: int = 16, timeout: float = 10.0):
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        # (without the engine's idle_in_transaction_session_timeout: in autocommit, a read never idles in one)
        self._connect_args = cargs, cparams
        self._size, self._timeout = size, timeout
        self._idle: list[Any] = []  # psycopg.AsyncConnection
        self._lock = threading.Lock()  # loops in several threads (tests) share the idle list
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[Any]:
        import psycopg

        slots = self._slots_here()
        try:
            async with asyncio.timeout(self._timeout):  # (not wait_for: a task for every wait)
                await slots.acquire()
        except TimeoutError:
            raise PoolTimeout(f"no connection free for reads within {self._timeout:g} s") from None
        try:
            for attempt in (0, 1):
                connection = self._take() if attempt == 0 else None
                fresh = connection is None
                try:
                    if connection is None:
                        connection = await self._connect()
                    cursor = await connection.execute(sql, params)
                    rows = await cursor.fetchall()
                except psycopg.OperationalError as e:
                    if connection is not None:
                        await connection.close()
                    # a pooled connection the server ended (a restart): once more on a fresh one, as pre-ping would
                    if fresh:
                        raise OperationalError(sql, params, e) from e
                    continue
                except psycopg.Error as e:  # (a value Postgres refuses: a NUL in a string) as the engine wraps it
                    await connection.close()
                    raise DBAPIError(sql, params, e) from e
                except BaseException:
                    if connection is not None:  # cancelled or failed mid-query: its state is unknown
                        await connection.close()
                    raise
                self._give_back(connection)
                return rows
            raise AssertionError("unreachable")
        finally:
            slots.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.pgconn.finish()  # no await: called from the engine's dispose, a sync call

    def _slots_here(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            slots = self._slots.get(loop)
            if slots is None:
                slots = self._slots[loop] = asyncio.Semaphore(self._size)
            return slots

    def _take(self) -> Any:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(connection)
                return
        connection.pgconn.finish()

    async def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import namedtuple_row

        cargs, cparams = self._connect_args
        return await psycopg.AsyncConnection.connect(*cargs, **cparams, autocommit=True, row_factory=namedtuple_row)


_ASYNC_READS: dict[str, AsyncReads] = {}
