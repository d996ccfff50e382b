"""FP8 training on a CUDA GPU (sm89+): the `scaled_mm` backend of FP8TrainingLinear against fp32 and
against the CPU emulation of the same FP8 operands, FP8AdamW with FP16 masters on the GPU, and a few
FP8-O2 steps of a tiny GRM through the precision plan, with the FP8 passes compiled (precision.fp8_fuse)
and eager. Skipped without a GPU (CPU-side numerics of the
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


def train_tiny_grm_with_fp16_masters(device: torch.device, steps: int = 6, fuse: str = "auto") -> list[float]:
    """A few fp8-o2 steps of a tiny tied GRM with FP16 masters on `device` (`fuse`: precision.fp8_fuse);
    checks where everything lives."""
    from grmserve.training.config import PrecisionConfig
    from grmserve.training.core.assets import tiny_llama_config
    from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm
    from grmserve.training.precision import apply_precision

    model = init_grm(tiny_llama_config(hidden_size=64), seed=0, grm=GRMConfig(head=HeadConfig(dropout=0.0)))
    plan = apply_precision(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                           PrecisionConfig(mode="fp8-o2", fp8_master="fp16", fp8_fuse=fuse), device=device)
    embedding = plan.model.lm.get_input_embeddings()
    assert embedding.weight.dtype == torch.float16 and embedding.weight.device.type == device.type
    assert embedding.fp16_master is plan.model.lm.get_output_embeddings().fp16_master
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (4, 24), generator=gen).to(device)
    mask, response = torch.ones_like(ids), torch.zeros_like(ids)
    response[:, 12:] = 1
    losses = []
    for _ in range(steps):
        out = plan.model(ids, mask, response_mask=response)
        loss = -out.logps.mean() / 12  # the LM loss: lookup and tied head both train
        loss.backward()
        assert embedding.weight.grad is None and embedding.weight.scaled_grad.q.device.type == device.type
        plan.optimizer.step()
        plan.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_fp8_o2_fp16_masters_train_a_tied_grm_on_gpu():
    """The tied embedding's FP16 master and FP16 gradient on the GPU, beside scaled_mm FP8 linears."""
    losses = train_tiny_grm_with_fp16_masters(torch.device("cuda"))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_fused_fp8_passes_match_eager_ones_on_gpu():
    """precision.fp8_fuse (auto: on for CUDA, Triton kernels from torch.compile) against the eager passes:
    the first loss is the same forward; later ones differ only by the optimizer's float32 rounding."""
    fused = train_tiny_grm_with_fp16_masters(torch.device("cuda"), fuse="on")
    eager = train_tiny_grm_with_fp16_masters(torch.device("cuda"), fuse="off")
    assert abs(fused[0] - eager[0]) <= 1e-6 * abs(eager[0]), (fused, eager)
    assert max(abs(a - b) / abs(b) for a, b in zip(fused, eager)) < 1e-2, (fused, eager)


def test_fp8_o3_pieces_on_one_gpu(tmp_path):
    """NCCL on the GPU: E4M3 all-gathers, FP8AdamW on CUDA shards, the FP8 reduce-scatter's ops (with two
    or more GPUs: bench/fp8_train.py's fp8-o3 mode under torchrun)."""
    from .test_fp8_fsdp import o3_pieces

    got = o3_pieces(torch.device("cuda"), "scaled_mm", str(tmp_path / "store"))
    assert got["installed"] and got["gathered"] > 0 and got["shard_device"].type == "cuda"
    assert all(torch.isfinite(torch.tensor(got["losses"]))) and got["losses"][-1] < got["losses"][0], got["losses"]
    assert sqnr_db(got["grads"], got["reduced"]) >= 25


@pytest.mark.parametrize("recipe", ["delayed", "block"])
def test_gradient_checkpointing_replays_compiled_scaled_mm_passes_on_gpu(recipe):
    """The replay of a checkpointed forward inside the backward, with the compiled passes and
    `torch._scaled_mm` (what a GPU runs): the same weights and scaling state as without checkpointing
    (the CPU test, test_fp8_training_linear.py, covers every recipe eagerly)."""
    from torch.utils.checkpoint import checkpoint

    def train(checkpointed: bool) -> FP8TrainingLinear:
        torch.manual_seed(3)
        layer = FP8TrainingLinear(K, N, recipe=recipe, backend="scaled_mm", grad_storage="fp8", fuse=True,
                                  device="cuda")
        opt = FP8AdamW(layer.parameters(), lr=1e-3)
        for step in range(3):
            x = torch.randn(M, K, device="cuda", generator=torch.Generator("cuda").manual_seed(step),
                            requires_grad=True)
            y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            (y.float().square().mean() * (1 + 10 * step)).backward()
            opt.step()
            opt.zero_grad()
        return layer

    plain, replayed = train(False), train(True)
    assert torch.equal(plain.weight, replayed.weight)
    assert plain.scaling_stats() == replayed.scaling_stats()
    assert torch.equal(plain.states.input.amax_history, replayed.states.input.amax_history)
