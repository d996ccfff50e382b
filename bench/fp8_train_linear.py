"""One training step (forward + backward) of `nn.Linear` vs `FP8TrainingLinear` (emulated backend) on
CPU, per recipe, eager and fused (torch.compile'd quantise/dequantise), plus the SQNR of forward,
dgrad and wgrad against fp32. Prints one JSON object; not a test.

    $ .venv/bin/python bench/fp8_train_linear.py --tokens 512 --runs 15
    $ python bench/fp8_train_linear.py --device cuda --tokens 8192 --in-features 4096 --out-features 4096

On CUDA the FP8 variants run `torch._scaled_mm` and the baseline is bf16 `nn.Linear`; each timed
step ends with a device synchronisation.

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
    dtype = module.weight.dtype if module.weight.dtype == torch.bfloat16 else x.dtype
    xr = x.detach().to(dtype).requires_grad_(True)
    y = module(xr)
    y.backward(g.to(y.dtype))
    if x.is_cuda:
        torch.cuda.synchronize()
    return y.detach(), xr.grad, module.weight.grad


def _on_cpu(outputs):
    return [t.float().cpu() for t in outputs]


def _copy(lin: torch.nn.Linear) -> torch.nn.Linear:
    new = torch.nn.Linear(lin.in_features, lin.out_features, device=lin.weight.device)
    new.load_state_dict(lin.state_dict())
    return new


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
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    k, n = args.in_features, args.out_features
    x, g = torch.randn(args.tokens, k, device=device), torch.randn(args.tokens, n, device=device)
    ref = torch.nn.Linear(k, n).to(device)
    variants: dict[str, torch.nn.Module] = {"fp32_nn_linear": ref}
    if device.type == "cuda":
        variants["bf16_nn_linear"] = _copy(ref).to(torch.bfloat16)
        gemms = {"scaled_mm": ("scaled_mm", None)}
    else:
        gemms = {"fp32": ("emulated", torch.float32), "bf16": ("emulated", torch.bfloat16)}
    for recipe in args.recipes:
        for gname, (backend, cdt) in gemms.items():
            for fused in ([False] if args.no_fused else [False, True]):
                name = f"fp8_{recipe}_{gname}{'_fused' if fused else ''}"
                variants[name] = FP8TrainingLinear.from_linear(_copy(ref), recipe=recipe, backend=backend,
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
    out_ref = _on_cpu(_step(ref, x, g))
    sqnr = {}
    for name, m in variants.items():
        if name != "fp32_nn_linear":
            out = _on_cpu(_step(m, x, g))
            sqnr[name] = {p: round(sqnr_db(a, b), 2) for p, a, b in zip(("forward", "dgrad", "wgrad"), out_ref, out)}
    base = "bf16_nn_linear" if device.type == "cuda" else "fp32_nn_linear"
    print(json.dumps({
        "cpu": cpu_model(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "torch": torch.__version__,
        "default_compute_dtype": str(default_compute_dtype("cpu")),
        "shape": {"tokens": args.tokens, "in": k, "out": n}, "runs": args.runs,
        "step_ms": {k_: round(v, 2) for k_, v in ms.items()},
        f"ratio_vs_{base.split('_')[0]}": {k_: round(v / ms[base], 2) for k_, v in ms.items()},
        "sqnr_db_vs_fp32": sqnr,
    }, indent=1))


if __name__ == "__main__":
    main()
