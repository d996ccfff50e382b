"""Each gold check of the benchmark on hand-written responses, passing and failing, and the gold
reward built from them."""

from __future__ import annotations

import pytest

from grmserve.training.benchmark import (
    FAMILIES,
    ID_FAMILIES,
    OOD_FAMILIES,
    checks,
    gold_reward,
)
from grmserve.training.benchmark.families import INCOMPATIBLE, MIN_WORDS
from grmserve.training.benchmark.topics import ID_TOPICS, OOD_TOPICS, TOPICS

# family -> (params, responses that pass, responses that fail)
CASES = {
    "word_range": ({"min_words": 5, "max_words": 8},
                   ["One two three four five.", "It's a 3-part test of words."],
                   ["Too short here.", "This one has far too many words to fit inside the range."]),
    "sentence_count": ({"n": 2},
                       ["Bees fly. They make honey!", "Is it cold? Yes"],
                       ["Bees fly.", "Bees fly. They make honey. They dance.", "Bees fly.\nThey make honey.\nFin."]),
    "include_keywords": ({"keywords": ["hive", "queen"]},
                         ["The QUEEN lives in the hive.", "Queens rule many hives."],
                         ["The queen is busy.", "The beehive has a queenly air."]),
    "avoid_keyword": ({"word": "bee", "forms": ["bee", "bees"]},
                      ["These insects make honey.", "Beeswax and a beetle are fine."],
                      ["A bee flies.", "BEES fly home."]),
    "all_capitals": ({}, ["HONEY BEES FLY 3 MILES."], ["Honey bees fly.", "123 456"]),
    "all_lowercase": ({}, ["honey bees fly 3 miles."], ["honey Bees fly.", "..."]),
    "bullet_list": ({"n": 3},
                    ["- a\n- b\n- c", "Intro:\n* one\n* two\n- three\nBye."],
                    ["- a\n- b", "1. a\n2. b\n3. c", "- a\n- b\n- c\n- d", "**a**\n**b**\n**c**"]),
    "json_key": ({"key": "answer"},
                 ['{"answer": "Bees fly."}', '```json\n{"answer": "x", "y": 1}\n```'],
                 ['{"response": "Bees fly."}', '["answer"]', 'answer: bees', '{"answer": "x"']),
    "start_phrase": ({"phrase": "My take:"},
                     ["My take: bees are great.", "  MY TAKE: BEES."],
                     ["Bees are great. My take: yes.", "My take bees."]),
    "end_phrase": ({"phrase": "Hope this helps."},
                   ["Bees fly. Hope this helps.", "BEES FLY. HOPE THIS HELPS.  "],
                   ["Hope this helps. Bees fly.", "Bees fly. Hope this helps!"]),
    "paragraphs": ({"n": 2},
                   ["Bees fly.\n\nThey make honey.", "A b c.\n  \nD e.\n"],
                   ["Bees fly. They make honey.", "A.\n\nB.\n\nC.", "A.\nB."]),
    "no_commas": ({}, ["Bees fly and make honey."], ["Bees fly, and make honey."]),
    "title": ({}, ["<<Honey Bees>>\nThey fly.", "About <<bees>> today."],
              ["# Honey Bees\nThey fly.", "<Bees>", "<<>> empty", "<<Honey\nBees>>"]),
    "quotation": ({}, ['"Bees fly and make honey."', '  "A" and "B"  '],
                  ["'Bees fly.'", '"Bees fly.', 'Bees "fly"', '"']),
    "postscript": ({}, ["Bees fly.\n\nP.S. They dance.", "Text\np. s. lower"],
                   ["Bees fly. PS they dance.", "Bees fly.\nNote: they dance."]),
    "keyword_frequency": ({"word": "hive", "n": 3},
                          ["A hive. Hives. The HIVE.", "hive hive hive hive"],
                          ["A hive and a hive.", "Beehive beehive beehive."]),
    "end_question": ({}, ["Bees fly. Do you like them?", "Why?  \n"],
                     ["Do you like bees? They fly.", 'Is it "yes?"']),
    "placeholders": ({"n": 2}, ["Call [name] at [phone].", "[a][b]"],
                     ["Call [name] soon.", "Call [] or [\n]."]),
}


def test_every_family_has_hand_written_cases():
    assert set(CASES) == set(FAMILIES)
    assert len(ID_FAMILIES) >= 10 and len(OOD_FAMILIES) >= 3
    assert not set(ID_FAMILIES) & set(OOD_FAMILIES)


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_check_passes_and_fails(family):
    params, good, bad = CASES[family]
    check = FAMILIES[family].check
    for text in good:
        assert check(text, params), (family, text)
    for text in bad:
        assert not check(text, params), (family, text)


def test_check_primitives():
    assert checks.words("Don't stop -- 3-part") == ["Don't", "stop", "3", "part"]
    assert checks.sentences("One. Two!  Three?\n\n- four") == ["One.", "Two!", "Three?", "- four"]
    assert checks.sentence_count('He said "hi." Then left.') == 2
    assert checks.bullet_count("- a\n  * b\n-c\n*d") == 2
    assert checks.only_bullets("- a\n- b") and not checks.only_bullets("- a\nb\n- c")
    assert checks.paragraph_count("\n\nA\n\n\nB\n\n") == 2
    assert checks.json_object('{"a": 1}') == {"a": 1} and checks.json_object("[1]") is None
    assert checks.contains_word("beeswax", "bee", whole_word=False) and not checks.contains_word("beeswax", "bee")
    assert checks.count_word("Bee bees BEE", ["bee"]) == 2


def test_gold_reward_is_the_fraction_of_constraints_satisfied():
    constraints = [{"family": "no_commas"}, {"family": "all_lowercase"}, {"family": "end_question"}]
    assert gold_reward(constraints, "bees fly and make honey do you like them?") == 1.0
    assert gold_reward(constraints, "bees fly and make honey, do you like them?") == pytest.approx(2 / 3)
    assert gold_reward(constraints, "Bees fly and make honey, you like them.") == 0.0
    assert gold_reward(constraints[:1], "Bees fly and make honey.") == 1.0


def test_gold_reward_gives_degenerate_answers_nothing():
    constraints = [{"family": "no_commas"}, {"family": "avoid_keyword", "word": "bee", "forms": ["bee", "bees"]}]
    assert MIN_WORDS == 5
    assert gold_reward(constraints, "") == 0.0
    assert gold_reward(constraints, "ok sure fine yes") == 0.0  # four words: vacuous passes do not count
    assert gold_reward(constraints, "ok sure fine yes now") == 1.0
    with pytest.raises(ValueError):
        gold_reward([], "anything at all goes here")


def test_incompatible_families_are_known_and_topics_are_sound():
    assert all(len(p) == 2 and p <= set(FAMILIES) for p in INCOMPATIBLE)
    assert len(ID_TOPICS) >= 40 and len(OOD_TOPICS) >= 5 and not set(ID_TOPICS) & set(OOD_TOPICS)
    for t in TOPICS.values():
        assert checks.count_word(t.name, t.noun), t.name  # "avoid the word" breaks by naming the topic
        assert not checks.count_word(t.alias, t.noun), t.name  # and the alias really avoids it
        assert len(t.facts) >= 4 and all("," not in f and checks.sentence_count(f) == 1 for f in t.facts)
        assert not any(checks.count_word(t.name + " " + t.alias, k) for k in t.keywords), t.name


def test_synthetic_prefs_uses_the_same_checks():
    from grmserve.training.synthetic_prefs import KINDS, make_pairs
    from grmserve.training.synthetic_prefs import TOPICS as SYN_TOPICS
    from grmserve.training.synthetic_prefs import gold_reward as syn_gold

    rows = make_pairs(60, seed=3)
    assert {r["meta"]["kind"] for r in rows} == set(KINDS) and set(SYN_TOPICS)
    for r in rows:
        assert syn_gold(r["meta"], r["chosen"]) == 1.0 and syn_gold(r["meta"], r["rejected"]) == 0.0
    assert syn_gold({"kind": "json", "topic": "coffee"}, '```json\n{"answer": "x"}\n```') == 1.0
