"""`grm-quantize`: write an FP8 copy of a reward-model checkpoint (any format load_grm reads).

    $ grm-quantize runs/my-grm runs/my-grm-fp8 --recipe fp8-block64
    $ grm-quantize runs/my-grm runs/my-grm-fp8 --keep-columns --recipe fp8-channel   # GPTQ + residual columns, <= 0.55x bf16
    $ grm-quantize runs/my-grm runs/my-grm-fp8 --rounding gptq --recipe fp8-channel  # GPTQ alone: plain FP8 layout
    $ grm-quantize runs/my-grm runs/my-grm-fp8 --keep-sensitive          # most sensitive layers kept, <= 0.55x bf16 bytes
    $ grm-quantize runs/my-grm runs/my-grm-fp8 --keep-columns --calibration-data traffic.jsonl  # your own pairs
    $ grm-serve --model.checkpoint runs/my-grm-fp8          # served as FP8, no start-up quantisation

`--keep-columns` (the most accurate recipe) runs calibration pairs forward and backward through the
full-precision model, ranks every input column of every FP8 layer by how far its rounding error
moves the pairs' reward margins, and stores the rounding error of the worst columns as an e4m3
residual (training/fp8/residuals.py), as many columns as fit in `--max-bytes-ratio`. With it the
weights are rounded by GPTQ (training/fp8/gptq.py, `--rounding gptq`, the default here): column by
column, each column's error pushed onto the columns not yet rounded through the calibration
inputs' Hessian, the residual columns last, so that they absorb that compensation too. Same grid,
scales and bytes as rounding to nearest.

`--keep-sensitive` scans every decoder layer, then each linear of the 6 most sensitive layers
(training/fp8/sensitivity.py), on calibration sequences from the bundled benchmark's train split
rendered with the checkpoint's own template, and keeps the linears whose quantisation moves the
rewards most in full precision, as many as fit in `--max-bytes-ratio` of the linear weights' bf16
size.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .core.checkpoint import CheckpointError, quantize_checkpoint, save_fp8_grm
from .core.fp8.convert import RECIPES, convert_to_fp8
from .data import DataError

ROUNDINGS = ("gptq", "nearest")


def calibration_sequences(tokenizer, count: int, max_tokens: int, data=None) -> list[list[int]]:
    """`count` token sequences (chosen and rejected responses, alternating) from the preference
    pairs in `data` (any file or folder the trainer reads), by default the benchmark's train split."""
    from .benchmark import load_split
    from .core.prompts import PromptRenderer
    from .data import encode_pairs, read_pairs

    source = data if data is not None else load_split("train")
    pairs, report = read_pairs(source, limit=(count + 1) // 2)
    enc = encode_pairs(pairs, PromptRenderer(tokenizer), report, max_tokens=max_tokens)
    if not enc:
        raise DataError(f"{source}: no usable preference pairs for calibration ({report.summary()})")
    return [e.prompt_ids + r for e in enc for r in (e.chosen_ids, e.rejected_ids)][:count]


def quantize_keeping_sensitive(src, out, recipe: str, *, max_bytes_ratio: float, calibration: int,
                               refine_layers: int = 6, calibration_data=None):
    from .core.checkpoint import load_grm
    from .core.fp8.sensitivity import pick_keep, recipe_with_keep, scan_layers

    loaded = load_grm(src, dtype=torch.float32)
    model = loaded.model.eval()
    seqs = calibration_sequences(loaded.tokenizer, calibration, min(512, model.grm_config.max_tokens),
                                calibration_data)
    # Two stages: every layer, then each linear of the most sensitive layers (a few linears usually
    # carry most of the error, and keeping a linear costs far fewer bytes than keeping a layer).
    layers = scan_layers(model, seqs, recipe, pad_id=loaded.tokenizer.pad_token_id)
    worst = [s.layer for s in sorted(layers, key=lambda s: -s.error)[:refine_layers]]
    scan = scan_layers(model, seqs, recipe, pad_id=loaded.tokenizer.pad_token_id, linears_of=worst)
    keep = pick_keep(scan, model, recipe, max_bytes_ratio=max_bytes_ratio)
    report = convert_to_fp8(model, recipe_with_keep(recipe, keep))
    model.grm_config.quantization["kept_sensitive"] = keep
    save_fp8_grm(model, loaded.tokenizer, out)
    return report, scan, keep


def quantize_calibrated(src, out, recipe: str, *, residual_columns: bool, rounding: str, max_bytes_ratio: float,
                        calibration: int, damp: float = 0.01, calibration_data=None):
    """FP8 with calibration: residual columns (`residual_columns`), GPTQ rounding (`rounding="gptq"`),
    or both (the default of `--keep-columns`). Returns (report, columns, residual count)."""
    from .core.checkpoint import load_grm
    from .core.fp8.convert import _linear_bytes, get_recipe
    from .core.fp8.gptq import gptq_requantize, input_hessians
    from .core.fp8.residuals import (
        add_residual_columns,
        column_sensitivity,
        convertible_linears,
        pick_columns,
    )

    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
    recipe = get_recipe(recipe)
    loaded = load_grm(src, dtype=torch.float32)
    model, pad_id = loaded.model.eval(), loaded.tokenizer.pad_token_id
    seqs = calibration_sequences(loaded.tokenizer, calibration, min(512, model.grm_config.max_tokens),
                                calibration_data)
    columns: dict[str, list[int]] = {}
    if residual_columns:
        gains = column_sensitivity(model, seqs[:len(seqs) // 2 * 2], recipe, pad_id=pad_id)
        columns = pick_columns(gains, model, recipe, max_bytes_ratio=max_bytes_ratio)
    linears = convertible_linears(model, recipe)
    weights = {n: m.weight.detach().to(torch.float32).clone() for n, m in linears.items()}
    if rounding == "gptq":
        hessians, tokens = input_hessians(model, seqs, linears, pad_id=pad_id)
    report = convert_to_fp8(model, recipe)
    if rounding == "gptq":
        count = gptq_requantize(model, weights, hessians, columns, damp=damp, tokens=tokens)
    else:
        count = add_residual_columns(model, columns, weights)
    report.linear_bytes_after = _linear_bytes(model)
    model.grm_config.quantization["calibration"] = {
        "data": str(calibration_data) if calibration_data is not None else "bundled benchmark: train",
        "sequences": len(seqs)}
    save_fp8_grm(model, loaded.tokenizer, out)
    return report, columns, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grm-quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint folder to quantise")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--recipe", default="fp8-block64", choices=sorted(RECIPES), help="FP8 recipe")
    parser.add_argument("--keep-sensitive", action="store_true",
                        help="keep the decoder layers most sensitive to FP8 in full precision (scanned on calibration pairs)")
    parser.add_argument("--keep-columns", action="store_true",
                        help="correct the input columns whose FP8 rounding moves reward margins most with an e4m3 "
                             "residual (gradients on calibration pairs); the most accurate recipe")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None,
                        help="gptq: round each layer's columns in turn, pushing each column's error onto the rest "
                             "through the calibration inputs' Hessian (same grid, scales and bytes); nearest: "
                             "each weight on its own. Default gptq with --keep-columns, nearest otherwise")
    parser.add_argument("--max-bytes-ratio", type=float, default=0.55,
                        help="with --keep-sensitive/--keep-columns: linear-weight bytes at most this times their bf16 size")
    parser.add_argument("--calibration", type=int, default=None,
                        help="with --keep-sensitive/--keep-columns/--rounding gptq: calibration sequences (chosen and "
                             "rejected responses) from the bundled benchmark's train split (default 64 / 256)")
    parser.add_argument("--calibration-data", default=None, metavar="PATH",
                        help="preference pairs to calibrate on instead of the bundled train split (any file or "
                             "folder the trainer reads): pairs like the traffic the model will serve")
    args = parser.parse_args(argv)
    if args.keep_sensitive and args.keep_columns:
        parser.error("--keep-sensitive and --keep-columns are two recipes; pick one")
    rounding = args.rounding or ("gptq" if args.keep_columns else "nearest")
    if args.calibration_data and not (args.keep_columns or args.keep_sensitive or rounding == "gptq"):
        parser.error("--calibration-data needs a calibrated recipe: --keep-columns, --keep-sensitive or --rounding gptq")
    if args.keep_sensitive and rounding == "gptq":
        parser.error("--rounding gptq works alone or with --keep-columns, not with --keep-sensitive")
    try:
        if args.keep_columns or rounding == "gptq":
            report, columns, count = quantize_calibrated(
                args.src, args.out, args.recipe, residual_columns=args.keep_columns, rounding=rounding,
                max_bytes_ratio=args.max_bytes_ratio, calibration=args.calibration or 256,
                calibration_data=args.calibration_data)
            print(json.dumps({"rounding": rounding, "residual_columns": count, "layers_with_residuals": len(columns)}))
        elif args.keep_sensitive:
            report, scan, keep = quantize_keeping_sensitive(args.src, args.out, args.recipe,
                                                            max_bytes_ratio=args.max_bytes_ratio,
                                                            calibration=args.calibration or 64,
                                                            calibration_data=args.calibration_data)
            worst = sorted(scan, key=lambda s: -s.error)[:8]
            print(json.dumps({"kept": keep, "most_sensitive": [{"module": s.prefix, "error": round(s.error, 5)}
                                                               for s in worst]}))
        else:
            report = quantize_checkpoint(args.src, args.out, args.recipe)
    except (CheckpointError, DataError) as exc:
        print(f"grm-quantize: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
