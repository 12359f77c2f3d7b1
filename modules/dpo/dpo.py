"""DPO: align a policy on preference pairs with a classification loss, no reward model, no sampling loop.

    KL-regularised RL:  max_pi E_{y ~ pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x))
    closed-form optimum: pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)
    so                   r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x)
    Bradley-Terry:       P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))      (beta log Z(x) cancels)
    DPO loss:            L = -log sigmoid(beta * h),
                         h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    gradient:            dL/dlog pi(y_w) = -beta sigmoid(r_l - r_w),   r = beta log(pi / pi_ref) (implicit reward)
    variants:            cDPO (label smoothing eps), IPO ((h - 1/(2 beta))^2), KTO (unpaired, a KL baseline)

The toy task: the prompt is ``<bos> d <sep>`` with a target digit d, the response is ``response_len``
digits, and the gold reward is how many response digits equal d. The reference policy is a tiny Llama
warmed up by supervised learning on responses whose digits are d with probability warmup_target_prob
(0.3; 1/n_digits would ignore d): somewhat on topic; preference pairs are two reference samples per
prompt, the one with the larger gold reward chosen (ties dropped). DPO reweights what the reference can
already sample: a reference that ignores d gave DPO nothing to amplify (see the README).

Builds on: transformer (tiny Llama, generate with the KV cache), training (AdamW, warmup + cosine,
global-norm clipping, the supervised train() loop).
Deviations: fixed-length responses (no EOS, no padding), so the response mask is a fixed band; responses
are digits only (DigitPolicy: <bos>/<sep> get probability 0, as constrained decoding); the preference
labels are deterministic (gold decides), the regime where the sigmoid-DPO optimum is the collapse onto
the best answer (h -> infinity) and only the training budget stops it short, while IPO's squared loss
stops at 1/(2 beta); the warm-up SFT stands in for modules.sft.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from modules.training import IGNORE_INDEX, OptimConfig, clip_grad_norm_, configure_optimizer, supervised_warm_up
from modules.transformer import ModelConfig, Transformer, generate

__all__ = [
    "FORMULAS", "LOSS_TYPES", "DPOConfig",
    "dpo_loss", "dpo_loss_from_logratios", "kto_loss", "mismatched_indices", "preference_accuracy",
    "model_config", "DigitPolicy", "make_policy_model", "bos_id", "sep_id", "prompt_len", "make_prompts", "gold_reward",
    "warm_up_batch", "warm_up_reference",
    "response_log_probs", "sequence_logps", "sample_responses", "sequence_kl",
    "collapse_kl", "PreferencePairs", "build_preference_pairs", "pair_logps",
    "Evaluation", "evaluate_policy", "policy_from_reference", "train_dpo", "DPOData", "build_data", "DPOResult", "run",
]

LOSS_TYPES = ("sigmoid", "ipo")

FORMULAS = [
    ("Optimal policy", r"$\pi^*(y|x)=\frac{1}{Z(x)}\pi_{ref}(y|x)\,e^{r(x,y)/\beta}$"),
    ("Implicit reward", r"$\hat r(x,y)=\beta\log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}$"),
    ("DPO loss", r"$L=-\log\sigma(\hat r_w-\hat r_l)$"),
    ("Gradient weight", r"$\frac{\partial L}{\partial\log\pi_\theta(y_w|x)}=-\beta\,\sigma(\hat r_l-\hat r_w)$"),
    ("cDPO", r"$L_\epsilon=-(1-\epsilon)\log\sigma(\beta h)-\epsilon\log\sigma(-\beta h)$"),
    ("IPO", r"$L=\left(h-\frac{1}{2\beta}\right)^2$"),
    ("KTO", r"$L_w=1-\sigma(\beta(\log\frac{\pi}{\pi_{ref}}(y_w)-z)),\ z=\max(0,\widehat{KL})$"),
]


@dataclass(frozen=True)
class DPOConfig:
    """What the dpo audit runs: the target-digit task, the warm-up, the preference data, DPO itself."""

    n_digits: int = 10  # response vocabulary 0..n_digits-1; <bos> and <sep> come after
    response_len: int = 8  # digits per response (fixed: no EOS, no padding)
    d_model: int = 32
    n_layers: int = 1  # one layer is enough to copy the target digit from the prompt
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 88
    rope_theta: float = 100.0
    tie_embeddings: bool = True  # one matrix reads and writes tokens: copying the target digit is easy
    digits_only: bool = True  # responses are digits: <bos>/<sep> get no probability mass (see DigitPolicy)
    warmup_target_prob: float = 0.3  # warm-up data: P(a response digit is the target); 1/n_digits = uniform
    warmup_steps: int = 120  # supervised warm-up steps that make the reference policy (100 left 1 seed in 20 off topic)
    warmup_batch: int = 64
    warmup_lr: float = 2e-2
    n_train_prompts: int = 2048  # prompts of the training pairs (pairs with equal gold are dropped)
    n_eval_prompts: int = 256  # prompts of the held-out pairs
    beta: float = 0.1  # KL strength = temperature of the implicit reward
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO: assumed probability that a label is flipped (sigmoid only)
    steps: int = 60  # DPO optimizer steps
    batch_size: int = 64  # pairs per step
    lr: float = 3e-3  # peak; linear warmup then cosine to lr / 10
    lr_warmup: int = 10
    eval_every: int = 20  # steps between held-out evaluations
    n_policy_samples: int = 256  # responses sampled from the policy for gold reward and KL
    # outcome bars from `llmaudit sweep dpo` (toy seeds 0-19, full seeds 0-4), each below the worst seed:
    min_margin: float = 2.8  # mean h on the training pairs at the end, nats; worst toy seed 3.19
    min_accuracy: float = 0.84  # held-out implicit-reward preference accuracy at the end; worst 0.933
    min_gold_gain: float = 2.5  # gold reward of policy samples minus the reference's; worst 2.87
    max_kl_fraction: float = 0.6  # KL(policy || reference) / KL of always answering the target; worst 0.34

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_digits": ">= 2", "response_len": ">= 1", "d_model": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1",
        "n_kv_heads": ">= 1", "d_ff": ">= 1", "rope_theta": "> 1", "warmup_target_prob": "[0, 1]",
        "warmup_steps": ">= 1", "warmup_batch": ">= 1", "warmup_lr": ">= 0", "n_train_prompts": ">= 1",
        "n_eval_prompts": ">= 1", "beta": "> 0", "label_smoothing": "[0, 0.5)", "steps": ">= 1",
        "batch_size": ">= 1", "lr": ">= 0", "lr_warmup": ">= 0", "eval_every": ">= 1", "n_policy_samples": ">= 1",
        "min_margin": ">= 0", "min_accuracy": "[0, 1]", "min_gold_gain": ">= 0", "max_kl_fraction": "> 0",
    }

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0 or self.steps < 1 or self.response_len < 1:
            raise ValueError("beta, steps and response_len must be positive")

    @classmethod
    def toy(cls) -> DPOConfig:
        return cls()

    @classmethod
    def full(cls) -> DPOConfig:
        # twice the pairs, twice the batch, four times the held-out data; the same 60 steps, because with
        # deterministic preferences more steps only drive the policy to the collapse (see max_kl_fraction)
        # full seeds 0-4: margin >= 3.42, accuracy >= 0.958, gain >= 3.40, KL fraction <= 0.40
        return cls(n_train_prompts=4096, n_eval_prompts=1024, batch_size=128, n_policy_samples=1024,
                   min_margin=3.0, min_accuracy=0.86, min_gold_gain=3.0, max_kl_fraction=0.5)


# ---------------------------------------------------------------------------------------------------
# Kernels: the DPO family of losses


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards, as TRL's dpo_loss returns them.

    All four inputs are (B,) sequence log-probs: the sum over the response tokens of
    log pi(y_t | x, y_<t), for the policy (requires grad) and the frozen reference (constants).
        chosen_logratios   = policy_chosen_logps - ref_chosen_logps
        rejected_logratios = policy_rejected_logps - ref_rejected_logps
        h = chosen_logratios - rejected_logratios
    loss_type "sigmoid" (DPO; label_smoothing eps > 0 is conservative DPO, cDPO):
        losses = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    loss_type "ipo" (the caller passes length-averaged log-probs, as the IPO authors and TRL do):
        losses = (h - 1 / (2 * beta)) ** 2
    Implicit rewards (metrics only, DETACHED): chosen_rewards = beta * chosen_logratios,
    rejected_rewards = beta * rejected_logratios.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the training loss is losses.mean().
    With policy == reference: sigmoid/cDPO losses are ln 2 = 0.693147, ipo (1/(2 beta))^2, rewards 0.
    Example (beta 0.1): chosen_logratio 2, rejected_logratio -1 -> sigmoid 0.554355, eps=0.1 0.584355,
    ipo 4.0; rewards 0.2 and -0.1. Use F.logsigmoid, not log(sigmoid(.)), which underflows.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {LOSS_TYPES}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss_from_logratios(chosen: float, rejected: float, beta: float) -> float:
    """-log sigmoid(beta * (chosen - rejected)) for plain numbers (chosen/rejected = policy-minus-reference
    log-ratios), computed without overflow: softplus(-x) = max(-x, 0) + log1p(exp(-|x|))."""
    x = beta * (chosen - rejected)
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (TRL's kto loss): unpaired desirable (chosen) and undesirable (rejected) answers.

    chosen (Bc,), rejected (Br,) sequence log-probs; *_kl_logps (Bk,) are log-probs of MISMATCHED
    (prompt, completion) pairs (see mismatched_indices) that estimate KL(pi || pi_ref):
        z = clamp(mean(policy_kl_logps - ref_kl_logps), min=0), detached (a baseline, no gradient)
        chosen:   1 - sigmoid(beta * (chosen_logratios - z))
        rejected: 1 - sigmoid(beta * (z - rejected_logratios))
    Returns (losses = cat(desirable_weight * chosen, undesirable_weight * rejected), chosen_rewards,
    rejected_rewards (beta * logratios, detached), z).
    """
    kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def mismatched_indices(n: int) -> torch.Tensor:
    """KTO's KL pairs: prompt i gets completion (i + 1) mod n, so no prompt keeps its own completion,
    also for odd n (reversing the batch leaves the middle element matched: TRL issue 1911)."""
    if n < 2:
        raise ValueError("the KL estimate needs a batch of at least 2 to mismatch completions")
    return (torch.arange(n) + 1) % n


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs whose implicit reward ranks the chosen answer first; exact ties count one half
    (so policy == reference, where every reward is 0, scores 0.5, a coin flip)."""
    wins = (chosen_rewards > rejected_rewards).double() + 0.5 * (chosen_rewards == rejected_rewards).double()
    return wins.mean().item()


# ---------------------------------------------------------------------------------------------------
# The task: target-digit prompts, gold reward, the warm-up that makes the reference policy


def bos_id(cfg: DPOConfig) -> int:
    return cfg.n_digits


def sep_id(cfg: DPOConfig) -> int:
    return cfg.n_digits + 1


def prompt_len(cfg: DPOConfig) -> int:
    return 3  # <bos> d <sep>


def model_config(cfg: DPOConfig) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.n_digits + 2, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta,
                       tie_embeddings=cfg.tie_embeddings, max_seq_len=prompt_len(cfg) + cfg.response_len)


class DigitPolicy(Transformer):
    """The tiny Llama answering in the response vocabulary only: the logits of the prompt-only tokens
    <bos> and <sep> are set to -1e4 (probability exactly 0 in float32), as constrained decoding does.
    Without it, pushing rejected digits down can move probability onto tokens that no response ever
    contained, far from the reference (likelihood displacement): the KL grows while the gold stalls."""

    def __init__(self, cfg: DPOConfig):
        super().__init__(model_config(cfg))
        self.n_digits = cfg.n_digits

    def forward(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        logits = super().forward(tokens, cache)  # (B, T, V)
        return logits.index_fill(-1, torch.arange(self.n_digits, logits.shape[-1]), -1e4)


def make_policy_model(cfg: DPOConfig) -> Transformer:
    """A fresh model (weights from the global RNG): a DigitPolicy, or the plain tiny Llama."""
    return DigitPolicy(cfg) if cfg.digits_only else Transformer(model_config(cfg))


def make_prompts(cfg: DPOConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) prompts <bos> d <sep> with a uniformly random target digit d."""
    d = torch.randint(0, cfg.n_digits, (n, 1), generator=generator)
    return torch.cat([torch.full((n, 1), bos_id(cfg)), d, torch.full((n, 1), sep_id(cfg))], dim=1)


def gold_reward(tokens: torch.Tensor, cfg: DPOConfig) -> torch.Tensor:
    """(B,) float: how many response digits of the full sequences (B, 3 + K) equal the target digit."""
    target = tokens[:, 1:2]
    return (tokens[:, prompt_len(cfg):] == target).sum(-1).float()


def warm_up_batch(cfg: DPOConfig, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the supervised warm-up: prompts followed by digits that are the prompt's d
    with probability warmup_target_prob and uniform over the others otherwise, the loss on the response
    only (the warm-up teaches the format and a little of the task, not the preference)."""
    prompts = make_prompts(cfg, batch_size, generator)
    answer = torch.randint(0, cfg.n_digits, (batch_size, cfg.response_len), generator=generator)
    other = (prompts[:, 1:2] + torch.randint(1, cfg.n_digits, answer.shape, generator=generator)) % cfg.n_digits
    is_target = torch.rand(answer.shape, generator=generator) < cfg.warmup_target_prob
    answer = torch.where(is_target, prompts[:, 1:2].expand_as(answer), other)
    seq = torch.cat([prompts, answer], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, : prompt_len(cfg) - 1] = IGNORE_INDEX
    return inputs, targets


def warm_up_reference(cfg: DPOConfig, generator: torch.Generator) -> tuple[Transformer, list[dict]]:
    """The reference (and initial) policy: a tiny Llama after a short supervised warm-up (the stand-in
    for an SFT model; init from the global RNG). Its response NLL tends to ln(n_digits)."""
    model = make_policy_model(cfg)
    history = supervised_warm_up(model, lambda g: warm_up_batch(cfg, cfg.warmup_batch, g), cfg.warmup_steps,
                                 cfg.warmup_lr, generator)
    return model, history


# ---------------------------------------------------------------------------------------------------
# Log-probs, sampling and KL on the response tokens


def response_log_probs(model: Transformer, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(B, K, V) log pi(. | x, y_<t) at the K response positions of full sequences tokens (B, P + K).
    logits[:, t] predict tokens[:, t + 1], so the response is predicted from positions P-1 .. P+K-2."""
    logits = model(tokens[:, :-1])[:, n_prompt - 1:]  # (B, K, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a low-precision log-softmax loses too much
    return F.log_softmax(logits, dim=-1)


def sequence_logps(model: Transformer, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(B,) log pi(y | x) = sum over the response tokens of log pi(y_t | x, y_<t); prompt excluded."""
    logp = response_log_probs(model, tokens, n_prompt)
    return logp.gather(-1, tokens[:, n_prompt:, None]).squeeze(-1).sum(-1)


@torch.no_grad()
def sample_responses(model: Transformer, prompts: torch.Tensor, cfg: DPOConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """(B, P + K) full sequences: prompts followed by K tokens sampled at temperature 1 (KV cache)."""
    return generate(model, prompts, cfg.response_len, temperature=1.0, generator=generator)


@torch.no_grad()
def sequence_kl(policy: Transformer, reference: Transformer, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(B,) sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) along sequences sampled from the policy: an
    unbiased, non-negative estimate of the sequence-level KL(pi(.|x) || pi_ref(.|x)) in nats."""
    logp, logq = response_log_probs(policy, tokens, n_prompt), response_log_probs(reference, tokens, n_prompt)
    return (logp.exp() * (logp - logq)).sum(-1).sum(-1)


@torch.no_grad()
def collapse_kl(reference: Transformer, cfg: DPOConfig) -> float:
    """KL(pi || pi_ref) of the collapsed policy that always answers d d ... d (the best answer, gold =
    response_len), averaged over the uniform target digit d: a deterministic policy on y has
    KL = -log pi_ref(y | x). Sigmoid DPO on deterministic preferences drifts toward this policy."""
    n = cfg.n_digits
    digits = torch.arange(n)[:, None]
    all_target = torch.cat([torch.full((n, 1), bos_id(cfg)), digits, torch.full((n, 1), sep_id(cfg)),
                            digits.expand(n, cfg.response_len)], dim=1)  # <bos> d <sep> d d ... d
    return -sequence_logps(reference, all_target, prompt_len(cfg)).mean().item()


# ---------------------------------------------------------------------------------------------------
# Preference data from the reference policy, labelled by the gold reward


@dataclass
class PreferencePairs:
    chosen: torch.Tensor  # (N, P + K) full sequences with the larger gold reward
    rejected: torch.Tensor  # (N, P + K)
    gold_chosen: torch.Tensor  # (N,)
    gold_rejected: torch.Tensor  # (N,)
    ref_chosen_logps: torch.Tensor  # (N,) cached once: the reference is frozen
    ref_rejected_logps: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.chosen.shape[0]


@torch.no_grad()
def build_preference_pairs(reference: Transformer, cfg: DPOConfig, n_prompts: int,
                           generator: torch.Generator) -> PreferencePairs:
    """Two reference samples per prompt; the one with the larger gold reward is chosen, ties dropped."""
    prompts = make_prompts(cfg, n_prompts, generator)
    a = sample_responses(reference, prompts, cfg, generator)
    b = sample_responses(reference, prompts, cfg, generator)
    ga, gb = gold_reward(a, cfg), gold_reward(b, cfg)
    keep = ga != gb
    a_wins = (ga > gb)[:, None]
    chosen = torch.where(a_wins, a, b)[keep]
    rejected = torch.where(a_wins, b, a)[keep]
    P = prompt_len(cfg)
    return PreferencePairs(chosen, rejected, gold_reward(chosen, cfg), gold_reward(rejected, cfg),
                           sequence_logps(reference, chosen, P), sequence_logps(reference, rejected, P))


def pair_logps(model: Transformer, chosen: torch.Tensor, rejected: torch.Tensor,
               n_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of chosen and rejected in ONE forward pass over [chosen; rejected], as TRL does."""
    logps = sequence_logps(model, torch.cat([chosen, rejected]), n_prompt)
    return logps[: chosen.shape[0]], logps[chosen.shape[0]:]


# ---------------------------------------------------------------------------------------------------
# The closed loop


@dataclass
class Evaluation:
    step: int
    heldout_accuracy: float  # implicit-reward preference accuracy on held-out pairs (ties = 1/2)
    heldout_margin: float  # mean rewards/margins on held-out pairs
    gold_reward: float  # mean gold reward of responses sampled from the policy
    kl: float  # mean sequence KL(policy || reference) over those samples, nats


@torch.no_grad()
def evaluate_policy(policy: Transformer, reference: Transformer, heldout: PreferencePairs, cfg: DPOConfig,
                    step: int, generator: torch.Generator, loss_fn: Callable = dpo_loss) -> Evaluation:
    """Held-out preference accuracy of the implicit reward, and gold reward and KL of policy samples."""
    P = prompt_len(cfg)
    chosen_logps, rejected_logps = pair_logps(policy, heldout.chosen, heldout.rejected, P)
    _, chosen_rewards, rejected_rewards = loss_fn(chosen_logps, rejected_logps, heldout.ref_chosen_logps,
                                                  heldout.ref_rejected_logps, cfg.beta)
    samples = sample_responses(policy, make_prompts(cfg, cfg.n_policy_samples, generator), cfg, generator)
    return Evaluation(step, preference_accuracy(chosen_rewards, rejected_rewards),
                      (chosen_rewards - rejected_rewards).mean().item(),
                      gold_reward(samples, cfg).mean().item(), sequence_kl(policy, reference, samples, P).mean().item())


def policy_from_reference(reference: Transformer) -> Transformer:
    """The policy starts as an exact copy of the reference: h = 0, loss ln 2, KL 0 at step 0."""
    return copy.deepcopy(reference)


def train_dpo(reference: Transformer, train_pairs: PreferencePairs, heldout: PreferencePairs, cfg: DPOConfig,
              generator: torch.Generator, *, loss_fn: Callable = dpo_loss,
              on_step: Callable[[int, dict], None] | None = None,
              ) -> tuple[Transformer, list[dict], list[Evaluation]]:
    """DPO from policy = a copy of the reference: shuffled minibatches of pairs, AdamW, clipping.

    Each history record holds the TRL metrics of the minibatch before the update: loss,
    rewards/{chosen,rejected,margins,accuracies} (accuracies with TRL's strict >, so 0 at step 0),
    logps/{chosen,rejected} (summed), grad_norm, lr. With loss_type "ipo" the kernel sees per-token
    averaged log-probs, so its rewards are per token too.
    """
    P = prompt_len(cfg)
    policy = policy_from_reference(reference)
    for p in reference.parameters():
        p.requires_grad_(False)
    optim = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.lr_warmup, weight_decay=0.0)
    optimizer, scheduler = configure_optimizer(policy, optim, cfg.steps)
    # IPO compares length-averaged log-probs (TRL, the IPO authors); sigmoid DPO sums them
    scale = 1.0 / cfg.response_len if cfg.loss_type == "ipo" else 1.0
    history, evals, order = [], [], torch.empty(0, dtype=torch.long)
    for step in range(cfg.steps):
        if step % cfg.eval_every == 0:
            evals.append(evaluate_policy(policy, reference, heldout, cfg, step, generator, loss_fn))
        if order.numel() < cfg.batch_size:  # a new epoch: reshuffle
            order = torch.randperm(len(train_pairs), generator=generator)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        policy.train()
        chosen_logps, rejected_logps = pair_logps(policy, train_pairs.chosen[idx], train_pairs.rejected[idx], P)
        losses, chosen_rewards, rejected_rewards = loss_fn(
            chosen_logps * scale, rejected_logps * scale, train_pairs.ref_chosen_logps[idx] * scale,
            train_pairs.ref_rejected_logps[idx] * scale, cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        loss.backward()
        grad_norm = clip_grad_norm_(policy.parameters(), optim.grad_clip)
        record = {"loss": loss.item(), "rewards/chosen": chosen_rewards.mean().item(),
                  "rewards/rejected": rejected_rewards.mean().item(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                  "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item(),
                  "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"]}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history.append(record)
        if on_step is not None:
            on_step(step, record)
    evals.append(evaluate_policy(policy, reference, heldout, cfg, cfg.steps, generator, loss_fn))
    return policy, history, evals


# ---------------------------------------------------------------------------------------------------
# The experiment: reference and pairs, then DPO


@dataclass
class DPOData:
    """The reference policy (after its warm-up) and the preference pairs sampled from it."""

    reference: Transformer
    warm_up_history: list[dict]
    train_pairs: PreferencePairs
    heldout: PreferencePairs


def build_data(cfg: DPOConfig, generator: torch.Generator) -> DPOData:
    """Warm up the reference (weights from the global RNG), then training and held-out pairs."""
    reference, history = warm_up_reference(cfg, generator)
    train_pairs = build_preference_pairs(reference, cfg, cfg.n_train_prompts, generator)
    heldout = build_preference_pairs(reference, cfg, cfg.n_eval_prompts, generator)
    return DPOData(reference, history, train_pairs, heldout)


@dataclass
class DPOResult:
    data: DPOData
    policy: Transformer
    history: list[dict]  # TRL metrics per step (see train_dpo)
    evals: list[Evaluation]  # at step 0, every eval_every steps, and at the end
    collapse_kl: float  # KL of always answering the target (see collapse_kl)
    chosen_shift: float  # mean log pi(y_w) - log pi_ref(y_w) over the training pairs at the end
    rejected_shift: float  # the same for y_l; the mean h is chosen_shift - rejected_shift

    @property
    def margin(self) -> float:
        return self.chosen_shift - self.rejected_shift


def run(cfg: DPOConfig, generator: torch.Generator, *, dpo_loss: Callable = dpo_loss, data: DPOData | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> DPOResult:
    """The closed loop: reference and pairs (or ``data``, already built), DPO with the ``dpo_loss``
    kernel, then the log-ratio shifts on the training pairs and the collapse KL for scale."""
    data = data if data is not None else build_data(cfg, generator)
    policy, history, evals = train_dpo(data.reference, data.train_pairs, data.heldout, cfg, generator,
                                       loss_fn=dpo_loss, on_step=on_step)
    P, pairs = prompt_len(cfg), data.train_pairs
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, pairs.chosen, pairs.rejected, P)
    chosen_shift = (chosen - pairs.ref_chosen_logps).mean().item()
    rejected_shift = (rejected - pairs.ref_rejected_logps).mean().item()
    return DPOResult(data, policy, history, evals, collapse_kl(data.reference, cfg), chosen_shift, rejected_shift)
