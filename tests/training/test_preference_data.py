"""Preference data: row shapes, rendering identical to the server's, bad-row reports, collation."""

from __future__ import annotations

import doctest
import importlib.util
import json

import pytest
import torch

from grmserve.training import data as data_module
from grmserve.training.core.prompts import PromptRenderer
from grmserve.training.data import (
    DataError,
    EncodedPair,
    collate_pairs,
    load_preferences,
    parse_hh_transcript,
    read_pairs,
    synthetic_rows,
    write_jsonl,
)

USER_HI = {"role": "user", "content": "Hi, who are you?"}


def uf(reply: str, prompt=(USER_HI,)) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": reply}]


GOOD_ROWS = [
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5", "subset": "math"},
    {"prompt": [USER_HI], "chosen": "A helpful assistant.", "rejected": "Nobody.", "subset": "chat"},
    {"prompt": "Hi, who are you?", "chosen": uf("I am an assistant."), "rejected": uf("Go away."),
     "score_chosen": 8.0, "score_rejected": 3.0},
    {"chosen": "\n\nHuman: What is rain?\n\nAssistant: Water falling from clouds."
               "\n\nHuman: Why?\n\nAssistant: Condensation.",
     "rejected": "\n\nHuman: What is rain?\n\nAssistant: Water falling from clouds."
                 "\n\nHuman: Why?\n\nAssistant: No idea."},
]
BAD_LINES = {
    "bad_json": ['{"prompt": "x", "chosen": ', "not json at all"],
    "not_an_object": ["[1, 2]"],
    "missing_field": [json.dumps({"prompt": "x", "chosen": "a"}), json.dumps({"chosen": "a", "rejected": "b"})],
    "empty_response": [json.dumps({"prompt": "x", "chosen": "   ", "rejected": "b"})],
    "identical": [json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),
                  json.dumps({"chosen": uf("same"), "rejected": uf("same")})],
    "tie": [json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 5})],
    "prompt_mismatch": [json.dumps({"chosen": uf("a"),
                                    "rejected": uf("b", prompt=({"role": "user", "content": "Other"},))}),
                        json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: y",
                                    "rejected": "\n\nHuman: A\n\nAssistant: z\n\nHuman: B\n\nAssistant: w"})],
    "bad_messages": [json.dumps({"chosen": [USER_HI], "rejected": [USER_HI]}),  # no assistant reply
                     json.dumps({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"})],
    "bad_type": [json.dumps({"prompt": "x", "chosen": "a", "rejected": uf("b")})],
    "empty_prompt": [json.dumps({"prompt": "", "chosen": "a", "rejected": "b"})],
}


@pytest.fixture()
def renderer(tokenizer):
    return PromptRenderer(tokenizer)


@pytest.fixture()
def messy_file(tmp_path):
    lines = [json.dumps(r) for r in GOOD_ROWS]
    for bad in BAD_LINES.values():
        lines += bad
    lines.insert(2, "")  # blank lines are skipped, not counted
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_counted_per_reason_and_never_raise(messy_file, renderer):
    ds = load_preferences(messy_file, renderer, max_tokens=256)
    report = ds.report
    assert len(ds) == len(GOOD_ROWS) == report.kept
    expected = {reason: len(lines) for reason, lines in BAD_LINES.items()}
    assert dict(report.dropped) == expected
    assert report.rows == len(GOOD_ROWS) + sum(expected.values())
    assert report.examples["bad_json"][0].endswith("messy.jsonl:" + str(len(GOOD_ROWS) + 2))  # 1-based, after the blank
    summary = report.summary()
    assert "bad_json 2" in summary and f"{report.num_dropped} dropped" in summary
    assert json.loads(json.dumps(report.to_json()))["dropped"]["tie"] == 1


def test_shapes_normalise_to_the_same_prompt_and_responses(messy_file):
    pairs, _ = read_pairs(messy_file)  # the unknown chat role is caught later, when rendering
    plain, chat, ultra, hh = pairs[:4]
    assert plain.prompt == "Q: 2+2?\nA:" and plain.chosen == " 4" and plain.subset == "math"
    assert chat.prompt == [USER_HI]
    assert ultra.prompt == [USER_HI] and ultra.chosen == "I am an assistant." and ultra.rejected == "Go away."
    assert hh.prompt == [{"role": "user", "content": "What is rain?"},
                         {"role": "assistant", "content": "Water falling from clouds."},
                         {"role": "user", "content": "Why?"}]
    assert (hh.chosen, hh.rejected) == ("Condensation.", "No idea.")


def test_hh_transcript_parsing():
    assert parse_hh_transcript("Human: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]


def test_encoding_matches_the_server_renderer(messy_file, renderer, tokenizer):
    pairs, _ = read_pairs(messy_file)
    ds = load_preferences(messy_file, renderer, max_tokens=256)
    assert len(ds) == 4
    for pair, enc in zip(pairs[:4], ds.pairs):
        group = PromptRenderer(tokenizer).encode(pair.prompt, [pair.chosen, pair.rejected], max_tokens=256)
        assert enc.prompt_ids == group.prompt_ids
        assert [enc.chosen_ids, enc.rejected_ids] == group.response_ids
    chat = ds.pairs[1]
    text = tokenizer.decode(chat.prompt_ids + chat.chosen_ids)
    assert text.count("<|im_start|>assistant") == 1 and text.endswith("A helpful assistant.<|im_end|>")
    assert tokenizer.bos_token_id is None or text.count(tokenizer.bos_token) == text.count("<|im_start|>")


def test_collate_pads_right_and_masks_prompt_tokens(messy_file, renderer, tokenizer):
    ds = load_preferences(messy_file, renderer, max_tokens=256)
    batch = collate_pairs(ds.pairs, pad_id=tokenizer.pad_token_id)
    b = len(ds)
    assert batch.input_ids.shape[0] == 2 * b and batch.num_pairs == b
    for i, pair in enumerate(ds.pairs):
        for row, response in ((i, pair.chosen_ids), (b + i, pair.rejected_ids)):
            n_p, n = len(pair.prompt_ids), len(pair.prompt_ids) + len(response)
            assert batch.input_ids[row, :n].tolist() == pair.prompt_ids + response
            assert (batch.input_ids[row, n:] == tokenizer.pad_token_id).all()
            assert batch.attention_mask[row].sum() == n and batch.attention_mask[row, :n].all()
            assert batch.response_mask[row, :n_p].sum() == 0
            assert batch.response_mask[row].sum() == len(response) and batch.response_mask[row, n_p:n].all()
    assert batch.subsets == [p.subset for p in ds.pairs]


def test_truncation_policy_and_drop_when_off(tmp_path, renderer):
    long_prompt = "word " * 200
    path = write_jsonl([{"prompt": long_prompt, "chosen": "yes indeed", "rejected": "no"},
                        {"prompt": "short", "chosen": "good " * 100, "rejected": "bad"}], tmp_path / "long.jsonl")
    ds = load_preferences(path, renderer, max_tokens=32)
    assert len(ds) == 2 and ds.report.truncated == 2
    first, second = ds.pairs
    assert len(first.prompt_ids) + max(len(first.chosen_ids), len(first.rejected_ids)) <= 32
    assert first.chosen_ids == renderer.tokenize(["yes indeed"])[0]  # the prompt gave way, the response is whole
    assert second.prompt_ids == [] and len(second.chosen_ids) == 32  # the response alone is too long: its tail
    dropped = load_preferences(path, renderer, max_tokens=32, truncate=False)
    assert len(dropped) == 0 and dropped.report.dropped["too_long"] == 2


def test_label_flips_are_seeded(tmp_path, renderer):
    path = write_jsonl(synthetic_rows(20, seed=3), tmp_path / "syn.jsonl")
    clean = load_preferences(path, renderer, max_tokens=128)
    a = load_preferences(path, renderer, max_tokens=128, flip_fraction=0.25, seed=7)
    b = load_preferences(path, renderer, max_tokens=128, flip_fraction=0.25, seed=7)
    c = load_preferences(path, renderer, max_tokens=128, flip_fraction=0.25, seed=8)
    flipped = [i for i, p in enumerate(a.pairs) if p.flipped]
    assert a.report.flipped == len(flipped) == 5
    assert flipped == [i for i, p in enumerate(b.pairs) if p.flipped]
    assert flipped != [i for i, p in enumerate(c.pairs) if p.flipped]
    for i in flipped:
        assert a.pairs[i].chosen_ids == clean.pairs[i].rejected_ids
        assert a.pairs[i].rejected_ids == clean.pairs[i].chosen_ids


def test_json_list_jsonl_named_json_and_folders(tmp_path):
    rows = synthetic_rows(3, seed=0)
    (tmp_path / "list.json").write_text(json.dumps({"data": rows}))
    assert len(read_pairs(tmp_path / "list.json")[0]) == 3
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(read_pairs(tmp_path / "lines.json")[0]) == 3
    folder = tmp_path / "ds"
    write_jsonl(rows, folder / "data" / "train.jsonl")
    write_jsonl(rows[:1], folder / "data" / "test.jsonl")
    assert len(read_pairs(folder, split="train")[0]) == 3
    assert len(read_pairs(folder, split="test")[0]) == 1
    with pytest.raises(DataError, match="no such data file"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        read_pairs(tmp_path / "x.csv")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None or importlib.util.find_spec("datasets") is not None,
                    reason="a parquet reader is installed")
def test_parquet_without_a_reader_says_what_to_install(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pyarrow"):
        read_pairs(tmp_path / "x.parquet")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow is not installed")
def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    assert read_pairs(tmp_path / "x.parquet")[0][0].chosen == "a"


def test_collate_example_and_empty_batch():
    b = collate_pairs([EncodedPair([1], [2, 3], [4])], pad_id=9)
    assert b.input_ids.tolist() == [[1, 2, 3], [1, 4, 9]]
    assert b.weights.tolist() == [1.0] and b.input_ids.dtype == torch.long
    with pytest.raises(ValueError):
        collate_pairs([], pad_id=0)


def test_docstring_examples_run():
    result = doctest.testmod(data_module)
    assert result.failed == 0 and result.attempted >= 5
