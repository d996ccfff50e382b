"""bench/serve: closed-loop load over real gRPC against grm-serve and a naive baseline. Prints JSON.

Not a test. Every number comes from one run on one machine, so compare the ratios:

- grm-serve (dynamic batching, length grouping) at `--precision`, C concurrent callers, each
  sending Score calls of `--pairs-per-call` pairs back to back for `--seconds`;
- baseline (a): the same gRPC API answered by a plain transformers forward per request, no
  batching across requests (what OpenRLHF's reward server does), same model, same precision;
- ScoreCandidates (shared prompt, KV reuse) vs Score on the same 16 pairs (512-token prompt,
  64-token responses);
- model FLOP/s as a fraction of the bf16 matmul peak measured in the same run;
- baseline (b), with `--vllm-python`: vLLM's pooling runner (bench/vllm_baseline.py, run by that
  Python) on the same model exported as SequenceClassification, scoring the same token sequences;
  its scores are checked against ours before speeds are compared. vLLM loads only linear heads,
  so with `--vllm-python` every contender serves the default backbone with a seeded linear head.

    python bench/serve.py                                # default model, bf16, C=32
    python bench/serve.py --checkpoint runs/x --precision fp8 --concurrency 32 --seconds 20
    python bench/serve.py --vllm-python .venv-vllm/bin/python --precision fp32
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from grmserve.clients.reward_client import RewardClient
from grmserve.server.app import build_engine
from grmserve.server.background import ServerThread
from grmserve.server.config import local
from grmserve.server.engine.base import Engine, ScoreResult
from grmserve.training.synthetic_prefs import make_pairs


class NaiveEngine(Engine):
    """Baseline (a): one forward per request, requests serialised on the model, no batching."""

    def __init__(self, inner):
        self.inner = inner
        self.info = inner.info
        self.sinks = inner.sinks
        self._lock = threading.Lock()

    async def start(self):
        pass

    async def drain(self):
        pass

    async def close(self):
        pass

    def renderer(self):
        return self.inner.renderer()

    def run_sync(self, fn, *args):
        return fn(*args)

    @property
    def runner(self):
        return self.inner.runner

    def _run(self, job):
        rows = [g.prompt_ids + r for g in job.groups for r in g.response_ids]
        with self._lock:
            start = time.perf_counter()
            scores, _ = self.inner.runner.score_rows(rows)
            return scores, time.perf_counter() - start, sum(map(len, rows))

    async def submit(self, job) -> ScoreResult:
        scores, secs, tokens = await asyncio.get_running_loop().run_in_executor(None, self._run, job)
        return ScoreResult(scores=scores, sequence_tokens=[], truncated=[], computed_tokens=tokens, queue_seconds=0.0,
                           compute_seconds=secs)


def closed_loop(target: str, pairs, concurrency: int, per_call: int, seconds: float) -> dict:
    latencies: list[float] = []
    scored = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def caller(k: int):
        with RewardClient(target, timeout=600) as c:
            i = k * per_call
            while time.monotonic() < stop_at:
                batch = [pairs[(i + j) % len(pairs)] for j in range(per_call)]
                i += concurrency * per_call
                t = time.perf_counter()
                c.score(batch)
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    scored[0] += per_call

    start = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(caller, range(concurrency)))
    wall = time.monotonic() - start
    latencies.sort()
    return {"pairs_per_s": scored[0] / wall, "calls": len(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def matmul_peak_flops(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """Median FLOP/s of an n×n×n matmul in `dtype` on this machine, now."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "weight_scale"))


def candidates_vs_score(target: str, reps: int) -> dict:
    prompt = "Summarise the following notes.\n" + " ".join(f"note {i}: the quick brown fox jumps." for i in range(60))
    with RewardClient(target, timeout=600) as c:
        tok_prompt = c.score_full([(prompt, " x")]).metadata.sequence_tokens[0]
        responses = [" ".join(f"word{j}{i}" for j in range(24)) for i in range(16)]
        meta = c.score_full([(prompt, responses[0])]).metadata
        c.score_candidates(prompt, responses)
        c.score([(prompt, r) for r in responses])
        # The same 16 pairs with nothing to share: each prompt made distinct by its first word.
        distinct = [(f"V{i}: " + prompt, r) for i, r in enumerate(responses)]
        t_cand, t_score, t_full = [], [], []
        for _ in range(reps):
            t = time.perf_counter(); c.score_candidates(prompt, responses); t_cand.append(time.perf_counter() - t)
            t = time.perf_counter(); c.score([(prompt, r) for r in responses]); t_score.append(time.perf_counter() - t)
            t = time.perf_counter(); c.score(distinct); t_full.append(time.perf_counter() - t)
    return {"prompt_tokens": tok_prompt, "sequence_tokens": meta.sequence_tokens[0], "n": 16,
            "candidates_ms_median": 1000 * statistics.median(t_cand),
            "score_same_prompt_ms_median": 1000 * statistics.median(t_score),
            "score_16_full_sequences_ms_median": 1000 * statistics.median(t_full),
            "speedup_vs_full_sequences": statistics.median(t_full) / statistics.median(t_cand),
            "speedup_vs_score_same_prompt": statistics.median(t_score) / statistics.median(t_cand)}


def linear_head_checkpoint(src: str, workdir: Path) -> Path:
    """The given (or default) checkpoint's backbone with a seeded linear, bias-free head: the one
    head shape a SequenceClassification export (and so vLLM) can carry."""
    from grmserve.server.app import default_checkpoint
    from grmserve.training.model import GRMModel, HeadConfig, RewardHead, load_grm, save_grm

    loaded = load_grm(src or default_checkpoint())
    torch.manual_seed(0)
    head = RewardHead(loaded.model.hf_config.hidden_size, HeadConfig(type="linear", bias=False, dropout=0.0))
    grm = loaded.model.grm_config
    grm.head, grm.model_name = head.config, grm.model_name + "-linear-bench"
    return save_grm(GRMModel(loaded.model.lm, head, grm), loaded.tokenizer, workdir / "linear")


def vllm_baseline(args, engine, pairs, workdir: Path, cfg) -> dict:
    from grmserve.training.model import export_sequence_classification, load_grm

    loaded = load_grm(args.checkpoint)
    seqcls = export_sequence_classification(loaded.model, loaded.tokenizer, workdir / "seqcls")
    renderer = engine.renderer()
    seqs = []
    for prompt, response in pairs:
        g = renderer.encode(prompt, [response], max_tokens=engine.info.max_tokens)
        seqs.append(g.prompt_ids + g.response_ids[0])
    (workdir / "ids.json").write_text(json.dumps(seqs))
    script = Path(__file__).with_name("vllm_baseline.py")
    proc = subprocess.run([args.vllm_python, str(script), "--model", str(seqcls), "--inputs", str(workdir / "ids.json"),
                           "--scores-out", str(workdir / "vllm_scores.json"), "--result-out", str(workdir / "vllm.json"),
                           "--threads", str(os.cpu_count() or 1)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    result = json.loads((workdir / "vllm.json").read_text())
    theirs = torch.tensor(json.loads((workdir / "vllm_scores.json").read_text()))
    with ServerThread(cfg, build_engine(cfg), grace=1.0) as served, RewardClient(served.target, timeout=600) as c:
        ours = torch.tensor([s for k in range(0, len(pairs), 256) for s in c.score(pairs[k:k + 256])])
    result["scores_max_abs_diff_vs_grm_serve"] = float((ours - theirs).abs().max())
    result["scores_pearson_vs_grm_serve"] = float(torch.corrcoef(torch.stack([ours, theirs]))[0, 1])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="", help="checkpoint folder (default: the default model)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp8", "bf16", "fp32"])
    p.add_argument("--vllm-python", default="", help="a Python with vLLM installed: adds baseline (b)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pairs-per-call", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--reps", type=int, default=5, help="repetitions of the ScoreCandidates comparison")
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = Path(tempfile.mkdtemp(prefix="grm-bench-"))
    if args.vllm_python:
        args.checkpoint = str(linear_head_checkpoint(args.checkpoint, workdir))
    cfg = local()
    cfg.server.metrics_port = -1
    cfg.model.checkpoint = args.checkpoint
    cfg.model.precision = args.precision
    engine = build_engine(cfg)
    rows = make_pairs(512, seed=7)
    pairs = [(r["prompt"], r["chosen" if i % 2 else "rejected"]) for i, r in enumerate(rows)]
    out: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "precision": args.precision,
                 "model": engine.info.model_name, "concurrency": args.concurrency, "pairs_per_call": args.pairs_per_call}
    peak_bf16 = matmul_peak_flops(torch.bfloat16, reps=2)
    peak_fp32 = matmul_peak_flops(torch.float32)
    peak = max(peak_bf16, peak_fp32)  # the faster dtype's peak is the honest ceiling
    out["bf16_matmul_peak_gflops"] = peak_bf16 / 1e9
    out["fp32_matmul_peak_gflops"] = peak_fp32 / 1e9
    n_linear = linear_params(engine.runner.model)

    # Baseline (a) first and ours right after it: both inside the same minute or two of machine state.
    if not args.skip_baseline:
        cfg_b = local()
        cfg_b.server.metrics_port = -1
        cfg_b.model.warmup = False
        naive = NaiveEngine(build_engine(cfg))
        with ServerThread(cfg_b, naive, grace=1.0) as served:
            base = closed_loop(served.target, pairs, args.concurrency, args.pairs_per_call, args.seconds)
        out["baseline_a_transformers_per_request"] = base
    with ServerThread(cfg, engine, grace=1.0) as served:
        target = served.target
        c0 = RewardClient(target)
        tokens_per_pair = statistics.mean(c0.score_full(pairs[:64]).metadata.sequence_tokens)
        c0.close()
        ours = closed_loop(target, pairs, args.concurrency, args.pairs_per_call, args.seconds)
        ours["tokens_per_s"] = ours["pairs_per_s"] * tokens_per_pair
        # Scored tokens, a shared prompt counted once per pair: "effective" FLOP/s, as if nothing were shared.
        ours["model_gflops"] = 2 * n_linear * ours["tokens_per_s"] / 1e9
        ours["model_flops_fraction_of_bf16_peak"] = 2 * n_linear * ours["tokens_per_s"] / peak_bf16
        ours["model_flops_fraction_of_best_matmul_peak"] = 2 * n_linear * ours["tokens_per_s"] / peak
        out["grm_serve"] = ours
        out["candidates_vs_score"] = candidates_vs_score(target, args.reps)
    out["tokens_per_pair_mean"] = tokens_per_pair
    if "baseline_a_transformers_per_request" in out:
        base = out["baseline_a_transformers_per_request"]
        base["tokens_per_s"] = base["pairs_per_s"] * tokens_per_pair
        out["throughput_ratio_vs_baseline_a"] = ours["pairs_per_s"] / base["pairs_per_s"]

    if args.vllm_python:
        try:
            out["baseline_b_vllm_pooling"] = vllm_baseline(args, engine, pairs, workdir, cfg)
            out["throughput_ratio_vs_baseline_b"] = ours["pairs_per_s"] / out["baseline_b_vllm_pooling"]["pairs_per_s"]
        except Exception as exc:  # noqa: BLE001 - report it, keep the other numbers
            out["baseline_b_vllm_pooling"] = {"error": f"{type(exc).__name__}: {exc}"}

    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
