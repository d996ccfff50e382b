"""Each loss against a hand computation (plain Python math, no torch.nn.functional)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from grmserve.training import losses
from grmserve.training.losses import (
    bt_loss,
    bt_margin_loss,
    bt_smoothed_loss,
    dpo_loss,
    dpo_noref_loss,
    grm_loss,
    needs_logps,
    nll_loss,
    pairwise_accuracy,
    regulariser_loss,
    reward_loss,
    sft_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


R_C = [1.5, -0.2, 0.3]
R_R = [0.5, 0.4, 0.3]
LOGP_C = [-12.0, -3.5, -20.0]
LOGP_R = [-10.0, -6.0, -25.0]
REF_C = [-11.0, -4.0, -21.0]
REF_R = [-11.0, -5.0, -24.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def mean(xs):
    return sum(xs) / len(xs)


def test_bradley_terry():
    expected = -mean([log_sigmoid(c - r) for c, r in zip(R_C, R_R)])
    assert bt_loss(t(R_C), t(R_R)).item() == pytest.approx(expected, rel=1e-6)
    assert reward_loss(t(R_C), t(R_R), "bt").item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_margin_scalar_and_per_pair():
    m = 0.7
    expected = -mean([log_sigmoid(c - r - m) for c, r in zip(R_C, R_R)])
    assert bt_margin_loss(t(R_C), t(R_R), m).item() == pytest.approx(expected, rel=1e-6)
    margins = [0.0, 1.0, 2.0]
    expected = -mean([log_sigmoid(c - r - mm) for c, r, mm in zip(R_C, R_R, margins)])
    assert bt_margin_loss(t(R_C), t(R_R), t(margins)).item() == pytest.approx(expected, rel=1e-6)
    assert bt_margin_loss(t(R_C), t(R_R), 0.0).item() == pytest.approx(bt_loss(t(R_C), t(R_R)).item())


def test_bradley_terry_label_smoothing():
    eps = 0.1
    expected = -mean([(1 - eps) * log_sigmoid(c - r) + eps * log_sigmoid(r - c) for c, r in zip(R_C, R_R)])
    assert bt_smoothed_loss(t(R_C), t(R_R), eps).item() == pytest.approx(expected, rel=1e-6)
    assert reward_loss(t(R_C), t(R_R), "bt-smooth", label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        bt_smoothed_loss(t(R_C), t(R_R), 0.7)


def test_sft_regularisers():
    beta = 0.1
    assert sft_loss(t(LOGP_C), beta).item() == pytest.approx(-mean([log_sigmoid(beta * x) for x in LOGP_C]), rel=1e-6)
    assert nll_loss(t(LOGP_C)).item() == pytest.approx(-mean(LOGP_C), rel=1e-6)
    assert regulariser_loss("sft", t(LOGP_C), beta=beta).item() == pytest.approx(sft_loss(t(LOGP_C), beta).item())
    assert regulariser_loss("sft-nll", t(LOGP_C)).item() == pytest.approx(-mean(LOGP_C))


def test_dpo_regularisers():
    beta = 0.1
    expected = -mean([log_sigmoid(beta * ((c - r) - (rc - rr))) for c, r, rc, rr in zip(LOGP_C, LOGP_R, REF_C, REF_R)])
    assert dpo_loss(t(LOGP_C), t(LOGP_R), t(REF_C), t(REF_R), beta).item() == pytest.approx(expected, rel=1e-6)
    expected_noref = -mean([log_sigmoid(beta * (c - r)) for c, r in zip(LOGP_C, LOGP_R)])
    assert dpo_noref_loss(t(LOGP_C), t(LOGP_R), beta).item() == pytest.approx(expected_noref, rel=1e-6)
    assert (regulariser_loss("dpo", t(LOGP_C), t(LOGP_R), t(REF_C), t(REF_R), beta=beta).item()
            == pytest.approx(expected, rel=1e-6))
    with pytest.raises(ValueError, match="ref_c"):
        regulariser_loss("dpo", t(LOGP_C), t(LOGP_R))


def test_dpo_reference_carries_no_gradient():
    ref_c = t(REF_C).requires_grad_()
    logp_c = t(LOGP_C).requires_grad_()
    dpo_loss(logp_c, t(LOGP_R), ref_c, t(REF_R)).backward()
    assert ref_c.grad is None and logp_c.grad is not None


def test_convex_mix_and_defaults():
    reg, rew = torch.tensor(3.0), torch.tensor(0.5)
    assert grm_loss(reg, rew).item() == pytest.approx(0.01 * 3.0 + 0.99 * 0.5)
    assert grm_loss(reg, rew, alpha=1.0).item() == pytest.approx(3.0)
    assert grm_loss(None, rew, alpha=0.3).item() == pytest.approx(0.5)
    assert (losses.DEFAULT_ALPHA, losses.DEFAULT_BETA) == (0.01, 0.1)
    with pytest.raises(ValueError):
        grm_loss(reg, rew, alpha=1.5)


def test_pairwise_accuracy_counts_ties_as_wrong():
    assert pairwise_accuracy(t(R_C), t(R_R)).item() == pytest.approx(1 / 3)


def test_needs_logps_and_unknown_names():
    assert needs_logps("dpo-noref") == (True, True)
    assert needs_logps("sft-nll") == (True, False)
    with pytest.raises(ValueError, match="unknown regulariser"):
        regulariser_loss("ppo", t(LOGP_C))
    with pytest.raises(ValueError, match="unknown reward loss"):
        reward_loss(t(R_C), t(R_R), "hinge")


def test_docstring_examples_run():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10
