"""FP8 training on SmolLM2-135M (full fine-tune of a GRM): memory per parameter, peak RSS, step time
and loss, for fp32 AdamW, bf16-AMP AdamW, FP8-LM O1 and O2, each through grm-train's precision plan
and training step. Prints one JSON object; not a test.

    $ .venv/bin/python bench/fp8_train.py --steps 8 --pairs 4 --tokens 128

Each mode runs in its own process (so peak RSS is its own). Bytes are counted from the real tensors
after the last step: the parameters, their `.grad`s and the optimizer state, per parameter of the
model. Step times are medians of the steps after the first two; ratios are against fp32 in the same
run, but the processes run one after another, so on a shared machine compare only runs made together.
O3 (FSDP2 with FP8 all-gathers) is not implemented; its all-gather bytes are reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from machine import cpu_model

MODES = ("fp32", "bf16", "fp8-o1", "fp8-o2")


def _batch(tok, pairs: int, tokens: int, seed: int):
    import torch

    from grmserve.training.data import EncodedPair, collate_pairs

    g = torch.Generator().manual_seed(seed)
    vocab = len(tok)

    def ids(n):
        return torch.randint(100, vocab - 1, (n,), generator=g).tolist()

    half = tokens // 2
    return collate_pairs([EncodedPair(ids(half), ids(half), ids(half - 8)) for _ in range(pairs)], tok.pad_token_id)


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def run_mode(mode: str, args) -> dict:
    """One mode in this process: build, train `args.steps` steps, count bytes."""
    import torch

    from grmserve.training.components import TrainStep, adamw_factory, build_scheduler, compute_loss, load_backbone
    from grmserve.training.config import TrainConfig
    from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm
    from grmserve.training.precision import apply_precision

    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    cfg.precision.mode = mode
    cfg.loss.regulariser = "sft"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-5, 0
    lm, tok = load_backbone("smollm2", seed=0)
    model = init_grm(lm, grm=GRMConfig(head=HeadConfig(dropout=0.0)))
    plan = apply_precision(model, adamw_factory(cfg.optim), cfg.precision, device=torch.device("cpu"))
    step = TrainStep(plan.model, plan.optimizer, build_scheduler(plan.optimizer, cfg.optim, total_steps=args.steps),
                     loss_fn=lambda m, b: compute_loss(m, b, cfg), grad_clip=1.0, autocast=plan.autocast)
    losses, times = [], []
    for i in range(args.steps):
        batch = _batch(tok, args.pairs, args.tokens, seed=i)
        start = time.perf_counter()
        stats = step([batch])
        times.append(time.perf_counter() - start)
        losses.append(round(stats["loss"], 5))
    # One more forward/backward without the optimizer step, so that .grad exists when counting.
    with plan.autocast():
        loss, _ = compute_loss(plan.model, _batch(tok, args.pairs, args.tokens, seed=99), cfg)
    loss.backward()
    params = [p for p in plan.model.parameters()]
    n = sum(p.numel() for p in params)
    state = [t for s in plan.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim]
    weights, grads, opt = _nbytes(params), _nbytes(p.grad for p in params), _nbytes(state)
    return {"mode": mode, "params": n, "fp8_linears": len(plan.fp8.converted) if plan.fp8 else 0,
            "bytes_per_param": {"weights": round(weights / n, 3), "grads": round(grads / n, 3),
                                "optimizer": round(opt / n, 3), "total": round((weights + grads + opt) / n, 3)},
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "step_s_median": round(statistics.median(times[2:] or times), 3), "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--one", mode, "--steps", str(args.steps), "--pairs", str(args.pairs),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{mode}: done", file=sys.stderr)
    by = {r["mode"]: r for r in results}
    base, amp = by.get("fp32"), by.get("bf16")
    for r in results:
        if base:
            r["step_time_vs_fp32"] = round(r["step_s_median"] / base["step_s_median"], 2)
        if amp:
            r["memory_vs_bf16_amp"] = round(r["bytes_per_param"]["total"] / amp["bytes_per_param"]["total"], 3)
    print(json.dumps({"cpu": cpu_model(), "steps": args.steps, "pairs": args.pairs, "tokens": args.tokens,
                      "results": results,
                      "o3_all_gather_bytes_vs_bf16": "not measured: fp8-o3 (FSDP2 with FP8 all-gathers) is not built"},
                     indent=1))


if __name__ == "__main__":
    main()
