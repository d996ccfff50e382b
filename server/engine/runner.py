"""Runs the reward model: device choice, precision, pass planning, packing and prefix KV reuse.

`ModelRunner.score_pairs` is the serving path: each (prompt, response) pair continues the KV
state of its longest cached prefix (prefix_cache.py: kept across calls, or made once in this
call), so only new tokens run, packed into passes without padding (packed.py; a padded fallback
serves architectures packing does not cover). `score_rows` scores plain sequences, right-padded:
the reference path.

Synchronous and single-threaded by design: the batcher calls it from one worker thread so the
event loop never blocks on compute; the prefix cache relies on that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from grmserve.training.core.batching import pad_right
from grmserve.training.core.devices import DTYPES, fast_dtype
from grmserve.training.core.model import GRMModel, pool_last

from .base import BatchStats
from .packed import packed_forward, supports_packing, use_packed_attention
from .planner import Row, plan_wave
from .prefix_cache import PrefixCache

log = logging.getLogger(__name__)



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
    weights with the recipe's scales (training/core/fp8); on CUDA ≥ sm89 the per-channel recipe runs
    `torch._scaled_mm`, elsewhere weights are dequantised right before a matmul. A checkpoint that is
    already FP8 is served as FP8 whatever precision was asked for; an explicit `fp32` or `bf16` then
    sets the dtype the rest of the model and the dequantised matmuls compute in (default: the
    device's fast dtype).
    """
    model.eval()
    already_fp8 = bool(model.grm_config.quantization)
    compute = DTYPES[precision] if already_fp8 and precision in DTYPES and device.type == "cpu" else fast_dtype(device)
    precision = resolve_precision(precision, device)
    if precision == "fp8" or already_fp8:
        from grmserve.training.core.fp8 import (
            FP8InferenceLinear,
            convert_to_fp8,
            get_recipe,
            select_backend,
            set_fp8_backend,
        )

        backend = select_backend(device)
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

    >>> runner = ModelRunner(model, pad_id=0, cache_bytes=1 << 30)      # doctest: +SKIP
    >>> runner.score_rows([[1, 2, 3], [4, 5]])                        # doctest: +SKIP
    [0.12, -0.3]
    >>> runner.score_pairs([((1, 2), [3]), ((1, 2), [6, 7])])[0]      # doctest: +SKIP
    [0.12, 0.5]
    """

    def __init__(self, model: GRMModel, *, pad_id: int, device: torch.device | None = None,
                 cache_bytes: int = 0, packed: bool | None = None):
        self.model = model
        self.pad_id = int(pad_id)
        self.device = device or next(model.parameters()).device
        self.backbone = model.backbone
        self.cache = PrefixCache(cache_bytes)
        self.packed = supports_packing(model.lm) if packed is None else packed
        if self.packed:
            use_packed_attention(model.lm)

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

    # -- pairs with prefix reuse ------------------------------------------------------------------
    def set_head(self, ids: list[int]) -> None:
        """Pin the KV state of the template head every rendered prompt starts with (see PrefixCache)."""
        if not ids:
            return
        with torch.inference_mode():
            _, kv = self._pass([[]], [list(ids)], lengths=[0])
        self.cache.pin_head(ids, kv[0])

    @torch.inference_mode()
    def score_pairs(self, pairs: list[tuple[Sequence[int], Sequence[int]]], *, max_tokens: int = 16384,
                    max_rows: int = 64) -> tuple[list[float], list[BatchStats]]:
        """Score (prompt ids, response ids) pairs; a token prefix's KV state is computed at most once.

        Each sequence (prompt + response) continues the longest prefix the cache holds (prefix_cache.py:
        a prompt seen before, the same prompt with a response that opens the same way, or the
        template head) and computes only the rest; its last token always runs, since its hidden
        state is the score. Identical sequences in one call run once. Of the sequences that would
        compute the same next token, one leads; in packed passes the others borrow its new tokens
        in the same pass (they share them, then run their own) when everything fits one pass and
        the padded attention this adds (a long new prompt pads every borrower's queries to its
        length) costs less than a second pass. Otherwise they wait for a second wave that runs on
        the states the first one stored, so a prompt repeated inside one batch still runs once,
        even when the cache's budget is too small to keep it. Each wave is cut into passes of
        similar new-token lengths within `max_tokens` tokens and `max_rows` rows. Scores come back
        in the order of `pairs`.
        """
        where: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, response) in enumerate(pairs):
            seq = tuple(prompt) + tuple(response)
            if not seq:
                raise ValueError(f"pair {i} has no tokens")
            where.setdefault(seq, []).append(i)
        scores = [0.0] * len(pairs)
        stats: list[BatchStats] = []
        todo = list(where)
        for wave in range(2):
            matches = [self.cache.match(seq, limit=len(seq) - 1) for seq in todo]  # the last token always runs
            plan = plan_wave(todo, matches, first_wave=wave == 0, packed=self.packed, max_tokens=max_tokens,
                             max_rows=max_rows)
            self._count_lookups(plan.rows)
            for batch in plan.passes:
                stats.append(self._run_pass([plan.rows[j] for j in batch], batch, where, scores))
            todo = plan.later
        self.cache.trim()
        return scores, stats

    def _beyond_head(self, seq: tuple[int, ...], n: int) -> bool:
        """Whether reusing `n` tokens of `seq` reuses more than the template head."""
        return n > 0 and seq[:n] != self.cache.head[:n]

    def _count_lookups(self, rows: list[Row]) -> None:
        for row in rows:
            self.cache.stats.reused_tokens += row.start
            if self._beyond_head(row.seq, row.start):
                self.cache.stats.hits += 1
            else:
                self.cache.stats.misses += 1

    def _run_pass(self, chosen: list[Row], batch: list[int], where: dict[tuple[int, ...], list[int]],
                  scores: list[float]) -> BatchStats:
        """Run one planned pass, store its rows' new states in the cache, fill their scores."""
        start = time.perf_counter()
        at = {j: k for k, j in enumerate(batch)}
        borrow = [(at[r.lead], r.shared) if r.lead is not None and r.shared else None for r in chosen]
        news = [list(r.seq[r.start:]) for r in chosen]
        out, kvs = self._pass([r.parts for r in chosen], news, lengths=[r.past for r in chosen],
                              borrow=borrow if any(borrow) else None)
        done = sorted(zip(chosen, out, kvs), key=lambda t: t[0].lead is not None)  # leads store first
        for row, score, kv in done:
            for i in where[row.seq]:
                scores[i] = score
            self.cache.insert(row.seq, row.start, kv)
        tokens = sum(map(len, news))
        return BatchStats(rows=len(batch), tokens=tokens,
                          padded_tokens=tokens if self.packed else len(batch) * max(map(len, news)),
                          compute_seconds=time.perf_counter() - start,
                          kind="cached_prompt" if any(self._beyond_head(r.seq, r.start) for r in chosen) else "pairs")

    def _pass(self, pasts: list[list[torch.Tensor]], news: list[list[int]], *, lengths: list[int],
              borrow: list[tuple[int, int] | None] | None = None) -> tuple[list[float], list[torch.Tensor]]:
        """One forward pass: row i continues its past KV state (`lengths[i]` tokens, given as pieces
        along the tokens, or none) with `news[i]`; with `borrow[i] = (r, s)` (packed passes only),
        after the first s new tokens of row r. Returns the scores at each row's last token and the
        KV state of each row's new tokens, shaped (layers, 2, kv_heads, len(news[i]), d)."""
        stacked = self._stack_pasts(pasts, lengths)
        if self.packed:
            return self._pass_packed(stacked, news, lengths=lengths, borrow=borrow)
        if borrow:
            raise ValueError("only packed passes can borrow another row's tokens")
        return self._pass_padded(stacked, news, lengths=lengths)

    def _stack_pasts(self, pasts: list[list[torch.Tensor]], lengths: list[int]) -> torch.Tensor | None:
        """Per-row states → one right-padded (layers, 2, rows, kv_heads, longest, d) tensor, or None."""
        longest_past = max(lengths)
        if not longest_past:
            return None
        ref = next(parts[0] for parts in pasts if parts)
        layers, _, heads, _, dim = ref.shape
        # zeros, not empty: padded positions are masked, but a NaN value there would still poison the sums
        out = torch.zeros(layers, 2, len(pasts), heads, longest_past, dim, dtype=ref.dtype, device=self.device)
        for i, parts in enumerate(pasts):
            at = 0
            for kv in parts:
                out[:, :, i, :, at:at + kv.shape[3]] = kv
                at += kv.shape[3]
        return out

    def _pass_packed(self, pasts: torch.Tensor | None, news: list[list[int]], *, lengths: list[int],
                     borrow: list[tuple[int, int] | None] | None = None) -> tuple[list[float], list[torch.Tensor]]:
        last, new_kv, starts = packed_forward(self.backbone, news, pasts, lengths, capture=True, borrow=borrow)
        scores = self.model.reward_head(last).float().tolist()
        new = torch.stack([new_kv[layer] for layer in range(len(new_kv))])  # (layers, 2, kv_heads, N, d)
        return scores, [new[:, :, :, int(s):int(s) + len(r)] for s, r in zip(starts, news)]

    def _pass_padded(self, pasts: torch.Tensor | None, news: list[list[int]], *,
                     lengths: list[int]) -> tuple[list[float], list[torch.Tensor]]:
        longest_past = max(lengths)
        ids, new_mask = self._pad(news)  # (B, R)
        past_mask = (torch.arange(longest_past, device=self.device).unsqueeze(0)
                     < torch.tensor(lengths, device=self.device).unsqueeze(1)).to(new_mask.dtype)  # (B, P)
        cache = None  # without pasts the model makes its own cache, typed for its architecture
        if pasts is not None:
            cache = DynamicCache(ddp_cache_data=[(pasts[layer, 0], pasts[layer, 1]) for layer in range(pasts.shape[0])])
        start = torch.tensor(lengths, device=self.device).unsqueeze(1)  # (B, 1)
        positions = start + torch.arange(ids.shape[1], device=self.device).unsqueeze(0)  # (B, R)
        out = self.backbone(input_ids=ids, attention_mask=torch.cat([past_mask, new_mask], dim=1),
                            past_key_values=cache, position_ids=positions, use_cache=True)
        scores = self.model.reward_head(pool_last(out.last_hidden_state, new_mask)).float().tolist()
        new = torch.stack([torch.stack([layer.keys, layer.values]) for layer in out.past_key_values.layers])
        new = new[:, :, :, :, longest_past:]  # (layers, 2, B, kv_heads, R, d): the new tokens
        return scores, [new[:, :, i, :, :len(r)] for i, r in enumerate(news)]
