"""FP8 primitives (formats, scaling, quantise/dequantise, FP8 linear), shared by training and serving.

The one home of FP8 in grm-serve; see training/core/fp8/DESIGN.md. What the reward server calls:

    >>> import torch
    >>> from grmserve.training.core.fp8 import convert_to_fp8, select_backend, set_fp8_backend
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> convert_to_fp8(net, "fp8-block64").converted
    ['0']
    >>> set_fp8_backend(net, select_backend("cpu"))
    1
"""

from .convert import (
    RECIPES,
    ConversionReport,
    FP8Recipe,
    convert_to_fp8,
    get_recipe,
    skip_reason,
)
from .formats import (
    E4M3,
    E5M2,
    DelayedScaling,
    FP8Format,
    FP8ScaleError,
    cast_to_fp8,
    compute_scale,
    dequantize,
    get_format,
    quantize_per_block,
    quantize_per_channel,
    quantize_per_tensor,
    sqnr_db,
)
from .linear import (
    BACKENDS,
    FP8BackendError,
    FP8InferenceLinear,
    select_backend,
    set_fp8_backend,
)

__all__ = [
    "BACKENDS", "E4M3", "E5M2", "RECIPES", "ConversionReport", "DelayedScaling", "FP8BackendError", "FP8Format",
    "FP8InferenceLinear", "FP8Recipe", "FP8ScaleError", "cast_to_fp8", "compute_scale", "convert_to_fp8",
    "dequantize", "get_format", "get_recipe", "quantize_per_block",
    "quantize_per_channel", "quantize_per_tensor", "select_backend", "set_fp8_backend",
    "skip_reason", "sqnr_db",
]
