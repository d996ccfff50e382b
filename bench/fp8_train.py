"""FP8 training on SmolLM2-135M (full fine-tune of a GRM): memory per parameter, peak memory, step time
and loss, for fp32 AdamW, bf16-AMP AdamW, FP8-LM O1 and O2 (fp32 or FP16 masters), each through
grm-train's precision plan and training step. Prints one JSON object; not a test.

    $ .venv/bin/python bench/fp8_train.py --steps 8 --pairs 4 --tokens 128
    $ python bench/fp8_train.py --device cuda --random_init --pairs 16 --tokens 512   # GPU: torch._scaled_mm
    $ .venv/bin/python bench/fp8_train.py --modes fp32,fp8-o1,fp8-o2 --fp8_fuse on --profile /tmp/prof
    $ .venv/bin/python bench/fp8_train.py --narrow --interleave --pairs 2 --tokens 64 --steps 12 --fp8_fuse on \
          --modes fp32,fp8-o1,fp8-o2,fp8-o2-fp16     # host-bound proxy: what a GPU step of this model waits on

`--fp8_fuse` sets precision.fp8_fuse (auto: the FP8 passes compiled on CUDA only); `--profile` runs one
more step per mode under torch.profiler and reports its CUDA kernel count. `--narrow` keeps SmolLM2's
30 layers and 272 tensors at tiny widths, so the step is the host's work (dispatching ops; on a GPU,
launching them); `--interleave` steps all modes in turn in one process, for steadier ratios.

Each mode runs in its own process (so peak RSS is its own). Bytes are counted from the real tensors
after a forward/backward: the parameters, their gradients (``.grad``, or the E4M3 ``scaled_grad`` that O2
keeps in its place) and the optimizer state, per parameter of the model; also per parameter of the
FP8 linear layers alone (embeddings, norms and heads stay high precision). Step times are medians of
the steps after the first two; ratios are against fp32 in the same run, but the processes run one after
another, so on a shared machine compare only runs made together. Peak RSS on CPU includes what glibc's
allocator keeps of freed temporaries; `MALLOC_MMAP_THRESHOLD_=65536` in the environment makes it hand
large blocks back, so peak and resident sizes then reflect live memory (for memory figures only: every
large temporary then costs page faults, which slowed FP8 steps 3-4x here). `--random_init` builds SmolLM2-135M's
architecture with random weights (for machines without the model files, e.g. a GPU box).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from machine import cpu_model

MODES = ("fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o2-fp16", "fp8-o3", "fp8-o3-bf16", "fp8-o3-e4m3")
"""fp8-o2-fp16: fp8-o2 with ``--precision.fp8_master fp16`` (FP8-LM's FP16 master weights). fp8-o3: two
processes under torchrun (FSDP2; gloo on CPU), reporting all-gather and reduce-scatter bytes per step
(``--o3_reduce_scatter`` sets its ``precision.fp8_reduce_scatter``, ``--o3_root_reduce_scatter`` its
``precision.fp8_root_reduce_scatter``); fp8-o3-bf16 and fp8-o3-e4m3: the
same with ``--precision.fp8_embedding_gather bf16`` or ``e4m3``."""
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=2)

NARROW = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
"""`--narrow`: SmolLM2-135M's depth and parameter list (30 layers, 272 tensors) at widths where the
arithmetic is negligible, so the step time is the host's: dispatching the ops (on CUDA, launching them)."""


def _batch(vocab: int, pad_id: int, pairs: int, tokens: int, seed: int):
    import torch

    from grmserve.training.data import EncodedPair, collate_pairs

    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(100, vocab - 1, (n,), generator=g).tolist()

    half = tokens // 2
    return collate_pairs([EncodedPair(ids(half), ids(half), ids(half - 8)) for _ in range(pairs)], pad_id)


def _to(batch, device):
    import dataclasses

    import torch

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def _backbone(random_init: bool, narrow: bool = False):
    if not random_init and not narrow:
        from grmserve.training.components import load_backbone

        lm, tok = load_backbone("smollm2", seed=0)
        return lm, len(tok), tok.pad_token_id
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    arch = {**SMOLLM2_135M, **NARROW} if narrow else SMOLLM2_135M
    return LlamaForCausalLM(LlamaConfig(**arch)), arch["vocab_size"], arch["pad_token_id"]


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
    return _train_and_count(mode, args, *_build(mode, args))


def run_interleaved(modes: list[str], args) -> dict:
    """Step times of `modes` built side by side in this process and stepped in turn: a drift of the
    machine's speed hits every mode alike, so the ratios are steadier than with one process per mode.
    Times only (the modes share the process, so no memory figures); medians after three steps."""
    if any(m.startswith("fp8-o3") for m in modes):
        raise SystemExit("--interleave runs single-process modes; fp8-o3 needs torchrun")
    built = {mode: _build(mode, args) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(args.steps):
        for mode, (step, _plan, _cfg, vocab, pad_id, device, *_) in built.items():
            batch = _to(_batch(vocab, pad_id, args.pairs, args.tokens, seed=i), device)
            start = time.perf_counter()
            step([batch])
            times[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(t[3:] or t) for mode, t in times.items()}
    base = median.get("fp32")
    return {"step_s_median": {m: round(v, 4) for m, v in median.items()},
            "step_time_vs_fp32": {m: round(v / base, 2) for m, v in median.items()} if base else None}


def _build(mode: str, args):
    """The model, precision plan and training step of one mode, as grm-train builds them."""
    import torch

    from grmserve.training.components import TrainStep, adamw_factory, build_scheduler, compute_loss
    from grmserve.training.config import TrainConfig
    from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm
    from grmserve.training.precision import apply_precision

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = TrainConfig()
    cfg.device = args.device
    shard, info, wire = (lambda m: m), None, None
    if mode.startswith("fp8-o3"):  # under torchrun: FSDP2 as grm-train shards, all-gather payloads counted
        from grmserve.training.trainer import build_sharder, init_distributed

        info = init_distributed(cfg)
        torch.set_num_threads(max(1, args.threads // info.world_size))
        shard, device = build_sharder(info, cfg), info.device
        wire = _count_collectives()
    cfg.precision.mode = mode.removesuffix("-fp16").removesuffix("-bf16").removesuffix("-e4m3")
    cfg.precision.fp8_embedding_gather = mode.removeprefix("fp8-o3-") if mode.startswith("fp8-o3-") else "fp32"
    cfg.precision.fp8_master = "fp16" if mode.endswith("-fp16") else "fp32"
    if mode.startswith("fp8-o3"):  # options a mode does not read are refused (precision.MODE_OPTIONS)
        cfg.precision.fp8_reduce_scatter = args.o3_reduce_scatter
        cfg.precision.fp8_root_reduce_scatter = args.o3_root_reduce_scatter
    if mode.startswith("fp8"):
        cfg.precision.fp8_fuse = args.fp8_fuse
    cfg.loss.regulariser = "sft"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-5, 0
    lm, vocab, pad_id = _backbone(args.random_init, args.narrow)
    model = init_grm(lm, grm=GRMConfig(head=HeadConfig(dropout=0.0)))
    plan = apply_precision(model, adamw_factory(cfg.optim), cfg.precision, device=device, shard=shard)
    step = TrainStep(plan.model, plan.optimizer, build_scheduler(plan.optimizer, cfg.optim, total_steps=args.steps),
                     loss_fn=lambda m, b: compute_loss(m, b, cfg), grad_clip=1.0, autocast=plan.autocast)
    return step, plan, cfg, vocab, pad_id, device, info, wire


def _train_and_count(mode, args, step, plan, cfg, vocab, pad_id, device, info, wire) -> dict:
    import torch

    from grmserve.training.components import compute_loss

    losses, times = [], []
    for i in range(args.steps):
        batch = _to(_batch(vocab, pad_id, args.pairs, args.tokens, seed=i), device)
        start = time.perf_counter()
        stats = step([batch])  # returns floats: the step has finished on the device
        times.append(time.perf_counter() - start)
        losses.append(round(stats["loss"], 5))
    resident = _resident_mib(device)  # between steps: the stored state, plus what the allocator keeps
    kernels = _profile_step(step, _to(_batch(vocab, pad_id, args.pairs, args.tokens, seed=98), device), mode, args) \
        if args.profile else None
    if mode.startswith("fp8-o3"):
        return _o3_result(mode, args, wire, times, losses, info)
    # One more forward/backward without the optimizer step, so that the gradients exist when counting.
    with plan.autocast():
        loss, _ = compute_loss(plan.model, _to(_batch(vocab, pad_id, args.pairs, args.tokens, seed=99), device), cfg)
    loss.backward()
    params = list(plan.model.parameters())
    fp8_ids = {id(m.weight) for m in plan.model.modules() if type(m).__name__ == "FP8TrainingLinear"}
    state = {id(p): [t for t in plan.optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor) and t.ndim]
             for p in params}

    def per_param(subset) -> dict:
        n = sum(p.numel() for p in subset) or 1
        weights = _nbytes(subset)
        scaled = (t for p in subset for t in (getattr(p, "scaled_grad", None) or ()))
        grads = _nbytes(p.grad for p in subset) + _nbytes(scaled)
        opt = _nbytes(t for p in subset for t in state[id(p)])
        return {"weights": round(weights / n, 3), "grads": round(grads / n, 3), "optimizer": round(opt / n, 3),
                "total": round((weights + grads + opt) / n, 3)}

    peak = (round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda"
            else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return {"mode": mode, "params": sum(p.numel() for p in params),
            "fp8_linears": len(plan.fp8.converted) if plan.fp8 else 0,
            "bytes_per_param": per_param(params),
            "bytes_per_fp8_linear_param": per_param([p for p in params if id(p) in fp8_ids]) if fp8_ids else None,
            "peak_mib" if device.type == "cuda" else "peak_rss_mib": peak,
            "resident_mib_between_steps": resident, "kernels_per_step": kernels, "fp8_fuse": args.fp8_fuse,
            "step_s_median": round(statistics.median(times[2:] or times), 4), "losses": losses}


def _profile_step(step, batch, mode: str, args) -> int | None:
    """One more step under torch.profiler (not timed): the top operators and kernels go to
    `<args.profile>/profile_<mode>_<fp8_fuse>.txt`; returns the number of CUDA kernels the step launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step([batch])
    events = prof.key_averages()
    os.makedirs(args.profile, exist_ok=True)
    with open(os.path.join(args.profile, f"profile_{mode}_{args.fp8_fuse}.txt"), "w") as f:
        f.write(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=50))
    if not cuda:
        return None
    return sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)


def _resident_mib(device) -> float:
    """Memory held now: allocated CUDA memory, or this process's anonymous resident memory (Linux
    /proc `RssAnon`: the clean, reclaimable pages of the memory-mapped checkpoint are left out)."""
    import torch

    if device.type == "cuda":
        return round(torch.cuda.memory_allocated() / 2**20, 1)
    with open("/proc/self/status") as f:
        return round(next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024, 1)


def _count_collectives() -> dict:
    """Count the input bytes of FSDP2's all-gathers and of its own (float32 or bf16) reduce-scatters (its
    calls go through `dist.all_gather_single` and `dist.reduce_scatter_single`; the FP8 reduce-scatter
    counts its own)."""
    import torch.distributed as dist

    wire = {"bytes": 0, "calls": 0, "reduce_scatter_bytes": 0, "reduce_scatter_elements": 0}
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def counted_gather(output, input, *a, **k):
        wire["bytes"] += input.numel() * input.element_size()
        wire["calls"] += 1
        return gather(output, input, *a, **k)

    def counted_scatter(*a, **k):
        input = k["input"] if "input" in k else a[1]
        wire["reduce_scatter_bytes"] += input.numel() * input.element_size()
        wire["reduce_scatter_elements"] += input.numel()
        return scatter(*a, **k)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter
    return wire


def _o3_result(mode, args, wire, times, losses, info) -> dict:
    """All-gather bytes per step of one process: measured for fp8-o3 (E4M3 decoder linears; the
    embedding and LM head in fp32, bf16 or E4M3; fp32 for the rest), against the same elements
    gathered in bf16 (FSDP2 with param_dtype=bf16) and fp32; and its reduce-scatter bytes
    (`_reduce_scatter_result`)."""
    from grmserve.training.core.fp8.fsdp import all_gather_bytes, reduce_scatter_bytes

    sent, reduced = all_gather_bytes(), reduce_scatter_bytes()
    fp8, bf16, e4m3 = sent["fp8_linears"], sent["bf16_embeddings"], sent["e4m3_embeddings"]
    elements = fp8 + e4m3 + bf16 / 2 + (wire["bytes"] - fp8 - e4m3 - bf16) / 4  # the rest is gathered in fp32
    steps = args.steps
    per_step = {"fp8_o3": wire["bytes"] / steps, "bf16": 2 * elements / steps, "fp32": 4 * elements / steps}
    return {"mode": mode, "processes": info.world_size, "all_gather_calls": wire["calls"],
            "all_gather_mib_per_step": {k: round(v / 2**20, 2) for k, v in per_step.items()},
            "all_gather_vs_bf16": round(per_step["fp8_o3"] / per_step["bf16"], 3),
            "fp8_linears_all_gather_vs_bf16": 0.5 if fp8 else None,
            "fp8_share_of_gathered_elements": round(fp8 / elements, 3),
            "bf16_share_of_gathered_elements": round(bf16 / 2 / elements, 3),
            "e4m3_embedding_share_of_gathered_elements": round(e4m3 / elements, 3),
            **_reduce_scatter_result(wire["reduce_scatter_bytes"], wire["reduce_scatter_elements"], reduced, steps),
            "step_s_median": round(statistics.median(times[2:] or times), 4), "losses": losses}


def _reduce_scatter_result(fsdp_bytes: int, fsdp_elements: int, reduced: dict, steps: int) -> dict:
    """Reduce-scatter bytes per step of one process (FP8 payload with its block amaxes, plus the
    modules FSDP2 reduce-scatters itself, in float32 or, for the root with ``--o3_root_reduce_scatter
    bf16``, bf16) against the same elements in bf16 and fp32. The FP8 payload counts each shard padded
    to whole blocks of 128."""
    elements = fsdp_elements + reduced["e4m3_gradients"]
    fp8 = reduced["e4m3_gradients"] + reduced["block_amax"]
    per_step = {"fp8_o3": (fsdp_bytes + fp8) / steps, "bf16": 2 * elements / steps, "fp32": 4 * elements / steps}
    return {"reduce_scatter_mib_per_step": {k: round(v / 2**20, 2) for k, v in per_step.items()},
            "reduce_scatter_vs_bf16": round(per_step["fp8_o3"] / per_step["bf16"], 3),
            "reduce_scatter_vs_fp32": round(per_step["fp8_o3"] / per_step["fp32"], 3),
            "e4m3_share_of_reduced_elements": round(reduced["e4m3_gradients"] / elements, 3) if elements else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (2x sequences)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (the FP8 GEMMs then run torch._scaled_mm)")
    p.add_argument("--random_init", action="store_true", help="SmolLM2-135M's architecture, random weights")
    p.add_argument("--narrow", action="store_true",
                   help="SmolLM2-135M's depth at tiny widths (random weights): a proxy for host-bound steps")
    p.add_argument("--fp8_fuse", default="auto", choices=("auto", "on", "off"),
                   help="precision.fp8_fuse of the fp8 modes (auto: torch.compile'd FP8 passes on CUDA only)")
    p.add_argument("--o3_reduce_scatter", default="e4m3", choices=("e4m3", "fp32"),
                   help="precision.fp8_reduce_scatter of the fp8-o3 modes")
    p.add_argument("--o3_root_reduce_scatter", default="fp32", choices=("fp32", "bf16"),
                   help="precision.fp8_root_reduce_scatter of the fp8-o3 modes")
    p.add_argument("--profile", default="", help="folder: profile one extra step per mode (top ops, CUDA kernel count)")
    p.add_argument("--interleave", action="store_true",
                   help="build the modes side by side in one process and step them in turn (step times only)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    args = p.parse_args()
    if args.interleave:
        print(json.dumps({"cpu": cpu_model(), "device": args.device, "steps": args.steps, "pairs": args.pairs,
                          "tokens": args.tokens, "fp8_fuse": args.fp8_fuse, "narrow": args.narrow, "interleaved": True,
                          **run_interleaved(args.modes.split(","), args)}, indent=1))
        return
    if args.one:
        result = run_mode(args.one, args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    results = []
    for mode in args.modes.split(","):
        two = mode.startswith("fp8-o3")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if two else []
        cmd = [sys.executable, *launcher, __file__, "--one", mode, "--steps", str(args.steps),
               "--pairs", str(args.pairs), "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--device", args.device, "--fp8_fuse", args.fp8_fuse, "--profile", args.profile,
               "--o3_reduce_scatter", args.o3_reduce_scatter, "--o3_root_reduce_scatter", args.o3_root_reduce_scatter]
        cmd += ["--random_init"] if args.random_init else []
        cmd += ["--narrow"] if args.narrow else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # one failed mode does not lose the others' figures
            print(f"{mode}: failed (exit {proc.returncode})\n{proc.stderr[-4000:]}", file=sys.stderr)
            results.append({"mode": mode, "error": (proc.stderr.strip().splitlines() or [""])[-1]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{mode}: done {json.dumps(results[-1])}", file=sys.stderr)  # kept if a later mode runs out of time
    by = {r["mode"]: r for r in results if "error" not in r}
    o3 = [r for r in results if r["mode"].startswith("fp8-o3")]
    results = [r for r in results if not r["mode"].startswith("fp8-o3")]
    base, amp = by.get("fp32"), by.get("bf16")
    for r in filter(lambda r: "error" not in r, results):
        if base:
            r["step_time_vs_fp32"] = round(r["step_s_median"] / base["step_s_median"], 2)
        if amp:
            r["memory_vs_bf16_amp"] = round(r["bytes_per_param"]["total"] / amp["bytes_per_param"]["total"], 3)
    print(json.dumps({"cpu": cpu_model(), "steps": args.steps, "pairs": args.pairs, "tokens": args.tokens,
                      "fp8_fuse": args.fp8_fuse, "narrow": args.narrow, "o3_reduce_scatter": args.o3_reduce_scatter,
                      "o3_root_reduce_scatter": args.o3_root_reduce_scatter,
                      "results": results, "fp8_o3": o3},
                     indent=1))


if __name__ == "__main__":
    main()
