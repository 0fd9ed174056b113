"""The project's documents stand on their own: the design documents exist, and every file the docs and the code
name (a markdown link, or a repository path in backticks) is in the repository; nothing points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("neat_core", "control", "api", "worker", "inference", "launch", "cli", "tests", "bench", "docs", "scripts",
       "requirements", "migrations")  # fmt: skip
# A path in backticks that starts at the repository's top (`inference/host.py`, `docs/serving.md:12`), without
# placeholders or globs (`methods/<name>/`, `requirements/*.txt`).
REPO_PATH = re.compile(rf"`((?:{'|'.join(TOP)})/[\w./-]*\w)(?::\d+)?`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
OUTSIDE = re.compile(r"\.\./shared|\bshared/(?:design|seeds|env-notes)")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_the_design_documents_exist():
    for name in ("architecture.md", "methods.md", "serving.md", "operations.md", "benchmarks.md"):
        assert (ROOT / "docs" / name).stat().st_size > 1000, name


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in tracked("*.md"):
        text = doc.read_text()
        for target in LINK.findall(text):
            if "://" not in target and not target.startswith("mailto:"):
                resolved = (doc.parent / target).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    missing.append(f"{doc.relative_to(ROOT)}: link {target}")
        for path in REPO_PATH.findall(text):
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: `{path}`")
    assert not missing, "\n".join(missing)


def test_nothing_refers_outside_the_repository():
    found = []
    for path in tracked("*.py", "*.md", "*.toml", "*.yml", "*.ini", "*.cfg", "Dockerfile", "scripts/*", ".ci/*"):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
