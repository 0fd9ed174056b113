"""The lock files in requirements/: complete, hashed, in step with pyproject.toml's ranges and with each other, and
the slim API lock alone is enough to run the API (the Docker `api` image installs exactly that)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
LOCKS = {"test": "test", "worker": "worker", "worker-gpu": "worker", "api": "api", "bench": "bench"}  # lock -> extra
PIN = re.compile(r"^([A-Za-z0-9][\w.-]*)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.M)


def pins(lock: str) -> dict[str, Version]:
    text = (REQ / f"{lock}.txt").read_text()
    found = {canonicalize_name(n): Version(v) for n, v, _ in PIN.findall(text)}
    listed = re.findall(r"^[A-Za-z0-9][\w.-]*==", text, re.M)
    assert len(found) == len(listed), f"{lock}.txt: a pin without sha256 hashes"
    return found


def extra_requirements(extra: str, seen: frozenset[str] = frozenset()) -> list[Requirement]:
    """The extra's requirements, with the project's own extras (`neat-finetune[api,core]`) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    for line in project["optional-dependencies"][extra]:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            for inner in sorted(req.extras - seen):
                out += extra_requirements(inner, seen | {inner})
        else:
            out.append(req)
    return out


def extra_packages(req: Requirement) -> set[str]:
    """The packages a requirement's extras add (read from the installed distribution's metadata), for Linux."""
    if not req.extras:
        return set()
    env = {"sys_platform": "linux", "platform_system": "Linux", "platform_python_implementation": "CPython"}
    out = set()
    for line in metadata.requires(req.name) or []:
        dep = Requirement(line)
        if dep.marker and any(dep.marker.evaluate({**env, "extra": e}) for e in req.extras):
            if not dep.marker.evaluate({**env, "extra": ""}):  # only what the extra adds
                out.add(canonicalize_name(dep.name))
    return out


@pytest.mark.parametrize("lock,extra", LOCKS.items())
def test_every_requirement_of_the_extra_is_locked_within_its_range(lock, extra):
    locked = pins(lock)
    for req in extra_requirements(extra):
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is in pyproject.toml but not in {lock}.txt: run scripts/lock"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{lock}.txt pins {name}=={locked[name]}, outside pyproject.toml's {req}: run scripts/lock"
        )
        for wanted in extra_packages(req):  # e.g. uvicorn[standard]: the extra's own packages are locked too
            assert wanted in locked, f"{wanted} (from {req}) is not in {lock}.txt: run scripts/lock"


def test_one_package_has_one_version_in_every_lock():
    test = pins("test")
    for lock in ("worker", "worker-gpu", "api", "bench"):
        for name, version in pins(lock).items():
            if lock == "bench" and name not in test:  # trl and what only it needs (datasets, pyarrow, ...)
                continue
            if name == "torch":  # +cpu here, PyPI's CUDA build in worker-gpu: the same release
                assert version.release == test[name].release, lock
                continue
            if lock == "worker-gpu" and name not in test:  # what only the CUDA build needs (nvidia-*, triton)
                continue
            assert name in test and test[name] == version, f"{name}: {version} in {lock}.txt, {test.get(name)} in test"
    assert pins("worker")["torch"].local == "cpu" and pins("worker-gpu")["torch"].local is None


def test_the_model_packages_are_locked_exactly_as_pinned():
    wanted = dict(re.findall(r"^([\w.-]+)==(\S+)$", (REQ / "models.in").read_text(), re.M))
    assert {str(k): str(v) for k, v in pins("models").items()} == wanted


def test_the_slim_api_lock_alone_runs_the_api_without_torch(tmp_path):
    """What the Docker `api` stage does: the API lock into a bare venv, the project without dependencies, then the
    app imports (and nothing pulls in torch, transformers or peft)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--require-hashes", "-r", str(REQ / "api.txt")], check=True, timeout=600)
    source = tmp_path / "src"  # a copy, so that building the project leaves nothing in the checkout
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in (name.rstrip("*") for name in packages["include"]):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([*pip, "--no-build-isolation", "--no-index", str(source)], check=True, timeout=300, cwd=tmp_path)
    code = (
        "import sys, api.main; heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy; print(api.main.app.title)"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    check = subprocess.run([str(venv / "bin/python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
