"""The code base is ruff clean (lint and format)."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = Path(sys.executable).parent / "ruff"
    return subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout


def test_ruff_format():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout
