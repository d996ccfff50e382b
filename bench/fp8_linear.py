"""Per-layer CPU time of a bf16 `nn.Linear` vs `FP8InferenceLinear` (emulated backend), eager and
under `torch.compile`, for SmolLM2-135M's linear shapes. Prints one JSON object; not a test.

    $ .venv/bin/python bench/fp8_linear.py --tokens 512 --runs 30

Each timing is the median of `--runs` calls after warm-up, interleaved across variants; ratios are
against bf16 eager (and, for compiled rows, against compiled bf16). `*_dequant_*` rows time the
weight dequantisation alone (what FP8 storage adds before the matmul), also as ns per weight.
`fp32_eager` is for reference (on CPUs without AMX/AVX512-BF16 a bf16 matmul is no faster).
Optional `--scaled-mm` adds the W8A8 `torch._scaled_mm` path (~100x slower than bf16 on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from grmserve.training.core.fp8.formats import sqnr_db
from grmserve.training.core.fp8.linear import FP8InferenceLinear

# (in_features, out_features) of SmolLM2-135M (hidden 576, MLP 1536, 3 KV heads x 64).
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192)]


def interleaved_medians(fns: dict, x: torch.Tensor, runs: int, warmup: int) -> dict[str, float]:
    """Median ms per callable. Runs are interleaved (one call of each per round) so that load from
    other processes on a shared machine hits every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_shape(in_f: int, out_f: int, args) -> dict:
    torch.manual_seed(0)
    ref = torch.nn.Linear(in_f, out_f, bias=False)
    bf16 = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    bf16.load_state_dict({"weight": ref.weight.detach().to(torch.bfloat16)})
    x = torch.randn(args.tokens, in_f, dtype=torch.bfloat16)
    block = f"fp8_block{args.block_size}"
    layers = {"bf16": bf16, "fp8_channel": FP8InferenceLinear.from_linear(ref, "channel"),
              block: FP8InferenceLinear.from_linear(ref, "block", args.block_size)}
    fns = {"fp32_eager": lambda x: ref(x.float())}
    for name, module in layers.items():
        fns[f"{name}_eager"] = module.eval()
        if not args.no_compile:
            fns[f"{name}_compiled"] = torch.compile(module, dynamic=False)
        if name != "bf16":  # the weight dequantisation alone (what FP8 adds before the matmul)
            fns[f"{name}_dequant_eager"] = lambda x, m=module: m.dequantized_weight(torch.bfloat16)
            if not args.no_compile:
                fns[f"{name}_dequant_compiled"] = torch.compile(
                    lambda x, m=module: m.dequantized_weight(torch.bfloat16), dynamic=False)
    if args.scaled_mm:
        fns["fp8_channel_scaled_mm"] = FP8InferenceLinear.from_linear(ref, "channel", backend="scaled_mm")
    ms = interleaved_medians(fns, x, args.runs, args.warmup)

    row: dict = {"shape": [in_f, out_f], "tokens": args.tokens, "weight_elements": in_f * out_f}
    with torch.inference_mode():
        y_ref = ref(x.float())
        for name in ("fp8_channel", block):
            row[f"{name}_sqnr_db"] = round(sqnr_db(y_ref, layers[name](x)), 2)
    row["ms"] = {k: round(v, 4) for k, v in ms.items()}
    row["vs_bf16_eager"] = {k: round(v / ms["bf16_eager"], 3) for k, v in ms.items() if k != "bf16_eager"}
    if "bf16_compiled" in ms:
        row["compiled_vs_bf16_compiled"] = {k: round(v / ms["bf16_compiled"], 3) for k, v in ms.items()
                                            if k.endswith("_compiled") and "dequant" not in k and k != "bf16_compiled"}
    row["dequant_ns_per_weight"] = {k.replace("_dequant", ""): round(v * 1e6 / (in_f * out_f), 3)
                                    for k, v in ms.items() if "dequant" in k}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--scaled-mm", action="store_true", help="also time the _scaled_mm (W8A8) path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_shape(i, o, args) for i, o in SHAPES]
    print(json.dumps({
        "bench": "fp8_linear",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
