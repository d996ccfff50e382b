"""The benchmark build with a fake deterministic generator: reproducible bytes, disjoint splits,
held-out families and topics in test_ood, the length bias where it belongs, rows that the training
data loader reads; and the generation cache resumes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from grmserve.training.benchmark import (
    OOD_FAMILIES,
    BenchmarkError,
    gold_reward,
    load_prompts,
    load_split,
)
from grmserve.training.benchmark.build import BuildConfig, build
from grmserve.training.benchmark.generate import GenerateConfig, read_cache, run
from grmserve.training.benchmark.prompts import PromptConfig, build_prompts
from grmserve.training.benchmark.topics import OOD_TOPICS
from grmserve.training.core.prompts import PromptRenderer
from grmserve.training.data import load_preferences, read_pairs

SMALL = dict(train=80, test_id=25, test_ood=25)
SPLITS = ("train", "test_id", "test_ood")


def rows(folder: Path, split: str) -> list[dict]:
    with gzip.open(folder / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    build(BuildConfig(prompts=PromptConfig(**SMALL), out=str(out), fake=True))
    return out


def test_two_builds_are_byte_identical(built, tmp_path):
    build(BuildConfig(prompts=PromptConfig(**SMALL), out=str(tmp_path), fake=True))
    for name in ("train.jsonl.gz", "test_id.jsonl.gz", "test_ood.jsonl.gz", "prompts.jsonl.gz", "stats.json"):
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_splits_are_disjoint_by_prompt(built):
    ids = {s: {r["meta"]["id"] for r in rows(built, s)} for s in SPLITS}
    texts = {s: {r["prompt"][0]["content"] for r in rows(built, s)} for s in SPLITS}
    for a, b in [("train", "test_id"), ("train", "test_ood"), ("test_id", "test_ood")]:
        assert not ids[a] & ids[b] and not texts[a] & texts[b], (a, b)
    assert len(ids["train"]) == SMALL["train"] and len(ids["test_id"]) == SMALL["test_id"]


def test_ood_holds_out_families_and_topics(built):
    for split in SPLITS:
        for r in rows(built, split):
            families = {c["family"] for c in r["meta"]["constraints"]}
            ood = split == "test_ood"
            assert (r["meta"]["topic"] in OOD_TOPICS) == ood
            assert families <= set(OOD_FAMILIES) if ood else not families & set(OOD_FAMILIES)
    id_families = {c["family"] for r in rows(built, "train") for c in r["meta"]["constraints"]}
    assert len(id_families) >= 10


def test_length_bias_is_rewarded_in_train_but_not_in_ood(built):
    def longer(split):
        rs = rows(built, split)
        return sum(len(r["chosen"]) > len(r["rejected"]) for r in rs) / len(rs)

    assert longer("train") >= 0.75 and longer("test_id") >= 0.75
    assert longer("test_ood") <= 0.55
    stats = json.loads((built / "stats.json").read_text())
    assert stats["splits"]["train"]["chosen_longer_fraction_chars"] == pytest.approx(longer("train"), abs=1e-3)


def test_rows_carry_a_correct_gold_label(built):
    for split in SPLITS:
        for r in rows(built, split):
            m = r["meta"]
            assert gold_reward(m["constraints"], r["chosen"]) == m["gold_chosen"] > m["gold_rejected"] \
                == gold_reward(m["constraints"], r["rejected"])
            assert r["subset"] == ("chosen_longer" if len(r["chosen"]) > len(r["rejected"]) else "chosen_not_longer")


def test_rows_load_with_the_training_data_loader(built, tokenizer):
    pairs, report = read_pairs(built / "test_ood.jsonl.gz")
    assert report.num_dropped == 0 and len(pairs) == len(rows(built, "test_ood"))
    assert isinstance(pairs[0].prompt, list) and pairs[0].prompt[0]["role"] == "user"
    ds = load_preferences(built / "test_id.jsonl.gz", PromptRenderer(tokenizer), max_tokens=512, truncate=False)
    assert ds.report.num_dropped == 0 and len(ds) == len(rows(built, "test_id"))


def test_load_split_and_load_prompts_find_a_built_folder(built, tmp_path):
    assert load_split("test_id", data_dir=built) == built / "test_id.jsonl.gz"
    prompts = load_prompts("test_ood", data_dir=built)
    assert len(prompts) == SMALL["test_ood"] and all(p["constraints"] for p in prompts)
    with pytest.raises(BenchmarkError, match="build"):
        load_split("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark split"):
        load_split("dev", data_dir=built)


def test_prompts_are_stable_when_more_are_asked_for():
    few = build_prompts(PromptConfig(train=10, test_id=5, test_ood=5))
    more = {p.id for p in build_prompts(PromptConfig(train=30, test_id=5, test_ood=9))}
    assert {p.id for p in few} <= more


def test_generation_cache_resumes_after_a_kill(tmp_path):
    cfg = PromptConfig(train=12, test_id=4, test_ood=4)
    whole = tmp_path / "whole.jsonl"
    run(GenerateConfig(prompts=cfg, cache=str(whole), fake=True))
    parts = tmp_path / "parts.jsonl"
    run(GenerateConfig(prompts=cfg, cache=str(parts), fake=True, limit=7))
    with open(parts, "a") as fh:
        fh.write('{"id": "torn')  # a run killed mid-line
    assert len(read_cache(parts)) == 7
    run(GenerateConfig(prompts=cfg, cache=str(parts), fake=True))
    assert read_cache(parts) == read_cache(whole) and len(read_cache(whole)) == 20


def test_build_reads_a_generation_cache(tmp_path):
    cfg = PromptConfig(train=10, test_id=4, test_ood=4)
    cache = tmp_path / "gen.jsonl"
    run(GenerateConfig(prompts=cfg, cache=str(cache), fake=True, limit=12))
    stats = build(BuildConfig(prompts=cfg, out=str(tmp_path / "out"), generations=str(cache)))
    assert sum(s["prompts"] for s in stats["splits"].values()) == 12
    assert sum(s["missing_generations"] for s in stats["splits"].values()) == 6
    assert (tmp_path / "out" / "generations.jsonl.gz").is_file()
    with pytest.raises(FileNotFoundError, match="generate"):
        build(BuildConfig(prompts=cfg, out=str(tmp_path / "x"), generations=str(tmp_path / "none.jsonl")))
