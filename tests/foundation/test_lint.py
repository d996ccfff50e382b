"""The code stays readable by the rules pyproject.toml sets: ruff's pyflakes checks (unused or
undefined names), import order and the 120-character line length."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = "F,I,E501"


def test_ruff_finds_nothing():
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("ruff is not installed (pip install 'grm-serve[dev]')")
    result = subprocess.run([exe, "check", "--select", RULES, "--output-format", "concise", "--no-cache", "."],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
