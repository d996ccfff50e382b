"""FP8 formats, power-of-two scaling, clamping, quantise/dequantise, delayed scaling."""

from __future__ import annotations

import math

import pytest
import torch

from grmserve.training.core.fp8.formats import (
    E4M3,
    E5M2,
    DelayedScaling,
    FP8ScaleError,
    cast_to_fp8,
    compute_scale,
    dequantize,
    get_format,
    quantize_per_block,
    quantize_per_channel,
    quantize_per_tensor,
    sqnr_db,
)


def test_format_descriptors_match_torch():
    assert E4M3.dtype == torch.float8_e4m3fn and E4M3.max == torch.finfo(torch.float8_e4m3fn).max == 448.0
    assert E5M2.dtype == torch.float8_e5m2 and E5M2.max == torch.finfo(torch.float8_e5m2).max == 57344.0
    assert get_format("e5m2") is E5M2
    with pytest.raises(ValueError, match="unknown FP8 format"):
        get_format("e3m4")


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_scale_is_the_largest_power_of_two_that_fits(fmt):
    amax = torch.exp(torch.empty(1000).uniform_(-20, 20, generator=torch.Generator().manual_seed(0)))
    scale = compute_scale(amax, fmt)
    mantissa, _ = torch.frexp(scale)
    assert torch.all(mantissa == 0.5), "scales must be powers of two"
    assert torch.all(amax * scale <= fmt.max)
    assert torch.all(amax * scale * 2 > fmt.max), "one more doubling would overflow"
    assert torch.equal(1.0 / (1.0 / scale), scale), "inverse is exact"


def test_scale_exact_values_and_margin():
    assert compute_scale(torch.tensor([1.0, 448.0, 449.0, 448 / 1024])).tolist() == [256.0, 1.0, 0.5, 1024.0]
    assert compute_scale(1.0, E4M3, margin=1).item() == 128.0
    assert compute_scale(1.0, E4M3, margin=3).item() == 32.0
    assert compute_scale(1.0, E5M2).item() == 32768.0


def test_scale_edge_cases_zero_tiny_huge():
    assert compute_scale(torch.tensor(0.0)).item() == 1.0, "an all-zero tensor gets scale 1"
    for amax in (1e-45, 1e-38, 3e38):
        s = compute_scale(torch.tensor(amax))
        assert math.isfinite(s.item()) and math.isfinite((1.0 / s).item()) and s.item() > 0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_scale_refuses_non_finite_amax(bad):
    with pytest.raises(FP8ScaleError, match="inf or NaN"):
        compute_scale(torch.tensor([1.0, bad]))
    unchecked = compute_scale(torch.tensor([1.0, bad]), check_finite=False)
    assert unchecked[0].item() == 256.0 and math.isnan(unchecked[1].item()), "hot path: NaN scale, not a silent one"
    with pytest.raises(FP8ScaleError):
        quantize_per_channel(torch.tensor([[1.0, bad], [1.0, 2.0]]))


def test_cast_clamps_finite_values_and_keeps_nonfinite_ones_visible():
    x = torch.tensor([1000.0, -1e6, math.inf, 3.0, math.nan])
    # What the bare casts do (why cast_to_fp8 saturates first): on CPU e4m3fn turns even +inf into 448,
    # e5m2 overflows to inf.
    assert x[2:3].to(torch.float8_e4m3fn).float().item() == 448.0
    assert math.isinf(torch.tensor([1e6]).to(torch.float8_e5m2).float().item())
    for fmt, big in ((E4M3, 448.0), (E5M2, 57344.0)):
        q = cast_to_fp8(x, fmt).float()
        assert q[1].item() == -big and q[3].item() == 3.0  # finite: clamped to the format's range
        assert math.isnan(q[2].item()) and math.isnan(q[4].item())  # inf and NaN: NaN, not a finite 448
    assert cast_to_fp8(x, E4M3).float()[0].item() == 448.0 and cast_to_fp8(x, E5M2).float()[0].item() == 1024.0


def _check_round_trip(x, q, s, block_size=None):
    """Every element within e4m3's rounding: half a ulp (2^-4 relative) for normals, and half the
    subnormal step (2^-10 · scale_inv) near zero."""
    back = dequantize(q, s, block_size=block_size)
    s_full = s if block_size is None else s.repeat_interleave(block_size, dim=-1)[..., : x.shape[-1]]
    bound = x.abs() * 2.0**-4 + s_full * 2.0**-10
    assert torch.all((back - x).abs() <= bound * (1 + 1e-6))
    # FP8 values are a fixed point: with the same scales the bits come back, and re-quantising
    # from scratch gives back the same values (its power-of-two scale may differ by 2 when a
    # block's max rounded up onto a power of two).
    if block_size is None:
        assert torch.equal(cast_to_fp8(back / s, E4M3).view(torch.uint8), q.view(torch.uint8))
    else:
        assert torch.equal(dequantize(*quantize_per_block(back, block_size), block_size=block_size), back)


def test_round_trip_per_tensor_channel_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 200, generator=g) * torch.logspace(-3, 2, 48).unsqueeze(1)  # rows of very different size
    q, s = quantize_per_tensor(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ()
    _check_round_trip(w, q, s)
    q, s = quantize_per_channel(w)
    assert s.shape == (48, 1)
    _check_round_trip(w, q, s)
    q, s = quantize_per_block(w, block_size=64)
    assert s.shape == (48, 4), "200 inputs: three blocks of 64 and a last block of 8"
    _check_round_trip(w, q, s, block_size=64)
    assert sqnr_db(w, dequantize(*quantize_per_channel(w))) > sqnr_db(w, dequantize(*quantize_per_tensor(w)))


def test_zero_rows_and_blocks_round_trip_to_zero():
    w = torch.zeros(16, 128)
    w[0, :64] = torch.linspace(-1, 1, 64)
    for q, s, bs in [(*quantize_per_channel(w), None), (*quantize_per_block(w, 64), 64)]:
        assert torch.isfinite(s).all()
        back = dequantize(q, s, block_size=bs)
        assert torch.all(back[1:] == 0) and torch.all(back[0, 64:] == 0)


def test_block_beats_channel_on_weights_with_outliers():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g) * 1e-3
    w[:, 7] = 200.0  # one outlier column sets every row's per-channel scale
    channel = dequantize(*quantize_per_channel(w))
    block = dequantize(*quantize_per_block(w, 64), block_size=64)
    # With a 2e5 range in one row, per-channel pushes the bulk into e4m3's subnormals; the blocks
    # away from the outlier (inputs 64:) keep full precision.
    ch_db, bl_db = sqnr_db(w[:, 64:], channel[:, 64:]), sqnr_db(w[:, 64:], block[:, 64:])
    assert bl_db > 25 and bl_db > ch_db + 10, (bl_db, ch_db)


def test_dequantize_dtype_and_block_validation():
    q, s = quantize_per_channel(torch.randn(16, 32))
    assert dequantize(q, s, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_block(torch.randn(2, 16, 32), 16)


def test_delayed_scaling_history_window_and_overflow():
    ds = DelayedScaling(E4M3, history_len=3)
    assert ds.scale().item() == 1.0
    assert ds.scale(torch.tensor(2.0)).item() == 128.0, "warm-up: the current amax"
    for amax in (8.0, 1.0, 1.0):
        assert ds.update(torch.tensor(amax))
    assert ds.scale(torch.tensor(1.0)).item() == 32.0, "history max (8), not the current amax"
    assert not ds.update(torch.tensor(math.inf)) and ds.overflows == 1
    assert ds.scale().item() == 32.0, "an overflowed step is not recorded"
    ds.update(torch.tensor(1.0))  # pushes the 8 out of the 3-step window
    assert ds.scale().item() == 256.0
    ds_margin = DelayedScaling(E4M3, history_len=2, margin=2)
    ds_margin.update(torch.tensor(1.0))
    assert ds_margin.scale().item() == 64.0


def test_sqnr_helper():
    x = torch.randn(100)
    assert sqnr_db(x, x) == math.inf
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-4
