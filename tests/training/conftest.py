"""Training tests run their tiny models on one thread: on a shared two-core machine, two OpenMP
threads wait on each other (a tiny step went from ~0.1 s to over 1 s under load)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def sigkill_after_first_checkpoint():
    """Start `grm-train` with `args` in a subprocess, SIGKILL it as soon as its first checkpoint is
    complete; returns that checkpoint's path (skips if the run finished before it could be killed)."""
    from grmserve.training.trainer import latest_checkpoint

    def run(run_dir: Path, args: list[str], final_step: int, timeout: float = 180) -> Path:
        cmd = [sys.executable, "-m", "grmserve.training.trainer", "--run_dir", str(run_dir), *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + timeout
            while latest_checkpoint(run_dir / "checkpoints") is None:
                if proc.poll() is not None:
                    pytest.fail(f"grm-train exited ({proc.returncode}) before its first checkpoint: "
                                f"{proc.stderr.read()[-2000:]}")
                assert time.monotonic() < deadline, f"no checkpoint within {timeout:g} s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
            proc.stderr.close()
        killed_at = latest_checkpoint(run_dir / "checkpoints")
        if killed_at.name == f"step-{final_step:07d}":
            pytest.skip("the run finished before it could be killed")
        return killed_at

    return run
