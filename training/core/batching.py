"""Token rows into tensors and passes: right-padding and the pass planner, shared by the server's
runner, the trainer's collation, grm-experiment and the FP8 calibration scans. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded into (ids, attention mask), both (N, longest) long.

    >>> pad_right([[1, 2], [3]], pad_id=0)[0].tolist()
    [[1, 2], [3, 0]]
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def plan_batches(lengths: list[int], max_tokens: int, max_rows: int, *, past: list[int] | None = None,
                 max_past_tokens: int | None = None) -> list[list[int]]:
    """Indices of sequences grouped into passes: sorted by length, each pass's rows × longest
    row within `max_tokens` (a single over-long row still gets its own pass). Used by the
    server's runner, grm-experiment and the FP8 calibration scans. With `past` (tokens
    of cached state each row continues), rows × longest past also stays within `max_past_tokens`.

    >>> plan_batches([5, 100, 6, 90], max_tokens=200, max_rows=8)
    [[0, 2], [3, 1]]
    >>> plan_batches([5, 6, 7], max_tokens=200, max_rows=8, past=[50, 60, 10], max_past_tokens=120)
    [[0, 1], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest_past = 0
    for i in order:
        longest = lengths[i]  # sorted ascending: the newest row is the longest
        p = max(longest_past, past[i]) if past else 0
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows
                        or (past and max_past_tokens is not None and (len(current) + 1) * p > max_past_tokens)):
            batches.append(current)
            current, p = [], past[i] if past else 0
        current.append(i)
        longest_past = p
    if current:
        batches.append(current)
    return batches
