"""control.processes: a token names a process so that another can tell whether it still runs."""

from __future__ import annotations

import subprocess
import sys
import time

from control.processes import process_alive, process_token


def test_process_tokens_tell_live_processes_from_dead_ones():
    assert process_alive(process_token())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = process_token(child.pid)
    assert process_alive(token)
    child.kill()
    deadline = time.monotonic() + 10
    while process_alive(token):  # killed, not yet reaped by its parent (us): a zombie is dead
        assert time.monotonic() < deadline, "a killed, unreaped process still counts as alive"
        time.sleep(0.01)
    child.wait()
    assert not process_alive(token)  # the pid is gone (or, reused, has another start time)
    host, _, rest = process_token().partition(".")
    assert process_alive(f"another-host.{rest}")  # another machine's process cannot be checked: kept, by age
