"""One converter to FP8 (`convert_to_fp8`), and FP8 checkpoints (save, load, `quantize_checkpoint`).

A recipe names the weight granularity and the module filter. The filter never converts the reward
head (scores are what the server sells), skips the LM head and embeddings by default, skips every
linear layer whose in/out dimensions are not multiples of 16 (`torch._scaled_mm` needs them), and
keeps any layer named in `recipe.keep` in its current dtype. The checkpoint layout is described in
training/core/fp8/DESIGN.md.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> report = convert_to_fp8(net, "fp8-channel")
    >>> report.converted, report.skipped
    (['0'], {'2': 'dims (10, 64) not multiples of 16'})
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

import torch
from torch import nn

from ..model import GRMModel
from .formats import E4M3
from .linear import GRANULARITIES, FP8InferenceLinear

QUANT_FORMAT_VERSION = 1
SCALE_SUFFIX = "weight_scale"
INPUT_SCALE = "input_scale"  # optional, per FP8 layer: static activation scale of FP8-trained weights
RESIDUAL_TENSORS = ("residual_index", "residual", "residual_scale")  # optional, per FP8 layer (residuals.py)
NEVER_CONVERTED = "reward_head"  # GRMModel's head: always kept in full precision
DIM_MULTIPLE = 16

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(kw_only=True)
class FP8Recipe:
    """How to convert a model's linear layers to FP8 for inference."""

    name: str = "fp8-channel"
    """Recipe name, recorded in the checkpoint."""
    granularity: str = "channel"
    """Weight scales: `tensor` (one), `channel` (one per output row) or `block` (one per `block_size`
    inputs per row)."""
    block_size: int = 64
    """Weights per scale along the input dim, for `block`."""
    skip: tuple[str, ...] = ("lm_head", "embed_tokens")
    """Module-name patterns never converted (the reward head is never converted regardless)."""
    keep: tuple[str, ...] = ()
    """Sensitive layers to keep unquantised, in the model's dtype (bf16 when served in bf16)."""
    compute_dtype: str = "bfloat16"
    """Matmul dtype of the emulated backend and output dtype of `_scaled_mm`."""

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "block" and self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")
        self.skip, self.keep = tuple(self.skip), tuple(self.keep)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]


def _tensor() -> FP8Recipe:
    """One scale per weight matrix (FP8-LM's training granularity; least accurate for serving)."""
    return FP8Recipe(name="fp8-tensor", granularity="tensor")


def _channel() -> FP8Recipe:
    """Per-output-channel scales: W8A8 `_scaled_mm` on GPUs (≥ sm89), W8A16 emulation on CPU."""
    return FP8Recipe(name="fp8-channel", granularity="channel")


def _block64() -> FP8Recipe:
    """A scale per 64 inputs per row: the most accurate; W8A16 on every device."""
    return FP8Recipe(name="fp8-block64", granularity="block", block_size=64)


def _block128() -> FP8Recipe:
    return FP8Recipe(name="fp8-block128", granularity="block", block_size=128)


RecipeName = Literal["fp8-block64", "fp8-block128", "fp8-channel", "fp8-tensor", "fp8"]
"""Recipes by name; `fp8` (per-channel) is the default behind `--precision fp8` on its own."""
RECIPES: dict[str, Callable[[], FP8Recipe]] = dict(zip(get_args(RecipeName),
                                                     (_block64, _block128, _channel, _tensor, _channel)))


def get_recipe(recipe: str | FP8Recipe | None = None) -> FP8Recipe:
    """A recipe by name (see `RECIPES`; None → "fp8"), or the given `FP8Recipe` unchanged."""
    if isinstance(recipe, FP8Recipe):
        return recipe
    name = recipe or "fp8"
    if name not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]()


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a dotted module name exactly, as a suffix (`model.layers.0.mlp.up_proj`
    matches `lm.model.layers.0.mlp.up_proj`), as one of its components, or as an fnmatch glob."""
    return name == pattern or name.endswith("." + pattern) or pattern in name.split(".") or \
        fnmatch.fnmatchcase(name, pattern)


def skip_reason(name: str, module: nn.Module, recipe: FP8Recipe) -> str | None:
    """Why the module `name` is not converted, or None when it is (the converter's module filter)."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if NEVER_CONVERTED in name.split("."):
        return "reward head (never converted)"
    for pattern in recipe.skip:
        if _matches(name, pattern):
            return f"skip pattern {pattern!r}"
    for pattern in recipe.keep:
        if _matches(name, pattern):
            return f"kept in full precision ({pattern!r})"
    if module.in_features % DIM_MULTIPLE or module.out_features % DIM_MULTIPLE:
        return f"dims ({module.out_features}, {module.in_features}) not multiples of {DIM_MULTIPLE}"
    return None


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name in `model`, module) of every `nn.Linear` inside a `GRMModel`'s decoder (`model.backbone`)."""
    in_backbone = {id(m) for m in model.backbone.modules()}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in in_backbone]


@dataclass
class ConversionReport:
    """What `convert_to_fp8` did. Bytes count linear-layer weights (+ scales) only, each tensor once."""

    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Linear layers left alone, with the reason."""
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    converted_bytes_before: int = 0
    converted_bytes_after: int = 0

    def summary(self) -> str:
        mib = 1 / 2**20
        return (f"{self.recipe}: {len(self.converted)} linear layers to FP8, {len(self.skipped)} kept; "
                f"converted weights {self.converted_bytes_before * mib:.1f} → "
                f"{self.converted_bytes_after * mib:.1f} MiB, "
                f"all linear weights {self.linear_bytes_before * mib:.1f} → {self.linear_bytes_after * mib:.1f} MiB")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _linear_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            tensors = [module.weight]
        elif isinstance(module, FP8InferenceLinear):
            tensors = module.stored_tensors()
        else:
            continue
        for t in tensors:
            key = (t.device, t.data_ptr()) if not t.is_meta else id(t)
            if key not in seen:
                seen.add(key)
                total += _nbytes(t)
    return total


def _lm_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The causal LM inside a GRMModel (weights in model.safetensors are named relative to it)."""
    return (model.lm, "lm.") if isinstance(model, GRMModel) else (model, "")


def quantization_description(recipe: FP8Recipe, modules: list[str]) -> dict[str, Any]:
    """The `grm.quantization` block of config.json (see training/core/fp8/DESIGN.md)."""
    return {
        "method": "fp8",
        "version": QUANT_FORMAT_VERSION,
        "recipe": recipe.name,
        "weight_dtype": "float8_e4m3fn",
        "granularity": recipe.granularity,
        "block_size": recipe.block_size if recipe.granularity == "block" else None,
        "scale": "dequant",  # weight ≈ float(weight) * weight_scale
        "compute_dtype": recipe.compute_dtype,
        "modules": sorted(modules),
    }


def convert_to_fp8(model: nn.Module, recipe: str | FP8Recipe | None = None, *,
                   backend: str = "emulated") -> ConversionReport:
    """Replace, in place, every `nn.Linear` that passes the recipe's filter with an `FP8InferenceLinear`.

    On a `GRMModel`, also records the `grm.quantization` block so `save_grm` writes an FP8
    checkpoint. Set the backend for the model's device afterwards (`set_fp8_backend(model,
    select_backend(device))`), or pass it here.
    """
    recipe = get_recipe(recipe)
    report = ConversionReport(recipe=recipe.name, linear_bytes_before=_linear_bytes(model))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        reason = skip_reason(name, module, recipe)
        if reason is not None:
            report.skipped[name] = reason
            continue
        fp8 = FP8InferenceLinear.from_linear(module, recipe.granularity, recipe.block_size, backend=backend,
                                             compute_dtype=recipe.torch_compute_dtype)
        report.converted_bytes_before += _nbytes(module.weight)
        report.converted_bytes_after += _nbytes(fp8.weight) + _nbytes(fp8.weight_scale)
        model.set_submodule(name, fp8)
        report.converted.append(name)
    report.linear_bytes_after = _linear_bytes(model)

    lm, prefix = _lm_of(model)
    if lm is not model:
        names = [n[len(prefix):] for n in report.converted]
        model.grm_config.quantization = quantization_description(recipe, names)
    return report


def install_fp8_weights(root: nn.Module, tensors: dict[str, torch.Tensor], *, granularity: str,
                        block_size: int | None, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every `nn.Linear` of `root` whose `<name>.weight` in `tensors` is float8 by an
    `FP8InferenceLinear` holding those bytes and `<name>.weight_scale` (its bias kept), and the static
    activation scale `<name>.input_scale` where given: trained FP8 weights served as they are. Returns
    the names replaced.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 16))
        >>> w = torch.zeros(16, 32).to(torch.float8_e4m3fn)
        >>> install_fp8_weights(net, {"0.weight": w, "0.weight_scale": torch.ones(1, 1)}, granularity="tensor",
        ...                     block_size=None)
        ['0']
    """
    names = sorted(k[: -len(".weight")] for k, v in tensors.items() if k.endswith(".weight") and v.dtype == E4M3.dtype)
    for name in names:
        old = root.get_submodule(name)
        scale = tensors.get(f"{name}.weight_scale")
        if not isinstance(old, nn.Linear) or scale is None:
            raise ValueError(f"`{name}`: an FP8 weight needs an nn.Linear to replace and a `{name}.weight_scale`")
        bias = None if old.bias is None else old.bias.detach()
        new = FP8InferenceLinear.from_quantized(tensors[f"{name}.weight"], scale, bias, granularity=granularity,
                                                block_size=block_size, compute_dtype=compute_dtype)
        new.set_input_scale(tensors.get(f"{name}.{INPUT_SCALE}"))
        root.set_submodule(name, new)
    return names
