"""The math of RLHF-PPO as pure tensor functions: no I/O, no model calls, nothing stateful but
the two KL controllers and the running reward moments, each small enough to check by hand.

Shapes: `[B, T]` tensors hold one row per response and one column per generated token; `mask`
is 1 on the response's real tokens (up to and including the first EOS) and 0 on padding after
it. Responses start at column 0 (prompts are left-padded, responses right-padded), so a row's
mask is a run of ones followed by zeros.

References: Ziegler et al. 2019 (lm-human-preferences), Schulman 2020 "Approximating KL
divergence" (k1, k3), Huang et al. 2024 "The N+ implementation details of RLHF with PPO".
"""

from __future__ import annotations

import math

import torch

# Written into padded positions of log-probability tensors; 1.0 can never be a real log
# probability, so a padded value that leaked into a loss would be obvious in a debugger.
INVALID_LOGPROB = 1.0


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under softmax(logits): `[B, T, V]`, `[B, T]` -> `[B, T]`, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: `[..., V]` -> `[...]` (nats)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; unbiased (n - 1) by default, as lm-human-preferences."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values for an unbiased variance, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back,
    which rescales without moving the centre (used for rewards, where the sign carries meaning)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    value and advantage after the last real token are 0 (the episode ends there). Returns are
    A_t + V_t, the value model's regression target. Both are 0 on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = values.shape[1]
    advantages_reversed = []
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        # A padded position must not pass anything back to the real token before it.
        last = last * mask[:, t]
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages, returns


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens the policy sampled.

    With log r = log pi(x) - log pi_ref(x): k1 = log r (unbiased, can be negative per token);
    k3 = (1/r - 1) + log r (unbiased and never negative; Schulman 2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token (responses start at column 0)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * kl on every real token, plus the sequence's score on its last
    real token (the reward model judges the whole response once). Returns (rewards, kl part)."""
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss: mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)).

    Returns (loss, clip fraction = share of tokens where the clipped term was the larger,
    approx KL = mean of 0.5 * (log ratio)^2 between the new and the rollout policy).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2), where V_clipped stays
    within cliprange_value of the rollout's value. Returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_sq, clipped_sq), mask)
    clipfrac = masked_mean((clipped_sq > unclipped_sq).float(), mask)
    return loss, clipfrac


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: steers the KL coefficient so that the measured
    KL (per sequence, nats) tracks `target`; `horizon` is how many episodes a full correction of
    the clipped error takes. error = clip(kl / target - 1, -0.2, 0.2);
    coef *= 1 + error * n_steps / horizon, where n_steps is the episodes in this update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and standard deviation of every value seen so far (Chan et al.'s parallel
    update), for normalising reward-model scores whose scale drifts between reward models."""

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch; returns the batch's own (mean, std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        batch_mean = xs.mean().item()
        batch_var = xs.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        if self.count == 0:
            m2 = batch_var * n
        else:
            m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total
        return batch_mean, math.sqrt(batch_var * n / max(n - 1, 1))

    @property
    def std(self) -> float:
        # Reported and used unbiased, like the batch std a researcher would compute.
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))

    def normalise(self, xs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (xs - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
