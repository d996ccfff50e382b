"""Training tests run their tiny models on one thread: on a shared two-core machine, two OpenMP
threads wait on each other (a tiny step went from ~0.1 s to over 1 s under load)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants at once, and wait until they are gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture()
def sigkill_after_first_checkpoint():
    """Start `grm-train` with `args` in a subprocess (under torchrun with `nproc` > 1), SIGKILL it and
    every process it started as soon as its first checkpoint is complete, as a lost node or an
    OOM-killed pod would; returns that checkpoint's path (skips if the run finished before it could be
    killed). Nothing of the run is left running to write later checkpoints."""
    from grmserve.training.trainer import latest_checkpoint

    def run(run_dir: Path, args: list[str], final_step: int, timeout: float = 180, nproc: int = 1) -> Path:
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [*launcher, "-m", "grmserve.training.trainer", "--run_dir", str(run_dir), *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads while the run writes
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            deadline = time.monotonic() + timeout
            while latest_checkpoint(run_dir / "checkpoints") is None:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"grm-train exited ({proc.returncode}) before its first checkpoint: "
                                f"{log.read()[-2000:]}")
                assert time.monotonic() < deadline, f"no checkpoint within {timeout:g} s"
                time.sleep(0.02)
        finally:
            kill_process_tree(proc.pid)  # torchrun starts each worker in a session of its own
            proc.wait(timeout=30)
            log.close()
        killed_at = latest_checkpoint(run_dir / "checkpoints")
        if killed_at.name == f"step-{final_step:07d}":
            pytest.skip("the run finished before it could be killed")
        return killed_at

    return run
