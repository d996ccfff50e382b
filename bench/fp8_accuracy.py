"""bench/fp8_accuracy: what FP8 serving costs in reward accuracy and gains in bytes and speed. Prints JSON.

Scores a held-out preference set (default 520 pairs from training/synthetic_prefs.py with a seed
the default model was not trained on, all topics) with the same checkpoint at several precisions,
through the server's own ModelRunner and batch planner, and compares each with the reference:

- pairwise preference agreement with the reference, preference accuracy, Pearson correlation of
  scores;
- bytes of the decoder's linear weights (FP8 weights + scales vs the reference dtype);
- sequences/s over the whole set (median of `--reps` passes) and its ratio to the reference.

The reference is fp32 unless `--reference bf16`; on CPUs without native bf16 a bf16 pass is ~100x
slower than fp32 and is left out unless asked for.

    python bench/fp8_accuracy.py                                # default model, fp32 vs fp8-block64 / fp8-channel
    python bench/fp8_accuracy.py --checkpoint runs/x --precisions fp32 bf16 fp8-block64 --reference bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from grmserve.server.engine.batcher import plan_batches
from grmserve.server.engine.runner import ModelRunner, prepare_model
from grmserve.training.model import load_grm
from grmserve.training.synthetic_prefs import make_pairs
from grmserve.training.templates import PromptRenderer


def linear_bytes(model) -> int:
    total = 0
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "weight_scale"):
            total += m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * m.weight_scale.element_size()
    return total


def score_all(runner: ModelRunner, seqs: list[list[int]], max_tokens: int) -> list[float]:
    scores = [0.0] * len(seqs)
    for batch in plan_batches([len(s) for s in seqs], max_tokens, 64):
        out, _ = runner.score_rows([seqs[i] for i in batch])
        for i, s in zip(batch, out):
            scores[i] = s
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="")
    p.add_argument("--pairs", type=int, default=520)
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp8-block64", "fp8-channel"])
    p.add_argument("--reference", default="fp32")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if not args.checkpoint:
        from grmserve.server.app import default_checkpoint

        args.checkpoint = str(default_checkpoint())

    rows = make_pairs(args.pairs, seed=1234)
    tok = load_grm(args.checkpoint, load_tokenizer=True).tokenizer
    renderer = PromptRenderer(tok)
    seqs = []
    for r in rows:
        g = renderer.encode(r["prompt"], [r["chosen"], r["rejected"]], max_tokens=2048)
        seqs += [g.prompt_ids + x for x in g.response_ids]
    results, scores = {}, {}
    for name in args.precisions:
        precision, recipe = ("fp8", name) if name.startswith("fp8") else (name, "fp8-block64")
        model = load_grm(args.checkpoint, load_tokenizer=False).model
        prepare_model(model, precision, torch.device("cpu"), recipe)
        runner = ModelRunner(model, pad_id=tok.pad_token_id)
        score_all(runner, seqs[:16], args.batch_tokens)  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            s = score_all(runner, seqs, args.batch_tokens)
            times.append(time.perf_counter() - t)
        scores[name] = torch.tensor(s)
        results[name] = {"linear_weight_bytes": linear_bytes(model), "seconds_median": statistics.median(times),
                         "sequences_per_s": len(seqs) / statistics.median(times)}
        print(f"{name}: {results[name]}", file=sys.stderr)
    ref = scores[args.reference]
    ref_pref = ref[0::2] > ref[1::2]
    for name, s in scores.items():
        pref = s[0::2] > s[1::2]
        results[name].update({
            "accuracy": float(pref.float().mean()),
            "agreement_with_reference": float((pref == ref_pref).float().mean()),
            "pearson_with_reference": float(torch.corrcoef(torch.stack([s, ref]))[0, 1]),
            "bytes_ratio_vs_reference": results[name]["linear_weight_bytes"] / results[args.reference]["linear_weight_bytes"],
            "throughput_ratio_vs_reference": results[name]["sequences_per_s"] / results[args.reference]["sequences_per_s"],
        })
    out = {"checkpoint": args.checkpoint, "pairs": len(rows), "sequences": len(seqs), "reference": args.reference,
           "tokens_mean": statistics.mean(map(len, seqs)), "cpus": os.cpu_count(),
           "bf16_fast": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "results": results}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
