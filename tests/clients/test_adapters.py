"""The RL-framework adapters against a real reward server: TRL's real GRPOTrainer trains a tiny
policy with them as its reward functions (sync and async), TRL's sample formats become the right
pairs, and verl's compute_score scores a sample like the client does."""

from __future__ import annotations

import asyncio
import math
import pickle

import pytest

from grmserve.clients.adapters import AsyncTRLReward, TRLReward, VerlReward, compute_score, trl_pairs
from grmserve.clients.reward_client import RewardServerError

from ..server.test_reward_server import metric_value, scrape

USER = [{"role": "user", "content": "Name a colour."}]


def test_trl_sample_formats_become_pairs():
    assert trl_pairs(["Q: 2+2? A:"], [" 4"]) == [("Q: 2+2? A:", " 4")]
    assert trl_pairs([USER], [[{"role": "assistant", "content": "Blue."}]]) == [(USER, "Blue.")]
    tool_turns = [{"role": "assistant", "content": "", "tool_calls": [{"name": "palette"}]},
                  {"role": "tool", "content": "blue"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    assert trl_pairs([USER], [tool_turns]) == [(USER + [{"role": "assistant", "content": ""},
                                                        {"role": "tool", "content": "blue"}], "Blue.")]
    with pytest.raises(ValueError, match=r"completions\[0\]"):
        trl_pairs([USER], [[{"role": "user", "content": "not an answer"}]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        trl_pairs(["a", "b"], ["c"])


def test_adapters_score_like_the_client_and_raise_on_errors(server):
    prompts = [USER, USER, "Plain prompt:"]
    completions = [[{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Seven."}], " text"]
    with server.client() as c:
        want = c.score([(USER, "Blue."), (USER, "Seven."), ("Plain prompt:", " text")])
    reward = TRLReward(server.target)
    assert reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 3) == pytest.approx(want, abs=1e-5)
    assert asyncio.run(AsyncTRLReward(server.target)(prompts=prompts, completions=completions)) == pytest.approx(
        want, abs=1e-5)
    assert pickle.loads(pickle.dumps(reward))(prompts=prompts[:1], completions=completions[:1]) == pytest.approx(
        want[:1], abs=1e-5)
    verl = compute_score("gsm8k", "Blue.", "blue", {"question": "Name a colour.", "index": 0}, target=server.target,
                         reward_router_address=None)  # extra kwargs verl passes are ignored
    assert verl == pytest.approx(want[0], abs=1e-5)
    with pytest.raises(ValueError, match="extra_info has none of"):
        VerlReward(server.target)("gsm8k", "Blue.", "blue", {"index": 0})
    with pytest.raises(RewardServerError, match=server.target):  # an error raises, never a silent None
        reward(prompts=[USER], completions=[[{"role": "assistant", "content": ""}]])


def tiny_policy(path, tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    from grmserve.training.core import assets

    torch.manual_seed(0)
    model = LlamaForCausalLM(assets.tiny_llama_config(len(tokenizer), hidden_size=64, layers=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_trl_grpo_trainer_trains_with_the_reward_server(server, tokenizer, tmp_path):
    """TRL's real GRPOTrainer, 2 steps on a tiny random Llama policy (CPU), with the sync and the
    async adapter as its two reward functions: both are called, both see the same scores."""
    trl = pytest.importorskip("trl", reason="trl is the `rl` extra: pip install 'grm-serve[rl]'")
    from datasets import Dataset

    policy = tiny_policy(tmp_path / "policy", tokenizer)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Describe topic {i}."}] for i in range(8)]})
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=8, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to="none",
                          save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    before = metric_value(scrape(server), "grm_serve_pairs_scored_total")
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[TRLReward(server.target), AsyncTRLReward(server.target)],
                              args=args, train_dataset=prompts, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [entry for entry in trainer.state.log_history if "rewards/grm_reward/mean" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["rewards/grm_reward/mean"])
        assert entry["rewards/grm_reward/mean"] == pytest.approx(entry["rewards/grm_reward_async/mean"], abs=1e-5)
    scored = metric_value(scrape(server), "grm_serve_pairs_scored_total") - before
    assert scored == 2 * 2 * 2  # 2 steps × 2 completions × 2 reward functions
