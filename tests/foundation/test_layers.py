"""The layers of the README's layout table, enforced: import-linter contracts (pyproject.toml), no
import circles (imports inside functions included), and serving that never loads the training loop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("grmserve.server", "grmserve.training", "grmserve.clients", "grmserve.protos")


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'grm-serve[dev]')")
    result = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "5 kept, 0 broken" in result.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), over our modules only."""
    ours = sorted(m for m in graph.modules if m.startswith(ROOTS))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.find_modules_directly_imported_by(v):
            if not w.startswith(ROOTS):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in ours:
        if module not in index:
            visit(module)
    return found


def test_no_import_circles():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install 'grm-serve[dev]')")
    graph = grimp.build_graph(*ROOTS)
    assert len(graph.modules) > 50
    assert _cycles(graph) == []


def test_serving_the_default_model_never_imports_the_training_loop(tiny_checkpoint):
    """Importing the server, building its engine (a tiny checkpoint) and locating the default model
    load the core only: no trainer, experiment or data loading, and no warnings filter of theirs."""
    code = f"""
import json, sys, warnings
from grmserve.server import cli
from grmserve.server.app import build_engine, default_checkpoint
from grmserve.server.config import local
cfg = local(); cfg.model.checkpoint = {str(tiny_checkpoint)!r}; cfg.model.precision = "fp32"
build_engine(cfg)
default_checkpoint()
loaded = sorted(m for m in sys.modules
                if m.startswith("grmserve.training.") and not m.startswith("grmserve.training.core"))
filters = [str(f[1].pattern) for f in warnings.filters if f[1] is not None]
print(json.dumps({{"loaded": loaded, "filters": filters}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert not any("returned a view tensor" in f for f in report["filters"])
