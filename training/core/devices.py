"""Device facts shared by training and serving.

    >>> import torch
    >>> fast_dtype(torch.device("cuda"))
    torch.bfloat16
"""

from __future__ import annotations

import torch


def fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matmuls in it are fast (CUDA; CPUs with native bf16 such as AMX/AVX512-BF16),
    else float32: on an AVX2-only CPU a bf16 matmul is ~100x slower than fp32 (bench/serve.py
    measured 0.5–0.9 vs 58–127 GFLOP/s on this project's 2-core machines)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
