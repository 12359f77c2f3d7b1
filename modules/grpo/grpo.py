"""GRPO: PPO's clipped objective with a group of G answers per prompt as the baseline, and no critic.

    group-relative advantage   A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)     (std: n - 1)
    Dr. GRPO                   A_i = r_i - mean(r_1..r_G)                               (no std)
    per-token loss             l_t = max(-A_i rho_t, -A_i clip(rho_t, 1 - eps_low, 1 + eps_high)) + beta k3_t
                               rho_t = pi_theta(o_t) / pi_old(o_t),  k3_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
    aggregation                GRPO (paper): mean_i (1/|o_i|) sum_t l_t   (seq-mean-token-mean)
                               DAPO: sum_{i,t} l_t / sum_i |o_i|        (token-mean), clip-higher 0.2/0.28,
                                     dynamic sampling (groups whose rewards are all equal are dropped)
                               Dr. GRPO: sum_{i,t} l_t / T_max          (seq-mean-token-sum-norm)

Every token of answer i carries the same A_i (outcome supervision). The mean of a group is a Monte
Carlo estimate of V(prompt): subtracting it removes how hard the prompt is, so an easy and a hard
prompt push with similar force. A group whose rewards are all equal has A = 0 exactly: no signal.

The closed loop (``run(cfg, generator) -> GRPOResult``): single-digit addition with a verifiable answer
("<bos>3+8=" -> "#### 11<eos>", modules.rlvf's verifier). The initial policy is a tiny Llama warmed up
on a noisy demonstrator that often forgets the carry or the "#### " marker, so it starts low (sampled
accuracy, worse on carries); GRPO lifts it without a critic.

Builds on: ppo.core (kl_estimators, agg_loss, masked_mean), ppo.rollout (sample_responses,
policy_logprobs), rlvf (tasks and verifiers), training (AdamW, the supervised loop), transformer.
Deviations: one minibatch per update; DAPO's dynamic sampling drops the all-equal groups without
re-sampling more, and its overlong shaping is left out (answers fit the length limit); the warm-up
stands in for modules.sft.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch

from modules.ppo.core import agg_loss, kl_estimators, masked_mean
from modules.ppo.rollout import policy_logprobs, sample_responses
from modules.rlvf import rlvf as V
from modules import training
from modules.training import IGNORE_INDEX, AdamW, OptimConfig, clip_grad_norm_, configure_optimizer
from modules.transformer import ModelConfig, Transformer

__all__ = [
    "FORMULAS", "VARIANTS", "GRPOConfig", "VariantSettings", "variant_settings",
    "grpo_advantages", "grpo_loss", "group_advantages", "constant_groups", "dynamic_sampling_keep",
    "clip_ratios",
    "model_config", "demonstration_batch", "warm_up_policy",
    "Rollout", "rollout", "PolicyBatch", "policy_batch", "policy_loss", "Evaluation", "evaluate_accuracy",
    "rollout_metrics", "update_policy", "train_grpo", "GRPOResult", "run",
]

VARIANTS = ("grpo", "dr_grpo", "dapo")

FORMULAS = [
    ("Group-relative advantage", r"$\hat A_i=\frac{r_i-\mathrm{mean}(r_{1..G})}{\mathrm{std}(r_{1..G})+\epsilon}$"),
    ("Ratio", r"$\rho_{i,t}=\frac{\pi_\theta(o_{i,t}|q,o_{i,<t})}{\pi_{old}(o_{i,t}|q,o_{i,<t})}$"),
    ("Per-token loss",
     r"$\ell_{i,t}=-\min(\rho\hat A_i,\ \mathrm{clip}(\rho,1-\epsilon_l,1+\epsilon_h)\hat A_i)+\beta D_{i,t}$"),
    ("k3 KL", r"$D_{i,t}=\frac{\pi_{ref}}{\pi_\theta}-\log\frac{\pi_{ref}}{\pi_\theta}-1$"),
    ("GRPO aggregation", r"$L=\frac{1}{G}\sum_i\frac{1}{|o_i|}\sum_t\ell_{i,t}$"),
    ("Dr. GRPO", r"$\hat A_i=r_i-\mathrm{mean}(r),\quad L=\frac{1}{T_{max}}\sum_{i,t}\ell_{i,t}$"),
]


@dataclass(frozen=True)
class GRPOConfig:
    """What the grpo audit runs: the task, the warm-up that makes the initial policy, GRPO itself."""

    task: Literal["arithmetic", "logic"] = "arithmetic"
    variant: Literal["grpo", "dr_grpo", "dapo"] = "grpo"  # sets std scaling, aggregation, clip-high, filtering
    d_model: int = 32
    n_layers: int = 1  # one layer reads both digits; a second doubles the time for little gain here
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 88
    rope_theta: float = 100.0
    demo_correct_easy: float = 0.5  # P(the demonstrator is right) on easy problems (else no "#### " marker)
    demo_correct_hard: float = 0.2  # on hard ones (else the carry forgotten)
    warmup_steps: int = 200  # supervised steps on the demonstrations (the SFT policy = pi_ref = pi_0)
    warmup_batch: int = 64
    warmup_lr: float = 1e-2
    steps: int = 20  # GRPO iterations: sample, score, update
    prompts_per_step: int = 32  # B prompts, each answered G times
    group_size: int = 8  # G
    max_new_tokens: int = 8  # "#### 18<eos>" is 8 tokens
    temperature: float = 1.0  # sampling temperature, the same when scoring (else ratio != 1)
    updates_per_rollout: int = 2  # mu: optimizer steps on each rollout (the clip only binds from the 2nd)
    lr: float = 2e-3
    grad_clip: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # DAPO's clip-higher raises it to 0.28
    beta: float = 0.04  # k3 KL-to-reference weight in the loss (DeepSeekMath 0.04; DAPO and Dr. GRPO use 0)
    adv_eps: float = 1e-6  # verl's epsilon in (r - mean) / (std + eps)
    format_score: float = 0.0  # reward of a well-formed wrong answer (verl's default; rlvf audits 0.1)
    eval_samples: int = 8  # sampled answers per problem (all 100 problems) when measuring accuracy
    eval_every: int = 10
    # Outcome bars, from `llmaudit sweep grpo` (toy seeds 0-19, full seeds 0-4), each >= 10 % of its scale
    # inside the worst seed, full bars at least as strict as toy's. Measured: accuracy after GRPO toy >= 0.435,
    # full >= 0.863 (bars 0.35, 0.78); rise toy >= 0.229, full >= 0.560 (0.2, 0.5); SFT accuracy toy
    # 0.139-0.224, full 0.220-0.344 (bands [0.1, 0.5], [0.2, 0.5]); difficulty gap toy >= 0.126, full >= 0.186
    # (0.1, 0.15); KL over the last 5 rollouts toy 0.138-0.208, full 0.068-0.182 (<= 0.3 and >= 0.05).
    min_accuracy: float = 0.35  # sampled accuracy after GRPO
    min_rise: float = 0.2  # sampled accuracy after GRPO minus before (lr = 0 fails it on every seed)
    initial_band_low: float = 0.1  # the SFT policy's sampled accuracy lies in [low, high]
    initial_band_high: float = 0.5
    min_difficulty_gap: float = 0.1  # the SFT policy's mean raw reward, easy minus hard problems
    max_kl: float = 0.3  # per-token KL(pi || pi_ref) over the last 5 rollouts, nats: at most this ...
    min_kl: float = 0.05  # ... and at least this (the policy moved)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "d_model": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1",
        "rope_theta": "> 1", "demo_correct_easy": "[0, 1]", "demo_correct_hard": "[0, 1]", "warmup_steps": ">= 1",
        "warmup_batch": ">= 1", "warmup_lr": ">= 0", "steps": ">= 1", "prompts_per_step": ">= 1",
        "group_size": ">= 2", "max_new_tokens": ">= 1", "temperature": "> 0", "updates_per_rollout": ">= 1",
        "lr": ">= 0", "grad_clip": "> 0", "clip_eps_low": "(0, 1)", "clip_eps_high": "> 0", "beta": ">= 0",
        "adv_eps": "> 0", "format_score": "[0, 1]", "eval_samples": ">= 1", "eval_every": ">= 1",
        "min_accuracy": "[0, 1]", "min_rise": "[-1, 1]", "initial_band_low": "[0, 1]", "initial_band_high": "[0, 1]",
        "min_difficulty_gap": "[-1, 1]", "max_kl": "> 0", "min_kl": ">= 0",
    }

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.task not in V.TASKS:
            raise ValueError(f"task must be one of {V.TASKS}, got {self.task!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: a group of one has no baseline")
        if self.steps < 1 or self.updates_per_rollout < 1 or self.prompts_per_step < 1:
            raise ValueError("steps, updates_per_rollout and prompts_per_step must be positive")

    @classmethod
    def toy(cls) -> GRPOConfig:
        return cls()

    @classmethod
    def full(cls) -> GRPOConfig:
        return cls(steps=150, warmup_steps=400, eval_every=25, min_accuracy=0.78, min_rise=0.5,
                   initial_band_low=0.2, min_difficulty_gap=0.15)


class VariantSettings(NamedTuple):
    scale_rewards: bool  # divide by the group std
    loss_agg_mode: str
    clip_eps_high: float
    dynamic_sampling: bool  # drop groups whose rewards are all equal


def variant_settings(cfg: GRPOConfig) -> VariantSettings:
    """GRPO (DeepSeekMath), Dr. GRPO (no std, constant normaliser) and DAPO (clip-higher, token-mean,
    dynamic sampling), as verl configures them."""
    if cfg.variant == "dr_grpo":
        return VariantSettings(False, "seq-mean-token-sum-norm", cfg.clip_eps_high, False)
    if cfg.variant == "dapo":
        return VariantSettings(True, "token-mean", max(cfg.clip_eps_high, 0.28), True)
    return VariantSettings(True, "seq-mean-token-mean", cfg.clip_eps_high, False)


# ---------------------------------------------------------------------------------------------------
# Kernels


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages of outcome rewards: one number per answer.

    rewards: (B * G,) float, the G answers to each prompt CONSECUTIVE (rows 0..G-1 are prompt 0).
    group_size: G >= 2. Per group, with the unbiased std (n - 1, torch.std's default, as verl/TRL):
        scale_rewards=True  (GRPO):     A_i = (r_i - mean) / (std + eps)
        scale_rewards=False (Dr. GRPO): A_i = r_i - mean
    A group whose rewards are all equal gets exactly 0 (test max - min, not std > 0: a float sum of
    equal values can leave a tiny non-zero std, and dividing by it amplifies the rounding error).
    Returns (B * G,); every token of answer i then carries A_i. Raises ValueError for G < 2.
    Examples: [1, 0, 0, 1] -> [0.866, -0.866, -0.866, 0.866] (eps 1e-6: 0.8660239); Dr. GRPO -> +-0.5;
    [1, 0, 0, 0] -> [1.5, -0.5, -0.5, -0.5].
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a single answer has no group baseline), got {group_size}")
    r = rewards.view(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    constant = (r.max(dim=1, keepdim=True).values - r.min(dim=1, keepdim=True).values) <= 1e-6
    return torch.where(constant, torch.zeros_like(adv), adv).reshape(-1)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, response_mask: torch.Tensor, clip_eps_low: float = 0.2,
              clip_eps_high: float = 0.2, beta: float = 0.04,
              loss_agg_mode: str = "seq-mean-token-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The GRPO policy loss: PPO's clipped surrogate per token plus beta * k3 KL to the reference.

    logprobs: (N, T) log pi_theta of the sampled tokens (requires grad); old_logprobs: (N, T) the same
    under the rollout policy; ref_logprobs: (N, T) under the frozen reference; advantages: (N,) one per
    answer (broadcast to its tokens); response_mask: (N, T), 1 on valid tokens (up to and incl. EOS).
        rho = exp(logprobs - old_logprobs)
        pg  = max(-A rho, -A clamp(rho, 1 - clip_eps_low, 1 + clip_eps_high))
        k3  = exp(ref - logprobs) - (ref - logprobs) - 1                        (>= 0)
        l   = pg + beta * k3,  then reduced by loss_agg_mode over the valid tokens:
            "token-mean"               sum(l m) / sum(m)                        (DAPO)
            "seq-mean-token-mean"      mean over answers of sum_t(l m) / |o_i|  (GRPO paper)
            "seq-mean-token-sum-norm"  sum(l m) / T                             (Dr. GRPO, T = columns)
            "seq-mean-token-sum"       mean over answers of sum_t(l m)
    Padded entries (mask 0) may hold anything, even NaN: they must change neither the loss nor any
    gradient (select with torch.where before exp; multiplying a NaN by 0 is still NaN).
    Returns (loss 0-dim, per-token loss (N, T), 0 on padding). With rho == 1 (first update), beta 0,
    A = [+1, -1], lengths [1, 3], T 4: seq-mean-token-mean 0.0, token-mean 0.5, sum-norm 0.5.
    """
    valid = response_mask.bool()
    zero = torch.zeros_like(logprobs)
    log_ratio = torch.where(valid, logprobs - old_logprobs, zero)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    _, _, k3 = kl_estimators(torch.where(valid, logprobs, zero), torch.where(valid, ref_logprobs, zero))
    per_token = torch.where(valid, pg + beta * k3, zero)
    return agg_loss(per_token, response_mask, loss_agg_mode), per_token


# ---------------------------------------------------------------------------------------------------
# Plain helpers: the quiz's number, group statistics, clip diagnostics


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """One group's GRPO advantages from a plain list: (r - mean) / (sample std (n - 1) + eps); all
    equal -> zeros. [1, 0, 0, 1] -> [0.866, -0.866, -0.866, 0.866]."""
    n = len(rewards)
    if n < 2:
        raise ValueError("a group needs at least two rewards")
    mean = sum(rewards) / n
    if max(rewards) - min(rewards) <= 1e-6:
        return [0.0] * n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + eps) for r in rewards]


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) bool: groups whose G rewards are all equal (max - min <= 1e-6): no policy gradient."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) <= 1e-6


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling: (N,) bool, True on the answers of groups whose rewards are NOT all
    equal (the only groups with a policy gradient)."""
    return (~constant_groups(rewards, group_size)).repeat_interleave(group_size)


def clip_ratios(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps_low: float, clip_eps_high: float) -> dict[str, float]:
    """TRL's clip metrics: share of valid tokens clipped below (rho < 1 - eps_low with A < 0), above
    (rho > 1 + eps_high with A > 0), and either (the tokens whose gradient the clip removes)."""
    with torch.no_grad():
        ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs)))
        adv = advantages[:, None].expand_as(ratio)
        low = (ratio < 1 - clip_eps_low) & (adv < 0)
        high = (ratio > 1 + clip_eps_high) & (adv > 0)
        return {"clip_ratio/low_mean": masked_mean(low.float(), mask).item(),
                "clip_ratio/high_mean": masked_mean(high.float(), mask).item(),
                "clip_ratio/region_mean": masked_mean((low | high).float(), mask).item()}


# ---------------------------------------------------------------------------------------------------
# The initial policy: a supervised warm-up on a noisy demonstrator


def model_config(cfg: GRPOConfig) -> ModelConfig:
    return ModelConfig(vocab_size=len(V.VOCAB), d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta,
                       max_seq_len=5 + cfg.max_new_tokens)


def demonstration_batch(cfg: GRPOConfig, batch_size: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token training on the demonstrator's answers: prompt + answer + EOS,
    right-padded to max_new_tokens; the loss is on the answer and its EOS only."""
    problems = V.make_problems(cfg.task, batch_size, generator)
    answers = V.demonstrations(cfg.task, problems, (cfg.demo_correct_easy, cfg.demo_correct_hard), generator)
    T = cfg.max_new_tokens
    pad, eos = V.VOCAB.index(V.PAD), V.VOCAB.index(V.EOS)
    rows = [(V.encode(text) + [eos])[:T] for text in answers]
    responses = torch.tensor([ids + [pad] * (T - len(ids)) for ids in rows])  # (B, T)
    seq = torch.cat([problems.prompts, responses], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : problems.prompts.shape[1] - 1] = IGNORE_INDEX
    targets[targets == pad] = IGNORE_INDEX
    return inputs, targets


def warm_up_policy(cfg: GRPOConfig, generator: torch.Generator) -> tuple[Transformer, list[dict]]:
    """The SFT policy (stand-in for modules.sft): a tiny Llama trained on the noisy demonstrations.
    It becomes both the initial policy and the frozen reference. Init from the global RNG."""
    model = Transformer(model_config(cfg))
    history = training.supervised_warm_up(model, lambda g: demonstration_batch(cfg, cfg.warmup_batch, g),
                                          cfg.warmup_steps, cfg.warmup_lr, generator)
    return model, history


# ---------------------------------------------------------------------------------------------------
# Rollouts, accuracy, the loop


class Rollout(NamedTuple):
    tokens: torch.Tensor  # (N, P + T) prompts and sampled responses, N = B * G
    mask: torch.Tensor  # (N, T) response mask (1 up to and including EOS)
    rewards: torch.Tensor  # (N,) verifier rewards
    difficulty: torch.Tensor  # (N,) long
    old_logprobs: torch.Tensor  # (N, T) log pi_old: the policy that sampled (constants)
    ref_logprobs: torch.Tensor  # (N, T) log pi_ref (constants)


@torch.no_grad()
def rollout(policy: Transformer, reference: Transformer, problems: V.Problems, cfg: GRPOConfig,
            generator: torch.Generator, reward_fn: Callable | None = None) -> Rollout:
    """Answer every problem G times (groups consecutive), score with the verifier, and record the
    log-probs of the sampling policy (pi_old) and of the reference, at the sampling temperature."""
    G, P = cfg.group_size, problems.prompts.shape[1]
    prompts = problems.prompts.repeat_interleave(G, dim=0)
    answers = [a for a in problems.answers for _ in range(G)]
    pad, eos = V.VOCAB.index(V.PAD), V.VOCAB.index(V.EOS)
    tokens, mask = sample_responses(policy, prompts, cfg.max_new_tokens, eos, pad, generator, cfg.temperature)
    rewards, _, _ = V.score_responses(cfg.task, tokens[:, P:], answers, cfg.format_score, reward_fn)
    old, _ = policy_logprobs(policy, tokens, P, cfg.temperature)
    ref, _ = policy_logprobs(reference, tokens, P, cfg.temperature)
    return Rollout(tokens, mask, rewards, problems.difficulty.repeat_interleave(G), old, ref)


class PolicyBatch(NamedTuple):
    """What one update trains on: the answers kept by the variant, with their advantages."""

    tokens: torch.Tensor  # (N', P + T)
    mask: torch.Tensor  # (N', T)
    old_logprobs: torch.Tensor  # (N', T)
    ref_logprobs: torch.Tensor  # (N', T)
    advantages: torch.Tensor  # (N',) one per answer
    groups_kept: int


def policy_batch(ro: Rollout, cfg: GRPOConfig, advantages_fn: Callable = grpo_advantages) -> PolicyBatch:
    """The variant's advantages of a rollout, then DAPO's dynamic sampling: groups whose rewards are
    all equal are dropped (no re-sampling here), so the token-mean only counts tokens with signal."""
    settings = variant_settings(cfg)
    adv = advantages_fn(ro.rewards, cfg.group_size, settings.scale_rewards, cfg.adv_eps)
    keep = (dynamic_sampling_keep(ro.rewards, cfg.group_size) if settings.dynamic_sampling
            else torch.ones(len(ro.rewards), dtype=torch.bool))
    return PolicyBatch(ro.tokens[keep], ro.mask[keep], ro.old_logprobs[keep], ro.ref_logprobs[keep], adv[keep],
                       int(keep.sum().item()) // cfg.group_size)


def policy_loss(logprobs: torch.Tensor, batch: PolicyBatch, cfg: GRPOConfig,
                loss_fn: Callable = grpo_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The variant's loss on a batch: its clip-high and aggregation, cfg's eps_low and beta."""
    settings = variant_settings(cfg)
    return loss_fn(logprobs, batch.old_logprobs, batch.ref_logprobs, batch.advantages, batch.mask,
                   cfg.clip_eps_low, settings.clip_eps_high, cfg.beta, settings.loss_agg_mode)


class Evaluation(NamedTuple):
    step: int
    accuracy: float  # share of sampled answers that are right (temperature cfg.temperature)
    accuracy_by_difficulty: tuple[float, float]  # easy, hard
    greedy_accuracy: float  # argmax decoding


@torch.no_grad()
def evaluate_accuracy(policy: Transformer, cfg: GRPOConfig, generator: torch.Generator, step: int = 0,
                      reward_fn: Callable | None = None) -> Evaluation:
    """Accuracy on all 100 problems: eval_samples sampled answers each, and the greedy answer."""
    problems = V.all_problems(cfg.task)
    pad, eos = V.VOCAB.index(V.PAD), V.VOCAB.index(V.EOS)
    prompts = problems.prompts.repeat_interleave(cfg.eval_samples, dim=0)
    answers = [a for a in problems.answers for _ in range(cfg.eval_samples)]
    level = problems.difficulty.repeat_interleave(cfg.eval_samples)
    tokens, _ = sample_responses(policy, prompts, cfg.max_new_tokens, eos, pad, generator, cfg.temperature)
    rewards, _, _ = V.score_responses(cfg.task, tokens[:, 5:], answers, 0.0, reward_fn)
    right = (rewards == 1.0).float()
    greedy, _ = sample_responses(policy, problems.prompts, cfg.max_new_tokens, eos, pad, generator, 0.0)
    greedy_rewards, _, _ = V.score_responses(cfg.task, greedy[:, 5:], problems.answers, 0.0, reward_fn)
    by_level = tuple(right[level == d].mean().item() for d in (0, 1))
    return Evaluation(step, right.mean().item(), by_level, (greedy_rewards == 1.0).float().mean().item())


def rollout_metrics(ro: Rollout, cfg: GRPOConfig) -> dict:
    """TRL's names: mean reward, mean within-group std, share of groups with no signal, length."""
    return {"reward": ro.rewards.mean().item(),
            "reward_std": ro.rewards.view(-1, cfg.group_size).std(dim=1).mean().item(),
            "frac_reward_zero_std": constant_groups(ro.rewards, cfg.group_size).float().mean().item(),
            "completions/mean_length": ro.mask.sum(-1).mean().item()}


def update_policy(policy: Transformer, optimizer: AdamW, batch: PolicyBatch, cfg: GRPOConfig,
                  loss_fn: Callable = grpo_loss) -> dict:
    """updates_per_rollout optimizer steps on one batch. Returns the first update's loss, grad norm,
    |rho - 1|, clip share, KL and entropy (rho == 1 there: pi_theta is still pi_old), and the last
    update's clip shares (how far the reused rollout has drifted)."""
    nan = float("nan")
    record = {"loss": nan, "grad_norm": nan, "ratio_first_update_max_dev": 0.0, "clip_ratio_first_update": 0.0,
              "kl": nan, "entropy": nan, "clip_ratio/low_mean": nan, "clip_ratio/high_mean": nan,
              "clip_ratio/region_mean": nan}
    if len(batch.advantages) == 0:  # DAPO dropped every group: nothing to learn from
        return record
    settings = variant_settings(cfg)
    policy.train()
    for update in range(cfg.updates_per_rollout):
        logprobs, entropy = policy_logprobs(policy, batch.tokens, 5, cfg.temperature)
        clip = clip_ratios(logprobs, batch.old_logprobs, batch.advantages, batch.mask, cfg.clip_eps_low,
                           settings.clip_eps_high)
        loss, _ = policy_loss(logprobs, batch, cfg, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        if update == 0:
            with torch.no_grad():
                valid = batch.mask.bool()
                ratio = torch.exp(torch.where(valid, logprobs - batch.old_logprobs, torch.zeros_like(logprobs)))
                _, _, k3 = kl_estimators(logprobs, batch.ref_logprobs)
            record.update({"loss": loss.item(), "grad_norm": float(grad_norm),
                           "ratio_first_update_max_dev": (ratio - 1).abs().max().item(),
                           "clip_ratio_first_update": clip["clip_ratio/region_mean"],
                           "kl": masked_mean(k3, batch.mask).item(),
                           "entropy": masked_mean(entropy.detach(), batch.mask).item()})
        record.update(clip)
    return record


def train_grpo(policy: Transformer, reference: Transformer, cfg: GRPOConfig, generator: torch.Generator, *,
               advantages_fn: Callable = grpo_advantages, loss_fn: Callable = grpo_loss,
               reward_fn: Callable | None = None,
               on_step: Callable[[int, dict], None] | None = None) -> tuple[list[dict], list[Evaluation]]:
    """GRPO's loop: sample B prompts x G answers, score them, group-relative advantages, then
    updates_per_rollout optimizer steps on the clipped loss. No critic anywhere. Trains ``policy`` in
    place; ``reference`` stays frozen. Returns (one dict of metrics per step, evaluations)."""
    optimizer, scheduler = configure_optimizer(
        policy, OptimConfig(lr=cfg.lr, min_lr=cfg.lr, warmup_steps=0, weight_decay=0.0), cfg.steps)
    reference.requires_grad_(False)
    history, evals = [], [evaluate_accuracy(policy, cfg, generator, 0, reward_fn)]
    for step in range(cfg.steps):
        ro = rollout(policy, reference, V.make_problems(cfg.task, cfg.prompts_per_step, generator), cfg, generator,
                     reward_fn)
        batch = policy_batch(ro, cfg, advantages_fn)
        record = {**rollout_metrics(ro, cfg), "groups_kept": batch.groups_kept}
        record.update(update_policy(policy, optimizer, batch, cfg, loss_fn))
        scheduler.step()
        history.append(record)
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            evals.append(evaluate_accuracy(policy, cfg, generator, step + 1, reward_fn))
        if on_step is not None:
            on_step(step, record)
    return history, evals


@dataclass
class GRPOResult:
    """The closed loop's outcome: the trained policy, the frozen reference (= the SFT policy), the
    warm-up and GRPO histories, and the accuracy evaluations (the first one before any update)."""

    policy: Transformer
    reference: Transformer
    warmup: list[dict]
    history: list[dict]
    evals: list[Evaluation]

    @property
    def start(self) -> Evaluation:
        return self.evals[0]

    @property
    def end(self) -> Evaluation:
        return self.evals[-1]


def run(cfg: GRPOConfig, generator: torch.Generator, *, grpo_advantages: Callable = grpo_advantages,
        grpo_loss: Callable = grpo_loss, reward_fn: Callable | None = None, sft: Transformer | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> GRPOResult:
    """Warm up the SFT policy (unless ``sft`` is given; it is not modified), freeze a copy as the
    reference, and train a copy with GRPO. Model init draws from the global RNG (seed it)."""
    warm: list[dict] = []
    if sft is None:
        sft, warm = warm_up_policy(cfg, generator)
    reference = copy.deepcopy(sft).requires_grad_(False)
    policy = copy.deepcopy(sft).requires_grad_(True)
    history, evals = train_grpo(policy, reference, cfg, generator, advantages_fn=grpo_advantages,
                                loss_fn=grpo_loss, reward_fn=reward_fn, on_step=on_step)
    return GRPOResult(policy, reference, warm, history, evals)
