"""bench/ppo_overlap: how long grm-ppo waits for the reward service, with scoring overlapped with
generation and the log-prob passes, and without. Prints JSON.

Not a test. One run: a `grm-serve` process (the default GRM unless `--checkpoint`) and one grm-ppo
trainer (the `smollm2` preset unless `--preset`) whose steps alternate overlap on / off (odd steps
on, even steps off), so that both modes see the same machine, server and policy; step 1 is a
warm-up and is not counted. Reported per mode: mean time waiting for scores, mean step time, and
waiting as a fraction of step time (the mean of per-step fractions and the ratio of the sums).

    python bench/ppo_overlap.py                         # SmolLM2 + LoRA policy, default GRM, 7 steps
    python bench/ppo_overlap.py --preset tiny --steps 9 # a random tiny policy: scoring dominates
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model

from grmserve.clients.reward_client import RewardClient
from grmserve.training.ppo.presets import PRESETS
from grmserve.training.ppo.trainer import PPOTrainer


class AlternatingTrainer(PPOTrainer):
    """Step k (1-based) scores with overlap when k is odd, without when it is even."""

    def rollout(self, step, times):
        self.cfg.rollout.overlap = step % 2 == 0  # `step` is 0-based here
        return super().rollout(step, times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2", choices=sorted(PRESETS))
    ap.add_argument("--checkpoint", default="", help="reward model folder (default: grm-serve's default GRM)")
    ap.add_argument("--steps", type=int, default=7, help="PPO steps (odd: overlap on, even: off; step 1 warm-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "grmserve.server.cli", "--server.port", str(port), "--server.metrics_port", "-1",
           "--server.host", "127.0.0.1"]
    if args.checkpoint:
        cmd += ["--model.checkpoint", args.checkpoint]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with RewardClient(f"127.0.0.1:{port}") as c:
            c.wait_ready(600)
            info = c.info()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = PRESETS[args.preset]()
            cfg.run_dir, cfg.steps = str(Path(tmp) / "run"), args.steps
            cfg.reward.address = f"127.0.0.1:{port}"
            cfg.rollout.batch_size, cfg.rollout.chunk_size = args.batch_size, args.chunk_size
            cfg.rollout.max_new_tokens = args.max_new_tokens
            cfg.ppo.minibatch_size = min(cfg.ppo.minibatch_size, args.batch_size)
            cfg.ppo.grad_accum = 1
            cfg.eval.every, cfg.checkpoint.every, cfg.checkpoint.export_policy = 0, 0, False
            cfg.log.progress = False
            trainer = AlternatingTrainer(cfg)
            t0 = time.perf_counter()
            try:
                trainer.fit()
            finally:
                trainer.close()
            wall = time.perf_counter() - t0
            steps = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        server.terminate()
        server.wait(60)

    def summary(rows: list[dict]) -> dict:
        wait, step = [r["time_score_wait_s"] for r in rows], [r["time_step_s"] for r in rows]
        return {"steps": [r["step"] for r in rows], "score_wait_s": statistics.mean(wait),
                "step_s": statistics.mean(step), "generate_s": statistics.mean(r["time_generate_s"] for r in rows),
                "logprobs_s": statistics.mean(r["time_logprobs_s"] for r in rows),
                "update_s": statistics.mean(r["time_update_s"] for r in rows),
                "score_wait_fraction_mean": statistics.mean(r["score_wait_fraction"] for r in rows),
                "score_wait_fraction_of_sums": sum(wait) / sum(step)}

    counted = [r for r in steps if r["step"] > 1]
    print(json.dumps({
        "bench": "ppo_overlap", "cpu": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "policy_preset": args.preset, "reward_model": info.model_name, "reward_precision": info.precision,
        "batch_size": args.batch_size, "chunk_size": args.chunk_size, "max_new_tokens": args.max_new_tokens,
        "wall_s": round(wall, 1),
        "overlap": summary([r for r in counted if r["step"] % 2 == 1]),
        "no_overlap": summary([r for r in counted if r["step"] % 2 == 0]),
    }, indent=2))


if __name__ == "__main__":
    main()
