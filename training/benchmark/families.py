"""Instruction families and the gold reward.

A prompt of the benchmark carries two or three verifiable instructions ("constraints"), each from
one family. A constraint is a JSON object: `{"family": name, **params}`. Every family has

- a prompt sentence (`Family.prompt`),
- a deterministic check of a response (`Family.check`, built on `checks.py`; its rule is in
  `Family.rule`),
- an edit that makes a `Draft` satisfy it and one that makes it violate it (several ways, chosen
  by a seeded RNG: e.g. a bulleted list with one item too many, or plain prose).

**Gold reward.** For a prompt with constraints c_1..c_k and a response y:

    gold(y) = (1/k) * sum_i check_{c_i}(y)        in {0, 1/k, ..., 1}
    gold(y) = 0  when y has fewer than MIN_WORDS words (empty or degenerate answers satisfy
                 "avoid a word" or "no commas" vacuously; they earn nothing)

It has no length term and no model in it. Ties: two responses with equal gold never form a
preference pair (they are dropped); where a single best response is needed (a best-of-n argmax over
gold) the earliest candidate wins.

Families 1-13 appear in train and test_id; the five marked "held out" appear only in test_ood.

    >>> c = [{"family": "all_lowercase"}, {"family": "no_commas"}]
    >>> gold_reward(c, "bees make honey and they live in hives"), gold_reward(c, "Bees, they make honey.")
    (1.0, 0.0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from . import checks
from .edits import Draft, Sentence
from .topics import Topic

MIN_WORDS = 5

START_PHRASES = ("Here is my answer:", "In short:", "Quick summary:", "My take:", "To begin with:",
                 "Here is what I know:")
END_PHRASES = ("Hope this helps.", "Thanks for reading.", "That is all for now.",
               "Let me know if you have more questions.", "Is there anything else I can help with?")
JSON_KEYS = ("answer", "response", "summary", "text")
WORD_RANGES = ((15, 30), (25, 45), (40, 60), (50, 80))
KEYWORD_TEMPLATES = ("It also brings to mind {a} and {b}.", "Words like {a} and {b} come up a lot here.",
                     "Think of {a} and {b} as well.")
ONE_KEYWORD_TEMPLATES = ("It also brings to mind {a}.", "Think of {a} as well.")
FREQUENCY_TEMPLATES = ("The {w} is worth a mention.", "People often talk about the {w}.",
                       "Remember the {w} too.", "One more word on the {w}.")
PS_LINES = ("Thanks for reading.", "I hope you enjoyed this.", "There is always more to learn.",
            "Feel free to ask for more.")
QUESTIONS = ("What else would you like to know about {name}?", "Have you ever thought about {name}?",
             "Which part of {name} interests you most?")
PLACEHOLDER_SENTENCES = ("Send your questions to {p}.", "Ask {p} for more details.", "Write to {p} to learn more.")
PLACEHOLDERS = ("[name]", "[email]", "[date]", "[city]")


def plural_forms(word: str) -> tuple[str, ...]:
    """The forms a keyword check accepts: the word, +s, +es (whole words, any case)."""
    return (word, word + "s", word + "es")


# ---------------------------------------------------------------------------------------------
# The family table


@dataclass(frozen=True)
class Family:
    """One kind of verifiable instruction."""

    name: str
    rule: str
    """The gold check in words (also in the README of the data)."""
    held_out: bool
    sample: Callable[[random.Random, Topic], dict]
    prompt: Callable[[dict], str]
    check: Callable[[str, dict], bool]
    satisfy: Callable[[Draft, dict, Topic, random.Random], None]
    violate: Callable[[Draft, dict, Topic, random.Random], None]


def _none(rng, topic):
    return {}


def _drop_sentences_with(d: Draft, forms: tuple[str, ...]) -> None:
    d.sentences = [s for s in d.sentences if not checks.count_word(s.text, forms)]
    d.fillers = [f for f in d.fillers if not checks.count_word(f, forms)]
    if not d.sentences:
        d.add(d.next_filler())


def _ensure_sentences(d: Draft, n: int) -> None:
    while len(d.sentences) < n:
        d.add(d.next_filler())


# -- ID families ------------------------------------------------------------------------------

def _word_range_sample(rng, topic):
    lo, hi = rng.choice(WORD_RANGES)
    return {"min_words": lo, "max_words": hi}


def _word_range_violate(d, p, topic, rng):
    lo, hi = p["min_words"], p["max_words"]
    d.word_target = (hi + 5, hi + 25) if rng.random() < 0.5 else (MIN_WORDS, lo - 4)


def _sentence_violate(d, p, topic, rng):
    n = p["n"]
    d.sentence_target = rng.choice([n + 1, n + 2] + ([n - 1] if n > 1 else []))


def _keywords_satisfy(d, p, topic, rng):
    text = rng.choice(KEYWORD_TEMPLATES).format(a=p["keywords"][0], b=p["keywords"][1])
    d.add(text, pinned=True, at=min(1, len(d.sentences)))


def _keywords_violate(d, p, topic, rng):
    a, b = p["keywords"]
    _drop_sentences_with(d, plural_forms(a) + plural_forms(b))
    if rng.random() < 0.5:  # a near miss: one of the two
        d.add(rng.choice(ONE_KEYWORD_TEMPLATES).format(a=rng.choice([a, b])), pinned=True,
              at=min(1, len(d.sentences)))


def _avoid_violate(d, p, topic, rng):
    hits = [s for s in d.sentences if checks.count_word(s.text, p["forms"])]
    for s in hits:
        s.pinned = True  # shortening must not remove the violation
    if not hits:
        d.add(f"This is all about {topic.name}.", pinned=True)


def _layout(kind: str):
    def satisfy(d, p, topic, rng):
        d.layout, d.blocks = kind, p["n"]
        _ensure_sentences(d, p["n"])

    def violate(d, p, topic, rng):
        n = rng.choice([0, p["n"] - 1, p["n"] + 1])
        if n <= (0 if kind == "bullets" else 1):
            d.layout, d.blocks = "prose", 1
        else:
            d.layout, d.blocks = kind, n
            _ensure_sentences(d, n)

    return satisfy, violate


_bullets_satisfy, _bullets_violate = _layout("bullets")
_paragraphs_satisfy, _paragraphs_violate = _layout("paragraphs")


def _json_violate(d, p, topic, rng):
    if rng.random() < 0.5:
        d.wrap = ("json", rng.choice([k for k in JSON_KEYS if k != p["key"]]))


def _start_violate(d, p, topic, rng):
    if rng.random() < 0.5:
        d.start_after_first = p["phrase"]


def _end_violate(d, p, topic, rng):
    if rng.random() < 0.5:
        d.end_at_start = p["phrase"]


def _title_violate(d, p, topic, rng):
    d.title = rng.choice([None, topic.title, f"# {topic.title}"])


# -- held-out families --------------------------------------------------------------------------

def _postscript_violate(d, p, topic, rng):
    d.postscript = None if rng.random() < 0.4 else rng.choice(["Note: ", "PS "]) + rng.choice(PS_LINES)


def _frequency_satisfy(d, p, topic, rng):
    forms = plural_forms(p["word"])
    have = sum(checks.count_word(s.text, forms) for s in d.sentences)
    templates = list(FREQUENCY_TEMPLATES)
    rng.shuffle(templates)
    for i in range(max(0, p["n"] - have)):
        d.add(templates[i % len(templates)].format(w=p["word"]), pinned=True, at=min(1 + i, len(d.sentences)))


def _frequency_violate(d, p, topic, rng):
    _drop_sentences_with(d, plural_forms(p["word"]))
    k = rng.choice([0, p["n"] - 1])
    for i in range(k):
        d.add(FREQUENCY_TEMPLATES[i % len(FREQUENCY_TEMPLATES)].format(w=p["word"]), pinned=True,
              at=min(1 + i, len(d.sentences)))


def _placeholder_sentence(k: int, rng) -> str:
    return rng.choice(PLACEHOLDER_SENTENCES).format(p=" and ".join(PLACEHOLDERS[:k]))


def _placeholders_violate(d, p, topic, rng):
    for s in d.sentences:
        s.text = s.text.replace("[", "(").replace("]", ")")
    k = rng.choice([0, p["n"] - 1])
    if k:
        d.add(_placeholder_sentence(k, rng), pinned=True)


def _set(**attrs):
    def edit(d, p, topic, rng):
        for k, v in attrs.items():
            setattr(d, k, v)
    return edit


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family(
        "word_range", "min_words <= word_count(response) <= max_words", False, _word_range_sample,
        lambda p: f"Your answer must be between {p['min_words']} and {p['max_words']} words long.",
        lambda y, p: p["min_words"] <= checks.word_count(y) <= p["max_words"],
        lambda d, p, t, r: setattr(d, "word_target", (p["min_words"], p["max_words"])), _word_range_violate),
    Family(
        "sentence_count", "sentence_count(response) == n", False, lambda rng, t: {"n": rng.randint(1, 5)},
        lambda p: f"Answer in exactly {p['n']} sentence{'s' if p['n'] > 1 else ''}.",
        lambda y, p: checks.sentence_count(y) == p["n"],
        lambda d, p, t, r: setattr(d, "sentence_target", p["n"]), _sentence_violate),
    Family(
        "include_keywords", "both keywords occur as whole words (plural forms accepted, any case)", False,
        lambda rng, t: {"keywords": sorted(rng.sample(list(t.keywords), 2))},
        lambda p: f"Include the keywords '{p['keywords'][0]}' and '{p['keywords'][1]}' in your answer.",
        lambda y, p: all(checks.count_word(y, plural_forms(k)) for k in p["keywords"]),
        _keywords_satisfy, _keywords_violate),
    Family(
        "avoid_keyword", "no form of the topic's noun occurs as a whole word (any case)", False,
        lambda rng, t: {"word": t.noun[0], "forms": list(t.noun)},
        lambda p: f"Do not use the word '{p['word']}' anywhere in your answer"
                  + (" (nor its plural)." if len(p["forms"]) > 1 else "."),
        lambda y, p: checks.count_word(y, p["forms"]) == 0,
        lambda d, p, t, r: setattr(d, "substitute", (tuple(p["forms"]), t.alias)), _avoid_violate),
    Family(
        "all_capitals", "all_capitals(response): letters present, none lower-case", False, _none,
        lambda p: "Write your entire answer in capital letters only.",
        lambda y, p: checks.all_capitals(y), _set(case="upper"), _set(case="sentence")),
    Family(
        "all_lowercase", "all_lowercase(response): letters present, none upper-case", False, _none,
        lambda p: "Write your entire answer in lowercase letters; no capital letters are allowed.",
        lambda y, p: checks.all_lowercase(y), _set(case="lower"), _set(case="sentence")),
    Family(
        "bullet_list", "exactly n lines are markdown bullets ('- ' or '* '); other lines are allowed", False,
        lambda rng, t: {"n": rng.randint(2, 5)},
        lambda p: f"Format your answer as a bulleted list of exactly {p['n']} items, each on its own line "
                  "starting with '- '.",
        lambda y, p: checks.bullet_count(y) == p["n"], _bullets_satisfy, _bullets_violate),
    Family(
        "json_key", "the response parses as one JSON object (a ```json fence allowed) with the key", False,
        lambda rng, t: {"key": rng.choice(JSON_KEYS)},
        lambda p: f"Wrap your entire answer in JSON: one object with the key \"{p['key']}\" holding your text.",
        lambda y, p: checks.json_has_key(y, p["key"]),
        lambda d, p, t, r: setattr(d, "wrap", ("json", p["key"])), _json_violate),
    Family(
        "start_phrase", "the stripped response starts with the phrase (any case)", False,
        lambda rng, t: {"phrase": rng.choice(START_PHRASES)},
        lambda p: f"Begin your answer with the exact words '{p['phrase']}'.",
        lambda y, p: checks.starts_with(y, p["phrase"]),
        lambda d, p, t, r: setattr(d, "start", p["phrase"]), _start_violate),
    Family(
        "end_phrase", "the stripped response ends with the phrase (any case); nothing may follow", False,
        lambda rng, t: {"phrase": rng.choice(END_PHRASES)},
        lambda p: f"End your answer with the exact phrase '{p['phrase']}' and nothing after it.",
        lambda y, p: checks.ends_with(y, p["phrase"]),
        lambda d, p, t, r: setattr(d, "end", p["phrase"]), _end_violate),
    Family(
        "paragraphs", "exactly n blocks of text separated by blank lines", False,
        lambda rng, t: {"n": rng.randint(2, 4)},
        lambda p: f"Write exactly {p['n']} paragraphs, separated from each other by a blank line.",
        lambda y, p: checks.paragraph_count(y) == p["n"], _paragraphs_satisfy, _paragraphs_violate),
    Family(
        "no_commas", "no ',' character in the response", False, _none,
        lambda p: "Do not use any commas in your answer.",
        lambda y, p: "," not in y, _set(commas="remove"), _set(commas="ensure")),
    Family(
        "title", "a title in double angular brackets, <<like this>>, on one line", False, _none,
        lambda p: "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
        lambda y, p: checks.has_title(y),
        lambda d, p, t, r: setattr(d, "title", f"<<{t.title}>>"), _title_violate),
    # Held out: test_ood only.
    Family(
        "quotation", "the stripped response starts and ends with a double quotation mark", True, _none,
        lambda p: "Wrap your entire response in double quotation marks.",
        lambda y, p: checks.wrapped_in_quotes(y), _set(wrap=("quote", '"')),
        lambda d, p, t, r: setattr(d, "wrap", ("quote", "'") if r.random() < 0.5 else None)),
    Family(
        "postscript", "some line starts with 'P.S.' (or 'p. s.', any case)", True, _none,
        lambda p: "At the end of your response, add a postscript starting with P.S.",
        lambda y, p: checks.has_postscript(y),
        lambda d, p, t, r: setattr(d, "postscript", "P.S. " + r.choice(PS_LINES)),
        _postscript_violate),
    Family(
        "keyword_frequency", "the word (plural forms accepted, any case) occurs at least n times", True,
        lambda rng, t: {"word": rng.choice(t.keywords), "n": rng.randint(2, 4)},
        lambda p: f"Use the word '{p['word']}' at least {p['n']} times.",
        lambda y, p: checks.count_word(y, plural_forms(p["word"])) >= p["n"],
        _frequency_satisfy, _frequency_violate),
    Family(
        "end_question", "the stripped response ends with '?'", True, _none,
        lambda p: "Finish your response with a question.",
        lambda y, p: checks.ends_with_question(y),
        lambda d, p, t, r: setattr(d, "question", r.choice(QUESTIONS).format(name=t.name)),
        _set(question=None, trailing="That is all.", trailing_if_question=True)),
    Family(
        "placeholders", "at least n square-bracket placeholders such as [address]", True,
        lambda rng, t: {"n": rng.randint(1, 3)},
        lambda p: f"Include at least {p['n']} placeholder{'s' if p['n'] > 1 else ''} in square brackets, "
                  "such as [address].",
        lambda y, p: checks.placeholder_count(y) >= p["n"],
        lambda d, p, t, r: d.add(_placeholder_sentence(p["n"], r), pinned=True), _placeholders_violate),
]}

ID_FAMILIES = tuple(n for n, f in FAMILIES.items() if not f.held_out)
OOD_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.held_out)

# Pairs of families never put in one prompt: they contradict each other, or one family's
# rendering would make the other's check ill-defined (e.g. bullets inside a JSON string).
INCOMPATIBLE = {frozenset(p) for p in [
    ("all_capitals", "all_lowercase"), ("all_capitals", "json_key"), ("json_key", "bullet_list"),
    ("json_key", "paragraphs"), ("json_key", "sentence_count"), ("json_key", "start_phrase"),
    ("json_key", "end_phrase"), ("bullet_list", "paragraphs"), ("bullet_list", "sentence_count"),
    ("sentence_count", "title"), ("sentence_count", "end_phrase"), ("sentence_count", "paragraphs"),
    ("sentence_count", "word_range"), ("start_phrase", "title"), ("quotation", "end_question"),
]}

# The order edits are applied in (content, layout, framing, wrappers, length targets last).
EDIT_ORDER = ("include_keywords", "keyword_frequency", "placeholders", "avoid_keyword", "no_commas",
              "bullet_list", "paragraphs", "title", "start_phrase", "end_phrase", "postscript", "end_question",
              "all_capitals", "all_lowercase", "json_key", "quotation", "word_range", "sentence_count")
assert sorted(EDIT_ORDER) == sorted(FAMILIES)


def compatible(names) -> bool:
    names = list(names)
    return all(frozenset((a, b)) not in INCOMPATIBLE for i, a in enumerate(names) for b in names[i + 1:])


# ---------------------------------------------------------------------------------------------
# Gold


def satisfied(constraints: list[dict], response: str) -> list[bool]:
    """Whether `response` passes each constraint's check (see `Family.rule`)."""
    return [bool(FAMILIES[c["family"]].check(response, c)) for c in constraints]


def gold_reward(constraints: list[dict], response: str) -> float:
    """The gold reward: the fraction of the prompt's constraints the response satisfies, 0 for a
    response of fewer than `MIN_WORDS` words (see the module docstring).

    >>> gold_reward([{"family": "end_question"}, {"family": "placeholders", "n": 1}], "Is [name] here today, friend?")
    1.0
    """
    if not constraints:
        raise ValueError("a benchmark prompt has at least one constraint")
    if checks.word_count(response) < MIN_WORDS:
        return 0.0
    return sum(satisfied(constraints, response)) / len(constraints)


def apply_edits(draft: Draft, constraints: list[dict], topic: Topic, satisfy: set[str] | None,
                rng: random.Random, *, violate_rest: bool = True) -> Draft:
    """Edit a copy of `draft` so that the families in `satisfy` pass and (with `violate_rest`) the
    other constraints fail; families in neither set are left alone. Length targets are fitted last."""
    from .edits import fit

    d = draft.copy()
    by_name = {c["family"]: c for c in constraints}
    for name in EDIT_ORDER:
        if name not in by_name:
            continue
        fam = FAMILIES[name]
        if name in satisfy:
            fam.satisfy(d, by_name[name], topic, rng)
            d.log.append(f"+{name}")
        elif violate_rest:
            fam.violate(d, by_name[name], topic, rng)
            d.log.append(f"-{name}")
    return fit(d)


__all__ = ["FAMILIES", "ID_FAMILIES", "OOD_FAMILIES", "INCOMPATIBLE", "MIN_WORDS", "Family", "Sentence",
           "compatible", "satisfied", "gold_reward", "apply_edits", "plural_forms"]
