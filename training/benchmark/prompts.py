"""The benchmark's prompts: topics x instruction families, assigned to splits, fixed by a seed.

- train and test_id draw from the 43 in-distribution topics and the 13 in-distribution families
  (same distribution, disjoint prompt texts: a text used by one split is redrawn for the other);
- test_ood draws only from the 10 held-out topics and the 5 held-out families.

A prompt is one user turn: a task sentence about the topic followed by its instructions, e.g.
"Tell me about the moon. Answer in exactly 2 sentences. Do not use any commas in your answer."
Prompt `i` of a split depends only on (seed, split, i), so asking for more prompts keeps the
earlier ones (and their cached generations).

    >>> ps = build_prompts(PromptConfig(train=3, test_id=2, test_ood=2))
    >>> sorted({p.split for p in ps}), len({p.id for p in ps})
    (['test_id', 'test_ood', 'train'], 7)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .families import FAMILIES, ID_FAMILIES, OOD_FAMILIES, compatible
from .topics import ID_TOPICS, OOD_TOPICS, TOPICS

SPLITS = ("train", "test_id", "test_ood")
TASKS = (
    "Tell me about {name}.",
    "Write a short description of {name}.",
    "Explain {name} to a curious child.",
    "Write a brief note about {name} for a school newsletter.",
    "Share a few interesting facts about {name}.",
    "Give a quick overview of {name}.",
    "What should a beginner know about {name}?",
    "Write a short paragraph about {name}.",
)


@dataclass(kw_only=True)
class PromptConfig:
    """How many prompts each split has, and the seed that fixes them."""

    seed: int = 0
    """Fixes topics, families, parameters and wording of every prompt."""
    train: int = 1500
    """Prompts in the train split."""
    test_id: int = 300
    """Prompts in the in-distribution test split."""
    test_ood: int = 300
    """Prompts in the out-of-distribution test split."""
    three_constraint_fraction: float = 0.5
    """Fraction of prompts with three instructions (the rest have two)."""


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt of the benchmark."""

    id: str
    """sha1 of the prompt text, 12 hex digits."""
    split: str
    index: int
    topic: str
    task: str
    constraints: tuple[dict, ...]

    @property
    def text(self) -> str:
        return " ".join([self.task] + [FAMILIES[c["family"]].prompt(c) for c in self.constraints])

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.text}]

    @property
    def families(self) -> list[str]:
        return [c["family"] for c in self.constraints]

    def to_json(self) -> dict:
        return {"id": self.id, "split": self.split, "topic": self.topic, "messages": self.messages,
                "constraints": [dict(c) for c in self.constraints]}


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _draw(rng: random.Random, split: str, k: int) -> tuple[str, str, tuple[dict, ...]]:
    topics, families = (OOD_TOPICS, OOD_FAMILIES) if split == "test_ood" else (ID_TOPICS, ID_FAMILIES)
    topic = TOPICS[rng.choice(topics)]
    task = rng.choice(TASKS).format(name=topic.name)
    while True:
        names = rng.sample(families, k)
        if compatible(names):
            break
    constraints = tuple({"family": n, **FAMILIES[n].sample(rng, topic)} for n in names)
    return topic.name, task, constraints


def build_prompts(cfg: PromptConfig) -> list[BenchPrompt]:
    """Every prompt of every split (test_id, then train, then test_ood), with unique texts."""
    seen: set[str] = set()
    out = []
    for split in ("test_id", "train", "test_ood"):
        for i in range(getattr(cfg, split)):
            attempt = 0
            while True:
                rng = random.Random(f"{cfg.seed}:{split}:{i}:{attempt}")
                k = 3 if rng.random() < cfg.three_constraint_fraction else 2
                topic, task, constraints = _draw(rng, split, k)
                p = BenchPrompt(id="", split=split, index=i, topic=topic, task=task, constraints=constraints)
                if p.text not in seen:
                    break
                attempt += 1
            seen.add(p.text)
            out.append(BenchPrompt(id=prompt_id(p.text), split=split, index=i, topic=topic, task=task,
                                   constraints=constraints))
    return out


def generation_order(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Prompts in the order they are generated: sorted by id, which interleaves the splits, so a
    run stopped early still covers every split in proportion."""
    return sorted(prompts, key=lambda p: p.id)
