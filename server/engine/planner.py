"""Planning one step's passes: which rows run, which tokens each computes, in which pass. Pure.

The runner (runner.py) looks every distinct sequence up in the prefix cache and hands the matches
here; `plan_wave` decides, without touching a model or the cache:

- each row continues its longest cached prefix and computes the rest; its last token always runs
  (its hidden state is the score);
- of the sequences whose next token to compute is the same, one leads. In packed passes the others
  borrow its new tokens in the same pass when everything fits one pass and the padded attention
  this adds costs less than a second pass (`PASS_AREA`); otherwise they wait for a second wave that
  runs on the states the first one stored, so a prompt repeated inside one step still runs once;
- the rows are cut into passes of similar new-token lengths within `max_tokens` tokens,
  `max_rows` rows and `PAST_BUDGET_FACTOR` × `max_tokens` of cached prefix read per pass.

    >>> plan = plan_wave([(1, 2, 3), (1, 2, 4), (9,)], [(0, []), (0, []), (0, [])], first_wave=True,
    ...                  packed=True, max_tokens=64, max_rows=8)
    >>> [(r.seq, r.start, r.lead) for r in plan.rows], plan.passes, plan.later
    ([((1, 2, 3), 0, None), ((9,), 0, None), ((1, 2, 4), 2, 0)], [[1, 2, 0]], [])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from grmserve.training.core.batching import plan_batches

from .prefix_cache import common_length

PAST_BUDGET_FACTOR = 2  # a pass may read up to this many × max_tokens of cached prefix KV (rows × longest past)
# What one more pass costs, in (query, key) pairs of padded attention: on 2 EPYC cores a pass has about 0.1 s of
# fixed cost (weights read once more, per-layer overhead) and attention takes about 1 µs per pair over all layers.
PASS_AREA = 1 << 17


@dataclasses.dataclass
class Row:
    """One sequence of a wave: it continues `past` cached tokens (`parts`, opaque to the planner),
    then, when it has a lead, the first `shared` new tokens of that row of the same pass, then runs
    its own."""

    seq: tuple[int, ...]
    past: int
    parts: list[Any]
    lead: int | None = None  # index of the leading row in this wave's rows
    shared: int = 0

    @property
    def start(self) -> int:
        """Where the tokens this row computes begin."""
        return self.past + self.shared

    @property
    def new(self) -> int:
        """How many tokens this row computes."""
        return len(self.seq) - self.start


@dataclasses.dataclass
class WavePlan:
    rows: list[Row]
    """Rows computed in this wave (a lead always comes before the rows that borrow from it)."""
    passes: list[list[int]]
    """Indices into `rows`, one list per forward pass."""
    later: list[tuple[int, ...]]
    """Sequences left for the next wave: they continue a lead's state once it is stored."""


def attention_area(rows: list[Row], *, separate: bool = False) -> int:
    """(query, key) pairs of a packed pass's padded attention: rows × longest × (past + borrowed +
    longest). `separate`: the rows as a later wave would run them, their lead's tokens in the past."""
    if not rows:
        return 0
    longest = max(r.new for r in rows)
    if separate:
        return len(rows) * longest * (max(r.start for r in rows) + longest)
    return len(rows) * longest * (max(r.past for r in rows) + max(r.shared for r in rows) + longest)


def cut_passes(rows: list[Row], max_tokens: int, max_rows: int) -> list[list[int]]:
    """`rows` cut into passes (indices), by new-token length, within the token, row and past budgets."""
    return plan_batches([r.new for r in rows], max_tokens, max_rows, past=[r.past for r in rows],
                        max_past_tokens=PAST_BUDGET_FACTOR * max_tokens)


def plan_wave(seqs: Sequence[tuple[int, ...]], matches: Sequence[tuple[int, list[Any]]], *, first_wave: bool,
              packed: bool, max_tokens: int, max_rows: int) -> WavePlan:
    """Plan one wave over distinct sequences; `matches[i]` is (cached tokens, their state parts) of
    `seqs[i]`, at most `len(seqs[i]) - 1` tokens. Only the first wave defers rows to a later one."""
    rows: list[Row] = []
    later: list[Row] = []
    leaders: dict[tuple[int, ...], int] = {}
    for seq, (n, parts) in zip(seqs, matches):
        if first_wave and seq[:n + 1] in leaders:  # shares its next tokens with a row of this wave
            later.append(Row(seq, n, parts, lead=leaders[seq[:n + 1]]))
        else:
            leaders[seq[:n + 1]] = len(rows)
            rows.append(Row(seq, n, parts))
    if later and packed and _borrow_pays(rows, later, max_tokens, max_rows):
        rows, later = rows + later, []
    return WavePlan(rows=rows, passes=cut_passes(rows, max_tokens, max_rows), later=[r.seq for r in later])


def _borrow_pays(rows: list[Row], later: list[Row], max_tokens: int, max_rows: int) -> bool:
    """Set each later row's `shared` (the lead's first new tokens it can reuse, keeping at least its
    last token its own) and say whether one merged pass costs less than two waves."""
    for row in later:
        own = row.seq[row.past:]
        row.shared = min(common_length(own, rows[row.lead].seq, row.past), len(own) - 1)
    waves = attention_area(rows) + attention_area(later, separate=True) + PASS_AREA
    return len(cut_passes(rows + later, max_tokens, max_rows)) == 1 and attention_area(rows + later) <= waves
