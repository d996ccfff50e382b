"""bench/serve_memory: resident memory of a `grm-serve` process, to size container memory. Prints JSON.

Not a test. Starts `grm-serve --preset local` (plus the flags after `--`) as a child process and reads
`VmRSS` and `VmHWM` (peak RSS) from /proc/PID/status (Linux) three times: once it reports SERVING
(model loaded and warmed up, idle), after scoring `--pairs` chosen/rejected pairs of the bundled
`test_id` split (distinct prompts, so the prefix KV cache fills up to its budget), and after a second
round of the same pairs (hits). The server's own `grm_serve_prefix_cache_bytes` is read from /metrics
each time, so the cache's share of the RSS is visible. The deploy manifests size their memory
requests and limits from these numbers (docs/deploy.md).

    python bench/serve_memory.py                                   # default model, default flags
    python bench/serve_memory.py --pairs 400 -- --batch.prefix_cache_mib 256
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
import urllib.request

from grmserve.clients.reward_client import RewardClient
from grmserve.training.benchmark import load_split

READY_LINE = re.compile(r"on (?P<host>[\d.]+):(?P<port>\d+); metrics on :(?P<metrics>\d+)")


def proc_memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB (from /proc/PID/status)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MiB
    return fields


def metric_value(metrics_port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def start_server(extra: list[str]) -> tuple[subprocess.Popen, int, int]:
    cmd = [sys.executable, "-m", "grmserve.server.cli", "--preset", "local", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if m := READY_LINE.search(line):
            return proc, int(m["port"]), int(m["metrics"])
    raise RuntimeError(f"grm-serve exited with {proc.wait()} before serving: {' '.join(cmd)}")


def benchmark_pairs(n: int) -> list[tuple[str, str]]:
    pairs = []
    with gzip.open(load_split("test_id"), "rt") as f:
        for line in f:
            row = json.loads(line)
            chat = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
            pairs += [(chat, row["chosen"]), (chat, row["rejected"])]
            if len(pairs) >= n:
                return pairs[:n]
    return pairs


def snapshot(proc, metrics_port: int, label: str, seconds: float) -> dict:
    return {"when": label, **proc_memory_mib(proc.pid), "prefix_cache_mib": round(
        metric_value(metrics_port, "grm_serve_prefix_cache_bytes") / 2**20, 1), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600, help="pairs to score per round")
    parser.add_argument("--per-call", type=int, default=16, help="pairs per Score call")
    parser.add_argument("server_args", nargs="*", help="grm-serve flags (after --)")
    args = parser.parse_args()
    start = time.perf_counter()
    proc, port, metrics_port = start_server(args.server_args)
    try:
        rows = [snapshot(proc, metrics_port, "serving, idle", time.perf_counter() - start)]
        pairs = benchmark_pairs(args.pairs)
        with RewardClient(f"127.0.0.1:{port}", timeout=600) as client:
            for label in ("after 1st round (cache filling)", "after 2nd round (cache hits)"):
                t0 = time.perf_counter()
                for i in range(0, len(pairs), args.per_call):
                    client.score(pairs[i:i + args.per_call])
                rows.append(snapshot(proc, metrics_port, label, time.perf_counter() - t0))
            info = client.info()
        print(json.dumps({"model": info.model_name, "precision": info.precision, "pairs": len(pairs),
                          "server_args": args.server_args, "memory_mib": rows}, indent=2))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
