"""PPO's math as pure functions over (B, T) tensors with a response mask (1 on response tokens).

    reward_t   = -kl_coef * KL_t                    (+ the sequence's score on its last token)
    delta_t    = reward_t + gamma * V_{t+1} - V_t
    A_t        = sum_l (gamma * lam)^l * delta_{t+l}            (GAE; V after the last token is 0)
    return_t   = A_t + V_t
    L_policy   = mean max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),   ratio = exp(logp - logp_old)
    L_value    = mean 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
    KL estimators of KL(pi || ref) from samples of pi, with log r = log ref - log pi:
               k1 = -log r,  k2 = (log r)^2 / 2,  k3 = (r - 1) - log r

    >>> import torch
    >>> m = torch.tensor([[1., 1., 0.]])
    >>> masked_mean(torch.tensor([[1., 3., 100.]]), m).item()
    2.0
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (`shift_mean=False` keeps the mean); 0 outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std of a 1-D tensor (Bessel-corrected std); a single value becomes 0.

    >>> whiten(torch.tensor([1.0, 3.0])).tolist()
    [-0.7071067690849304, 0.7071067690849304]
    """
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1, k2, k3)."""
    log_ratio = ref_logp - logp  # log r = log ref - log pi
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, T) rewards: -kl_coef * KL on every response token, plus the score on each row's last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,) index of the last response token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), each (B, T).
    Positions outside the mask get 0; the value after a row's last token is 0 (the episode ends)."""
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) and the fraction where clipping won."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's categorical distribution, (..., V) → (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked positions (nan when returns are constant)."""
    var_returns = masked_var(returns, mask).item()
    if var_returns == 0:
        return float("nan")
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019): after each batch of `n` rollouts
    with mean KL `kl`, coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon.

    >>> c = KLController(0.1, mode="adaptive", target=6.0, horizon=100)
    >>> round(c.update(kl=12.0, n=10), 6)   # KL twice the target: error clipped to +0.2
    0.102
    """

    def __init__(self, coef: float, *, mode: str = "fixed", target: float = 6.0, horizon: int = 10000):
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"unknown KL mode {mode!r}; expected fixed or adaptive")
        self.value, self.mode, self.target, self.horizon = float(coef), mode, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.mode == "adaptive" and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "mode": self.mode, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
