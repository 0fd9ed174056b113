"""control.db.AsyncReads, the connections the API's hot reads use on Postgres: what a request waiting for one
gets when none frees up (the API answers it 503 `service_overloaded`, as for the engine's own pool)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import TimeoutError as PoolTimeout

from control.db import AsyncReads


def test_a_read_that_waits_out_the_timeout_for_a_connection_gets_the_pool_timeout():
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never connected to
    reads = AsyncReads(engine, size=1, timeout=0.05)

    async def while_busy() -> None:
        await reads._slots_here().acquire()  # the one connection is in use
        await reads.fetch("SELECT 1", {})

    with pytest.raises(PoolTimeout):
        asyncio.run(while_busy())
