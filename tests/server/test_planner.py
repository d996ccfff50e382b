"""The pass planner (server/engine/planner.py): pure functions, no model, no cache."""

from __future__ import annotations

from grmserve.server.engine.planner import PASS_AREA, Row, attention_area, cut_passes, plan_wave


def _fresh(seqs):
    return [(0, []) for _ in seqs]


def test_rows_continue_their_cached_prefix_and_always_run_their_last_token():
    seqs = [(1, 2, 3, 4), (5, 6)]
    plan = plan_wave(seqs, [(3, ["kv"]), (1, ["kv"])], first_wave=True, packed=True, max_tokens=64, max_rows=8)
    assert ([(r.seq, r.past, r.new, r.parts) for r in plan.rows]
            == [((1, 2, 3, 4), 3, 1, ["kv"]), ((5, 6), 1, 1, ["kv"])])
    assert plan.later == [] and sorted(i for p in plan.passes for i in p) == [0, 1]


def test_packed_rows_that_share_new_tokens_borrow_them_from_one_lead_in_the_same_pass():
    prompt = tuple(range(10, 20))
    seqs = [prompt + (1, 2), prompt + (3,), prompt + (1, 4)]
    plan = plan_wave(seqs, _fresh(seqs), first_wave=True, packed=True, max_tokens=256, max_rows=8)
    lead, *borrowers = plan.rows
    assert lead.lead is None and lead.start == 0
    assert [(r.lead, r.shared) for r in borrowers] == [(0, 10), (0, 11)]  # the prompt; the prompt and its `1`
    assert plan.later == [] and len(plan.passes) == 1


def test_padded_rows_that_share_new_tokens_wait_for_a_second_wave():
    prompt = tuple(range(10, 20))
    seqs = [prompt + (1,), prompt + (2,)]
    plan = plan_wave(seqs, _fresh(seqs), first_wave=True, packed=False, max_tokens=256, max_rows=8)
    assert [r.seq for r in plan.rows] == [seqs[0]] and plan.later == [seqs[1]]
    again = plan_wave(plan.later, [(10, [])], first_wave=False, packed=False, max_tokens=256, max_rows=8)
    assert [(r.seq, r.past, r.new) for r in again.rows] == [(seqs[1], 10, 1)] and again.later == []


def test_borrowing_is_refused_when_the_merged_pass_pads_more_attention_than_a_second_pass_costs():
    prompt = tuple(range(1000, 1000 + 600))  # a long new prompt pads every borrower's queries to its length
    seqs = [prompt + (1,)] + [prompt + (2, k) for k in range(8)]
    plan = plan_wave(seqs, _fresh(seqs), first_wave=True, packed=True, max_tokens=16384, max_rows=64)
    assert [r.seq for r in plan.rows] == [seqs[0]] and plan.later == seqs[1:]
    merged = plan.rows + [Row(s, 0, [], lead=0, shared=600) for s in seqs[1:]]
    assert attention_area(merged) > attention_area(plan.rows) + PASS_AREA


def test_passes_hold_similar_lengths_within_the_token_row_and_past_budgets():
    rows = [Row(tuple(range(n)), 0, []) for n in (5, 100, 6, 90)]
    assert cut_passes(rows, max_tokens=200, max_rows=8) == [[0, 2], [3, 1]]
    assert cut_passes(rows, max_tokens=10_000, max_rows=2) == [[0, 2], [3, 1]]
    long_past = [Row(tuple(range(60)), 50, []), Row(tuple(range(70)), 60, []), Row(tuple(range(20)), 10, [])]
    # 10 new tokens each; rows × longest past may reach 2 × 60 = 120: a third row would read 3 × 60
    assert cut_passes(long_past, max_tokens=60, max_rows=8) == [[0, 1], [2]]
