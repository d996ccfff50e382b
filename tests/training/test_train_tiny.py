"""The tiny preset end to end on CPU: training learns a separable preference set, its checkpoint
scores like the training model, grm-eval reads it; LoRA, DPO, bf16 and friends run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from grmserve.training import presets
from grmserve.training.core.checkpoint import load_grm
from grmserve.training.evaluate import main as eval_main
from grmserve.training.evaluate import score_pairs
from grmserve.training.trainer import Trainer, latest_checkpoint


def _tiny(tmp_path, name="tiny", **steps):
    cfg = presets.PRESETS[name]()
    cfg.run_dir = str(tmp_path / name)
    cfg.log.progress = False
    cfg.eval.every = 0
    cfg.optim.max_steps = steps.get("steps", 4)
    return cfg


def _checkpoint_scores(trainer: Trainer, ckpt) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_grm(ckpt / "model")
    pairs = trainer.eval_data.pairs
    trainer.model.eval()
    got = score_pairs(loaded.model, pairs, pad_id=loaded.tokenizer.pad_token_id)
    want = score_pairs(trainer.model, pairs, pad_id=trainer.pad_id)
    return torch.cat(got), torch.cat(want)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = _tiny(tmp_path_factory.mktemp("train"), steps=12)
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    result = trainer.fit()
    return trainer, before, result


def test_training_lowers_loss_and_raises_accuracy(trained):
    trainer, before, result = trained
    assert result["step"] == 12
    assert result["eval_loss"] < before["eval_loss"] - 0.2
    assert result["eval_accuracy"] >= 0.9 and result["eval_accuracy"] >= before["eval_accuracy"]
    assert result["eval_margin_mean"] > before["eval_margin_mean"] + 0.5
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "split" not in x]
    assert [x["step"] for x in train_lines] == list(range(1, 13))
    first, last = train_lines[:3], train_lines[-3:]
    assert sum(x["loss"] for x in last) < sum(x["loss"] for x in first)
    assert {"loss", "reward_loss", "reg_loss", "accuracy", "margin", "lr", "grad_norm"} <= set(train_lines[0])
    assert lines[-1]["split"] == "eval"
    report = json.loads((trainer.run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 64 and report["train"]["dropped"] == {}


def test_checkpoint_scores_like_the_training_model(trained):
    trainer, _, _ = trained
    ckpt = latest_checkpoint(trainer.ckpt_dir)
    assert ckpt.name == "step-0000012"
    got, want = _checkpoint_scores(trainer, ckpt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert json.loads((ckpt / "model" / "config.json").read_text())["grm"]["max_tokens"] == 128


def test_grm_eval_on_the_checkpoint(trained, tmp_path, capsys):
    trainer, _, result = trained
    out = tmp_path / "eval.json"
    ckpt = latest_checkpoint(trainer.ckpt_dir) / "model"
    assert eval_main(["--model", str(ckpt), "--data", str(trainer.run_dir / "data" / "eval.jsonl"),
                      "--output", str(out), "--batch_size", "5"]) == 0
    table = capsys.readouterr().err
    assert "overall" in table and "facts" in table
    stats = json.loads(out.read_text())
    assert stats["pairs"] == 16 and stats["accuracy"] == pytest.approx(result["eval_accuracy"])
    assert stats["margin_mean"] == pytest.approx(result["eval_margin_mean"], rel=1e-4)
    assert set(stats["subsets"]) == {"chat", "facts"} and sum(s["pairs"] for s in stats["subsets"].values()) == 16
    assert {"chosen_mean", "chosen_std", "rejected_mean", "rejected_std", "margin_std"} <= set(stats)


def test_lora_trains_adapters_and_head_and_exports_merged(tmp_path):
    cfg = _tiny(tmp_path, "tiny-lora", steps=3)
    trainer = Trainer(cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("reward_head.") for n in trainable)
    assert any(n.startswith("reward_head.") for n in trainable)
    trainer.fit()
    ckpt = latest_checkpoint(trainer.ckpt_dir)
    assert (ckpt / "trainable.safetensors").is_file()
    got, want = _checkpoint_scores(trainer, ckpt)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with safe_open(str(ckpt / "model" / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)  # merged into plain weights


@pytest.mark.parametrize("variant", ["dpo-bf16-accum-checkpointing", "lora-dpo", "dpo-noref-margin", "nll-smooth"])
def test_loss_and_precision_variants_run(tmp_path, variant):
    cfg = _tiny(tmp_path, "tiny-lora" if variant.startswith("lora") else "tiny", steps=2)
    cfg.data.synthetic = 16
    cfg.checkpoint.final = False
    if variant == "dpo-bf16-accum-checkpointing":
        cfg.loss.regulariser, cfg.precision.mode = "dpo", "bf16"
        cfg.optim.grad_accum, cfg.model.gradient_checkpointing = 2, True
    elif variant == "lora-dpo":
        cfg.loss.regulariser = "dpo"
    elif variant == "dpo-noref-margin":
        cfg.loss.regulariser, cfg.loss.reward, cfg.loss.margin = "dpo-noref", "bt-margin", 0.5
    else:
        cfg.loss.regulariser, cfg.loss.reward, cfg.loss.label_smoothing = "sft-nll", "bt-smooth", 0.1
    result = Trainer(cfg).fit()
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert "reg_loss" in result
