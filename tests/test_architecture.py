"""The dependency rules of shared/design/architecture.md, enforced rather than remembered."""

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
    assert " 0 broken" in result.stdout and "Contracts: 6 kept" in result.stdout


def test_web_tier_validation_imports_no_torch():
    code = (
        "import sys, neat_core, neat_core.data.formats, neat_core.models.catalog, neat_core.methods.specs; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_activation_list_matches_transformers():
    from transformers.activations import ACT2FN

    from neat_core.methods.specs import ACTIVATIONS

    assert sorted(ACTIVATIONS) == sorted(ACT2FN)
