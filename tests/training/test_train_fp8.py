"""FP8 training through grm-train (FP8-LM O1/O2 on the precision plan): it learns, a stopped or
SIGKILLed run resumes bit for bit (master weights, FP8 scaling state, FP8 optimizer state), and the
checkpoint grm-serve loads holds exactly the E4M3 bytes training computed with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grmserve.training import presets
from grmserve.training.core.checkpoint import load_grm
from grmserve.training.core.fp8 import FP8InferenceLinear
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear, export_fp8_weights
from grmserve.training.trainer import Trainer, build_model, latest_checkpoint

STEPS = 5


def _cfg(run_dir: Path, mode: str = "fp8-o2", recipe: str = "delayed", master: str = "fp32"):
    cfg = presets.tiny()
    cfg.run_dir = str(run_dir)
    cfg.data.synthetic = 16
    cfg.optim.batch_size = 4
    cfg.optim.grad_accum = 2
    cfg.optim.max_steps = STEPS
    cfg.optim.warmup_steps = 1
    cfg.eval.every = 0
    cfg.log.progress = False
    cfg.precision.mode, cfg.precision.fp8_recipe, cfg.precision.fp8_master = mode, recipe, master
    return cfg


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _assert_same_state(a: Path, b: Path) -> None:
    sa = torch.load(a / "trainer_state.pt", weights_only=True)
    sb = torch.load(b / "trainer_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == STEPS
    for key, value in sa["model"].items():
        other = sb["model"][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert repr(value) == repr(other), key  # FP8 scaling state (amax history, scales, counters)
    assert sa["optimizer"]["fp8"] == sb["optimizer"]["fp8"]  # FP8AdamW's layout and skipped steps
    for key, state in sa["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(_bytes(tensor), _bytes(sb["optimizer"]["state"][key][name])), (key, name)
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(_bytes(wa[k]), _bytes(wb[k])) for k in wa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("fp8-straight") / "run"
    result = Trainer(_cfg(run)).fit()
    return run, result


def test_fp8_o2_trains_with_fp8_state_and_exports_the_trained_bytes(straight):
    run, result = straight
    state = torch.load(latest_checkpoint(run / "checkpoints") / "trainer_state.pt", weights_only=True)
    opt = next(iter(state["optimizer"]["state"].values()))
    assert opt["exp_avg"].dtype == torch.float8_e4m3fn and opt["exp_avg_sq"].dtype == torch.float16  # O2 state
    # Rebuild the training model from the trainer state: its FP8 layers' next-step bytes are the served bytes.
    model, _ = build_model(_cfg(run))
    from grmserve.training.core.fp8.training_linear import convert_to_fp8_training

    convert_to_fp8_training(model, "delayed", "emulated")
    model.load_state_dict(state["model"])
    served = load_file(str(latest_checkpoint(run / "checkpoints") / "model" / "model.safetensors"))
    trained = {n: m for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}
    assert len(trained) == 14  # 7 linears x 2 layers; the reward head, LM head and embeddings stay fp32
    for name, module in trained.items():
        key = name.removeprefix("lm.")
        assert served[f"{key}.weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(served[f"{key}.weight"].view(torch.uint8),
                           export_fp8_weights(module).weight.view(torch.uint8))
    loaded = load_grm(latest_checkpoint(run / "checkpoints") / "model").model
    assert sum(isinstance(m, FP8InferenceLinear) for m in loaded.modules()) == 14
    for name, module in trained.items():  # the static activation scale evaluation rounds inputs with
        want = export_fp8_weights(module).input_scale
        assert want is not None and torch.equal(loaded.get_submodule(name).input_scale, want)
    assert loaded.grm_config.quantization["trained"] == {"recipe": "delayed"}


@pytest.mark.parametrize("recipe,master", [("delayed", "fp32"), ("block", "fp32"), ("delayed", "fp16")])
def test_fp8_stop_and_resume_matches_uninterrupted(recipe, master, straight, tmp_path):
    """fp16: the FP8 linears' weights are the FP16 masters with their scales, gradients in FP8."""
    reference = straight[0] if (recipe, master) == ("delayed", "fp32") else tmp_path / "straight"
    if reference != straight[0]:
        Trainer(_cfg(reference, recipe=recipe, master=master)).fit()
    run = tmp_path / "stopped"
    first = _cfg(run, recipe=recipe, master=master)
    first.stop_at_step = 2
    assert Trainer(first).fit()["step"] == 2
    second = _cfg(run, recipe=recipe, master=master)
    second.resume = True
    trainer = Trainer(second)
    assert trainer.step == 2
    trainer.fit()
    _assert_same_state(latest_checkpoint(reference / "checkpoints"), latest_checkpoint(run / "checkpoints"))


def test_fp8_sigkilled_run_resumes_exactly(straight, tmp_path, sigkill_after_first_checkpoint):
    run = tmp_path / "killed"
    sigkill_after_first_checkpoint(run, ["--preset", "tiny", "--data.synthetic", "16", "--optim.batch_size", "4",
                                         "--optim.grad_accum", "2", "--optim.max_steps", str(STEPS),
                                         "--optim.warmup_steps", "1", "--eval.every", "0", "--precision.mode", "fp8-o2",
                                         "--checkpoint.every", "1",
                                         "--checkpoint.keep", "0", "--log.progress", "false"], STEPS)
    cfg = _cfg(run)
    cfg.resume = True
    trainer = Trainer(cfg)
    assert 0 < trainer.step < STEPS
    trainer.fit()
    _assert_same_state(latest_checkpoint(straight[0] / "checkpoints"), latest_checkpoint(run / "checkpoints"))


def test_fp8_o2_with_gradient_checkpointing_trains_exactly_as_without(straight, tmp_path):
    """Hugging Face's gradient checkpointing re-runs each decoder layer in the backward; the FP8 layers
    replay their recorded forward there, so the run is the one without checkpointing, bit for bit."""
    cfg = _cfg(tmp_path / "checkpointed")
    cfg.model.gradient_checkpointing = True
    Trainer(cfg).fit()
    _assert_same_state(latest_checkpoint(straight[0] / "checkpoints"), latest_checkpoint(tmp_path / "checkpointed"
                                                                                           / "checkpoints"))


def test_fp8_resume_restores_skipped_steps_and_checks_the_optimizer_layout(tmp_path):
    """torch.distributed.checkpoint's optimizer state drops FP8AdamW's own entry; the trainer keeps it
    beside: the skipped-step count comes back, and a state written in another layout is refused."""
    run = tmp_path / "run"
    first = _cfg(run)
    first.stop_at_step = 1
    trainer = Trainer(first)
    trainer.optimizer.skipped_steps = 3  # as if three overflowed steps had been skipped
    trainer.train_step.skipped_steps = 2  # the trainer's own count (TrainStep), checkpointed too
    trainer.fit()
    again = _cfg(run)
    again.resume = True
    resumed = Trainer(again)
    assert resumed.optimizer.skipped_steps == 3 and resumed.train_step.skipped_steps == 2
    state_file = latest_checkpoint(run / "checkpoints") / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["fp8"]["block_size"] = 64
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="block_size=64"):
        Trainer(again)


def test_fp8_checkpoint_is_served_as_trained(straight, monkeypatch):
    """grm-serve serves the FP8 checkpoint as FP8 and scores like the training code's FP8 layers read
    back from the same file (compute pinned to fp32 so the comparison is tight on any CPU)."""
    from grmserve.server.app import build_engine
    from grmserve.server.background import ServerThread
    from grmserve.server.config import local

    monkeypatch.setattr("grmserve.server.engine.runner.fast_dtype", lambda device: torch.float32)
    folder = latest_checkpoint(straight[0] / "checkpoints") / "model"
    cfg = local()
    cfg.model.checkpoint = str(folder)
    pairs = [([{"role": "user", "content": f"Is {i} even?"}], "yes" if i % 2 else "no") for i in range(6)]
    with ServerThread(cfg, build_engine(cfg)) as st, st.client() as c:
        assert c.info().precision == "fp8"
        got = torch.tensor(c.score(pairs))
    loaded = load_grm(folder)
    for m in loaded.model.modules():
        if isinstance(m, FP8InferenceLinear):
            m.compute_dtype = torch.float32
    from grmserve.training.core.prompts import PromptRenderer

    renderer = PromptRenderer(loaded.tokenizer)
    want = []
    for prompt, response in pairs:
        g = renderer.encode(prompt, [response], max_tokens=256)
        ids = torch.tensor([g.prompt_ids + g.response_ids[0]])
        with torch.no_grad():
            want.append(float(loaded.model.score(ids, torch.ones_like(ids))[0]))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_an_fp8_checkpoint_computes_in_the_dtype_asked_for(straight):
    """An FP8 checkpoint is always served as FP8; `--model.precision fp32|bf16` picks the dtype its
    dequantised matmuls and other layers compute in (auto: the device's fast dtype)."""
    from grmserve.server.app import load_runner
    from grmserve.server.config import local

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = local()
        cfg.model.checkpoint = str(latest_checkpoint(straight[0] / "checkpoints") / "model")
        cfg.model.precision, cfg.model.warmup = precision, False
        runner, _, info = load_runner(cfg)
        assert info.precision == "fp8"
        layers = [m for m in runner.model.modules() if isinstance(m, FP8InferenceLinear)]
        assert layers and all(m.compute_dtype == dtype for m in layers)
        assert runner.model.lm.get_input_embeddings().weight.dtype == dtype


def test_a_broken_input_scale_names_the_file_and_tensor(straight, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from grmserve.training.core.checkpoint import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(latest_checkpoint(straight[0] / "checkpoints") / "model", folder)
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("q_proj.input_scale"))
    tensors[key] = torch.tensor([-0.5])
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{f.name}.*input_scale.*positive"):
        load_grm(folder)


def test_fp16_master_run_exports_its_embedding_dequantised_and_tied(tmp_path):
    """fp8-o2 with FP16 masters: the tied embedding trains as FP16 master + scale (trainer state) and
    the served checkpoint holds its exact float32 value, still tied to the LM head."""
    run = tmp_path / "fp16"
    Trainer(_cfg(run, master="fp16")).fit()
    ckpt = latest_checkpoint(run / "checkpoints")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["model"]
    key = "lm.model.embed_tokens.fp16_master."
    assert state[key + "weight"].dtype == torch.float16
    master = state[key + "weight"].float() * state[key + "weight_scale_inv"]
    served = load_grm(ckpt / "model").model
    embedding = served.lm.get_input_embeddings().weight
    assert torch.equal(embedding.float(), master) and served.lm.get_output_embeddings().weight is embedding
    start, _ = build_model(_cfg(run))
    assert not torch.equal(start.lm.get_input_embeddings().weight,
                           master.to(start.lm.get_input_embeddings().weight.dtype))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags,trained,this_run", [
    (["--precision.mode", "fp8-o1"], "--precision.mode fp8-o2", "fp8-o1"),
    (["--precision.mode", "fp32"], "--precision.mode fp8-o2", "fp32"),
    (["--precision.fp8_master", "fp16"], "--precision.fp8_master fp32", "fp16"),
    (["--precision.fp8_recipe", "current"], "--precision.fp8_recipe delayed", "current"),
    (["--precision.mode", "fp8-o1", "--precision.fp8_recipe", "block"],
     "--precision.mode fp8-o2 --precision.fp8_recipe delayed", "fp8-o1, block"),
])
def test_resuming_with_another_precision_layout_names_the_flags(flags, trained, this_run, straight, tmp_path, capsys):
    """The run was fp8-o2, delayed scaling, fp32 masters: a resume whose precision flags change what the
    checkpoint holds is one line naming each flag and the value to pass, and leaves the run as it was."""
    import shutil

    from grmserve.training.core.configtools import USER_ERROR
    from grmserve.training.trainer import main as train_main

    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    before = _files(run)
    code = train_main(["--preset", "tiny", "--run_dir", str(run), "--data.synthetic", "16", "--optim.batch_size", "4",
                       "--optim.grad_accum", "2", "--optim.max_steps", str(STEPS), "--optim.warmup_steps", "1",
                       "--eval.every", "0", "--log.progress", "false", "--precision.mode", "fp8-o2", "--resume",
                       *flags])  # the flags after: the last value of a repeated flag counts
    err = capsys.readouterr().err
    assert code == USER_ERROR and "Traceback" not in err
    ckpt = latest_checkpoint(run / "checkpoints")
    [line] = [line for line in err.splitlines() if line.startswith("grm-train:")]
    assert line == (f"grm-train: {ckpt} was trained with {trained} (this run: {this_run}); "
                    f"resume with {trained}, or start a new --run_dir")
    assert _files(run) == before


def test_resuming_with_other_compute_only_precision_flags_is_allowed(straight, tmp_path):
    """The FP8 GEMM backend and fusion change how a step computes, not what the checkpoint holds."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    cfg = _cfg(run)
    cfg.resume, cfg.precision.fp8_backend, cfg.precision.fp8_fuse = True, "emulated", "off"
    assert Trainer(cfg).step == STEPS


def test_an_fp8_o1_run_resumed_as_fp8_o2_names_the_mode(tmp_path):
    """O1 keeps torch's AdamW state, O2 FP8AdamW's: refused before either is loaded."""
    from grmserve.training.core.checkpoint import CheckpointError

    run = tmp_path / "o1"
    first = _cfg(run, mode="fp8-o1")
    first.stop_at_step = 1
    Trainer(first).fit()
    again = _cfg(run)
    again.resume = True
    with pytest.raises(CheckpointError, match=r"was trained with --precision.mode fp8-o1 \(this run: fp8-o2\)"):
        Trainer(again)
