"""The training config tree, its generated CLI (frozen surface), presets and the precision hook."""

from __future__ import annotations

import doctest
import json
import re

import pytest
import torch

from grmserve.training import config as config_module
from grmserve.training import presets
from grmserve.training.components import lr_multiplier
from grmserve.training.config import PrecisionConfig, TrainConfig
from grmserve.training.core.configtools import USER_ERROR, from_dict, to_dict
from grmserve.training.evaluate import main as eval_main
from grmserve.training.precision import apply_precision
from grmserve.training.presets import build_parser, parse_config
from grmserve.training.trainer import main as train_main

# The public surface of `grm-train`. Changing it breaks users' scripts: update this list on purpose.
TRAIN_FLAGS = [
    "--checkpoint.every", "--checkpoint.final", "--checkpoint.keep", "--data.eval", "--data.eval_split",
    "--data.flip_fraction", "--data.limit", "--data.max_tokens", "--data.split", "--data.synthetic", "--data.train",
    "--data.truncate", "--device", "--dist.backend", "--dist.fsdp", "--eval.batch_size", "--eval.every", "--help",
    "--log.every", "--log.progress", "--loss.alpha", "--loss.beta", "--loss.label_smoothing", "--loss.margin",
    "--loss.regulariser", "--loss.reward", "--model.backbone", "--model.chat_template",
    "--model.gradient_checkpointing", "--model.head.bias", "--model.head.dropout", "--model.head.hidden",
    "--model.head.type", "--model.lora.alpha", "--model.lora.dropout", "--model.lora.enabled", "--model.lora.r",
    "--model.lora.target_modules", "--model.name", "--model.tiny_hidden_size", "--model.tiny_layers",
    "--optim.batch_size", "--optim.betas", "--optim.epochs", "--optim.eps", "--optim.grad_accum", "--optim.grad_clip",
    "--optim.head_lr", "--optim.lr", "--optim.max_steps", "--optim.min_lr_ratio", "--optim.warmup_steps",
    "--optim.weight_decay",
    "--precision.fp8_backend", "--precision.fp8_embedding_gather", "--precision.fp8_fuse", "--precision.fp8_master",
    "--precision.fp8_recipe", "--precision.fp8_reduce_scatter", "--precision.fp8_root_reduce_scatter",
    "--precision.mode", "--preset", "--print_config",
    "--resume", "--run_dir", "--seed", "--stop_at_step",
]
PRESET_NAMES = ["smollm2", "smollm2-baseline", "smollm2-dpo", "smollm2-lora", "tiny", "tiny-dpo", "tiny-lora"]


def test_cli_surface_is_frozen():
    parser = build_parser()
    flags = sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))
    assert flags == sorted(TRAIN_FLAGS)
    assert sorted(presets.PRESETS) == PRESET_NAMES


def test_every_flag_has_help_from_the_field_docstring():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help"
    lr = next(a for a in parser._actions if "--optim.lr" in a.option_strings)
    assert lr.help.startswith("Peak learning rate") and "default: 1e-05" in lr.help


def test_precedence_cli_over_preset_over_default():
    default = parse_config([])
    assert default.optim.lr == TrainConfig().optim.lr and default.model.backbone == "smollm2"
    tiny = parse_config(["--preset", "tiny"])
    assert tiny.optim.lr == presets.tiny().optim.lr != default.optim.lr
    assert tiny.loss.alpha == 0.01  # not set by the preset: the default
    cli = parse_config(["--preset", "tiny", "--optim.lr", "0.5", "--model.head.type", "linear"])
    assert cli.optim.lr == 0.5 and cli.model.head.type == "linear"
    assert cli.optim.max_steps == tiny.optim.max_steps  # untouched flags keep the preset's value


def test_value_parsing():
    cfg = parse_config(["--resume", "--model.lora.enabled", "false", "--model.lora.target_modules", "q_proj, v_proj",
                        "--optim.betas", "0.9,0.95", "--loss.regulariser", "dpo-noref"])
    assert cfg.resume is True and cfg.model.lora.enabled is False
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.betas == (0.9, 0.95) and cfg.loss.regulariser == "dpo-noref"
    with pytest.raises(SystemExit):
        parse_config(["--precision.mode", "fp16"])
    with pytest.raises(SystemExit):
        parse_config(["--optim.lr", "fast"])


def test_validate_says_what_to_change():
    with pytest.raises(ValueError, match="--data.train"):
        TrainConfig().validate()
    cfg = presets.tiny()
    cfg.model.head.type = "conv"
    with pytest.raises(ValueError, match="model.head.type"):
        cfg.validate()


def test_round_trip_and_presets_are_valid():
    for name, make in presets.PRESETS.items():
        cfg = make()
        assert from_dict(TrainConfig, to_dict(cfg)) == cfg, name
        if name.startswith("tiny"):
            cfg.validate()
        config_module.check_literals(cfg)


def test_print_config(capsys):
    assert train_main(["--preset", "tiny-lora", "--optim.lr", "0.25", "--print_config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.25 and printed["model"]["lora"]["enabled"] is True


def test_eval_cli_requires_model_and_data(capsys):
    with pytest.raises(SystemExit):
        eval_main([])
    assert "--model" in capsys.readouterr().err


def test_precision_modes_resolve_in_one_place():
    factory = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    plan = apply_precision(torch.nn.Linear(4, 4), factory, PrecisionConfig(mode="fp32"), device=torch.device("cpu"))
    with plan.autocast():
        assert plan.model(torch.ones(1, 4)).dtype == torch.float32
    plan = apply_precision(torch.nn.Linear(4, 4), factory, PrecisionConfig(mode="bf16"), device=torch.device("cpu"))
    assert plan.model.weight.dtype == torch.float32  # fp32 master weights
    with plan.autocast():
        assert plan.model(torch.ones(1, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp8_master fp32"):
        apply_precision(torch.nn.Linear(16, 16), factory, PrecisionConfig(mode="fp8-o3", fp8_master="fp16"),
                        device=torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8_embedding_gather=bf16 sets how fp8-o3"):
        apply_precision(torch.nn.Linear(16, 16), factory, PrecisionConfig(mode="fp8-o2", fp8_embedding_gather="bf16"),
                        device=torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8_root_reduce_scatter=bf16 sets how fp8-o3"):
        apply_precision(torch.nn.Linear(16, 16), factory, PrecisionConfig(mode="bf16", fp8_root_reduce_scatter="bf16"),
                        device=torch.device("cpu"))


def test_precision_options_a_mode_does_not_read_are_refused():
    factory = lambda m: torch.optim.AdamW(m.parameters(), lr=0.1)  # noqa: E731
    cpu, linear = torch.device("cpu"), lambda: torch.nn.Sequential(torch.nn.Linear(16, 16))  # noqa: E731
    refused = [(dict(mode="fp8-o1", fp8_master="fp16"), "fp8_master=fp16 sets the FP8 linears' master weights"),
               (dict(mode="fp8-o3", fp8_master="fp16"), "pass --precision.fp8_master fp32"),
               (dict(mode="bf16", fp8_recipe="block"), "fp8_recipe=block sets the FP8 scaling recipe, which "
                                                       "precision.mode=bf16 does not use"),
               (dict(mode="fp32", fp8_backend="scaled_mm"), "fp8_backend=scaled_mm sets the FP8 GEMM backend"),
               (dict(mode="fp8-o2", fp8_reduce_scatter="fp32"), "(only fp8-o3): drop it or pass "
                                                                "--precision.fp8_reduce_scatter e4m3")]
    for options, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_precision(linear(), factory, PrecisionConfig(**options), device=cpu)
    plan = apply_precision(linear(), factory,
                           PrecisionConfig(mode="fp8-o2", fp8_master="fp16", fp8_recipe="current", fp8_fuse="off"),
                           device=cpu)
    assert plan.fp8.converted == ["0"] and plan.model[0].weight.dtype == torch.float16


def test_fp8_without_a_linear_it_can_convert_is_refused_before_training():
    factory = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match=r"no linear layer of this model can compute in FP8 \(kept in high "
                                         r"precision: dims \(40, 40\) not multiples of 16\).*--precision.mode bf16"):
        apply_precision(torch.nn.Sequential(torch.nn.Linear(40, 40)), factory, PrecisionConfig(mode="fp8-o2"),
                        device=torch.device("cpu"))


def test_fp8_o3_with_gradient_checkpointing_is_refused():
    cfg = presets.smollm2()
    cfg.data.synthetic, cfg.precision.mode = 16, "fp8-o3"
    with pytest.raises(ValueError, match="re-run of each layer would record again.*"
                                         "--model.gradient_checkpointing false"):
        cfg.validate()
    cfg.model.gradient_checkpointing = False
    cfg.validate()
    cfg.model.gradient_checkpointing, cfg.precision.mode = True, "fp8-o2"  # replayed (test_train_fp8.py)
    cfg.validate()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
                    reason="this GPU runs torch._scaled_mm, so the backend is available")
def test_an_unavailable_fp8_backend_is_a_one_line_error(tmp_path, capsys):
    code = train_main(["--preset", "tiny", "--run_dir", str(tmp_path / "run"), "--precision.mode", "fp8-o2",
                       "--precision.fp8_backend", "scaled_mm"])
    err = capsys.readouterr().err
    assert code == USER_ERROR and "Traceback" not in err
    assert "grm-train: FP8 backend 'scaled_mm'" in err and "compute capability >= 8.9" in err and "'emulated'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fp8_o3_in_one_process_names_torchrun(tmp_path):
    from grmserve.training import presets
    from grmserve.training.trainer import Trainer

    cfg = presets.tiny()
    cfg.run_dir, cfg.data.synthetic, cfg.precision.mode = str(tmp_path / "run"), 16, "fp8-o3"
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        Trainer(cfg)


def test_warmup_cosine_schedule():
    values = [lr_multiplier(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_docstring_examples_run():
    from grmserve.training import evaluate, trainer

    for module in (config_module, presets, trainer, evaluate):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    assert train_main(["--preset", "tiny", "--run_dir", str(tmp_path / "run"), "--log.progress", "false"]) == 2
    assert "--resume" in capsys.readouterr().err
