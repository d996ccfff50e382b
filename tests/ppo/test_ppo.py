"""grm-ppo: its loss pieces against hand computations, and tiny-preset runs against a real reward
server on a loopback port (a tiny random GRM): a run completes its steps; a SIGKILLed run resumes to
the same parameters as an uninterrupted one; a server killed and restarted mid-run is ridden out; a
server that never comes back ends the run with the address, the time waited and an intact checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from grmserve.training.ppo.cli import SERVICE_DOWN
from grmserve.training.ppo.cli import main as ppo_main
from grmserve.training.ppo.losses import (
    KLController,
    explained_variance,
    gae,
    kl_estimate,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from grmserve.training.ppo.presets import tiny
from grmserve.training.ppo.rollout import ScoreError, check_scores, collate
from grmserve.training.ppo.trainer import PPOTrainer
from grmserve.training.trainer import latest_checkpoint

from ..processes import free_port, start_grm_serve
from ..server.conftest import ServerThread, tiny_config

# -- loss pieces, by hand ---------------------------------------------------------------------


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding: its reward and value are ignored
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1: delta = 1 + 0.9 * 0 - 0.2 = 0.8 (the value after the last token is 0); A1 = 0.8
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32; A0 = -0.32 + 0.9 * 0.8 * 0.8 = 0.256
    close(adv, [[0.256, 0.8, 0.0]])
    close(ret, [[0.756, 1.0, 0.0]])


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    close(r, [[-0.05, -0.1, 2.0 - 0.15], [-1.0 - 0.2, 0.0, 0.0]])


def test_clipped_policy_loss_by_hand():
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, frac = policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # ratios e^0.5 = 1.6487 and e^-0.5 = 0.6065; per token max(-A r, -A clip(r, 0.8, 1.2)):
    hand = [max(-math.exp(0.5), -1.2), max(-math.exp(-0.5), -0.8), max(math.exp(0.5), 1.2), max(math.exp(-0.5), 0.8)]
    assert loss.item() == pytest.approx(sum(hand) / 4)
    assert frac.item() == pytest.approx(0.5)  # the clip binds on tokens 1 and 4


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.5, 0.9]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    loss, frac = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 1: V_clip = 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64; token 2: V_clip = 0.9: max(0.81, 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # log r = ref - logp = -1
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_agree_in_expectation():
    """Over samples of pi, k1 and k3 both average to KL(pi || ref) (k3 with lower variance)."""
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (pi * (pi / ref).log()).sum().item()
    x = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for est in ("k1", "k3"):
        assert kl_estimate(pi.log()[x], ref.log()[x], est).mean().item() == pytest.approx(exact, abs=0.01)


def test_whitening_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # mean 2, unbiased variance 1 over the masked values
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    assert whiten(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)


def test_explained_variance_and_kl_controller():
    mask = torch.ones(1, 4)
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0)
    c = KLController(0.1, mode="adaptive", target=6.0, horizon=100)
    assert c.update(kl=3.0, n=10) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # error -0.5 clipped to -0.2
    assert c.update(kl=6.6, n=10) == pytest.approx(0.098 * (1 + 0.1 * 10 / 100))
    fixed = KLController(0.1, mode="fixed")
    assert fixed.update(kl=100.0, n=10) == 0.1


def test_malformed_scores_are_errors_never_zeros():
    assert check_scores([0.5, -2.0], expected=2, target="rm:1") == [0.5, -2.0]
    for bad in ([float("nan"), 1.0], [1.0, float("inf")]):
        with pytest.raises(ScoreError, match="rm:1.*non-finite"):
            check_scores(bad, expected=2, target="rm:1")
    with pytest.raises(ScoreError, match="1 scores for 2 pairs"):
        check_scores([1.0], expected=2, target="rm:1")


def test_collate_left_pads_prompts_and_right_pads_responses():
    c = collate([[5, 6, 7], [8]], [[1, 2], [3]], pad_id=0)
    assert c.input_ids.tolist() == [[5, 6, 7, 1, 2], [0, 0, 8, 3, 0]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert c.mask.tolist() == [[1.0, 1.0], [1.0, 0.0]] and c.start == 3


# -- runs against a real reward server ----------------------------------------------------------


def tiny_run(run_dir: Path, address: str, **over) -> list[str]:
    """grm-ppo flags for a small tiny-preset run (one scoring request per step: with one request the
    server batches the same rows every time, so the scores and the run are deterministic)."""
    flags = {"run_dir": run_dir, "reward.address": address, "steps": 4, "rollout.batch_size": 4,
             "rollout.chunk_size": 4, "ppo.minibatch_size": 2, "ppo.grad_accum": 2, "rollout.max_new_tokens": 6,
             "eval.every": 2, "eval.prompts": 2, "checkpoint.every": 2, "log.progress": "false",
             "reward.wait_ready_s": 30, **over}
    return ["--preset", "tiny", *[x for k, v in flags.items() for x in (f"--{k}", str(v))]]


def trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "trainable.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rm_server(tiny_checkpoint):
    """A reward server without its prefix cache: a prompt's score then never depends on which earlier
    calls left its KV cache behind (a cached prefix is exact only to float rounding)."""
    cfg = tiny_config(tiny_checkpoint)
    cfg.batch.prefix_cache_mib = 0
    st = ServerThread(cfg).start()
    yield st
    st.stop()


def test_tiny_run_completes_and_sigkill_resume_is_exact(rm_server, tmp_path):
    """An uninterrupted run logs every step and the gold reward; a run SIGKILLed after its first
    checkpoint and resumed ends with bit-identical trainable parameters and optimizer state."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert ppo_main(tiny_run(whole, rm_server.target)) == 0
    lines = metrics(whole)
    steps = [m for m in lines if "split" not in m]
    evals = [m for m in lines if m.get("split") == "eval"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["step"] for m in evals] == [0, 2, 4]
    for key in ("score_mean", "score_std", "kl", "entropy", "clip_fraction", "value_loss", "explained_variance",
                "time_generate_s", "time_score_wait_s", "time_update_s", "score_wait_fraction"):
        assert all(math.isfinite(m[key]) for m in steps), key
    assert all(0 <= m["gold_greedy"] <= 1 and 0 <= m["gold_sampled"] <= 1 for m in evals)

    cmd = [sys.executable, "-m", "grmserve.training.ppo.cli", *tiny_run(cut, rm_server.target)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(cut / "checkpoints") is None:
            assert proc.poll() is None, f"grm-ppo exited ({proc.returncode}): {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    killed_at = latest_checkpoint(cut / "checkpoints")
    if killed_at.name == "step-0000004":
        pytest.skip("the run finished before it could be killed")
    assert ppo_main(tiny_run(cut, rm_server.target, resume="true")) == 0
    a, b = trainable(whole), trainable(cut)
    assert sorted(a) == sorted(b) and any("lora" in k for k in a) and "v_head.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state_a = torch.load(latest_checkpoint(whole / "checkpoints") / "trainer_state.pt", weights_only=True)
    state_b = torch.load(latest_checkpoint(cut / "checkpoints") / "trainer_state.pt", weights_only=True)
    assert state_a["kl"] == state_b["kl"] and state_a["step"] == state_b["step"] == 4
    assert [m["step"] for m in metrics(cut) if "split" not in m] == [1, 2, 3, 4]  # no step logged twice


def test_server_killed_and_restarted_mid_run(tiny_checkpoint, tmp_path):
    """SIGKILL the grm-serve process after step 1; while it is down the run's scoring calls fail and are
    retried; a new grm-serve on the same port answers them and the run completes every step."""
    port = free_port()
    server, _ = start_grm_serve(tiny_checkpoint, "--server.port", str(port), threads=1)
    run_dir = tmp_path / "run"
    cfg_args = tiny_run(run_dir, f"127.0.0.1:{port}", steps=4, **{"eval.every": 0, "reward.patience_s": 120})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=ppo_main(cfg_args)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not metrics(run_dir):
            assert thread.is_alive() and time.monotonic() < deadline, "the run made no step"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        time.sleep(2.0)  # the run's next scoring call meets a closed port
        server, _ = start_grm_serve(tiny_checkpoint, "--server.port", str(port), threads=1)
        thread.join(180)
        assert not thread.is_alive() and result["rc"] == 0
    finally:
        server.kill()
        server.wait(30)
    steps = [m for m in metrics(run_dir) if "split" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert max(m["time_score_wait_s"] for m in steps[1:]) > 1.0  # one step waited out the restart


def test_server_that_never_comes_back_ends_the_run(tiny_checkpoint, tmp_path, capsys):
    """The server goes away after step 2 for good: the run ends after reward.patience_s with exit
    status 3, naming the address and how long it waited; the checkpoint left behind is complete."""
    st = ServerThread(tiny_config(tiny_checkpoint)).start()
    run_dir = tmp_path / "run"
    target = st.target
    args = tiny_run(run_dir, target, steps=20, **{"eval.every": 0, "reward.patience_s": 3,
                                                  "checkpoint.every": 2})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=ppo_main(args)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run_dir / "checkpoints") is None:
            assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
    finally:
        st.stop()
    thread.join(120)
    assert not thread.is_alive() and result["rc"] == SERVICE_DOWN
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("grm-ppo: "))
    assert f"the reward server at {target} did not answer for" in line and "patience" in line
    assert "--resume" in line
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    saved_step = int(ckpt.name.split("-")[1])
    assert 2 <= saved_step < 20 and str(ckpt) in line
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # no half-written folder
    # the checkpoint is whole: a resumed trainer loads it and continues from its step
    cfg_args = tiny_run(run_dir, target, steps=20, resume="true")
    from grmserve.training.ppo.presets import parse_config

    trainer = PPOTrainer(parse_config(cfg_args))
    try:
        assert trainer.step == saved_step
        assert len([m for m in metrics(run_dir) if "split" not in m]) == saved_step
    finally:
        trainer.close()


def test_bad_config_exits_2(tmp_path, capsys):
    assert ppo_main(["--preset", "tiny", "--run_dir", str(tmp_path), "--rollout.batch_size", "6",
                     "--ppo.minibatch_size", "4"]) == 2
    assert "multiple of ppo.minibatch_size" in capsys.readouterr().err


def test_tiny_preset_is_small():
    cfg = tiny().validate()
    assert cfg.policy.backbone == "tiny" and cfg.policy.lora.enabled and cfg.device == "cpu"


@pytest.mark.parametrize("name", ["config", "presets", "losses", "rollout", "trainer", "cli"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"grmserve.training.ppo.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


@pytest.mark.parametrize("flags", [["--precision.mode", "bf16"],
                                   ["--policy.lora.enabled", "false", "--precision.mode", "fp8-o2",
                                    "--precision.fp8_master", "fp16"]],
                         ids=["bf16-lora", "fp8-o2-full"])
def test_precision_plans_train_and_export_a_plain_policy(rm_server, tmp_path, flags):
    """The trainer's precision plan: bf16 autocast (LoRA) and FP8-LM O2 with FP16 masters (full
    fine-tuning, the reference a frozen copy) both take steps and checkpoint; the exported policy is a
    plain float32 Hugging Face model either way (FP8 layers and FP16 masters turned back into
    `nn.Linear` / `nn.Embedding`, the embedding still tied), which is what vLLM loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = tiny_run(tmp_path / "run", rm_server.target, steps=2,
                    **{"eval.every": 0, "checkpoint.export_policy": "true"})
    assert ppo_main(args + flags) == 0
    steps = [m for m in metrics(tmp_path / "run") if "split" not in m]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["policy_loss"]) for m in steps)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000002"
    saved = load_file(str(tmp_path / "run" / "policy" / "model.safetensors"))
    assert all(k.endswith((".weight", ".bias")) and v.dtype == torch.float32 for k, v in saved.items()), sorted(saved)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    if "fp8-o2" in flags:  # the exported values are the training masters' (FP16 values times their scales)
        state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints") / "trainer_state.pt",
                           weights_only=True)["model"]
        q_proj = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))
        embed = next(k for k in state if k.endswith("embed_tokens.fp16_master.weight"))
        assert torch.equal(policy.model.layers[0].self_attn.q_proj.weight,
                           state[q_proj].float() * state[q_proj + "_scale_inv"])
        assert torch.equal(policy.model.embed_tokens.weight, state[embed].float() * state[embed + "_scale_inv"])


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    """With LoRA there is no second copy of the model: the reference log-probs are the policy's with its
    adapters switched off, so they equal the policy's at the start and stay put when the adapters move."""
    from grmserve.training.ppo.presets import parse_config

    trainer = PPOTrainer(parse_config(tiny_run(tmp_path / "run", "127.0.0.1:1")))
    try:
        assert trainer.ref_lm is None
        prompts, responses = trainer.prompt_ids[:2], [[5, 6, 7], [8, 9]]
        logp, _, ref, _ = trainer.forward_rollouts(prompts, responses)
        for a, b in zip(logp, ref):
            assert torch.equal(a, b)  # LoRA B starts at zero
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        logp2, _, ref2, _ = trainer.forward_rollouts(prompts, responses)
        assert all(torch.equal(a, b) for a, b in zip(ref, ref2))
        assert not all(torch.allclose(a, b) for a, b in zip(logp2, ref2))
    finally:
        trainer.close()


def test_an_update_whose_gradients_overflow_is_skipped_and_counted(tmp_path):
    """An inf/NaN gradient norm skips the optimizer step (torch's AdamW would write NaN into every
    weight); the count is in the update's stats and the checkpoint."""
    from types import SimpleNamespace

    from grmserve.training.ppo.presets import parse_config

    trainer = PPOTrainer(parse_config(tiny_run(tmp_path / "run", "127.0.0.1:1")))
    try:
        params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}

        def overflowing_micro_step(ro, rows, count):
            for p in params.values():
                p.grad = torch.full_like(p, float("inf"))
            return {"policy_loss": float("inf")}

        trainer.micro_step = overflowing_micro_step
        stats = trainer.update(SimpleNamespace(prompts=list(range(4))), step=0)
        updates = trainer.cfg.ppo.epochs * 2  # 4 rollouts in minibatches of 2
        assert stats["skipped_steps"] == trainer.skipped_steps == updates and not math.isfinite(stats["grad_norm"])
        assert all(torch.equal(before[n], p.detach()) for n, p in params.items())
        assert not trainer.optimizer.state  # never stepped: no moments to hold a NaN
        ckpt = trainer.save_checkpoint()
        trainer.skipped_steps = 0
        trainer.load_checkpoint(ckpt)
        assert trainer.skipped_steps == updates
    finally:
        trainer.close()


def test_ctrl_c_is_one_line_with_how_to_go_on(tmp_path, capsys, monkeypatch):
    from grmserve.training.core.configtools import INTERRUPTED

    def interrupted_fit(self):
        self.step = 3
        raise KeyboardInterrupt

    monkeypatch.setattr(PPOTrainer, "fit", interrupted_fit)
    assert ppo_main(tiny_run(tmp_path / "run", "127.0.0.1:1")) == INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "grm-ppo: interrupted at step 3; no checkpoint saved yet, so a rerun starts again" in err


def test_prompts_from_jsonl(tmp_path):
    from grmserve.training.ppo.rollout import load_prompt_rows

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Name a colour."}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    rows = load_prompt_rows(str(path), "train")
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": "Name a colour."}],
                                            [{"role": "user", "content": "Hi"}]]
    path.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1: a prompt row needs"):
        load_prompt_rows(str(path), "train")


def test_a_refused_call_is_an_error_not_a_retry(rm_server):
    """A call the server refuses (INVALID_ARGUMENT) is not retried and not scored as zero: ScoreError."""
    from grmserve.training.ppo.config import RewardConfig
    from grmserve.training.ppo.rollout import RemoteScorer

    scorer = RemoteScorer(RewardConfig(address=rm_server.target, patience_s=30))
    try:
        good = scorer.score([([{"role": "user", "content": "Hi"}], "Hello.")])
        assert len(good.scores) == 1 and math.isfinite(good.scores[0])
        with pytest.raises(ScoreError, match="INVALID_ARGUMENT"):  # retried, it would end in RewardServiceDown
            scorer.score([([{"role": "bogus", "content": "Hi"}], "Hello.")])
    finally:
        scorer.close()
