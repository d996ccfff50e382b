"""FP8-LM O2's memory layout: weight gradients stored in E4M3 in place of ``.grad``, the weight itself
stored as the FP16 master with a scale (no fp32 copy), gradient clipping over both kinds, and the
bytes per parameter that the precision plan ends up holding."""

from __future__ import annotations

import io

import pytest
import torch

from grmserve.training.config import PrecisionConfig
from grmserve.training.core.fp8.optim import FP8AdamW, ScaledGrad, clip_grad_norm_, gradient
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear
from grmserve.training.precision import apply_precision

K, N, M = 128, 64, 48


def _pair(seed: int = 0, **kw):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    return (FP8TrainingLinear.from_linear(lin, recipe="delayed", compute_dtype=torch.float32),
            FP8TrainingLinear.from_linear(_copy(lin), recipe="delayed", compute_dtype=torch.float32, **kw))


def _copy(lin: torch.nn.Linear) -> torch.nn.Linear:
    new = torch.nn.Linear(lin.in_features, lin.out_features)
    new.load_state_dict(lin.state_dict())
    return new


def test_fp8_grad_storage_keeps_the_e4m3_gradient_instead_of_grad():
    dense, fp8 = _pair(grad_storage="fp8")
    x, g = torch.randn(M, K), torch.randn(M, N)
    dense(x).backward(g)
    fp8(x).backward(g)
    assert fp8.weight.grad is None and isinstance(fp8.weight.scaled_grad, ScaledGrad)
    assert fp8.weight.scaled_grad.q.dtype == torch.float8_e4m3fn and fp8.weight.scaled_grad.q.shape == (N, K)
    assert torch.equal(fp8.weight.scaled_grad.dequantize(), dense.weight.grad)  # the same value, 1 byte not 4
    assert torch.equal(fp8.bias.grad, dense.bias.grad)  # biases keep ordinary gradients


def test_fp8_grad_accumulates_over_micro_batches():
    _, fp8 = _pair(grad_storage="fp8")
    ref = torch.nn.Linear(K, N)
    ref.load_state_dict({"weight": fp8.weight.detach(), "bias": fp8.bias.detach()})
    for seed in range(3):
        torch.manual_seed(10 + seed)
        x, g = torch.randn(M, K), torch.randn(M, N)
        fp8(x).backward(g)
        ref(x).backward(g)
    got, want = fp8.weight.scaled_grad.dequantize(), ref.weight.grad
    assert (got - want).norm() / want.norm() < 0.08  # three E4M3 roundings of the running sum
    with pytest.raises(ValueError, match="grad_storage"):
        FP8TrainingLinear(K, N, grad_storage="fp4")


def test_fp16_master_in_place_trains_like_the_fp32_master():
    a, b = _pair(grad_storage="fp8")
    b.keep_fp16_master()
    assert b.weight.dtype == torch.float16 and b.weight.master_scale_inv is b.weight_scale_inv
    assert torch.allclose(b.effective_weight(), a.weight, rtol=1e-3, atol=0)
    opt_a, opt_b = FP8AdamW(a.parameters(), lr=1e-3), FP8AdamW(b.parameters(), lr=1e-3)
    torch.manual_seed(3)
    for _ in range(5):
        x, g = torch.randn(M, K), torch.randn(M, N)
        for layer, opt in ((a, opt_a), (b, opt_b)):
            layer(x).backward(g)
            opt.step()
            opt.zero_grad()
    assert b.weight.dtype == torch.float16 and "master" not in opt_b.state[b.weight]  # no second copy
    assert b.weight.scaled_grad is None  # zero_grad clears FP8 gradients too
    drift = (b.effective_weight() - a.weight).abs().max() / a.weight.abs().max()
    assert drift < 2e-3, drift  # FP16's 11 significant bits against fp32's


def test_fp16_master_scale_link_follows_a_move():
    """Moving a module (`.to(device)`) replaces its buffers and keeps its parameters: the weight's link
    to its scale must follow, or `FP8AdamW` would update a scale the layer no longer reads."""
    _, layer = _pair(grad_storage="fp8")
    layer.keep_fp16_master()
    old = layer.weight_scale_inv
    layer._apply(lambda t: t.clone())  # what a move to another device does to each tensor
    assert layer.weight_scale_inv is not old and layer.weight.master_scale_inv is layer.weight_scale_inv
    opt = FP8AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(M, K)).square().mean().backward()
    before = layer.effective_weight().clone()
    opt.step()
    assert not torch.equal(layer.effective_weight(), before) and torch.isfinite(layer.effective_weight()).all()


def test_fp16_master_resumes_bit_identically_through_state_dict():
    def build():
        _, layer = _pair(seed=7, grad_storage="fp8")
        layer.keep_fp16_master()
        return layer, FP8AdamW(layer.parameters(), lr=1e-2)

    def train(layer, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            layer(torch.randn(M, K, generator=gen)).backward(torch.randn(M, N, generator=gen))
            opt.step()
            opt.zero_grad()

    a, opt_a = build()
    train(a, opt_a, 2, 0)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    train(a, opt_a, 2, 1)
    b, opt_b = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert b.weight.master_scale_inv is b.weight_scale_inv  # loaded in place: the link holds
    train(b, opt_b, 2, 1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_scale_inv, b.weight_scale_inv)


def test_clip_grad_norm_covers_fp8_and_dense_gradients():
    _, layer = _pair(grad_storage="fp8")
    layer(torch.randn(M, K)).backward(torch.randn(M, N) * 50)
    params = list(layer.parameters())
    values = [gradient(p).clone() for p in params]
    want = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in values]))
    q_before = layer.weight.scaled_grad.q.view(torch.uint8).clone()
    stored = layer.weight.scaled_grad  # its norm came with it from the weight-gradient pass
    assert stored.l2 is not None and torch.allclose(stored.l2, torch.linalg.vector_norm(stored.dequantize()))
    total = clip_grad_norm_(params, 1.0)
    assert torch.allclose(total, want, rtol=1e-5)
    after = torch.linalg.vector_norm(torch.cat([gradient(p).reshape(-1) for p in params]))
    assert torch.allclose(after, torch.tensor(1.0), rtol=1e-4)
    assert torch.equal(layer.weight.scaled_grad.q.view(torch.uint8), q_before)  # only the scale moved
    clipped = layer.weight.scaled_grad
    assert torch.allclose(clipped.norm(), torch.linalg.vector_norm(clipped.dequantize()), rtol=1e-5)  # l2 followed


def _bytes_per_param(model: torch.nn.Module, optimizer) -> dict[str, float]:
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    grads += sum(p.scaled_grad.q.numel() + 4 for p in params if getattr(p, "scaled_grad", None) is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.ndim)
    return {"fp8_linear_weights": sum(p.numel() for p in params if p.dtype == torch.float16) / n,
            "total": (weights + grads + state) / n}


def test_o2_plan_holds_about_six_bytes_per_fp8_linear_parameter():
    """FP8-LM's arithmetic: FP16 master 2 + FP8 gradient 1 + FP8 m 1 + FP16 v 2 = 6 bytes; a stack
    of FP8 linears (no embeddings) lands at 6 plus the biases and block scales."""
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(4)])
    plan = apply_precision(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                           PrecisionConfig(mode="fp8-o2", fp8_master="fp16", fp8_backend="emulated"),
                           device=torch.device("cpu"))
    plan.model(torch.randn(8, 256)).square().mean().backward()
    plan.optimizer.step()
    plan.model(torch.randn(8, 256)).square().mean().backward()
    got = _bytes_per_param(plan.model, plan.optimizer)
    assert got["fp8_linear_weights"] == 1.0
    assert 6.0 <= got["total"] <= 6.1, got  # bf16-AMP AdamW holds 16: 0.38x
