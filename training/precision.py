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
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from .config import PrecisionConfig
from .core.devices import fast_dtype

FP8_ISSUE = "issue \"FP8 mixed-precision training (FP8-LM O1-O3)\", to be implemented in grmserve.training.core.fp8"


@dataclass
class PrecisionPlan:
    """What a precision mode decided: the (converted, sharded) model, its optimizer, and the
    context the forward passes run in."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager]
    mode: str


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` → bf16 where bf16 matmuls are fast (CUDA, CPUs with native bf16), else fp32.

    >>> resolve_mode("fp32", torch.device("cpu"))
    'fp32'
    """
    if mode != "auto":
        return mode
    return "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"


def apply_precision(model: nn.Module, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
                    cfg: PrecisionConfig, *, device: torch.device,
                    shard: Callable[[nn.Module], nn.Module] = lambda m: m) -> PrecisionPlan:
    """Resolve `precision.mode`: convert the model, shard it (`shard`, e.g. FSDP2), build its optimizer.

    - auto: bf16 where bf16 matmuls are fast, else fp32 (`resolve_mode`).
    - fp32: everything in float32.
    - bf16: float32 master weights and optimizer state; forward and backward under bf16 autocast.
    - fp8-o1 / fp8-o2 / fp8-o3: FP8-LM levels (`_apply_fp8`).
    """
    cfg = dataclasses.replace(cfg, mode=resolve_mode(cfg.mode, device))
    if cfg.mode.startswith("fp8"):
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
    """Hook for FP8-LM O1 (FP8 linear weights/gradients), O2 (+ FP8 Adam states) and O3 (+ FP8
    sharded all-gathers): convert the model's linear layers, shard with FP8 communication, and
    build the FP8 optimizer, returning a `PrecisionPlan` like the other modes."""
    raise NotImplementedError(
        f"precision.mode={cfg.mode}: FP8 training is not implemented yet; it is the {FP8_ISSUE}. "
        "Use --precision.mode bf16 or fp32 until then."
    )
