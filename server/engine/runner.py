"""Runs the reward model: device choice, precision, padding, and shared-prompt KV reuse.

Synchronous and single-threaded by design: the batcher calls it from one worker thread so the
event loop never blocks on compute.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from grmserve.training.data import pad_right
from grmserve.training.devices import fast_dtype
from grmserve.training.model import GRMModel, pool_last

from .base import BatchStats

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


def resolve_device(spec: str) -> torch.device:
    """`auto` → cuda when one is visible, else cpu. Asking for cuda without one is an error.

    >>> resolve_device("cpu").type
    'cpu'
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--model.device {spec}: no CUDA device is available (this torch is "
                          f"{torch.__version__}); use --model.device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → fp8 on CUDA with compute capability ≥ 8.9, bf16 where bf16 is fast, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "bf16"
    return "bf16" if fast_dtype(device) == torch.bfloat16 else "fp32"


def prepare_model(model: GRMModel, precision: str, device: torch.device, fp8_recipe: str = "fp8-block64") -> str:
    """Cast (or quantise) the model for inference, in place; returns the precision in effect.

    The reward head always stays in float32. `fp8`: linear layers of the decoder hold float8 e4m3
    weights with the recipe's scales (training/fp8); on CUDA ≥ sm89 the per-channel recipe runs
    `torch._scaled_mm`, elsewhere weights are dequantised right before a matmul. A checkpoint that is
    already FP8 is served as FP8 whatever precision was asked for.
    """
    model.eval()
    precision = resolve_precision(precision, device)
    already_fp8 = bool(model.grm_config.quantization)
    if precision == "fp8" or already_fp8:
        from grmserve.training.fp8 import (FP8InferenceLinear, convert_to_fp8, get_recipe, select_backend,
                                           set_fp8_backend)

        backend = select_backend(device)
        compute = fast_dtype(device)
        model.lm.to(dtype=compute)
        if not already_fp8:
            recipe = dataclasses.replace(get_recipe(fp8_recipe), compute_dtype=str(compute).removeprefix("torch."))
            report = convert_to_fp8(model, recipe, backend=backend)
            log.info("fp8: %s", report.summary())
        model.lm.to(device=device)
        set_fp8_backend(model, backend)
        for module in model.modules():
            if isinstance(module, FP8InferenceLinear):
                module.compute_dtype = compute
        precision = "fp8"
    elif precision in ("fp32", "bf16"):
        model.lm.to(device=device, dtype=DTYPES[precision])
    else:
        raise ValueError(f"unknown precision {precision!r}")
    model.reward_head.to(device=device, dtype=torch.float32)
    return precision


class ModelRunner:
    """Scores token sequences with a prepared GRMModel.

    >>> runner = ModelRunner(model, pad_id=0)                         # doctest: +SKIP
    >>> runner.score_rows([[1, 2, 3], [4, 5]])                        # doctest: +SKIP
    [0.12, -0.3]
    """

    def __init__(self, model: GRMModel, *, pad_id: int, device: torch.device | None = None):
        self.model = model
        self.pad_id = int(pad_id)
        self.device = device or next(model.parameters()).device
        self.backbone = model.backbone

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_right(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)  # (B, T) right-padded

    @torch.inference_mode()
    def score_rows(self, rows: list[list[int]]) -> tuple[list[float], BatchStats]:
        """Independent sequences, right-padded into one forward pass."""
        start = time.perf_counter()
        ids, mask = self._pad(rows)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        scores = self.model.reward_head(pool_last(hidden, mask)).float().tolist()
        stats = BatchStats(rows=len(rows), tokens=int(mask.sum()), padded_tokens=ids.numel(),
                           compute_seconds=time.perf_counter() - start, kind="pairs")
        return scores, stats

    @torch.inference_mode()
    def score_prefixed(self, prompts: list[list[int]], items: list[tuple[int, list[int]]],
                       kind: str = "shared_prompt") -> tuple[list[float], BatchStats]:
        """Responses that continue a few distinct prompts: each prompt runs once, and every
        response attends to its own prompt's KV cache.

        `items` are (prompt index, response ids). Prompts are right-padded into one pass; the
        response pass masks the prompt padding and continues each row at its own prompt's length,
        so the scores equal scoring each prompt + response on its own.
        """
        start = time.perf_counter()
        pids, pmask = self._pad(prompts)  # (U, P)
        cache = self.backbone(input_ids=pids, attention_mask=pmask, use_cache=True).past_key_values
        which = torch.tensor([i for i, _ in items], dtype=torch.long, device=self.device)  # (B,)
        cache.batch_select_indices(which)  # (B, kv_heads, P, d) per layer
        ids, resp_mask = self._pad([r for _, r in items])  # (B, R)
        mask = torch.cat([pmask[which], resp_mask], dim=1)  # (B, P+R)
        plen = pmask.sum(1)[which]  # (B,)
        positions = plen.unsqueeze(1) + torch.arange(ids.shape[1], device=self.device).unsqueeze(0)  # (B, R)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions,
                               use_cache=True).last_hidden_state  # (B, R, H)
        scores = self.model.reward_head(pool_last(hidden, resp_mask)).float().tolist()
        stats = BatchStats(rows=len(items), tokens=int(pmask.sum()) + int(resp_mask.sum()),
                           padded_tokens=pids.numel() + ids.numel(), compute_seconds=time.perf_counter() - start,
                           kind=kind)
        return scores, stats

    def score_shared(self, prompt_ids: list[int], responses: list[list[int]]) -> tuple[list[float], BatchStats]:
        """n responses to one prompt: the prompt runs once, its KV cache is shared by all n."""
        if not prompt_ids:
            return self.score_rows(responses)
        return self.score_prefixed([prompt_ids], [(0, r) for r in responses])
