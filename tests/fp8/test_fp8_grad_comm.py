"""FP8 gradient all-reduce (FP8-LM automatic scaling) on 2 gloo processes: matches the fp32
all-reduce within FP8 tolerance, 1 byte per element on the wire, sums never overflow; scaling states
reduce their amax across ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grmserve.training.core.fp8.comm import fp8_all_reduce_, shared_scales
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
