"""PPO for a language model: actor, critic, frozen reference and reward model, on a task with a gold reward.

    rollout          y ~ pi_old(.|x) until EOS;  old, ref log-probs, values V(x, y_<t), score R(x, y)
    token rewards    r_t = -beta (log pi_old - log pi_ref)(y_t) + [t = last valid] R(x, y)
    advantages       A = GAE(r, V; gamma, lambda) over the response tokens, whitened over valid tokens
    actor            L_pi = masked mean max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) - c_H H,  r_t = pi/pi_old
    critic           L_V = 0.5 masked mean max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)
    KL controller    beta fixed, or adaptive: beta <- beta (1 + clip(KL/target - 1, +-0.2) n / horizon)

The toy task is the reward_model module's: the prompt is <bos> t <sep>, the response a run of digits
closed by <eos>, and the gold reward the number of times the target digit t occurs. The SFT policy
imitates the data distribution (about 2 targets per response); the reward model is a Bradley-Terry
model trained on gold-labelled pairs (the reward_model module's train_reward_model). PPO must raise the
gold reward, which it never sees, through that learned proxy, at a bounded KL to the SFT policy.
Second experiment (reward hacking): a flawed proxy, a biased annotator's judgement that also counts a decoy
digit (3 points each, against 1 per target), optimised with beta = 0: the proxy score climbs while the
gold reward does not follow, because the proxy's optimum is an answer full of decoys.

    run(cfg, generator) -> PPOResult      prepare (SFT + RM) -> train_with_kl_penalty -> reward_hacking

Builds on: ppo.core (masked statistics, clipped losses, KL rewards, response GAE, KL controllers),
ppo.rollout (EOS-terminated sampling, log-probs, values), reward_model (task, SFT warm-up, RM), training.
Deviations from TRL's PPOTrainer: a separate critic network with its own optimizer (verl's layout), the
score on the last valid token (TRL puts it one slot after EOS), no dropout to switch off, tiny models.
Model weights are initialised from the global RNG (torch.manual_seed), as in the reward_model module.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from modules import reward_model as RM
from modules.ppo.core import (AdaptiveKLController, FixedKLController, kl_estimators, kl_penalized_rewards,
                              masked_mean, masked_whiten, ppo_clip_loss, response_gae, value_loss)
from modules.ppo.rollout import critic_values, policy_logprobs, response_logits, sample_responses
from modules.training import OptimConfig, clip_grad_norm_, configure_optimizer
from modules.transformer import Transformer

__all__ = [
    "FORMULAS", "PPOConfig",
    "task_config", "special_ids", "prompt_len", "make_prompts", "decoy_digit", "biased_utility",
    "sft_policy", "frozen_copy", "actor_and_reference", "honest_reward_model",
    "proxy_agreement",
    "reward_fn_from_model", "new_critic",
    "Rollout", "collect_rollout", "token_kl_exact", "evaluate",
    "Advantages", "rollout_advantages", "ppo_optimizers", "ppo_update", "train_ppo",
    "Setup", "prepare", "Trained", "train_with_kl_penalty", "Hacking", "reward_hacking", "PPOResult", "run",
]

FORMULAS = [
    ("Ratio", r"$r_t=\exp\left(\log\pi_\theta(y_t)-\log\pi_{old}(y_t)\right)$"),
    ("Clipped loss",
     r"$L^{CLIP}=\max\left(-\hat A_t r_t,\ -\hat A_t\,\mathrm{clip}(r_t,1-\epsilon,1+\epsilon)\right)$"),
    ("Token reward", r"$r_t=-\beta\log\frac{\pi_{old}(y_t)}{\pi_{ref}(y_t)}+[t=T]\,R_\phi(x,y)$"),
    ("GAE", r"$\hat A_t=\sum_{l\geq 0}(\gamma\lambda)^l\delta_{t+l},\ \delta_t=r_t+\gamma V_{t+1}-V_t$"),
    ("Value loss", r"$L^V=\frac{1}{2}\max\left((V-G)^2,(\mathrm{clip}(V,V_{old}\pm c)-G)^2\right)$"),
    ("k1, k2, k3", r"$\log\frac{p}{q},\ \frac{1}{2}\log^2\frac{p}{q},\ \frac{q}{p}-\log\frac{q}{p}-1$"),
    ("Adaptive KL", r"$\beta\leftarrow\beta\left(1+\mathrm{clip}(\frac{KL}{KL_{target}}-1,\pm0.2)\frac{n}{H}\right)$"),
]


@dataclass(frozen=True)
class PPOConfig:
    """What the ppo audit runs: the counting task and its models, PPO itself, the reward-hacking run.
    The outcome bars come from `llmaudit sweep ppo` (toy seeds 0-19, full seeds 0-9; 0-4 with avx2), run once as is and
    once with ATEN_CPU_CAPABILITY=avx2 (other CPU kernels, other rounding); each comment says the worst
    value, and every bar keeps >= 10 % margin to it."""

    # the task and the models (the reward_model module's counting task)
    n_symbols: int = 6  # digits 0..n_symbols-1, then <bos> <sep> <eos> <pad>
    target_from_prompt: bool = False  # True: the prompt names the digit to count; False: always 0
    max_len: int = 8  # SFT data responses have 3..max_len digits; PPO samples up to max_len + 1 tokens
    d_model: int = 32
    n_layers: int = 2
    sft_steps: int = 30  # next-token warm-up that makes the SFT policy (reward_model's lm_steps)
    rm_steps: int = 60  # Bradley-Terry steps of the reward model (40 let one toy seed of 20 learn answer density)
    rm_eval_pairs: int = 512  # held-out gold-labelled pairs for the reward models' pairwise accuracy
    # PPO
    iterations: int = 12  # rollout -> update cycles
    rollout_batch: int = 64  # prompts (one response each) per rollout
    ppo_epochs: int = 2  # passes over each rollout
    n_minibatches: int = 2  # minibatches per pass
    temperature: float = 1.0  # sampling temperature; log-probs use the same one (else ratio != 1)
    actor_lr: float = 3e-3
    critic_lr: float = 3e-3
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2  # ratio clip (TRL cliprange, CleanRL clip_coef)
    clip_value: float = 0.2  # value clip around the rollout's values (TRL cliprange_value)
    ent_coef: float = 0.0  # entropy bonus c_H (CleanRL 0.01, TRL 0)
    gamma: float = 1.0
    lam: float = 0.95
    kl_ctl: Literal["fixed", "adaptive"] = "adaptive"
    kl_coef: float = 0.1  # beta (initial value when adaptive; toy and full use 0.3)
    kl_target: float = 4.0  # adaptive controller: target sequence KL, nats
    kl_horizon: int = 1000  # adaptive controller: horizon in samples (Ziegler: 10000)
    eval_prompts: int = 256  # samples for the gold reward and exact KL before / after
    # reward hacking: beta = 0 against a biased annotator's judgement
    hack: bool = True  # run the reward-hacking experiment
    hack_iterations: int = 14
    decoy_bonus: float = 3.0  # the proxy: gold + decoy_bonus x count(decoy digit)
    # outcome bars (see the class docstring). The closed loop is chaotic: the last bits of floating point
    # (which CPU kernels torch picks) move one full seed's gold gain from 1.6 to 3.7, so the worst values
    # below are over seeds AND numeric paths. Full mode poses a harder task (TASK_FIELDS), with its own bars.
    min_gold_gain: float = 2.1  # gold of the PPO policy minus the SFT policy's; worst toy 2.36 (full: 1.45, worst
    # 1.63); gradient ascent on the loss ends at -1.4 or lower
    max_kl: float = 4.35  # exact sequence KL(PPO policy || SFT) at the end, nats; worst toy 3.88, full 3.90;
    # without the penalty (beta = 0) the toy runs end at 5.05-8.7 nats
    min_proxy_gain: float = 15.0  # hacking: proxy score, last rollouts minus first; worst toy 21.7, full 17.2
    min_hack_gold_drop: float = 1.0  # hacking: the gold reward's peak (3-iteration mean) minus its end; worst toy
    # 1.86 (full: 0.65, worst 0.73); with an unbiased annotator it drops by 0.05 at most

    # fields that define the task: where toy and full differ in one (full mode's prompt names the digit to
    # count), the presets pose different problems and full bars are not held to the toy bars
    TASK_FIELDS = ("target_from_prompt",)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_symbols": ">= 2", "max_len": ">= 3", "d_model": ">= 1", "n_layers": ">= 1", "sft_steps": ">= 1",
        "rm_steps": ">= 1", "rm_eval_pairs": ">= 1", "iterations": ">= 1", "rollout_batch": ">= 1",
        "ppo_epochs": ">= 1", "n_minibatches": ">= 1", "temperature": "> 0", "actor_lr": ">= 0", "critic_lr": ">= 0",
        "max_grad_norm": "> 0", "clip_eps": "(0, 1)", "clip_value": "> 0", "ent_coef": ">= 0", "gamma": "[0, 1]",
        "lam": "[0, 1]", "kl_coef": ">= 0", "kl_target": "> 0", "kl_horizon": ">= 1", "eval_prompts": ">= 1",
        "hack_iterations": ">= 1", "decoy_bonus": ">= 0", "min_gold_gain": ">= 0", "max_kl": "> 0",
        "min_proxy_gain": ">= 0", "min_hack_gold_drop": ">= 0",
    }

    def __post_init__(self):
        if self.kl_ctl not in ("fixed", "adaptive"):
            raise ValueError(f"kl_ctl must be 'fixed' or 'adaptive', got {self.kl_ctl!r}")
        if self.rollout_batch % self.n_minibatches:
            raise ValueError(f"rollout_batch={self.rollout_batch} must split into n_minibatches={self.n_minibatches}")
        if min(self.iterations, self.ppo_epochs, self.n_minibatches, self.hack_iterations) < 1:
            raise ValueError("iterations, ppo_epochs, n_minibatches and hack_iterations must be positive")
        if self.temperature <= 0 or self.clip_eps <= 0:
            raise ValueError("temperature and clip_eps must be positive")

    @classmethod
    def toy(cls) -> PPOConfig:
        # beta .3: at .1 the toy KL (2.7-6.7 nats) overlapped what runs without any penalty reach
        return cls(kl_coef=0.3)

    @classmethod
    def full(cls) -> PPOConfig:
        # the prompt names the digit to count: a harder reward model, hence 300 RM steps (150 reached 0.87-0.90
        # held-out accuracy and gold gains down to 2.16)
        return cls(target_from_prompt=True, sft_steps=250, rm_steps=300, iterations=30, rollout_batch=128,
                   kl_coef=0.3, eval_prompts=512, hack_iterations=30, min_gold_gain=1.45,
                   min_hack_gold_drop=0.65)


# ---------------------------------------------------------------------------------------------------
# The task: reward_model's counting task, a decoy digit for the biased annotator


def task_config(cfg: PPOConfig) -> RM.RewardModelConfig:
    """The reward_model module's config for this task (its SFT warm-up and RM training read it)."""
    return RM.RewardModelConfig(n_symbols=cfg.n_symbols, target_from_prompt=cfg.target_from_prompt,
                                max_len=cfg.max_len, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                lm_steps=cfg.sft_steps, steps=cfg.rm_steps, warmup_steps=min(10, cfg.rm_steps // 4))


def special_ids(cfg: PPOConfig) -> tuple[int, int, int, int]:
    """(bos, sep, eos, pad)."""
    return RM.special_tokens(task_config(cfg))


def prompt_len(cfg: PPOConfig) -> int:
    return 3  # <bos> t <sep>


def make_prompts(cfg: PPOConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) prompts <bos> t <sep> (t uniform, or always 0 unless target_from_prompt)."""
    bos, sep, _, _ = special_ids(cfg)
    t = RM.sample_targets(task_config(cfg), n, generator)
    return torch.stack([torch.full_like(t, bos), t, torch.full_like(t, sep)], dim=1)


def decoy_digit(targets: torch.Tensor, n_symbols: int) -> torch.Tensor:
    """The digit the biased annotator also likes: the one after the target, (t + 1) mod n."""
    return (targets + 1) % n_symbols


def biased_utility(tokens: torch.Tensor, n_symbols: int, decoy_bonus: float) -> torch.Tensor:
    """The biased annotator's judgement of full sequences (B, T): gold + decoy_bonus x count(decoy). On the
    task's data it mostly agrees with gold (both like targets); its optimum, all decoys, has gold 0."""
    decoy = decoy_digit(tokens[:, 1:2], n_symbols)
    return RM.gold_reward(tokens) + decoy_bonus * (tokens[:, 3:] == decoy).sum(1).float()


# ---------------------------------------------------------------------------------------------------
# The four roles: SFT policy (actor and frozen reference), reward model, critic


def sft_policy(cfg: PPOConfig, generator: torch.Generator) -> Transformer:
    """The SFT policy: reward_model's warm-up LM, trained to imitate the task's data distribution."""
    model, _ = RM.warmup_language_model(task_config(cfg), generator)
    return model


def frozen_copy(model: Transformer) -> Transformer:
    """A deep copy with every parameter frozen (the reference policy): the actor's updates never reach it."""
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen.eval()


def actor_and_reference(sft: Transformer) -> tuple[Transformer, Transformer]:
    """Two copies of the SFT policy: the actor (trainable) and the reference (frozen). They must be
    separate objects: a reference that aliases the actor moves with it and the KL penalty is always 0."""
    return copy.deepcopy(sft).train(), frozen_copy(sft)


def honest_reward_model(sft: Transformer, cfg: PPOConfig, generator: torch.Generator) -> tuple[Transformer, list]:
    """A Bradley-Terry RM initialised from the SFT model and trained by reward_model.train_reward_model
    on pairs labelled by the gold reward (5% label noise); returned frozen, with its training history."""
    rm_cfg = task_config(cfg)
    rm = RM.reward_model_from_lm(sft, rm_cfg.head_init_std)
    history = RM.train_reward_model(rm, rm_cfg, generator)
    return frozen_copy(rm), history


def proxy_agreement(pairs: RM.Pairs, n_symbols: int, decoy_bonus: float) -> float:
    """Share of gold-labelled pairs on which the biased annotator also prefers the chosen answer (ties count
    as disagreement): how plausible the flawed proxy looks on the data distribution."""
    return (biased_utility(pairs.chosen, n_symbols, decoy_bonus)
            > biased_utility(pairs.rejected, n_symbols, decoy_bonus)).float().mean().item()


def reward_fn_from_model(rm: Transformer, pad_id: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Full token sequences (B, T) -> (B,) reward-model scores at each sequence's last non-pad token."""

    @torch.no_grad()
    def reward_fn(tokens: torch.Tensor) -> torch.Tensor:
        return RM.score(rm, tokens, pad_id)

    return reward_fn


def new_critic(sft: Transformer) -> Transformer:
    """The critic: the SFT model with its LM head swapped for a zero-initialised d -> 1 value head
    (V = 0 everywhere at the start), trained alongside the actor with its own optimiser."""
    return RM.reward_model_from_lm(sft, 0.0)


# ---------------------------------------------------------------------------------------------------
# One rollout and the exact KL


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P + T) prompts, responses, <pad> after each <eos>
    mask: torch.Tensor  # (B, T) 1 on response tokens up to and including <eos>
    old_logprobs: torch.Tensor  # (B, T) log pi_old(y_t), the rollout policy (constants for the update)
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(y_t)
    values: torch.Tensor  # (B, T) V_old(x, y_<t)
    scores: torch.Tensor  # (B,) reward-model scores


@torch.no_grad()
def collect_rollout(policy: Transformer, reference: Transformer, critic: Transformer, reward_fn: Callable,
            prompts: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int, generator: torch.Generator,
            temperature: float = 1.0) -> Rollout:
    """Sample one response per prompt and score it with all four models (no gradients anywhere)."""
    P = prompts.shape[1]
    tokens, mask = sample_responses(policy, prompts, max_new_tokens, eos_id, pad_id, generator, temperature)
    old_logprobs, _ = policy_logprobs(policy, tokens, P, temperature)
    ref_logprobs, _ = policy_logprobs(reference, tokens, P, temperature)
    return Rollout(tokens, mask, old_logprobs, ref_logprobs, critic_values(critic, tokens, P), reward_fn(tokens))


@torch.no_grad()
def token_kl_exact(policy: Transformer, reference: Transformer, tokens: torch.Tensor, mask: torch.Tensor,
                   n_prompt: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) exact KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) from the full next-token distributions at every
    valid response position, 0 elsewhere. Summed over t and averaged over y ~ pi it is the sequence KL."""
    logp = torch.log_softmax(response_logits(policy, tokens, n_prompt) / temperature, dim=-1)
    logq = torch.log_softmax(response_logits(reference, tokens, n_prompt) / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


@torch.no_grad()
def evaluate(policy: Transformer, reference: Transformer, cfg: PPOConfig, generator: torch.Generator,
             gold_fn: Callable = RM.gold_reward) -> dict:
    """Gold reward, exact sequence KL to the reference and mean length of ``eval_prompts`` samples."""
    bos, sep, eos, pad = special_ids(cfg)
    P = prompt_len(cfg)
    prompts = make_prompts(cfg, cfg.eval_prompts, generator)
    tokens, mask = sample_responses(policy, prompts, cfg.max_len + 1, eos, pad, generator, cfg.temperature)
    kl = token_kl_exact(policy, reference, tokens, mask, P, cfg.temperature).sum(1)
    return {"gold": gold_fn(tokens).mean().item(), "kl": kl.mean().item(), "length": mask.sum(1).mean().item(),
            "tokens": tokens, "mask": mask}


# ---------------------------------------------------------------------------------------------------
# The closed loop: one rollout's advantages, one PPO update, the training loop


@dataclass
class Advantages:
    """What the loop derives from one rollout before it updates: all (B, T), zero outside the mask."""

    rewards: torch.Tensor  # -beta k1 on every token + the score on the last valid token
    advantages: torch.Tensor  # GAE(gamma, lam) over each response, before whitening
    whitened: torch.Tensor  # what the actor's loss uses
    returns: torch.Tensor  # advantages + values: the critic's targets


def rollout_advantages(ro: Rollout, beta: float, gamma: float, lam: float, *,
                       kl_penalized_rewards: Callable = kl_penalized_rewards,
                       masked_whiten: Callable = masked_whiten) -> Advantages:
    """Token rewards, GAE(gamma, lam) over every response, advantages whitened over valid tokens only."""
    rewards = kl_penalized_rewards(ro.old_logprobs, ro.ref_logprobs, ro.scores, ro.mask, beta)
    advantages, returns = response_gae(rewards, ro.values, ro.mask, gamma, lam)
    return Advantages(rewards, advantages, masked_whiten(advantages, ro.mask), returns)


def _optimizer(model: Transformer, lr: float, steps: int):
    return configure_optimizer(model, OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0), steps)


def ppo_optimizers(policy: Transformer, critic: Transformer, cfg: PPOConfig, iterations: int) -> dict:
    """{"actor": (AdamW, scheduler), "critic": (AdamW, scheduler)}: constant lr, no weight decay, one
    optimizer per trained model. The reference and the reward model get none: they are never trained."""
    updates = iterations * cfg.ppo_epochs * cfg.n_minibatches
    return {"actor": _optimizer(policy, cfg.actor_lr, updates), "critic": _optimizer(critic, cfg.critic_lr, updates)}


def _step(loss: torch.Tensor, model: Transformer, optimizer, scheduler, max_grad_norm: float) -> None:
    loss.backward()
    clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def ppo_update(policy: Transformer, critic: Transformer, ro: Rollout, adv: Advantages, optimizers: dict,
               cfg: PPOConfig, generator: torch.Generator, *, ppo_clip_loss: Callable = ppo_clip_loss) -> dict:
    """``ppo_epochs`` passes over one rollout in ``n_minibatches`` shuffled minibatches; each minibatch
    steps the actor (clipped surrogate - ent_coef x entropy) and the critic (clipped value loss).
    Returns lists of per-minibatch stats, and first_ratio_dev / first_clipfrac: max |ratio - 1| and the
    clip fraction of the first minibatch (both 0 when the rollout's log-probs are the policy's own)."""
    B, T = ro.mask.shape
    P, mb = ro.tokens.shape[1] - T, B // cfg.n_minibatches
    stats = {k: [] for k in ("pg", "vf", "clipfrac", "vclipfrac", "approxkl", "ratio", "entropy")}
    policy.train()
    critic.train()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, mb):
            idx = order[start:start + mb]
            m = ro.mask[idx]
            logprobs, entropy = policy_logprobs(policy, ro.tokens[idx], P, cfg.temperature)
            pg_loss, clipfrac, approxkl = ppo_clip_loss(logprobs, ro.old_logprobs[idx], adv.whitened[idx], m,
                                                        cfg.clip_eps)
            mean_entropy = masked_mean(entropy, m)
            _step(pg_loss - cfg.ent_coef * mean_entropy, policy, *optimizers["actor"], cfg.max_grad_norm)
            values = critic_values(critic, ro.tokens[idx], P)
            vf_loss, vf_clipfrac = value_loss(values, ro.values[idx], adv.returns[idx], m, cfg.clip_value)
            _step(vf_loss, critic, *optimizers["critic"], cfg.max_grad_norm)
            with torch.no_grad():
                ratio = torch.exp(logprobs - ro.old_logprobs[idx])
                if "first_ratio_dev" not in stats:  # nothing has moved yet: the policy IS pi_old
                    deviation = torch.where(m.bool(), (ratio - 1).abs(), torch.zeros_like(ratio))
                    stats["first_ratio_dev"] = deviation.max().item()
                    stats["first_clipfrac"] = float(clipfrac)
            for key, value in (("pg", pg_loss), ("vf", vf_loss), ("clipfrac", clipfrac), ("vclipfrac", vf_clipfrac),
                               ("approxkl", approxkl), ("ratio", masked_mean(ratio, m)), ("entropy", mean_entropy)):
                stats[key].append(float(value.detach()))
    return stats


def _metrics(ro: Rollout, seq_kl: torch.Tensor, beta: float, stats: dict, eos_id: int) -> dict:
    """One iteration's record, with TRL's metric names."""
    avg = lambda key: sum(stats[key]) / len(stats[key])  # noqa: E731
    P = ro.tokens.shape[1] - ro.mask.shape[1]
    neg_logp = torch.where(ro.mask.bool(), -ro.old_logprobs, torch.zeros_like(ro.old_logprobs)).sum(1)
    return {
        "objective/kl": seq_kl.mean().item(), "objective/entropy": neg_logp.mean().item(),
        "objective/non_score_reward": (beta * seq_kl).mean().item(),
        "objective/rlhf_reward": (ro.scores - beta * seq_kl).mean().item(),
        "objective/scores": ro.scores.mean().item(), "objective/scores_std": ro.scores.std().item(),
        "objective/kl_coef": beta,
        "policy/approxkl_avg": avg("approxkl"), "policy/clipfrac_avg": avg("clipfrac"),
        "policy/entropy_avg": avg("entropy"), "loss/policy_avg": avg("pg"), "loss/value_avg": avg("vf"),
        "val/clipfrac_avg": avg("vclipfrac"), "val/ratio": avg("ratio"),
        "val/num_eos_tokens": int((ro.tokens[:, P:] == eos_id).sum()),
        "response_length": ro.mask.sum(1).mean().item(),
        "first_ratio_dev": stats["first_ratio_dev"], "first_clipfrac": stats["first_clipfrac"],
    }


# What the metrics of a history record mean, in words, and the unit of their axis (for plots).
METRIC_WORDS = {
    "objective/kl": dict(label="KL to the SFT policy", y_label="KL per answer (nats)"),
    "objective/entropy": dict(label="policy entropy", y_label="entropy per answer (nats)"),
    "objective/rlhf_reward": dict(label=r"RM score $-\ \beta\cdot$KL", y_label="reward per answer (RM logits)"),
    "objective/scores": dict(label="reward-model score", y_label="RM score per answer (logits)"),
    "objective/scores_std": dict(label="spread of the RM scores", y_label="RM score std (logits)"),
    "objective/gold_reward": dict(label="gold reward", y_label="gold reward (targets per answer)"),
    "objective/kl_coef": dict(label=r"KL coefficient $\beta$", y_label=r"$\beta$ (reward per nat)"),
    "policy/approxkl_avg": dict(label="approximate KL, new policy to old", y_label="KL per token (nats)"),
    "policy/clipfrac_avg": dict(label="share of tokens clipped", y_label="clipped (fraction of tokens)"),
    "loss/policy_avg": dict(label="policy loss (clipped surrogate)", y_label="loss (advantage units)"),
    "loss/value_avg": dict(label="value loss (clipped)", y_label=r"squared error (reward$^2$)"),
    "val/ratio": dict(label=r"probability ratio $\pi_\theta / \pi_{old}$", y_label="mean ratio (1 = unchanged)"),
    "val/clipfrac_avg": dict(label="share of values clipped", y_label="clipped (fraction of tokens)"),
    "response_length": dict(label="answer length", y_label="tokens per answer"),
}


def train_ppo(policy: Transformer, reference: Transformer, critic: Transformer, reward_fn: Callable,
              prompts_fn: Callable[[int, torch.Generator], torch.Tensor], cfg: PPOConfig, generator: torch.Generator,
              *, eos_id: int, pad_id: int, iterations: int | None = None, kl_coef: float | None = None,
              gold_fn: Callable | None = None, ppo_clip_loss: Callable = ppo_clip_loss,
              kl_estimators: Callable = kl_estimators, masked_whiten: Callable = masked_whiten,
              kl_penalized_rewards: Callable = kl_penalized_rewards, optimizers: dict | None = None,
              on_rollout: Callable[[int, Rollout, Advantages], None] | None = None,
              on_iteration: Callable[[int, dict], None] | None = None) -> tuple[Transformer, list[dict]]:
    """RLHF-PPO: ``iterations`` rollouts, each followed by ``ppo_epochs`` x ``n_minibatches`` updates of the
    actor (clipped surrogate, entropy bonus) and the critic (clipped value loss). ``policy`` and ``critic``
    are trained in place; ``reference`` and the reward model behind ``reward_fn`` (full sequences -> (B,)
    scores) are only read. ``prompts_fn(n, generator)`` draws (n, P) prompts; ``gold_fn`` (optional) maps
    sequences to a true reward that is only logged. ``kl_coef`` overrides cfg.kl_coef (0 = no KL penalty).
    ``optimizers`` (default: ppo_optimizers) lets the caller keep the live optimizer objects;
    ``on_rollout(it, rollout, advantages)`` sees each rollout and the advantages the update will use.

    Returns (policy, history): one dict per iteration with TRL's metric names (objective/kl, objective/
    entropy, objective/scores, objective/rlhf_reward, policy/approxkl_avg, policy/clipfrac_avg,
    loss/policy_avg, loss/value_avg, val/ratio, ...) and first_ratio_dev / first_clipfrac: max |ratio - 1|
    and the clip fraction on the first minibatch after the rollout (both 0 when nothing is stale).
    """
    iterations = cfg.iterations if iterations is None else iterations
    beta0 = cfg.kl_coef if kl_coef is None else kl_coef
    kl_ctl = (AdaptiveKLController(beta0, cfg.kl_target, cfg.kl_horizon) if cfg.kl_ctl == "adaptive" and beta0 > 0
              else FixedKLController(beta0))
    optimizers = ppo_optimizers(policy, critic, cfg, iterations) if optimizers is None else optimizers
    history = []
    for it in range(iterations):
        # ---- 1. rollout: sample, then score with actor (old), reference, critic and reward model
        prompts = prompts_fn(cfg.rollout_batch, generator)
        ro = collect_rollout(policy, reference, critic, reward_fn, prompts, cfg.max_len + 1, eos_id, pad_id,
                             generator, cfg.temperature)
        k1, _, _ = kl_estimators(ro.old_logprobs, ro.ref_logprobs)
        seq_kl = torch.where(ro.mask.bool(), k1, torch.zeros_like(k1)).sum(1)  # (B,) sum_t k1
        beta = kl_ctl.value
        # ---- 2. per-token rewards, GAE(gamma, lam) over the response, whitening over valid tokens
        adv = rollout_advantages(ro, beta, cfg.gamma, cfg.lam, kl_penalized_rewards=kl_penalized_rewards,
                                 masked_whiten=masked_whiten)
        if on_rollout is not None:
            on_rollout(it, ro, adv)
        # ---- 3. several epochs of minibatch updates on this rollout
        stats = ppo_update(policy, critic, ro, adv, optimizers, cfg, generator, ppo_clip_loss=ppo_clip_loss)
        kl_ctl.update(seq_kl.mean().item(), n_steps=cfg.rollout_batch)
        # ---- 4. metrics
        record = _metrics(ro, seq_kl, beta, stats, eos_id)
        if gold_fn is not None:
            record["objective/gold_reward"] = gold_fn(ro.tokens).float().mean().item()
        history.append(record)
        if on_iteration is not None:
            on_iteration(it, record)
    return policy, history


# ---------------------------------------------------------------------------------------------------
# The experiments: SFT + reward model, PPO with the KL penalty, reward hacking without it


@dataclass
class Setup:
    """What PPO starts from: the SFT policy and the honest reward model (frozen), and how good each is."""

    sft: Transformer
    sft_history: list[dict]  # the SFT warm-up's next-token loss per step
    reward_model: Transformer  # frozen
    rm_history: list[dict]  # Bradley-Terry loss per step
    heldout: RM.Pairs  # clean gold-labelled pairs, never trained on
    rm_accuracy: float  # the reward model's pairwise accuracy on them
    before: dict  # evaluate(sft): gold reward, KL (0), length and samples of the SFT policy


def prepare(cfg: PPOConfig, generator: torch.Generator) -> Setup:
    """Stage 1 (SFT warm-up) and stage 2 (Bradley-Terry reward model on gold-labelled pairs)."""
    rm_cfg = task_config(cfg)
    sft, sft_history = RM.warmup_language_model(rm_cfg, generator)
    rm, rm_history = honest_reward_model(sft, cfg, generator)
    heldout = RM.preference_pairs(rm_cfg, cfg.rm_eval_pairs, generator)
    accuracy = RM.pairwise_accuracy(rm, heldout, special_ids(cfg)[3])
    return Setup(sft, sft_history, rm, rm_history, heldout, accuracy, evaluate(sft, sft, cfg, generator))


@dataclass
class Trained:
    """PPO with the KL penalty: the four models after training, the history, and the final evaluation."""

    policy: Transformer
    reference: Transformer
    critic: Transformer
    history: list[dict]
    after: dict  # evaluate(policy, reference): gold reward, exact sequence KL to SFT, length, samples


def _prompts_fn(cfg: PPOConfig) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: make_prompts(cfg, n, g)


def train_with_kl_penalty(setup: Setup, cfg: PPOConfig, generator: torch.Generator, *,
                          critic: Transformer | None = None, ppo_clip_loss: Callable = ppo_clip_loss,
                          kl_estimators: Callable = kl_estimators, masked_whiten: Callable = masked_whiten,
                          kl_penalized_rewards: Callable = kl_penalized_rewards,
                          on_iteration: Callable[[int, dict], None] | None = None) -> Trained:
    """Stage 3: PPO from the SFT policy against the honest reward model, with the KL penalty to a frozen
    SFT copy. ``critic`` defaults to new_critic(sft) (a zero value head)."""
    _, _, eos, pad = special_ids(cfg)
    policy, reference = actor_and_reference(setup.sft)
    critic = new_critic(setup.sft) if critic is None else critic
    policy, history = train_ppo(policy, reference, critic, reward_fn_from_model(setup.reward_model, pad),
                                _prompts_fn(cfg), cfg, generator, eos_id=eos, pad_id=pad, gold_fn=RM.gold_reward,
                                ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators,
                                masked_whiten=masked_whiten, kl_penalized_rewards=kl_penalized_rewards,
                                on_iteration=on_iteration)
    return Trained(policy, reference, critic, history, evaluate(policy, reference, cfg, generator))


def running_mean(ys: list[float], n: int = 3) -> torch.Tensor:
    """The mean of each point and the (up to) n - 1 before it: a noisy curve, smoothed. (len(ys),) tensor."""
    y = torch.tensor(ys, dtype=torch.float64)
    c = torch.cat([y.new_zeros(1), y.cumsum(0)])
    i = torch.arange(1, len(ys) + 1)
    return (c[i] - c[(i - n).clamp(min=0)]) / (i - (i - n).clamp(min=0))


def tail_mean(ys: list[float], n: int = 3) -> float:
    """The mean of the last ``n`` points: the end of a noisy curve."""
    return running_mean(ys, n)[-1].item()


@dataclass
class Hacking:
    """beta = 0 against the biased proxy: per-iteration proxy score, gold reward and KL of the rollouts."""

    proxy_agreement: float  # the proxy's pairwise agreement with gold on the held-out pairs
    history: list[dict]
    proxy: list[float] = field(init=False)
    gold: list[float] = field(init=False)
    kl: list[float] = field(init=False)

    def __post_init__(self):
        self.proxy = [h["objective/scores"] for h in self.history]
        self.gold = [h["objective/gold_reward"] for h in self.history]
        self.kl = [h["objective/kl"] for h in self.history]


def reward_hacking(setup: Setup, cfg: PPOConfig, generator: torch.Generator, *,
                   ppo_clip_loss: Callable = ppo_clip_loss, kl_estimators: Callable = kl_estimators,
                   masked_whiten: Callable = masked_whiten,
                   on_iteration: Callable[[int, dict], None] | None = None) -> Hacking:
    """``hack_iterations`` of PPO with beta = 0 from a fresh copy of the SFT policy, rewarded by the biased
    annotator's judgement (biased_utility) instead of the honest reward model."""
    _, _, eos, pad = special_ids(cfg)
    policy, reference = actor_and_reference(setup.sft)
    proxy = lambda tokens: biased_utility(tokens, cfg.n_symbols, cfg.decoy_bonus)  # noqa: E731
    _, history = train_ppo(policy, reference, new_critic(setup.sft), proxy, _prompts_fn(cfg), cfg, generator,
                           eos_id=eos, pad_id=pad, iterations=cfg.hack_iterations, kl_coef=0.0, gold_fn=RM.gold_reward,
                           ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators, masked_whiten=masked_whiten,
                           on_iteration=on_iteration)
    return Hacking(proxy_agreement(setup.heldout, cfg.n_symbols, cfg.decoy_bonus), history)


@dataclass
class PPOResult:
    setup: Setup
    trained: Trained
    hacking: Hacking | None  # None when cfg.hack is off


def run(cfg: PPOConfig, generator: torch.Generator, *, ppo_clip_loss: Callable = ppo_clip_loss,
        kl_estimators: Callable = kl_estimators, masked_whiten: Callable = masked_whiten) -> PPOResult:
    """Both experiments: SFT + reward model, PPO with the KL penalty, then reward hacking (if cfg.hack).

    >>> r = run(PPOConfig.toy(), torch.Generator().manual_seed(0))
    >>> r.setup.before["gold"], r.trained.after["gold"], r.trained.after["kl"]   # gold up, KL bounded
    """
    kernels = dict(ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators, masked_whiten=masked_whiten)
    setup = prepare(cfg, generator)
    trained = train_with_kl_penalty(setup, cfg, generator, **kernels)
    return PPOResult(setup, trained, reward_hacking(setup, cfg, generator, **kernels) if cfg.hack else None)
