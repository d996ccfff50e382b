"""Best-of-n throughput with generation/scoring overlap against without, in one run (not a test).

One vLLM engine (offline, this process) samples n candidates per prompt; a grm-serve process scores
them (ScoreCandidates, dedupe); `BestOfN(overlap=True)` scores batch k while batch k+1 is generated,
`overlap=False` waits for the scores before generating the next batch. Passes alternate between the
two (these shared machines drift by tens of percent within minutes: only interleaved passes
compare), each on prompts neither side has seen (fresh held-out benchmark prompts per pass, so no
prefix cache helps one pass more than another). Prints one JSON object: prompts/s per pass, medians,
the median of per-round ratios, and the CPU.

    python bench/bon_overlap.py                          # default reward model, n=8, 4 rounds
    python bench/bon_overlap.py --target localhost:50051 --n 8 --prompts 12 --batch-prompts 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "grmserve.server.cli", "--preset", "local", "--log_level", "WARNING"]
    if checkpoint:
        cmd += ["--model.checkpoint", checkpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        m = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
    raise RuntimeError("grm-serve did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="", help="a running reward server (default: start grm-serve here)")
    p.add_argument("--checkpoint", default="",
                   help="reward model for the grm-serve started here (default: the default model)")
    p.add_argument("--policy", default="", help="policy checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompts", type=int, default=12, help="prompts per pass")
    p.add_argument("--batch-prompts", type=int, default=3, help="prompts per generation batch (4 batches a pass)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (overlap, no overlap) passes")
    args = p.parse_args()

    from grmserve.clients.best_of_n import BestOfN, PromptItem, SamplingConfig, VLLMGenerator
    from grmserve.clients.reward_client import RewardClient
    from grmserve.training.benchmark import load_prompts
    from grmserve.training.core import assets

    proc = None
    target = args.target
    if not target:
        proc, target = start_server(args.checkpoint)
    try:
        client = RewardClient(target, timeout=600)
        client.wait_ready(120)
        info = client.info()
        policy = args.policy or str(assets.smollm2_dir())
        gen = VLLMGenerator(policy, SamplingConfig(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens),
                            max_model_len=1024, kv_cache_gib=2, seed=0)
        pool = load_prompts("test_id") + load_prompts("test_ood")
        need = (2 * args.rounds + 1) * args.prompts
        if need > len(pool):
            raise SystemExit(f"{need} prompts needed, the benchmark has {len(pool)}")
        slices = iter(range(0, need, args.prompts))

        def one_pass(overlap: bool) -> dict:
            start = next(slices)
            items = [PromptItem(prompt=r["messages"], id=r["id"]) for r in pool[start:start + args.prompts]]
            bon = BestOfN(gen, client, n=args.n, batch_prompts=args.batch_prompts, overlap=overlap,
                          score_concurrency=args.batch_prompts)
            t = time.perf_counter()
            results = list(bon.run(items))
            dt = time.perf_counter() - t
            return {"overlap": overlap, "seconds": dt, "prompts_per_s": len(results) / dt,
                    "distinct_per_prompt": statistics.mean(r.distinct for r in results)}

        one_pass(True)  # warm-up: both engines' first calls
        passes = []
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            passes.append({o: one_pass(o) for o in order})
        on = [p[True]["prompts_per_s"] for p in passes]
        off = [p[False]["prompts_per_s"] for p in passes]
        print(json.dumps({
            "bench": "bon_overlap", "cpu": cpu_model(), "cores": os.cpu_count(), "n": args.n,
            "prompts_per_pass": args.prompts, "batch_prompts": args.batch_prompts, "max_tokens": args.max_tokens,
            "policy": Path(policy).name, "reward_model": f"{info.model_name} {info.model_version} ({info.precision})",
            "overlap_prompts_per_s": on, "no_overlap_prompts_per_s": off,
            "overlap_median": statistics.median(on), "no_overlap_median": statistics.median(off),
            "speedup_median_of_ratios": statistics.median(a / b for a, b in zip(on, off)),
            "passes": [p[o] for p in passes for o in (True, False)]}, indent=2))
        gen.close()
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    raise SystemExit(main())
