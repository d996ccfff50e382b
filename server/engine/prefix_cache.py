"""KV states of token prefixes kept across requests (a radix tree), so shared prefixes run once.

RLHF traffic repeats itself: chosen and rejected arrive as two pairs of one prompt, PPO scores n
samples of a prompt as they finish, best-of-n re-ranks, samples often open the same way or come
out identical, clients retry. Every rendered chat also starts with the same template head
(`<|im_start|>system ... <|im_start|>user\\n` for SmolLM2). The KV state of a causal decoder at
position j depends only on tokens 0..j, so any prefix's keys and values can be stored once and
every later sequence that starts with it continues from there; the score is the same (to float
rounding) as running the whole sequence from scratch.

`PrefixCache` is a radix tree over token ids (the idea of SGLang's RadixAttention, at token
granularity: vLLM's automatic prefix caching reuses whole blocks only). Each node holds one
segment of tokens and its KV state, shaped (layers, 2, kv_heads, tokens, head_dim); a path from
the root spells a cached prefix. `match` finds the longest cached prefix of a sequence, `insert`
adds the state of what was just computed (splitting a segment where sequences part), `trim`
evicts least recently used leaves until the byte budget holds. The template head is pinned: it is
outside the budget and never leaves. Only the model thread touches the cache (see runner.py), so
there is no locking.

    >>> cache = PrefixCache(max_bytes=1 << 20)
    >>> cache.insert((1, 2, 3, 4), 0, torch.zeros(2, 2, 1, 4, 8))
    >>> n, parts = cache.match((1, 2, 9))
    >>> n, [p.shape[3] for p in parts], cache.nbytes, len(cache)
    (2, [2], 512, 1)
    >>> cache.insert((1, 2, 9), 2, torch.ones(2, 2, 1, 1, 8))   # (1, 2) | (3, 4) and (9,)
    >>> len(cache), cache.match((1, 2, 9, 9))[0]
    (3, 3)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class PrefixStats:
    """Running totals since start-up (the metrics layer turns them into counters)."""

    hits: int = 0  # sequences that continued a cached prefix longer than the pinned head
    misses: int = 0
    evictions: int = 0
    reused_tokens: int = 0  # tokens not recomputed thanks to a cached or shared state

    def since(self, before: PrefixStats) -> PrefixStats:
        """What was added after `before` (an earlier copy of these totals, `dataclasses.replace(stats)`)."""
        return PrefixStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})


class _Node:
    __slots__ = ("tokens", "kv", "parent", "children", "used", "pinned")

    def __init__(self, tokens: tuple[int, ...], kv: torch.Tensor | None, parent: _Node | None, *, used: int = 0,
                 pinned: bool = False):
        self.tokens = tokens
        self.kv = kv  # (layers, 2, kv_heads, len(tokens), head_dim)
        self.parent = parent
        self.children: dict[int, _Node] = {}  # keyed by their first token
        self.used = used  # LRU clock of the last match or insert through this node
        self.pinned = pinned

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


def _own(kv: torch.Tensor) -> torch.Tensor:
    """A compact copy: a slice would keep its whole parent tensor alive and out of the byte count."""
    return kv.clone(memory_format=torch.contiguous_format)


def common_length(segment: tuple[int, ...], ids: Sequence[int], at: int) -> int:
    """How many leading tokens of `segment` equal ids[at:]."""
    k, end = 0, min(len(segment), len(ids) - at)
    while k < end and segment[k] == ids[at + k]:
        k += 1
    return k


class PrefixCache:
    """Radix tree from token prefixes to their KV state, bounded in bytes, with a pinned head."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._root = _Node((), None, None, pinned=True)
        self._clock = 0
        self._count = 0  # unpinned segments
        self.nbytes = 0  # of unpinned segments
        self.stats = PrefixStats()
        self.head: tuple[int, ...] = ()

    def __len__(self) -> int:
        """Cached segments (a segment is a run of tokens between two branch points), head excluded."""
        return self._count

    def pin_head(self, ids: Sequence[int], kv: torch.Tensor) -> None:
        """Start over with the template head every rendered prompt starts with; it stays outside
        the byte budget and is never evicted."""
        self.clear()
        self._root.children.clear()
        self.head = tuple(ids)
        if self.head:
            self._root.children[self.head[0]] = _Node(self.head, _own(kv), self._root, pinned=True)

    def match(self, ids: Sequence[int], limit: int | None = None) -> tuple[int, list[torch.Tensor]]:
        """Length n of the longest cached prefix of `ids` (at most `limit`) and the KV pieces that
        make it up, in order along the tokens; their lengths sum to n."""
        self._clock += 1
        limit = len(ids) if limit is None else min(limit, len(ids))
        node, n, parts = self._root, 0, []
        while n < limit:
            child = node.children.get(ids[n])
            if child is None:
                break
            k = min(common_length(child.tokens, ids, n), limit - n)
            child.used = self._clock
            parts.append(child.kv if k == len(child.tokens) else child.kv[:, :, :, :k])
            n += k
            if k < len(child.tokens):
                break
            node = child
        return n, parts

    def insert(self, ids: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Record `kv`, the state of ids[start:] computed on top of the cached prefix ids[:start]
        ((layers, 2, kv_heads, len(ids) - start, head_dim)). What is cached already stays as it
        is; nothing is added when ids[:start] has been evicted in the meantime. The budget is
        enforced by `trim`, not here, so a state stays reusable until the caller is done."""
        self._clock += 1
        node, n = self._root, 0
        while n < len(ids):
            child = node.children.get(ids[n])
            if child is None:
                break
            k = common_length(child.tokens, ids, n)
            if n + k == len(ids):
                child.used = self._clock
                return  # ids ends inside (or at the end of) a cached segment
            if k < len(child.tokens):
                child = self._split(child, k)
            child.used = self._clock
            node, n = child, n + k
        if n == len(ids) or n < start:
            return
        leaf = _Node(tuple(ids[n:]), _own(kv[:, :, :, n - start:]), node, used=self._clock)
        node.children[ids[n]] = leaf
        self._count += 1
        self.nbytes += leaf.nbytes

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node` after its first k tokens; returns the new upper part."""
        upper = _Node(node.tokens[:k], _own(node.kv[:, :, :, :k]), node.parent, used=node.used, pinned=node.pinned)
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[k:], _own(node.kv[:, :, :, k:]), upper
        upper.children[node.tokens[0]] = node
        if not node.pinned:
            self._count += 1
        return upper

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def trim(self) -> None:
        """Evict least recently used leaves until the unpinned segments fit in the byte budget."""
        if self.nbytes <= self.max_bytes:
            return
        heap = [(n.used, id(n), n) for n in self._nodes() if not n.children and not n.pinned]
        heapq.heapify(heap)
        while heap and self.nbytes > self.max_bytes:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.tokens[0]]
            self.nbytes -= node.nbytes
            self._count -= 1
            self.stats.evictions += 1
            if not parent.children and not parent.pinned:
                heapq.heappush(heap, (parent.used, id(parent), parent))

    def clear(self) -> None:
        """Drop every unpinned segment (the head stays)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.children = {t: c for t, c in node.children.items() if c.pinned}
            stack.extend(node.children.values())
        self._count = 0
        self.nbytes = 0


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
