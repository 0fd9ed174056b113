"""The dependency rules (import-linter contracts in pyproject.toml), enforced rather than remembered."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout and "Contracts: 9 kept" in result.stdout


def test_web_tier_validation_imports_no_torch():
    """Discovering every method's spec (each package's `__init__` and `spec.py`, whatever packages exist now) and
    validating a job spec with them imports no torch: import-linter sees the imports, this sees what runs."""
    code = (
        "import sys, neat_core, neat_core.data.formats, neat_core.models.catalog, neat_core.methods.specs as s; "
        "names = s.spec_names(); assert {'neat', 'lora', 'lily', 'heat', 'pear'} <= set(names), names; "
        "[s.check_hyperparameters(n, {'r': 4}) for n in names]; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_cli_runs_without_the_service_or_torch():
    """`neatft` (cli/) is a client: loading all its commands pulls in no tier of the service and no torch."""
    code = (
        "import sys, cli.main; "
        "loaded = [m for m in ('torch', 'transformers', 'peft', 'api', 'control', 'worker', 'inference', 'launch', "
        "'fastapi', 'sqlalchemy', 'celery') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_activation_list_matches_transformers():
    from transformers.activations import ACT2FN

    from neat_core.methods.specs import ACTIVATIONS

    assert sorted(ACTIVATIONS) == sorted(ACT2FN)
