"""control.jobs is the one place that spells a job status: everywhere else names them (`JobStatus.QUEUED`) and
asks control.jobs for transitions, so a status cannot be mistyped, and a new one cannot be forgotten by a set.

What counts as spelling a status, precisely: a Python string constant (parsed with `ast`, so comments and prose
in docstrings do not count) whose whole value is one of JobStatus's values, in a service package (control, api,
worker, and inference once it exists), except control/jobs.py itself. migrations/ is not scanned: a migration
freezes the strings of its day on purpose. neat_core is not scanned: its `TrainResult.status` is the library's own
vocabulary ("succeeded" | "cancelled"), read through `TrainResult.cancelled`. Other vocabularies that share a word
are spelled in control.jobs too (`AttemptOutcome`), or do not share one (event levels are info | warn | error)."""

from __future__ import annotations

import ast
from pathlib import Path

from control.jobs import JobStatus

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("control", "api", "worker", "inference")
STATE_MODULE = ROOT / "control" / "jobs.py"


def status_literals(source: str) -> list[tuple[int, str]]:
    statuses = {s.value for s in JobStatus}
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in statuses
    ]


def test_no_job_status_literal_outside_the_state_module():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != STATE_MODULE:
                found += [
                    f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in status_literals(path.read_text())
                ]
    assert not found, "job statuses spelled outside control/jobs.py (use control.jobs):\n" + "\n".join(found)


def test_the_scan_sees_what_it_must_and_only_that():
    code = 'x = "running"\nif job.status in ("failed", "queue"):\n    pass\n# "cancelled" in a comment\n'
    assert status_literals(code) == [(1, "running"), (2, "failed")]
    assert status_literals('"""The job is cancelled once the worker stops."""') == []
    assert status_literals(STATE_MODULE.read_text())  # the state module itself is where they are
