"""Which decoder layers hurt the reward most when quantised to FP8 (`scan_layers`), and which to
keep in full precision within a byte budget (`pick_keep`).

e4m3 keeps 3 mantissa bits whatever the scale, so finer scales (block vs channel) barely change the
rounding error of SmolLM2's weights; what does change the scores is *where* the error enters. The
scan quantises one decoder layer at a time and measures how far the rewards of calibration
sequences move, relative to their spread: ``rms(r_fp8 - r_ref) / std(r_ref)``. Each layer's input
hidden states are computed once by the reference model, so scanning layer i runs only layers i..L-1.

    >>> scan = scan_layers(model, calibration_ids, "fp8-block64", pad_id=tok.pad_token_id)   # doctest: +SKIP
    >>> keep = pick_keep(scan, model, "fp8-block64", max_bytes_ratio=0.55)               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from ..batching import pad_right, plan_batches
from .convert import FP8Recipe, decoder_linears, get_recipe, skip_reason
from .linear import FP8InferenceLinear


@dataclass
class LayerSensitivity:
    layer: int
    prefix: str
    """Module name: a whole layer (`lm.model.layers.7`) or one of its linears (`lm.model.layers.7.mlp.down_proj`)."""
    error: float
    """rms(reward change) / std(reference rewards) with only this layer (or linear) in FP8."""
    weights: int
    """Weights in the convertible linears it covers."""
    whole_layer: bool = True

    @property
    def keep_pattern(self) -> str:
        """The recipe `keep` pattern that leaves exactly these linears unquantised."""
        return f"{self.prefix}.*" if self.whole_layer else self.prefix


class _Replay(nn.Module):
    """Stands in for layers 0..i-1: returns the stored input of layer i (for the current batch)."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):  # noqa: ARG002 - the decoder's layer call signature
        return self.value


def _batches(seqs: list[list[int]], pad_id: int, batch_tokens: int):
    """(indices, ids, mask) of padded passes of similar lengths, rows × longest within `batch_tokens`."""
    for idx in plan_batches([len(s) for s in seqs], batch_tokens, max_rows=len(seqs)):
        ids, mask = pad_right([seqs[j] for j in idx], pad_id)
        yield idx, ids, mask


@torch.no_grad()
def scan_layers(model, seqs: list[list[int]], recipe: str | FP8Recipe = "fp8-block64", *, pad_id: int,
                batch_tokens: int = 4096, progress: bool = True,
                linears_of: list[int] | None = None) -> list[LayerSensitivity]:
    """Sensitivity of every decoder layer of a `GRMModel` (full precision, eval mode) to FP8; with
    `linears_of`, of every convertible linear of those layers instead (one at a time)."""
    recipe = get_recipe(recipe)
    decoder = model.backbone
    layers = decoder.layers
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    batches = list(_batches(seqs, pad_id, batch_tokens))
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer, per batch: (B, T, H)

    def capture(i):
        return lambda _mod, args, kwargs: inputs[i].append((args[0] if args else kwargs["hidden_states"]).clone())

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    ref = torch.zeros(len(seqs))
    try:
        for idx, ids, mask in batches:
            ref[idx] = model.score(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    spread = float(ref.std()) or 1.0
    out = []
    original = list(layers)
    replay = _Replay()
    units = []  # (layer index, linears quantised together, whole layer?)
    for i, layer in enumerate(original):
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)
                 and skip_reason(f"{prefix}.{i}.{n}", m, recipe) is None]
        if linears_of is None:
            units.append((i, names, True))
        elif i in linears_of:
            units += [(i, [n], False) for n in names]
    for i, names, whole in tqdm(units, desc="fp8 sensitivity", unit="unit", disable=not progress):
        layer = original[i]
        saved = {n: layer.get_submodule(n) for n in names}
        for n, lin in saved.items():
            layer.set_submodule(n, FP8InferenceLinear.from_linear(lin, recipe.granularity, recipe.block_size,
                                                                  compute_dtype=lin.weight.dtype))
        decoder.layers = nn.ModuleList(([replay] if i else []) + original[i:])
        try:
            got = torch.zeros(len(seqs))
            for b, (idx, ids, mask) in enumerate(batches):
                replay.value = inputs[i][b]
                got[idx] = model.score(ids, mask)
        finally:
            decoder.layers = nn.ModuleList(original)
            for n, lin in saved.items():
                layer.set_submodule(n, lin)
        err = float((got - ref).pow(2).mean().sqrt()) / spread
        name = f"{prefix}.{i}" if whole else f"{prefix}.{i}.{names[0]}"
        out.append(LayerSensitivity(i, name, err, sum(m.weight.numel() for m in saved.values()), whole))
    return out


def pick_keep(scan: list[LayerSensitivity], model, recipe: str | FP8Recipe = "fp8-block64", *,
              max_bytes_ratio: float = 0.55, keep_bytes_per_weight: int = 2) -> list[str]:
    """Keep patterns for the most sensitive units (layers or linears; do not mix overlapping ones),
    most sensitive first, such that the decoder's
    linear-weight bytes stay within `max_bytes_ratio` x their size at `keep_bytes_per_weight` bytes
    (bf16: 2). FP8 layers cost 1 byte per weight plus their scales."""
    recipe = get_recipe(recipe)
    scale_bytes = {"tensor": 0.0, "channel": 0.0, "block": 4.0 / recipe.block_size}[recipe.granularity]
    linears = decoder_linears(model)
    total = sum(m.weight.numel() for _, m in linears)
    convertible = sum(m.weight.numel() for n, m in linears if skip_reason(n, m, recipe) is None)
    budget = max_bytes_ratio * total * keep_bytes_per_weight
    used = convertible * (1 + scale_bytes) + (total - convertible) * keep_bytes_per_weight
    keep = []
    for s in sorted(scan, key=lambda s: -s.error):
        extra = s.weights * (keep_bytes_per_weight - 1 - scale_bytes)
        if used + extra > budget:
            break
        used += extra
        keep.append(s.keep_pattern)
    return keep


def recipe_with_keep(recipe: str | FP8Recipe, keep: list[str]) -> FP8Recipe:
    """`recipe` plus module-name patterns to keep unquantised (`pick_keep`'s output)."""
    recipe = get_recipe(recipe)
    return replace(recipe, keep=tuple(recipe.keep) + tuple(keep))
