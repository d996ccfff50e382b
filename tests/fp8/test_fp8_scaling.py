"""FP8 training scaling states: delayed scaling after warm-up, counters, amax spikes, checkpoints."""

from __future__ import annotations

import pytest
import torch

from grmserve.training.core.fp8.scaling import (
    FP8TrainingRecipe,
    ScalingState,
    build_role_states,
    get_training_recipe,
    min_subnormal,
)
from grmserve.training.core.fp8.training_linear import FP8TrainingLinear


def _full(value: float) -> torch.Tensor:
    return torch.full((8, 16), value)


def test_warmup_uses_current_amax_then_history():
    st = ScalingState("e4m3", mode="delayed", history_len=3, warmup_steps=2)
    _, s1 = st.quantize(_full(4.0))  # warm-up: current amax 4 -> scale 64
    _, s2 = st.quantize(_full(1.0))  # warm-up: current amax 1 -> scale 256
    assert (1 / s1.item(), 1 / s2.item()) == (64.0, 256.0)
    _, s3 = st.quantize(_full(0.25))  # delayed: history (1, 4) -> 64, not the current amax 0.25
    assert 1 / s3.item() == 64.0
    _, s4 = st.quantize(_full(0.25))  # history (0.25, 1, 4) -> still 64
    _, s5 = st.quantize(_full(0.25))  # history (0.25, 0.25, 1): 4 has left the window -> 256
    _, s6 = st.quantize(_full(0.25))  # history (0.25, 0.25, 0.25) -> 1024
    assert [1 / s.item() for s in (s4, s5, s6)] == [64.0, 256.0, 1024.0]
    assert st.stats()["steps"] == 6


def test_margin_and_current_mode():
    st = ScalingState("e5m2", mode="current", margin=2)
    _, s = st.quantize(_full(1.0))
    assert 1 / s.item() == 2.0 ** 15 / 4  # 2^floor(log2(57344)) = 2^15, margin 2


def test_overflow_and_underflow_counters_are_exact():
    st = ScalingState("e4m3", mode="delayed", history_len=4, warmup_steps=1)
    st.quantize(torch.full((10,), 1.0))  # scale 256 from here on (history max 1)
    x = torch.tensor([1.0, 2.0, 3.0, 1e-6, 2.0 ** -18, -(2.0 ** -19), 0.0, 1.0])
    q, s_inv = st.quantize(x)
    stats = st.stats()
    # 2.0 and 3.0 times 256 exceed 448 and saturate; 1e-6 * 256 and 2^-18 * 256 = 2^-10 (a tie, to even)
    # round to zero (e4m3's smallest step is 2^-9); -2^-19 * 256 = -2^-11 too; 0.0 does not count.
    assert stats["overflow"] == 2 and stats["underflow"] == 3, stats
    assert q.float()[1].item() == 448.0 and q.float()[3:7].abs().sum() == 0
    assert min_subnormal("e4m3") == 2.0 ** -9 and min_subnormal("e5m2") == 2.0 ** -16


def test_nonfinite_amax_keeps_last_good_scale_and_zeroes_backward_roles():
    st = ScalingState("e5m2", mode="delayed", history_len=4, warmup_steps=1, zero_nonfinite=True)
    st.quantize(_full(2.0))
    hist = st.amax_history.clone()
    spike = _full(1.0)
    spike[0, 0] = float("inf")
    spike[1, 1] = float("nan")
    q, s_inv = st.quantize(spike)
    assert q.float().abs().sum() == 0, "a non-finite step must not pass anything on"
    assert torch.equal(st.amax_history, hist), "a non-finite amax must not enter the history"
    assert st.stats()["nonfinite_steps"] == 1
    q, s_inv2 = st.quantize(_full(1.0))
    assert torch.isfinite(q.float()).all() and s_inv2 == s_inv


@pytest.mark.parametrize("mode", ["delayed", "current"])
def test_an_inf_activation_stays_visible_in_the_forward(mode):
    """A forward role does not zero a non-finite step (the loss must show it) nor clamp inf to ±448:
    the FP8 value is NaN, the layer's output is non-finite, and the step is counted."""
    layer = FP8TrainingLinear(64, 32, recipe=mode, compute_dtype=torch.float32)
    x = torch.randn(16, 64)
    layer(x)
    x[2, 3] = float("inf")
    y = layer(x)
    assert not torch.isfinite(y[2]).all() and torch.isfinite(y[0]).all()
    assert layer.scaling_stats()["input"]["nonfinite_steps"] == 1


def test_forward_amax_spike_saturates_then_scale_adapts():
    st = ScalingState("e4m3", mode="delayed", history_len=4, warmup_steps=1)
    st.quantize(_full(1.0))
    spike = _full(1.0)
    spike[0, :4] = 1e4  # a 10^4 spike: this step uses the old scale and saturates
    q, _ = st.quantize(spike)
    assert st.stats()["overflow"] == 4 and torch.isfinite(q.float()).all()
    _, s_inv = st.quantize(_full(1.0))  # the next step's scale covers the spike
    assert 1e4 / s_inv.item() <= 448.0
    assert st.stats()["overflow"] == 4


def test_grad_output_spike_in_a_layer_leaves_weights_and_grads_finite():
    torch.manual_seed(0)
    layer = FP8TrainingLinear(64, 32, recipe="delayed", compute_dtype=torch.float32)
    x = torch.randn(16, 64, requires_grad=True)
    layer(x).sum().backward()  # a normal step
    layer.weight.grad = None
    x.grad = None
    y = layer(x)
    g = torch.ones_like(y)
    g[3, 5] = float("inf")  # a loss spike flowing back
    y.backward(g)
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()
    assert layer.weight.grad.abs().sum() == 0 and x.grad.abs().sum() == 0, "the overflowed step contributes nothing"
    stats = layer.scaling_stats()
    assert stats["grad_output"]["nonfinite_steps"] == 1
    layer.weight.grad = None
    layer(x).sum().backward()  # and the next step is normal again
    assert layer.weight.grad.abs().sum() > 0 and torch.isfinite(layer.weight).all()


def test_state_dict_round_trip_is_bit_identical():
    a = ScalingState("e4m3", mode="delayed", history_len=4, warmup_steps=1)
    for v in (1.0, 3.0, float("inf"), 0.5):
        a.quantize(_full(v))
    b = ScalingState("e4m3", mode="delayed", history_len=4, warmup_steps=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 16)
    qa, sa = a.quantize(x)
    qb, sb = b.quantize(x)
    assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(sa, sb)
    assert a.stats() == b.stats()
    with pytest.raises(ValueError, match="does not match"):
        ScalingState("e5m2").load_state_dict(a.state_dict())


def test_recipes_by_name_and_roles():
    assert ([get_training_recipe(n).granularity for n in ("delayed", "current", "block")]
            == ["tensor", "tensor", "block"])
    states = build_role_states(get_training_recipe("current"))
    assert [s.fmt.name for s in states] == ["e4m3", "e4m3", "e5m2", "e4m3"]
    assert all(s.mode == "current" for s in states)
    assert states.grad_output.zero_nonfinite and not states.input.zero_nonfinite
    with pytest.raises(ValueError, match="unknown FP8 training recipe"):
        get_training_recipe("mxfp8")
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8TrainingRecipe(name="block", tile=100)
    # Delayed scaling with no warm-up would start from scale 1 and flush small activations to zero.
    with pytest.raises(ValueError, match="warmup_steps"):
        FP8TrainingRecipe(warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        ScalingState("e4m3", mode="delayed", warmup_steps=0)


def test_block_recipe_eval_forward_leaves_the_scaling_state_alone():
    """An evaluation forward of the `block` recipe quantises the same bytes as a training one but records
    nothing; a training forward + backward records one step per role (the backward's second layouts of
    the gradient and of the saved input are not steps of their own)."""
    torch.manual_seed(0)
    layer = FP8TrainingLinear(160, 48, recipe="block", compute_dtype=torch.float32)
    layer(torch.randn(24, 160)).sum().backward()

    def state():
        return {role: st.state_dict() for role, st in zip(layer.states._fields, layer.states)}

    def same(a, b):
        return all(torch.equal(x, y) if torch.is_tensor(x) else x == y
                   for role in a for x, y in zip(a[role].values(), b[role].values()))

    x = torch.randn(24, 160) * 1000  # a large amax: it would enter the history if recorded
    before = state()
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    assert same(before, state()), "an evaluation forward must leave every role's state alone"
    recorded = FP8TrainingLinear(160, 48, recipe="block", compute_dtype=torch.float32)
    recorded.load_state_dict(layer.state_dict())
    st = recorded.states.input
    (q_rec, s_rec), (q_eval, s_eval) = st.quantize_tiles(x, 128), st.quantize_tiles(x, 128, record=False)
    assert torch.equal(q_rec.view(torch.uint8), q_eval.view(torch.uint8)) and torch.equal(s_rec, s_eval)
    assert torch.equal(recorded.train()(x).detach(), y_eval), "the same output as a recording forward"

    layer.train()
    layer(x).sum().backward()
    after = state()
    assert all(not same({r: before[r]}, {r: after[r]}) for r in before), "training changes every role"
    assert {r: after[r]["steps"] - before[r]["steps"] for r in after} == dict.fromkeys(after, 1)
    assert layer.scaling_stats()["input"]["elements"] == 2 * 24 * 160  # one forward's worth per step
