"""FP8 training linear (FP8-LM O1): FP8 GEMMs forward and backward, FP8 weight gradients.

`FP8TrainingLinear` keeps a higher-precision master weight (an `nn.Parameter`) and four scaling
states (scaling.py). One autograd function does the work:

- forward: input → E4M3 and weight → E4M3 (scaled per the recipe), ``y = x @ w.T (+ bias)``;
  the FP8 input and weight (1 byte per element) are what is saved for backward;
- backward: grad_output → E5M2; ``dgrad = g @ w`` and ``wgrad = g.T @ x`` from the FP8 operands;
  the weight gradient is then quantised to E4M3 with its own current per-tensor scale (FP8-LM's FP8
  weight gradient). Its dequantised value goes to ``weight.grad`` (what optimizers read), or, with
  ``grad_storage="fp8"`` (O2), its bytes and scale go to ``weight.scaled_grad`` instead.

For per-tensor recipes the work between the GEMMs is three pure functions of the scaling states,
`forward_pass`, `backward_pass` and `weight_grad_pass`, which ``fuse=True`` runs through
`torch.compile` (one call each, amaxes inside).

GEMM backends (pure functions on `FP8Operand`s computing ``a @ b.T``):

- ``emulated``: dequantise both operands to `compute_dtype` and run one matmul. On CPUs without
  native bf16 (AVX2-only) fp32 is the fast dtype; with AVX512-BF16/AMX, bf16 (`default_compute_dtype`).
- ``scaled_mm``: `torch._scaled_mm` (CUDA ≥ sm89; on CPU it runs too, slowly, for tests). Per-tensor
  recipes are one call; the ``block`` recipe runs one row-wise-scaled call per 128-wide slice of the
  contraction dim and sums the slices in float32 (the exact value of a block-scaled GEMM).

The ``block`` recipe's weight gradient contracts over tokens, so its operands are re-tiled along
tokens (128×1 tiles): the gradient is quantised again from high precision, the saved FP8 input is
dequantised and re-quantised — exact except for values that fall into subnormals, because all scales
are powers of two.

    >>> import torch
    >>> layer = FP8TrainingLinear(64, 32, recipe="delayed")
    >>> x = torch.randn(8, 64, requires_grad=True)
    >>> layer(x).sum().backward()
    >>> g = layer.weight.grad
    >>> g.shape, len(torch.unique(g / g.abs().max())) <= 256   # E4M3 values times one scale
    (torch.Size([32, 64]), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import fast_dtype
from .convert import FP8Recipe, quantization_description, skip_reason
from .formats import fp8_to_float32
from .fp16_master import FP16MasterLayout, fp16_master_value
from .fsdp import FP8AllGatherWeight, FP8ReduceScatter, gathered_weight_operand
from .linear import BACKENDS, FP8BackendError, FP8InferenceLinear, scaled_mm, select_backend
from .optim import FP16, ScaledGrad, tensor_quantize
from .scaling import (
    FP8TrainingRecipe,
    RoleStates,
    ScalingState,
    block_amax,
    build_role_states,
    compiled,
    expand_blocks,
    expand_tiles,
    get_training_recipe,
    per_tensor_step,
    quantize_scaled,
)

SCALED_MM_ALIGN = 16  # torch._scaled_mm needs operand dims that are multiples of 16
GradStorage = Literal["dequantized", "fp8"]
GRAD_STORAGES: tuple[str, ...] = get_args(GradStorage)


# ---------------------------------------------------------------------------------------------
# FP8 operands and GEMMs (pure)


class FP8Operand(NamedTuple):
    """A 2-D FP8 matrix and its dequantisation scales.

    kind ``"tensor"``: `scale_inv` 0-dim; ``"tile"``: (rows, ceil(cols / size)), one per 1×size tile
    along the last dim; ``"block"``: (ceil(rows / size), ceil(cols / size)), one per size×size block.
    """

    q: torch.Tensor
    scale_inv: torch.Tensor
    kind: str = "tensor"
    size: int = 0


def _scaled_upcast(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (fp8_to_float32(q) * s).to(dtype)


def dequantize_operand(op: FP8Operand, dtype: torch.dtype = torch.float32, fused: bool = False) -> torch.Tensor:
    """``q * scale_inv`` (per element) as `dtype`, computed in float32 (exact for power-of-two scales);
    `fused` runs it through `torch.compile` (one kernel)."""
    rows, cols = op.q.shape
    if op.kind == "tensor":
        s = op.scale_inv
    elif op.kind == "tile":
        s = expand_tiles(op.scale_inv, op.size, cols)  # (rows, cols)
    elif op.kind == "block":
        s = expand_blocks(op.scale_inv, op.size, rows, cols)  # (rows, cols)
    else:
        raise ValueError(f"unknown operand kind {op.kind!r}")
    if fused:  # contiguous inputs: one compiled variant per dtype and scale kind, not per stride
        return compiled(_scaled_upcast)(op.q.contiguous(), s.contiguous(), dtype)
    return _scaled_upcast(op.q, s, dtype)


def transpose_operand(op: FP8Operand) -> FP8Operand:
    """The transposed operand (exact for per-tensor and square-block scales; tiles cannot transpose)."""
    if op.kind == "tile":
        raise ValueError("1×N tiles do not transpose to 1×N tiles; re-quantise along the other dim")
    s = op.scale_inv.t() if op.kind == "block" else op.scale_inv
    return FP8Operand(op.q.t(), s, op.kind, op.size)


def gemm_emulated(a: FP8Operand, b: FP8Operand, compute_dtype: torch.dtype = torch.float32,
                  fused: bool = False) -> torch.Tensor:
    """``a @ b.T`` with both operands dequantised to `compute_dtype` (a: (M, K), b: (N, K) → (M, N))."""
    return F.linear(dequantize_operand(a, compute_dtype, fused), dequantize_operand(b, compute_dtype, fused))


def _pad_bytes(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an FP8 matrix to (rows, cols) through its bytes (0x00 is +0.0 in e4m3 and e5m2)."""
    r, c = q.shape
    if (r, c) == (rows, cols):
        return q.contiguous()
    return F.pad(q.contiguous().view(torch.uint8), (0, cols - c, 0, rows - r)).view(q.dtype)


def _round_up(n: int, m: int = SCALED_MM_ALIGN) -> int:
    return -(-n // m) * m


def _row_scales(op: FP8Operand, chunk: int, size: int, rows: int) -> torch.Tensor:
    """The (rows, 1) dequant scales of K-slice `chunk` (width `size`) of a tile / block operand."""
    if op.kind == "tile":
        s = op.scale_inv[:, chunk]  # (rows,)
    elif op.kind == "block":
        s = op.scale_inv[:, (chunk * size) // op.size].repeat_interleave(op.size)[:op.q.shape[0]]  # (rows,)
    else:
        s = op.scale_inv.expand(op.q.shape[0])
    return F.pad(s.float(), (0, rows - s.numel()), value=1.0).reshape(rows, 1)


def gemm_scaled_mm(a: FP8Operand, b: FP8Operand) -> torch.Tensor:
    """``a @ b.T`` in float32 through `torch._scaled_mm` (a: (M, K), b: (N, K) → (M, N)).

    Per-tensor operands: one call with 0-dim scales. Tile / block operands: one call per slice of
    `a.size` along K with row-wise scales (M, 1) × (1, N), slices summed in float32. Dims are padded
    to multiples of 16 with zero bytes (a requirement of the CUDA kernels).
    """
    (m, k), n = a.q.shape, b.q.shape[0]
    mp, np_ = _round_up(m), _round_up(n)
    cuda = a.q.is_cuda
    if a.kind == "tensor" and b.kind == "tensor":
        kp = _round_up(k)
        out = scaled_mm(_pad_bytes(a.q, mp, kp), _pad_bytes(b.q, np_, kp).t(), a.scale_inv.float(),
                        b.scale_inv.float(), out_dtype=torch.float32)  # (mp, np)
        return out[:m, :n]
    size = a.size
    if a.kind != "tile" or (b.kind == "block" and b.size % size) or (b.kind == "tile" and b.size != size):
        raise ValueError(f"scaled_mm: unsupported operand kinds {a.kind}/{a.size} × {b.kind}/{b.size}")
    out = torch.zeros(mp, np_, dtype=torch.float32, device=a.q.device)
    for j in range(-(-k // size)):
        lo, hi = j * size, min(k, (j + 1) * size)
        kp = _round_up(hi - lo)
        aj = _pad_bytes(a.q[:, lo:hi], mp, kp)  # (mp, kp)
        bj = _pad_bytes(b.q[:, lo:hi], np_, kp)  # (np, kp)
        # Row-wise scaling on CUDA outputs bf16; on CPU float32 keeps the slices exact.
        part = scaled_mm(aj, bj.t(), _row_scales(a, j, size, mp), _row_scales(b, j, size, np_).t().contiguous(),
                         out_dtype=torch.bfloat16 if cuda else torch.float32)
        out += part.float()
    return out[:m, :n]


def fp8_gemm(a: FP8Operand, b: FP8Operand, backend: str, compute_dtype: torch.dtype,
             fused: bool = False) -> torch.Tensor:
    """``a @ b.T`` on `backend` (``emulated`` returns `compute_dtype`, ``scaled_mm`` float32)."""
    if backend == "emulated":
        return gemm_emulated(a, b, compute_dtype, fused)
    if backend == "scaled_mm":
        return gemm_scaled_mm(a, b)
    raise ValueError(f"unknown FP8 backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------
# Quantising the operands of each GEMM by recipe


def quantize_input(states: RoleStates, recipe: FP8TrainingRecipe, x2d: torch.Tensor, record: bool = True) -> FP8Operand:
    """(M, K) activations → E4M3 operand quantised along K (per tensor, or 1×tile tiles). `record`:
    False in evaluation, which leaves the scaling state alone (the per-tensor scale stays the one
    training reached)."""
    if recipe.granularity == "block":
        return FP8Operand(*states.input.quantize_tiles(x2d, recipe.tile, record=record), "tile", recipe.tile)
    return FP8Operand(*states.input.quantize(x2d, record=record), "tensor")


def quantize_weight_operand(state: ScalingState, recipe: FP8TrainingRecipe, w: torch.Tensor,
                            record: bool = True) -> FP8Operand:
    """(N, K) master weight → E4M3 operand (per tensor, or block×block blocks). Records the step
    unless `record` is False (evaluation)."""
    if recipe.granularity == "block":
        return FP8Operand(*state.quantize_blocks(w, recipe.weight_block, record=record), "block",
                          recipe.weight_block)
    return FP8Operand(*state.quantize(w, record=record), "tensor")


def quantize_grad_output_tiles(states: RoleStates, recipe: FP8TrainingRecipe, g2d: torch.Tensor
                               ) -> tuple[FP8Operand, FP8Operand]:
    """``block`` recipe: (M, N) output gradient → E5M2 1×tile operands for dgrad (along N) and wgrad
    (transposed, along M). Per-tensor recipes quantise it in `backward_pass`. The step is recorded
    once, by the first layout (the second is the same gradient's, not another step)."""
    g_rows = FP8Operand(*states.grad_output.quantize_tiles(g2d, recipe.tile), "tile", recipe.tile)
    g_cols = FP8Operand(*states.grad_output.quantize_tiles(g2d.t(), recipe.tile, record=False), "tile",
                        recipe.tile)  # (N, M)
    return g_rows, g_cols


def retile_input_for_wgrad(states: RoleStates, recipe: FP8TrainingRecipe, xq: FP8Operand,
                           fused: bool = False) -> FP8Operand:
    """``block`` recipe: the saved (M, K) FP8 input as the (K, M) operand of wgrad (contraction over
    tokens M), re-tiled along M. Not recorded: the forward recorded the input's step."""
    xt = dequantize_operand(xq, fused=fused).t()  # (K, M), exact
    return FP8Operand(*states.input.quantize_tiles(xt, recipe.tile, record=False), "tile", recipe.tile)


def weight_for_dgrad(wq: FP8Operand) -> FP8Operand:
    """The (N, K) FP8 weight as the (K, N) operand of dgrad (``g @ w = g @ (w.T).T``)."""
    return transpose_operand(wq)


# ---------------------------------------------------------------------------------------------
# Per-tensor training passes: all the work between the GEMMs, one pure function each way


def forward_pass(x2d: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor | None,
                 x_step: tuple, w_step: tuple, x_constants: dict[str, Any], w_constants: dict[str, Any],
                 upcast: torch.dtype | None) -> tuple:
    """The forward of a per-tensor recipe up to its GEMM: records the input's and the weight's steps
    (`per_tensor_step` with each role's `ScalingState.step_args`) and, for the emulated GEMM (`upcast`:
    its dtype), dequantises both operands. Returns ``(xq, x_scale_inv, wq, w_scale_inv, x_state (3),
    w_state (3), x value, w value)`` (values None without `upcast`). `FP8TrainingLinear(fuse=True)`
    compiles it: one call where each role's step was a call of its own, and the amaxes inside."""
    w = fp16_master_value(weight, weight_scale_inv)
    xq, xs, *x_state = per_tensor_step(x2d, *x_step, **x_constants)
    wq, ws, *w_state = per_tensor_step(w, *w_step, **w_constants)
    xv = wv = None
    if upcast is not None:
        xv, wv = _scaled_upcast(xq, xs, upcast), _scaled_upcast(wq, ws, upcast)
    return xq, xs, wq, ws, *x_state, *w_state, xv, wv


def backward_pass(g2d: torch.Tensor, g_step: tuple, g_constants: dict[str, Any], xq: torch.Tensor,
                  xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, upcast: torch.dtype | None,
                  need_dgrad: bool = True, need_wgrad: bool = True) -> tuple:
    """The backward of a per-tensor recipe up to its GEMMs: records the output gradient's step (E5M2)
    and lays out the operands of dgrad (``g @ w``) and wgrad (``g.T @ x``). For the emulated GEMM
    (`upcast`) those are the dequantised g, x and w; for `torch._scaled_mm`, the contiguous transposes
    it needs (g.T, x.T, w.T: its second operand is column-major). An operand only the GEMM that is not
    needed uses is None (a frozen weight needs no wgrad, an input without gradient no dgrad).
    Returns ``(gq, g_scale_inv, g_state (3), g operand, x operand, w operand)``."""
    gq, gs, *g_state = per_tensor_step(g2d, *g_step, **g_constants)
    if upcast is not None:
        g_op = _scaled_upcast(gq, gs, upcast)
        x_op = _scaled_upcast(xq, xs, upcast) if need_wgrad else None
        w_op = _scaled_upcast(wq, ws, upcast) if need_dgrad else None
    else:
        g_op = gq.t().contiguous() if need_wgrad else None
        x_op = xq.t().contiguous() if need_wgrad else None
        w_op = wq.t().contiguous() if need_dgrad else None
    return gq, gs, *g_state, g_op, x_op, w_op


def weight_grad_pass(wgrad: torch.Tensor, previous_q: torch.Tensor | None, previous_scale_inv: torch.Tensor | None,
                     step: tuple, constants: dict[str, Any], upcast: torch.dtype | None) -> tuple:
    """The FP8 weight gradient (FP8-LM O1): `wgrad` (plus the stored FP8 gradient of an earlier
    micro-batch, summed in float32: one rounding per micro-batch) recorded in the ``weight_grad`` role
    (`per_tensor_step`). Returns ``(q, scale_inv, state (3), value, l2)``: with `upcast` the value
    dequantised to it (for ``weight.grad``), else the stored gradient's 2-norm (`ScaledGrad.l2`, for
    clipping and the optimizer's finiteness check)."""
    if previous_q is not None:
        wgrad = wgrad.float() + ScaledGrad(previous_q, previous_scale_inv).dequantize()
    q, s, *state = per_tensor_step(wgrad, *step, **constants)
    if upcast is not None:
        return q, s, *state, _scaled_upcast(q, s, upcast), None
    return q, s, *state, None, ScaledGrad(q, s).norm()


def _per_tensor_forward(layer: "FP8TrainingLinear", x2d: torch.Tensor, weight: torch.Tensor, backend: str,
                        cdt: torch.dtype, replay: bool = False) -> tuple[torch.Tensor, FP8Operand, FP8Operand]:
    """``(y, xq, wq)`` of a training forward with a per-tensor recipe, through `forward_pass`. A recording
    forward keeps its steps' arguments on the layer; `replay` (gradient checkpointing re-running it in
    the backward) computes with those, so its FP8 operands are the recorded forward's bytes, and records
    nothing."""
    states, scale_inv = layer.states, getattr(layer, "weight_scale_inv", None)
    if replay:
        x_step, x_constants, w_step, w_constants = layer.take_recorded_forward()
    else:
        x_step, x_constants = states.input.step_args(x2d)
        w_step, w_constants = states.weight.step_args(lambda: fp16_master_value(weight, scale_inv))
        layer.keep_recorded_forward((x_step, x_constants, w_step, w_constants))
    upcast = cdt if backend == "emulated" else None
    run = compiled(forward_pass) if layer.fuse else forward_pass
    xq, xs, wq, ws, *rest = run(x2d.detach(), weight.detach(), scale_inv, x_step, w_step, x_constants, w_constants,
                                upcast)
    if not replay:
        states.input.commit(*rest[:3])
        states.weight.commit(*rest[3:6])
    xv, wv = rest[6:]
    a, b = FP8Operand(xq, xs, "tensor"), FP8Operand(wq, ws, "tensor")
    return (F.linear(xv, wv) if upcast is not None else fp8_gemm(a, b, backend, cdt)), a, b


def _per_tensor_backward(layer: "FP8TrainingLinear", g2d: torch.Tensor, xq: FP8Operand, wq: FP8Operand, backend: str,
                         cdt: torch.dtype, need: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dgrad (M, K), wgrad (N, K))`` of a per-tensor recipe, through `backward_pass`; `need` says
    which of the two to compute."""
    st = layer.states.grad_output
    g_step, g_constants = st.step_args(g2d)
    upcast = cdt if backend == "emulated" else None
    run = compiled(backward_pass) if layer.fuse else backward_pass
    gq, gs, *rest = run(g2d.detach(), g_step, g_constants, xq.q, xq.scale_inv, wq.q, wq.scale_inv, upcast, *need)
    st.commit(*rest[:3])
    g_op, x_op, w_op = rest[3:]
    if upcast is not None:  # dequantised operands: dgrad = g @ w, wgrad = g.T @ x
        dgrad = F.linear(g_op, w_op.t()) if need[0] else None
        return dgrad, (F.linear(g_op.t(), x_op.t()) if need[1] else None)
    # scaled_mm: the FP8 bytes, and the contiguous transposes w.T (K, N), g.T (N, M), x.T (K, M)
    dgrad = gemm_scaled_mm(FP8Operand(gq, gs), FP8Operand(w_op, wq.scale_inv)) if need[0] else None
    wgrad = gemm_scaled_mm(FP8Operand(g_op, gs), FP8Operand(x_op, xq.scale_inv)) if need[1] else None
    return dgrad, wgrad


def rerun_in_backward() -> bool:
    """Whether this forward runs inside a backward pass, which a training forward never does: gradient
    checkpointing (``torch.utils.checkpoint``, reentrant or not) re-running it to rebuild what the
    backward needs."""
    return torch._C._current_graph_task_id() != -1


# ---------------------------------------------------------------------------------------------
# The autograd function


class _FP8LinearFunction(torch.autograd.Function):
    """``y = x @ w.T + b`` with FP8 operands both ways; `layer` holds the recipe and scaling states."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "FP8TrainingLinear"):
        recipe, states = layer.recipe, layer.states
        backend, cdt = layer.resolved_backend(x.device), layer.resolved_compute_dtype(x.device)
        x2d = x.reshape(-1, x.shape[-1])  # (M, K)
        replay = layer.training and rerun_in_backward()  # gradient checkpointing: the same bytes, no new step
        record = layer.training and not replay  # evaluation leaves the scaling state (and the next step) alone
        gathered = gathered_weight_operand(weight)
        if layer.training and recipe.granularity == "tensor" and gathered is None:  # training's common case
            y, xq, wq = _per_tensor_forward(layer, x2d, weight, backend, cdt, replay)
        else:  # evaluation; the block recipe (its scales are the tensor's own: a replay is record=False)
            xq = quantize_input(states, recipe, x2d, record)
            if gathered is not None:  # FSDP2 all-gathered the E4M3 bytes (O3): use them, record the step
                if replay:  # FSDP2's pre-all-gather hook has recorded the weight's step again by now
                    raise NotImplementedError("gradient checkpointing re-ran an FP8 layer whose weights FSDP2 "
                                              "all-gathers as E4M3 (fp8-o3): not supported; turn one of them off")
                q, scale_inv, amax, counts = gathered  # copies: FSDP frees and refills the gathered buffer
                wq = FP8Operand(q.clone(), scale_inv.clone(), "tensor")  # before backward
                if record:
                    states.weight.record_quantized(amax, scale_inv, counts)
            else:
                wq = quantize_weight_operand(states.weight, recipe, layer.effective_weight(weight), record)
            y = fp8_gemm(xq, wq, backend, cdt, layer.fuse)  # (M, N)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.layer, ctx.backend, ctx.cdt = layer, backend, cdt
        ctx.meta = (xq.kind, xq.size, wq.kind, wq.size, x.dtype, x.shape, bias is not None)
        ctx.save_for_backward(xq.q, xq.scale_inv, wq.q, wq.scale_inv)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer, backend, cdt = ctx.layer, ctx.backend, ctx.cdt
        recipe, states = layer.recipe, layer.states
        xkind, xsize, wkind, wsize, xdtype, xshape, has_bias = ctx.meta
        xq_q, xq_s, wq_q, wq_s = ctx.saved_tensors
        xq, wq = FP8Operand(xq_q, xq_s, xkind, xsize), FP8Operand(wq_q, wq_s, wkind, wsize)
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        dgrad = wgrad = None
        if recipe.granularity == "tensor":
            dgrad, wgrad = _per_tensor_backward(layer, g2d, xq, wq, backend, cdt, ctx.needs_input_grad[:2])
        else:
            g_rows, g_cols = quantize_grad_output_tiles(states, recipe, g2d)
            if ctx.needs_input_grad[0]:
                dgrad = fp8_gemm(g_rows, weight_for_dgrad(wq), backend, cdt, layer.fuse)  # (M, K)
            if ctx.needs_input_grad[1]:
                xt = retile_input_for_wgrad(states, recipe, xq, layer.fuse)  # (K, M)
                wgrad = fp8_gemm(g_cols, xt, backend, cdt, layer.fuse)  # (N, K)
        if ctx.needs_input_grad[0]:
            dgrad = dgrad.to(xdtype).reshape(xshape)
        if ctx.needs_input_grad[1]:
            wgrad = layer.finish_weight_grad(wgrad)  # (N, K) or None
        dbias = g2d.float().sum(0).to(grad_out.dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dgrad, wgrad, dbias, None


# ---------------------------------------------------------------------------------------------
# The module


def default_compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The emulated backend's matmul dtype: bf16 on CUDA and on CPUs with native bf16, else float32.

        >>> default_compute_dtype("cpu") in (torch.float32, torch.bfloat16)
        True
    """
    return fast_dtype(torch.device(device if device is not None else "cpu"))


class FP8TrainingLinear(FP16MasterLayout):
    """`nn.Linear` trained with FP8 GEMMs (FP8-LM O1): master weight in `weight.dtype`, FP8 compute.

    `recipe`: ``"delayed"`` / ``"current"`` / ``"block"`` or an `FP8TrainingRecipe`. `backend`:
    ``"auto"`` (``scaled_mm`` on CUDA ≥ sm89, else ``emulated``), ``"emulated"`` or ``"scaled_mm"``
    (an error naming the fix where it cannot run; ``allow_cpu_scaled_mm=True`` runs it on CPU for
    numerics tests). `compute_dtype`: the emulated matmul dtype (None → `default_compute_dtype`).
    `fp8_weight_grad`: quantise the weight gradient to FP8 (O1), else keep it in high precision.
    `grad_storage`: ``"dequantized"`` puts the FP8 weight gradient, dequantised, in ``weight.grad`` (what
    any optimizer reads); ``"fp8"`` (O2) keeps only the E4M3 bytes and scale, as ``weight.scaled_grad``
    (a `ScaledGrad`, summed over micro-batches), and leaves ``weight.grad`` None: `FP8AdamW` and
    `clip_grad_norm_` read it. `keep_fp16_master()` then stores the weight itself as the FP16 master
    with a per-tensor scale (2 bytes per weight; `FP8AdamW` updates it in place).
    `fuse`: run the quantise / dequantise passes through `torch.compile` (a few kernels each, same
    bytes; `precision.fp8_fuse` turns it on for CUDA; on CPU the first call compiles, ~20 s on 2 cores).
    Scaling states travel in ``state_dict()`` (as extra state), so a resumed run is bit-identical.

        >>> import torch
        >>> layer = FP8TrainingLinear.from_linear(torch.nn.Linear(64, 32), recipe="block")
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 recipe: str | FP8TrainingRecipe = "delayed", backend: str = "auto",
                 compute_dtype: torch.dtype | None = None, fp8_weight_grad: bool = True,
                 grad_storage: GradStorage = "dequantized", fuse: bool = False,
                 allow_cpu_scaled_mm: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, group: Any = None):
        super().__init__()
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown FP8 backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.recipe = get_training_recipe(recipe)
        self.backend, self.compute_dtype = backend, compute_dtype
        self.fp8_weight_grad, self.allow_cpu_scaled_mm, self.fuse = fp8_weight_grad, allow_cpu_scaled_mm, fuse
        if grad_storage not in GRAD_STORAGES:
            raise ValueError(f"grad_storage must be one of {GRAD_STORAGES}, got {grad_storage!r}")
        if grad_storage == "fp8" and not fp8_weight_grad:
            raise ValueError("grad_storage='fp8' needs fp8_weight_grad=True")
        self.grad_storage = grad_storage
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        nn.Linear.reset_parameters(self)  # the same init as nn.Linear
        self.states = build_role_states(self.recipe, device=self.weight.device, group=group, fused=fuse)
        self._recorded_forward: tuple | None = None
        self._unreplayed_forwards = 0
        if backend != "auto" and self.weight.device.type != "meta":
            self.resolved_backend(self.weight.device)  # fail early, with the fix in the message

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "FP8TrainingLinear":
        """Wrap an `nn.Linear`'s parameters (the same tensors, not copies) in an FP8 training linear."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        m.weight = linear.weight
        m.bias = linear.bias
        m.states = build_role_states(m.recipe, device=linear.weight.device, group=m.states.input.group, fused=m.fuse)
        if m.backend != "auto":
            m.resolved_backend(m.weight.device)
        return m

    # -- gradient checkpointing ------------------------------------------------------------------

    def keep_recorded_forward(self, step_args: tuple) -> None:
        """Keep a recording forward's scaling-step arguments (the state before its step: small tensors)
        for gradient checkpointing's replay of it (`take_recorded_forward`)."""
        self._recorded_forward = step_args
        self._unreplayed_forwards += 1

    def take_recorded_forward(self) -> tuple:
        """The arguments of the forward that gradient checkpointing replays: the last recording one. One
        forward per layer per backward is what can be told apart (as Transformer Engine's checkpointing
        assumes): a replay after two is refused rather than given the wrong forward's scales."""
        if self._recorded_forward is None:
            raise RuntimeError("gradient checkpointing re-ran an FP8 layer's forward that was never recorded")
        if self._unreplayed_forwards > 1:
            raise RuntimeError(f"gradient checkpointing re-ran an FP8 layer that ran {self._unreplayed_forwards} "
                               "training forwards since its last backward: only one can be replayed with the "
                               "scales it used")
        self._unreplayed_forwards = 0
        return self._recorded_forward

    # -- backend and dtype -----------------------------------------------------------------------

    def resolved_backend(self, device: torch.device) -> str:
        """The concrete backend on `device` (raises `FP8BackendError` when a forced one cannot run)."""
        return select_backend(device, self.backend, allow_cpu_scaled_mm=self.allow_cpu_scaled_mm)

    def resolved_compute_dtype(self, device: torch.device) -> torch.dtype:
        return self.compute_dtype or default_compute_dtype(device)

    # -- forward / backward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self)

    def effective_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's value: the parameter, or the FP16 master times its scale (`keep_fp16_master`)."""
        return fp16_master_value(self.weight if weight is None else weight, getattr(self, "weight_scale_inv", None))

    @torch.no_grad()
    def keep_fp16_master(self) -> None:
        """Store the weight as FP16 times a per-tensor power-of-two dequant scale (`weight_scale_inv`,
        a buffer, also reachable as ``weight.master_scale_inv`` for `FP8AdamW`): FP8-LM's FP16 master,
        kept in the parameter itself, so no FP32 copy of the weight exists."""
        self._hold_fp16_master(*tensor_quantize(self.effective_weight(), FP16), self.weight.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state saved with the FP16 master (a `weight_scale_inv` entry) loads into a module built
        # without it: take the same layout first (export and evaluation rebuild models that way).
        if prefix + "weight_scale_inv" in state_dict and getattr(self, "weight_scale_inv", None) is None:
            self._hold_fp16_master(torch.empty_like(self.weight, dtype=torch.float16),
                                   torch.ones((), device=self.weight.device), self.weight.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def finish_weight_grad(self, wgrad: torch.Tensor) -> torch.Tensor | None:
        """(out, in) float32 weight gradient → FP8 E4M3 → dequantised in the weight's dtype for ``.grad``;
        with ``grad_storage="fp8"``, summed into ``weight.scaled_grad`` instead (None for autograd).
        Without `fp8_weight_grad`, just cast."""
        if not self.fp8_weight_grad:
            return wgrad.to(self.weight.dtype)
        st, keep_fp8 = self.states.weight_grad, self.grad_storage == "fp8"
        previous = getattr(self.weight, "scaled_grad", None) if keep_fp8 else None
        if previous is not None and not st.amax_is_local():  # the shared amax is the sum's
            wgrad, previous = wgrad.float() + previous.dequantize(), None
        step, constants = st.step_args(wgrad)
        run = compiled(weight_grad_pass) if self.fuse else weight_grad_pass
        earlier = (None, None) if previous is None else (previous.q, previous.scale_inv)
        q, s_inv, *rest = run(wgrad, *earlier, step, constants, None if keep_fp8 else self.weight.dtype)
        st.commit(*rest[:3])
        value, l2 = rest[3:]
        if keep_fp8:
            self.weight.scaled_grad = ScaledGrad(q, s_inv, l2)
            return None
        return value

    # -- checkpoints and reporting ---------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, **{role: getattr(self.states, role).state_dict()
                                               for role in self.states._fields}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["recipe"] != self.recipe.name:
            raise ValueError(f"checkpoint holds FP8 scaling state of recipe {state['recipe']!r}, this layer uses "
                             f"{self.recipe.name!r}; convert the model with the checkpoint's recipe "
                             f"(grm-train: --precision.fp8_recipe {state['recipe']})")
        for role in self.states._fields:
            getattr(self.states, role).load_state_dict(state[role])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # FP16MasterLayout keeps the FP16 master's scale linked
        if self.weight.device.type != "meta":
            for st in self.states:
                st.to(self.weight.device)
        return self

    def scaling_stats(self) -> dict[str, dict[str, int]]:
        """Counters per role (see `ScalingState.stats`)."""
        return {role: getattr(self.states, role).stats() for role in self.states._fields}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"recipe={self.recipe.name}, backend={self.backend}")


# ---------------------------------------------------------------------------------------------
# Converter and export


@dataclass
class TrainingConversionReport:
    """What `convert_to_fp8_training` did."""

    recipe: str
    backend: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Linear layers left in high precision, with the reason."""
    converted_params: int = 0

    def summary(self) -> str:
        return (f"FP8 training ({self.recipe}, {self.backend}): {len(self.converted)} linears converted "
                f"({self.converted_params:,} weights), {len(self.skipped)} kept in high precision")


def training_skip_reason(name: str, module: nn.Module, skip: tuple[str, ...]) -> str | None:
    """Why `module` is not converted for FP8 training, or None when it is: the inference converter's
    filter (convert.py: never the reward head, `skip` patterns, dims not multiples of 16)."""
    return skip_reason(name, module, FP8Recipe(name="training", skip=tuple(skip)))


def convert_to_fp8_training(model: nn.Module, recipe: str | FP8TrainingRecipe = "delayed", backend: str = "auto", *,
                            skip: tuple[str, ...] = ("lm_head", "embed_tokens"),
                            compute_dtype: torch.dtype | None = None, fp8_weight_grad: bool = True,
                            grad_storage: GradStorage = "dequantized", fuse: bool = False,
                            allow_cpu_scaled_mm: bool = False, group: Any = None) -> TrainingConversionReport:
    """Replace, in place, every `nn.Linear` passing the filter by an `FP8TrainingLinear` sharing its
    parameters. Never the reward head; not `skip` patterns (LM head, embeddings); not layers whose
    dims are not multiples of 16.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
        >>> r = convert_to_fp8_training(net, "delayed")
        >>> r.converted, r.skipped
        (['0'], {'1': 'dims (10, 64) not multiples of 16'})
    """
    recipe = get_training_recipe(recipe)
    report = TrainingConversionReport(recipe=recipe.name, backend=backend)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        reason = training_skip_reason(name, module, tuple(skip))
        if reason is not None:
            report.skipped[name] = reason
            continue
        new = FP8TrainingLinear.from_linear(module, recipe=recipe, backend=backend, compute_dtype=compute_dtype,
                                            fp8_weight_grad=fp8_weight_grad, grad_storage=grad_storage, fuse=fuse,
                                            allow_cpu_scaled_mm=allow_cpu_scaled_mm, group=group)
        model.set_submodule(name, new)
        report.converted.append(name)
        report.converted_params += module.weight.numel()
    return report


@dataclass
class FP8WeightExport:
    """A trained layer's E4M3 weight in the layout `FP8InferenceLinear.from_quantized` loads."""

    weight: torch.Tensor
    """float8_e4m3fn (out, in): the bytes the next training forward computes with."""
    weight_scale: torch.Tensor
    """float32 dequant scales: (1, 1) for per-tensor recipes; (out, ceil(in / 128)) for `block`
    (each 128×128 block's scale repeated on its 128 rows = FP8InferenceLinear's "block" granularity)."""
    bias: torch.Tensor | None
    granularity: str
    block_size: int | None
    input_scale: torch.Tensor | None = None
    """float32 0-dim dequant scale of the inputs (delayed per-tensor recipes, after warm-up): the scale
    the training forward rounds activations with in evaluation, served as a static activation scale."""

    def to_inference_linear(self, backend: str = "emulated",
                            compute_dtype: torch.dtype = torch.bfloat16) -> FP8InferenceLinear:
        m = FP8InferenceLinear.from_quantized(self.weight, self.weight_scale, self.bias,
                                              granularity=self.granularity, block_size=self.block_size,
                                              backend=backend, compute_dtype=compute_dtype)
        m.set_input_scale(self.input_scale)
        return m


@torch.no_grad()
def export_fp8_weights(module: FP8TrainingLinear) -> FP8WeightExport:
    """The E4M3 weight bytes and dequant scales the layer's next forward would use (the weight state's
    scale, not updated), in `FP8InferenceLinear`'s layout: per-tensor → granularity ``"tensor"``
    (1, 1); 128×128 blocks → granularity ``"block"`` with `block_size` 128 and the block scales
    expanded to rows (out, ceil(in / 128)), which dequantises to exactly the same values.

        >>> import torch
        >>> layer = FP8TrainingLinear(64, 32, recipe="block")
        >>> e = export_fp8_weights(layer)
        >>> e.granularity, tuple(e.weight_scale.shape)
        ('block', (32, 1))
        >>> torch.equal(e.to_inference_linear().dequantized_weight(), layer_weight_dequantized(layer))
        True
    """
    w, st, recipe = module.effective_weight().detach().float(), module.states.weight, module.recipe
    bias = module.bias.detach().clone() if module.bias is not None else None
    granularity, bsz = recipe.serving_layout
    if granularity == "block":
        scale = st.local_scales(block_amax(w, bsz))  # (nr, nc)
        q = quantize_scaled(w, expand_blocks(scale, bsz, *w.shape), st.fmt)
        rows = (1.0 / scale).repeat_interleave(bsz, dim=0)[: w.shape[0]]  # (out, nc)
        return FP8WeightExport(q, rows.contiguous(), bias, granularity, bsz)
    scale = st.next_scale(st.amax(w))
    q = quantize_scaled(w, scale, st.fmt)
    inputs = module.states.input
    input_scale = None if inputs.in_warmup else (1.0 / inputs.delayed_scale()).reshape(())
    return FP8WeightExport(q, (1.0 / scale).reshape(1, 1), bias, granularity, bsz, input_scale)


def layer_weight_dequantized(module: FP8TrainingLinear) -> torch.Tensor:
    """The float32 (out, in) weight the layer's next forward computes with (quantised, dequantised)."""
    e = export_fp8_weights(module)
    bs = e.block_size
    s = e.weight_scale if bs is None else e.weight_scale.repeat_interleave(bs, dim=1)[:, : e.weight.shape[1]]
    return fp8_to_float32(e.weight) * s


def to_fp8_inference(model: nn.Module, backend: str = "emulated", compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every `FP8TrainingLinear` in `model` by the `FP8InferenceLinear` holding its exported
    E4M3 bytes (no re-quantisation); returns how many.

        >>> import torch
        >>> net = torch.nn.Sequential(FP8TrainingLinear(32, 16))
        >>> to_fp8_inference(net), type(net[0]).__name__
        (1, 'FP8InferenceLinear')
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)]
    for name in names:
        exported = export_fp8_weights(model.get_submodule(name))
        model.set_submodule(name, exported.to_inference_linear(backend, compute_dtype))
    return len(names)


def to_plain_linears(model: nn.Module) -> int:
    """Replace every `FP8TrainingLinear` in `model` by an `nn.Linear` holding its master weight's float32
    value and its bias (what a high-precision export, e.g. a policy for vLLM, saves); returns how many.

        >>> import torch
        >>> net = torch.nn.Sequential(FP8TrainingLinear(32, 16))
        >>> to_plain_linears(net), type(net[0]).__name__, net[0].weight.dtype
        (1, 'Linear', torch.float32)
    """
    names = [n for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)]
    for name in names:
        layer = model.get_submodule(name)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.effective_weight().detach().float().clone(),
                                    requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            plain.bias = layer.bias
        model.set_submodule(name, plain)
    return len(names)


def shard_fp8_weights(model: nn.Module) -> int:
    """Wrap the weight of every `FP8TrainingLinear` in `model` as an `FP8AllGatherWeight` (in place,
    before `fully_shard`); returns how many. Per-tensor recipes only."""
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, FP8TrainingLinear):
            continue
        if module.recipe.granularity != "tensor":
            raise ValueError(f"{name}: FP8 all-gather needs a per-tensor recipe (delayed or current), not "
                             f"{module.recipe.name!r}: 128x128 weight blocks would straddle FSDP's shard boundaries")
        if getattr(module, "weight_scale_inv", None) is not None:
            raise ValueError(f"{name}: FP8 all-gather works on fp32 master weights; use precision.fp8_master fp32")
        module.weight = nn.Parameter(FP8AllGatherWeight(module.weight.data), requires_grad=module.weight.requires_grad)
        n += 1
    return n


def reduce_scatter_in_fp8(model: nn.Module) -> list[str]:
    """Give every FSDP2 module that manages an FP8 linear's weight (`FP8TrainingLinear`; the module
    nearest above it that `fully_shard` wrapped) an `FP8ReduceScatter`, after `fully_shard`; returns
    their names ("" for the root). Their other parameters' gradients (norms) travel in the same buffer."""
    from torch.distributed.fsdp import FSDPModule

    names = dict(model.named_modules())
    sharded = [name for name, m in names.items() if isinstance(m, FSDPModule)]
    owners = set()
    for name, module in names.items():
        if isinstance(module, FP8TrainingLinear):
            above = [s for s in sharded if s == "" or name.startswith(s + ".")]
            if above:
                owners.add(max(above, key=len))
    for owner in owners:
        names[owner].set_custom_reduce_scatter(FP8ReduceScatter())
    return sorted(owners)


def fp8_scaling_stats(model: nn.Module) -> dict[str, dict[str, dict[str, int]]]:
    """`FP8TrainingLinear.scaling_stats` of every FP8 training linear in `model`, by module name."""
    return {n: m.scaling_stats() for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}


__all__ = ["FP8Operand", "GRAD_STORAGES", "FP8TrainingLinear", "FP8WeightExport", "TrainingConversionReport",
           "FP8BackendError", "convert_to_fp8_training", "default_compute_dtype", "dequantize_operand",
           "export_fp8_weights", "fp8_gemm", "fp8_scaling_stats", "reduce_scatter_in_fp8", "shard_fp8_weights",
           "gemm_emulated", "gemm_scaled_mm", "layer_weight_dequantized",
           "to_fp8_inference", "to_plain_linears", "training_skip_reason"]


def export_trained_fp8(model: nn.Module) -> list[str]:
    """Turn a trained `GRMModel`'s FP8 training linears into the `FP8InferenceLinear`s holding their
    E4M3 bytes and scales (no re-quantisation) and record the `grm.quantization` block, so that
    `save_fp8_grm` writes a checkpoint grm-serve serves as trained. Returns the converted names.

        >>> from grmserve.training.core.assets import tiny_llama_config
        >>> from grmserve.training.core.model import init_grm
        >>> model = init_grm(tiny_llama_config(), seed=0)
        >>> _ = convert_to_fp8_training(model, "delayed")
        >>> names = export_trained_fp8(model)
        >>> model.grm_config.quantization["granularity"], len(names) == len(model.grm_config.quantization["modules"])
        ('tensor', True)
    """
    trained = {n: m for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}
    if not trained:
        raise ValueError("the model has no FP8 training linears to export")
    exports = {n: export_fp8_weights(m) for n, m in trained.items()}
    first = next(iter(exports.values()))
    if any((e.granularity, e.block_size) != (first.granularity, first.block_size) for e in exports.values()):
        raise ValueError("FP8 training linears of one model must share a recipe to be exported together")
    recipe = next(iter(trained.values())).recipe.name
    for name, export in exports.items():
        model.set_submodule(name, export.to_inference_linear())
    prefix = "lm."
    names = [n[len(prefix):] if n.startswith(prefix) else n for n in trained]
    description = FP8Recipe(name=f"fp8-trained-{recipe}", granularity=first.granularity,
                            block_size=first.block_size or 64)
    model.grm_config.quantization = quantization_description(description, names)
    model.grm_config.quantization["trained"] = {"recipe": recipe}
    return names
