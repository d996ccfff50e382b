"""FP8InferenceLinear: accuracy against bf16 (SQNR), both backends, and explicit backend selection."""

from __future__ import annotations

import pytest
import torch

from grmserve.training.core.fp8.formats import E4M3, cast_to_fp8, compute_scale, sqnr_db
from grmserve.training.core.fp8.linear import (
    FP8BackendError,
    FP8InferenceLinear,
    check_cuda_scaled_mm,
    fp8_linear_scaled_mm,
    quantize_activations_per_token,
    scaled_mm,
    select_backend,
    set_fp8_backend,
)

GRANULARITIES = [("tensor", None), ("channel", None), ("block", 64), ("block", 128)]


def _linear(in_f=256, out_f=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("granularity,block_size", GRANULARITIES)
def test_sqnr_vs_bf16_linear(granularity, block_size):
    lin = _linear(in_f=576, out_f=192)
    x = torch.randn(64, 576)
    fp8 = FP8InferenceLinear.from_linear(lin, granularity, block_size or 64)
    bf16 = torch.nn.Linear(576, 192).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in lin.state_dict().items()})
    with torch.no_grad():
        ref, y, y_bf16 = lin(x), fp8(x), bf16(x.to(torch.bfloat16)).float()
    assert y.dtype == x.dtype and y.shape == (64, 192)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    assert sqnr_db(y_bf16, y) >= 18
    assert sqnr_db(ref, y) >= 18


def test_block_beats_channel_with_outlier_weights():
    lin = _linear(in_f=512, out_f=64, bias=False)
    with torch.no_grad():
        lin.weight[:, :64] *= 1e4  # the first 64 inputs have weights 1e5x larger than the rest ...
        lin.weight[:, 64:] *= 0.1
    x = torch.randn(32, 512)
    x[:, :64] *= 1e-5  # ... and inputs small enough that every input contributes alike
    with torch.no_grad():
        ref = lin(x)
        channel = sqnr_db(ref, FP8InferenceLinear.from_linear(lin, "channel")(x))
        block = sqnr_db(ref, FP8InferenceLinear.from_linear(lin, "block", 64)(x))
    # Per-channel scales follow the large block, pushing the other weights into e4m3's subnormals.
    assert block >= 18 and block > channel + 6, (block, channel)


def test_dtype_moves_keep_float8_weights_and_float32_scales():
    fp8 = FP8InferenceLinear.from_linear(_linear(), "block", 64)
    bits = fp8.weight.view(torch.uint8).clone()
    scale = fp8.weight_scale.clone()
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        convert(fp8)
        assert fp8.weight.dtype == torch.float8_e4m3fn and torch.equal(fp8.weight.view(torch.uint8), bits)
        assert fp8.weight_scale.dtype == torch.float32 and torch.equal(fp8.weight_scale, scale)
    fp8.to(torch.bfloat16)
    assert fp8.bias.dtype == torch.bfloat16, "the bias follows the model's dtype"
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "bias"}


def test_from_quantized_checks_layout():
    fp8 = FP8InferenceLinear.from_linear(_linear(), "channel")
    with pytest.raises(ValueError, match=r"shape \(128, 4\)"):
        FP8InferenceLinear.from_quantized(fp8.weight, fp8.weight_scale, None, granularity="block", block_size=64)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        FP8InferenceLinear.from_quantized(fp8.weight.float(), fp8.weight_scale, None, granularity="channel")


# --- scaled_mm (W8A8) numerics on CPU ---------------------------------------------------------


def _w8a8_reference(x2d, fp8):
    """What _scaled_mm must compute: per-token e4m3 activations and per-channel e4m3 weights, in float64."""
    scale = compute_scale(x2d.abs().amax(-1, keepdim=True), E4M3)
    xq = cast_to_fp8(x2d * scale, E4M3).double() / scale.double()
    w = fp8.weight.double() * fp8.weight_scale.double()
    out = xq @ w.t()
    return out + fp8.bias.double() if fp8.bias is not None else out


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_matches_exact_w8a8_reference_on_cpu(granularity, bias):
    fp8 = FP8InferenceLinear.from_linear(_linear(bias=bias), granularity, backend="scaled_mm")
    x = torch.randn(2, 24, 256)  # 3-D input, 48 tokens (not a multiple of 16)
    with torch.no_grad():
        y = fp8(x)
        emulated = fp8_emulated_copy(fp8)(x)
    assert y.shape == (2, 24, 128) and y.dtype == torch.float32
    ref = _w8a8_reference(x.reshape(-1, 256), fp8).reshape(2, 24, 128)
    # _scaled_mm accumulates in float32 and rounds its bf16 output once: 2^-8 relative.
    assert torch.allclose(y.double(), ref, rtol=2**-8, atol=1e-3 * ref.abs().max().item())
    # W8A8 vs W8A16: the only difference is the activation rounding.
    assert sqnr_db(emulated, y) >= 25


def fp8_emulated_copy(fp8):
    return FP8InferenceLinear.from_quantized(fp8.weight, fp8.weight_scale, fp8.bias, granularity=fp8.granularity,
                                             block_size=fp8.block_size, backend="emulated")


def test_scaled_mm_with_block_scales_falls_back_to_dequantised_bf16():
    fp8 = FP8InferenceLinear.from_linear(_linear(), "block", 64, backend="scaled_mm")
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert torch.equal(fp8(x), fp8_emulated_copy(fp8)(x))


def test_activation_quantisation_per_token():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 0.0]).unsqueeze(1)
    xq, s = quantize_activations_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and s.shape == (5, 1) and s[4].item() == 1.0
    assert sqnr_db(x[:4], xq[:4].float() * s[:4]) > 25


def test_scaled_mm_block_scale_layout_is_not_supported_on_cpu():
    """Why block weights fall back: `_scaled_mm` takes tensor-wise or row-wise scales only (on CPU,
    and on CUDA without cuBLAS block-scaling support)."""
    a = torch.randn(16, 128).to(torch.float8_e4m3fn)
    b = torch.randn(32, 128).to(torch.float8_e4m3fn)
    with pytest.raises((RuntimeError, ValueError)):
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(32, 2), out_dtype=torch.bfloat16)


def test_scaled_mm_function_shapes():
    fp8 = FP8InferenceLinear.from_linear(_linear(bias=False), "channel")
    y = fp8_linear_scaled_mm(torch.randn(3, 256), fp8.weight, fp8.weight_scale.reshape(1, -1).contiguous(), None)
    assert y.shape == (3, 128)


def test_scaled_mm_function_with_a_bias_runs_with_a_16_bit_output_and_refuses_float32():
    fp8 = FP8InferenceLinear.from_linear(_linear(bias=True), "channel")
    scale_row = fp8.weight_scale.reshape(1, -1).contiguous()
    y = fp8_linear_scaled_mm(torch.randn(3, 256), fp8.weight, scale_row, fp8.bias)
    assert y.shape == (3, 128) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="bias must be bf16 or fp16 with N=128 elements and an output of its dtype"):
        fp8_linear_scaled_mm(torch.randn(3, 256), fp8.weight, scale_row, fp8.bias, compute_dtype=torch.float32)


E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _cuda_call(a_dtype=E4, b_dtype=E4, m=32, k=64, n=48, scales="tensor", b_row_major=False, out=torch.float32):
    """Arguments of ``a @ b`` as the FP8 paths build them, with one thing changed at a time."""
    a = torch.zeros(m, k, dtype=a_dtype)
    b = torch.zeros(k, n, dtype=b_dtype) if b_row_major else torch.zeros(n, k, dtype=b_dtype).t()
    sa, sb = {"tensor": (torch.ones(()), torch.ones(())), "row": (torch.ones(m, 1), torch.ones(1, n)),
              "row-strided": (torch.ones(m, 2)[:, :1], torch.ones(2, n)[:1]),
              "block": (torch.ones(m, k // 32), torch.ones(k // 32, n))}[scales]
    return a, b, sa, sb, out


@pytest.mark.parametrize("change,error", [
    (dict(a_dtype=E5, b_dtype=E5), "both operands are E5M2"),
    (dict(a_dtype=torch.bfloat16), "operands must be float8"),
    (dict(b_row_major=True), "b column-major"),
    (dict(k=72), "multiples of 16"),
    (dict(n=40), "multiples of 16"),
    (dict(scales="block"), "scales must be one element each"),
    (dict(scales="row-strided"), "row-wise scales must be contiguous"),
    (dict(scales="row", b_dtype=E5), "takes b as E4M3 only"),
    (dict(out=torch.float8_e4m3fn, scales="row"), "output must be bf16, fp16 or fp32,"),
])
def test_cuda_scaled_mm_rules_refuse_what_the_cuda_kernels_refuse(change, error):
    """CUDA's kernels refuse each of these; the CPU kernel runs some of them (E5M2 x E5M2, a row-major
    b, E5M2 as a row-wise b, an FP8 row-wise output), so the check stands in for CUDA here."""
    a, b, sa, sb, out = _cuda_call(**change)
    with pytest.raises(ValueError, match=error):
        check_cuda_scaled_mm(a, b, sa, sb, out_dtype=out)
    with pytest.raises(ValueError, match=error):  # the one call site checks before calling torch
        scaled_mm(a, b, sa, sb, out_dtype=out)


@pytest.mark.parametrize("change", [dict(), dict(scales="row"), dict(a_dtype=E5), dict(a_dtype=E5, scales="row"),
                                    dict(b_dtype=E5), dict(out=torch.bfloat16), dict(out=torch.float8_e4m3fn)])
def test_cuda_scaled_mm_rules_accept_the_layouts_the_fp8_paths_use(change):
    a, b, sa, sb, out = _cuda_call(**change)
    check_cuda_scaled_mm(a, b, sa, sb, out_dtype=out)
    assert scaled_mm(a, b, sa, sb, out_dtype=out).shape == (a.shape[0], b.shape[1])


# --- backend selection ------------------------------------------------------------------------


def test_backend_selection_is_explicit():
    assert select_backend("cpu") == "emulated"
    assert select_backend(torch.device("cpu"), "emulated") == "emulated"
    with pytest.raises(FP8BackendError, match=r"compute capability >= 8\.9.*'emulated'"):
        select_backend("cpu", "scaled_mm")
    assert select_backend("cpu", "scaled_mm", allow_cpu_scaled_mm=True) == "scaled_mm"
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        select_backend("cpu", "fast")


def test_set_backend_on_all_layers():
    model = torch.nn.Sequential(FP8InferenceLinear.from_linear(_linear(), "channel"), torch.nn.ReLU(),
                                FP8InferenceLinear.from_linear(_linear(128, 64), "channel"))
    assert set_fp8_backend(model, "scaled_mm") == 2
    assert all(m.backend == "scaled_mm" for m in model if isinstance(m, FP8InferenceLinear))
    with pytest.raises(ValueError, match="select_backend"):
        set_fp8_backend(model, "auto")
    model[0].backend = "bogus"
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        model(torch.randn(2, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the scaled_mm backend runs on sm89+)")
def test_scaled_mm_on_gpu_matches_emulation():
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        with pytest.raises(FP8BackendError):
            select_backend(device, "scaled_mm")
        pytest.skip("GPU below compute capability 8.9: scaled_mm is refused, as tested above")
    assert select_backend(device) == "scaled_mm"
    fp8 = FP8InferenceLinear.from_linear(_linear(), "channel").to(device)
    x = torch.randn(40, 256, device=device)
    with torch.no_grad():
        emulated = fp8(x)
        fp8.backend = "scaled_mm"
        y = fp8(x)
    assert sqnr_db(emulated.cpu(), y.cpu()) >= 25
