"""Naming a process so that another process can tell whether it still runs: who writes a temporary upload
(control.storage) and who holds an in-flight Idempotency-Key (api.idempotency).

A token is `host.pid.start`: the start time (Linux: clock ticks since boot, from /proc) tells apart two processes
that reused a pid. Only a process on this host can be checked; another host's counts as alive, and what it holds is
judged by age instead. (Two containers given the same hostname on one machine would see each other's pids as
their own: give containers their own hostnames, Docker's default.)
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid`; None when there is no such process, or it is dead and not yet reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: field 3 on
    return None if fields[0] in ("Z", "X") else fields[19]  # state (a zombie is dead), start time (field 22)


def process_token(pid: int | None = None) -> str:
    """host.pid.start of a process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{_host()}.{pid}.{_process_start(pid) or '0'}"


def process_alive(token: str | None) -> bool:
    """Whether the process named by `process_token` still runs (True when that cannot be known from here)."""
    host, _, rest = (token or "").partition(".")
    pid, _, start = rest.partition(".")
    if host != _host() or not pid.isdigit() or not Path("/proc/self/stat").exists():
        return True
    return _process_start(int(pid)) == start
