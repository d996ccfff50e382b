"""A stopped or killed run resumes exactly: the same parameters as an uninterrupted run, bit for bit.

The config crosses an epoch boundary, accumulates gradients, and keeps dropout on (head and LoRA),
so the data position, optimizer, scheduler and RNG states must all be restored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grmserve.training import presets
from grmserve.training.trainer import Trainer, latest_checkpoint, list_checkpoints

STEPS = 5  # 16 pairs / batch 4 = 4 steps per epoch: step 5 is in the second epoch


def _cfg(run_dir: Path, name: str = "tiny"):
    cfg = presets.PRESETS[name]()
    cfg.run_dir = str(run_dir)
    cfg.data.synthetic = 16
    cfg.optim.batch_size = 4
    cfg.optim.grad_accum = 2
    cfg.optim.max_steps = STEPS
    cfg.optim.warmup_steps = 1
    cfg.eval.every = 2
    cfg.log.progress = False
    assert cfg.model.head.dropout > 0
    return cfg


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")) + sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"parameters differ after resume: {different[:5]}"
    sa = torch.load(a / "trainer_state.pt", weights_only=True)
    sb = torch.load(b / "trainer_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == STEPS
    for key, state in sa["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], sb["optimizer"]["state"][key]["exp_avg_sq"]), key


def _train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "split" not in x}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted full fine-tuning run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    Trainer(_cfg(run)).fit()
    return run


@pytest.mark.parametrize("name", ["tiny", "tiny-lora"])
def test_stop_and_resume_matches_uninterrupted(name, straight, tmp_path):
    if name == "tiny":
        reference = straight
    else:
        reference = tmp_path / "straight"
        Trainer(_cfg(reference, name)).fit()

    run = tmp_path / "stopped"
    first = _cfg(run, name)
    first.stop_at_step = 2
    assert Trainer(first).fit()["step"] == 2
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000002"]

    second = _cfg(run, name)
    second.resume = True  # a new trainer, as a new process would build it
    trainer = Trainer(second)
    assert trainer.step == 2
    assert trainer.fit()["step"] == STEPS
    _assert_same(latest_checkpoint(reference / "checkpoints"), latest_checkpoint(run / "checkpoints"))
    assert _train_losses(run) == _train_losses(reference)  # metrics of the resumed run continue seamlessly


def test_sigkilled_process_resumes_exactly(straight, tmp_path, sigkill_after_first_checkpoint):
    run = tmp_path / "killed"
    sigkill_after_first_checkpoint(run, ["--preset", "tiny", "--data.synthetic", "16", "--optim.batch_size", "4",
                                         "--optim.grad_accum", "2", "--optim.max_steps", str(STEPS),
                                         "--optim.warmup_steps", "1", "--eval.every", "2", "--checkpoint.every", "1",
                                         "--checkpoint.keep", "0", "--log.progress", "false"], STEPS)
    cfg = _cfg(run)
    cfg.resume = True
    trainer = Trainer(cfg)
    assert 0 < trainer.step < STEPS
    trainer.fit()
    _assert_same(latest_checkpoint(straight / "checkpoints"), latest_checkpoint(run / "checkpoints"))


def test_ctrl_c_names_the_newest_checkpoint_and_resumes_from_it(straight, tmp_path, capsys, monkeypatch):
    from grmserve.training.components import TrainStep
    from grmserve.training.trainer import INTERRUPTED
    from grmserve.training.trainer import main as train_main

    real_step, done = TrainStep.__call__, []

    def ctrl_c_at_the_fourth_step(self, batches):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(1)
        return real_step(self, batches)

    monkeypatch.setattr(TrainStep, "__call__", ctrl_c_at_the_fourth_step)
    run = tmp_path / "interrupted"
    args = ["--preset", "tiny", "--run_dir", str(run), "--data.synthetic", "16", "--optim.batch_size", "4",
            "--optim.grad_accum", "2", "--optim.max_steps", str(STEPS), "--optim.warmup_steps", "1",
            "--eval.every", "2", "--checkpoint.every", "2", "--log.progress", "false"]
    assert train_main(args) == INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"grm-train: interrupted at step 3; the newest checkpoint is step 2 in {run / 'checkpoints'}" in err
    assert "rerun the same command with --resume" in err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000002"]
    monkeypatch.undo()
    assert train_main([*args, "--resume"]) == 0
    _assert_same(latest_checkpoint(straight / "checkpoints"), latest_checkpoint(run / "checkpoints"))


def test_a_damaged_trainer_state_is_named_not_a_traceback(tmp_path, capsys):
    from grmserve.training.core.configtools import USER_ERROR
    from grmserve.training.trainer import main as train_main

    run = tmp_path / "run"
    args = ["--preset", "tiny", "--run_dir", str(run), "--data.synthetic", "16", "--optim.batch_size", "4",
            "--optim.max_steps", "2", "--eval.every", "0", "--log.progress", "false"]
    assert train_main(args) == 0
    state = latest_checkpoint(run / "checkpoints") / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a copy cut short
    capsys.readouterr()
    assert train_main([*args, "--resume"]) == USER_ERROR
    err = capsys.readouterr().err
    assert f"grm-train: {state}: damaged (" in err and "Traceback" not in err
    assert "resume from an earlier checkpoint" in err


def test_ctrl_c_while_loading_is_one_line(tmp_path, capsys, monkeypatch):
    from grmserve.training import trainer as trainer_module

    def interrupted_load(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "build_model", interrupted_load)
    code = trainer_module.main(["--preset", "tiny", "--run_dir", str(tmp_path / "run"), "--data.synthetic", "16"])
    err = capsys.readouterr().err
    assert code == trainer_module.INTERRUPTED and "Traceback" not in err
    assert "grm-train: interrupted before the first step; nothing was trained" in err
