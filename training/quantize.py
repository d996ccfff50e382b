"""`grm-quantize`: write an FP8 copy of a reward-model checkpoint (any format load_grm reads).

    $ grm-quantize --src runs/my-grm --out runs/my-grm-fp8 --recipe fp8-block64
    # GPTQ + residual columns, <= 0.55x bf16
    $ grm-quantize --src runs/my-grm --out runs/my-grm-fp8 --keep_columns --recipe fp8-channel
    # GPTQ alone: plain FP8 layout
    $ grm-quantize --src runs/my-grm --out runs/my-grm-fp8 --rounding gptq --recipe fp8-channel
    # most sensitive layers kept, <= 0.55x bf16 bytes
    $ grm-quantize --src runs/my-grm --out runs/my-grm-fp8 --keep_sensitive
    # your own pairs
    $ grm-quantize --src runs/my-grm --out runs/my-grm-fp8 --keep_columns --calibration_data traffic.jsonl
    $ grm-serve --model.checkpoint runs/my-grm-fp8          # served as FP8, no start-up quantisation

`--keep_columns` (the most accurate recipe) runs calibration pairs forward and backward through the
full-precision model, ranks every input column of every FP8 layer by how far its rounding error
moves the pairs' reward margins, and stores the rounding error of the worst columns as an e4m3
residual (training/core/fp8/residuals.py), as many columns as fit in `--max_bytes_ratio`. With it the
weights are rounded by GPTQ (training/core/fp8/gptq.py, `--rounding gptq`, the default here): column by
column, each column's error pushed onto the columns not yet rounded through the calibration
inputs' Hessian, the residual columns last, so that they absorb that compensation too. Same grid,
scales and bytes as rounding to nearest.

`--keep_sensitive` scans every decoder layer, then each linear of the 6 most sensitive layers
(training/core/fp8/sensitivity.py), on calibration sequences from the bundled benchmark's train split
rendered with the checkpoint's own template, and keeps the linears whose quantisation moves the
rewards most in full precision, as many as fit in `--max_bytes_ratio` of the linear weights' bf16
size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from .core.checkpoint import CheckpointError, quantize_checkpoint, save_fp8_grm
from .core.configtools import fail, parse_command
from .core.fp8.convert import RecipeName, convert_to_fp8
from .data import DataError

Rounding = Literal["gptq", "nearest"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)


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
    or both (the default of `--keep_columns`). Returns (report, columns, residual count)."""
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


@dataclass(kw_only=True)
class QuantizeConfig:
    """Everything `grm-quantize` needs."""

    src: str
    """Checkpoint folder to quantise (any format load_grm reads)."""
    out: str
    """Folder to write (replaced atomically if it exists)."""
    recipe: RecipeName = "fp8-block64"
    """FP8 recipe (weight scale granularity)."""
    keep_columns: bool = False
    """Correct the input columns whose FP8 rounding moves reward margins most with an e4m3 residual
    (gradients on calibration pairs); the most accurate recipe."""
    keep_sensitive: bool = False
    """Keep the decoder linears most sensitive to FP8 in full precision (scanned on calibration pairs)."""
    rounding: Literal["", "gptq", "nearest"] = ""
    """gptq: round each layer's columns in turn, pushing each column's error onto the rest through the
    calibration inputs' Hessian (same grid, scales and bytes); nearest: each weight on its own.
    Empty: gptq with keep_columns, nearest otherwise."""
    max_bytes_ratio: float = 0.55
    """With keep_sensitive/keep_columns: linear-weight bytes at most this times their bf16 size."""
    calibration: int = 0
    """Calibration sequences (chosen and rejected responses) for keep_sensitive/keep_columns/gptq
    (0: 64 for keep_sensitive, else 256)."""
    calibration_data: str = ""
    """Preference pairs to calibrate on instead of the bundled train split (any file or folder the
    trainer reads): pairs like the traffic the model will serve."""

    def validate(self) -> "QuantizeConfig":
        """Raise ValueError naming the flags that do not go together; resolve the default rounding."""
        if self.keep_sensitive and self.keep_columns:
            raise ValueError("--keep_sensitive and --keep_columns are two recipes; pick one")
        self.rounding = self.rounding or ("gptq" if self.keep_columns else "nearest")
        if self.calibration_data and not (self.keep_columns or self.keep_sensitive or self.rounding == "gptq"):
            raise ValueError("--calibration_data needs a calibrated recipe: --keep_columns, --keep_sensitive or "
                             "--rounding gptq")
        if self.keep_sensitive and self.rounding == "gptq":
            raise ValueError("--rounding gptq works alone or with --keep_columns, not with --keep_sensitive")
        return self


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command(QuantizeConfig, argv, prog="grm-quantize", description=__doc__.split("\n\n")[0])
    try:
        report = quantize(cfg.validate())
    except (CheckpointError, DataError, ValueError) as exc:
        return fail("grm-quantize", exc)
    print(report.summary())
    print(cfg.out)
    return 0


def quantize(cfg: QuantizeConfig):
    """Run the recipe `cfg` names; print what calibration chose; return the conversion report."""
    data = cfg.calibration_data or None
    if cfg.keep_columns or cfg.rounding == "gptq":
        report, columns, count = quantize_calibrated(
            cfg.src, cfg.out, cfg.recipe, residual_columns=cfg.keep_columns, rounding=cfg.rounding,
            max_bytes_ratio=cfg.max_bytes_ratio, calibration=cfg.calibration or 256, calibration_data=data)
        print(json.dumps({"rounding": cfg.rounding, "residual_columns": count, "layers_with_residuals": len(columns)}))
        return report
    if cfg.keep_sensitive:
        report, scan, keep = quantize_keeping_sensitive(cfg.src, cfg.out, cfg.recipe,
                                                        max_bytes_ratio=cfg.max_bytes_ratio,
                                                        calibration=cfg.calibration or 64, calibration_data=data)
        worst = sorted(scan, key=lambda s: -s.error)[:8]
        print(json.dumps({"kept": keep, "most_sensitive": [{"module": s.prefix, "error": round(s.error, 5)}
                                                           for s in worst]}))
        return report
    return quantize_checkpoint(cfg.src, cfg.out, cfg.recipe)


if __name__ == "__main__":
    raise SystemExit(main())
