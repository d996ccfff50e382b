"""Named `grm-ppo` configs, and its command line. A preset is a function returning a `PPOConfig`;
flags override it (`grm-ppo --preset tiny --reward.address localhost:50051 --steps 4`).

    >>> cfg = parse_config(["--preset", "tiny", "--kl.mode", "fixed", "--steps", "3"])
    >>> cfg.policy.backbone, cfg.kl.mode, cfg.steps
    ('tiny', 'fixed', 3)
"""

from __future__ import annotations

import argparse
from typing import Callable

from ..core.configtools import parse_preset_args, preset_parser
from .config import PPOConfig


def tiny() -> PPOConfig:
    """The whole path on CPU in seconds: a random 2-layer Llama policy (SmolLM2's tokenizer) with
    LoRA, short responses, a few steps, checkpoints every 2 steps, gold reward on 4 held-out prompts."""
    cfg = PPOConfig(run_dir="runs/ppo-tiny", device="cpu", steps=6)
    cfg.policy.backbone = "tiny"
    cfg.policy.lora.r, cfg.policy.lora.alpha = 8, 16
    cfg.policy.lora.target_modules = ["q_proj", "v_proj"]
    cfg.rollout.batch_size, cfg.rollout.chunk_size, cfg.rollout.max_new_tokens = 8, 4, 8
    cfg.ppo.epochs, cfg.ppo.minibatch_size, cfg.ppo.grad_accum = 2, 4, 2
    cfg.optim.lr = 1e-3
    cfg.data.limit = 64
    cfg.eval.every, cfg.eval.prompts, cfg.eval.batch_size = 3, 4, 4
    cfg.checkpoint.every = 2
    cfg.checkpoint.export_policy = False
    return cfg


def smollm2() -> PPOConfig:
    """SmolLM2-135M-Instruct with LoRA (r=32 on every linear layer, as the GRM paper's PPO), scored by
    the default GRM: 16 benchmark prompts per step, responses up to 48 tokens (the dataclass defaults)."""
    cfg = PPOConfig(run_dir="runs/ppo-smollm2")
    cfg.precision.mode = "auto"
    return cfg


def smollm2_full() -> PPOConfig:
    """SmolLM2 full fine-tuning (the reference is a frozen copy), smaller learning rate."""
    cfg = smollm2()
    cfg.run_dir = "runs/ppo-smollm2-full"
    cfg.policy.lora.enabled = False
    cfg.optim.lr = 3e-6
    cfg.optim.value_lr = 1e-4
    return cfg


PRESETS: dict[str, Callable[[], PPOConfig]] = {f.__name__.replace("_", "-"): f for f in (tiny, smollm2, smollm2_full)}
"""Presets by command-line name (`--preset smollm2-full`)."""
DEFAULT_PRESET = "smollm2"


def build_parser() -> argparse.ArgumentParser:
    """The `grm-ppo` argument parser (config flags plus --preset and --print_config)."""
    return preset_parser(PPOConfig, PRESETS, prog="grm-ppo", default_preset=DEFAULT_PRESET,
                         description="PPO on a causal-LM policy whose rollouts are scored remotely by grm-serve. "
                                     "Flags override the preset (default: smollm2), which overrides the defaults.",
                         preset_help="named starting config (see grmserve.training.ppo.presets)")


def parse_args(argv: list[str] | None = None) -> tuple[PPOConfig, argparse.Namespace]:
    return parse_preset_args(build_parser(), PPOConfig, PRESETS, argv)


def parse_config(argv: list[str] | None = None) -> PPOConfig:
    """A `PPOConfig` from command-line arguments: CLI > preset > default."""
    return parse_args(argv)[0]
