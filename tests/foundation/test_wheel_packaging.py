"""The wheel installs everything under the one namespace `grmserve`, including the proto, and
squats no generic top-level name (`server`, `training`, ...)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Source folder -> where it installs.
PACKAGE_DIRS = {"server": "grmserve/server", "training": "grmserve/training", "protos": "grmserve/protos",
                "clients": "grmserve/clients"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> dict:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment; --no-build-isolation needs it")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 70 and importlib.util.find_spec("wheel") is None:
        pytest.skip("setuptools < 70 needs the `wheel` package for bdist_wheel, and it is not installed")
    # Build from a copy of what the build reads: an in-tree build writes build/ and *.egg-info into
    # the checkout, and stale files left in build/lib would end up in the wheel.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "setup.py", "setup.cfg"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "invalid command 'bdist_wheel'" in (result.stdout + result.stderr):
        pytest.skip("this setuptools cannot build wheels without the `wheel` package, which is not installed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("grm_serve-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        top_level = [n for n in zf.namelist() if n.endswith(".dist-info/top_level.txt")]
        return {"names": zf.namelist(), "top_level": zf.read(top_level[0]).decode().split() if top_level else None}


def test_wheel_contains_the_namespaced_packages_and_proto(wheel):
    wheel_files = wheel["names"]
    for required in (
        "grmserve/server/__init__.py",
        "grmserve/training/core/model.py",
        "grmserve/training/core/checkpoint.py",
        "grmserve/training/core/prompts.py",
        "grmserve/protos/__init__.py",
        "grmserve/protos/grmserve/reward/v1/reward_pb2.py",
        "grmserve/protos/grmserve/reward/v1/reward_pb2_grpc.py",
        "grmserve/protos/grmserve/reward/v1/reward.proto",
        "grmserve/clients/__init__.py",
        "grmserve/training/core/defaults/grm-smollm2-135m/top-layers.safetensors",  # the default model's artifact
        "grmserve/training/core/defaults/grm-smollm2-135m/top-layers.json",
        "grmserve/training/benchmark/data/train.jsonl.gz",
    ):
        assert required in wheel_files, f"{required} missing from the wheel"


def test_wheel_squats_no_other_top_level_name(wheel):
    wheel_files = wheel["names"]
    top = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"grmserve"}
    # `grmserve` itself is a namespace package (it has no __init__.py of its own).
    assert "grmserve/__init__.py" not in wheel_files
    if wheel["top_level"] is not None:
        assert wheel["top_level"] == ["grmserve"]


def test_every_python_module_in_the_tree_is_in_the_wheel(wheel):
    wheel_files = wheel["names"]
    """A new subpackage (e.g. training/core/fp8/..., clients/ppo/) must also be listed in pyproject.toml."""
    missing = []
    for folder, installed in PACKAGE_DIRS.items():
        for py in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in py.parts:
                continue
            target = f"{installed}/{py.relative_to(REPO / folder).as_posix()}"
            if target not in wheel_files:
                missing.append(f"{folder}/{py.relative_to(REPO / folder).as_posix()}")
    assert not missing, f"not in the wheel (add their packages to [tool.setuptools] in pyproject.toml): {missing}"
