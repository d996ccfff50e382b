"""Child processes the tests drive: a free loopback port, and a real `grm-serve` process on a tiny
checkpoint (the same command line everywhere: local preset, fp32, warnings only)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(r"on 127\.0\.0\.1:(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound and released, so it may be taken later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_grm_serve(checkpoint: Path, *extra: str, threads: int | None = None,
                    timeout: float = 120) -> tuple[subprocess.Popen, int]:
    """`python -m grmserve.server.cli` serving `checkpoint` on loopback (a random port unless `extra`
    names one; `threads`: its OMP_NUM_THREADS); returns (process, gRPC port) once it prints its SERVING
    line, or fails with its output."""
    cmd = [sys.executable, "-m", "grmserve.server.cli", "--preset", "local", "--model.checkpoint", str(checkpoint),
           "--model.precision", "fp32", "--log_level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if m := READY.search(line):
            return proc, int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"grm-serve did not start: {' '.join(cmd)}\n{proc.stdout.read()}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (the server drains), SIGKILL when it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
