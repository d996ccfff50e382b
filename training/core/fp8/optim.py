"""`FP8AdamW`: AdamW with FP8-LM O2 state (FP8 first moment, FP16 second moment, FP16 master option).

State per parameter (flattened; blocks of `block_size` consecutive elements):

- ``exp_avg`` (m): float8 E4M3, 1 byte, with a float32 power-of-two dequant scale per block
  (``exp_avg_scale_inv``). Per block, not per tensor: m changes sign and spans many decades within
  a tensor (rows of rarely-used tokens or channels sit 10^4–10^6 below the busiest ones); with one
  scale per tensor the small ones fall into e4m3's subnormals or flush to zero. Blocks of 128 cost
  4/128 = 0.03 bytes per parameter. ``block_size=None`` gives FP8-LM's per-tensor scale.
- ``exp_avg_sq`` (v): stored as ``sqrt(v)`` in float16, 2 bytes, with a power-of-two scale per
  block (``exp_avg_sq_scale_inv``) that maps the block's largest sqrt(v) near float16's max. v = g²
  spans twice the decades of g: stored directly, v of gradients below ~2.4e-4 is below float16's
  smallest normal (6.1e-5) and below ~2.4e-4·2^-7 it flushes to 0, turning m / (sqrt(v) + eps) into
  a huge step. sqrt(v) has the range of g, and the block scale moves that range to where float16 has
  its 11 significant bits; the update needs sqrt(v) anyway.
- master weights: ``master_weights="fp32"``: the parameter itself (must be float32) is the master.
  ``"fp16"`` (FP8-LM precision decoupling): the optimizer keeps ``master`` in float16 with a
  per-tensor power-of-two scale (``master_scale_inv``, chosen from the new weight's amax every
  step) and copies the dequantised master into the parameter, which then is a working copy in the
  model's dtype (e.g. bf16; an FP8 training linear only reads it to quantise it to E4M3).
  Whatever `master_weights` says, a float16 parameter that carries its own scale
  (``p.master_scale_inv``: an FP8 training linear after `keep_fp16_master()`) IS the FP16 master and
  is updated in place: 2 bytes per weight and no copy at all.
- gradients: ``p.grad``, or, where that is None, ``p.scaled_grad`` (a `ScaledGrad`: an E4M3 gradient
  with its scale, as FP8 training linears with ``grad_storage="fp8"`` leave it, 1 byte per element; or
  an FP16 one, as FP16-master embeddings leave it). `zero_grad` clears both.

The update is AdamW's (decoupled weight decay, bias corrections), computed in float32 from the
dequantised state: ``w ← w·(1 − lr·wd) − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)``.
A step with a non-finite gradient anywhere is skipped whole (counted in `skipped_steps`).
`foreach=True` (the default on CUDA, as for torch's AdamW) updates parameters of one kind together on
flat, block-aligned buffers (`bucket_update`): the same bytes as one at a time, one call per bucket
instead of one per parameter. On CPU the gathers and scatters cost more memory traffic than the calls
they save (a 46M-parameter update took 1.6x as long eager, 1.2x compiled), so there it is off.
`state_dict()` / `load_state_dict()` keep every dtype, so a resumed run is bit-identical.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.randn(256))
    >>> opt = FP8AdamW([w], lr=1e-2)
    >>> w.grad = torch.randn(256); opt.step()
    >>> opt.state[w]["exp_avg"].dtype, opt.state[w]["exp_avg_sq"].dtype
    (torch.float8_e4m3fn, torch.float16)
    >>> opt.state_bytes_per_param()["m"], opt.state_bytes_per_param()["v"]
    (1.0, 2.0)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

from .formats import E4M3, FP8Format, compute_scale, fp8_to_float32, get_format
from .fsdp import local_shard
from .scaling import compiled

FP16 = FP8Format("fp16", torch.float16, 65504.0)
"""float16 described like an FP8 format, so `compute_scale` gives it power-of-two scales."""
MasterWeights = Literal["fp32", "fp16"]
MASTER_WEIGHTS: tuple[str, ...] = get_args(MasterWeights)
MOMENT_KEYS = ("exp_avg", "exp_avg_scale_inv", "exp_avg_sq", "exp_avg_sq_scale_inv")
"""The optimizer state of the moments, in the order `adamw_state_update` takes and returns them."""


# ---------------------------------------------------------------------------------------------
# Pure functions: blockwise scaled storage


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) → (nb, block), zero-padded (a view, no copy, when `block` divides n)."""
    nb = -(-x.numel() // block)
    if nb * block == x.numel():
        return x.reshape(nb, block)
    return F.pad(x, (0, nb * block - x.numel())).view(nb, block)


def scales_of(amax: torch.Tensor, fmt: FP8Format, margin: int = 0) -> torch.Tensor:
    """Power-of-two quantisation scales for finite amaxes (`compute_scale`); 1 where the amax is 0."""
    nonzero = amax > 0
    return torch.where(nonzero, compute_scale(torch.where(nonzero, amax, 1.0), fmt, margin, check_finite=False),
                       torch.ones_like(amax))


def block_quantize(x: torch.Tensor, block: int, fmt: FP8Format, margin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float32 → (n,) in `fmt` and (nb,) float32 dequant scales, one power-of-two scale per block.

        >>> from grmserve.training.core.fp8.formats import E4M3
        >>> x = torch.tensor([1.0, -2.0, 2.0**-20, 3 * 2.0**-21])   # a tiny second block keeps its precision
        >>> q, s = block_quantize(x, 2, E4M3)
        >>> s.tolist(), torch.equal(block_dequantize(q, s, 2), x)
        ([0.0078125, 3.725290298461914e-09], True)
    """
    xb = _blocks(x, block)  # (nb, block)
    scale = scales_of(xb.abs().amax(dim=1, keepdim=True), fmt, margin)  # (nb, 1)
    scaled = (xb * scale).clamp_(-fmt.max, fmt.max)  # the one float32 temporary
    q = scaled.to(fmt.dtype)
    return q.reshape(-1)[: x.numel()], (1.0 / scale).reshape(-1)


def tensor_quantize(x: torch.Tensor, fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in `fmt`, same shape, with one power-of-two dequant scale for the whole tensor (0-dim float32):
    an FP16 master's layout, and a scaled gradient's.

        >>> q, s = tensor_quantize(torch.tensor([[0.5, -3.0]]), FP16)
        >>> q.dtype, tuple(q.shape), float(s), (q.float() * s).tolist()
        (torch.float16, (1, 2), 6.103515625e-05, [[0.5, -3.0]])
    """
    flat = x.detach().float().reshape(-1)
    q, scale_inv = block_quantize(flat, max(flat.numel(), 1), fmt)
    return q.view_as(x), scale_inv.reshape(())


def stored_to_float32(q: torch.Tensor) -> torch.Tensor:
    """Exact float32 values of FP8 or float16 storage."""
    return fp8_to_float32(q) if q.element_size() == 1 else q.float()


def dequantize_scaled(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """float32 value of FP8 or float16 storage times its dequant scale(s) (broadcasting)."""
    return stored_to_float32(q) * scale_inv


def block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `block_quantize`: (n,) stored values, (nb,) dequant scales → (n,) float32."""
    vals = stored_to_float32(q)
    return (_blocks(vals, block) * scale_inv.unsqueeze(1)).reshape(-1)[: q.numel()]


def adamw_coefficients(*, step: float, lr: float, beta1: float, beta2: float, weight_decay: float,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The step-dependent factors of an AdamW update as one float32 tensor on `device`: ``(1 − lr·wd,
    −lr / (1 − β1^t), sqrt(1 − β2^t))``. A tensor, not floats, so a compiled update reads this step's
    values instead of baking in the first step's.

        >>> coefficients = adamw_coefficients(step=1.0, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.5)
        >>> [round(c, 4) for c in coefficients.tolist()]
        [0.95, -1.0, 0.1]
    """
    return torch.tensor([1 - lr * weight_decay, -lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)],
                        dtype=torch.float32, device=device)


def adamw_update_(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v_sqrt: torch.Tensor, coef: torch.Tensor, *,
                  beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step in float32 on flat tensors, in place on `w`, `m` and `v_sqrt` (sqrt of the second
    moment), with `coef` from `adamw_coefficients`: a handful of in-place passes and two temporaries.

        >>> w, g, m, v = torch.ones(3), torch.full((3,), 0.5), torch.zeros(3), torch.zeros(3)
        >>> coef = adamw_coefficients(step=1.0, lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0)
        >>> adamw_update_(w, g, m, v, coef, beta1=0.9, beta2=0.999, eps=1e-8)
        >>> [round(x, 4) for x in w.tolist()]
        [0.9, 0.9, 0.9]
    """
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v_sqrt.square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()
    denom = (v_sqrt / coef[2]).add_(eps)
    w.mul_(coef[0]).addcdiv_(m * coef[1], denom)


def adamw_state_update(w: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_scale_inv: torch.Tensor,
                       exp_avg_sq: torch.Tensor, exp_avg_sq_scale_inv: torch.Tensor, coef: torch.Tensor, *,
                       block: int, m_format: FP8Format, beta1: float, beta2: float,
                       eps: float) -> tuple[torch.Tensor, ...]:
    """One AdamW step on flat float32 `w` (updated in place) from the stored O2 state: m and sqrt(v)
    dequantised from their blocks, updated (`adamw_update_`), stored again. Returns ``(w, exp_avg,
    exp_avg_scale_inv, exp_avg_sq, exp_avg_sq_scale_inv)``. Pure but for `w`, so `FP8AdamW(fused=True)`
    runs it through `torch.compile` (a few kernels in place of some fifty small ops per parameter)."""
    m = block_dequantize(exp_avg, exp_avg_scale_inv, block)
    v_sqrt = block_dequantize(exp_avg_sq, exp_avg_sq_scale_inv, block)
    if torch.compiler.is_compiling():  # compiled, in-place updates of these views become slow scatters
        m, v_sqrt = m.clone(), v_sqrt.clone()  # (inductor fuses the copies away; eager they would be real)
    adamw_update_(w, g, m, v_sqrt, coef, beta1=beta1, beta2=beta2, eps=eps)
    return (w, *block_quantize(m, block, m_format), *block_quantize(v_sqrt, block, FP16))


MasterKind = Literal["param", "own_fp16", "fp16"]
"""Where a parameter's master weight lives: ``param`` (the float32 parameter itself), ``own_fp16`` (the
parameter is float16 with its own scale tensor, updated in place), ``fp16`` (FP16 + scale in the
optimizer state; the parameter is a working copy)."""


def param_update(local: torch.Tensor, grad: torch.Tensor, grad_scale_inv: torch.Tensor | None,
                 master: torch.Tensor | None, master_scale_inv: torch.Tensor | None, exp_avg: torch.Tensor,
                 exp_avg_scale_inv: torch.Tensor, exp_avg_sq: torch.Tensor, exp_avg_sq_scale_inv: torch.Tensor,
                 coef: torch.Tensor, *, master_kind: MasterKind, block: int, m_format: FP8Format, beta1: float,
                 beta2: float, eps: float) -> tuple[torch.Tensor, ...]:
    """One parameter's whole O2 step: its gradient (`grad`, dequantised with `grad_scale_inv` when it is
    a scaled one), its float32 master value (`master_kind`), `adamw_state_update`, and the new weight
    written back: into `local` (this process's shard of the parameter, in place) and, for FP16
    masters, into `master_scale_inv` (own) or the returned master. Returns ``(exp_avg, exp_avg_scale_inv,
    exp_avg_sq, exp_avg_sq_scale_inv, master, master_scale_inv)`` (the last two None unless ``fp16``).
    `FP8AdamW(fused=True)` compiles it: one call per parameter, all of its small ops inside."""
    flat = local.reshape(-1)
    g = grad.reshape(-1).float() if grad_scale_inv is None else dequantize_scaled(grad.reshape(-1), grad_scale_inv)
    in_place = master_kind == "param" and local.is_contiguous() and not torch.compiler.is_compiling()
    if master_kind == "param":
        w = flat if in_place else flat.clone()  # eager: AdamW on the parameter itself, as torch's does
    else:
        w = dequantize_scaled(flat if master_kind == "own_fp16" else master, master_scale_inv)
    w, *moments = adamw_state_update(w, g, exp_avg, exp_avg_scale_inv, exp_avg_sq, exp_avg_sq_scale_inv, coef,
                                     block=block, m_format=m_format, beta1=beta1, beta2=beta2, eps=eps)
    if master_kind == "own_fp16":
        q, scale_inv = tensor_quantize(w, FP16)
        local.copy_(q.view_as(local))
        master_scale_inv.copy_(scale_inv)
        return (*moments, None, None)
    if master_kind == "fp16":
        master, master_scale_inv = block_quantize(w, max(w.numel(), 1), FP16)
        w = dequantize_scaled(master, master_scale_inv)
    if not in_place:
        local.copy_(w.view_as(local))
    return (*moments, master, master_scale_inv)


def bucket_update(w: torch.Tensor, w_block_scale_inv: torch.Tensor | None, g: torch.Tensor,
                  g_block_scale_inv: torch.Tensor | None, exp_avg: torch.Tensor, exp_avg_scale_inv: torch.Tensor,
                  exp_avg_sq: torch.Tensor, exp_avg_sq_scale_inv: torch.Tensor, coef: torch.Tensor,
                  owner: torch.Tensor, param_amax: torch.Tensor, *, master_kind: MasterKind, block: int,
                  m_format: FP8Format, beta1: float, beta2: float, eps: float) -> tuple[torch.Tensor | None, ...]:
    """`param_update` for many parameters at once, on flat buffers where each parameter starts on a
    block boundary (zero padding between them): `w` its masters (float32, or FP16 with per-block
    copies of each parameter's scale), `g` the gradients (dense, or stored with per-block scales), the
    moments as `FP8AdamW` keeps them. Each block belongs to one parameter (`owner`: its index per
    block), so the moments' block scales are those of the parameter-by-parameter update, and FP16
    masters get one scale per parameter from the parameter's amax (`param_amax`: zeros, one per
    parameter). Returns ``(w, master_scale_inv, value, exp_avg, exp_avg_scale_inv, exp_avg_sq,
    exp_avg_sq_scale_inv)``: for ``param`` the new float32 masters; for FP16 masters the new FP16
    values, their scale per parameter and (``fp16``, where the parameter is a working copy) their
    float32 value. Same numbers as `param_update`, parameter by parameter."""
    def scaled(values: torch.Tensor, block_scale_inv: torch.Tensor | None) -> torch.Tensor:
        return values.float() if block_scale_inv is None else block_dequantize(values, block_scale_inv, block)

    w = scaled(w, w_block_scale_inv)
    if torch.compiler.is_compiling():
        w = w.clone()
    w, *moments = adamw_state_update(w, scaled(g, g_block_scale_inv), exp_avg, exp_avg_scale_inv, exp_avg_sq,
                                     exp_avg_sq_scale_inv, coef, block=block, m_format=m_format, beta1=beta1,
                                     beta2=beta2, eps=eps)
    if master_kind == "param":
        return (w, None, None, *moments)
    amax = param_amax.scatter_reduce(0, owner, _blocks(w.abs(), block).amax(dim=1), "amax", include_self=True)
    scale = scales_of(amax, FP16)  # (P,): tensor_quantize's scale of each parameter
    scale_inv = 1.0 / scale
    q = (_blocks(w, block) * scale[owner].unsqueeze(1)).clamp_(-FP16.max, FP16.max).to(torch.float16)
    value = scaled(q.reshape(-1), scale_inv[owner]) if master_kind == "fp16" else None
    return (q.reshape(-1), scale_inv, value, *moments)


class ScaledGrad(NamedTuple):
    """A gradient kept in low precision with a 0-dim float32 power-of-two dequant scale, on the parameter
    as ``p.scaled_grad`` in place of ``p.grad`` (O2): E4M3 bytes for FP8 training linears (1 byte per
    element), float16 for FP16-master embeddings (2 bytes: fp16_master.py).

        >>> g = ScaledGrad.quantize(torch.tensor([3e-6, -1e-3]), torch.float16)
        >>> g.q.dtype, torch.allclose(g.dequantize(), torch.tensor([3e-6, -1e-3]), rtol=1e-3)
        (torch.float16, True)
    """

    q: torch.Tensor
    scale_inv: torch.Tensor
    l2: torch.Tensor | None = None
    """The 2-norm of the value when whoever stored it computed it alongside (the FP8 weight gradient's
    compiled pass does), so clipping and the optimizer's finiteness check launch nothing per tensor."""

    def dequantize(self) -> torch.Tensor:
        return dequantize_scaled(self.q, self.scale_inv)

    def norm(self) -> torch.Tensor:
        """The 2-norm of the gradient's value (float32, 0-dim); non-finite when any value is."""
        if self.l2 is not None:
            return self.l2
        return torch.linalg.vector_norm(stored_to_float32(self.q)) * self.scale_inv

    @staticmethod
    def quantize(values: torch.Tensor, dtype: torch.dtype) -> "ScaledGrad":
        """`values` (float) stored as `dtype` (float8_e4m3fn or float16) with one current per-tensor scale."""
        return ScaledGrad(*tensor_quantize(values, {torch.float8_e4m3fn: E4M3, torch.float16: FP16}[dtype]))


def _holds_own_master(p: torch.Tensor) -> bool:
    """A float16 parameter carrying its per-tensor scale (``p.master_scale_inv``) is its own FP16 master."""
    return p.dtype == torch.float16 and getattr(p, "master_scale_inv", None) is not None


def gradient(p: torch.Tensor) -> torch.Tensor | None:
    """`p`'s gradient as a float tensor (its local shard under FSDP2): ``p.grad``, else its dequantised
    ``p.scaled_grad``, else None."""
    if p.grad is not None:
        return local_shard(p.grad)
    scaled = getattr(p, "scaled_grad", None)
    return None if scaled is None else scaled.dequantize()


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over ``.grad`` and ``scaled_grad`` alike: the total 2-norm of all
    gradients (returned), and, above `max_norm`, every gradient scaled down to it (a scaled gradient by
    its scale alone: its stored values are untouched). Without scaled gradients it is torch's own
    (DTensors too).

        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> float(clip_grad_norm_([w], 1.0)), [round(x, 3) for x in w.grad.tolist()]
        (5.0, [0.6, 0.8])
    """
    params = list(params)
    scaled = [p for p in params if p.grad is None and getattr(p, "scaled_grad", None) is not None]
    if not scaled:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = gradient_norms(params).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    dense = [p.grad for p in params if p.grad is not None]
    if dense:
        torch._foreach_mul_(dense, coef)
    stored = [p.scaled_grad for p in scaled]
    scales = torch._foreach_mul([g.scale_inv for g in stored], coef)
    norms = torch._foreach_mul([g.norm() for g in stored], coef)
    for p, g, scale_inv, l2 in zip(scaled, stored, scales, norms):
        p.scaled_grad = g._replace(scale_inv=scale_inv, l2=l2)
    return total


def gradient_norms(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """(n,) float32: the 2-norm of each gradient of `params` (``.grad`` or ``scaled_grad``; none: left
    out), a few multi-tensor calls in all: dense ones through `torch._foreach_norm`, scaled ones as
    stored with them (`ScaledGrad.l2`) or computed. Non-finite wherever a gradient holds inf or NaN."""
    params = list(params)
    dense = [local_shard(p.grad) for p in params if p.grad is not None]
    norms = [n.float() for n in torch._foreach_norm(dense)] if dense else []
    norms += [p.scaled_grad.norm() for p in params if p.grad is None and getattr(p, "scaled_grad", None) is not None]
    return torch.stack(norms) if norms else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# The optimizer


class _BucketLayout(NamedTuple):
    """Where each parameter of a bucket lives in its flat buffers: from a block boundary, zero padding
    to the next one. `split`: the buffer's split sizes (elements, padding, elements, ...); `blocks`:
    blocks per parameter; `owner`: the parameter index of each block (on the device)."""

    split: list[int]
    blocks: list[int]
    owner: torch.Tensor

    @staticmethod
    def of(numels: list[int], block: int, device: torch.device) -> "_BucketLayout":
        blocks = [-(-n // block) for n in numels]
        split = [size for n, nb in zip(numels, blocks) for size in (n, nb * block - n)]
        owner = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(blocks)).to(device)
        return _BucketLayout(split, blocks, owner)

    def per_block(self, per_param: torch.Tensor) -> torch.Tensor:
        """(P,) values → (blocks,): each block gets its parameter's."""
        return per_param[self.owner]

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One flat buffer holding `tensors` (same dtype) at their places, zeros between them."""
        flat = torch.zeros(sum(self.split), dtype=tensors[0].dtype, device=tensors[0].device)
        torch._foreach_copy_(self._pieces(flat), [_bytes(t.reshape(-1)) for t in tensors])
        return flat

    def scatter(self, flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """Copy each parameter's piece of `flat` into `targets` (contiguous; cast to their dtype)."""
        if flat.dtype == targets[0].dtype:
            torch._foreach_copy_([_bytes(t.reshape(-1)) for t in targets], self._pieces(flat))
        else:
            torch._foreach_copy_([t.reshape(-1) for t in targets], list(flat.split(self.split)[::2]))

    def _pieces(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(_bytes(flat).split(self.split)[::2])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """1-byte dtypes as uint8 (multi-tensor copies of float8 are not implemented everywhere)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


class FP8AdamW(torch.optim.Optimizer):
    """Drop-in `torch.optim.AdamW` (param groups, lr, betas, eps, weight_decay, decoupled decay) with
    FP8-LM O2 state: m in E4M3 with per-block scales, sqrt(v) in FP16 with per-block scales, master
    weights in the fp32 parameter or in FP16 + a per-tensor scale (see the module docstring).
    `fused`: run the update through `torch.compile` (`bucket_update` per bucket, `param_update` per
    parameter updated alone): the same numbers, far fewer kernel launches (on CUDA); the first step
    compiles. `foreach` (None: on CUDA): update parameters of one kind in buckets.

        >>> import torch
        >>> model = torch.nn.Linear(64, 64)
        >>> opt = FP8AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, master_weights="fp16")
        >>> model(torch.randn(4, 64)).sum().backward(); opt.step(); opt.zero_grad()
        >>> sorted(opt.state_bytes_per_param())
        ['m', 'master', 'scales', 'total', 'v']
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, master_weights: str = "fp32",
                 block_size: int | None = 128, m_format: str = "e4m3", fused: bool = False,
                 foreach: bool | None = None, bucket_elements: int = 2**25):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {master_weights!r}")
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be positive or None (per tensor), got {block_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_weights, self.block_size, self.m_format = master_weights, block_size, get_format(m_format)
        self.fused, self.foreach, self.bucket_elements = fused, foreach, bucket_elements
        self._layouts: dict[tuple, _BucketLayout] = {}
        self.skipped_steps = 0
        if master_weights == "fp32":
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dtype != torch.float32 and not _holds_own_master(p):
                        raise ValueError(f"master_weights='fp32' updates parameters in place, so they must be "
                                         f"float32; got {p.dtype}. Use master_weights='fp16' to keep a separate "
                                         "FP16 master with a scale (the parameter is then a working copy)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` (torch's rule) and ``scaled_grad`` of every parameter."""
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, "scaled_grad", None) is not None:
                    p.scaled_grad = None

    def _block(self, p: torch.Tensor) -> int:
        return self.block_size or max(local_shard(p).numel(), 1)

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        p = local_shard(p.detach())
        n, block = p.numel(), self._block(p)
        nb = -(-n // block)
        state = {"step": torch.zeros((), dtype=torch.float32),
                 "exp_avg": torch.zeros(n, dtype=self.m_format.dtype, device=p.device),
                 "exp_avg_scale_inv": torch.ones(nb, dtype=torch.float32, device=p.device),
                 "exp_avg_sq": torch.zeros(n, dtype=torch.float16, device=p.device),
                 "exp_avg_sq_scale_inv": torch.ones(nb, dtype=torch.float32, device=p.device)}
        if self.master_weights == "fp16" and not _holds_own_master(p):
            state["master"], state["master_scale_inv"] = block_quantize(p.detach().float().reshape(-1), max(n, 1), FP16)
            p.data.copy_(self._master_value(state).view_as(p))
        return state

    @staticmethod
    def _master_value(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_scaled(state["master"], state["master_scale_inv"])

    def _nonfinite_grads(self) -> bool:
        """Whether any gradient holds inf or NaN (one host sync; the norms are multi-tensor calls). With
        sharded parameters (FSDP2) the answer covers every process's shard (a MAX all-reduce over the
        mesh), so all processes skip a step together and their shards never drift apart."""
        params = [p for group in self.param_groups for p in group["params"]]
        norms = gradient_norms(params)
        bad = (~torch.isfinite(norms)).any().float() if norms.numel() else torch.zeros(())
        mesh = next((p.device_mesh for p in params if hasattr(p, "device_mesh")), None)
        if mesh is not None:
            import torch.distributed as dist

            bad = bad.to(local_shard(params[0]).device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return bool(bad)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step; skipped whole (and counted) when any gradient is inf/NaN."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nonfinite_grads():
            self.skipped_steps += 1
            return loss
        # One coefficient tensor per group and step count, not per parameter: on CUDA each is a copy
        # from pageable host memory, which waits for the stream.
        coefficients: dict[tuple, torch.Tensor] = {}
        for group in self.param_groups:
            todo = [p for p in group["params"] if p.grad is not None or getattr(p, "scaled_grad", None) is not None]
            for bucket in self._buckets(todo):
                if len(bucket) == 1:
                    self._step_param(bucket[0], group, coefficients)
                else:
                    self._step_bucket(bucket, group, coefficients)
        return loss

    # -- one parameter at a time ---------------------------------------------------------------

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError("FP8AdamW does not support sparse gradients")
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        return state

    def _master_of(self, p: torch.Tensor) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
        """``(master_kind, FP16 master or None, its scale or None)`` of `p` (see `MasterKind`)."""
        if _holds_own_master(p):
            return "own_fp16", None, p.master_scale_inv
        if self.master_weights == "fp16":
            state = self.state[p]
            return "fp16", state["master"], state["master_scale_inv"]
        return "param", None, None

    @staticmethod
    def _grad_of(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(stored gradient, its scale or None)``: the local ``.grad``, or the scaled gradient's parts."""
        if p.grad is not None:
            return local_shard(p.grad).detach(), None
        return p.scaled_grad.q, p.scaled_grad.scale_inv

    def _coefficients(self, state: dict[str, torch.Tensor], group: dict[str, Any], device: torch.device,
                      cache: dict[tuple, torch.Tensor]) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        key = (float(state["step"]), group["lr"], beta1, beta2, group["weight_decay"], device)
        if key not in cache:
            cache[key] = adamw_coefficients(step=key[0], lr=key[1], beta1=beta1, beta2=beta2,
                                            weight_decay=key[4], device=device)
        return cache[key]

    def _step_param(self, p: torch.Tensor, group: dict[str, Any], coefficients: dict[tuple, torch.Tensor]) -> None:
        state = self._state_of(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        local = local_shard(p.detach())  # FSDP2: this process's shard; the state is sharded alike
        kind, master, master_scale_inv = self._master_of(p)
        update = compiled(param_update) if self.fused else param_update
        *moments, master, master_scale_inv = update(
            local, *self._grad_of(p), master, master_scale_inv, *(state[k] for k in MOMENT_KEYS),
            self._coefficients(state, group, local.device, coefficients),
            master_kind=kind, block=self._block(p), m_format=self.m_format, beta1=beta1, beta2=beta2,
            eps=group["eps"])
        state.update(zip(MOMENT_KEYS, moments))
        if kind == "fp16":
            state["master"], state["master_scale_inv"] = master, master_scale_inv

    # -- many parameters at a time (foreach) -----------------------------------------------------

    def _buckets(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """`params` in buckets updated together (`bucket_update`): same master kind, gradient storage,
        dtype, device and step, contiguous, at most `bucket_elements` elements; the rest alone."""
        foreach = self.foreach if self.foreach is not None else bool(params) and local_shard(params[0]).is_cuda
        if not foreach or self.block_size is None:
            return [[p] for p in params]
        groups: dict[tuple, list[list[torch.Tensor]]] = {}
        filled: dict[tuple, int] = {}  # elements in each key's last bucket
        alone = []
        for p in params:
            state, local = self._state_of(p), local_shard(p.detach())
            grad, grad_scale = self._grad_of(p)
            if not local.is_contiguous() or not local.numel() or not grad.is_contiguous():
                alone.append([p])
                continue
            key = (self._master_of(p)[0], grad.dtype, grad_scale is None, local.dtype, local.device,
                   float(state["step"]))
            chunks = groups.setdefault(key, [[]])
            if chunks[-1] and filled[key] + local.numel() > self.bucket_elements:
                chunks.append([])
                filled[key] = 0
            chunks[-1].append(p)
            filled[key] = filled.get(key, 0) + local.numel()
        return [chunk for chunks in groups.values() for chunk in chunks] + alone

    def _layout(self, params: list[torch.Tensor], device: torch.device) -> "_BucketLayout":
        key = (tuple(id(p) for p in params), device)
        if key not in self._layouts:
            self._layouts[key] = _BucketLayout.of([local_shard(p).numel() for p in params], self.block_size, device)
        return self._layouts[key]

    def _step_bucket(self, params: list[torch.Tensor], group: dict[str, Any],
                     coefficients: dict[tuple, torch.Tensor]) -> None:
        """One AdamW step of a bucket (`_buckets`): gather into flat buffers, `bucket_update`, scatter."""
        states = [self.state[p] for p in params]
        torch._foreach_add_([st["step"] for st in states], 1)
        locals_ = [local_shard(p.detach()) for p in params]
        layout = self._layout(params, locals_[0].device)
        kind = self._master_of(params[0])[0]
        grads = [self._grad_of(p) for p in params]
        g_scale = None if grads[0][1] is None else layout.per_block(torch.stack([s.reshape(()) for _, s in grads]))
        if kind == "param":
            w, w_scale = layout.gather(locals_), None
        elif kind == "own_fp16":
            w = layout.gather(locals_)
            w_scale = layout.per_block(torch.stack([p.master_scale_inv.reshape(()) for p in params]))
        else:
            w = layout.gather([st["master"] for st in states])
            w_scale = layout.per_block(torch.cat([st["master_scale_inv"] for st in states]))
        moments = [layout.gather([st[key] for st in states]) if not key.endswith("scale_inv")
                   else torch.cat([st[key] for st in states]) for key in MOMENT_KEYS]
        beta1, beta2 = group["betas"]
        update = compiled(bucket_update) if self.fused else bucket_update
        w, scale_inv, value, *moments = update(
            w, w_scale, layout.gather([g for g, _ in grads]), g_scale, *moments,
            self._coefficients(states[0], group, w.device, coefficients), layout.owner,
            torch.zeros(len(params), dtype=torch.float32, device=w.device), master_kind=kind, block=self.block_size,
            m_format=self.m_format, beta1=beta1, beta2=beta2, eps=group["eps"])
        for key, flat in zip(MOMENT_KEYS, moments):
            targets = [st[key] for st in states]
            if key.endswith("scale_inv"):
                torch._foreach_copy_(targets, list(flat.split(layout.blocks)))
            else:
                layout.scatter(flat, targets)
        if kind == "own_fp16":
            torch._foreach_copy_([p.master_scale_inv for p in params], list(scale_inv.unbind()))
        elif kind == "fp16":
            layout.scatter(w, [st["master"] for st in states])
            torch._foreach_copy_([st["master_scale_inv"] for st in states], list(scale_inv.split(1)))
            w = value
        layout.scatter(w, locals_)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fp8"] = self.fp8_meta()
        return sd

    def fp8_meta(self) -> dict[str, Any]:
        """What `state_dict` adds to torch's optimizer state (``"fp8"``): the layout the state was written
        in and the skipped-step count. torch.distributed.checkpoint's optimizer state dicts drop it, so
        callers that use them save it beside (`load_fp8_meta`)."""
        return {"skipped_steps": self.skipped_steps, "master_weights": self.master_weights,
                "block_size": self.block_size, "m_format": self.m_format.name}

    def load_fp8_meta(self, meta: dict[str, Any]) -> None:
        """Check that `meta` (`fp8_meta` of the saved optimizer) describes this optimizer's state layout
        (a clear error if not) and restore the skipped-step count."""
        mine = {"master_weights": self.master_weights, "block_size": self.block_size, "m_format": self.m_format.name}
        for key, value in mine.items():
            if key in meta and meta[key] != value:
                raise ValueError(f"optimizer state was saved with {key}={meta[key]!r}, this FP8AdamW has {value!r}")
        self.skipped_steps = int(meta.get("skipped_steps", 0))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the stored dtypes (torch's loader would cast FP8 / FP16 state to the param dtype).
        A state without the ``"fp8"`` entry (torch.distributed.checkpoint's) leaves `skipped_steps` as it is."""
        if "fp8" in state_dict:
            self.load_fp8_meta(state_dict["fp8"])  # the layout check first
        sd = {k: v for k, v in state_dict.items() if k != "fp8"}
        super().load_state_dict(sd)
        # State keys are what the saved groups list: parameter indices, or names (torch.distributed.checkpoint).
        saved_ids = {key: p for saved, group in zip(sd["param_groups"], self.param_groups)
                     for key, p in zip(saved["params"], group["params"])}
        for key, saved in sd["state"].items():
            p = saved_ids[key]
            self.state[p] = {k: v.to(device=p.device if k != "step" else v.device).clone() for k, v in saved.items()}

    # -- accounting --------------------------------------------------------------------------------

    def state_bytes_per_param(self) -> dict[str, float]:
        """Optimizer-state bytes per parameter element, counted from the real tensors: ``m``, ``v``,
        ``master`` (0 for fp32: the parameter is the master), ``scales`` (all scale tensors), ``total``."""
        counts = {"m": 0, "v": 0, "master": 0, "scales": 0}
        n = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                n += local_shard(p).numel()
                for key, t in state.items():
                    if key == "step":
                        continue
                    kind = "scales" if key.endswith("scale_inv") else \
                        {"exp_avg": "m", "exp_avg_sq": "v", "master": "master"}[key]
                    counts[kind] += t.numel() * t.element_size()
        per = {k: (v / n if n else 0.0) for k, v in counts.items()}
        per["total"] = sum(per.values())
        return per
