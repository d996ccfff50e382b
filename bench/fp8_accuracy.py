"""bench/fp8_accuracy: what FP8 serving costs in reward accuracy and gains in bytes and speed. Prints JSON.

Scores a held-out preference set (default: the first 520 pairs of the bundled benchmark's test_id
split, which no model here was trained on) with the same checkpoint at several precisions,
through the server's own ModelRunner and batch planner, and compares each with the reference:

- pairwise preference agreement with the reference, preference accuracy, Pearson correlation of
  scores;
- bytes of the decoder's linear weights (FP8 weights + scales vs the reference dtype);
- sequences/s over the whole set (median of `--reps` passes) and its ratio to the reference.

The reference is fp32 unless `--reference bf16`; on CPUs without native bf16 a bf16 pass is ~100x
slower than fp32 and is left out unless asked for. `bf16-weights` is the fp32 model with its decoder's
linear weights rounded to bf16: a bf16 checkpoint's weights at fp32 speed (no bf16 activation rounding).

    python bench/fp8_accuracy.py                                # default model, fp32 vs fp8-block64 / fp8-channel
    python bench/fp8_accuracy.py --checkpoint runs/x --precisions fp32 bf16 fp8-block64 --reference bf16
    python bench/fp8_accuracy.py --precisions fp32 fp8-block64 file:runs/default-fp8-keep   # an FP8 checkpoint
                                                                   # written by grm-quantize (same source model)
    python bench/fp8_accuracy.py --pairs 500 --precisions fp32 bf16-weights file:runs/default-fp8-columns \
        --reference bf16-weights --reps 1                          # agreement with bf16 weights, at fp32 speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from grmserve.server.engine.runner import ModelRunner, prepare_model
from grmserve.training.benchmark import load_split
from grmserve.training.core.batching import plan_batches
from grmserve.training.core.checkpoint import load_grm
from grmserve.training.core.prompts import PromptRenderer
from grmserve.training.data import encode_pairs, read_pairs


def bf16_equivalent_bytes(model) -> int:
    """Decoder linear weights as a bf16 deployment stores them: FP8 weights 1 byte + their scales and
    residual columns, every other linear 2 bytes (on this CPU those are held in fp32 for speed, which
    would double them)."""
    total = 0
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * 2
        elif hasattr(m, "storage_bytes"):  # FP8InferenceLinear: weight, scales, residual columns
            total += m.storage_bytes()
    return total


def linear_bytes(model) -> int:
    total = 0
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "storage_bytes"):  # FP8InferenceLinear: weight, scales, residual columns
            total += m.storage_bytes()
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
    p.add_argument("--split", default="test_id", help="bundled benchmark split to score")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp8-block64", "fp8-channel"])
    p.add_argument("--reference", default="fp32")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--save-scores", default="", help="also save every precision's scores (torch.save) to this path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if not args.checkpoint:
        from grmserve.server.app import default_checkpoint

        args.checkpoint = str(default_checkpoint())

    pairs, report = read_pairs(load_split(args.split), limit=args.pairs)
    tok = load_grm(args.checkpoint, load_tokenizer=True).tokenizer
    rows = encode_pairs(pairs, PromptRenderer(tok), report, max_tokens=2048)
    seqs = [e.prompt_ids + r for e in rows for r in (e.chosen_ids, e.rejected_ids)]
    results, scores = {}, {}
    for name in args.precisions:
        path = args.checkpoint
        if name.startswith("file:"):  # an FP8 checkpoint: served as FP8 whatever precision is asked
            path, precision, recipe = name[5:], "fp8", "fp8-block64"
        elif name == "bf16-weights":
            precision, recipe = "fp32", "fp8-block64"
        else:
            precision, recipe = ("fp8", name) if name.startswith("fp8") else (name, "fp8-block64")
        model = load_grm(path, load_tokenizer=False).model
        prepare_model(model, precision, torch.device("cpu"), recipe)
        if name == "bf16-weights":
            with torch.no_grad():
                for m in model.backbone.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.copy_(m.weight.to(torch.bfloat16).float())
        runner = ModelRunner(model, pad_id=tok.pad_token_id)
        score_all(runner, seqs[:16], args.batch_tokens)  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            s = score_all(runner, seqs, args.batch_tokens)
            times.append(time.perf_counter() - t)
        scores[name] = torch.tensor(s)
        results[name] = {"linear_weight_bytes": linear_bytes(model),
                         "bf16_equivalent_bytes": bf16_equivalent_bytes(model),
                         "seconds_median": statistics.median(times),
                         "sequences_per_s": len(seqs) / statistics.median(times)}
        print(f"{name}: {results[name]}", file=sys.stderr)
    ref = scores[args.reference]
    ref_pref, ref_margin = ref[0::2] > ref[1::2], ref[0::2] - ref[1::2]
    for name, s in scores.items():
        pref, margin = s[0::2] > s[1::2], s[0::2] - s[1::2]
        results[name].update({
            "accuracy": float(pref.float().mean()),
            "agreement_with_reference": float((pref == ref_pref).float().mean()),
            "flips_vs_reference": int((pref != ref_pref).sum()),
            # rms error of (chosen - rejected) over the spread of the reference's margins: the
            # continuous quantity behind agreement (flips are few and noisy)
            "margin_error_vs_reference": float((margin - ref_margin).pow(2).mean().sqrt() / ref_margin.std()),
            "pearson_with_reference": float(torch.corrcoef(torch.stack([s, ref]))[0, 1]),
            "bytes_ratio_vs_reference":
                results[name]["linear_weight_bytes"] / results[args.reference]["linear_weight_bytes"],
            "bytes_ratio_vs_bf16":
                results[name]["bf16_equivalent_bytes"] / results[args.reference]["bf16_equivalent_bytes"],
            "throughput_ratio_vs_reference":
                results[name]["sequences_per_s"] / results[args.reference]["sequences_per_s"],
        })
    out = {"checkpoint": args.checkpoint, "pairs": len(rows), "sequences": len(seqs), "reference": args.reference,
           "tokens_mean": statistics.mean(map(len, seqs)), "cpus": os.cpu_count(),
           "bf16_fast": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "results": results}
    if args.save_scores:
        torch.save({"scores": scores, "sequences": seqs}, args.save_scores)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
