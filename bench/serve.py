"""bench/serve: closed-loop load over real gRPC against grm-serve and its baselines. Prints JSON.

Not a test. Every number comes from one run on one machine, so compare the ratios. The contenders
take turns pass by pass (grm-serve, grm-serve without prefix cache, baseline (a), vLLM; `--passes`
rounds), and each ratio is the median of per-round ratios: these shared machines change speed by
tens of percent within minutes, so numbers taken minutes apart do not compare.

- grm-serve (dynamic batching, packed passes, prefix KV reuse) at `--precision`: C concurrent
  callers send Score calls of `--pairs-per-call` pairs until the 512 pairs of the data are scored
  once; `--passes` passes, each from an empty prefix cache, median reported. Prefixes repeated
  inside a pass hit the cache (the data has 72 distinct prompts and 421 distinct pairs in 512, as
  RLHF data has several responses per prompt, and samples that repeat). Measured twice:
  `grm_serve_no_prefix_cache` (budget 0: only the chat template's head and prefixes repeated
  inside one batch are shared) and `grm_serve` (the default budget). Both report the cache's hit
  rate, and the tokens the model computed (FLOP/s are counted on those);
- baseline (a): the same gRPC API answered by a plain transformers forward per request, no
  batching across requests (what OpenRLHF's reward server does), same model, same precision, C
  callers in a closed loop for `--seconds` (it keeps no state, so a time window measures it);
- ScoreCandidates (shared prompt, KV reuse) vs Score on the same 16 pairs (~600-token prompt,
  ~85-token responses), prompts the server has not seen;
- model FLOP/s as a fraction of the bf16 matmul peak measured in the same run;
- baseline (b), with `--vllm-python`: vLLM's pooling runner (bench/vllm_baseline.py, run by that
  Python) on the same model exported as SequenceClassification, scoring the same token sequences
  in one offline call per pass (no network: its best case); its scores are checked against ours
  before speeds are compared. vLLM runs with its automatic prefix caching on, reset before each of
  its `--passes` passes like ours, and 32-token blocks (its CPU default of 128 never fills a block
  with these ~64-token sequences, so it could reuse nothing). vLLM loads only linear heads, so
  with `--vllm-python` every contender serves the default backbone with a seeded linear head.
  vLLM stays loaded between its passes; its CPU time while the others run is reported (≈ 0).

    python bench/serve.py                                # default model, bf16, C=32
    python bench/serve.py --checkpoint runs/x --precision fp8 --concurrency 32 --passes 3
    python bench/serve.py --vllm-python .venv-vllm/bin/python --precision fp32
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import dataclasses
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
from tqdm import tqdm

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

    async def warmup(self):
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


def latency_ms(latencies: list[float]) -> dict:
    """p50 and p99 of call latencies (seconds), in milliseconds."""
    ordered = sorted(latencies)
    return {"p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


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
    return {"pairs_per_s": scored[0] / wall, "calls": len(latencies), "pairs": scored[0], **latency_ms(latencies)}


def one_pass(target: str, pairs, concurrency: int, per_call: int) -> dict:
    """C callers take the next `per_call` pairs from one shared list until it is used up; each
    pair is scored once. Returns the wall time and every call's latency."""
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = [0]

    def caller(_k: int):
        with RewardClient(target, timeout=600) as c:
            while True:
                with lock:
                    i = cursor[0]
                    cursor[0] += per_call
                if i >= len(pairs):
                    return
                t = time.perf_counter()
                c.score(pairs[i:i + per_call])
                with lock:
                    latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(caller, range(concurrency)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


def cold_pass(engine, target: str, pairs, args, cache_bytes: int) -> dict:
    """One pass over `pairs` from an empty prefix cache of `cache_bytes`, with the cache's counts."""
    cache = engine.runner.cache

    def reset():
        cache.clear()
        cache.max_bytes = cache_bytes

    engine.run_sync(reset)
    before = dataclasses.replace(cache.stats)
    computed = [0]

    def count(batch):  # on the model thread, once per forward pass
        computed[0] += batch.tokens

    engine.sinks.on_batch.append(count)
    try:
        run = one_pass(target, pairs, args.concurrency, args.pairs_per_call)
    finally:
        engine.sinks.on_batch.remove(count)
    added = cache.stats.since(before)
    run.update(hits=added.hits, misses=added.misses, reused=added.reused_tokens, computed=computed[0])
    return run


def summarise_passes(runs: list[dict], pairs: int, cache_bytes: int) -> dict:
    latencies = [t for r in runs for t in r["latencies"]]
    hits, misses = sum(r["hits"] for r in runs), sum(r["misses"] for r in runs)
    med = statistics.median(r["seconds"] for r in runs)
    return {"pairs_per_s": pairs / med, "seconds_per_pass": [r["seconds"] for r in runs], "calls": len(latencies),
            **latency_ms(latencies),
            "computed_tokens_per_pass": [r["computed"] for r in runs],
            "computed_tokens_per_s": statistics.median(r["computed"] / r["seconds"] for r in runs),
            "prefix_cache": {"budget_bytes": cache_bytes, "hits": hits, "misses": misses,
                             "hit_rate": hits / max(1, hits + misses),
                             "reused_tokens_per_pair": sum(r["reused"] for r in runs) / (pairs * len(runs))}}


class VLLMWorker:
    """bench/vllm_baseline.py in a vLLM Python, loaded once and driven pass by pass."""

    def __init__(self, python: str, model: Path, inputs: Path, log: Path):
        read, write = os.pipe()
        self._log = open(log, "w")
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("vllm_baseline.py")), "--model", str(model),
                                      "--inputs", str(inputs), "--result-fd", str(write),
                                      "--threads", str(os.cpu_count() or 1)],
                                     stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     pass_fds=(write,))
        os.close(write)
        self._results = os.fdopen(read)
        self.info = self._read()

    def _read(self) -> dict:
        line = self._results.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"vLLM worker exited ({self.proc.returncode}); its log: {self._log.name}")
        return json.loads(line)

    def command(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def cpu_seconds(self) -> float:
        """CPU time used so far by vLLM's processes (to check it stays idle during others' passes)."""
        try:
            import psutil
        except ImportError:
            return float("nan")
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        return sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def start_vllm(args, engine, pairs, workdir: Path) -> VLLMWorker:
    """Export the served checkpoint as SequenceClassification, write the exact token sequences
    grm-serve scores, and start vLLM on them."""
    from grmserve.training.core.checkpoint import (
        export_sequence_classification,
        load_grm,
    )

    loaded = load_grm(args.checkpoint)
    seqcls = export_sequence_classification(loaded.model, loaded.tokenizer, workdir / "seqcls")
    renderer = engine.renderer()
    seqs = []
    for prompt, response in pairs:
        g = renderer.encode(prompt, [response], max_tokens=engine.info.max_tokens)
        seqs.append(g.prompt_ids + g.response_ids[0])
    (workdir / "ids.json").write_text(json.dumps(seqs))
    return VLLMWorker(args.vllm_python, seqcls, workdir / "ids.json", workdir / "vllm.log")


def add_flops(result: dict, tokens_per_pair: float, n_linear: int, peak_bf16: float, peak: float) -> dict:
    result["tokens_per_s"] = result["pairs_per_s"] * tokens_per_pair
    # Scored tokens, a reused prefix counted in full: "effective" FLOP/s, as if nothing were shared.
    result["model_gflops_effective"] = 2 * n_linear * result["tokens_per_s"] / 1e9
    # What the model really computed (linear layers only), against the matmul peaks.
    flops = 2 * n_linear * result["computed_tokens_per_s"]
    result["model_gflops_computed"] = flops / 1e9
    result["model_flops_fraction_of_bf16_peak"] = flops / peak_bf16
    result["model_flops_fraction_of_best_matmul_peak"] = flops / peak
    return result


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
    return sum(m.weight.numel() for m in model.backbone.modules()
               if isinstance(m, torch.nn.Linear) or hasattr(m, "weight_scale"))


def candidates_vs_score(target: str, reps: int) -> dict:
    """n = 16 responses to one ~600-token prompt: one ScoreCandidates call vs 16 Score pairs.

    Every repetition uses prompts the server has not seen (a fresh first line), so the prefix
    cache never answers for them: this measures sharing inside one call, not across calls."""
    base = "Summarise the following notes.\n" + " ".join(f"note {i}: the quick brown fox jumps." for i in range(60))
    responses = [" ".join(f"word{j}{i}" for j in range(24)) for i in range(16)]
    with RewardClient(target, timeout=600) as c:
        tok_prompt = c.score_full([(base, " x")]).metadata.sequence_tokens[0]
        meta = c.score_full([(base, responses[0])]).metadata
        t_cand, t_score, t_full = [], [], []
        for r in range(reps + 1):  # the first repetition warms up and is not timed
            prompt = f"Run {r}.\n" + base
            # The same 16 pairs with nothing to share: each prompt made distinct by its first word.
            distinct = [(f"V{i} run {r}:\n" + base, resp) for i, resp in enumerate(responses)]
            t = time.perf_counter(); c.score_candidates(prompt, responses); t_cand.append(time.perf_counter() - t)
            t = time.perf_counter(); c.score([("Again " + prompt, resp) for resp in responses])
            t_score.append(time.perf_counter() - t)
            t = time.perf_counter(); c.score(distinct); t_full.append(time.perf_counter() - t)
        t_cand, t_score, t_full = t_cand[1:], t_score[1:], t_full[1:]
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
    from grmserve.training.core.checkpoint import load_grm, save_grm
    from grmserve.training.core.model import GRMModel, HeadConfig, RewardHead

    loaded = load_grm(src or default_checkpoint())
    torch.manual_seed(0)
    head = RewardHead(loaded.model.hf_config.hidden_size, HeadConfig(type="linear", bias=False, dropout=0.0))
    grm = loaded.model.grm_config
    grm.head, grm.model_name = head.config, grm.model_name + "-linear-bench"
    return save_grm(GRMModel(loaded.model.lm, head, grm), loaded.tokenizer, workdir / "linear")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="", help="checkpoint folder (default: the default model)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp8", "bf16", "fp32"])
    p.add_argument("--vllm-python", default="", help="a Python with vLLM installed: adds baseline (b)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--pairs-per-call", type=int, default=1)
    p.add_argument("--seconds", type=float, default=20.0, help="length of baseline (a)'s closed loop")
    p.add_argument("--passes", type=int, default=3, help="timed passes over the pairs per grm-serve configuration")
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
                 "model": engine.info.model_name, "concurrency": args.concurrency,
                 "pairs_per_call": args.pairs_per_call}
    peak_bf16 = matmul_peak_flops(torch.bfloat16, reps=2)
    peak_fp32 = matmul_peak_flops(torch.float32)
    peak = max(peak_bf16, peak_fp32)  # the faster dtype's peak is the honest ceiling
    out["bf16_matmul_peak_gflops"] = peak_bf16 / 1e9
    out["fp32_matmul_peak_gflops"] = peak_fp32 / 1e9
    n_linear = linear_params(engine.runner.model)

    vllm = None
    if args.vllm_python:
        try:
            vllm = start_vllm(args, engine, pairs, workdir)
        except Exception as exc:  # noqa: BLE001 - report it, keep the other numbers
            out["baseline_b_vllm_pooling"] = {"error": f"{type(exc).__name__}: {exc}"}
    naive = None
    if not args.skip_baseline:
        cfg_b = local()
        cfg_b.server.metrics_port = -1
        cfg_b.model.warmup = False
        naive = ServerThread(cfg_b, NaiveEngine(build_engine(cfg)), grace=1.0).start()
    budget = engine.runner.cache.max_bytes
    ours, ours_nc, base, theirs = [], [], [], []
    try:
        with ServerThread(cfg, engine, grace=1.0) as served:
            target = served.target
            with RewardClient(target, timeout=600) as c0:
                tokens_per_pair = statistics.mean(c0.score_full(pairs[:64]).metadata.sequence_tokens)
            # The contenders take turns, pass by pass, so that each ratio compares one stretch of
            # machine time. Each pass scores the same 512 pairs once from a cold prefix cache
            # (prompts repeated inside the pass still hit: 72 distinct prompts, as RLHF data has
            # several responses per prompt).
            idle_cpu = 0.0
            for _ in tqdm(range(args.passes), desc="passes", unit="pass"):
                cpu = vllm.cpu_seconds() if vllm is not None else 0.0
                ours.append(cold_pass(engine, target, pairs, args, budget))
                ours_nc.append(cold_pass(engine, target, pairs, args, 0))
                if naive is not None:
                    base.append(closed_loop(naive.target, pairs, args.concurrency, args.pairs_per_call, args.seconds))
                if vllm is not None:
                    idle_cpu += vllm.cpu_seconds() - cpu
                    theirs.append(vllm.command("pass")["seconds"])
                    time.sleep(3)  # vLLM's queues spin for about 1 s after work before they sleep
            out["grm_serve"] = add_flops(summarise_passes(ours, len(pairs), budget), tokens_per_pair, n_linear,
                                         peak_bf16, peak)
            out["grm_serve_no_prefix_cache"] = add_flops(summarise_passes(ours_nc, len(pairs), 0), tokens_per_pair,
                                                         n_linear, peak_bf16, peak)
            out["candidates_vs_score"] = candidates_vs_score(target, args.reps)
            if vllm is not None:
                with RewardClient(target, timeout=600) as c:
                    our_scores = torch.tensor([s for k in range(0, len(pairs), 256) for s in c.score(pairs[k:k + 256])])
    finally:
        if naive is not None:
            naive.stop()
        if vllm is not None:
            vllm_scores = torch.tensor(vllm.command("scores")["scores"]) if theirs else None
            vllm.close()
    out["tokens_per_pair_mean"] = tokens_per_pair
    ratio = statistics.median
    if base:
        out["baseline_a_transformers_per_request"] = {
            "pairs_per_s": statistics.median(b["pairs_per_s"] for b in base), "windows": base,
            "tokens_per_s": statistics.median(b["pairs_per_s"] for b in base) * tokens_per_pair}
        out["throughput_ratio_vs_baseline_a"] = ratio(len(pairs) / o["seconds"] / b["pairs_per_s"]
                                                      for o, b in zip(ours, base))
        out["throughput_ratio_vs_baseline_a_no_prefix_cache"] = ratio(len(pairs) / o["seconds"] / b["pairs_per_s"]
                                                                      for o, b in zip(ours_nc, base))
    if theirs:
        out["baseline_b_vllm_pooling"] = {**vllm.info, "seconds_per_pass": theirs,
                                          "cpu_seconds_while_idle_during_the_others_passes": idle_cpu,
                                          "pairs_per_s": len(pairs) / statistics.median(theirs),
                                          "scores_max_abs_diff_vs_grm_serve":
                                              float((our_scores - vllm_scores).abs().max()),
                                          "scores_pearson_vs_grm_serve":
                                              float(torch.corrcoef(torch.stack([our_scores, vllm_scores]))[0, 1])}
        out["throughput_ratio_vs_baseline_b"] = ratio(t / o["seconds"] for o, t in zip(ours, theirs))
        out["throughput_ratio_vs_baseline_b_no_prefix_cache"] = ratio(t / o["seconds"] for o, t in zip(ours_nc, theirs))
    out["ratios"] = "medians over passes of per-pass ratios; each pass of each contender ran back to back"

    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
