"""The training step (`TrainStep`) in every precision mode: a step whose gradients overflow is skipped,
so nothing non-finite reaches the weights or the optimizer state, and the run goes on."""

import math

import pytest
import torch
from torch import nn

from grmserve.training.components import TrainStep, adamw_factory, build_scheduler
from grmserve.training.config import OptimConfig, PrecisionConfig
from grmserve.training.precision import apply_precision


class _Block(nn.Module):
    """Linears FP8 converts (dims divisible by 16), a norm and a reward head it keeps."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64, bias=False)
        self.norm, self.reward_head = nn.LayerNorm(64), nn.Linear(64, 1)

    def forward(self, x):
        return self.reward_head(self.norm(x + self.down(torch.relu(self.up(x))))).squeeze(-1)


def _loss(model, batch):
    x, overflow = batch
    loss = (model(x) ** 2).mean() * (1e39 if overflow else 1.0)  # inf: its gradients are inf / NaN
    return loss, {"loss": float(loss.detach())}


def _tensors(plan) -> dict[str, torch.Tensor]:
    """Parameters and every optimizer state tensor, as float32 copies."""
    out = {f"param:{n}": p.detach().float().clone() for n, p in plan.model.named_parameters()}
    for i, state in enumerate(plan.optimizer.state.values()):
        out.update({f"state{i}:{k}": v.detach().float().clone() for k, v in state.items()
                    if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("mode,accum", [("fp32", 1), ("bf16", 1), ("fp8-o1", 1), ("fp8-o2", 1), ("fp8-o2", 2)])
def test_an_overflowing_step_is_skipped_and_the_run_goes_on(mode, accum):
    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-3, grad_clip=1.0, warmup_steps=0, max_steps=10)
    plan = apply_precision(_Block(), adamw_factory(optim), PrecisionConfig(mode=mode), device=torch.device("cpu"))
    step = TrainStep(plan.model, plan.optimizer, build_scheduler(plan.optimizer, optim, total_steps=10),
                     loss_fn=_loss, grad_clip=1.0, autocast=plan.autocast)
    g = torch.Generator().manual_seed(1)

    def batches(overflow: bool = False) -> list:
        return [(torch.randn(8, 64, generator=g), overflow and i == accum - 1) for i in range(accum)]

    assert step(batches())["skipped_steps"] == 0
    before = _tensors(plan)
    stats = step(batches(overflow=True))
    assert not math.isfinite(stats["grad_norm"]) and stats["skipped_steps"] == 1
    after = _tensors(plan)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # weights and state untouched
    stats = step(batches())  # the next step learns from its own gradients only
    assert math.isfinite(stats["grad_norm"]) and stats["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in _tensors(plan).values())
    assert not torch.equal(before["param:up.weight"], plan.model.up.weight.detach().float())
