"""The benchmark's edits do what they claim: satisfying or breaking each family's check."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from grmserve.training.benchmark import checks
from grmserve.training.benchmark.build import base_drafts, make_responses
from grmserve.training.benchmark.edits import (
    Draft,
    Sentence,
    fit,
    render,
    sentence_case,
    split_sentences,
    truncate_words,
)
from grmserve.training.benchmark.families import (
    FAMILIES,
    apply_edits,
    gold_reward,
    satisfied,
)
from grmserve.training.benchmark.generate import fake_generation
from grmserve.training.benchmark.prompts import PromptConfig, build_prompts
from grmserve.training.benchmark.topics import TOPICS

MOON = TOPICS["the moon"]


def draft(*sentences: str) -> Draft:
    return Draft([Sentence(s) for s in sentences], fillers=list(MOON.facts))


def edit(d: Draft, family: str, ok: bool, seed: int = 0, **params) -> str:
    c = {"family": family, **params}
    return render(fit(apply_edits(d, [c], MOON, {family} if ok else set(), random.Random(seed))))


def test_split_sentences_cleans_a_raw_generation():
    raw = "## The Moon\n1. **The moon** orbits Earth.\n2. It has craters\n\nIt is bright. It shows pha"
    assert split_sentences(raw) == ["The moon orbits Earth.", "It has craters.", "It is bright."]
    assert split_sentences("just a fragment without end") == ["just a fragment without end."]
    assert split_sentences("") == []


def test_truncate_words_and_sentence_case():
    assert truncate_words("The moon pulls on the oceans of the Earth.", 4) == "The moon pulls on."
    assert truncate_words("Short one.", 9) == "Short one."
    assert sentence_case("THE MOON. IT GLOWS.\n- A ROCK") == "The moon. It glows.\n- A rock"


@pytest.mark.parametrize("case", [
    ("all_capitals", {}), ("all_lowercase", {}), ("no_commas", {}), ("title", {}), ("end_question", {}),
    ("quotation", {}), ("postscript", {}), ("json_key", {"key": "summary"}), ("start_phrase", {"phrase": "In short:"}),
    ("end_phrase", {"phrase": "Hope this helps."}), ("bullet_list", {"n": 4}), ("paragraphs", {"n": 3}),
    ("sentence_count", {"n": 3}), ("word_range", {"min_words": 25, "max_words": 45}),
    ("include_keywords", {"keywords": ["crater", "tide"]}),
    ("avoid_keyword", {"word": "moon", "forms": ["moon", "moons"]}),
    ("keyword_frequency", {"word": "orbit", "n": 3}), ("placeholders", {"n": 2}),
], ids=lambda c: c[0])
def test_each_family_edit_satisfies_and_violates_its_check(case):
    family, params = case
    bases = [draft("The moon, our neighbour, is bright.", "It has craters and it moves the tide."),
             draft("The Moon is the only natural satellite of Earth, and it is bright?"),
             draft(*MOON.facts, "Do you like it?")]
    for seed, base in itertools.product(range(6), bases):
        good, bad = edit(base, family, True, seed, **params), edit(base, family, False, seed, **params)
        assert FAMILIES[family].check(good, params), (family, seed, good)
        assert not FAMILIES[family].check(bad, params), (family, seed, bad)


def test_near_misses_are_close_to_the_instruction():
    base = draft("The moon is bright.", "It has craters.")
    seen = {edit(base, "json_key", False, s, key="answer") for s in range(12)}
    assert any(checks.json_object(t) is not None for t in seen)  # JSON with the wrong key
    seen = {edit(base, "bullet_list", False, s, n=3) for s in range(12)}
    assert {checks.bullet_count(t) for t in seen} >= {0, 2, 4}
    seen = {edit(base, "end_phrase", False, s, phrase="Hope this helps.") for s in range(12)}
    assert any(t.startswith("Hope this helps.") for t in seen)  # the phrase, in the wrong place


def test_edits_leave_the_input_draft_alone():
    base = draft("The moon is bright.", "It has craters.")
    before = render(base)
    edit(base, "bullet_list", True, n=4)
    edit(base, "word_range", True, min_words=50, max_words=80)
    assert render(base) == before and len(base.sentences) == 2


def test_combined_edits_hit_their_targets_on_most_prompts():
    """Every subset of a prompt's constraints is made to pass, the rest to fail; the measured result
    agrees with the intent for >= 97 % of (response, constraint) cells, and the all-pass edit works
    on >= 97 % of prompts."""
    prompts = build_prompts(PromptConfig(train=150, test_id=0, test_ood=80))
    agree, all_pass = Counter(), Counter()
    for p in prompts:
        rng = random.Random(p.id)
        names = p.families
        for base in base_drafts(p, fake_generation(p), rng).values():
            for r in range(len(names) + 1):
                for subset in itertools.combinations(names, r):
                    text = render(apply_edits(base, list(p.constraints), TOPICS[p.topic], set(subset), rng))
                    sat = satisfied(list(p.constraints), text)
                    for name, ok in zip(names, sat):
                        agree[(name, ok == (name in subset))] += 1
                    if len(subset) == len(names):
                        all_pass[all(sat)] += 1
    for name in {n for n, _ in agree}:
        rate = agree[(name, True)] / (agree[(name, True)] + agree[(name, False)])
        assert rate >= 0.97, (name, rate)
    assert all_pass[True] / sum(all_pass.values()) >= 0.97


def test_one_generation_yields_many_responses_at_every_gold_level():
    p = next(p for p in build_prompts(PromptConfig(train=20, test_id=0, test_ood=0)) if len(p.constraints) == 3)
    responses = make_responses(p, fake_generation(p))
    assert len(responses) >= 15 and len({r.text for r in responses}) == len(responses)
    assert {r.gold for r in responses} == {0.0, 1 / 3, 2 / 3, 1.0}
    assert responses[0].source == "generation"
    for r in responses:
        assert r.gold == gold_reward(list(p.constraints), r.text)
