"""bench/fp8_keep_columns: which full-precision part of an FP8 model buys the most accuracy. Prints JSON.

An emulation, for choosing a recipe. It led to the shipped one, residual columns ranked by the
score gradient (training/core/fp8/residuals.py, `grm-quantize --keep_columns`; measure that with
`bench/fp8_accuracy.py file:<checkpoint>`); this bench keeps the output-error ranking. Every decoder linear of the fp32
model is rounded to e4m3 with per-channel scales and dequantised (fake quantisation: the same
numbers the CPU FP8 path multiplies with), then a part of the weights is put back in bf16 within
the issue's byte budget (linear weights ≤ 0.55× their bf16 size: 1 byte per weight + scales, and
what is left for bf16 copies). Variants:

- `none`: nothing kept;
- `linears`: whole linears kept (default: the 21 that `grm-quantize --keep_sensitive` chose for
  the default model, the shipped recipe);
- `columns`: input columns kept, across all linears, ranked by the rounding error they let
  through, ||ΔW[:, j]||² · E[x_j²] (E over calibration activations), per byte (LLM.int8's outlier
  features, applied to weight rounding);
- `rows`: output channels kept, ranked by Σ_j ΔW[i, j]² · E[x_j²] per byte.

Each is compared with the fp32 model on held-out test_id pairs: preference agreement, Pearson of
scores, and the rms error of pair margins (chosen − rejected) over their std (`margin_err`, the
continuous quantity behind agreement).

    python bench/fp8_keep_columns.py --pairs 100
    python bench/fp8_keep_columns.py --pairs 500 --variants linears columns
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fp8_accuracy import score_all  # noqa: E402

from grmserve.server.engine.runner import ModelRunner  # noqa: E402
from grmserve.training.benchmark import load_split  # noqa: E402
from grmserve.training.core.checkpoint import load_grm  # noqa: E402
from grmserve.training.core.fp8.formats import dequantize, quantize_per_channel  # noqa: E402
from grmserve.training.core.prompts import PromptRenderer  # noqa: E402
from grmserve.training.data import encode_pairs, read_pairs  # noqa: E402
from grmserve.training.quantize import calibration_sequences  # noqa: E402

DEFAULT_KEEP = [f"model.layers.{n}" for n in (
    "0.self_attn.o_proj", "23.self_attn.k_proj", "1.self_attn.v_proj", "2.mlp.down_proj", "0.mlp.up_proj",
    "11.mlp.down_proj", "0.self_attn.v_proj", "23.self_attn.o_proj", "0.mlp.gate_proj", "22.mlp.up_proj",
    "23.self_attn.q_proj", "11.mlp.gate_proj", "1.self_attn.o_proj", "23.self_attn.v_proj", "23.mlp.up_proj",
    "2.self_attn.v_proj", "0.mlp.down_proj", "1.self_attn.q_proj", "1.self_attn.k_proj", "22.self_attn.q_proj",
    "0.self_attn.k_proj")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="")
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--calibration", type=int, default=24, help="train-split sequences for activation statistics")
    p.add_argument("--max-bytes-ratio", type=float, default=0.55)
    p.add_argument("--keep-linears", nargs="*", default=DEFAULT_KEEP)
    p.add_argument("--variants", nargs="+", default=["none", "linears", "columns", "rows"],
                   choices=["none", "linears", "columns", "rows"])
    args = p.parse_args(argv)
    if not args.checkpoint:
        from grmserve.server.app import default_checkpoint

        args.checkpoint = str(default_checkpoint())
    loaded = load_grm(args.checkpoint, dtype=torch.float32)
    model, tok = loaded.model.eval(), loaded.tokenizer
    pairs, report = read_pairs(load_split("test_id"), limit=args.pairs)
    seqs = [e.prompt_ids + r for e in encode_pairs(pairs, PromptRenderer(tok), report, max_tokens=2048)
            for r in (e.chosen_ids, e.rejected_ids)]
    runner = ModelRunner(model, pad_id=tok.pad_token_id, packed=False)
    start = time.perf_counter()
    ref = torch.tensor(score_all(runner, seqs, 8192))
    seconds_per_variant = time.perf_counter() - start

    linears = {n: m for n, m in model.lm.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    orig = {n: m.weight.data.clone() for n, m in linears.items()}
    power = {n: torch.zeros(m.in_features) for n, m in linears.items()}  # Σ x_j² over calibration tokens

    def accumulate(name):
        def hook(_module, inputs):
            power[name].add_(inputs[0].reshape(-1, inputs[0].shape[-1]).pow(2).sum(0))
        return hook

    hooks = [m.register_forward_pre_hook(accumulate(n)) for n, m in linears.items()]
    with torch.inference_mode():
        for s in calibration_sequences(tok, args.calibration, 512):
            runner.score_rows([s])
    for h in hooks:
        h.remove()
    total = sum(w.numel() for w in orig.values())
    # bytes beyond 1 per weight and the per-channel float32 scales
    extra = (args.max_bytes_ratio * 2 - 1) * total - sum(4 * w.shape[0] for w in orig.values())
    rounded = {n: dequantize(*quantize_per_channel(w)) for n, w in orig.items()}
    bf16 = {n: w.to(torch.bfloat16).float() for n, w in orig.items()}

    def pick(by: str) -> dict[str, list[int]]:
        ranked = []
        for n, w in orig.items():
            err = (rounded[n] - w).pow(2)
            if by == "columns":
                gain, cost = err.sum(0) * power[n], 2 * w.shape[0]
            else:
                gain, cost = (err * power[n]).sum(1), 2 * w.shape[1]
            ranked += [(float(g) / cost, n, j, cost) for j, g in enumerate(gain)]
        ranked.sort(reverse=True)
        chosen: dict[str, list[int]] = {}
        used = 0
        for _, n, j, cost in ranked:
            if used + cost > extra:
                break
            chosen.setdefault(n, []).append(j)
            used += cost
        return chosen

    def run(keep_linears=(), columns=None, rows=None) -> dict:
        used = 0
        for n, m in linears.items():
            w = rounded[n].clone()
            if n in keep_linears:
                w, used = bf16[n].clone(), used + w.numel()  # 1 more byte per weight
            for j in (columns or {}).get(n, []):
                w[:, j] = bf16[n][:, j]
                used += 2 * w.shape[0]
            for i in (rows or {}).get(n, []):
                w[i, :] = bf16[n][i, :]
                used += 2 * w.shape[1]
            m.weight.data.copy_(w)
        s = torch.tensor(score_all(runner, seqs, 8192))
        margin, ref_margin = s[0::2] - s[1::2], ref[0::2] - ref[1::2]
        return {"agreement": float(((margin > 0) == (ref_margin > 0)).float().mean()),
                "pearson": float(torch.corrcoef(torch.stack([s, ref]))[0, 1]),
                "margin_err": float((margin - ref_margin).pow(2).mean().sqrt() / ref_margin.std()),
                "extra_bytes_used": used / extra}

    variants = {"none": lambda: run(), "linears": lambda: run(keep_linears=set(args.keep_linears)),
                "columns": lambda: run(columns=pick("columns")), "rows": lambda: run(rows=pick("rows"))}
    out = {"checkpoint": args.checkpoint, "pairs": len(pairs), "tokens": sum(map(len, seqs)),
           "seconds_per_variant": seconds_per_variant, "extra_bytes_budget": extra}
    for name in args.variants:
        out[name] = variants[name]()
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
