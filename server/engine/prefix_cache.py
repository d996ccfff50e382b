"""Prompt KV states kept across requests, so a prompt seen before costs only its responses.

RLHF traffic repeats prompts: chosen and rejected arrive as two pairs, PPO scores n samples of one
prompt as they finish, best-of-n re-ranks, clients retry. Every rendered chat also starts with the
same template head (`<|im_start|>system ... <|im_start|>user\n` for SmolLM2). The KV state of a
causal decoder at position j depends only on tokens 0..j, so a prompt's keys and values can be
stored once and every later response appended to them; the score is the same (to float rounding)
as running prompt + response from scratch.

`PrefixCache` holds those states, one tensor per prompt of shape (layers, 2, kv_heads, tokens,
head_dim), least recently used first out, bounded in bytes. The template head is pinned: it never
leaves, and a prompt the cache has not seen starts from it instead of from token 0. Only the model
thread touches the cache (see runner.py), so there is no locking.

    >>> cache = PrefixCache(max_bytes=1 << 20)
    >>> kv = torch.zeros(2, 2, 1, 4, 8)
    >>> cache.put((1, 2, 3, 4), kv)
    True
    >>> cache.get((1, 2, 3, 4)) is kv, cache.get((9,))
    (True, None)
    >>> cache.stats.hits, cache.stats.misses, cache.nbytes
    (1, 1, 512)
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class PrefixStats:
    """Running totals since start-up (the metrics layer turns them into counters)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    reused_tokens: int = 0  # prompt tokens not recomputed thanks to a cached or shared state

    def since(self, before: PrefixStats) -> PrefixStats:
        """What was added after `before` (an earlier copy of these totals, `dataclasses.replace(stats)`)."""
        return PrefixStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})


class PrefixCache:
    """LRU map from prompt token ids to their KV state, bounded in bytes, with one pinned head."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self.nbytes = 0
        self.stats = PrefixStats()
        self.head: tuple[int, ...] = ()
        self.head_kv: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def pin_head(self, ids: Sequence[int], kv: torch.Tensor) -> None:
        """The template head every rendered prompt starts with; kept outside the byte budget."""
        self.head, self.head_kv = tuple(ids), kv

    def head_of(self, prompt: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """(length, KV) of the pinned head when `prompt` starts with it, else (0, None)."""
        n = len(self.head)
        if n and self.head_kv is not None and len(prompt) >= n and tuple(prompt[:n]) == self.head:
            return n, self.head_kv
        return 0, None

    def get(self, prompt: tuple[int, ...]) -> torch.Tensor | None:
        kv = self._entries.get(prompt)
        if kv is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(prompt)
        self.stats.hits += 1
        return kv

    def clear(self) -> None:
        """Drop every entry (the pinned head stays)."""
        self._entries.clear()
        self.nbytes = 0

    def put(self, prompt: tuple[int, ...], kv: torch.Tensor) -> bool:
        """Store `kv` (evicting the least recently used); False when it alone exceeds the budget."""
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return False
        old = self._entries.pop(prompt, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        while self._entries and self.nbytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.numel() * evicted.element_size()
            self.stats.evictions += 1
        self._entries[prompt] = kv
        self.nbytes += size
        return True


def common_head(encodings: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix shared by every encoding (the chat template's constant head).

    >>> common_head([[1, 2, 3, 9], [1, 2, 3, 7, 7], [1, 2, 4]])
    [1, 2]
    """
    if not encodings:
        return []
    head = list(encodings[0])
    for ids in encodings[1:]:
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        head = head[:n]
    return head
