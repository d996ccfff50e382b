"""Two processes with FSDP2 on CPU (torchrun, gloo) train the same parameters as one process.

Both runs take the same global batches (`optim.batch_size` counts pairs over all processes), so
only the order of floating-point reductions differs. Adam's eps is raised from 1e-8 to 1e-6: the
Bradley-Terry loss does not depend on the reward head's output bias (it cancels in r_c - r_r), so
that gradient is pure rounding noise, which Adam with eps 1e-8 turns into full-size steps of
either sign.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from grmserve.training import presets
from grmserve.training.trainer import Trainer, latest_checkpoint

FLAGS = {"--data.synthetic": "16", "--optim.batch_size": "4", "--optim.max_steps": "3", "--optim.eps": "1e-6",
         "--model.head.dropout": "0", "--eval.every": "0", "--log.progress": "false"}


def trainer_args(*extra: str) -> list[str]:
    """`grm-train --preset tiny` on CPU with `extra`, then FLAGS."""
    args = ["--preset", "tiny", "--device", "cpu", *extra]
    for k, v in FLAGS.items():
        args += [k, v]
    return args


def torchrun_command(run_dir, *extra: str) -> list[str]:
    """`trainer_args(*extra)` on 2 CPU processes under torchrun, in `run_dir`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "grmserve.training.trainer", "--run_dir", str(run_dir), *trainer_args(*extra)]


def run_torchrun(cmd: list[str], timeout: float) -> dict:
    """Run a torchrun command (one OpenMP thread per process); the last metrics rank 0 printed."""
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def single_process_config(run_dir, mode: str | None = None):
    """The same run as FLAGS in this process (optionally in precision `mode`)."""
    cfg = presets.tiny()
    cfg.run_dir = str(run_dir)
    cfg.data.synthetic, cfg.optim.batch_size, cfg.optim.max_steps, cfg.optim.eps = 16, 4, 3, 1e-6
    cfg.model.head.dropout, cfg.eval.every, cfg.log.progress = 0.0, 0, False
    if mode is not None:
        cfg.precision.mode = mode
    return cfg


def _weights(run_dir):
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-0000003"
    out = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_two_process_fsdp_matches_one_process(tmp_path):
    two = tmp_path / "fsdp2"
    reported = run_torchrun(torchrun_command(two), timeout=120)  # rank 0 prints the last metrics
    result = Trainer(single_process_config(tmp_path / "single")).fit()

    a, b = _weights(tmp_path / "single"), _weights(two)
    assert a.keys() == b.keys()
    initial = presets.tiny()  # the parameters moved, and moved the same way
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 5e-5, f"FSDP and single-process parameters differ by {moved}"
    head = "reward_head.safetensors:summary.0.weight"
    assert not torch.equal(a[head], _initial_head(initial))
    assert reported["step"] == 3 and reported["loss"] == pytest.approx(result["loss"], rel=1e-4)
    assert reported["eval_pairs"] == result["eval_pairs"] == 8  # evaluation gathered from both processes


def _initial_head(cfg) -> torch.Tensor:
    from grmserve.training.trainer import build_model

    cfg.model.head.dropout = 0.0
    model, _ = build_model(cfg)
    return model.reward_head.summary[0].weight.detach()


def _moved_and_apart(start: dict, a: dict, b: dict, keys: list[str]) -> tuple[float, float]:
    """Norms over `keys`: how far run `a` moved from `start`, and how far apart runs `a` and `b` ended."""
    moved = torch.stack([(a[k] - start[k]).norm() for k in keys]).norm().item()
    apart = torch.stack([(a[k] - b[k]).norm() for k in keys]).norm().item()
    return moved, apart


def test_two_process_fp8_o1_reduces_fp8_gradients_and_tracks_one_process(tmp_path):
    """fp8-o1 with two processes and plain data parallelism (`--dist.fsdp false`): the FP8 linears'
    weight gradients are averaged as FP8 bytes with a shared, pre-divided scale. The two runs differ
    only by that extra FP8 rounding, so the parameters end far closer to each other than to where
    they started (norms over the FP8 layers' weights, measured 0.27 of the distance moved; Adam turns
    gradient entries that FP8 flushes to zero on one side only into full-size steps, so a max-abs
    comparison would not mean much)."""
    two = tmp_path / "fp8-ddp"
    run_torchrun(torchrun_command(two, "--dist.fsdp", "false", "--precision.mode", "fp8-o1"), timeout=180)
    cfg = single_process_config(tmp_path / "single", "fp8-o1")
    Trainer(cfg).fit()
    a, b = (torch.load(latest_checkpoint(run / "checkpoints") / "trainer_state.pt", weights_only=True)["model"]
            for run in (tmp_path / "single", two))
    from grmserve.training.trainer import build_model

    start = build_model(cfg)[0].state_dict()
    keys = [k for k in start if k.endswith("q_proj.weight") or k.endswith("mlp.up_proj.weight")]
    moved, apart = _moved_and_apart(start, a, b, keys)
    assert moved > 0 and apart < 0.5 * moved, f"runs differ by {apart} (norm), parameters moved {moved}"


def test_two_process_fp8_o2_with_fp16_masters_tracks_one_process(tmp_path):
    """fp8-o2 with FP16 masters (the tied embedding too) under plain data parallelism: each process's
    scaled gradients are averaged and stored again in their own format (E4M3 for the FP8 linears, FP16
    for the embedding; the exact reduction is tested in tests/fp8/test_fp16_master_embedding.py). The
    embedding ends far closer to the one-process run's than to where it started (measured 0.23 of the
    distance moved)."""
    two = tmp_path / "o2-ddp"
    master = ("--precision.mode", "fp8-o2", "--precision.fp8_master", "fp16")
    run_torchrun(torchrun_command(two, "--dist.fsdp", "false", *master), timeout=180)
    cfg = single_process_config(tmp_path / "single", "fp8-o2")
    cfg.precision.fp8_master = "fp16"
    Trainer(cfg).fit()
    from grmserve.training.core.fp8.fp16_master import dequantize_fp16_masters
    from grmserve.training.trainer import build_model

    a, b = (dequantize_fp16_masters(torch.load(latest_checkpoint(run / "checkpoints") / "trainer_state.pt",
                                               weights_only=True)["model"]) for run in (tmp_path / "single", two))
    start = build_model(cfg)[0].state_dict()
    moved, apart = _moved_and_apart(start, a, b, ["lm.model.embed_tokens.weight"])
    assert moved > 0 and apart < 0.5 * moved, f"runs differ by {apart} (norm), moved {moved}"


def test_two_process_fp8_o3_tracks_one_process_o2(tmp_path):
    """fp8-o3: FSDP2 over two processes, the FP8 linears' weights all-gathered as E4M3 bytes, the
    decoder layers' gradients reduce-scattered as E4M3 bytes, FP8AdamW on each shard. Against fp8-o2
    in one process on the same global batches, the runs differ by the FP8 rounding of two half-batch
    weight gradients instead of one and by FP8AdamW's 128-element blocks falling elsewhere on a shard
    (measured 0.12-0.27 of the distance moved, per tensor group, with the reduce-scatter in E4M3 or
    in float32: the weight gradients are E4M3 already); a resumed checkpoint restores each process's
    optimizer shard."""
    two = tmp_path / "fp8-o3"
    cmd = torchrun_command(two, "--precision.mode", "fp8-o3")
    reported = run_torchrun(cmd, timeout=240)
    assert reported["step"] == 3 and reported["fp8_all_gather_mib"] > 0
    # Every decoder layer's gradients went through the E4M3 reduce-scatter once per step: FSDP2's
    # flat buffer (parameters padded to whole rows per process), each shard padded to blocks of 128.
    from grmserve.training.trainer import build_model, decoder_layers

    cfg = single_process_config(tmp_path / "single", "fp8-o2")
    model = build_model(cfg)[0]
    shards = [sum(-(-p.shape[0] // 2) * p[0].numel() for p in layer.parameters()) for layer in decoder_layers(model.lm)]
    payload = 3 * sum(2 * -(-s // 128) * 128 for s in shards)
    assert reported["fp8_reduce_scatter_mib"] == round(payload / 2**20, 3)
    Trainer(cfg).fit()
    a = torch.load(latest_checkpoint(tmp_path / "single" / "checkpoints") / "trainer_state.pt", weights_only=True)
    b = torch.load(latest_checkpoint(two / "checkpoints") / "trainer_state.pt", weights_only=True)
    assert len(b["optimizer"]["shards"]) == 2  # one FP8AdamW state per process
    shard = next(iter(b["optimizer"]["shards"][0]["state"].values()))
    assert shard["exp_avg"].dtype == torch.float8_e4m3fn
    start = model.state_dict()
    for suffix in ("q_proj.weight", "up_proj.weight", "embed_tokens.weight"):
        moved, apart = _moved_and_apart(start, a["model"], b["model"], [k for k in start if k.endswith(suffix)])
        assert moved > 0 and apart < 0.5 * moved, f"{suffix}: runs differ by {apart} (norm), moved {moved}"
    # Resume the two-process run for one more step: each process gets its own optimizer shard back.
    assert run_torchrun(cmd + ["--resume", "--optim.max_steps", "4"], timeout=240)["step"] == 4
    # The same run sending the (tied) embedding as E4M3 too: each process adds its shard's bytes,
    # once per step (the root module's weights stay gathered from forward to backward). Its gradients
    # go back in float32 (FSDP2's own reduce-scatter).
    e4m3 = run_torchrun(torchrun_command(tmp_path / "e4m3", "--precision.mode", "fp8-o3",
                                         "--precision.fp8_embedding_gather", "e4m3",
                                         "--precision.fp8_reduce_scatter", "fp32"), timeout=240)
    shard_mib = start["lm.model.embed_tokens.weight"].numel() / 2 / 2**20
    added = (e4m3["fp8_all_gather_mib"] - reported["fp8_all_gather_mib"]) / shard_mib
    assert e4m3["step"] == 3 and abs(added - 3) < 0.01, added
    assert e4m3["fp8_reduce_scatter_mib"] == 0


def _flat_state(path) -> dict:
    """trainer_state.pt as {key path: value}, everything but the run's own config."""
    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, f"{key}/{i}")
        else:
            yield key, value
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    state.pop("config")
    return dict(walk(state, ""))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # compare the bytes: float8 and NaN-safe
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))
    return repr(a) == repr(b)


def test_two_process_fp8_o3_resumes_exactly_after_sigkill(tmp_path, sigkill_after_first_checkpoint):
    """fp8-o3 under torchrun, every process SIGKILLed after the first checkpoint, then resumed: the
    final checkpoint equals an uninterrupted run's bit for bit (weights, every process's FP8AdamW shard,
    scaling states, random states, the exported FP8 model)."""
    extra = ["--precision.mode", "fp8-o3", "--checkpoint.every", "1", "--checkpoint.keep", "0"]
    straight = tmp_path / "straight"
    assert run_torchrun(torchrun_command(straight, *extra), timeout=240)["step"] == 3
    killed = tmp_path / "killed"
    killed_at = sigkill_after_first_checkpoint(killed, trainer_args(*extra), final_step=3, timeout=240, nproc=2)
    assert latest_checkpoint(killed / "checkpoints") == killed_at  # no orphaned worker went on
    assert run_torchrun(torchrun_command(killed, *extra) + ["--resume"], timeout=240)["step"] == 3
    a, b = latest_checkpoint(straight / "checkpoints"), latest_checkpoint(killed / "checkpoints")
    sa, sb = _flat_state(a), _flat_state(b)
    assert sa.keys() == sb.keys() and any("/optimizer/shards/1/" in k for k in sa)
    assert not [k for k in sa if not _same(sa[k], sb[k])]
    wa, wb = _weights(straight), _weights(killed)
    assert wa.keys() == wb.keys() and all(_same(wa[k], wb[k]) for k in wa)


def _root_reduce_worker(rank: int, out_dir: str, root_dtype: str) -> None:
    """Two micro-batches of the tiny GRM under the trainer's fp8-o3 sharding, the gradients synchronised
    after the second only (as with optim.grad_accum 2); saves the dtypes of the reduce-scatters that
    went through `dist.reduce_scatter_single` and this rank's shard of the embedding gradient."""
    import torch.distributed as dist

    from grmserve.training.components import adamw_factory
    from grmserve.training.precision import apply_precision
    from grmserve.training.trainer import DistInfo, build_model, build_sharder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store-{root_dtype}", rank=rank, world_size=2)
    try:
        cfg = single_process_config(out_dir, "fp8-o3")
        cfg.precision.fp8_root_reduce_scatter = root_dtype
        model = build_model(cfg)[0]
        shard = build_sharder(DistInfo(rank=rank, world_size=2), cfg)
        plan = apply_precision(model, adamw_factory(cfg.optim), cfg.precision, device=torch.device("cpu"), shard=shard)
        dtypes, scatter = [], dist.reduce_scatter_single

        def spy(*args, **kwargs):
            dtypes.append(str((kwargs["input"] if "input" in kwargs else args[1]).dtype))
            return scatter(*args, **kwargs)

        dist.reduce_scatter_single = spy
        gen = torch.Generator().manual_seed(rank)
        for micro in range(2):
            plan.model.set_requires_gradient_sync(micro == 1)
            ids = torch.randint(5, 60, (2, 12), generator=gen)
            out = plan.model(ids, torch.ones_like(ids), response_mask=torch.ones_like(ids))
            (out.rewards.square().sum() - out.logps.mean()).backward()
        grad = plan.model.lm.get_input_embeddings().weight.grad
        torch.save({"dtypes": dtypes, "grad": grad.to_local(), "grad_dtype": str(grad.dtype)},
                   f"{out_dir}/{root_dtype}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fp8_o3_reduces_the_root_gradients_in_bf16_when_asked(tmp_path):
    """--precision.fp8_root_reduce_scatter bf16: the root module's gradients (tied embedding, final
    norm, reward head), accumulated over the micro-batches in float32, travel as bf16 once
    (`BF16ReduceScatter`) and arrive as float32, within bf16 rounding of the float32 reduce-scatter; the
    decoder layers still go through the E4M3 one (an all-to-all, not a reduce-scatter call)."""
    import torch.multiprocessing as mp

    for root_dtype in ("fp32", "bf16"):
        mp.spawn(_root_reduce_worker, args=(str(tmp_path), root_dtype), nprocs=2, join=True)
    for rank in range(2):
        fp32, bf16 = (torch.load(tmp_path / f"{d}-rank{rank}.pt") for d in ("fp32", "bf16"))
        assert fp32["dtypes"] == ["torch.float32"] and bf16["dtypes"] == ["torch.bfloat16"]  # the root only
        assert bf16["grad_dtype"] == fp32["grad_dtype"] == "torch.float32"
        a, b = fp32["grad"], bf16["grad"]
        assert not torch.equal(a, b) and (a - b).norm() < 2**-7 * a.norm(), ((a - b).norm(), a.norm())
