"""grm-bon --eval's math and caches: the unbiased best-of-n estimator against brute-force enumeration
of every size-n subset, KL_bon, the resumable caches. (The end-to-end run through vLLM and two
reward servers is in tests/clients/test_best_of_n.py.)"""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest

from grmserve.training.bon import BonConfig
from grmserve.training.bon_eval import (
    JsonlAppender,
    check_meta,
    curves,
    eval_prompts,
    expected_best_of_n,
    kl_bon,
    n_values,
    pick_probabilities,
    read_jsonl,
    reward_models,
)


def brute_force(proxy, values, n):
    """Mean over every size-n subset of the value of its proxy argmax; tied maxima split equally."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        winners = [i for i in subset if proxy[i] == top]
        total += sum(values[i] for i in winners) / len(winners)
        count += 1
    return total / count


@pytest.mark.parametrize("seed", range(6))
def test_estimator_equals_enumeration_of_all_subsets(seed):
    rng = random.Random(seed)
    N = rng.randint(2, 9)
    # few distinct proxy values, so that ties (identical candidates share a score) are common
    proxy = [rng.choice([0.0, 0.5, 1.0, 1.5, rng.random()]) for _ in range(N)]
    values = [rng.random() for _ in range(N)]
    ns = list(range(1, N + 1))
    got = expected_best_of_n(proxy, values, ns)
    want = [brute_force(proxy, values, n) for n in ns]
    assert got == pytest.approx(want, abs=1e-12)


def test_estimator_edges():
    values = [0.3, 0.9, 0.1, 0.5]
    proxy = [4.0, 1.0, 3.0, 2.0]
    # n = 1 is the policy's own mean; n = N is the proxy's argmax; the gold's own ranking never loses
    assert expected_best_of_n(proxy, values, [1, 4]) == pytest.approx([np.mean(values), 0.3])
    assert expected_best_of_n([7.0] * 4, values, [1, 2, 4]) == pytest.approx([np.mean(values)] * 3)  # all tied
    oracle = expected_best_of_n(values, values, [1, 2, 3, 4])
    assert oracle == sorted(oracle) and oracle[-1] == pytest.approx(0.9)
    with pytest.raises(ValueError):
        expected_best_of_n([1.0, 2.0], [1.0], [1])


def test_pick_probabilities_sum_to_one_for_large_N():
    for N, n in [(32, 1), (32, 16), (32, 32), (405, 200)]:
        p = pick_probabilities(N, n)
        assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
        assert (p[: n - 1] == 0).all()  # the maximum of n items is at least the n-th smallest
    with pytest.raises(ValueError):
        pick_probabilities(4, 5)


def test_kl_bon_and_the_n_grid():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bon(32) == pytest.approx(math.log(32) - 31 / 32)
    assert all(kl_bon(2 * n) > kl_bon(n) for n in range(1, 200))
    assert n_values(32) == [1, 2, 4, 8, 16, 32] and n_values(5) == [1, 2, 4, 5] and n_values(1) == [1]


def test_curves_table_from_scores():
    prompts = eval_prompts(["test_id", "test_ood"], 2, seed=0)
    assert [p["split"] for p in prompts] == ["test_id", "test_id", "test_ood", "test_ood"]
    assert eval_prompts(["test_id"], 2, seed=0) == prompts[:2]  # seeded subset, stable
    cands = {p["id"]: ["word " * 3, "A longer answer with several words in it.", "word " * 3] for p in prompts}
    scores = {"a": {p["id"]: [0.0, 1.0, 0.0] for p in prompts}, "b": {p["id"]: [1.0, 0.0, 1.0] for p in prompts}}
    table = curves(prompts, cands, scores, [1, 2, 3])
    for split in ("test_id", "test_ood"):
        entry = table[split]
        assert entry["prompts"] == 2 and entry["distinct_candidates_mean"] == 2.0
        a, b = entry["reward_models"]["a"], entry["reward_models"]["b"]
        assert a["proxy"] == pytest.approx([1 / 3, 2 / 3, 1.0])  # P(the one scored 1.0 is in a 2-subset) = 2/3
        assert b["gold"][-1] == 0.0  # picks a 3-word answer: gold 0 under the benchmark's 5-word minimum
        assert entry["oracle_gold"][-1] == pytest.approx(max(a["gold"][-1], b["gold"][-1]))


def test_caches_resume_and_refuse_other_settings(tmp_path):
    path = tmp_path / "scores.jsonl"
    w = JsonlAppender(path)
    w.write([{"id": "a", "scores": [1.0]}])
    w.close()
    with open(path, "a") as fh:
        fh.write('{"id": "b", "sco')  # a run killed mid-line
    assert list(read_jsonl(path)) == ["a"]
    w = JsonlAppender(path)  # cuts the torn line, appends after it
    w.write([{"id": "b", "scores": [2.0]}])
    w.close()
    assert read_jsonl(path)["b"]["scores"] == [2.0] and len(path.read_text().splitlines()) == 2
    meta = tmp_path / "samples.meta.json"
    check_meta(meta, {"max_tokens": 96, "samples": 32}, "samples")
    check_meta(meta, {"max_tokens": 96, "samples": 32}, "samples")  # same settings: fine
    with pytest.raises(ValueError, match=r"max_tokens.*\(96, 64\).*--curve.out"):
        check_meta(meta, {"max_tokens": 64, "samples": 32}, "samples")
    assert json.loads(meta.read_text()) == {"max_tokens": 96, "samples": 32}


def test_reward_model_specs():
    cfg = BonConfig()
    assert reward_models(cfg) == [("", "localhost:50051")]
    cfg.curve.reward_models = ["bt=localhost:50052", "grm=rm:1"]
    assert reward_models(cfg) == [("bt", "localhost:50052"), ("grm", "rm:1")]
    cfg.curve.reward_models = ["localhost:50052"]
    with pytest.raises(ValueError, match="name=host:port"):
        reward_models(cfg)
