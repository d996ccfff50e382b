"""A broken checkpoint folder raises CheckpointError naming the file and what is wrong; it never
loads with a randomly initialised head or backbone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grmserve.training.core import assets
from grmserve.training.core.checkpoint import CheckpointError, load_grm


def rewrite_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def to_research(folder: Path, layer_type: str = "mlp") -> None:
    """Turn our grm folder into the official code's layout (v_head.* beside the LM weights)."""
    head = load_file(str(folder / "reward_head.safetensors"))
    (folder / "reward_head.safetensors").unlink()
    rewrite_tensors(folder / "model.safetensors", lambda t: t.update({f"v_head.{k}": v for k, v in head.items()}))

    def edit(cfg):
        del cfg["grm"]
        cfg.update(vhead_layer_type=layer_type, vhead_num_neurons=32, vhead_num_layers=1)

    edit_config(folder, edit)


def drop_grm_block(cfg):
    del cfg["grm"]


def plain_causal_lm(folder: Path) -> None:
    edit_config(folder, drop_grm_block)
    (folder / "reward_head.safetensors").unlink()


def research_without_head_tensor(folder: Path) -> None:
    to_research(folder)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.pop("v_head.summary.2.weight"))


def set_head_type(cfg):
    cfg["grm"]["head"]["type"] = "conv"


# name -> (break the folder, file named in the message, regex the message must match)
CASES = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), "config.json", r"not found"),
    "invalid JSON": (lambda d: (d / "config.json").write_text('{"grm": {'), "config.json", r"not valid JSON"),
    "reward head file missing": (lambda d: (d / "reward_head.safetensors").unlink(), "reward_head.safetensors",
                                 r"not found"),
    "head tensor missing": (
        lambda d: rewrite_tensors(d / "reward_head.safetensors", lambda t: t.pop("summary.2.bias")),
        "reward_head.safetensors", r"missing reward-head tensor `summary\.2\.bias`"),
    "head tensor wrong shape": (
        lambda d: rewrite_tensors(d / "reward_head.safetensors",
                                  lambda t: t.update({"summary.0.weight": torch.zeros(32, 48)})),
        "reward_head.safetensors", r"`summary\.0\.weight` has shape \(32, 48\), expected \(32, 64\)"),
    "head tensor unexpected": (
        lambda d: rewrite_tensors(d / "reward_head.safetensors",
                                  lambda t: t.update({"summary.4.weight": torch.zeros(1)})),
        "reward_head.safetensors", r"unexpected reward-head tensors \['summary\.4\.weight'\]"),
    "unknown head type in grm block": (lambda d: edit_config(d, set_head_type), "config.json",
                                       r"unknown reward head type 'conv'"),
    "unknown vhead_layer_type": (lambda d: (to_research(d),
                                            edit_config(d, lambda c: c.update(vhead_layer_type="conv"))),
                                 "config.json", r"vhead_layer_type='conv'"),
    "research head tensor missing": (research_without_head_tensor, "model.safetensors",
                                     r"missing reward-head tensor `summary\.2\.weight`"),
    "plain causal LM": (plain_causal_lm, "config.json", r"no reward head found.*plain causal LM"),
    "truncated model.safetensors": (lambda d: truncate(d / "model.safetensors"), "model.safetensors",
                                    r"unreadable safetensors file"),
    "truncated header": (lambda d: truncate(d / "model.safetensors", keep=0.000001), "model.safetensors",
                         r"unreadable safetensors file"),
    "truncated reward_head.safetensors": (lambda d: truncate(d / "reward_head.safetensors"), "reward_head.safetensors",
                                          r"unreadable safetensors file"),
    "backbone tensor missing": (
        lambda d: rewrite_tensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "model.safetensors", r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    "embedding missing": (
        lambda d: rewrite_tensors(d / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight")),
        "model.safetensors", r"missing tensors \['model\.embed_tokens\.weight'\]"),
    "backbone tensor wrong shape": (
        lambda d: rewrite_tensors(d / "model.safetensors",
                                  lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)})),
        "model.safetensors", r"model\.layers\.0\.self_attn\.q_proj\.weight \(8, 8\), expected \(64, 64\)"),
    "bad format_version": (lambda d: edit_config(d, lambda c: c["grm"].update(format_version=99)), "config.json",
                           r"format_version is 99"),
    "unknown grm key": (lambda d: edit_config(d, lambda c: c["grm"].update(colour="red")), "config.json",
                        r"unknown keys in the grm block: \['colour'\]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_raises_checkpoint_error(tmp_path, tiny_checkpoint, case):
    breaker, file_name, problem = CASES[case]
    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    breaker(folder)

    with pytest.raises(CheckpointError) as info:
        load_grm(folder, load_tokenizer=False)
    message = str(info.value)
    assert str(folder / file_name) in message, message
    assert re.search(problem, message), message


def test_unbroken_copy_loads(tmp_path, tiny_checkpoint):
    """The cases above fail for the reason they name, not because a copied folder never loads."""
    folder = tmp_path / "ok"
    shutil.copytree(tiny_checkpoint, folder)
    assert load_grm(folder, load_tokenizer=False).format == "grm"
    to_research(folder)
    assert load_grm(folder, load_tokenizer=False).format == "grm-research"


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nowhere")) + ".*not a checkpoint folder"):
        load_grm(tmp_path / "nowhere")


def test_plain_causal_lm_from_save_pretrained_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    folder = tmp_path / "plain"
    LlamaForCausalLM(assets.tiny_llama_config()).save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"config\.json: no reward head found"):
        load_grm(folder, load_tokenizer=False)


def test_sequence_classifier_with_two_labels_is_refused(tmp_path):
    from transformers import LlamaForSequenceClassification

    cfg = assets.tiny_llama_config()
    cfg.num_labels = 2
    folder = tmp_path / "two-labels"
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"config\.json: a reward model needs one label.* has 2"):
        load_grm(folder, load_tokenizer=False)
