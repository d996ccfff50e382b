"""Real `grm-serve` processes on a tiny checkpoint, shared by the deploy tests, and helpers to find
the external tools (prometheus, promtool, kubectl) the tests drive."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
READY_LINE = re.compile(r"on (?P<host>[\d.]+):(?P<port>\d+); metrics on :(?P<metrics>\d+)")
N_SERVERS = 3  # [0] serves the Prometheus test and is never stopped; the replica test stops [1] and [2]


def require_binary(name: str) -> str:
    """The binary's path, or skip the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        hint = {"prometheus": "apt-get install prometheus (Debian 12: Prometheus 2.42 with promtool; .ci/run does "
                              "this as root)",
                "promtool": "apt-get install prometheus (.ci/run does this as root)",
                "kubectl": "install kubectl >= 1.27 (`kubectl kustomize` builds offline; Debian 12's kubernetes-client "
                           "1.20 is too old for these kustomizations)"}
        pytest.skip(f"`{name}` is not on PATH; {hint.get(name, 'install it')}")
    return path


@dataclass
class ServerProcess:
    """A `python -m grmserve.server.cli` child process serving a tiny checkpoint on loopback."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def samples(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` on this server's /metrics whose labels include `labels`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_servers(checkpoint: Path, logdir: Path, n: int) -> list[ServerProcess]:
    """Start n servers at once (they load in parallel), then wait for each one's "serving ... on" line."""
    cmd = [sys.executable, "-m", "grmserve.server.cli", "--preset", "local", "--model.checkpoint", str(checkpoint),
           "--model.precision", "fp32", "--batch.prefix_cache_mib", "64", "--server.grace_seconds", "10"]
    started = []
    for i in range(n):
        log = logdir / f"grm-serve-{i}.log"
        started.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True), log))
    servers = []
    for proc, log in started:
        line = proc.stdout.readline()  # the CLI prints one line once it is SERVING, or exits
        m = READY_LINE.search(line)
        if not m:
            proc.kill()
            raise RuntimeError(f"grm-serve did not start (exit {proc.wait()}): {' '.join(cmd)}\n"
                               f"{log.read_text()[-3000:]}")
        servers.append(ServerProcess(proc, int(m["port"]), int(m["metrics"]), log))
    return servers


@pytest.fixture(scope="session")
def servers(tiny_checkpoint, tmp_path_factory):
    started = start_servers(tiny_checkpoint, tmp_path_factory.mktemp("grm-serve-logs"), N_SERVERS)
    yield started
    for s in started:
        s.stop(signal.SIGKILL)
