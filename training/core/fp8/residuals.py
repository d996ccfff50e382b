"""Which input columns of which FP8 layers to correct with a residual (`grm-quantize --keep_columns`).

FP8 rounding moves every weight by up to 1/16 of its value; what matters for a reward model is
how far that moves the *margin* between the two responses of a pair, since preferences are read
from its sign. To first order, the rounding error ΔW of one linear moves a sequence's score by

    Σ_t g_tᵀ ΔW x_t  =  Σ_j  Σ_t (g_tᵀ ΔW[:, j]) x_tj  =  Σ_j c_j

with x_t the layer's input and g_t = ∂score/∂y_t the gradient at its output for token t: one term
per input column j. `column_sensitivity` runs calibration pairs forward and backward through the
full-precision model (one backward pass per batch, no weight gradients) and sums, per column,
(c_j(chosen) − c_j(rejected))² over the pairs: the share of margin error variance that column lets
through. `pick_columns` spends the byte budget on the columns with the most of it per byte, and
`add_residual_columns` stores their rounding error (e4m3, a scale per output row, 1 byte per
weight) in the FP8 layers (`FP8InferenceLinear.set_residual_columns`). With GPTQ rounding
(gptq.py, the default of `--keep_columns`) these columns are rounded last and their residual
restores the compensated weight instead.

Columns, not whole layers, because the error is carried by a few input features (LLM.int8's outlier
features) spread over every layer; and the score gradient, not the layer's output error, because
an error matters by where it goes: measured on the default model this halves the margin error of
whole kept linears at the same bytes (training/core/fp8/DESIGN.md).

    >>> gains = column_sensitivity(model, calibration_ids, "fp8-channel", pad_id=0)        # doctest: +SKIP
    >>> columns = pick_columns(gains, model, "fp8-channel", max_bytes_ratio=0.55)          # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from ..batching import pad_right
from .convert import FP8Recipe, decoder_linears, get_recipe, skip_reason
from .linear import FP8InferenceLinear, scale_shape

INDEX_BYTES = 4  # int32 column index
SCALE_BYTES = 4  # float32 residual scale per output row


def convertible_linears(model, recipe: FP8Recipe) -> dict[str, nn.Linear]:
    """The decoder's linears the recipe converts, by their names in `model`."""
    return {n: m for n, m in decoder_linears(model) if skip_reason(n, m, recipe) is None}


def rounding_error(linear: nn.Linear, recipe: FP8Recipe) -> torch.Tensor:
    """(out, in) float32: what the recipe's FP8 rounding adds to the weight (dequantised − exact)."""
    fp8 = FP8InferenceLinear.from_linear(linear, recipe.granularity, recipe.block_size)
    return fp8.dequantized_weight() - linear.weight.detach().float()


def column_sensitivity(model, seqs: list[list[int]], recipe: str | FP8Recipe = "fp8-channel", *, pad_id: int,
                       batch_pairs: int = 2, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per convertible linear of a full-precision `GRMModel`, a (in,) tensor: Σ over calibration
    pairs of the squared first-order change of the pair's margin caused by each input column's
    FP8 rounding error. `seqs` alternate chosen, rejected (pair i is seqs[2i], seqs[2i + 1])."""
    if len(seqs) % 2:
        raise ValueError("calibration sequences come in pairs (chosen, rejected); got an odd count")
    recipe = get_recipe(recipe)
    linears = convertible_linears(model, recipe)
    delta = {n: rounding_error(m, recipe) for n, m in linears.items()}
    gains = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def forward_hook(name):
        def hook(_module, inputs, output):
            x = inputs[0].detach()

            def backward_hook(g):  # g: (B, T, out), ∂Σscores/∂output
                c = ((g.float() @ delta[name]) * x.float()).sum(1)  # (B, in): first-order score change per column
                gains[name].add_((c[0::2] - c[1::2]).pow(2).sum(0))
            output.register_hook(backward_hook)
        return hook

    def track_input(_module, _inputs, output):
        return output.requires_grad_()  # gradients flow to every layer; no weight gradient is computed

    embed = model.backbone.get_input_embeddings()
    requires = {p: p.requires_grad for p in model.parameters()}
    hooks = [m.register_forward_hook(forward_hook(n)) for n, m in linears.items()]
    hooks.append(embed.register_forward_hook(track_input))
    try:
        for p in requires:
            p.requires_grad_(False)
        step = 2 * batch_pairs
        for i in tqdm(range(0, len(seqs), step), desc="fp8 column sensitivity", unit="batch", disable=not progress):
            ids, mask = pad_right(seqs[i:i + step], pad_id)  # pairs stay adjacent: rows 2k, 2k + 1
            model.score(ids, mask).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return gains


def linear_budget(model, recipe: FP8Recipe, max_bytes_ratio: float,
                  keep_bytes_per_weight: int = 2) -> tuple[float, float]:
    """(budget, used) in bytes: `max_bytes_ratio` × the decoder's linear weights at `keep_bytes_per_weight`
    bytes, and what the FP8 weights + scales and the unconverted linears take before any residual."""
    linears = decoder_linears(model)
    total = sum(m.weight.numel() for _, m in linears)
    used = 0.0
    for n, m in linears:
        if skip_reason(n, m, recipe) is None:
            scales = math.prod(scale_shape(m.out_features, m.in_features, recipe.granularity, recipe.block_size))
            used += m.weight.numel() + 4 * scales  # e4m3 weights, float32 scales
        else:
            used += keep_bytes_per_weight * m.weight.numel()
    return max_bytes_ratio * keep_bytes_per_weight * total, used


def pick_columns(gains: dict[str, torch.Tensor], model, recipe: str | FP8Recipe = "fp8-channel", *,
                 max_bytes_ratio: float = 0.55, keep_bytes_per_weight: int = 2) -> dict[str, list[int]]:
    """The columns with the most sensitivity per byte, as many as fit within `max_bytes_ratio` × the
    decoder's linear weights at `keep_bytes_per_weight` (bf16: 2) bytes. A column costs its e4m3
    residual (1 byte per output row) and its index; a layer's first column also its row scales."""
    recipe = get_recipe(recipe)
    budget, used = linear_budget(model, recipe, max_bytes_ratio, keep_bytes_per_weight)
    ranked = []
    for name, g in gains.items():
        out_f = model.get_submodule(name).out_features
        ranked += [(v / (out_f + INDEX_BYTES), name, j, out_f) for j, v in enumerate(g.tolist())]
    ranked.sort(key=lambda r: -r[0])
    chosen: dict[str, list[int]] = {}
    for value, name, j, out_f in ranked:
        if value <= 0:
            break
        cost = out_f + INDEX_BYTES + (0 if name in chosen else SCALE_BYTES * out_f)
        if used + cost > budget:
            continue  # a cheaper column (a narrower layer, or one already holding residuals) may still fit
        used += cost
        chosen.setdefault(name, []).append(j)
    return {n: sorted(c) for n, c in chosen.items()}


def add_residual_columns(model, columns: dict[str, list[int]], weights: dict[str, torch.Tensor]) -> int:
    """Give the converted layers of `model` residuals for `columns` (`pick_columns`), computed from the
    full-precision `weights` they were quantised from (same names). Records the count in the
    model's `grm.quantization` block; returns it."""
    total = 0
    for name, cols in columns.items():
        module = model.get_submodule(name)
        if not isinstance(module, FP8InferenceLinear):
            raise ValueError(f"`{name}` is not an FP8 layer (convert the model first)")
        module.set_residual_columns(weights[name], cols)
        total += module.residual_columns
    record_residual_columns(model, total)
    return total


def record_residual_columns(model, count: int) -> None:
    """Note `count` residual columns in the model's `grm.quantization` block (when it has one)."""
    quant = getattr(getattr(model, "grm_config", None), "quantization", None)
    if quant is not None and count:
        quant["residual_columns"] = {"count": count, "dtype": "float8_e4m3fn", "scale": "dequant, per output row"}
