"""The per-token arithmetic of RL on language models, shared by ppo, grpo and rlhf.

    masked mean     sum(v * m) / sum(m)                         (statistics over valid tokens only)
    whitening       (v - mean_m) / sqrt(var_m + 1e-8)            (var unbiased, over the mask; verl/TRL)
    ratio           r_t = exp(log pi_theta(y_t) - log pi_old(y_t))
    clipped loss    max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))   (= -min(r A, clip(r) A))
    value loss      0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
    k1, k2, k3      log(p/q),  0.5 log(p/q)^2,  q/p - log(q/p) - 1         (sampled from p = pi_theta)
    KL reward       r_t = -beta (log pi_old - log pi_ref)_t  +  [t = last valid] * score

Tensors are (B, T) over response tokens: row b is one response, column t its t-th generated token,
mask 1 on generated tokens up to and including EOS, 0 on the padding after it.
Builds on: gae (compute_gae, reused token by token over the response).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from modules.gae import compute_gae

__all__ = [
    "AGG_MODES", "masked_mean", "masked_var", "masked_whiten", "entropy_from_logits", "kl_estimators",
    "clipped_surrogate", "ppo_clip_loss", "value_loss", "agg_loss", "last_valid_index", "kl_penalized_rewards",
    "response_gae", "AdaptiveKLController", "FixedKLController",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask), over all entries or along ``dim``. Entries outside the mask
    are never read (a NaN there stays out). An empty mask gives 0 / 0 = NaN: the caller's bug."""
    m = mask.to(values.dtype)
    total = torch.where(mask.bool(), values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / m.sum()
    return total.sum(dim) / m.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected: x n / (n - 1) when ``unbiased``)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``values`` with the mean and (unbiased) variance of the VALID entries only.

    values: (B, T) float, e.g. advantages; mask: (B, T) bool or 0/1, 1 on valid tokens.
        mean = sum(values * mask) / sum(mask)
        var  = sum((values - mean)^2 * mask) / (sum(mask) - 1)              (Bessel)
        out  = (values - mean) / sqrt(var + 1e-8)         (shift_mean=False: add the mean back)
    Entries outside the mask are never read (padding may hold anything, even NaN) and are returned
    as 0. With fewer than two valid entries the variance is undefined: the values are only
    centred (verl raises there; ROLL skips the scaling). Returns (B, T), the dtype of values.
    Example: [1, 2, 3, 4] all valid -> [-1.1619, -0.3873, 0.3873, 1.1619].
    """
    valid = mask.bool()
    mean = masked_mean(values, mask)
    if valid.sum() < 2:
        out = values - mean if shift_mean else values
    else:
        out = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
        if not shift_mean:
            out = out + mean
    return torch.where(valid, out, torch.zeros_like(out))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z over the last axis: (..., V) -> (...). In [0, ln V]."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(-1)


def kl_estimators(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token estimates of KL(pi || pi_ref) from tokens SAMPLED FROM pi (Schulman's k1, k2, k3).

    logprobs: log pi(y_t) of the sampled tokens; ref_logprobs: log pi_ref(y_t) of the same tokens;
    any equal shapes, e.g. (B, T). With log_ratio = logprobs - ref_logprobs:
        k1 = log_ratio                          unbiased, can be negative per token
        k2 = 0.5 * log_ratio ** 2               biased, >= 0; its gradient is the reverse-KL gradient
        k3 = exp(-log_ratio) + log_ratio - 1    unbiased, >= 0 (TRL's GRPO KL, verl's low_var_kl)
    Returns (k1, k2, k3), each the input shape. No clamping (verl clamps k3 to [-10, 10]).
    Example: logprobs -1.0, ref -1.5 -> (0.5, 0.125, 0.1065307).
    """
    log_ratio = logprobs - ref_logprobs
    return log_ratio, 0.5 * log_ratio ** 2, torch.exp(-log_ratio) + log_ratio - 1


def clipped_surrogate(ratio: float, adv: float, eps: float) -> float:
    """The clipped objective of one token, a number: min(r A, clip(r, 1 - eps, 1 + eps) A).
    (The loss is its negative.) Example: r 1.5, A 1, eps 0.2 -> 1.2; r 0.5, A -1 -> -0.8."""
    return min(ratio * adv, min(max(ratio, 1.0 - eps), 1.0 + eps) * adv)


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_eps: float = 0.2,
                  clip_eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped policy loss, averaged over valid tokens (token-mean), with two diagnostics.

    logprobs: (B, T) log pi_theta of the sampled tokens (requires grad); old_logprobs: (B, T) the
    same tokens under the rollout policy (constants); advantages: (B, T) (constants); mask: (B, T),
    1 on valid response tokens. clip_eps_high: the upper clip (DAPO's clip-higher); None = clip_eps.
        ratio    = exp(logprobs - old_logprobs)
        per-tok  = max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps_high))
        loss     = masked mean of per-tok
        clipfrac = masked mean of [clipped term > unclipped term]   (tokens with zero gradient)
        approxkl = masked mean of (ratio - 1) - log ratio           (k3 of KL(old || new) >= 0)
    Returns (loss, clipfrac, approxkl), 0-dim tensors; only loss carries gradient. Padding never
    changes any of them, and padded positions get an exactly zero gradient even when their log-probs
    or advantages are NaN: select with torch.where before exp, never multiply by the mask (NaN * 0 is
    NaN, in the backward pass too). On the first minibatch after a rollout ratio == 1: loss =
    -masked_mean(A), clipfrac = 0, approxkl = 0. Per-token table (eps 0.2): (A 1, r 1.5) -> -1.2;
    (A -1, r 0.5) -> 0.8.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = mask.bool()
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approxkl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, clipfrac, approxkl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (TRL / verl / CleanRL): 0.5 masked_mean(max((V - R)^2, (V_clip - R)^2)),
    V_clip = clamp(V, V_old - clip_range, V_old + clip_range); all (B, T). Returns (loss, clipfrac =
    masked share of tokens where the clipped error is the larger one). Example (V_old 1, clip 0.2):
    V 1.5, R 2 -> 0.32."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, clipfrac


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor,
             mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
             = "token-mean", norm_length: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar (verl's agg_loss, data-parallel size 1).

        token-mean               sum(L m) / sum(m)                          (DAPO, verl default)
        seq-mean-token-sum       mean over non-empty rows of sum_t L m
        seq-mean-token-mean      mean over non-empty rows of sum_t L m / n_b      (GRPO paper)
        seq-mean-token-sum-norm  sum(L m) / norm_length (default T), NOT divided by B (Dr. GRPO)
    Fully masked rows count in no denominator. Example: L [[1,2,3],[4,0,0]], m [[1,1,1],[1,0,0]]
    -> 2.5, 5.0, 3.0, 3.3333.
    """
    m = mask.to(loss_mat.dtype)
    masked = torch.where(mask.bool(), loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        return masked.sum() / m.sum()
    rows = m.sum(-1) > 0
    if mode == "seq-mean-token-sum":
        return masked.sum(-1)[rows].mean()
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1)[rows] / m.sum(-1)[rows]).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (loss_mat.shape[-1] if norm_length is None else norm_length)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {AGG_MODES}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the rightmost 1 of each row (the EOS, or the last token of a
    response cut at the length limit). Rows need at least one valid token."""
    T = mask.shape[-1]
    return (mask.bool().long() * torch.arange(T, device=mask.device)).argmax(-1)


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         response_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO: a KL penalty on every response token, the score on the last.

    logprobs: (B, T) log pi_old of the sampled response tokens (the rollout policy); ref_logprobs:
    (B, T) the same tokens under the frozen reference; scores: (B,) the reward model's score of each
    whole response; response_mask: (B, T), 1 on valid tokens (up to and including EOS).
        rewards[b, t] = -beta * (logprobs - ref_logprobs)[b, t]   where mask[b, t] = 1, else 0
        rewards[b, last_b] += scores[b],     last_b = the rightmost valid position of row b
    Returns (B, T); zero outside the mask, even where the log-probs there are NaN; row sums = score -
    beta * sum_t k1. The score goes on the last VALID token, never on padding (TRL's slot after EOS is
    a known off-by-one trap); an empty row (no valid token) has no token to carry it and stays all 0.
    """
    valid = response_mask.bool()
    rewards = -beta * torch.where(valid, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    score = torch.where(valid.any(-1), scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.index_put((rows, last_valid_index(response_mask)), score, accumulate=True)


def response_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                 gae_fn: Callable = compute_gae) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens with modules.gae: each response is one episode ending (terminal) at
    its last valid token, so nothing is bootstrapped past it (verl, TRL). (B, T) in, (B, T) out:
    (advantages, returns), zero outside the mask; returns = advantages + values (critic targets).
    Padding is never read: a NaN reward or value there leaves the row's valid tokens untouched."""
    valid = mask.bool()
    r = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))
    v = torch.where(valid, values, torch.zeros_like(values))
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    ends = torch.zeros_like(valid)
    ends[torch.arange(valid.shape[0]), last_valid_index(mask)] = True
    adv, _ = gae_fn(r.T, v.T, next_v.T, ends.T, torch.zeros_like(ends.T), gamma, lam)
    adv = torch.where(valid, adv.T, torch.zeros_like(v))
    return adv, torch.where(valid, adv + v, torch.zeros_like(v))


class FixedKLController:
    """beta stays where it was put (TRL's kl_coef, verl's kl_ctrl type 'fixed')."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the observed KL towards ``target`` with a proportional controller.

        error = clip(current_kl / target - 1, -0.2, 0.2);   beta <- beta (1 + error n_steps / horizon)
    Example (beta .2, target 6, horizon 10000, n_steps 256): KL 12 -> 0.201024, KL 0 -> 0.198976."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
