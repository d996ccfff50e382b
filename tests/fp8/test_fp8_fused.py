"""The torch.compile'd FP8 passes (`precision.fp8_fuse`, on by default on CUDA) compute what the eager
ones do: the per-tensor scaling step bit for bit (scale, FP8 bytes, history, counters), FP8AdamW's
update to float32 rounding, with this step's learning rate. Each first call compiles (~15-45 s here)."""

from __future__ import annotations

import pytest
import torch

from grmserve.training.config import PrecisionConfig
from grmserve.training.core.fp8.optim import FP8AdamW
from grmserve.training.core.fp8.scaling import ScalingState
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear
from grmserve.training.precision import fp8_fused


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_saturate_gives_the_same_bytes_eager_and_compiled(dtype):
    """`saturate` is spelled one way eager and another compiled (speed, and the sign of Inductor's NaN):
    the same FP8 bytes for finite, saturating, infinite and NaN values."""
    from grmserve.training.core.fp8.formats import saturate

    fmax = torch.finfo(dtype).max
    y = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * fmax / 2
    y[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 3 * fmax, -3 * fmax])
    compiled = torch.compile(lambda t: saturate(t, fmax).to(dtype))
    eager = saturate(y, fmax).to(dtype)
    assert torch.equal(_bits(compiled(y)), _bits(eager))
    assert torch.isnan(eager[:3].float()).all() and eager[3:6].float().tolist() == [-0.0, fmax, -fmax]
    assert torch.signbit(eager[3].float())  # -0.0 keeps its sign


@pytest.mark.parametrize("fmt,zero_nonfinite", [("e4m3", False), ("e5m2", True)])
def test_fused_scaling_step_is_the_eager_step_bit_for_bit(fmt, zero_nonfinite):
    eager, fused = (ScalingState(fmt, mode="delayed", history_len=4, warmup_steps=1, zero_nonfinite=zero_nonfinite,
                                 fused=f) for f in (False, True))
    gen = torch.Generator().manual_seed(0)
    for i in range(6):  # warm-up, then delayed; growing amax (overflows), an inf step, an all-zero step
        x = torch.randn(40 + 16 * i, 48, generator=gen) * 10.0 ** (i - 2)
        if i == 3:
            x[0, 0] = float("inf")
        if i == 5:
            x.zero_()
        (qa, sa), (qb, sb) = eager.quantize(x), fused.quantize(x)
        assert torch.equal(_bits(qa), _bits(qb)) and torch.equal(sa, sb), i
        for name in ("amax_history", "last_scale", "_counters"):
            assert torch.equal(getattr(eager, name), getattr(fused, name)), (i, name)
    assert eager.stats() == fused.stats() and fused.stats()["nonfinite_steps"] == 1
    assert fused.stats()["overflow"] > 0  # delayed scaling lagged behind the growing amax


@pytest.mark.parametrize("backend,fuse", [("emulated", False), ("scaled_mm", False), ("emulated", True)])
def test_backward_skips_the_gemm_nobody_needs_and_keeps_the_other(backend, fuse):
    """A frozen weight needs no wgrad, an input without gradient no dgrad: the backward pass then lays
    out only the operands of the GEMM that is needed, which gives the same bytes as the full backward."""
    torch.manual_seed(0)
    x, g = torch.randn(32, 64), torch.randn(32, 48)

    def backward(input_grad: bool, weight_grad: bool):
        torch.manual_seed(1)
        layer = FP8TrainingLinear(64, 48, recipe="delayed", fuse=fuse, compute_dtype=torch.float32, backend=backend,
                                  allow_cpu_scaled_mm=True)
        layer.weight.requires_grad_(weight_grad)
        xr = x.clone().requires_grad_(input_grad)
        layer(xr).backward(g)
        return xr.grad, layer.weight.grad

    dx, dw = backward(True, True)
    dx_only, no_dw = backward(True, False)
    no_dx, dw_only = backward(False, True)
    assert no_dw is None and no_dx is None
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw)


@pytest.mark.parametrize("recipe", ["delayed", "block"])
@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
def test_fused_training_linear_matches_eager_forward_and_backward(backend, recipe):
    """Both GEMM backends: the emulated one takes dequantised operands from the compiled passes,
    `torch._scaled_mm` (on CPU here, as on a GPU) the FP8 bytes and their contiguous transposes; the
    per-tensor passes and the block recipe's tile and block passes (what a GPU runs by default)."""
    torch.manual_seed(0)
    x, g = torch.randn(32, 64), torch.randn(32, 48)
    outs = []
    for fuse in (False, True):
        torch.manual_seed(1)
        layer = FP8TrainingLinear(64, 48, recipe=recipe, grad_storage="fp8", fuse=fuse, compute_dtype=torch.float32,
                                  backend=backend, allow_cpu_scaled_mm=True)
        for _ in range(2):  # a warm-up step, then a delayed one
            xr = x.clone().requires_grad_(True)
            y = layer(xr)
            y.backward(g)
        outs.append((y.detach(), xr.grad, layer.weight.scaled_grad, layer.scaling_stats()))
    (y0, dx0, w0, st0), (y1, dx1, w1, st1) = outs
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and st0 == st1
    assert torch.equal(_bits(w0.q), _bits(w1.q)) and torch.equal(w0.scale_inv, w1.scale_inv)


@pytest.mark.parametrize("master,foreach", [("fp32", True), ("fp16", True), ("fp16", False)])
def test_fused_fp8_adamw_tracks_eager_with_a_changing_learning_rate(master, foreach):
    """A compiled update that baked in the first step's learning rate would drift at once. Both the
    bucketed update (`foreach`) and the one-parameter one."""
    shapes = [(300, 64), (1000,)]  # one divides the 128-element blocks, one does not
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        runs.append((params, FP8AdamW(params, lr=1e-2, weight_decay=0.1, master_weights=master, fused=fused,
                                                foreach=foreach)))
    for step in range(4):
        grads = [torch.randn(s, generator=gen) * 10.0 ** -step for s in shapes]
        for params, opt in runs:
            opt.param_groups[0]["lr"] = 1e-2 * 0.5 ** step
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    (eager, eager_opt), (fused, fused_opt) = runs
    for a, b, w0 in zip(eager, fused, start):
        moved = (a - w0).norm()
        assert (a - b).norm() <= 1e-4 * moved, ((a - b).norm(), moved)
        if master == "fp16":  # the parameter is its master's value exactly (a fused kernel once kept float32)
            st = fused_opt.state[b]
            assert torch.equal(b.detach().reshape(-1), st["master"].float() * st["master_scale_inv"])
        m_a, m_b = eager_opt.state[a]["exp_avg"], fused_opt.state[b]["exp_avg"]
        assert m_b.dtype == torch.float8_e4m3fn and (_bits(m_a) != _bits(m_b)).float().mean() < 0.01


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)])
def test_fp8_fuse_setting(setting, device, expected):
    assert fp8_fused(PrecisionConfig(mode="fp8-o2", fp8_fuse=setting), torch.device(device)) is expected
