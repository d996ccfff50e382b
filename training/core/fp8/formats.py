"""FP8 formats, power-of-two scaling, and quantise/dequantise in three granularities.

Conventions used everywhere in `training/core/fp8/` (and in FP8 checkpoints):

- `compute_scale` returns the *quantisation* multiplier of FP8-LM: ``q = fp8(x * scale)``.
- Quantise functions return ``(q, scale_inv)``, and every scale stored in a module or a
  checkpoint is this *dequantisation* scale: ``x ≈ q.float() * scale_inv`` (the meaning of
  `weight_scale` in vLLM / compressed-tensors). Scales are powers of two, so ``1 / scale`` is exact.
- Casting to ``float8_e4m3fn`` saturates silently (even +inf becomes 448) while ``float8_e5m2``
  overflows to inf, so values are clamped to ±max before every cast, and non-finite amax is
  detected here rather than trusted to the cast.
- Arithmetic on float8 tensors is not implemented on CPU: always upcast (``q.to(float32)``) first.

    >>> import torch
    >>> w = torch.randn(32, 128)
    >>> q, s = quantize_per_block(w, block_size=64)
    >>> q.dtype, tuple(s.shape)
    (torch.float8_e4m3fn, (32, 2))
    >>> err = (dequantize(q, s, block_size=64) - w).norm() / w.norm()
    >>> bool(err < 0.05)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class FP8ScaleError(ValueError):
    """An amax is inf or NaN, so no FP8 scale can be derived from it (the tensor overflowed)."""


@dataclass(frozen=True)
class FP8Format:
    """One FP8 format: its torch dtype and largest finite value."""

    name: str
    dtype: torch.dtype
    max: float
    """Largest finite magnitude; values are clamped to ±max before casting."""


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0)
"""Weights and activations (FP8-LM): 3 mantissa bits, no inf, max 448."""
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0)
"""Gradients (FP8-LM): 2 mantissa bits, wider range, max 57344."""
FORMATS = {f.name: f for f in (E4M3, E5M2)}

# Scales stay normal float32 numbers with exactly representable inverses.
_MIN_EXP, _MAX_EXP = -126, 126


def get_format(fmt: str | FP8Format) -> FP8Format:
    """`"e4m3"` / `"e5m2"` (or an `FP8Format`) → `FP8Format`."""
    if isinstance(fmt, FP8Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {sorted(FORMATS)}") from None


def compute_scale(amax: torch.Tensor | float, fmt: str | FP8Format = E4M3, margin: int = 0, *,
                  check_finite: bool = True) -> torch.Tensor:
    """FP8-LM's scale ``2 ** (floor(log2(fmt.max / amax)) - margin)``, elementwise, float32.

    amax == 0 (an all-zero tensor) gives scale 1. The exponent is clamped to [-126, 126] so the
    scale and its inverse are finite float32 powers of two. An inf/NaN amax raises
    `FP8ScaleError` (checking it syncs with the device); with ``check_finite=False`` (hot paths)
    it yields a NaN scale instead, so the NaN shows up in the result rather than hiding.

        >>> compute_scale(torch.tensor([1.0, 448.0, 500.0, 0.0])).tolist()
        [256.0, 1.0, 0.5, 1.0]
        >>> compute_scale(1.0, margin=1).item()
        128.0
    """
    fmt = get_format(fmt)
    amax = torch.as_tensor(amax, dtype=torch.float32).float()
    if check_finite and not bool(torch.isfinite(amax).all()):
        bad = int((~torch.isfinite(amax)).sum())
        raise FP8ScaleError(f"{bad} of {amax.numel()} amax values are inf or NaN; the tensor overflowed "
                            f"before FP8 ({fmt.name}) quantisation. Fix the source of the non-finite values "
                            "(or skip this step, as delayed scaling does)")
    # floor(log2(ratio)) is the unbiased exponent field of the float64 ratio: float64 keeps the ratio of
    # any finite float32 amax normal and never rounds it across a power of two. (Bits rather than
    # torch.frexp, which inductor's CPU code generation fails to vectorise.)
    ratio_bits = (fmt.max / amax.double()).view(torch.int64)
    exp = ((ratio_bits >> 52) & 0x7FF) - 1023
    exp = (exp - margin).clamp(_MIN_EXP, _MAX_EXP).to(torch.float32)
    scale = torch.exp2(exp)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isnan(amax) | torch.isinf(amax), torch.full_like(scale, math.nan), scale)


def saturate(y: torch.Tensor, fmax: float) -> torch.Tensor:
    """Finite values clamped to ±fmax; inf and NaN become NaN, so that a non-finite value stays
    visible after the cast (torch's CPU cast to e4m3fn would turn inf into ±448, e5m2 keeps inf).

        >>> saturate(torch.tensor([500.0, -3.0, float("inf"), float("nan")]), 448.0).tolist()
        [448.0, -3.0, nan, nan]

    Two spellings of one result. Eager, `nan_to_num` then an in-place clamp: two passes, as fast as the
    clamp alone (where + isfinite took 3x as long on CPU and slowed an eager fp8-o2 step by ~5 %).
    Compiled, the `where` form: Inductor fuses either into one pass, but writes the `nan_to_num` NaN
    with its sign bit set (E4M3 byte 0xFF instead of 0x7F), and fused and eager passes give the same
    bytes (tests/fp8/test_fp8_fused.py).
    """
    if torch.compiler.is_compiling():
        return torch.where(torch.isfinite(y), y.clamp(-fmax, fmax), float("nan"))
    return torch.nan_to_num(y, nan=math.nan, posinf=math.nan, neginf=math.nan).clamp_(-fmax, fmax)


def cast_to_fp8(x_scaled: torch.Tensor, fmt: str | FP8Format = E4M3) -> torch.Tensor:
    """`saturate` to ±fmt.max (inf and NaN: NaN), then cast."""
    fmt = get_format(fmt)
    return saturate(x_scaled, fmt.max).to(fmt.dtype)


def _quantize(x: torch.Tensor, amax: torch.Tensor, fmt: FP8Format, margin: int, check_finite: bool):
    scale = compute_scale(amax, fmt, margin, check_finite=check_finite)  # broadcasts against x
    return cast_to_fp8(x.float() * scale, fmt), (1.0 / scale)


def quantize_per_tensor(x: torch.Tensor, fmt: str | FP8Format = E4M3, margin: int = 0, *,
                        check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor. Returns ``(q, scale_inv)`` with ``scale_inv`` 0-dim."""
    return _quantize(x, x.detach().abs().amax().float(), get_format(fmt), margin, check_finite)


def quantize_per_channel(x: torch.Tensor, fmt: str | FP8Format = E4M3, margin: int = 0, *,
                         check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (over the last dim): per output channel for a weight (out, in), per token
    for activations (tokens, in). Returns ``(q, scale_inv)`` with ``scale_inv`` shaped (..., 1)."""
    return _quantize(x, x.detach().abs().amax(dim=-1, keepdim=True).float(), get_format(fmt), margin, check_finite)


def num_blocks(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size)


def quantize_per_block(w: torch.Tensor, block_size: int = 64, fmt: str | FP8Format = E4M3, margin: int = 0, *,
                       check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per `block_size` consecutive weights along the input (last) dim of each row.

    Returns ``(q, scale_inv)`` with ``scale_inv`` shaped (out, ceil(in / block_size)); a last,
    shorter block is allowed (e.g. in=576 with blocks of 128). This is compressed-tensors'
    "group" strategy with ``group_size = block_size``.
    """
    if w.dim() != 2:
        raise ValueError(f"per-block quantisation takes a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    fmt = get_format(fmt)
    out_f, in_f = w.shape
    nb = num_blocks(in_f, block_size)
    padded = torch.nn.functional.pad(w.detach().abs().float(), (0, nb * block_size - in_f))  # (out, nb*bs)
    amax = padded.view(out_f, nb, block_size).amax(dim=-1)  # (out, nb)
    scale = compute_scale(amax, fmt, margin, check_finite=check_finite)  # (out, nb)
    q = cast_to_fp8(w.float() * expand_block_scale(scale, block_size, in_f), fmt)
    return q, 1.0 / scale


def expand_block_scale(scale: torch.Tensor, block_size: int, in_features: int) -> torch.Tensor:
    """(out, nb) block scales → (out, in) elementwise scales (a view-friendly expand; fuses under compile)."""
    out_f, nb = scale.shape
    return scale.unsqueeze(-1).expand(out_f, nb, block_size).reshape(out_f, nb * block_size)[:, :in_features]


_UPCAST_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """Exact float8 → float32 upcast.

    Eager on CPU this reads a 256-entry table (``index_select`` on the bytes): torch's CPU float8
    cast is a scalar loop, ~5× slower. Under `torch.compile`, and on GPUs, it is the plain cast,
    which inductor fuses with the ops around it.
    """
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return q.to(torch.float32)
    key = (q.dtype, q.device)
    table = _UPCAST_TABLES.get(key)
    if table is None:
        table = _UPCAST_TABLES[key] = torch.arange(256, dtype=torch.uint8).view(q.dtype).to(torch.float32)
    idx = q.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return table.index_select(0, idx).view(q.shape)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, *, block_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale_inv`` in `dtype`. `scale_inv` broadcasts against `q` (per-tensor, per-channel),
    or is (out, nb) block scales when `block_size` is given. The product is taken in float32
    (float8 arithmetic does not exist on CPU; exact for power-of-two scales) and cast to `dtype` once."""
    if block_size is not None:
        scale_inv = expand_block_scale(scale_inv, block_size, q.shape[-1])
    return (fp8_to_float32(q) * scale_inv.to(torch.float32)).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: ``20 log10(|ref| / |ref - approx|)`` (∞ when equal)."""
    ref, app = reference.detach().double(), approx.detach().double()
    noise = (ref - app).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / noise))


class DelayedScaling:
    """Per-tensor delayed scaling (FP8-LM): the scale comes from the max amax of the last
    `history_len` steps; during warm-up (empty history) from the current amax.

    Non-finite amax values (an overflowed step) are not recorded; `overflows` counts them, and the
    scale stays what the history gives. Meant for FP8 training (O1–O3); inference uses
    dynamic scales instead.

        >>> ds = DelayedScaling(E4M3, history_len=2)
        >>> ds.scale(torch.tensor(1.0)).item()    # warm-up: current amax
        256.0
        >>> ds.update(torch.tensor(4.0)), ds.update(torch.tensor(1.0))
        (True, True)
        >>> ds.scale(torch.tensor(1.0)).item()    # history max is 4
        64.0
    """

    def __init__(self, fmt: str | FP8Format = E4M3, history_len: int = 16, margin: int = 0,
                 device: torch.device | str | None = None):
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.fmt = get_format(fmt)
        self.margin = margin
        self.history = torch.zeros(history_len, dtype=torch.float32, device=device)
        self.steps = 0
        self.overflows = 0

    def update(self, amax: torch.Tensor) -> bool:
        """Record this step's amax. Returns False (and records nothing) when it is inf/NaN."""
        amax = amax.detach().float().reshape(())
        if not bool(torch.isfinite(amax)):
            self.overflows += 1
            return False
        self.history[self.steps % self.history.numel()] = amax
        self.steps += 1
        return True

    def scale(self, current_amax: torch.Tensor | None = None) -> torch.Tensor:
        """The quantisation scale to use now (0-dim float32)."""
        if self.steps == 0:
            if current_amax is None:
                return torch.ones((), dtype=torch.float32, device=self.history.device)
            return compute_scale(current_amax.detach().float().reshape(()), self.fmt, self.margin)
        filled = self.history[: min(self.steps, self.history.numel())]
        return compute_scale(filled.max(), self.fmt, self.margin)
