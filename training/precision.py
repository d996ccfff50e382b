"""The precision plan: the one place a training precision mode is resolved.

`apply_precision` converts the model, shards it (FSDP2 when several processes run), builds its
optimizer and returns the context the forward passes run in. `grm-train`, `grm-experiment` and every
later driver get their model and optimizer from here, so FP8 training (FP8-LM O1-O3) plugs in at
one place: `_apply_fp8`.

    >>> import torch
    >>> plan = apply_precision(torch.nn.Linear(2, 2), lambda m: torch.optim.SGD(m.parameters(), 0.1),
    ...                        PrecisionConfig(mode="bf16"), device=torch.device("cpu"))
    >>> with plan.autocast():
    ...     plan.model(torch.ones(1, 2)).dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .config import FP8_MODES, PrecisionConfig
from .core.devices import fast_dtype

log = logging.getLogger(__name__)


@dataclass
class PrecisionPlan:
    """What a precision mode decided: the (converted, sharded) model, its optimizer, and the
    context the forward passes run in."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager]
    mode: str
    fp8: Any = None
    """For fp8 modes: the conversion report (which linear layers train in FP8, which stay high precision)."""


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` → bf16 where bf16 matmuls are fast (CUDA, CPUs with native bf16), else fp32.

    >>> resolve_mode("fp32", torch.device("cpu"))
    'fp32'
    """
    if mode != "auto":
        return mode
    return "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"


MODE_OPTIONS = {
    "fp8_recipe": (FP8_MODES, "the FP8 scaling recipe"),
    "fp8_backend": (FP8_MODES, "the FP8 GEMM backend"),
    "fp8_fuse": (FP8_MODES, "whether the FP8 passes are compiled"),
    "fp8_master": (("fp8-o2",), "the FP8 linears' master weights (fp8-o3 all-gathers from fp32 masters)"),
    "fp8_embedding_gather": (("fp8-o3",), "how fp8-o3 all-gathers the embedding"),
    "fp8_reduce_scatter": (("fp8-o3",), "how fp8-o3 reduce-scatters the decoder layers' gradients"),
    "fp8_root_reduce_scatter": (("fp8-o3",), "how fp8-o3 reduce-scatters the root module's gradients"),
}
"""The precision options each mode reads, and what each sets: another value than the default under a
mode that does not read it is refused (`check_mode_options`), not silently ignored."""


def check_mode_options(cfg: PrecisionConfig) -> None:
    """Refuse a precision option set away from its default under a mode (resolved) that ignores it, for
    example ``fp8_master=fp16`` under fp8-o1, whose weights would silently stay float32."""
    defaults = {f.name: f.default for f in dataclasses.fields(PrecisionConfig)}
    for name, (modes, what) in MODE_OPTIONS.items():
        value = getattr(cfg, name)
        if value != defaults[name] and cfg.mode not in modes:
            raise ValueError(f"precision.{name}={value} sets {what}, which precision.mode={cfg.mode} does not use "
                             f"(only {', '.join(modes)}): drop it or pass --precision.{name} {defaults[name]}")


def apply_precision(model: nn.Module, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                    cfg: PrecisionConfig, *, device: torch.device,
                    shard: Callable[[nn.Module], nn.Module] = lambda m: m) -> PrecisionPlan:
    """Resolve `precision.mode`: convert the model, shard it (`shard`, e.g. FSDP2), build its optimizer.

    - auto: bf16 where bf16 matmuls are fast, else fp32 (`resolve_mode`).
    - fp32: everything in float32.
    - bf16: float32 master weights and optimizer state; forward and backward under bf16 autocast.
    - fp8-o1 / fp8-o2 / fp8-o3: FP8-LM levels (`_apply_fp8`; o3 needs `shard` to be FSDP2).
    """
    cfg = dataclasses.replace(cfg, mode=resolve_mode(cfg.mode, device))
    check_mode_options(cfg)
    if cfg.fp8:
        return _apply_fp8(model, optimizer_factory, cfg, device=device, shard=shard)
    model = shard(model.to(device=device, dtype=torch.float32))
    optimizer = optimizer_factory(model)
    if cfg.mode == "fp32":
        return PrecisionPlan(model, optimizer, contextlib.nullcontext, cfg.mode)
    if cfg.mode == "bf16":
        return PrecisionPlan(model, optimizer, lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16),
                             cfg.mode)
    raise ValueError(f"unknown precision.mode {cfg.mode!r}")


def _apply_fp8(model, optimizer_factory, cfg: PrecisionConfig, *, device, shard) -> PrecisionPlan:
    """FP8-LM O1: the decoder's linear layers become `FP8TrainingLinear` (E4M3 inputs and weights,
    E5M2 output gradients, FP8 weight gradients; the reward head, LM head, embeddings and norms stay in
    float32), with the trainer's AdamW. O2: plus `FP8AdamW` (E4M3 first moment, FP16 second moment),
    the FP8 linears' weight gradients kept in E4M3 in place of ``.grad``, and with ``fp8_master=fp16``
    their weights stored as the FP16 master + scale (no fp32 copy), and the trained embeddings and LM
    head too, with FP16 gradients (core/fp8/fp16_master.py); other parameters keep fp32 masters.
    O3: O2's optimizer on FSDP2 shards (`shard`), the FP8 linears' weights all-gathered as E4M3 bytes
    and, with ``fp8_embedding_gather=bf16|e4m3``, the embedding and LM head as bf16 or E4M3 with one
    current scale (core/fp8/fsdp.py); the gradients of the FSDP modules holding FP8 linears
    reduce-scattered as E4M3 with a shared scale per 128 values (``fp8_reduce_scatter``: e4m3, the
    default, or fp32), the root module's in float32 or, with ``fp8_root_reduce_scatter=bf16``, as bf16
    on the wire (`BF16ReduceScatter`; they are accumulated and arrive as float32)."""
    from .core.fp8.fp16_master import keep_fp16_master_embeddings
    from .core.fp8.fsdp import BF16ReduceScatter, gather_embeddings_in
    from .core.fp8.training_linear import (
        FP8TrainingLinear,
        convert_to_fp8_training,
        reduce_scatter_in_fp8,
        shard_fp8_weights,
    )

    o2, o3 = cfg.mode == "fp8-o2", cfg.mode == "fp8-o3"
    model = model.to(device=device, dtype=torch.float32)
    fuse = fp8_fused(cfg, device)
    report = convert_to_fp8_training(model, cfg.fp8_recipe, cfg.fp8_backend,
                                     grad_storage="fp8" if o2 else "dequantized", fuse=fuse)
    log.info("%s", report.summary())
    if not report.converted:  # refused now, not at the first checkpoint (which exports the FP8 linears)
        reasons = sorted(set(report.skipped.values()))
        raise ValueError(f"precision.mode={cfg.mode}: no linear layer of this model can compute in FP8 (kept in "
                         f"high precision: {'; '.join(reasons[:3]) or 'the model has no linear layers'}); FP8 GEMMs "
                         "need both dims to be multiples of 16. Use --precision.mode bf16 or fp32")
    if o2 and cfg.fp8_master == "fp16":
        for module in model.modules():
            if isinstance(module, FP8TrainingLinear):
                module.keep_fp16_master()
        embeddings = keep_fp16_master_embeddings(model)
        log.info("FP16 master weights (with their FP16 gradients) for: %s",
                 ", ".join(embeddings) or "no trained embeddings")
    if o3:
        shard_fp8_weights(model)
        if cfg.fp8_embedding_gather != "fp32":
            wrapped = gather_embeddings_in(model, cfg.fp8_embedding_gather)
            log.info("all-gathered in %s: %s", cfg.fp8_embedding_gather, ", ".join(wrapped) or "nothing")
    model = shard(model)
    in_e4m3 = reduce_scatter_in_fp8(model) if o3 and cfg.fp8_reduce_scatter == "e4m3" else []
    if in_e4m3:
        log.info("gradients reduce-scattered in E4M3 for: %s", ", ".join(name or "the root" for name in in_e4m3))
    if o3 and cfg.fp8_root_reduce_scatter == "bf16" and "" not in in_e4m3:  # a root holding FP8 linears: E4M3
        model.set_custom_reduce_scatter(BF16ReduceScatter())  # the root: embedding, LM head, norm, reward head
        log.info("the root module's gradients reduce-scattered in bf16")
    optimizer = optimizer_factory(model)
    if o2 or o3:  # FP8 linears' FP16 masters are updated in place; every other parameter is its own fp32 master
        optimizer = fp8_adamw_like(optimizer, "fp32", fused=fuse)
    return PrecisionPlan(model, optimizer, contextlib.nullcontext, cfg.mode, fp8=report)


def fp8_fused(cfg: PrecisionConfig, device: torch.device) -> bool:
    """Whether `precision.fp8_fuse` compiles the FP8 passes on `device` (auto: on CUDA only).

    >>> cpu = torch.device("cpu")
    >>> fp8_fused(PrecisionConfig(mode="fp8-o2"), cpu), fp8_fused(PrecisionConfig(fp8_fuse="on"), cpu)
    (False, True)
    """
    return cfg.fp8_fuse == "on" or (cfg.fp8_fuse == "auto" and device.type == "cuda")


def release_precision(model: nn.Module) -> nn.Module:
    """Undo, in place, the module conversions of the fp8 modes: FP8 training linears become `nn.Linear`
    with their master weights, FP16-master embeddings and heads plain float32 ones (ties kept). The model
    then saves as a plain Hugging Face model (a PPO policy for vLLM; the GRM export keeps FP8 instead)."""
    from .core.fp8.fp16_master import release_fp16_masters
    from .core.fp8.training_linear import to_plain_linears

    to_plain_linears(model)
    release_fp16_masters(model)
    return model


def fp8_adamw_like(optimizer: torch.optim.Optimizer, master_weights: str, fused: bool = False) -> torch.optim.Optimizer:
    """`FP8AdamW` over the same parameter groups, learning rates, betas, eps and weight decay (`fused`:
    its update compiled)."""
    from .core.fp8.optim import FP8AdamW

    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    d = optimizer.defaults
    return FP8AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                    master_weights=master_weights, fused=fused)
