"""The public command lines of the training-side commands (grm-serve's and grm-train's are frozen in
tests/server/test_cli.py and tests/training/test_train_config.py). Every command uses the flags
generated from its config dataclass (`--dotted.name`), spells dtypes fp32/bf16, and exits 2 with a
one-line reason on a user error. Changing a list here breaks users' scripts: do it on purpose."""

from __future__ import annotations

import pytest

from grmserve.training.bon import BonConfig
from grmserve.training.core.assets import AssetsConfig
from grmserve.training.core.configtools import iter_leaves
from grmserve.training.evaluate import EvalRunConfig
from grmserve.training.evaluate import main as eval_main
from grmserve.training.experiment import ExperimentConfig
from grmserve.training.ppo.cli import main as ppo_main
from grmserve.training.ppo.config import PPOConfig
from grmserve.training.quantize import QuantizeConfig
from grmserve.training.quantize import main as quantize_main

FLAGS = {
    EvalRunConfig: ["--model", "--data", "--split", "--batch_size", "--max_tokens", "--truncate", "--limit",
                    "--device", "--dtype", "--output"],
    ExperimentConfig: ["--out", "--backbone", "--tiny_layers", "--data_dir", "--top_layers", "--lora_r", "--lora_alpha",
                       "--head.type", "--head.hidden", "--head.dropout", "--head.bias", "--train_prompts",
                       "--test_prompts", "--max_tokens", "--methods", "--noise", "--epochs", "--batch_size", "--lr",
                       "--head_lr", "--warmup_ratio", "--clip", "--alpha", "--beta", "--seed", "--precision",
                       "--fp8_recipe",
                       "--feature_tokens",
                       "--export", "--export_to"],
    QuantizeConfig: ["--src", "--out", "--recipe", "--keep_columns", "--keep_sensitive", "--rounding",
                     "--max_bytes_ratio", "--calibration", "--calibration_data"],
    AssetsConfig: ["--tokenizer_only"],
    BonConfig: ["--input", "--output", "--n", "--batch_prompts", "--overlap", "--eval", "--policy.model",
                "--policy.url",
                "--policy.temperature", "--policy.top_p", "--policy.max_tokens", "--policy.seed", "--policy.dtype",
                "--policy.max_model_len", "--policy.kv_cache_gib", "--reward.target", "--reward.timeout",
                "--reward.wait_seconds", "--reward.concurrency", "--reward.truncate", "--curve.out", "--curve.splits",
                "--curve.prompts", "--curve.samples", "--curve.reward_models", "--curve.seed"],
    PPOConfig: ["--run_dir", "--seed", "--device", "--threads", "--steps", "--resume", "--stop_at_step",
                "--policy.backbone", "--policy.tiny_hidden_size", "--policy.tiny_layers", "--policy.lora.enabled",
                "--policy.lora.r", "--policy.lora.alpha", "--policy.lora.dropout", "--policy.lora.target_modules",
                "--policy.value_head_init_std", "--reward.address", "--reward.timeout_s", "--reward.patience_s",
                "--reward.wait_ready_s", "--reward.token", "--reward.chat", "--reward.truncate", "--reward.whiten",
                "--reward.clip", "--reward.missing_eos_penalty", "--rollout.batch_size", "--rollout.chunk_size",
                "--rollout.overlap", "--rollout.max_new_tokens", "--rollout.max_prompt_tokens", "--rollout.temperature",
                "--rollout.top_k", "--data.prompts", "--data.split", "--data.limit", "--kl.mode", "--kl.coef",
                "--kl.target", "--kl.horizon", "--kl.estimator", "--ppo.epochs", "--ppo.minibatch_size",
                "--ppo.grad_accum", "--ppo.gamma", "--ppo.lam", "--ppo.clip", "--ppo.value_clip", "--ppo.value_coef",
                "--ppo.entropy_coef", "--ppo.whiten_advantages", "--optim.lr", "--optim.value_lr",
                "--optim.warmup_steps", "--optim.min_lr_ratio", "--optim.weight_decay", "--optim.betas", "--optim.eps",
                "--optim.grad_clip", "--precision.mode", "--precision.fp8_recipe", "--precision.fp8_backend",
                "--precision.fp8_master", "--precision.fp8_fuse", "--precision.fp8_embedding_gather",
                "--precision.fp8_reduce_scatter", "--precision.fp8_root_reduce_scatter", "--eval.every",
                "--eval.split", "--eval.prompts", "--eval.samples",
                "--eval.batch_size", "--eval.seed", "--checkpoint.every", "--checkpoint.keep",
                "--checkpoint.export_policy", "--log.progress"],
}


@pytest.mark.parametrize("config", list(FLAGS), ids=lambda c: c.__name__)
def test_flags_are_frozen(config):
    assert [f"--{dotted}" for dotted, _, _ in iter_leaves(config)] == FLAGS[config]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, tiny_checkpoint):
    assert eval_main(["--model", str(tmp_path / "missing"), "--data", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grm-eval: ") and "\n" not in err and "missing" in err
    with pytest.raises(SystemExit) as exit_:
        eval_main(["--model", str(tiny_checkpoint), "--data", "x.jsonl", "--dtype", "bfloat16"])  # fp32 or bf16
    assert exit_.value.code == 2 and "invalid choice: 'bfloat16'" in capsys.readouterr().err
    assert quantize_main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grm-quantize: ") and "missing" in err
    assert ppo_main(["--preset", "tiny", "--run_dir", str(tmp_path / "ppo"), "--data.prompts",
                     str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grm-ppo: ") and "\n" not in err and "none.jsonl" in err
