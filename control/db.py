"""Engine and sessions. SQLite (embedded) gets WAL, foreign keys and a busy timeout so the API and a worker
process can share the file. Postgres gets `idle_in_transaction_session_timeout` (`Settings.idle_transaction_seconds`):
a process stopped in the middle of a transaction (SIGSTOP, a frozen VM) is disconnected by the server and its row
locks released, instead of holding up everyone who needs those rows until it is resumed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
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
    return create_engine(url, pool_pre_ping=True, pool_size=40, max_overflow=10, pool_timeout=10,
                         connect_args={"options": options})  # fmt: skip


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
