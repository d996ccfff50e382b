"""GPTQ rounding onto the e4m3 grid, with the residual columns absorbing the compensation.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al., 2022) rounds one input
column at a time and pushes each column's rounding error onto the columns not yet rounded, through
the inverse of the layer's input Hessian ``H = Σ_t x_t x_tᵀ`` (calibration tokens), so that the
layer's *output* error on inputs like the calibration ones is small rather than each weight's.
Rows are independent problems sharing one H, so any per-row scale works unchanged: the weights land
on the same e4m3 grid with the same power-of-two scales as RTN, and the checkpoint is a plain FP8
checkpoint (same bytes, same serving path).

The residual columns (residuals.py) are rounded *last*: by then they have absorbed the compensation
of every other column, and their residual stores the compensated value almost exactly, so the kept
columns do two jobs, their own rounding error and a share of everyone else's.

Calibration tokens are used as they come: massive-activation tokens (the first tokens, whose
hidden states are hundreds of times larger) dominate H, and they should: excluding them doubled
the margin error on the default model, since every later token attends to them
(training/core/fp8/DESIGN.md).

    >>> hessians = input_hessians(model, calibration_ids, names, pad_id=0)           # doctest: +SKIP
    >>> q, target = gptq_round(weight, hessians[name], weight_scale, keep=[3, 17])  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..batching import pad_right
from .formats import E4M3, cast_to_fp8, expand_block_scale
from .linear import FP8InferenceLinear
from .residuals import record_residual_columns


class GPTQError(RuntimeError):
    """A layer's Hessian cannot be factorised even with heavy damping (e.g. NaN activations)."""


def input_hessians(model, seqs: list[list[int]], linears: dict[str, nn.Module], *, pad_id: int, batch_size: int = 8,
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """(hessians, tokens): per linear in `linears` (names in `model`), ``Σ_t x_t x_tᵀ`` (in, in) float32
    over the real (unpadded) tokens of `seqs`, run through `model.score` in inference mode. Linears
    that read the same tensor (q/k/v, gate/up) share one matrix, computed once."""
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    state: dict[str, object] = {"last": None, "owner": None, "mask": None}

    def hook(name):
        def fn(_module, inputs, _output):
            x = inputs[0]
            if x is state["last"]:  # same tensor as the previous linear's input: share its matrix
                alias[name] = state["owner"]
                return
            state["last"], state["owner"] = x, name
            x2 = x.detach().reshape(-1, x.shape[-1])[state["mask"]].float()
            if name not in sums:
                sums[name] = torch.zeros(x2.shape[1], x2.shape[1])
            sums[name].addmm_(x2.T, x2)
        return fn

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths: less padding
    hooks = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    tokens = 0
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(order), batch_size), desc="fp8 gptq hessians", unit="batch",
                          disable=not progress):
                ids, mask = pad_right([seqs[j] for j in order[i:i + batch_size]], pad_id)
                state["mask"], state["last"] = mask.reshape(-1).bool(), None
                tokens += int(mask.sum())
                model.score(ids, mask)
    finally:
        state["last"] = None
        for h in hooks:
            h.remove()
    hessians = {n: sums[alias.get(n, n)] for n in linears if alias.get(n, n) in sums}
    missing = sorted(set(linears) - set(hessians))
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}{' …' if len(missing) > 3 else ''}")
    return hessians, tokens


def _elementwise_scale(weight_scale: torch.Tensor, out_f: int, in_f: int, block_size: int | None) -> torch.Tensor:
    if weight_scale.shape[1] == 1:
        return weight_scale.float().expand(out_f, in_f)
    return expand_block_scale(weight_scale.float(), block_size, in_f)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp × mean(diag H), damping more if H is singular."""
    n = h.shape[0]
    mean_diag = float(torch.diag(h).mean())
    for factor in (1, 10, 100):
        damped = h + damp * factor * mean_diag * torch.eye(n, dtype=h.dtype)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise GPTQError(f"input Hessian is not positive definite even with damping {100 * damp} × mean diagonal")


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, weight_scale: torch.Tensor, *,
               block_size: int | None = None, keep: list[int] | torch.Tensor = (), damp: float = 0.01,
               step: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Round `weight` (out, in) onto e4m3 × `weight_scale` (dequant scales, (1, 1), (out, 1) or
    (out, ceil(in / block_size))) with GPTQ error compensation under `hessian` (in, in).

    Columns are rounded in order of decreasing ``H_jj`` (GPTQ's act-order), the `keep` columns last.
    Returns ``(q, target)``: the e4m3 weight, and the compensated float32 weight each column was
    rounded from (for the `keep` columns, what their residual should restore:
    `FP8InferenceLinear.set_residual_columns(target, keep)`)."""
    w = weight.detach().to(torch.float32).clone()
    out_f, in_f = w.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(in_f, in_f)}")
    scale = _elementwise_scale(weight_scale, out_f, in_f, block_size)
    h = hessian.to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise GPTQError("input Hessian has non-finite entries (NaN or inf activations in calibration)")
    dead = torch.diag(h) == 0  # inputs always zero: their weights never matter, nothing to compensate
    h[dead, dead] = 1.0

    keep_t = torch.as_tensor(keep, dtype=torch.long).flatten().unique()
    is_keep = torch.zeros(in_f, dtype=torch.bool)
    is_keep[keep_t] = True
    rest = torch.nonzero(~is_keep).flatten()
    rest = rest[torch.argsort(torch.diag(h)[rest], descending=True, stable=True)]
    perm = torch.cat([rest, keep_t])
    w, scale, h = w[:, perm], scale[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp).to(torch.float32)

    target = torch.empty_like(w)
    q = torch.empty(out_f, in_f, dtype=E4M3.dtype)
    n_rest = rest.numel()
    for i1 in range(0, n_rest, step):
        i2 = min(i1 + step, n_rest)
        block = w[:, i1:i2].clone()
        errors = torch.empty_like(block)
        for i in range(i2 - i1):
            col = block[:, i]
            s = scale[:, i1 + i]
            qc = cast_to_fp8(col / s, E4M3)  # clamps to ±448 first
            q[:, i1 + i] = qc
            target[:, i1 + i] = col
            err = (col - qc.float() * s) / u[i1 + i, i1 + i]
            block[:, i:] -= err[:, None] * u[i1 + i, i1 + i:i2][None, :]
            errors[:, i] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    if keep_t.numel():  # compensated, rounded to nearest; the residual stores the rest
        target[:, n_rest:] = w[:, n_rest:]
        q[:, n_rest:] = cast_to_fp8(w[:, n_rest:] / scale[:, n_rest:], E4M3)
    inverse = torch.argsort(perm)
    return q[:, inverse].contiguous(), target[:, inverse].contiguous()


def gptq_requantize(model, weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                    columns: dict[str, list[int]] | None = None, *, damp: float = 0.01, tokens: int | None = None,
                    progress: bool = True) -> int:
    """Re-round the converted layers of `model` (names of `weights`: the full-precision weights they
    were converted from) with `gptq_round`, keeping their scales, and give the `columns` residuals of
    the compensated weights. Records the method in `grm.quantization`; returns the residual count."""
    columns = columns or {}
    total = 0
    for name in tqdm(list(weights), desc="fp8 gptq rounding", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        if not isinstance(module, FP8InferenceLinear):
            raise ValueError(f"`{name}` is not an FP8 layer (convert the model first)")
        cols = columns.get(name, [])
        q, target = gptq_round(weights[name], hessians[name], module.weight_scale, block_size=module.block_size,
                               keep=cols, damp=damp)
        module.weight = q.to(module.weight.device)
        module.set_residual_columns(target, cols)
        total += module.residual_columns
    quant = getattr(getattr(model, "grm_config", None), "quantization", None)
    if quant is not None:
        quant["rounding"] = {"method": "gptq", "damp": damp, "order": "act-order, residual columns last",
                             **({"calibration_tokens": tokens} if tokens is not None else {})}
    record_residual_columns(model, total)
    return total
