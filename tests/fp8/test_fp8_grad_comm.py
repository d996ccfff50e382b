"""FP8 gradient all-reduce (FP8-LM automatic scaling) on 2 gloo processes: matches the fp32
all-reduce within FP8 tolerance, 1 byte per element on the wire, sums never overflow; scaling states
reduce their amax across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grmserve.training.core.fp8.comm import all_reduce_max_, fp8_all_reduce_, shared_scales
from grmserve.training.core.fp8.formats import sqnr_db
from grmserve.training.core.fp8.scaling import ScalingState

from ..processes import free_port

WORLD = 2


def _grads(rank: int) -> list[torch.Tensor]:
    torch.manual_seed(100 + rank)
    big = torch.randn(96, 48) * 10.0
    big[0, 0] = 440.0 * (1 if rank == 0 else 1)  # both ranks near e4m3's max: the sum would overflow unscaled
    return [big, torch.randn(37) * 1e-3, torch.randn(16, 16)]


def _worker(rank: int, port: int, method: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        grads = _grads(rank)
        ref = [g.clone() for g in grads]
        for r in ref:
            dist.all_reduce(r)
            r /= WORLD
        stats = fp8_all_reduce_(grads, op="avg", method=method)
        # Scaling states all-reduce their amax with MAX: rank 1's amax (4.0) sets both ranks' scale.
        _, scale_inv = ScalingState("e4m3", mode="current").quantize(torch.full((8,), 1.0 + 3.0 * rank))
        torch.save({"fp8": grads, "ref": ref, "stats": stats.__dict__, "scale_inv": scale_inv},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["reduce_scatter", "all_gather"])
def test_two_process_fp8_all_reduce_matches_fp32(tmp_path, method):
    mp.spawn(_worker, args=(free_port(), method, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    n = sum(g.numel() for g in r0["ref"])
    for a, b in zip(r0["fp8"], r1["fp8"]):
        assert torch.equal(a, b), "every rank must end with the same reduced gradient"
    for fp8, ref in zip(r0["fp8"], r0["ref"]):
        assert torch.isfinite(fp8).all()
        assert sqnr_db(ref, fp8) >= 20, (method, sqnr_db(ref, fp8))
    assert r0["scale_inv"].item() == r1["scale_inv"].item() == 1 / 64  # 2^floor(log2(448 / 4))
    stats = r0["stats"]
    assert stats["elements"] == n and stats["bytes_per_element"] == 1
    padded = -(-n // WORLD) * WORLD
    expected = (2 * (WORLD - 1) * padded // WORLD) if method == "reduce_scatter" else (WORLD - 1) * padded
    assert stats["payload_bytes_sent"] == expected  # 1 byte per element: a quarter of fp32's bytes


def test_shared_scale_keeps_the_sum_in_range():
    amax = torch.tensor([440.0, 3.0, 1e-3])
    for world in (2, 4, 8):
        s = shared_scales(amax, world)
        assert torch.all(world * amax * s <= 448.0)
        assert torch.all(world * amax * s > 448.0 / 2)  # the largest power of two that fits


def test_single_process_is_quantise_dequantise_and_nonfinite_propagates():
    g = [torch.randn(64, 16), torch.tensor([1.0, float("inf")])]
    ref = g[0].clone()
    stats = fp8_all_reduce_(g)
    assert stats.world_size == 1 and stats.payload_bytes_sent == 0
    assert sqnr_db(ref, g[0]) >= 25
    assert not torch.isfinite(g[1]).all(), "a non-finite gradient must stay visible to the optimizer's check"


# FSDP2's reduce-scatter in FP8 (O3's ``fp8_reduce_scatter e4m3``)

SHARD = 300  # not a multiple of 128: the last block of each shard is padded


def _rs_input(rank: int) -> torch.Tensor:
    """Rank `rank`'s flat reduce-scatter input (2 shards of SHARD): large values with a near-max
    outlier on both ranks in one block, a block of tiny values, and a NaN on rank 1 in shard 1's last block."""
    torch.manual_seed(200 + rank)
    x = torch.randn(WORLD, SHARD) * 10.0
    x[:, 0] = 440.0  # on both ranks: summed unscaled in E4M3 this would overflow
    x[:, 128:256] = torch.randn(WORLD, 128) * 1e-4  # a block of its own scale: kept, not flushed to zero
    if rank == 1:
        x[1, 290] = float("nan")
    return x.view(-1)


def _rs_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from grmserve.training.core.fp8.fsdp import FP8ReduceScatter, reduce_scatter_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        out = {}
        for op in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            shard = torch.empty(SHARD)
            FP8ReduceScatter()(shard, _rs_input(rank), group=None, op=op)
            out[str(op)] = shard
        out["bytes"] = reduce_scatter_bytes()
        # Under FSDP2: one module's gradients through FP8ReduceScatter against the default float32 one.
        grads = {}
        for fp8 in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32))
            fully_shard(model)
            if fp8:
                model.set_custom_reduce_scatter(FP8ReduceScatter())
            torch.manual_seed(10 + rank)  # each rank its own batch
            model(torch.randn(8, 64)).square().mean().backward()
            grads[fp8] = [p.grad.full_tensor() for p in model.parameters()]
        out["fsdp"] = grads
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_fp8_reduce_scatter_matches_fp32_per_block(tmp_path):
    """`FP8ReduceScatter` sums each rank's shard of W contributions rounded to E4M3 with a shared,
    W-pre-divided scale per 128 values: within FP8 tolerance of the exact sum, no overflow at the
    outliers, tiny blocks kept by their own scale, a NaN confined to its block (and visible), and
    FSDP2's gradients through it match its own float32 reduce-scatter's."""
    mp.spawn(_rs_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    exact = (_rs_input(0) + _rs_input(1)).view(WORLD, SHARD)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        total, mean = got[str(dist.ReduceOp.SUM)], got[str(dist.ReduceOp.AVG)]
        ref = exact[rank]
        finite = torch.ones(SHARD, dtype=torch.bool)
        if rank == 1:
            finite[256:] = False  # the NaN's block, all of it
        assert torch.equal(torch.isfinite(total), finite), "a NaN makes its block non-finite, and only that"
        assert torch.equal(mean[finite], total[finite] / WORLD)
        assert abs(total[0] - 880.0) <= 880.0 / 16, "the outliers' sum stays in range (E4M3: 3 mantissa bits)"
        assert sqnr_db(ref[:128], total[:128]) >= 20
        if rank == 0:
            assert sqnr_db(ref[256:], total[256:]) >= 20
        assert sqnr_db(ref[128:256], total[128:256]) >= 20, "a block of tiny gradients keeps its own scale"
        blocks = WORLD * 3  # 300 values per shard: 3 blocks of 128, the last one padded; two calls
        assert got["bytes"] == {"e4m3_gradients": 2 * blocks * 128, "block_amax": 2 * blocks * 4}
        fp32, fp8 = got["fsdp"][False], got["fsdp"][True]
        for a, b in zip(fp32, fp8):
            assert sqnr_db(a, b) >= 25, sqnr_db(a, b)
            assert not torch.equal(a, b), "the FP8 reduce-scatter was not used"


@pytest.mark.parametrize("comm", ["FP8ReduceScatter", "BF16ReduceScatter"])
def test_narrow_reduce_scatters_refuse_a_divide_factor(comm):
    from grmserve.training.core.fp8 import fsdp

    with pytest.raises(ValueError, match="divide factor"):
        getattr(fsdp, comm)()(torch.empty(4), torch.zeros(8), group=None, op=dist.ReduceOp.PREMUL_SUM(0.5))


def _max_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        amax = torch.tensor([float("nan"), 1.0, 0.5]) if rank == 0 else torch.tensor([2.0, 3.0, float("inf")])
        torch.save(all_reduce_max_(amax), f"{out_dir}/max{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_nan_amax_reaches_every_rank_as_inf(tmp_path):
    """MAX of a NaN is up to the backend (CUDA's fmaxf drops it); the amax all-reduce sends it as +inf,
    which every MAX keeps, so each rank sees the non-finite amax and takes the same NaN scale."""
    mp.spawn(_max_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"max{rank}.pt").tolist() == [float("inf"), 3.0, float("inf")]
    assert torch.isnan(shared_scales(torch.tensor([float("inf")]), WORLD)).all()
