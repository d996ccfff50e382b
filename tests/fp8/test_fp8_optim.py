"""FP8AdamW (FP8-LM O2): state dtypes and bytes, tracking torch AdamW, exact save/resume, skipped steps."""

from __future__ import annotations

import io

import pytest
import torch

from grmserve.training.core.fp8.optim import (
    FP16,
    FP8AdamW,
    ScaledGrad,
    block_dequantize,
    block_quantize,
    tensor_quantize,
)


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 32)
    y = x @ (torch.randn(32, 8) * 0.3) + 0.01 * torch.randn(256, 8)
    return x, y


def _model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes and bytes (float8 has no eager comparison on CPU)."""
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _train(model, opt, x, y, steps, seed=2):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    return losses


@pytest.mark.parametrize("master", ["fp32", "fp16"])
def test_state_dtypes_and_bytes_per_param(master):
    model = _model()
    opt = FP8AdamW(model.parameters(), lr=1e-3, master_weights=master)
    x, y = _problem()
    _train(model, opt, x, y, 1)
    for p in model.parameters():
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float8_e4m3fn and st["exp_avg"].element_size() == 1
        assert st["exp_avg_sq"].dtype == torch.float16 and st["exp_avg_sq"].element_size() == 2
        assert st["exp_avg"].numel() == st["exp_avg_sq"].numel() == p.numel()
        if master == "fp16":
            assert st["master"].dtype == torch.float16 and st["master_scale_inv"].numel() == 1
        else:
            assert "master" not in st and p.dtype == torch.float32
    per = opt.state_bytes_per_param()
    assert per["m"] == 1.0 and per["v"] == 2.0
    assert per["master"] == (2.0 if master == "fp16" else 0.0)  # fp32: the parameter itself (4 bytes) is the master
    n = sum(p.numel() for p in model.parameters())
    blocks = sum(-(-p.numel() // 128) for p in model.parameters())
    assert per["scales"] == pytest.approx((2 * blocks * 4 + (4 * 4 if master == "fp16" else 0)) / n)
    assert per["total"] == pytest.approx(3.0 + (2.0 if master == "fp16" else 0.0) + per["scales"])


@pytest.mark.parametrize("kw", [dict(), dict(master_weights="fp16"), dict(block_size=None)])
def test_tracks_torch_adamw_on_regression(kw):
    x, y = _problem()
    ref_model, fp8_model = _model(), _model()
    ref = _train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=3e-3, weight_decay=0.05), x, y, 100)
    got = _train(fp8_model, FP8AdamW(fp8_model.parameters(), lr=3e-3, weight_decay=0.05, **kw), x, y, 100)
    assert got[-1] < 0.1 * got[0], "it must train"
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 0.05, (got[-1], ref[-1])
    for a, b in zip(fp8_model.parameters(), ref_model.parameters()):
        assert ((a - b).norm() / b.norm()).item() < 0.1


def test_param_groups_and_decoupled_weight_decay():
    w = torch.nn.Parameter(torch.ones(16))
    b = torch.nn.Parameter(torch.ones(16))
    opt = FP8AdamW([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0, "lr": 0.0}], lr=0.1)
    w.grad, b.grad = torch.zeros(16), torch.zeros(16)
    opt.step()
    assert torch.allclose(w, torch.full((16,), 1 - 0.1 * 0.5)), "zero gradient: only the decoupled decay acts"
    assert torch.equal(b, torch.ones(16))


@pytest.mark.parametrize("master", ["fp32", "fp16"])
def test_save_load_continues_bit_identically(master):
    x, y = _problem()
    a = _model()
    opt_a = FP8AdamW(a.parameters(), lr=3e-3, master_weights=master)
    _train(a, opt_a, x, y, 5)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(a, opt_a, x, y, 5, seed=9)

    b = _model(seed=7)  # different initial weights: everything must come from the checkpoint
    opt_b = FP8AdamW(b.parameters(), lr=3e-3, master_weights=master)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.state[next(b.parameters())]["exp_avg"].dtype == torch.float8_e4m3fn, "loading must keep FP8 state"
    _train(b, opt_b, x, y, 5, seed=9)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
        for k, v in opt_a.state[pa].items():
            assert _same_bits(v, opt_b.state[pb][k]), k


def test_nonfinite_gradient_skips_the_step():
    model = _model()
    opt = FP8AdamW(model.parameters(), lr=1e-2)
    x, y = _problem()
    _train(model, opt, x, y, 2)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state_dict()["fp8"]["skipped_steps"] == 1


@pytest.mark.parametrize("dtype,bad", [(torch.float8_e4m3fn, float("nan")), (torch.float16, float("inf"))])
def test_a_nonfinite_scaled_gradient_skips_the_step(dtype, bad):
    """Gradients kept as `ScaledGrad` (E4M3 or FP16 values with a scale) are checked as stored."""
    w = torch.nn.Parameter(torch.ones(4, 8))
    opt = FP8AdamW([w], lr=1e-2)
    w.scaled_grad = ScaledGrad.quantize(torch.ones(4, 8), dtype)
    opt.step()
    assert opt.skipped_steps == 0 and not torch.equal(w, torch.ones(4, 8))
    moved = w.detach().clone()
    q = w.scaled_grad.q.float()
    q[1, 2] = bad
    w.scaled_grad = w.scaled_grad._replace(q=q.to(dtype))
    assert not bool(torch.isfinite(w.scaled_grad.norm()))  # what the optimizer's check reads
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(w, moved)


def test_second_moment_survives_tiny_gradients():
    # g = 1e-5: v = 1e-10 is far below float16's smallest subnormal (6e-8); sqrt(v) with a block scale keeps it.
    g = torch.full((256,), 1e-5)
    q, s = block_quantize(g.sqrt() * g.sqrt(), 128, FP16)
    assert torch.allclose(block_dequantize(q, s, 128), g, rtol=1e-3)
    w = torch.nn.Parameter(torch.zeros(256))
    opt = FP8AdamW([w], lr=1e-3, weight_decay=0.0)
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w, torch.full((256,), -1e-3), rtol=1e-2), "first step of Adam moves by lr, whatever |g|"


def test_fp32_master_refuses_low_precision_params():
    with pytest.raises(ValueError, match="master_weights='fp16'"):
        FP8AdamW([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))])


def _param_kinds(kind: str, seed: int) -> list[torch.nn.Parameter]:
    """Parameters of one master kind, sizes that do and do not fill 128-element blocks."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(48, 40), (64, 32), (300,), (7,), (130,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    if kind == "own_fp16":  # the FP16 master is the parameter itself (FP8 training linears, embeddings)
        for p in params:
            q, scale_inv = tensor_quantize(p.detach(), FP16)
            p.data = q
            p.master_scale_inv = scale_inv
    return params


@pytest.mark.parametrize("kind,master", [("param", "fp32"), ("fp16", "fp16"), ("own_fp16", "fp32")])
@pytest.mark.parametrize("grads", ["dense", "e4m3", "fp16"])
def test_buckets_update_exactly_as_one_parameter_at_a_time(kind, master, grads):
    """`foreach` (flat buffers, one update for many parameters) gives the bytes of the per-parameter
    update: parameters, FP16 masters and their scales, moments and their block scales, over steps
    with a changing learning rate."""
    runs = []
    for foreach in (False, True):
        params = _param_kinds(kind, seed=0)
        runs.append((params, FP8AdamW(params, lr=1e-2, weight_decay=0.1, master_weights=master, foreach=foreach)))
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        values = [torch.randn(p.shape, generator=gen) * 10.0 ** -step for p in runs[0][0]]
        for params, opt in runs:
            opt.param_groups[0]["lr"] = 1e-2 * 0.7 ** step
            for p, v in zip(params, values):
                if grads == "dense":
                    p.grad = v.to(p.dtype)
                else:
                    p.scaled_grad = ScaledGrad.quantize(v, torch.float8_e4m3fn if grads == "e4m3" else torch.float16)
            if opt.foreach:
                assert len(opt._buckets(params)) == 1  # all five in one bucket
            opt.step()
            opt.zero_grad()
    (one, one_opt), (many, many_opt) = runs
    for a, b in zip(one, many):
        assert _same_bits(a.detach(), b.detach())
        if kind == "own_fp16":
            assert torch.equal(a.master_scale_inv, b.master_scale_inv)
        sa, sb = one_opt.state[a], many_opt.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert _same_bits(sa[key], sb[key]), key
