"""The benchmark files shipped in the package: the sizes and length-bias fractions the issue asks
for, readable by the training data loader, and fresh (rebuilding them from the shipped generations
gives the same bytes, so a change to the edits or checks cannot silently leave stale data)."""

from __future__ import annotations

import json

import pytest

from grmserve.training.benchmark import DATA_DIR, load_split
from grmserve.training.benchmark.build import BuildConfig, build
from grmserve.training.data import read_pairs

pytestmark = pytest.mark.skipif(not (DATA_DIR / "stats.json").is_file(),
                                reason="no built benchmark shipped in training/benchmark/data")


@pytest.fixture(scope="module")
def stats() -> dict:
    return json.loads((DATA_DIR / "stats.json").read_text())


def test_split_sizes_and_length_bias(stats):
    s = stats["splits"]
    assert s["train"]["pairs"] >= 8000 and s["test_id"]["pairs"] >= 1000 and s["test_ood"]["pairs"] >= 1000
    assert s["train"]["chosen_longer_fraction_chars"] >= 0.75 and s["test_id"]["chosen_longer_fraction_chars"] >= 0.75
    assert s["test_ood"]["chosen_longer_fraction_chars"] <= 0.55
    assert stats["generation"]["models"] == {"SmolLM2-135M-Instruct": stats["generation"]["responses"]}


def test_shipped_splits_load(stats):
    for split in ("test_id", "test_ood"):
        pairs, report = read_pairs(load_split(split))
        assert report.num_dropped == 0 and len(pairs) == stats["splits"][split]["pairs"]


def test_shipped_files_are_fresh(tmp_path):
    build(BuildConfig(out=str(tmp_path), generations=str(DATA_DIR / "generations.jsonl.gz")))
    for name in ("train.jsonl.gz", "test_id.jsonl.gz", "test_ood.jsonl.gz", "prompts.jsonl.gz", "stats.json",
                 "generations.jsonl.gz"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), (
            f"{name} is stale: rebuild with `python -m grmserve.training.benchmark.build`")
