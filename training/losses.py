"""GRM losses as pure functions of rewards and log-probabilities (no models, no state).

Notation (shapes in comments): `r_c`, `r_r` are the rewards of the chosen and rejected responses,
`logp_c`, `logp_r` their summed response-token log-probabilities under the policy (the GRM model's
LM head), `ref_c`, `ref_r` the same under a frozen reference model. All are (B,) float tensors, one
entry per preference pair; every loss returns a scalar mean over the B pairs.

    L_R       = -mean log σ(r_c - r_r)                                         bt_loss
    SFT reg   = -mean log σ(β · logp_c)        (variant: -mean logp_c)       sft_loss, nll_loss
    DPO reg   = -mean log σ(β · ((logp_c - logp_r) - (ref_c - ref_r)))       dpo_loss
    DPO-noref = -mean log σ(β · (logp_c - logp_r))                           dpo_noref_loss
    L         = α · L_reg + (1 - α) · L_R      (α = 0.01, β = 0.1)           grm_loss

    >>> import torch
    >>> r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    >>> round(bt_loss(r_c, r_r).item(), 3)      # (log(1 + e^-2) + log 2) / 2
    0.41
    >>> pairwise_accuracy(r_c, r_r).item()      # a tie is not a win
    0.5
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

DEFAULT_ALPHA = 0.01
DEFAULT_BETA = 0.1

RewardLoss = Literal["bt", "bt-margin", "bt-smooth"]
Regulariser = Literal["none", "sft", "sft-nll", "dpo", "dpo-noref"]
REWARD_LOSSES: tuple[str, ...] = get_args(RewardLoss)
REGULARISERS: tuple[str, ...] = get_args(Regulariser)


# ---------------------------------------------------------------------------------------------
# Reward (Bradley-Terry) losses


def bt_loss(r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss `-mean log σ(r_c - r_r)`.

    >>> import torch
    >>> round(bt_loss(torch.tensor([0.0]), torch.tensor([0.0])).item(), 4)   # log 2
    0.6931
    """
    return -F.logsigmoid(r_c.float() - r_r.float()).mean()  # (B,) -> ()


def bt_margin_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin: float | torch.Tensor) -> torch.Tensor:
    """Bradley-Terry with a margin (Llama-2 style): `-mean log σ(r_c - r_r - m)`.

    `margin` is a scalar or a (B,) tensor of per-pair margins; 0 gives `bt_loss`.

    >>> import torch
    >>> round(bt_margin_loss(torch.tensor([1.0]), torch.tensor([0.0]), 1.0).item(), 4)   # log 2
    0.6931
    """
    margin = torch.as_tensor(margin, dtype=torch.float32, device=r_c.device)
    return -F.logsigmoid(r_c.float() - r_r.float() - margin).mean()


def bt_smoothed_loss(r_c: torch.Tensor, r_r: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Bradley-Terry with label smoothing ε: `-mean[(1-ε) log σ(d) + ε log σ(-d)]`, d = r_c - r_r.

    ε is the assumed probability that a preference label is flipped; ε = 0 gives `bt_loss`.

    >>> import torch
    >>> # no preference learnt at ε = 0.5
    >>> round(bt_smoothed_loss(torch.tensor([5.0]), torch.tensor([0.0]), 0.5).item(), 4)
    2.5067
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    d = r_c.float() - r_r.float()  # (B,)
    return -((1.0 - label_smoothing) * F.logsigmoid(d) + label_smoothing * F.logsigmoid(-d)).mean()


def reward_loss(r_c: torch.Tensor, r_r: torch.Tensor, kind: str = "bt", *, margin: float | torch.Tensor = 0.0,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """The reward loss named by `kind` (one of `REWARD_LOSSES`).

    >>> import torch
    >>> (reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), "bt-margin", margin=1.0).item()
    ...  == bt_loss(torch.zeros(1), torch.zeros(1)).item())
    True
    """
    if kind == "bt":
        return bt_loss(r_c, r_r)
    if kind == "bt-margin":
        return bt_margin_loss(r_c, r_r, margin)
    if kind == "bt-smooth":
        return bt_smoothed_loss(r_c, r_r, label_smoothing)
    raise ValueError(f"unknown reward loss {kind!r}; expected one of {REWARD_LOSSES}")


# ---------------------------------------------------------------------------------------------
# Text-generation regularisers on the shared hidden state (GRM)


def sft_loss(logp_c: torch.Tensor, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """GRM's SFT regulariser `-mean log σ(β · logp_c)` (bounded form of the chosen NLL).

    >>> import torch
    >>> round(sft_loss(torch.tensor([0.0]), beta=0.1).item(), 4)   # log 2
    0.6931
    """
    return -F.logsigmoid(beta * logp_c.float()).mean()


def nll_loss(logp_c: torch.Tensor) -> torch.Tensor:
    """Plain SFT variant: the negative log-likelihood of the chosen response, `-mean logp_c`.

    >>> import torch
    >>> nll_loss(torch.tensor([-3.0, -1.0])).item()
    2.0
    """
    return -logp_c.float().mean()


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float = DEFAULT_BETA) -> torch.Tensor:
    """DPO regulariser with a frozen reference: `-mean log σ(β · ((logp_c - logp_r) - (ref_c - ref_r)))`.

    The reference log-probs carry no gradient (they are detached here in any case).

    >>> import torch
    >>> z = torch.zeros(1)
    >>> round(dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), z, z, beta=1.0).item(), 4)   # -log σ(1)
    0.3133
    """
    policy = logp_c.float() - logp_r.float()  # (B,)
    reference = ref_c.detach().float() - ref_r.detach().float()  # (B,)
    return -F.logsigmoid(beta * (policy - reference)).mean()


def dpo_noref_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Reference-free DPO regulariser: `-mean log σ(β · (logp_c - logp_r))`.

    >>> import torch
    >>> round(dpo_noref_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=1.0).item(), 4)
    0.3133
    """
    return -F.logsigmoid(beta * (logp_c.float() - logp_r.float())).mean()


def regulariser_loss(kind: str, logp_c: torch.Tensor | None = None, logp_r: torch.Tensor | None = None,
                     ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None, *,
                     beta: float = DEFAULT_BETA) -> torch.Tensor | None:
    """The regulariser named by `kind` (one of `REGULARISERS`); None for `none`.

    >>> import torch
    >>> regulariser_loss("sft-nll", torch.tensor([-2.0])).item()
    2.0
    >>> regulariser_loss("none") is None
    True
    """
    if kind == "none":
        return None
    if kind == "sft":
        return sft_loss(_need(logp_c, "logp_c", kind), beta)
    if kind == "sft-nll":
        return nll_loss(_need(logp_c, "logp_c", kind))
    if kind == "dpo":
        return dpo_loss(_need(logp_c, "logp_c", kind), _need(logp_r, "logp_r", kind), _need(ref_c, "ref_c", kind),
                        _need(ref_r, "ref_r", kind), beta)
    if kind == "dpo-noref":
        return dpo_noref_loss(_need(logp_c, "logp_c", kind), _need(logp_r, "logp_r", kind), beta)
    raise ValueError(f"unknown regulariser {kind!r}; expected one of {REGULARISERS}")


def _need(value: torch.Tensor | None, name: str, kind: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the {kind} regulariser needs {name}")
    return value


def needs_logps(kind: str) -> tuple[bool, bool]:
    """(chosen, rejected): which responses' policy log-probs the regulariser `kind` reads.

    >>> needs_logps("sft"), needs_logps("dpo"), needs_logps("none")
    ((True, False), (True, True), (False, False))
    """
    if kind not in REGULARISERS:
        raise ValueError(f"unknown regulariser {kind!r}; expected one of {REGULARISERS}")
    return kind != "none", kind in ("dpo", "dpo-noref")


# ---------------------------------------------------------------------------------------------
# Combination and metrics


def grm_loss(reg: torch.Tensor | None, reward: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """The convex mix `α · L_reg + (1 - α) · L_R`; with no regulariser (`reg` None) just `L_R`.

    α = 1 trains on the regulariser alone (the reward loss has weight 0).

    >>> import torch
    >>> round(grm_loss(torch.tensor(1.0), torch.tensor(2.0), alpha=0.25).item(), 4)
    1.75
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if reg is None:
        return reward
    return alpha * reg + (1.0 - alpha) * reward


def pairwise_accuracy(r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen reward is strictly higher (ties count as wrong, as in
    RewardBench).

    >>> import torch
    >>> pairwise_accuracy(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 3.0])).item()
    0.3333333432674408
    """
    return (r_c.float() > r_r.float()).float().mean()
