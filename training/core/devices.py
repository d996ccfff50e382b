"""Devices and dtypes: the one place they are resolved, for training and serving alike.

    >>> resolve_device("cpu").type
    'cpu'
    >>> fast_dtype(torch.device("cuda"))
    torch.bfloat16
    >>> DTYPES["bf16"]
    torch.bfloat16
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

DType = Literal["fp32", "bf16"]
"""How every command spells a dtype."""
DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DType), (torch.float32, torch.bfloat16)))


class DeviceError(ValueError):
    """The requested device cannot be used (the message says what to pass instead)."""


def resolve_device(spec: str) -> torch.device:
    """`auto` → cuda when one is visible, else cpu; `cpu`, `cuda`, `cuda:N` as given. Asking for
    cuda without one is a `DeviceError`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec}: no CUDA device is available (this torch is {torch.__version__}); "
                          "use cpu")
    return device


def fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matmuls in it are fast (CUDA; CPUs with native bf16 such as AMX/AVX512-BF16),
    else float32: on an AVX2-only CPU a bf16 matmul is ~100x slower than fp32 (bench/serve.py
    measured 0.5–0.9 vs 58–127 GFLOP/s on this project's 2-core machines)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
