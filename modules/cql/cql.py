"""CQL: conservative Q-learning, discrete CQL(H) as d3rlpy's DiscreteCQL (a Double DQN plus a penalty).

    L(theta) = alpha * E_s[ logsumexp_a Q(s, a) - Q(s, a_data) ] + E[ Huber(Q(s, a_data) - y) ]
    y        = r + gamma * (1 - done) * Q_target(s', argmax_a' Q(s', a'))          (Double DQN)
    d/dQ(s, .) of the penalty = softmax(Q(s, .)) - onehot(a_data): it sums to zero in every state

Builds on: mdp (FrozenLake, Q*), td (the TD target), and offline.py here (data sets, baselines) which
`bcq` shares. Deviations: the penalty weight alpha is set for this task's scale (Q* <= 1): d3rlpy's
default alpha = 1 goes with Atari returns of tens to hundreds, and here alpha >= 0.1 already ties
every seen action and falls back to behaviour cloning (the alpha sweep shows it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from modules.cql.offline import (DTYPE, NET_DTYPE, QUALITIES, Dataset, Learner, OfflineConfig, OfflineResult, QRun,
                                 double_dqn_target, huber, learner_layout, make_datasets, make_env, td_loss, train_bc,
                                 train_q)

__all__ = ["FORMULAS", "CQLConfig", "cql_loss", "CQLResult", "layout", "train_models", "run"]

FORMULAS = [
    ("Discrete CQL(H) loss", r"$L=\alpha\,\mathbb{E}_{s}\left[\log\sum_a e^{Q(s,a)}-Q(s,a_D)\right]+"
                             r"\mathbb{E}\left[\mathrm{Huber}(Q(s,a_D)-y)\right]$"),
    ("Double DQN target", r"$y=r+\gamma\,(1-d)\,\bar{Q}(s',\arg\max_{a'}Q(s',a'))$"),
    ("Penalty gradient", r"$\partial/\partial Q(s,a)=\mathrm{softmax}(Q(s,\cdot))_a-\mathbb{1}[a=a_D]$"),
]


@dataclass(frozen=True)
class CQLConfig(OfflineConfig):
    alpha: float = 0.003  # the penalty weight of the CQL learners compared with the baselines
    sweep_alphas: tuple[float, ...] = (0.001, 0.1, 1.0)  # extra alphas on the medium data (0 and alpha are the runs above)
    growth_from: int = 100  # the step the over-estimation growth is measured from
    # Outcome bars: about 10 % inside the worst of toy seeds 0-19 and full seeds 0-4 (full is not
    # looser than toy, so the worse of the two sets both); worst toy / full in brackets.
    min_dqn_overestimation: float = 0.09  # largest Q - Q* over unseen pairs, naive DQN (0.185 / 0.107)
    min_dqn_growth: float = 0.03  # rise of the mean unseen gap from growth_from to the end (0.040 / 0.038)
    max_cql_unseen_gap: float = 0.0  # mean Q - Q* over unseen pairs, CQL on medium: the claim itself (-1.73 / -1.95)
    min_gain_over_bc: float = 0.08  # CQL's return minus behaviour cloning's, medium data (0.127 / 0.094)
    min_gain_over_behaviour: float = 0.07  # CQL's return minus the behaviour policy's, medium (0.119 / 0.086)

    RANGES = {"alpha": ">= 0", "sweep_alphas": "> 0", "growth_from": ">= 0", "min_dqn_overestimation": "(-inf, inf)",
              "min_dqn_growth": "(-inf, inf)", "max_cql_unseen_gap": "(-inf, inf)", "min_gain_over_bc": "(-inf, inf)",
              "min_gain_over_behaviour": "(-inf, inf)"}

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if self.growth_from >= self.train_steps or self.growth_from % self.log_every:
            raise ValueError("growth_from must be a multiple of log_every below train_steps")

    @classmethod
    def toy(cls) -> CQLConfig:
        return cls()

    @classmethod
    def full(cls) -> CQLConfig:
        return cls(replicates=4, sweep_alphas=(0.001, 0.003, 0.03, 0.1, 0.3, 1.0))


# ---------------------------------------------------------------------------------------------------
# The kernel


def cql_loss(q_values: torch.Tensor, actions: torch.Tensor, td_targets: torch.Tensor,
             alpha: float | torch.Tensor) -> torch.Tensor:
    """Discrete CQL(H) loss as d3rlpy's DiscreteCQL: the Double DQN TD loss plus alpha times the
    conservative penalty, each averaged over the batch.

        penalty = mean_i [ logsumexp_a Q(s_i, a) - Q(s_i, a_i) ]          (>= 0; ln|A| for a constant Q)
        td      = mean_i Huber(Q(s_i, a_i) - y_i),  Huber(d) = d^2/2 if |d| < 1 else |d| - 1/2
        loss    = td + mean_i alpha_i * penalty_i

    q_values: (B, A) Q(s, .) of the online net (differentiable), actions: (B,) long the data's actions,
    td_targets: (B,) y (no gradient flows into them), alpha: float >= 0, or a (B,) tensor of per-row
    weights (the experiment trains learners with different alphas in one batch)  ->  scalar loss.
    The logsumexp must run over all actions, stably (torch.logsumexp; exp(1000) overflows).
    Example: Q = [[1, 2, 3]], a = [0], y = Q(s, a) (no TD error), alpha = 1 -> 2.4076060.
    """
    q_data = q_values.gather(-1, actions[:, None]).squeeze(-1)  # (B,)
    penalty = torch.logsumexp(q_values, dim=-1) - q_data
    return huber(q_data - td_targets).mean() + (alpha * penalty).mean()


# ---------------------------------------------------------------------------------------------------
# The experiment: naive DQN, CQL and the alpha sweep side by side, against Q* and behaviour cloning


def layout(cfg: CQLConfig) -> list[Learner]:
    """Every learner of the run: DQN and CQL on each data set, then the alpha sweep on medium."""
    return learner_layout("cql", cfg.alpha, cfg.sweep_alphas, cfg.replicates)


def train_models(data: Dataset, models: list[Learner], S: int, A: int, cfg: CQLConfig, generator: torch.Generator,
                 cql_loss: Callable = cql_loss, double_dqn_target: Callable = double_dqn_target) -> QRun:
    """All learners in one batch; DQN learners use the module's td_loss, the others cql_loss at their alpha."""
    is_dqn = torch.tensor([m.method == "dqn" for m in models])
    alphas = torch.tensor([m.knob for m in models], dtype=NET_DTYPE)[~is_dqn]  # (K_cql,)

    def loss_fn(q, a, y):  # (K, B, A), (K, B), (K, B) -> the sum over learners of their mean losses
        total = 0.0
        for rows, loss in ((is_dqn, "dqn"), (~is_dqn, "cql")):
            n = int(rows.sum())
            if n == 0:
                continue
            flat = (q[rows].flatten(0, 1), a[rows].flatten(), y[rows].flatten())
            per_row_alpha = alphas[:, None].expand(-1, a.shape[1]).flatten()
            total = total + n * (td_loss(*flat) if loss == "dqn" else cql_loss(*flat, per_row_alpha))
        return total

    which = torch.tensor([m.dataset for m in models])
    return train_q(data, which, S, A, cfg, generator, loss_fn, target_fn=double_dqn_target)


class CQLResult(OfflineResult):
    """Learners are selected by ``knob`` = alpha; policies are greedy in the learned Q."""


def run(cfg: CQLConfig, generator: torch.Generator, *, cql_loss: Callable = cql_loss,
        double_dqn_target: Callable = double_dqn_target) -> CQLResult:
    """Collect the three data sets, clone their behaviour, and train naive DQN, CQL and the alpha sweep."""
    env = make_env(cfg)
    S, A = env.q_star.shape
    data, behaviour = make_datasets(env, cfg, generator)
    bc_logits = train_bc(data, S, A, cfg, generator)
    models = layout(cfg)
    q_run = train_models(data, models, S, A, cfg, generator, cql_loss=cql_loss, double_dqn_target=double_dqn_target)
    return CQLResult(env, data, behaviour, data.counts(S, A), bc_logits, models, q_run)


def alpha_zero_matches_dqn(cfg: CQLConfig, generator_seed: int, steps: int = 30, cql_loss: Callable = cql_loss,
                           double_dqn_target: Callable = double_dqn_target) -> float:
    """Train the same learners twice from the same seed, once with td_loss and once with cql_loss at
    alpha = 0: the largest difference of their Q tables (0.0 when alpha = 0 is exactly DQN)."""
    short = replace(cfg, train_steps=steps, replicates=1, growth_from=0)
    tables = []
    for method in ("dqn", "cql"):
        g = torch.Generator().manual_seed(generator_seed)
        env = make_env(short)
        S, A = env.q_star.shape
        data, _ = make_datasets(env, short, g)
        models = [Learner(method, 0.0, d) for d in range(len(QUALITIES))]
        tables.append(train_models(data, models, S, A, short, g, cql_loss, double_dqn_target).q)
    return (tables[0] - tables[1]).abs().max().item()


__all__ += ["alpha_zero_matches_dqn", "DTYPE"]
