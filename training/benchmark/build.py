"""Step 2 of the benchmark: generations -> edited responses -> gold-labelled pairs -> split files.

    $ python -m grmserve.training.benchmark.build --out training/benchmark/data
    $ python -m grmserve.training.benchmark.build --out /tmp/bench --fake     # no model needed

For every prompt with a cached generation (`generate.py`; `--fake` uses `fake_generation`):

1. **Responses.** The raw generation itself, plus edits of it (`families.apply_edits`). The
   generation is cleaned into sentences and used at three lengths: its first sentence ("short"), all
   of it ("clean"), and all of it plus three of the topic's facts ("long"). For each length and each
   subset S of the prompt's k constraints, the constraints in S are made to pass and the others to
   fail (2^k responses per length); on the clean text, each constraint is also satisfied alone with
   the others left untouched, and the clean text is kept unedited. Duplicate texts are dropped.
2. **Gold.** Every response is measured with `families.gold_reward` (the edits' intent is never
   trusted).
3. **Pairs.** Every (higher gold, lower gold) pair of one prompt's responses is a candidate; equal
   gold never makes a pair. Each prompt contributes up to `pairs_per_prompt` candidates, picked so
   that across the split the fraction of pairs whose chosen response is longer (in characters)
   tracks the split's `longer_fraction` (error diffusion over prompts, in prompt order). Train and
   test_id reward length (0.8); test_ood does not (0.3: length is anti-correlated with preference).
4. **Files.** `<split>.jsonl.gz` rows `{"prompt": [messages], "chosen", "rejected", "subset", "meta"}`
   (`subset` is "chosen_longer" or "chosen_not_longer", so grm-eval shows length reliance),
   `prompts.jsonl.gz` (every prompt with its constraints, for best-of-n with the gold reward),
   `generations.jsonl.gz` (the generations used, so the build can be rerun without vLLM) and
   `stats.json` (sizes, measured length fractions, family and topic counts, how often the raw
   generations follow each instruction). Same inputs, same bytes (gzip without timestamps).
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import logging
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..core import configtools
from . import checks
from .edits import Draft, Sentence, render, split_sentences
from .families import FAMILIES, apply_edits, gold_reward, satisfied
from .generate import default_cache, fake_generation, read_cache
from .prompts import SPLITS, BenchPrompt, PromptConfig, build_prompts
from .topics import TOPICS

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent / "data"
MAX_SENTENCES = 8
LONG_EXTRA = 3


@dataclass(kw_only=True)
class BuildConfig:
    """Building the benchmark's split files from cached generations."""

    prompts: PromptConfig = field(default_factory=PromptConfig)
    out: str = str(DATA_DIR)
    """Folder to write the split files and stats.json to."""
    generations: str = ""
    """Generation cache (.jsonl or .jsonl.gz); empty: the bundled data/generations.jsonl.gz, else the
    default cache of generate.py."""
    fake: bool = False
    """Use `fake_generation` for every prompt instead of a cache (tests, dry runs)."""
    seed: int = 0
    """Fixes the edits' random choices and the pair selection."""
    train_pairs_per_prompt: int = 6
    """Pairs each train prompt contributes at most."""
    test_pairs_per_prompt: int = 4
    """Pairs each test_id / test_ood prompt contributes at most."""
    train_longer_fraction: float = 0.8
    """Target fraction of train and test_id pairs whose chosen response is longer."""
    ood_longer_fraction: float = 0.3
    """Target fraction of test_ood pairs whose chosen response is longer."""


@dataclass
class Response:
    text: str
    gold: float
    satisfied: list[bool]
    source: str
    """"generation", or the edits applied ("short:+title,-no_commas")."""


# ---------------------------------------------------------------------------------------------
# Responses


def base_drafts(prompt: BenchPrompt, generation: str, rng: random.Random) -> dict[str, Draft]:
    """The cleaned generation at three lengths (short, clean, long), with filler sentences."""
    topic = TOPICS[prompt.topic]
    sents = split_sentences(generation)[:MAX_SENTENCES] or [topic.facts[0]]
    facts = [f for f in topic.facts if f not in sents]
    rng.shuffle(facts)
    name = topic.name[0].upper() + topic.name[1:]
    fillers = facts + [f"There is a lot to learn about {topic.name}.", f"Many people find {topic.name} fascinating.",
                       f"{name} can surprise anyone who looks closely."]
    long_body = sents + fillers[:LONG_EXTRA]
    return {
        "short": Draft([Sentence(sents[0])], fillers=list(fillers)),
        "clean": Draft([Sentence(s) for s in sents], fillers=list(fillers)),
        "long": Draft([Sentence(s) for s in long_body], fillers=fillers[LONG_EXTRA:] + fillers[:LONG_EXTRA]),
    }


def make_responses(prompt: BenchPrompt, generation: str, seed: int = 0) -> list[Response]:
    """The raw generation and its edits, each with its measured gold reward (duplicates dropped)."""
    rng = random.Random(f"{seed}:edits:{prompt.id}")
    topic = TOPICS[prompt.topic]
    constraints = list(prompt.constraints)
    names = [c["family"] for c in constraints]
    texts: list[tuple[str, str]] = []
    if generation.strip():
        texts.append((generation.strip(), "generation"))
    bases = base_drafts(prompt, generation, rng)
    texts.append((render(bases["clean"]), "clean"))
    for length, base in bases.items():
        for r in range(len(names) + 1):
            for subset in itertools.combinations(names, r):
                d = apply_edits(base, constraints, topic, set(subset), rng)
                texts.append((render(d), f"{length}:" + ",".join(d.log)))
    for name in names:
        d = apply_edits(bases["clean"], constraints, topic, {name}, rng, violate_rest=False)
        texts.append((render(d), "clean:" + ",".join(d.log)))
    out, seen = [], set()
    for text, source in texts:
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        out.append(Response(text, gold_reward(constraints, text), satisfied(constraints, text), source))
    return out


# ---------------------------------------------------------------------------------------------
# Pairs


def candidate_pairs(responses: list[Response]) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs with strictly higher gold for the chosen; ties dropped."""
    return [(i, j) for i, a in enumerate(responses) for j, b in enumerate(responses) if a.gold > b.gold]


def select_pairs(groups: list[tuple[BenchPrompt, list[Response]]], per_prompt: int, longer_fraction: float,
                 seed: int) -> list[tuple[BenchPrompt, list[Response], list[tuple[int, int]]]]:
    """Up to `per_prompt` candidate pairs per prompt, steering the split's running fraction of
    chosen-longer pairs to `longer_fraction` (error diffusion in prompt order)."""
    out, n_long, n_total = [], 0, 0
    for prompt, responses in groups:
        rng = random.Random(f"{seed}:pairs:{prompt.id}")
        cands = candidate_pairs(responses)
        longer = [c for c in cands if len(responses[c[0]].text) > len(responses[c[1]].text)]
        other = [c for c in cands if len(responses[c[0]].text) <= len(responses[c[1]].text)]
        rng.shuffle(longer)
        rng.shuffle(other)
        n = min(per_prompt, len(cands))
        want = max(0, min(n, round(longer_fraction * (n_total + n)) - n_long))
        k_long = min(want, len(longer))
        k_other = min(n - k_long, len(other))
        k_long = min(n - k_other, len(longer))
        picked = longer[:k_long] + other[:k_other]
        rng.shuffle(picked)
        n_long += k_long
        n_total += len(picked)
        out.append((prompt, responses, picked))
    return out


def pair_row(prompt: BenchPrompt, responses: list[Response], pair: tuple[int, int]) -> dict:
    c, r = responses[pair[0]], responses[pair[1]]
    return {
        "prompt": prompt.messages,
        "chosen": c.text,
        "rejected": r.text,
        "subset": "chosen_longer" if len(c.text) > len(r.text) else "chosen_not_longer",
        "meta": {
            "id": prompt.id, "split": prompt.split, "topic": prompt.topic,
            "constraints": [dict(x) for x in prompt.constraints],
            "gold_chosen": c.gold, "gold_rejected": r.gold,
            "satisfied_chosen": c.satisfied, "satisfied_rejected": r.satisfied,
            "source_chosen": c.source, "source_rejected": r.source,
        },
    }


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl_gz(rows, path: Path) -> Path:
    """JSON lines, gzip-compressed without a timestamp or name (same rows, same bytes); atomic."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def resolve_generations(cfg: BuildConfig, prompts: list[BenchPrompt]) -> tuple[dict[str, dict], str]:
    if cfg.fake:
        return {p.id: {"id": p.id, "split": p.split, "text": fake_generation(p, cfg.seed), "model": "fake"}
                for p in prompts}, "fake"
    candidates = [Path(cfg.generations)] if cfg.generations else [DATA_DIR / "generations.jsonl.gz", default_cache()]
    for path in candidates:
        if path.exists():
            return read_cache(path), str(path)
    raise FileNotFoundError(
        f"no generations at {', '.join(map(str, candidates))}; create them with "
        "`VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -m grmserve.training.benchmark.generate` "
        "(needs vLLM), or build with --fake for a model-free stand-in")


def _share(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def split_stats(selected, longer_fraction: float, generations: dict[str, dict]) -> dict:
    rows = [(p, rs, pair) for p, rs, picked in selected for pair in picked]
    n_prompts = len(selected)
    raw = [next((r for r in rs if r.source == "generation"), None) for _, rs, _ in selected]
    raw_pass: dict[str, list[bool]] = defaultdict(list)
    for (p, _, _), r in zip(selected, raw):
        if r is not None:
            for c, ok in zip(p.constraints, r.satisfied):
                raw_pass[c["family"]].append(ok)
    c_len = [len(rs[a].text) for _, rs, (a, b) in rows]
    r_len = [len(rs[b].text) for _, rs, (a, b) in rows]
    return {
        "prompts": n_prompts,
        "pairs": len(rows),
        "responses_per_prompt": _share(len(rs) for _, rs, _ in selected),
        "candidate_pairs_per_prompt": _share(len(candidate_pairs(rs)) for _, rs, _ in selected),
        "target_longer_fraction": longer_fraction,
        "chosen_longer_fraction_chars": _share(a > b for a, b in zip(c_len, r_len)),
        "chosen_longer_fraction_words": _share(
            checks.word_count(rs[a].text) > checks.word_count(rs[b].text) for _, rs, (a, b) in rows),
        "mean_chars_chosen": _share(c_len), "mean_chars_rejected": _share(r_len),
        "gold_gap": dict(sorted(Counter(f"{rs[a].gold - rs[b].gold:.2f}" for _, rs, (a, b) in rows).items())),
        "chosen_from_generation": _share(rs[a].source == "generation" for _, rs, (a, b) in rows),
        "rejected_from_generation": _share(rs[b].source == "generation" for _, rs, (a, b) in rows),
        "families": dict(sorted(Counter(c["family"] for p, _, _ in selected for c in p.constraints).items())),
        "constraints_per_prompt": dict(sorted(Counter(len(p.constraints) for p, _, _ in selected).items())),
        "topics": len({p.topic for p, _, _ in selected}),
        "raw_generation_mean_gold": _share(r.gold for r in raw if r is not None),
        "raw_generation_pass_rate": {k: _share(v) for k, v in sorted(raw_pass.items())},
    }


def build(cfg: BuildConfig) -> dict:
    """Write the split files and stats.json into `cfg.out`; return the stats."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(cfg.prompts)
    generations, source = resolve_generations(cfg, prompts)
    log.info("%d generations from %s", len(generations), source)
    stats: dict = {"config": configtools.to_dict(cfg), "generations": "fake" if cfg.fake else "cached", "splits": {}}
    stats["config"].pop("out")  # where it was written is not part of what was built
    stats["config"].pop("generations")
    used = []
    for split in SPLITS:
        in_split = [p for p in prompts if p.split == split]
        have = [p for p in in_split if p.id in generations]
        groups = [(p, make_responses(p, generations[p.id]["text"], cfg.seed)) for p in have]
        per_prompt = cfg.train_pairs_per_prompt if split == "train" else cfg.test_pairs_per_prompt
        frac = cfg.ood_longer_fraction if split == "test_ood" else cfg.train_longer_fraction
        selected = select_pairs(groups, per_prompt, frac, cfg.seed)
        write_jsonl_gz((pair_row(p, rs, pair) for p, rs, picked in selected for pair in picked),
                       out / f"{split}.jsonl.gz")
        stats["splits"][split] = split_stats(selected, frac, generations) | {
            "missing_generations": len(in_split) - len(have)}
        used += have
        log.info("%s: %d prompts, %d pairs", split, len(have), stats["splits"][split]["pairs"])
    write_jsonl_gz((p.to_json() for p in prompts), out / "prompts.jsonl.gz")
    keys = ("id", "split", "text", "finish_reason", "num_tokens", "model", "temperature", "top_p", "max_new_tokens",
            "seed", "batch")
    gens = [{k: generations[p.id][k] for k in keys if k in generations[p.id]} for p in sorted(used, key=lambda p: p.id)]
    if not cfg.fake:
        write_jsonl_gz(gens, out / "generations.jsonl.gz")
    tokens = [g["num_tokens"] for g in gens if "num_tokens" in g]
    stats["generation"] = {
        "responses": len(gens), "models": dict(Counter(g.get("model", "?") for g in gens)),
        "mean_tokens": _share(tokens),
        "finish_reasons": dict(sorted(Counter(g.get("finish_reason", "?") for g in gens).items())),
    }
    stats["families"] = {name: {"rule": f.rule, "held_out": f.held_out} for name, f in FAMILIES.items()}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grmserve.training.benchmark.build",
                                     description="Build the benchmark's split files from cached generations.")
    configtools.add_config_arguments(parser, BuildConfig)
    args = parser.parse_args(argv)
    cfg = configtools.apply_overrides(BuildConfig(), vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = build(cfg)
    for split, s in stats["splits"].items():
        print(f"{split}: {s['prompts']} prompts, {s['pairs']} pairs, chosen longer in "
              f"{s['chosen_longer_fraction_chars']:.3f} (chars) / {s['chosen_longer_fraction_words']:.3f} (words)")
    print(Path(cfg.out) / "stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
