"""BCQ: batch-constrained Q-learning, discrete, as d3rlpy's DiscreteBCQ (a Double DQN whose argmax is
restricted to actions the behaviour model finds likely enough).

    allowed(s) = { a : G(a|s) / max_b G(b|s) > tau }              (strict, in log space)
    pi(s)      = argmax_{a in allowed(s)} Q(s, a)                  (used to act AND in the TD target)
    y          = r + gamma * (1 - done) * Q_target(s', pi(s'))

Builds on: cql/offline.py (the FrozenLake data sets, behaviour cloning, the Double DQN target, exact
returns), so the two offline methods are compared on the same data. Deviations: the imitation model G
is behaviour cloning trained first (d3rlpy trains it jointly with Q on a shared encoder); with G fixed,
tau -> 1 gives exactly behaviour cloning's greedy action.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modules.cql.offline import (DTYPE, Dataset, Learner, OfflineConfig, OfflineResult, QRun, greedy, learner_layout,
                                 make_datasets, make_env, td_loss, train_bc, train_q)

__all__ = ["FORMULAS", "BCQConfig", "bcq_filter_actions", "BCQResult", "layout", "train_models",
           "bcq_policies", "run", "DTYPE"]

FORMULAS = [
    ("Allowed actions", r"$\mathcal{A}(s)=\{a:\ G(a|s)\,/\,\max_b G(b|s) > \tau\}$"),
    ("BCQ policy", r"$\pi(s)=\arg\max_{a\in\mathcal{A}(s)} Q(s,a)$"),
    ("BCQ target", r"$y=r+\gamma\,(1-d)\,\bar{Q}(s',\pi(s'))$"),
    ("Imitation loss", r"$-\log G(a|s)+\beta\,\overline{\mathrm{logits}^2}$"),
]


@dataclass(frozen=True)
class BCQConfig(OfflineConfig):
    tau: float = 0.3  # d3rlpy's action_flexibility: the threshold on G(a|s) / max G
    sweep_taus: tuple[float, ...] = (0.001, 0.1, 0.999)  # extra thresholds on the medium data
    # Outcome bars: about 10 % inside the worst seed (toy seeds 0-19 / full seeds 0-4; worst in brackets).
    min_gain_over_bc: float = 0.025  # BCQ's return minus behaviour cloning's, medium data (toy 0.032; full
    #                                  bar 0.35, worst 0.401)
    min_gain_over_behaviour: float = 0.14  # BCQ's return minus the behaviour policy's, medium (toy 0.160; full
    #                                        bar 0.35, worst 0.410)

    RANGES = {"tau": "(0, 1)", "sweep_taus": "(0, 1)", "min_gain_over_bc": "(-inf, inf)", "min_gain_over_behaviour": "(-inf, inf)"}

    def __post_init__(self):
        if not 0.0 < self.tau < 1.0 or not all(0.0 < t < 1.0 for t in self.sweep_taus):
            raise ValueError("tau and every sweep tau must lie in (0, 1): log(0) is -inf, and tau >= 1 masks all")

    @classmethod
    def toy(cls) -> BCQConfig:
        return cls()

    @classmethod
    def full(cls) -> BCQConfig:
        return cls(replicates=4, sweep_taus=(0.001, 0.01, 0.03, 0.1, 0.6, 0.9, 0.999), min_gain_over_bc=0.35,
                   min_gain_over_behaviour=0.35)


# ---------------------------------------------------------------------------------------------------
# The kernel


def bcq_filter_actions(q_values: torch.Tensor, behavior_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Discrete BCQ's action choice (d3rlpy DiscreteBCQ): keep the actions the behaviour model finds
    likely enough, then take the one with the highest Q among them.

        allowed_a = log G(a|s) - max_b log G(b|s) > log(tau)      (strict >, G = softmax(behavior_logits))
        action    = argmax_a [ (Q(s, a) - min_b Q(s, b) + 1e-5) * allowed_a ]

    The shift by min Q + 1e-5 makes every allowed action's score positive, so an allowed action with the
    lowest Q still beats the zeros of the masked ones (d3rlpy#221: G = [.05, .9, .05], Q = [5, -1, 10],
    tau = .3 -> action 1). q_values: (B, A), behavior_logits: (B, A), tau: float in (0, 1)  ->  (B,) long.
    tau -> 0 is Double DQN's argmax Q; tau -> 1 keeps only argmax G, behaviour cloning's action.
    Example: G = [.6, .3, .1], Q = [1, 5, 10], tau = .3 -> allowed [1, 1, 0] -> action 1 (DQN picks 2).
    """
    log_probs = torch.log_softmax(behavior_logits, dim=-1)
    allowed = (log_probs - log_probs.max(-1, keepdim=True).values > math.log(tau)).to(q_values.dtype)
    shifted = q_values - q_values.min(-1, keepdim=True).values + 1e-5
    return (shifted * allowed).argmax(-1)


# ---------------------------------------------------------------------------------------------------
# The experiment: naive DQN, BCQ and the tau sweep on the data sets cql uses


def layout(cfg: BCQConfig) -> list[Learner]:
    """Every learner: DQN (the argmax in the target) and BCQ on each data set, then the tau sweep on medium."""
    return learner_layout("bcq", cfg.tau, cfg.sweep_taus, cfg.replicates)


def train_models(data: Dataset, bc_logits: torch.Tensor, models: list[Learner], S: int, A: int, cfg: BCQConfig,
                 generator: torch.Generator, bcq_filter_actions: Callable = bcq_filter_actions) -> QRun:
    """All learners in one batch, trained by the Huber TD loss; the action their target bootstraps from
    is the online argmax for DQN and the BCQ-filtered argmax for the others (G = the data set's BC)."""
    which = torch.tensor([m.dataset for m in models])
    taus = sorted({m.knob for m in models if m.method != "dqn"})
    rows = {t: torch.tensor([m.method != "dqn" and m.knob == t for m in models]) for t in taus}

    def next_action(next_online: torch.Tensor, next_states: torch.Tensor) -> torch.Tensor:  # (K, B, A), (K, B)
        chosen = next_online.argmax(-1)  # DQN's choice; BCQ rows are replaced below
        logits = bc_logits.to(next_online.dtype)[which[:, None], next_states]  # (K, B, A) G(.|s')
        for t, r in rows.items():
            pick = bcq_filter_actions(next_online[r].flatten(0, 1), logits[r].flatten(0, 1), t)
            chosen[r] = pick.view(int(r.sum()), -1)
        return chosen

    def loss_fn(q, a, y):  # the sum over learners of their mean Huber TD losses
        return len(models) * td_loss(q.flatten(0, 1), a.flatten(), y.flatten())

    return train_q(data, which, S, A, cfg, generator, loss_fn, next_action=next_action)


def bcq_policies(q: torch.Tensor, bc_logits: torch.Tensor, models: list[Learner],
                 bcq_filter_actions: Callable = bcq_filter_actions) -> torch.Tensor:
    """(K, S, A) one-hot greedy policies: the filtered argmax for BCQ learners, argmax Q for DQN."""
    out = greedy(q)
    for k, m in enumerate(models):
        if m.method != "dqn":
            out[k] = F.one_hot(bcq_filter_actions(q[k], bc_logits[m.dataset], m.knob), q.shape[-1]).to(q.dtype)
    return out


@dataclass
class BCQResult(OfflineResult):
    """Learners are selected by ``knob`` = tau; BCQ learners act by the filtered argmax."""
    policies: torch.Tensor  # (K, S, A) each learner's greedy (BCQ: filtered) policy

    def policies_of(self, ks: list[int]) -> torch.Tensor:
        return self.policies[ks]

    def unseen_choices(self, ks: list[int]) -> int:
        """How many (learner, visited non-terminal state) pairs have a greedy action the data never took there."""
        counts = self.counts[[self.models[k].dataset for k in ks]]  # (k, S, A)
        visited = (counts.sum(-1) > 0) & ~self.env.mdp.terminal
        chosen_count = (self.policies[ks] * counts).sum(-1)
        return int((visited & (chosen_count == 0)).sum())


def run(cfg: BCQConfig, generator: torch.Generator, *, bcq_filter_actions: Callable = bcq_filter_actions) -> BCQResult:
    """Collect the three data sets, clone their behaviour (BCQ's G), train naive DQN, BCQ and the tau sweep."""
    env = make_env(cfg)
    S, A = env.q_star.shape
    data, behaviour = make_datasets(env, cfg, generator)
    bc_logits = train_bc(data, S, A, cfg, generator)
    models = layout(cfg)
    q_run = train_models(data, bc_logits, models, S, A, cfg, generator, bcq_filter_actions)
    policies = bcq_policies(q_run.q, bc_logits, models, bcq_filter_actions)
    return BCQResult(env, data, behaviour, data.counts(S, A), bc_logits, models, q_run, policies)
