"""The runnable examples in docstrings run: every module of the server, the clients, the protos and
the shared core (examples that need a running server or the real model say `# doctest: +SKIP`).
The training drivers' modules run theirs in tests/training."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("grmserve.server", "grmserve.clients", "grmserve.protos", "grmserve.training.core")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
                  if ".grmserve." not in m.name]  # generated protobuf code has no examples
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
