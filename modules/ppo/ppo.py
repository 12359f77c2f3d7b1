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
Second experiment (reward hacking): a proxy trained on labels from a biased annotator who also likes a
decoy digit, optimised with beta = 0: the proxy keeps rising while the gold reward falls.

Builds on: ppo.core (masked statistics, clipped losses, KL rewards, response GAE, KL controllers),
ppo.rollout (EOS-terminated sampling, log-probs, values), reward_model (task, SFT warm-up, RM), training.
Deviations from TRL's PPOTrainer: a separate critic network with its own optimizer (verl's layout), the
score on the last valid token (TRL puts it one slot after EOS), no dropout to switch off, tiny models.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
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
    "biased_preference_pairs", "train_biased_reward_model",
    "reward_fn_from_model", "new_critic",
    "Rollout", "collect_rollout", "token_kl_exact", "evaluate", "train_ppo",
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
    """What the ppo audit runs: the counting task and its models, PPO itself, the reward-hacking run."""

    # the task and the models (the reward_model module's counting task)
    n_symbols: int = 6  # digits 0..n_symbols-1, then <bos> <sep> <eos> <pad>
    target_from_prompt: bool = False  # True: the prompt names the digit to count; False: always 0
    max_len: int = 8  # SFT data responses have 3..max_len digits; PPO samples up to max_len + 1 tokens
    d_model: int = 32
    n_layers: int = 2
    sft_steps: int = 30  # next-token warm-up that makes the SFT policy (reward_model's lm_steps)
    rm_steps: int = 40  # Bradley-Terry steps of each reward model (honest and biased)
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
    kl_coef: float = 0.1  # beta (initial value when adaptive)
    kl_target: float = 4.0  # adaptive controller: target sequence KL, nats
    kl_horizon: int = 1000  # adaptive controller: horizon in samples (Ziegler: 10000)
    eval_prompts: int = 256  # samples for the gold reward and exact KL before / after
    # reward hacking: beta = 0 against a proxy trained on a biased annotator's labels
    hack: bool = True  # run the reward-hacking experiment
    hack_iterations: int = 14
    decoy_bonus: float = 3.0  # the annotator's utility: gold + decoy_bonus x count(decoy digit)
    # outcome bars
    min_gold_gain: float = 2.0  # gold reward after PPO minus the SFT policy's
    max_kl: float = 7.0  # sequence KL(policy || SFT) after PPO, nats
    min_proxy_gain: float = 0.5  # hacking: proxy score rise over the run
    min_gold_drop: float = 1.0  # hacking, "falls": the gold reward ends at least this far below its peak ...
    max_stall_gain: float = 0.5  # ... or "stalls": it ends at most this far above the SFT policy's

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
        return cls()

    @classmethod
    def full(cls) -> PPOConfig:
        return cls(target_from_prompt=True, sft_steps=250, rm_steps=150, iterations=30, rollout_batch=128,
                   eval_prompts=512, hack_iterations=30, min_gold_gain=1.2, max_kl=6.0)


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
    """The biased annotator's judgement of full sequences (B, T): gold + decoy_bonus x count(decoy)."""
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


def biased_preference_pairs(cfg: PPOConfig, n_pairs: int, generator: torch.Generator) -> RM.Pairs:
    """Up to ``n_pairs`` pairs of responses to the same prompt from the task's data distribution, labelled
    by the biased annotator: chosen = the higher biased_utility (pairs it rates equal are dropped, so
    a pair may differ only in decoys). chosen_gold / rejected_gold are the gold rewards."""
    rm_cfg = task_config(cfg)
    targets = RM.sample_targets(rm_cfg, 2 * n_pairs, generator)  # oversampled: ties are dropped
    a, b = RM.sample_sequences(rm_cfg, targets, generator), RM.sample_sequences(rm_cfg, targets, generator)
    u_a, u_b = biased_utility(a, cfg.n_symbols, cfg.decoy_bonus), biased_utility(b, cfg.n_symbols, cfg.decoy_bonus)
    keep, a_wins = u_a != u_b, (u_a > u_b)[:, None]
    chosen, rejected = torch.where(a_wins, a, b)[keep][:n_pairs], torch.where(a_wins, b, a)[keep][:n_pairs]
    gold_chosen, gold_rejected = RM.gold_reward(chosen), RM.gold_reward(rejected)
    return RM.Pairs(chosen, rejected, gold_chosen, gold_rejected, gold_chosen < gold_rejected)


def train_biased_reward_model(sft: Transformer, cfg: PPOConfig, generator: torch.Generator) -> Transformer:
    """The flawed proxy: the same Bradley-Terry recipe (reward_model's loss, score and optimiser) on the
    biased annotator's labels. It agrees with gold on most pairs of the SFT distribution, yet its
    optimum is a response full of decoys."""
    rm_cfg = task_config(cfg)
    rm = RM.reward_model_from_lm(sft, rm_cfg.head_init_std)
    RM.train_reward_model(rm, rm_cfg, generator, pairs_fn=lambda n, g: biased_preference_pairs(cfg, n, g))
    return frozen_copy(rm)


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
# The closed loop


def _optimizer(model: Transformer, lr: float, steps: int):
    return configure_optimizer(model, OptimConfig(lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0), steps)


def train_ppo(policy: Transformer, reference: Transformer, critic: Transformer, reward_fn: Callable,
              prompts_fn: Callable[[int, torch.Generator], torch.Tensor], cfg: PPOConfig, generator: torch.Generator,
              *, eos_id: int, pad_id: int, iterations: int | None = None, kl_coef: float | None = None,
              gold_fn: Callable | None = None, ppo_clip_loss: Callable = ppo_clip_loss,
              kl_estimators: Callable = kl_estimators, masked_whiten: Callable = masked_whiten,
              kl_penalized_rewards: Callable = kl_penalized_rewards,
              on_iteration: Callable[[int, dict], None] | None = None) -> tuple[Transformer, list[dict]]:
    """RLHF-PPO: ``iterations`` rollouts, each followed by ``ppo_epochs`` x ``n_minibatches`` updates of the
    actor (clipped surrogate, entropy bonus) and the critic (clipped value loss). ``policy`` and ``critic``
    are trained in place; ``reference`` and the reward model behind ``reward_fn`` (full sequences -> (B,)
    scores) are only read. ``prompts_fn(n, generator)`` draws (n, P) prompts; ``gold_fn`` (optional) maps
    sequences to a true reward that is only logged. ``kl_coef`` overrides cfg.kl_coef (0 = no KL penalty).

    Returns (policy, history): one dict per iteration with TRL's metric names (objective/kl, objective/
    entropy, objective/scores, objective/rlhf_reward, policy/approxkl_avg, policy/clipfrac_avg,
    loss/policy_avg, loss/value_avg, val/ratio, ...) and first_ratio_dev / first_clipfrac: max |ratio - 1|
    and the clip fraction on the first minibatch after the rollout (both 0 when nothing is stale).
    """
    iterations = cfg.iterations if iterations is None else iterations
    beta0 = cfg.kl_coef if kl_coef is None else kl_coef
    kl_ctl = (AdaptiveKLController(beta0, cfg.kl_target, cfg.kl_horizon) if cfg.kl_ctl == "adaptive" and beta0 > 0
              else FixedKLController(beta0))
    updates = iterations * cfg.ppo_epochs * cfg.n_minibatches
    actor_opt, actor_sched = _optimizer(policy, cfg.actor_lr, updates)
    critic_opt, critic_sched = _optimizer(critic, cfg.critic_lr, updates)
    B, mb = cfg.rollout_batch, cfg.rollout_batch // cfg.n_minibatches
    history = []
    for it in range(iterations):
        # ---- 1. rollout: sample, then score with actor (old), reference, critic and reward model
        prompts = prompts_fn(B, generator)
        P = prompts.shape[1]
        ro = collect_rollout(policy, reference, critic, reward_fn, prompts, cfg.max_len + 1, eos_id, pad_id, generator,
                     cfg.temperature)
        mask = ro.mask
        scores = ro.scores
        k1, _, _ = kl_estimators(ro.old_logprobs, ro.ref_logprobs)
        seq_kl = torch.where(mask.bool(), k1, torch.zeros_like(k1)).sum(1)  # (B,) sum_t k1
        beta = kl_ctl.value
        # ---- 2. per-token rewards, GAE over the response, whitening over valid tokens
        rewards = kl_penalized_rewards(ro.old_logprobs, ro.ref_logprobs, scores, mask, beta)
        advantages, returns = response_gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        # ---- 3. several epochs of minibatch updates on this rollout
        stats = {k: [] for k in ("pg", "vf", "clipfrac", "vclipfrac", "approxkl", "ratio", "entropy")}
        first_dev = first_clipfrac = None
        policy.train()
        critic.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=generator)
            for start in range(0, B, mb):
                idx = order[start:start + mb]
                m = mask[idx]
                logprobs, entropy = policy_logprobs(policy, ro.tokens[idx], P, cfg.temperature)
                pg_loss, clipfrac, approxkl = ppo_clip_loss(logprobs, ro.old_logprobs[idx], advantages[idx], m,
                                                            cfg.clip_eps)
                mean_entropy = masked_mean(entropy, m)
                (pg_loss - cfg.ent_coef * mean_entropy).backward()
                clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                actor_opt.step()
                actor_opt.zero_grad(set_to_none=True)
                actor_sched.step()

                values = critic_values(critic, ro.tokens[idx], P)
                vf_loss, vf_clipfrac = value_loss(values, ro.values[idx], returns[idx], m, cfg.clip_value)
                vf_loss.backward()
                clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                critic_opt.step()
                critic_opt.zero_grad(set_to_none=True)
                critic_sched.step()

                with torch.no_grad():
                    ratio = torch.exp(logprobs - ro.old_logprobs[idx])
                    if first_dev is None:  # the first minibatch after the rollout: nothing has moved yet
                        first_dev = torch.where(m.bool(), (ratio - 1).abs(), torch.zeros_like(ratio)).max().item()
                        first_clipfrac = float(clipfrac)
                for key, value in (("pg", pg_loss), ("vf", vf_loss), ("clipfrac", clipfrac),
                                   ("vclipfrac", vf_clipfrac), ("approxkl", approxkl),
                                   ("ratio", masked_mean(ratio, m)), ("entropy", mean_entropy)):
                    stats[key].append(float(value.detach()))
        kl_ctl.update(seq_kl.mean().item(), n_steps=B)
        # ---- 4. metrics (TRL names)
        avg = lambda key: sum(stats[key]) / len(stats[key])  # noqa: E731
        neg_logp = torch.where(mask.bool(), -ro.old_logprobs, torch.zeros_like(ro.old_logprobs)).sum(1)
        record = {
            "objective/kl": seq_kl.mean().item(), "objective/entropy": neg_logp.mean().item(),
            "objective/non_score_reward": (beta * seq_kl).mean().item(),
            "objective/rlhf_reward": (scores - beta * seq_kl).mean().item(),
            "objective/scores": scores.mean().item(), "objective/scores_std": scores.std().item(),
            "objective/kl_coef": beta,
            "policy/approxkl_avg": avg("approxkl"), "policy/clipfrac_avg": avg("clipfrac"),
            "policy/entropy_avg": avg("entropy"), "loss/policy_avg": avg("pg"), "loss/value_avg": avg("vf"),
            "val/clipfrac_avg": avg("vclipfrac"), "val/ratio": avg("ratio"),
            "val/num_eos_tokens": int((ro.tokens[:, P:] == eos_id).sum()),
            "response_length": mask.sum(1).mean().item(),
            "first_ratio_dev": first_dev, "first_clipfrac": first_clipfrac,
        }
        if gold_fn is not None:
            record["objective/gold_reward"] = gold_fn(ro.tokens).float().mean().item()
        history.append(record)
        if on_iteration is not None:
            on_iteration(it, record)
    return policy, history
