"""FP8 training on a CUDA GPU (sm89+): the `scaled_mm` backend of FP8TrainingLinear against fp32 and
against the CPU emulation of the same FP8 operands, FP8AdamW with FP16 masters on the GPU, and a few
FP8-O2 steps of a tiny GRM through the precision plan. Skipped without a GPU (CPU-side numerics of the
same GEMMs: test_fp8_training_linear.py::test_scaled_mm_on_cpu_matches_emulated)."""

from __future__ import annotations

import pytest
import torch

from grmserve.training.core.fp8.formats import sqnr_db
from grmserve.training.core.fp8.optim import FP8AdamW
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                       reason="needs a CUDA GPU with compute capability >= 8.9 (torch._scaled_mm FP8 kernels)"),
]
RECIPES = ["delayed", "current", "block"]
M, K, N = 256, 384, 512


def _fwd_bwd(module, x, g):
    module.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y = module(xr)
    y.backward(g)
    return y.detach().float().cpu(), xr.grad.float().cpu(), module.weight.grad.float().cpu()


@pytest.mark.parametrize("recipe", RECIPES)
def test_scaled_mm_training_linear_on_gpu(recipe):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    x, g = torch.randn(M, K), torch.randn(M, N)
    x[:, :4] *= 100.0  # outlier channels
    ref = _fwd_bwd(lin, x, g)
    gpu = FP8TrainingLinear.from_linear(_clone(lin).cuda(), recipe=recipe, backend="scaled_mm")
    got = _fwd_bwd(gpu, x.cuda(), g.cuda())
    for name, a, b in zip(("forward", "dgrad", "wgrad"), ref, got):
        assert sqnr_db(a, b) >= 20, (recipe, name, sqnr_db(a, b))
    emulated = FP8TrainingLinear.from_linear(_clone(lin), recipe=recipe, backend="emulated",
                                             compute_dtype=torch.float32)
    cpu = _fwd_bwd(emulated, x, g)
    for name, a, b in zip(("forward", "dgrad", "wgrad"), cpu, got):  # same FP8 operands, other GEMM
        assert sqnr_db(a, b) >= 35, (recipe, name, sqnr_db(a, b))


def _clone(lin):
    new = torch.nn.Linear(lin.in_features, lin.out_features)
    new.load_state_dict(lin.state_dict())
    return new


def test_fp8_o2_steps_on_gpu():
    from grmserve.training.config import PrecisionConfig
    from grmserve.training.precision import apply_precision

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    x = torch.randn(512, 256)
    y = torch.tanh(x @ torch.randn(256, 256) / 16)
    plan = apply_precision(model, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3),
                           PrecisionConfig(mode="fp8-o2", fp8_master="fp16"), device=torch.device("cuda"))
    assert plan.model[0].resolved_backend(torch.device("cuda")) == "scaled_mm"
    assert plan.model[0].weight.dtype == torch.float16 and plan.model[0].weight.is_cuda
    assert isinstance(plan.optimizer, FP8AdamW)
    xc, yc = x.cuda(), y.cuda()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(plan.model(xc), yc)
        loss.backward()
        assert plan.model[0].weight.grad is None and plan.model[0].weight.scaled_grad.q.is_cuda
        plan.optimizer.step()
        plan.optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
