"""The remote backend's routing and its answer when no inference server is reachable (real sockets, nothing
listening)."""

from __future__ import annotations

import socket

import anyio
import pytest

from api.remote import RemoteBackend, rank
from control.backends import BackendError, Target
from control.protocol import ChatRequest

SERVERS = [f"http://10.0.0.{i}:8001" for i in range(1, 6)]


def test_rendezvous_ranking_is_stable_and_spreads_base_models():
    bases = [f"base-{i}" for i in range(200)]
    homes = {b: rank(SERVERS, b)[0] for b in bases}
    assert all(rank(list(reversed(SERVERS)), b)[0] == homes[b] for b in bases)  # order of the list is irrelevant
    assert set(homes.values()) == set(SERVERS)  # every server is someone's home
    # Removing a server moves only the base models whose home it was, each to its second choice.
    gone = SERVERS[0]
    rest = [s for s in SERVERS if s != gone]
    for b in bases:
        new_home = rank(rest, b)[0]
        assert new_home == (homes[b] if homes[b] != gone else rank(SERVERS, b)[1])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused


def test_no_reachable_server_answers_503_with_retry_after():
    servers = [f"http://127.0.0.1:{_closed_port()}" for _ in range(2)]
    request = ChatRequest(model="ft:m", messages=[{"role": "user", "content": "hi"}])
    target = Target("ft:m", "causal_lm", "base", "/artifacts/x/adapter", owner="org-a")

    async def call() -> None:
        backend = RemoteBackend(servers, "token", connect_timeout_s=1)
        try:
            await backend.complete(target, request)
        finally:
            await backend.close()

    with pytest.raises(BackendError) as caught:
        anyio.run(call)
    assert caught.value.status == 503 and caught.value.code == "serving_unavailable" and caught.value.retry_after
