"""A small deterministic preference set with a gold reward: instruction-following pairs.

Each prompt carries one verifiable instruction in the style of IFEval (answer in capitals, use
bullet points, avoid a word, reply in JSON, keep to one sentence, end with a phrase) about a topic.
The chosen response follows it, the rejected one breaks it (both say the same facts), and
`gold_reward` is a deterministic check of the instruction. It is what the interim default reward
model is trained on; the full benchmark (`grmserve.training.benchmark`: real SmolLM2 generations,
18 instruction families, OOD splits) extends it and owns the checks both use.

    >>> pairs = make_pairs(4, seed=0)
    >>> all(gold_reward(p["meta"], p["chosen"]) > gold_reward(p["meta"], p["rejected"]) for p in pairs)
    True
"""

from __future__ import annotations

import json
import random

from .benchmark import checks

TOPICS = {
    "the moon": ["it orbits the Earth", "it has no air", "its gravity moves the tides", "it shows phases"],
    "honey bees": ["they live in colonies", "they make honey from nectar", "they pollinate flowers",
                   "they dance to share directions"],
    "volcanoes": ["they release molten rock", "they form at plate boundaries", "ash can travel far",
                  "some are dormant"],
    "the ocean": ["it covers most of the Earth", "it is salty", "it absorbs heat", "it holds many species"],
    "bicycles": ["they have two wheels", "pedals turn the chain", "they need no fuel", "gears make hills easier"],
    "coffee": ["it comes from roasted beans", "it contains caffeine", "it is grown in the tropics",
               "it can be brewed many ways"],
    "rainbows": ["they need sunlight and rain", "light bends in droplets", "they show seven colours",
                 "they appear opposite the sun"],
    "libraries": ["they lend books", "they offer quiet rooms", "they are often free", "librarians help readers"],
    "penguins": ["they cannot fly", "they swim very well", "most live in the south", "they huddle for warmth"],
    "trains": ["they run on rails", "they carry many people", "some are electric", "they connect cities"],
    "gardening": ["plants need water", "soil feeds roots", "weeds compete for light", "compost enriches the ground"],
    "chess": ["it has sixteen pieces per side", "the king must be protected", "openings are studied",
              "games can end in a draw"],
}
BANNED = {"the moon": "orbit", "honey bees": "nectar", "volcanoes": "rock", "the ocean": "salty", "bicycles": "wheels",
          "coffee": "beans", "rainbows": "light", "libraries": "books", "penguins": "swim", "trains": "rails",
          "gardening": "water", "chess": "king"}
KINDS = ("capitals", "bullets", "avoid_word", "json", "one_sentence", "end_phrase")
END_PHRASE = "Hope this helps."


def _sentence(facts: list[str], topic: str) -> str:
    return f"{topic.capitalize()}: " + "; ".join(facts) + "."


def _prompt(kind: str, topic: str) -> str:
    return {
        "capitals": f"Tell me about {topic}. Write your whole answer in capital letters.",
        "bullets": f"Give three facts about {topic} as a bulleted list using '- '.",
        "avoid_word": f"Describe {topic} without using the word '{BANNED[topic]}'.",
        "json": f"Describe {topic}. Reply only with JSON of the form {{\"answer\": \"...\"}}.",
        "one_sentence": f"Describe {topic} in exactly one sentence.",
        "end_phrase": f"Tell me about {topic}. End your answer with the phrase '{END_PHRASE}'",
    }[kind]


def _good_bad(kind: str, topic: str, facts: list[str], rng: random.Random) -> tuple[str, str]:
    text = _sentence(facts[:3], topic)
    if kind == "capitals":
        return text.upper(), text
    if kind == "bullets":
        return "\n".join(f"- {f.capitalize()}." for f in facts[:3]), text
    if kind == "avoid_word":
        clean = [f for f in facts if BANNED[topic] not in f.lower()]
        dirty = [f for f in facts if BANNED[topic] in f.lower()] or [f"it is known for {BANNED[topic]}"]
        return _sentence(clean[:3] or ["it is interesting"], topic), _sentence(dirty + clean[:2], topic)
    if kind == "json":
        return json.dumps({"answer": text}), text
    if kind == "one_sentence":
        return f"{topic.capitalize()} are notable because {facts[0]} and {facts[1]}.", \
            " ".join(f"{f.capitalize()}." for f in facts[:3])
    return f"{text} {END_PHRASE}", f"{END_PHRASE} {text}"


def gold_reward(meta: dict, response: str) -> float:
    """1.0 when the response follows the prompt's instruction, else 0.0 (the checks are those of
    the full benchmark, `grmserve.training.benchmark.checks`)."""
    kind, topic = meta["kind"], meta["topic"]
    r = response.strip()
    if kind == "capitals":
        ok = checks.all_capitals(r)
    elif kind == "bullets":
        ok = checks.only_bullets(r, min_items=2)
    elif kind == "avoid_word":
        ok = not checks.contains_word(r, BANNED[topic], whole_word=False)
    elif kind == "json":
        ok = checks.json_has_key(r, "answer")
    elif kind == "one_sentence":
        ok = checks.sentence_count(r) == 1 and checks.ends_sentence(r)
    else:
        ok = checks.ends_with(r, END_PHRASE)
    return 1.0 if ok else 0.0


def make_pairs(n: int, *, seed: int = 0, topics: list[str] | None = None, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """`n` preference rows {prompt (chat messages), chosen, rejected, meta}, deterministic in `seed`."""
    rng = random.Random(seed)
    topics = topics or sorted(TOPICS)
    rows = []
    for i in range(n):
        topic, kind = rng.choice(topics), kinds[i % len(kinds)]
        facts = TOPICS[topic][:]
        rng.shuffle(facts)
        good, bad = _good_bad(kind, topic, facts, rng)
        meta = {"kind": kind, "topic": topic}
        assert gold_reward(meta, good) > gold_reward(meta, bad), (kind, good, bad)
        rows.append({"prompt": [{"role": "user", "content": _prompt(kind, topic)}], "chosen": good, "rejected": bad,
                     "meta": meta})
    return rows
