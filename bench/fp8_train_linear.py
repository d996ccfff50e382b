"""One training step (forward + backward) of `nn.Linear` vs `FP8TrainingLinear` (emulated backend) on
CPU, per recipe, eager and fused (torch.compile'd quantise/dequantise), plus the SQNR of forward,
dgrad and wgrad against fp32. Prints one JSON object; not a test.

    $ .venv/bin/python bench/fp8_train_linear.py --tokens 512 --runs 15

Timings are medians of `--runs` steps after warm-up, interleaved across variants (one step of each
per round) so that load from other processes on a shared machine hits all alike; ratios are against
fp32 `nn.Linear`. The fused variants compile on their first call (~20 s each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import cpu_model

from grmserve.training.core.fp8.formats import sqnr_db
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear, default_compute_dtype


def _step(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    module.zero_grad(set_to_none=True)
    xr = x.detach().requires_grad_(True)
    y = module(xr)
    y.backward(g)
    return y.detach(), xr.grad, module.weight.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--out-features", type=int, default=1536)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["delayed", "current", "block"])
    ap.add_argument("--no-fused", action="store_true", help="skip the torch.compile'd variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, n = args.in_features, args.out_features
    x, g = torch.randn(args.tokens, k), torch.randn(args.tokens, n)
    ref = torch.nn.Linear(k, n)
    variants: dict[str, torch.nn.Module] = {"fp32_nn_linear": ref}
    cdts = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for recipe in args.recipes:
        for cname, cdt in cdts.items():
            for fused in ([False] if args.no_fused else [False, True]):
                lin = torch.nn.Linear(k, n)
                lin.load_state_dict(ref.state_dict())
                name = f"fp8_{recipe}_{cname}{'_fused' if fused else ''}"
                variants[name] = FP8TrainingLinear.from_linear(lin, recipe=recipe, backend="emulated",
                                                               compute_dtype=cdt, fuse=fused)
    for m in variants.values():
        for _ in range(args.warmup):
            _step(m, x, g)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, m in variants.items():
            t0 = time.perf_counter()
            _step(m, x, g)
            times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    out_ref = _step(ref, x, g)
    sqnr = {}
    for name, m in variants.items():
        if name != "fp32_nn_linear":
            out = _step(m, x, g)
            sqnr[name] = {p: round(sqnr_db(a, b), 2) for p, a, b in zip(("forward", "dgrad", "wgrad"), out_ref, out)}
    print(json.dumps({
        "cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
        "default_compute_dtype": str(default_compute_dtype("cpu")),
        "shape": {"tokens": args.tokens, "in": k, "out": n}, "runs": args.runs,
        "step_ms": {k_: round(v, 2) for k_, v in ms.items()},
        "ratio_vs_fp32": {k_: round(v / ms["fp32_nn_linear"], 2) for k_, v in ms.items()},
        "sqnr_db_vs_fp32": sqnr,
    }, indent=1))


if __name__ == "__main__":
    main()
