"""The FP8 all-gather extension for FSDP2 (O3), in one process (gloo, world size 1: FSDP2 still calls
the extension; the two-process run is tests/training/test_train_fsdp.py): what is sent is E4M3, the
layer computes with exactly the bytes a
plain FP8 training linear would, the scaling state records one step per forward, and the weight's
gradient and optimizer step land on the shard."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from grmserve.training.core.fp8.formats import fp8_to_float32, quantize_per_tensor, sqnr_db
from grmserve.training.core.fp8.fsdp import (
    EMBEDDING_GATHERS,
    FP8AllGatherWeight,
    FP8ReduceScatter,
    all_gather_bytes,
    gather_embeddings_in,
    local_shard,
)
from grmserve.training.core.fp8.optim import FP8AdamW
from grmserve.training.core.fp8.training_linear import (
    FP8TrainingLinear,
    convert_to_fp8_training,
    reduce_scatter_in_fp8,
    shard_fp8_weights,
)


@pytest.fixture()
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    convert_to_fp8_training(net, "delayed", "emulated", compute_dtype=torch.float32)
    return net


def test_fsdp2_gathers_e4m3_and_computes_like_the_plain_fp8_linear(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    plain, sharded = _net(), _net()
    assert shard_fp8_weights(sharded) == 2 and isinstance(sharded[0].weight.data, FP8AllGatherWeight)
    fully_shard(sharded)
    before = all_gather_bytes()["fp8_linears"]
    x = torch.randn(16, 64)
    for step in range(3):
        if step == 1:  # a weight spike: delayed scaling saturates this step, and both count it
            with torch.no_grad():
                plain[0].weight.mul_(8)
                local_shard(sharded[0].weight).mul_(8)
        y_plain, y_sharded = plain(x), sharded(x)
        assert torch.equal(y_plain, y_sharded), step  # the gathered E4M3 bytes are the bytes the plain layer uses
        y_plain.square().mean().backward()
        y_sharded.square().mean().backward()
    sent = all_gather_bytes()["fp8_linears"] - before
    assert sent >= 3 * (64 * 128 + 128 * 32)  # every forward sent the weights in E4M3
    assert sharded[0].states.weight.steps == plain[0].states.weight.steps == 3  # one record per forward
    counted = sharded[0].scaling_stats()["weight"]
    assert counted == plain[0].scaling_stats()["weight"] and counted["overflow"] > 0, counted
    assert torch.allclose(sharded[0].weight.grad.full_tensor(), plain[0].weight.grad, rtol=1e-5, atol=1e-7)


def test_fp8_adamw_steps_the_shard_in_place(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    net = _net()
    shard_fp8_weights(net)
    fully_shard(net)
    opt = FP8AdamW(net.parameters(), lr=1e-2)
    before = net[0].weight.full_tensor().clone()
    net(torch.randn(16, 64)).square().mean().backward()
    opt.step()
    after = net[0].weight.full_tensor()
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert opt.state[net[0].weight]["exp_avg"].dtype == torch.float8_e4m3fn


def test_block_recipe_and_fp16_master_are_refused_with_the_reason():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    convert_to_fp8_training(net, "block", "emulated")
    with pytest.raises(ValueError, match="per-tensor recipe"):
        shard_fp8_weights(net)
    net = torch.nn.Sequential(FP8TrainingLinear(64, 64, grad_storage="fp8"))
    net[0].keep_fp16_master()
    with pytest.raises(ValueError, match="fp32 master"):
        shard_fp8_weights(net)


class _TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.lm_head = torch.nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.embed(ids))


def _as_gathered(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the all-gather delivers of the float32 weight `w`: bf16-rounded values, or E4M3 values with
    one power-of-two scale for the whole weight (FP8-LM's, from its amax)."""
    if dtype == "bf16":
        return w.to(torch.bfloat16).float()
    q, scale_inv = quantize_per_tensor(w)
    return fp8_to_float32(q) * scale_inv


@pytest.mark.parametrize("dtype,bytes_per_element", [("bf16", 2), ("e4m3", 1)])
def test_embeddings_are_gathered_narrow_and_stay_tied(one_rank_group, dtype, bytes_per_element):
    """O3 can send the token embedding / LM head as bf16 or E4M3: the model computes in float32 from
    the gathered values, the tie survives the wrapping, and the gradient lands in float32 on the shard."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _TiedLM()
    with torch.no_grad():
        model.embed.weight[3] *= 40  # an outlier row: one scale must cover it
    w = _as_gathered(model.embed.weight.detach(), dtype).requires_grad_(True)
    assert not torch.equal(w, model.embed.weight)  # the narrow form differs from the master
    assert gather_embeddings_in(model, dtype) == ["embed.weight", "lm_head.weight"]
    assert model.lm_head.weight is model.embed.weight and isinstance(model.embed.weight.data, EMBEDDING_GATHERS[dtype])
    fully_shard(model)
    ids = torch.randint(0, 64, (4, 8))
    before = all_gather_bytes()[f"{dtype}_embeddings"]
    for step in range(2):  # the second step refills FSDP's unsharded parameter (`out=`)
        y = model(ids)
        expected = torch.nn.functional.linear(torch.nn.functional.embedding(ids, w), w)
        assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6), step
        y.square().mean().backward()
        expected.square().mean().backward()
        grad = model.embed.weight.grad.full_tensor()
        assert grad.dtype == torch.float32 and torch.allclose(grad, w.grad, rtol=1e-5, atol=1e-7), step
        model.zero_grad()
        with torch.no_grad():  # a new master: the next gather must carry its values and scale
            model.embed.weight.mul_(3.0)
        w = _as_gathered(model.embed.weight.full_tensor().detach(), dtype).requires_grad_(True)
    assert all_gather_bytes()[f"{dtype}_embeddings"] - before == 2 * 64 * 32 * bytes_per_element  # tied: once a step


def test_embedding_gather_names_the_choices():
    with pytest.raises(ValueError, match="one of \\['bf16', 'e4m3'\\], not 'fp16'"):
        gather_embeddings_in(_TiedLM(), "fp16")


def _skip_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = _net()
        shard_fp8_weights(net)
        fully_shard(net)
        opt = FP8AdamW(net.parameters(), lr=1e-2)
        before = [local_shard(p).clone() for p in net.parameters()]
        net(torch.randn(16, 64)).square().mean().backward()
        if rank == 0:  # an overflow in rank 0's shard only
            net[2].weight.grad.to_local()[0, 0] = float("inf")
        opt.step()
        moved = [not torch.equal(b, local_shard(p)) for b, p in zip(before, net.parameters())]
        torch.save({"skipped": opt.skipped_steps, "moved": moved}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_nonfinite_gradient_on_one_shard_skips_the_step_on_every_process(tmp_path):
    """Under FSDP2 each process holds a shard of every gradient: the optimizer's finiteness check covers
    all shards (one MAX all-reduce), so no process steps while another skips and the shards stay one model."""
    import torch.multiprocessing as mp

    from ..processes import free_port

    mp.spawn(_skip_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["skipped"] == 1 and not any(got["moved"]), (rank, got)


def o3_pieces(device: torch.device, backend: str, store: str) -> dict:
    """fp8-o3's pieces in one process (NCCL on a GPU, gloo on CPU): FSDP2 all-gathers the FP8 linears'
    E4M3 bytes and FP8AdamW steps the shards for a few steps; then `FP8ReduceScatter`, which FSDP2
    skips with one process, is called on a buffer directly."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
        net = torch.nn.Sequential(body, torch.nn.Linear(256, 1)).to(device)
        convert_to_fp8_training(body, "delayed", backend, compute_dtype=torch.float32,
                                allow_cpu_scaled_mm=device.type == "cpu")
        shard_fp8_weights(net)
        fully_shard(body)
        fully_shard(net)
        installed = reduce_scatter_in_fp8(net)
        opt = FP8AdamW(net.parameters(), lr=3e-3)
        x = torch.randn(256, 256, device=device)
        losses = []
        for _ in range(5):
            loss = (net(x) - 1).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        grads = torch.randn(300, device=device) * torch.logspace(-6, 2, 300, device=device)
        reduced = torch.empty(300, device=device)
        FP8ReduceScatter()(reduced, grads, dist.group.WORLD, dist.ReduceOp.AVG)
        return {"installed": installed, "losses": losses, "gathered": all_gather_bytes()["fp8_linears"],
                "grads": grads.cpu(), "reduced": reduced.cpu(),
                "shard_device": next(net.parameters()).to_local().device}
    finally:
        dist.destroy_process_group()



def test_fp8_o3_pieces_with_the_scaled_mm_backend_on_cpu(tmp_path):
    """The GPU test's run on CPU (gloo; `torch._scaled_mm` on CPU, held to the CUDA kernels' rules): the
    gathered E4M3 weights feed `_scaled_mm` directly, and the shards train."""
    got = o3_pieces(torch.device("cpu"), "scaled_mm", str(tmp_path / "store"))
    assert got["installed"] == ["0"] and got["gathered"] > 0
    assert all(torch.isfinite(torch.tensor(got["losses"]))) and got["losses"][-1] < got["losses"][0], got["losses"]
    assert sqnr_db(got["grads"], got["reduced"]) >= 25
