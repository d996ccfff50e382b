"""Named training configs, and `grm-train`'s command line built on them. A preset is a function
returning a `TrainConfig`; command-line flags override it (`grm-train --preset tiny --optim.lr 3e-3`).

    >>> cfg = tiny()
    >>> cfg.model.backbone, cfg.data.synthetic > 0
    ('tiny', True)
    >>> cfg = parse_config(["--preset", "tiny", "--optim.lr", "3e-4", "--loss.regulariser", "dpo"])
    >>> cfg.optim.lr, cfg.loss.regulariser, cfg.model.backbone
    (0.0003, 'dpo', 'tiny')
"""

from __future__ import annotations

import argparse
from typing import Callable

from .config import TrainConfig
from .core.configtools import parse_preset_args, preset_parser
from .core.model import HeadConfig


def tiny() -> TrainConfig:
    """The whole path on CPU in seconds: a random 2-layer Llama (SmolLM2's tokenizer) trained with
    BT + SFT regulariser on generated, separable preference pairs."""
    cfg = TrainConfig(run_dir="runs/tiny", device="cpu")
    cfg.model.backbone = "tiny"
    cfg.model.name = "tiny-grm"
    cfg.model.head = HeadConfig(type="mlp", hidden=32, dropout=0.1)
    cfg.data.synthetic = 64
    cfg.data.max_tokens = 128
    cfg.loss.regulariser = "sft"
    cfg.optim.lr = 2e-3
    cfg.optim.warmup_steps = 2
    cfg.optim.batch_size = 8
    cfg.optim.max_steps = 24
    cfg.optim.min_lr_ratio = 0.1
    cfg.eval.every = 8
    cfg.eval.batch_size = 16
    return cfg


def tiny_lora() -> TrainConfig:
    """`tiny` with LoRA adapters on the attention projections (reward head fully trained)."""
    cfg = tiny()
    cfg.run_dir = "runs/tiny-lora"
    cfg.model.lora.enabled = True
    cfg.model.lora.r = 8
    cfg.model.lora.alpha = 16
    cfg.model.lora.target_modules = ["q_proj", "v_proj"]
    cfg.optim.lr = 5e-3
    return cfg


def tiny_dpo() -> TrainConfig:
    """`tiny` with the DPO regulariser against a frozen copy of the initial LM."""
    cfg = tiny()
    cfg.run_dir = "runs/tiny-dpo"
    cfg.loss.regulariser = "dpo"
    return cfg


def smollm2() -> TrainConfig:
    """Full fine-tuning of SmolLM2-135M-Instruct (the default backbone) with GRM's SFT regulariser,
    bf16 autocast where bf16 is fast, else fp32 (`auto`). Pass the data with `--data.train PATH [--data.eval PATH]`."""
    cfg = TrainConfig(run_dir="runs/smollm2-grm")
    cfg.model.backbone = "smollm2"
    cfg.model.name = "smollm2-grm"
    cfg.model.gradient_checkpointing = True
    cfg.data.max_tokens = 1024
    cfg.loss.regulariser = "sft"
    cfg.loss.alpha = 0.01
    cfg.loss.beta = 0.1
    cfg.optim.lr = 1e-5
    cfg.optim.warmup_steps = 20
    cfg.optim.weight_decay = 0.0
    cfg.optim.batch_size = 16
    cfg.optim.grad_accum = 4
    cfg.precision.mode = "auto"
    cfg.checkpoint.every = 200
    cfg.eval.every = 100
    return cfg


def smollm2_lora() -> TrainConfig:
    """LoRA (r=32) on all SmolLM2 linear layers, reward head fully trained; GRM SFT regulariser."""
    cfg = smollm2()
    cfg.run_dir = "runs/smollm2-grm-lora"
    cfg.model.name = "smollm2-grm-lora"
    cfg.model.lora.enabled = True
    cfg.model.lora.r = 32
    cfg.model.lora.alpha = 64
    cfg.optim.lr = 1e-4
    return cfg


def smollm2_dpo() -> TrainConfig:
    """SmolLM2 full fine-tuning with GRM's DPO regulariser (frozen reference = the initial LM)."""
    cfg = smollm2()
    cfg.run_dir = "runs/smollm2-grm-dpo"
    cfg.loss.regulariser = "dpo"
    return cfg


def smollm2_baseline() -> TrainConfig:
    """The baseline GRM is compared with: SmolLM2 trained with the Bradley-Terry loss alone."""
    cfg = smollm2()
    cfg.run_dir = "runs/smollm2-bt"
    cfg.model.name = "smollm2-bt"
    cfg.loss.regulariser = "none"
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    f.__name__.replace("_", "-"): f
    for f in (tiny, tiny_lora, tiny_dpo, smollm2, smollm2_lora, smollm2_dpo, smollm2_baseline)
}
"""Presets by command-line name (`--preset smollm2-lora`)."""


# ---------------------------------------------------------------------------------------------
# The command line: CLI > preset > default


def build_parser(presets: dict[str, Callable[[], TrainConfig]] | None = None) -> argparse.ArgumentParser:
    """The `grm-train` argument parser (config flags plus --preset and --print_config)."""
    return preset_parser(TrainConfig, presets if presets is not None else PRESETS, prog="grm-train",
                         description="Train a GRM reward model (Bradley-Terry + text-generation regulariser). "
                                     "Flags override the preset, which overrides the defaults.",
                         preset_help="named starting config (see grmserve.training.presets)")


def parse_config(argv: list[str] | None = None, *, presets: dict[str, Callable[[], TrainConfig]] | None = None,
                 validate: bool = False) -> TrainConfig:
    """Resolve a `TrainConfig` from command-line arguments: CLI > preset > default."""
    cfg, _ = parse_args(argv, presets=presets)
    return cfg.validate() if validate else cfg


def parse_args(argv: list[str] | None = None, *, presets: dict[str, Callable[[], TrainConfig]] | None = None
               ) -> tuple[TrainConfig, argparse.Namespace]:
    presets = presets if presets is not None else PRESETS
    return parse_preset_args(build_parser(presets), TrainConfig, presets, argv)
