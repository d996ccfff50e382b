"""FP8 gradient reduction across ranks (FP8-LM O1's FP8 all-reduce with automatic scaling).

`fp8_all_reduce_(grads, group)` averages (or sums) a list of gradients across the ranks of `group`
while putting 1 byte per element on the wire instead of 4:

1. one all-reduce (MAX) of every tensor's amax: a global amax per tensor, the same on all ranks;
2. a shared power-of-two scale per tensor, pre-divided by the world size W:
   ``scale = compute_scale(W * amax)``, so the sum of W quantised values is at most
   ``W * amax * scale <= fmt.max``: summing FP8 values cannot overflow;
3. every rank quantises its gradients into one flat FP8 buffer (the bytes of all tensors);
4. reduce-scatter in FP8: an all-to-all of the uint8 bytes (gloo cannot reduce float8), each rank
   sums its shard of the W contributions in float32 and re-casts the sum to FP8 with the same
   scale (no overflow by step 2);
5. all-gather of the FP8 shards (uint8 bytes) and dequantisation in place (divided by W for ``avg``).

Wire bytes per rank: 2·(W−1)/W bytes per element, the element count of a ring all-reduce at
1 byte instead of 4. Where a backend lacks all-to-all, ``method="all_gather"`` exchanges every
rank's whole FP8 buffer ((W−1) bytes per element received) and sums locally.

A non-finite gradient makes its tensor's amax NaN/inf; the scale is then NaN and so is the reduced
tensor (nothing is hidden), so the optimizer's non-finite check skips the step.

    >>> import torch
    >>> g = [torch.randn(64, 32)]
    >>> stats = fp8_all_reduce_(g)          # without torch.distributed: quantise / dequantise only
    >>> stats.elements, stats.bytes_per_element
    (2048, 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .formats import E4M3, FP8Format, cast_to_fp8, compute_scale, fp8_to_float32, get_format

METHODS = ("reduce_scatter", "all_gather")


@dataclass
class FP8ReduceStats:
    """What one `fp8_all_reduce_` call put on the wire (FP8 payload only; the amax vector aside)."""

    elements: int
    """Gradient elements reduced."""
    bytes_per_element: int
    """Bytes of each element in the payload buffers (1: FP8)."""
    payload_bytes_sent: int
    """FP8 payload bytes this rank sent (padding included)."""
    amax_bytes: int
    """Bytes of the amax all-reduce (4 per tensor)."""
    method: str
    world_size: int


def all_reduce_max_(amax: torch.Tensor, group: Any = None) -> torch.Tensor:
    """All-reduce `amax` in place with MAX when torch.distributed is initialised (else a no-op), a NaN
    entering as +inf: how MAX treats a NaN is the backend's choice (CUDA's fmaxf, which NCCL's MAX
    can use, returns the other operand and would drop it), while +inf wins everywhere. A non-finite
    amax thus reaches every rank; downstream NaN and inf amaxes are handled alike (NaN shared scales; a
    scaling state keeps its last good scale and counts the step).

        >>> all_reduce_max_(torch.tensor([1.0, float("nan")])).tolist()   # without torch.distributed
        [1.0, inf]
    """
    amax.masked_fill_(torch.isnan(amax), float("inf"))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def shared_scales(amax: torch.Tensor, world_size: int, fmt: FP8Format = E4M3) -> torch.Tensor:
    """Per-tensor quantisation scales that keep a sum over `world_size` ranks within ±fmt.max:
    ``compute_scale(world_size * amax)`` (non-finite amax → NaN scale).

        >>> shared_scales(torch.tensor([1.0, 448.0]), 2).tolist()
        [128.0, 0.5]
    """
    return compute_scale(amax * world_size, fmt, check_finite=False)


def _flat_scales(grads: Sequence[torch.Tensor], scales: torch.Tensor, padded: int) -> torch.Tensor:
    """Per-element scales for the flat buffer: tensor i's scale repeated numel_i times, padded with 1."""
    sizes = torch.tensor([g.numel() for g in grads], device=scales.device)
    flat = torch.repeat_interleave(scales, sizes)  # (n,)
    return torch.nn.functional.pad(flat, (0, padded - flat.numel()), value=1.0)  # (padded,)


def _world(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def fp8_all_reduce_(grads: Sequence[torch.Tensor], group: Any = None, *, op: str = "avg",
                    fmt: str | FP8Format = E4M3, method: str = "reduce_scatter") -> FP8ReduceStats:
    """Reduce `grads` in place across `group` with FP8 bytes on the wire (see the module docstring).

    `op`: ``"avg"`` (what data-parallel training wants) or ``"sum"``. `method`: ``"reduce_scatter"``
    (all-to-all + all-gather; FP8 sum of shards) or ``"all_gather"`` (every buffer to every rank).
    Without torch.distributed initialised (or with one rank) the gradients are only quantised and
    dequantised, so a single process sees the same rounding as a distributed one.
    """
    if op not in ("avg", "sum"):
        raise ValueError(f"op must be 'avg' or 'sum', got {op!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    fmt = get_format(fmt)
    grads = [g for g in grads if g is not None]
    if not grads:
        return FP8ReduceStats(0, 1, 0, 0, method, 1)
    world, _ = _world(group)
    # 1-2: global amax per tensor, shared pre-divided scales.
    amax = torch.stack([g.detach().abs().amax().float() for g in grads])  # (T,)
    if world > 1:
        all_reduce_max_(amax, group)
    scales = shared_scales(amax, world, fmt)  # (T,)
    # 3: one flat FP8 buffer, padded to a multiple of the world size.
    n = sum(g.numel() for g in grads)
    padded = -(-n // world) * world
    flat_scale = _flat_scales(grads, scales, padded)  # (padded,)
    flat = torch.nn.functional.pad(torch.cat([g.detach().reshape(-1).float() for g in grads]), (0, padded - n))
    q = cast_to_fp8(flat * flat_scale, fmt)  # (padded,) FP8
    # 4-5: exchange bytes and reduce.
    if world == 1:
        summed, sent = fp8_to_float32(q), 0
    elif method == "reduce_scatter":
        summed, sent = _reduce_scatter_all_gather(q, fmt, world, group)
    else:
        summed, sent = _all_gather_sum(q, world, group)
    result = summed / flat_scale  # (padded,), exact division by powers of two
    if op == "avg":
        result = result / world
    _unflatten_into_(grads, result[:n])
    return FP8ReduceStats(elements=n, bytes_per_element=q.element_size(), payload_bytes_sent=sent,
                          amax_bytes=amax.numel() * 4 if world > 1 else 0, method=method, world_size=world)


def _reduce_scatter_all_gather(q: torch.Tensor, fmt: FP8Format, world: int, group: Any) -> tuple[torch.Tensor, int]:
    """FP8 reduce-scatter (all-to-all of bytes, float32 sum, re-cast) then FP8 all-gather.
    Returns (the (padded,) float32 sum in scaled units, payload bytes sent by this rank)."""
    shard = q.numel() // world
    mine = cast_to_fp8(fp8_sum_to_shards(q, world, group), fmt)  # (shard,) FP8; |sum| <= fmt.max by the shared scale
    gathered = torch.empty(q.numel(), dtype=torch.uint8, device=q.device)  # (W * shard,)
    dist.all_gather_into_tensor(gathered, mine.view(torch.uint8), group=group)
    sent = 2 * (world - 1) * shard  # all-to-all and all-gather: (W-1) shards of 1 byte each
    return fp8_to_float32(gathered.view(q.dtype)), sent


def fp8_sum_to_shards(q: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """FP8 reduce-scatter of a flat FP8 buffer of W equal shards, shard r destined to rank r: an
    all-to-all of the bytes (gloo and NCCL cannot reduce float8), then the float32 sum of the W
    contributions to this rank's shard, in the scaled units they were cast in."""
    recv = torch.empty(q.numel(), dtype=torch.uint8, device=q.device)  # (W * shard,)
    dist.all_to_all_single(recv, q.view(torch.uint8), group=group)
    return fp8_to_float32(recv.view(q.dtype).view(world, -1)).sum(0)  # (shard,)


def _all_gather_sum(q: torch.Tensor, world: int, group: Any) -> tuple[torch.Tensor, int]:
    """All-gather every rank's whole FP8 buffer and sum in float32 locally."""
    gathered = torch.empty(world * q.numel(), dtype=torch.uint8, device=q.device)  # (W * padded,)
    dist.all_gather_into_tensor(gathered, q.view(torch.uint8), group=group)
    summed = fp8_to_float32(gathered.view(q.dtype).view(world, q.numel())).sum(0)  # (padded,)
    return summed, (world - 1) * q.numel()


def _unflatten_into_(grads: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for g in grads:
        k = g.numel()
        g.copy_(flat[offset:offset + k].view_as(g))
        offset += k
