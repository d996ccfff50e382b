"""`FP8InferenceLinear`: an `nn.Linear` replacement holding float8_e4m3fn weights plus float32 scales.

Two forward backends, chosen explicitly through the module's `backend` attribute (never guessed
per call):

- ``"emulated"`` (CPU, and any device): the weight is dequantised to `compute_dtype` (bf16) right
  before a bf16 matmul; activations stay in bf16 (W8A16). FP8 storage and FP8 rounding of the
  weights, bf16 compute. `torch.compile` fuses the dequantisation into one pass over the weight.
- ``"scaled_mm"`` (CUDA, compute capability ≥ 8.9): activations are quantised to e4m3 with a
  dynamic power-of-two scale per token, and `torch._scaled_mm` multiplies e4m3 × e4m3 with
  per-row (token) and per-column (output channel) scales (W8A8). Per-tensor weight scales are
  broadcast to per-column. Block weight scales (one per `block_size` inputs) have no portable
  `_scaled_mm` layout, so block-quantised layers on this backend dequantise the weight to bf16
  and run a bf16 matmul (the emulated numerics, W8A16); per-channel is the W8A8 recipe.

A layer may also hold **residual columns** (`set_residual_columns`, chosen by training/core/fp8/residuals.py):
for a few input columns `idx`, the rounding error of those columns, itself in e4m3 with a scale per
output row. The emulated forward adds it into the dequantised weight (the kept columns come out
almost exactly, at bf16 precision); `scaled_mm` adds ``x[..., idx] @ residual.T``, one small matmul.

`select_backend(device)` picks the backend for a device, and refuses a forced ``"scaled_mm"``
where it cannot run, with an error naming the fix.

    >>> import torch
    >>> lin = torch.nn.Linear(64, 32)
    >>> fp8 = FP8InferenceLinear.from_linear(lin, granularity="block", block_size=32)
    >>> fp8.weight.dtype, tuple(fp8.weight_scale.shape), fp8.backend
    (torch.float8_e4m3fn, (32, 2), 'emulated')
    >>> fp8(torch.randn(4, 64)).shape
    torch.Size([4, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import (
    E4M3,
    cast_to_fp8,
    compute_scale,
    dequantize,
    fp8_to_float32,
    num_blocks,
    quantize_per_block,
    quantize_per_channel,
    quantize_per_tensor,
)

BACKENDS = ("emulated", "scaled_mm")
GRANULARITIES = ("tensor", "channel", "block")
MIN_SCALED_MM_CAPABILITY = (8, 9)


class FP8BackendError(ValueError):
    """The requested FP8 backend cannot run on this device; the message names the fix. A `ValueError`:
    a configuration to change, which the CLIs report in one line (`configtools.fail`)."""


def select_backend(device: torch.device | str | None = None, requested: str = "auto", *,
                   allow_cpu_scaled_mm: bool = False) -> str:
    """The FP8 forward backend for `device`.

    ``requested="auto"`` gives ``"scaled_mm"`` on CUDA devices with compute capability ≥ 8.9
    (Ada, Hopper, Blackwell) and ``"emulated"`` everywhere else. ``requested="scaled_mm"`` on any
    other device raises `FP8BackendError`, except on CPU with ``allow_cpu_scaled_mm=True``
    (`torch._scaled_mm` runs there ~100× slower than bf16; for numerics tests only).

        >>> select_backend("cpu")
        'emulated'
        >>> select_backend("cpu", "scaled_mm", allow_cpu_scaled_mm=True)
        'scaled_mm'
    """
    device = torch.device(device if device is not None else "cpu")
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"unknown FP8 backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    supported = device.type == "cuda" and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(device) >= MIN_SCALED_MM_CAPABILITY
    if requested == "auto":
        return "scaled_mm" if supported else "emulated"
    if requested == "scaled_mm" and not supported and not (device.type == "cpu" and allow_cpu_scaled_mm):
        if device.type == "cuda" and torch.cuda.is_available():
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            where = f"this GPU has compute capability {cap}"
        else:
            where = f"the device is {device}"
        raise FP8BackendError(
            f"FP8 backend 'scaled_mm' (torch._scaled_mm) needs a CUDA GPU with compute capability >= 8.9 "
            f"(Ada/Hopper or newer), but {where}. Use the 'emulated' backend instead (FP8 rounding, the "
            "matmul in a float dtype), or leave the backend on 'auto'")
    return requested


# ---------------------------------------------------------------------------------------------
# Pure forward functions


def fp8_linear_emulated(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, *, block_size: int | None = None,
                        compute_dtype: torch.dtype = torch.bfloat16, residual_index: torch.Tensor | None = None,
                        residual: torch.Tensor | None = None,
                        residual_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: dequantise the e4m3 weight to `compute_dtype` (plus residual columns, if given), then
    one `compute_dtype` matmul.

    The upcast and scale multiply happen in float32 (exact for power-of-two scales) and the result
    is cast once; under `torch.compile` upcast, multiply and cast fuse into one pass over the weight.
    """
    w = dequantize(weight, weight_scale, block_size=block_size, dtype=compute_dtype)  # (out, in)
    w = _with_residual(w, residual_index, residual, residual_scale)
    b = bias.to(compute_dtype) if bias is not None else None
    return F.linear(x.to(compute_dtype), w, b).to(x.dtype)


def _with_residual(w: torch.Tensor, index: torch.Tensor | None, residual: torch.Tensor | None,
                   residual_scale: torch.Tensor | None) -> torch.Tensor:
    """The dequantised weight `w` (out, in) plus the residual columns, if any (out of place)."""
    if index is None:
        return w
    return w.index_add(1, index, dequantize(residual, residual_scale, dtype=w.dtype))


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch._scaled_mm` (``a @ b`` with dequant scales), the one place this package calls it.

    Off CUDA the arguments are first held to what the CUDA kernels accept (`check_cuda_scaled_mm`):
    the CPU kernel runs layouts and dtypes those refuse, so a CPU test of a GPU path would otherwise
    pass with calls that fail on the GPU. On CUDA the kernels check for themselves.
    """
    if not a.is_cuda:
        check_cuda_scaled_mm(a, b, scale_a, scale_b, out_dtype=out_dtype, bias=bias)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_cuda_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
                         out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
    """Raise ValueError where CUDA's `torch._scaled_mm` (cuBLASLt, or CUTLASS for row-wise scales)
    would refuse ``a @ b`` (a: (M, K), b: (K, N)) with these scales. The rules, from torch's
    ScaledBlas.cpp and RowwiseScaledMM.cu:

    - operands float8, not both E5M2; `a` row-major and `b` column-major (what sm89/sm90 cuBLASLt takes;
      Blackwell takes any layout); K and N multiples of 16;
    - scales float32, either both one element (tensor-wise) or (M, 1) and (1, N), contiguous (row-wise);
      row-wise runs CUTLASS where cuBLAS is older than 12.9, which takes E4M3 or E5M2 as `a` and only
      E4M3 as `b`, so `b` must be E4M3 for row-wise scales;
    - output bf16, fp16 or fp32 (tensor-wise also float8); a bias has N elements, is bf16 or fp16, and
      comes with an output of its own dtype.

        >>> a, b = torch.zeros(32, 64, dtype=torch.float8_e5m2), torch.zeros(16, 64, dtype=torch.float8_e5m2)
        >>> check_cuda_scaled_mm(a, b.t(), torch.ones(()), torch.ones(()), out_dtype=torch.float32)
        Traceback (most recent call last):
        ...
        ValueError: torch._scaled_mm on CUDA: both operands are E5M2; cuBLASLt multiplies E5M2 only with E4M3
    """
    def refuse(why: str) -> None:
        raise ValueError(f"torch._scaled_mm on CUDA: {why}")

    (m, k), n = a.shape, b.shape[1]
    if a.dtype not in FP8_DTYPES or b.dtype not in FP8_DTYPES:
        refuse(f"operands must be float8 (e4m3fn or e5m2), got {a.dtype} and {b.dtype}")
    if a.dtype == b.dtype == torch.float8_e5m2:
        refuse("both operands are E5M2; cuBLASLt multiplies E5M2 only with E4M3")
    if a.stride(1) != 1 or b.stride(0) != 1:
        refuse(f"a must be row-major and b column-major, got strides {a.stride()} and {b.stride()}")
    if k % 16 or n % 16:
        refuse(f"K and N must be multiples of 16, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32:
        refuse(f"scales must be float32, got {scale_a.dtype} and {scale_b.dtype}")
    rowwise = tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n)
    if not rowwise and not (scale_a.numel() == 1 and scale_b.numel() == 1):
        refuse(f"scales must be one element each or ({m}, 1) and (1, {n}), got {tuple(scale_a.shape)} and "
               f"{tuple(scale_b.shape)}")
    if rowwise and not (scale_a.is_contiguous() and scale_b.is_contiguous()):
        refuse("row-wise scales must be contiguous")
    if rowwise and b.dtype != torch.float8_e4m3fn:
        refuse(f"row-wise scaling (CUTLASS) takes b as E4M3 only, got {b.dtype}; pass the E5M2 operand as a")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32, *([] if rowwise else FP8_DTYPES)):
        refuse(f"output must be bf16, fp16 or fp32{'' if rowwise else ' or float8'}, got {out_dtype}")
    if bias is not None and (bias.dtype not in (torch.bfloat16, torch.float16) or bias.dtype != out_dtype
                             or bias.numel() != n):
        refuse(f"a bias must be bf16 or fp16 with N={n} elements and an output of its dtype, got a "
               f"{bias.dtype} bias of {bias.numel()} and a {out_dtype} output")


def quantize_activations_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) activations → e4m3 (M, K) and float32 dequant scales (M, 1), dynamic, power of two.
    No finiteness check (it would sync every call): a NaN/inf row gives a NaN output row."""
    amax = x2d.detach().abs().amax(dim=-1, keepdim=True).float()  # (M, 1)
    scale = compute_scale(amax, E4M3, check_finite=False)
    return cast_to_fp8(x2d.float() * scale, E4M3), (1.0 / scale).contiguous()


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                         bias: torch.Tensor | None, *, compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W8A8 through `torch._scaled_mm`: per-token e4m3 activations × per-output-channel e4m3 weights.

    `weight` is (out, in) e4m3 (row-major, so ``weight.t()`` is the column-major operand
    `_scaled_mm` wants); `weight_scale_row` is the (1, out) float32 dequant scale per output
    channel. `in` and `out` must be multiples of 16 (the converter's filter guarantees it).
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    xq, x_scale = quantize_activations_per_token(x2d)  # (M, K) e4m3, (M, 1)
    b = bias.to(compute_dtype) if bias is not None else None
    out = scaled_mm(xq, weight.t(), x_scale, weight_scale_row, bias=b, out_dtype=compute_dtype)  # (M, N)
    return out.reshape(*lead, weight.shape[0]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The module


def quantize_weight(weight: torch.Tensor, granularity: str, block_size: int | None = None):
    """(out, in) weight → (e4m3 weight, float32 dequant scales) in the layout `FP8InferenceLinear` keeps:
    tensor (1, 1), channel (out, 1), block (out, ceil(in / block_size))."""
    if granularity == "tensor":
        q, s = quantize_per_tensor(weight)
        return q, s.reshape(1, 1)
    if granularity == "channel":
        return quantize_per_channel(weight)
    if granularity == "block":
        if not block_size:
            raise ValueError("granularity 'block' needs a block_size")
        return quantize_per_block(weight, block_size)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


def scale_shape(out_features: int, in_features: int, granularity: str, block_size: int | None) -> tuple[int, int]:
    if granularity == "tensor":
        return (1, 1)
    if granularity == "channel":
        return (out_features, 1)
    if granularity == "block":
        return (out_features, num_blocks(in_features, block_size))
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")


class FP8InferenceLinear(nn.Module):
    """Inference-only linear layer: `weight` float8_e4m3fn (out, in), `weight_scale` float32 dequant
    scales (tensor: (1, 1), channel: (out, 1), block: (out, ceil(in / block_size))), optional `bias`.

    `weight` and `weight_scale` are buffers that keep their dtypes under ``model.to(dtype)`` /
    ``.half()`` (only device moves apply to them); `bias` follows the model's dtype.
    Set `backend` ("emulated" / "scaled_mm") explicitly, e.g. with `set_fp8_backend`.

        >>> import torch
        >>> m = FP8InferenceLinear.from_linear(torch.nn.Linear(32, 16), granularity="channel")
        >>> m.to(torch.bfloat16).weight.dtype
        torch.float8_e4m3fn
    """

    _FIXED_DTYPE_BUFFERS = ("weight", "weight_scale", "residual_index", "residual", "residual_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, granularity: str = "channel",
                 block_size: int | None = None, backend: str = "emulated", compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
        if granularity == "block" and not block_size:
            raise ValueError("granularity 'block' needs a block_size")
        if backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {backend!r}; expected one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        self.block_size = block_size if granularity == "block" else None
        self.backend = backend
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=E4M3.dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape(out_features, in_features, granularity, block_size),
                                                        dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False) \
            if bias else None
        # Residual columns (absent until set): int32 (k,) input columns, e4m3 (out, k), float32 (out, 1).
        self.register_buffer("residual_index", None)
        self.register_buffer("residual", None)
        self.register_buffer("residual_scale", None)
        # Static activation scale (absent unless set): float32 0-dim dequant scale; inputs are rounded to
        # e4m3 with it before the matmul, as the FP8 training forward did (FP8-trained checkpoints).
        self.register_buffer("input_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel", block_size: int = 64, *,
                    backend: str = "emulated", compute_dtype: torch.dtype = torch.bfloat16) -> "FP8InferenceLinear":
        """Quantise an `nn.Linear`'s weight to e4m3 with power-of-two scales of the given granularity."""
        q, s = quantize_weight(linear.weight.detach(), granularity, block_size)
        return cls.from_quantized(q, s, linear.bias.detach() if linear.bias is not None else None,
                                  granularity=granularity, block_size=block_size, backend=backend,
                                  compute_dtype=compute_dtype)

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                       granularity: str, block_size: int | None = None, backend: str = "emulated",
                       compute_dtype: torch.dtype = torch.bfloat16) -> "FP8InferenceLinear":
        """Wrap already-quantised tensors (e.g. read from an FP8 checkpoint), checking dtypes and shapes."""
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, granularity=granularity, block_size=block_size, backend=backend,
                compute_dtype=compute_dtype, device="meta")
        if weight.dtype != E4M3.dtype:
            raise ValueError(f"FP8 weight must be {E4M3.dtype}, got {weight.dtype}")
        expected = scale_shape(out_f, in_f, granularity, block_size)
        if tuple(weight_scale.shape) != expected:
            blocks = f" with blocks of {block_size}" if block_size and granularity == "block" else ""
            raise ValueError(f"weight_scale has shape {tuple(weight_scale.shape)}; a {granularity} scale for a "
                             f"({out_f}, {in_f}) weight{blocks} has shape {expected}")
        m.weight = weight.contiguous()
        m.weight_scale = weight_scale.to(torch.float32).contiguous()
        if bias is not None:
            m.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        return m

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast the float8 weight and float32 scales (float8 counts as
        # floating point): keep their dtypes and apply only the device move.
        before = {name: self._buffers[name] for name in self._FIXED_DTYPE_BUFFERS if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    @property
    def residual_columns(self) -> int:
        """How many input columns carry a residual (0: none)."""
        return 0 if self.residual_index is None else int(self.residual_index.numel())

    def set_residual_columns(self, weight: torch.Tensor, index: torch.Tensor | list[int]) -> None:
        """Store, for the input columns `index`, the rounding error ``weight - dequantized`` of those
        columns in e4m3 with a power-of-two scale per output row, so they come out almost exactly
        (`weight` is the full-precision (out, in) weight this layer was quantised from). An empty
        `index` removes the residual."""
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        if not index.numel():
            self.residual_index = self.residual = self.residual_scale = None
            return
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, "
                             f"expected {(self.out_features, self.in_features)}")
        index = index.unique(sorted=True).to(self.weight.device)
        if int(index[0]) < 0 or int(index[-1]) >= self.in_features:
            raise ValueError(f"residual column indices must lie in [0, {self.in_features})")
        base = dequantize(self.weight, self.weight_scale, block_size=self.block_size, dtype=torch.float32)
        error = weight.detach().to(torch.float32)[:, index] - base[:, index]
        q, s = quantize_per_channel(error)
        self.load_residual_columns(index.to(torch.int32), q, s)

    def load_residual_columns(self, index: torch.Tensor, residual: torch.Tensor, residual_scale: torch.Tensor) -> None:
        """Install stored residual columns (e.g. from a checkpoint), checking dtypes, shapes and indices."""
        k = index.numel()
        if index.dtype != torch.int32 or index.dim() != 1 or not k:
            raise ValueError(f"residual_index must be a non-empty 1-D int32 tensor, "
                             f"got {index.dtype} {tuple(index.shape)}")
        if residual.dtype != E4M3.dtype or tuple(residual.shape) != (self.out_features, k):
            raise ValueError(f"residual must be {E4M3.dtype} of shape {(self.out_features, k)} (out, columns), got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        if residual_scale.dtype != torch.float32 or tuple(residual_scale.shape) != (self.out_features, 1):
            raise ValueError(f"residual_scale must be float32 of shape {(self.out_features, 1)}, got "
                             f"{residual_scale.dtype} {tuple(residual_scale.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= self.in_features or index.unique().numel() != k:
            raise ValueError(f"residual_index must hold distinct columns in [0, {self.in_features})")
        self.residual_index, self.residual, self.residual_scale = \
            index.contiguous(), residual.contiguous(), residual_scale.contiguous()

    def stored_tensors(self) -> list[torch.Tensor]:
        """The weight, its scales and the residual columns, if any (what serving this layer holds; not the bias)."""
        return [t for t in (self.weight, self.weight_scale, self.residual_index, self.residual, self.residual_scale)
                if t is not None]

    def storage_bytes(self) -> int:
        """Bytes of `stored_tensors`."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` (out, in): ``weight * weight_scale``, plus the residual columns if any."""
        w = dequantize(self.weight, self.weight_scale, block_size=self.block_size, dtype=dtype)
        return _with_residual(w, self.residual_index, self.residual, self.residual_scale)

    def set_input_scale(self, input_scale: torch.Tensor | None) -> None:
        """Install a static per-tensor activation scale (float32, one element; None removes it)."""
        if input_scale is not None:
            if input_scale.numel() != 1 or not input_scale.is_floating_point() or not float(input_scale) > 0:
                raise ValueError(f"input_scale must be one positive float, got {input_scale.dtype} "
                                 f"{tuple(input_scale.shape)}")
            input_scale = input_scale.detach().to(torch.float32).reshape(())
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # round the activations to e4m3 with the static scale
            x = (fp8_to_float32(cast_to_fp8(x.float() / self.input_scale, E4M3)) * self.input_scale).to(x.dtype)
        if self.backend == "emulated" or (self.backend == "scaled_mm" and self.granularity == "block"):
            return fp8_linear_emulated(x, self.weight, self.weight_scale, self.bias, block_size=self.block_size,
                                       compute_dtype=self.compute_dtype, residual_index=self.residual_index,
                                       residual=self.residual, residual_scale=self.residual_scale)
        if self.backend == "scaled_mm":
            # tensor (1, 1) and channel (out, 1) → the (1, out) per-column layout _scaled_mm takes.
            scale_row = self.weight_scale.reshape(1, -1).expand(1, self.out_features).contiguous()
            out = fp8_linear_scaled_mm(x, self.weight, scale_row, self.bias, compute_dtype=self.compute_dtype)
            if self.residual_index is not None:
                r = dequantize(self.residual, self.residual_scale, dtype=self.compute_dtype)
                out = out + F.linear(x.index_select(-1, self.residual_index).to(self.compute_dtype), r).to(out.dtype)
            return out
        raise ValueError(f"unknown FP8 backend {self.backend!r}; expected one of {BACKENDS}")

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"granularity={self.granularity}{block}, backend={self.backend}")


def set_fp8_backend(model: nn.Module, backend: str) -> int:
    """Set `backend` on every `FP8InferenceLinear` in `model`; returns how many. Pass the result of
    `select_backend(device)` after moving the model to its device.

        >>> set_fp8_backend(torch.nn.Sequential(FP8InferenceLinear(16, 16)), select_backend("cpu"))
        1
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; expected one of {BACKENDS} (resolve 'auto' with "
                         "select_backend(device) first)")
    n = 0
    for module in model.modules():
        if isinstance(module, FP8InferenceLinear):
            module.backend = backend
            n += 1
    return n
