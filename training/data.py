"""Preference data: reading pairs from files, normalising their shapes, encoding, collation.

Files: JSONL (always), JSON (a list of rows, or an object holding one list), and local Hugging
Face dataset files -- parquet / arrow files or a `save_to_disk` folder -- through the `datasets`
library when it is installed, else through `pyarrow` when that is. No hub access.

Row shapes understood (other keys are ignored; `subset` is kept for per-subset evaluation):

- `{"prompt": str | messages, "chosen": str, "rejected": str}`: prompt and two responses.
- `{"chosen": messages, "rejected": messages}` (UltraFeedback-binarized style): the last message of
  each list is the assistant reply; the messages before it are the prompt (they must agree).
- `{"chosen": str, "rejected": str}` holding Anthropic-HH transcripts
  (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`): split into chat messages; the shared messages are
  the prompt and the final assistant turn of each is the response.

Every pair is encoded with `PromptRenderer` exactly as the server encodes it (prompt ids, then
response ids; chat prompts through the tokenizer's chat template). Too-long pairs follow the
template module's truncation policy (drop prompt tokens from the left, then keep the response's
tail) or, with `truncate=False`, are dropped. Rows that cannot be used -- unparsable JSON,
missing fields, empty responses, identical responses, tied scores, ... -- are counted per reason
in a `DataReport`; they never stop a run.

    >>> rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "x", "chosen": "a"}]
    >>> pairs, report = normalise_rows(enumerate(rows), source="inline")
    >>> len(pairs), dict(report.dropped)
    (1, {'missing_field': 1})
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .core.prompts import InputError, PromptRenderer

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
ARROW_SUFFIXES = (".parquet", ".arrow")
SCORE_KEYS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"),
              ("chosen_rating", "rejected_rating"))
# Drop reasons, in the order reports list them.
REASONS = {
    "bad_json": "the line is not valid JSON",
    "not_an_object": "the row is not a JSON object",
    "missing_field": "`chosen`, `rejected` or `prompt` is missing",
    "bad_type": "a field has the wrong type (e.g. chosen is a string, rejected a list)",
    "bad_messages": "a message list is malformed or the tokenizer cannot render it",
    "unparsable_transcript": "an HH transcript has no Human/Assistant structure",
    "prompt_mismatch": "chosen and rejected disagree on the prompt",
    "empty_prompt": "the prompt is empty",
    "empty_response": "a response is empty",
    "identical": "chosen and rejected are the same text",
    "tie": "the chosen and rejected scores are equal",
    "too_long": "over max_tokens while truncation is off",
}
_HH_SPLIT = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


class DataError(ValueError):
    """A data file cannot be read at all (missing, unknown format, no reader installed)."""


class RowError(ValueError):
    """One row cannot be used; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class PreferencePair:
    """One preference: a prompt (plain text or chat messages) and two responses."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    subset: str | None = None
    source: str = ""
    """Where the row came from (`file:line`), for messages."""


@dataclass
class EncodedPair:
    """A pair as token ids: each sequence is `prompt_ids + response_ids` (prompt shared)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    """Response tokens only."""
    rejected_ids: list[int]
    subset: str | None = None
    truncated: bool = False
    flipped: bool = False


@dataclass
class DataReport:
    """What happened to the rows of one data source.

    >>> r = DataReport(source="x.jsonl", rows=3, kept=2); r.drop("tie", "x.jsonl:2")
    >>> r.summary()
    'x.jsonl: 3 rows, 2 kept, 1 dropped (tie 1)'
    """

    source: str
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    flipped: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to three locations per drop reason."""

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < 3:
            seen.append(where)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows} rows, {self.kept} kept"]
        if self.dropped:
            reasons = ", ".join(f"{k} {self.dropped[k]}" for k in REASONS if self.dropped.get(k))
            parts.append(f"{self.num_dropped} dropped ({reasons})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.flipped:
            parts.append(f"{self.flipped} labels flipped")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
                "truncated": self.truncated, "flipped": self.flipped, "examples": self.examples}


# ---------------------------------------------------------------------------------------------
# Reading files


def read_rows(path: str | Path, *, split: str = "train") -> Iterator[tuple[str, dict | RowError]]:
    """Yield `(location, row)` for every row of a data file or folder; an unreadable row comes
    as a `RowError` in place of the dict (so that it is counted, not raised).

    Raises `DataError` when the source as a whole cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file or folder")
    if path.is_dir():
        yield from _read_folder(path, split)
        return
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        yield from _read_json(path)
    elif name.endswith(ARROW_SUFFIXES):
        for i, row in enumerate(_read_arrow(path)):
            yield f"{path}:{i}", row
    else:
        raise DataError(f"{path}: unknown data format; expected one of {JSON_SUFFIXES + ARROW_SUFFIXES} "
                        "or a folder written by `datasets.save_to_disk`")


def _open_text(path: Path):
    return (gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz")
            else open(path, encoding="utf-8"))


def _read_json(path: Path) -> Iterator[tuple[str, dict | RowError]]:
    with _open_text(path) as fh:
        text = fh.read()
    whole: Any = None
    if ".jsonl" not in path.name.lower():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON-lines under a .json name (what `datasets.to_json` writes)
    if whole is not None:
        if isinstance(whole, dict):
            lists = [v for v in whole.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: a JSON object must hold exactly one list of rows "
                                f"(found {len(lists)} lists); or write one row per line (JSONL)")
            whole = lists[0]
        if not isinstance(whole, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, row in enumerate(whole):
            yield f"{path}[{i}]", row if isinstance(row, dict) else RowError("not_an_object", type(row).__name__)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, RowError("bad_json", str(exc))
            continue
        yield where, row if isinstance(row, dict) else RowError("not_an_object", type(row).__name__)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _read_arrow(path: Path) -> Iterable[dict]:
    """Rows of a parquet or arrow file, through `datasets` if installed, else `pyarrow`."""
    is_parquet = path.name.lower().endswith(".parquet")
    if _have("datasets"):
        import datasets

        return datasets.Dataset.from_parquet(str(path)) if is_parquet else datasets.Dataset.from_file(str(path))
    if _have("pyarrow"):
        import pyarrow as pa

        if is_parquet:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        try:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all().to_pylist()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_file(source).read_all().to_pylist()
    raise DataError(f"{path}: reading {path.suffix} files needs the `datasets` or `pyarrow` package "
                    "(pip install pyarrow); or convert the data to JSONL")


def _read_folder(path: Path, split: str) -> Iterator[tuple[str, dict | RowError]]:
    """A `datasets.save_to_disk` folder, or a folder of data files (those naming `split` if any do)."""
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        if not _have("datasets"):
            raise DataError(f"{path}: a `save_to_disk` dataset folder needs the `datasets` package to read")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path}[{split}][{i}]", row
        return
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.name.lower().endswith(JSON_SUFFIXES + ARROW_SUFFIXES))
    named = [p for p in files if split in p.relative_to(path).as_posix()]
    files = named or files
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(JSON_SUFFIXES + ARROW_SUFFIXES)}) in this folder")
    for f in files:
        yield from read_rows(f, split=split)


# ---------------------------------------------------------------------------------------------
# Normalising row shapes


def parse_hh_transcript(text: str) -> list[dict]:
    """Split an Anthropic-HH transcript into chat messages.

    >>> parse_hh_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_SPLIT.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError("unparsable_transcript", "no leading `Human:` turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _is_hh(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _check_messages(messages: Any, field_name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RowError("bad_messages", f"{field_name} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("bad_messages", f"{field_name}[{i}] must be an object with string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _split_reply(messages: list[dict], field_name: str) -> tuple[list[dict], str]:
    if messages[-1]["role"] != "assistant":
        raise RowError("bad_messages", f"the last message of {field_name} must be the assistant's reply")
    return messages[:-1], messages[-1]["content"]


def normalise_row(row: dict) -> PreferencePair:
    """One row, in any supported shape, as a `PreferencePair`; raises `RowError` with the reason.

    >>> normalise_row({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ...                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}]}).prompt
    [{'role': 'user', 'content': 'Hi'}]
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if chosen is None or rejected is None:
        raise RowError("missing_field", "`chosen` and `rejected` are required")
    if isinstance(chosen, list) and isinstance(rejected, list):
        c_prompt, chosen = _split_reply(_check_messages(chosen, "chosen"), "chosen")
        r_prompt, rejected = _split_reply(_check_messages(rejected, "rejected"), "rejected")
        if c_prompt != r_prompt:
            raise RowError("prompt_mismatch", "the messages before the replies differ")
        if not c_prompt:
            if not isinstance(prompt, str) or not prompt:
                raise RowError("empty_prompt", "the message lists hold only the replies and no `prompt` is given")
            c_prompt = [{"role": "user", "content": prompt}]
        prompt = c_prompt
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if not prompt and _is_hh(chosen) and _is_hh(rejected):
            prompt, chosen, rejected = _split_hh(chosen, rejected)
        elif prompt is None:
            raise RowError("missing_field", "`prompt` is required when chosen/rejected are plain strings")
        elif isinstance(prompt, list):
            prompt = _check_messages(prompt, "prompt")
        elif not isinstance(prompt, str):
            raise RowError("bad_type", f"prompt is a {type(prompt).__name__}")
    else:
        raise RowError("bad_type", f"chosen is a {type(chosen).__name__}, rejected a {type(rejected).__name__}")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RowError("bad_type", "responses must be strings")
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise RowError("empty_prompt")
    if not chosen.strip() or not rejected.strip():
        raise RowError("empty_response")
    if chosen == rejected:
        raise RowError("identical")
    for kc, kr in SCORE_KEYS:
        sc, sr = row.get(kc), row.get(kr)
        if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc == sr:
            raise RowError("tie", f"{kc} == {kr} == {sc}")
    subset = row.get("subset")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                          subset=str(subset) if subset is not None else None)


def _split_hh(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    c_msgs, r_msgs = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    k = 0
    while k < min(len(c_msgs), len(r_msgs)) and c_msgs[k] == r_msgs[k]:
        k += 1
    if k == len(c_msgs) == len(r_msgs):
        raise RowError("identical")
    c_rest, r_rest = c_msgs[k:], r_msgs[k:]
    if len(c_rest) != 1 or len(r_rest) != 1 or c_rest[0]["role"] != "assistant" or r_rest[0]["role"] != "assistant":
        raise RowError("prompt_mismatch", "the transcripts differ before their final assistant turns")
    if k == 0:
        raise RowError("empty_prompt")
    return c_msgs[:k], c_rest[0]["content"], r_rest[0]["content"]


def normalise_rows(rows: Iterable[tuple[Any, dict | RowError]], *, source: str,
                   report: DataReport | None = None) -> tuple[list[PreferencePair], DataReport]:
    """Normalise `(location, row)` items; unusable rows are counted in the report, not raised."""
    report = report or DataReport(source=source)
    pairs = []
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            if not isinstance(row, dict):
                raise RowError("not_an_object", type(row).__name__)
            pair = normalise_row(row)
        except RowError as exc:
            report.drop(exc.reason, str(where))
            continue
        pair.source = str(where)
        pairs.append(pair)
    report.kept = len(pairs)
    return pairs, report


def read_pairs(path: str | Path, *, split: str = "train",
               limit: int | None = None) -> tuple[list[PreferencePair], DataReport]:
    """All usable pairs of a data file or folder, with the report of what was dropped.

    >>> pairs, report = read_pairs("prefs.jsonl")        # doctest: +SKIP
    >>> print(report.summary())                          # doctest: +SKIP
    prefs.jsonl: 1000 rows, 990 kept, 10 dropped (bad_json 2, identical 8)
    """
    rows = read_rows(path, split=split)
    if limit:
        rows = (item for i, item in zip(range(limit), rows))
    return normalise_rows(rows, source=str(path))


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_pairs(pairs: Sequence[PreferencePair], renderer: PromptRenderer, report: DataReport, *, max_tokens: int,
                 truncate: bool = True, flip_fraction: float = 0.0, seed: int = 0) -> list[EncodedPair]:
    """Token ids for every pair, rendered exactly as the server renders them.

    Pairs that the renderer rejects (or that are too long with `truncate=False`) are dropped and
    counted in `report`. With `flip_fraction` > 0 that fraction of the kept pairs (chosen by `seed`)
    has chosen and rejected swapped: label noise for robustness experiments.
    """
    encoded: list[EncodedPair] = []
    for pair in pairs:
        try:
            group = renderer.encode(pair.prompt, [pair.chosen, pair.rejected], max_tokens=max_tokens, truncate=True)
        except InputError as exc:
            report.drop("bad_messages", f"{pair.source} ({exc})")
            continue
        was_truncated = any(group.truncated)
        if was_truncated and not truncate:
            report.drop("too_long", pair.source)
            continue
        c_ids, r_ids = group.response_ids
        if c_ids == r_ids:  # different text, same tokens (or truncated to the same tail)
            report.drop("identical", pair.source)
            continue
        report.truncated += was_truncated
        encoded.append(EncodedPair(prompt_ids=group.prompt_ids, chosen_ids=c_ids, rejected_ids=r_ids,
                                   subset=pair.subset, truncated=was_truncated))
    if flip_fraction:
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
        chosen_idx = random.Random(seed).sample(range(len(encoded)), round(flip_fraction * len(encoded)))
        for i in chosen_idx:
            p = encoded[i]
            p.chosen_ids, p.rejected_ids, p.flipped = p.rejected_ids, p.chosen_ids, True
        report.flipped = len(chosen_idx)
    report.kept = len(encoded)
    return encoded


class PreferenceDataset(torch.utils.data.Dataset):
    """Encoded preference pairs plus the report of how they were read.

    >>> ds = load_preferences("prefs.jsonl", renderer, max_tokens=512)     # doctest: +SKIP
    >>> batch = collate_pairs([ds[0], ds[1]], pad_id=tokenizer.pad_token_id)   # doctest: +SKIP
    """

    def __init__(self, pairs: list[EncodedPair], report: DataReport):
        self.pairs = pairs
        self.report = report

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> EncodedPair:
        return self.pairs[i]


def load_preferences(path: str | Path, renderer: PromptRenderer, *, max_tokens: int, truncate: bool = True,
                     flip_fraction: float = 0.0, seed: int = 0, split: str = "train",
                     limit: int | None = None) -> PreferenceDataset:
    """Read, normalise and encode a preference file into a `PreferenceDataset` (see `encode_pairs`)."""
    pairs, report = read_pairs(path, split=split, limit=limit)
    encoded = encode_pairs(pairs, renderer, report, max_tokens=max_tokens, truncate=truncate,
                           flip_fraction=flip_fraction, seed=seed)
    log.debug("%s", report.summary())
    return PreferenceDataset(encoded, report)


# ---------------------------------------------------------------------------------------------
# Collation


@dataclass
class PairBatch:
    """B pairs as one batch of 2B rows: rows [0, B) are the chosen sequences, [B, 2B) the rejected.

    Right-padded with the tokenizer's pad id. `response_mask` is 1 on response tokens (the prompt
    and the padding are 0): it selects the tokens whose log-probs the regularisers sum.
    """

    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) long
    response_mask: torch.Tensor  # (2B, T) long
    weights: torch.Tensor  # (B,) float: 1, or 0 for padding pairs that fill a ragged shard
    subsets: list[str | None]
    inputs_embeds: torch.Tensor | None = None
    """(2B, T, H) hidden states to feed instead of the token embeddings (frozen lower layers, cached)."""

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                         self.weights.to(device), self.subsets,
                         None if self.inputs_embeds is None else self.inputs_embeds.to(device))


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, weights: Sequence[float] | None = None) -> PairBatch:
    """Pad B encoded pairs into one `PairBatch` of 2B rows (chosen first, then rejected).

    >>> b = collate_pairs([EncodedPair([1, 2], [3], [4, 5])], pad_id=0)
    >>> b.input_ids.tolist(), b.response_mask.tolist()
    ([[1, 2, 3, 0], [1, 2, 4, 5]], [[0, 0, 1, 0], [0, 0, 1, 1]])
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(pr) + len(r) for pr, r in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (2B, T)
    response_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (2B, T)
    for row, (prompt, response) in enumerate(seqs):
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :n] = 1
        response_mask[row, n_p:n] = 1
    w = torch.ones(len(pairs)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    return PairBatch(input_ids, attention_mask, response_mask, w, [p.subset for p in pairs])


# ---------------------------------------------------------------------------------------------
# Synthetic data (for the tiny preset and tests)

_GOOD = ("clear", "helpful", "correct", "kind", "precise", "honest", "useful", "thorough", "polite", "accurate")
_BAD = ("wrong", "rude", "vague", "false", "lazy", "harmful", "sloppy", "useless", "confusing", "careless")
_TOPICS = ("rivers", "stars", "bread", "chess", "rain", "music", "trains", "bees", "salt", "clocks", "maps", "glass")


def synthetic_rows(n: int, *, seed: int = 0, chat: bool = True) -> list[dict]:
    """`n` separable preference rows: chosen replies use "good" words, rejected ones "bad" words.

    >>> synthetic_rows(1, seed=0)[0].keys()
    dict_keys(['prompt', 'chosen', 'rejected', 'subset'])
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        question = f"Tell me about {topic}."
        k = rng.randint(2, 4)
        chosen = " ".join(rng.choice(_GOOD) for _ in range(k)) + f" {topic}."
        rejected = " ".join(rng.choice(_BAD) for _ in range(k)) + f" {topic}."
        prompt: Any = [{"role": "user", "content": question}] if chat else question
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": "chat" if i % 2 else "facts"})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSONL, atomically (temporary sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path
