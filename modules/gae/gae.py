"""GAE: generalized advantage estimation, and the bias-variance trade-off that lambda controls.

    TD error:   delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
    GAE:        A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}  =  sum_l (gamma lam)^l delta_{t+l}
    Targets:    returns_t = A_t + V(s_t)   (the lambda-return; what the critic regresses on)

lam = 0 is the one-step TD error (low variance, biased by the critic's errors); lam = 1 is the
Monte-Carlo return minus V(s_t) (unbiased, high variance). With an imperfect critic V_hat = V + e:

    E[A_lam(s0, a0)] + V_hat(s0) - Q(s0, a0) = (1 - lam) * sum_{l>=1} gamma^l lam^(l-1) E[e(s_l)]

so the bias goes to zero as lam -> 1 while the variance grows.

Builds on: modules.mdp (tabular MDPs, exact policy evaluation V = (I - gamma P_pi)^-1 R_pi).
Deviations: the batch is time-major (T, N) like CleanRL; next_values carries V of the *real* next
observation at every step, so a truncated step bootstraps from it and a terminated one does not
(CleanRL's ppo.py ORs the two flags; here they are kept apart). Everything is float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from modules import mdp as M

__all__ = [
    "DTYPE", "FORMULAS", "GAEConfig",
    "compute_gae",
    "td_errors", "episode_ends", "n_step_returns", "monte_carlo_advantages", "lambda_returns",
    "gae_closed_form", "random_batch",
    "episodic_random_mdp", "noisy_critic", "Rollouts", "rollout", "batch_from_rollouts",
    "first_step_advantages", "analytic_first_step_bias", "SweepResult", "run",
]

DTYPE = M.DTYPE

FORMULAS = [
    ("TD error", r"$\delta_t = r_t + \gamma\,(1-\mathrm{term}_t)\,V(s_{t+1}) - V(s_t)$"),
    ("GAE recursion", r"$\hat A_t = \delta_t + \gamma\lambda\,(1-\mathrm{done}_t)\,\hat A_{t+1}$"),
    ("Closed form", r"$\hat A_t = \sum_{l\geq 0}(\gamma\lambda)^l\,\delta_{t+l}$"),
    ("Critic targets", r"$G^\lambda_t = \hat A_t + V(s_t)$"),
    ("Bias of a wrong critic", r"$\mathrm{bias}_\lambda = (1-\lambda)\sum_{l\geq 1}\gamma^l\lambda^{l-1}"
                               r"\,\mathbb{E}[V(s_l)-V^\pi(s_l)]$"),
]


@dataclass(frozen=True)
class GAEConfig:
    # invariants: random (T, N) batches with episode boundaries in the middle
    n_steps: int = 24  # T of each random batch
    n_envs: int = 16  # N of each random batch
    p_terminated: float = 0.1  # chance that a step ends its episode for real
    p_truncated: float = 0.1  # chance that a step hits a time limit (bootstrap from the next value)
    n_cases: int = 4  # random (gamma, lam) pairs per invariant, besides the fixed edge cases
    # the day's claim: many rollouts from one (s0, a0) on a random episodic MDP, lam on a grid
    n_states: int = 8  # non-terminal states (one absorbing terminal state is added)
    n_actions: int = 3
    gamma: float = 0.95  # discount of the bias-variance experiment
    p_end: float = 0.05  # chance per step of falling into the terminal state
    horizon: int = 64  # rollout length T; the last step bootstraps from V_hat(s_T)
    n_rollouts: int = 8192  # parallel environments N, all starting with (s0, a0)
    n_lambdas: int = 11  # grid 0, 1/(n-1), ..., 1
    reward_noise: float = 0.5  # std of Gaussian noise added to each reward
    critic_offset: float = 0.5  # V_hat = V^pi + offset + noise: a critic that overestimates
    critic_noise: float = 0.1  # std of the fixed per-state error of V_hat
    terminal_value: float = 3.0  # V_hat on the terminal observation, where a critic never gets a target:
    #                              garbage that a correct GAE never reads, and one that bootstraps there shows
    # thresholds
    z_max: float = 4.0  # "zero within noise" means |estimate| <= z_max standard errors
    z_max_grid: float = 4.5  # the same for the worst lam of the grid (a max over many estimates)
    min_bias_z_at_lambda0: float = 8.0  # the lam=0 bias must be this many standard errors from 0
    min_variance_ratio: float = 3.0  # Var[A_1] / Var[A_0] must reach this
    monotone_slack: float = 0.05  # a step against the trend may be at most this fraction of the range

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_steps": ">= 2", "n_envs": ">= 1", "p_terminated": "[0, 1]", "p_truncated": "[0, 1]", "n_cases": ">= 1",
        "n_states": ">= 1", "n_actions": ">= 1", "gamma": "[0, 1)", "p_end": "[0, 1)", "horizon": ">= 2",
        "n_rollouts": ">= 2", "n_lambdas": ">= 3", "reward_noise": ">= 0", "critic_offset": "(-inf, inf)",
        "critic_noise": ">= 0", "terminal_value": "(-inf, inf)", "z_max": "> 0", "z_max_grid": "> 0",
        "min_bias_z_at_lambda0": ">= 0", "min_variance_ratio": "> 0", "monotone_slack": "[0, 1]",
    }

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 <= self.p_end < 1.0:
            raise ValueError(f"p_end must be in [0, 1), got {self.p_end}")
        if self.n_lambdas < 3:
            raise ValueError("n_lambdas must be at least 3")
        if self.n_rollouts < 2 or self.horizon < 2 or self.n_steps < 2 or self.n_envs < 1:
            raise ValueError("n_rollouts, horizon and n_steps must be at least 2, n_envs at least 1")

    @classmethod
    def toy(cls) -> GAEConfig:
        return cls()

    @classmethod
    def full(cls) -> GAEConfig:
        return cls(n_steps=32, n_envs=64, n_cases=8, n_rollouts=16384, n_lambdas=21,
                   min_bias_z_at_lambda0=12.0, monotone_slack=0.02)


# ---------------------------------------------------------------------------------------------------
# Kernel


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                terminated: torch.Tensor, truncated: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over a time-major batch; returns (advantages, returns).

    Every tensor argument is (T, N): T time steps (dim 0) of N parallel environments (dim 1).
      rewards[t]      r_t, the reward of the step taken at time t
      values[t]       V(s_t), the critic's value of the observation at time t
      next_values[t]  V(s_{t+1}) of the *real* next observation of step t. Mid-episode it equals
                      values[t+1]; at a truncated step it is the value of the final observation
                      (before the reset); at the last step of the batch it is the bootstrap value.
      terminated[t]   1 if s_{t+1} is terminal: no future reward, never bootstrap
      truncated[t]    1 if the episode was cut by a time limit after step t: bootstrap, then stop
    terminated / truncated are bool or 0/1 floats (both set: terminated wins). gamma, lam in [0, 1].

        delta_t = r_t + gamma * (1 - terminated_t) * next_values[t] - values[t]
        done_t  = terminated_t or truncated_t
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},    with A_T = 0 after the batch
        returns = A + values          (lambda-returns: the critic's targets)

    Returns (advantages, returns), each (T, N) with the dtype of rewards. Vectorised over N; a
    backward loop over T is fine. Do not normalise the advantages here (the loss does that), and
    never normalise the returns.
    """
    T = rewards.shape[0]
    not_done = 1.0 - (terminated.bool() | truncated.bool()).to(rewards.dtype)
    # where, not (1 - terminated) * next_values: a NaN value of a terminal observation must not leak
    deltas = rewards + gamma * torch.where(terminated.bool(), 0.0, next_values) - values  # (T, N)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])  # A_{t+1}, (N,)
    for t in reversed(range(T)):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------
# Slow, independent oracles: the same quantities from their textbook definitions (no recursion in A)


def td_errors(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
              terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """One-step TD errors delta_t = r_t + gamma (1 - terminated_t) V(s_{t+1}) - V(s_t), all (T, N)."""
    return rewards + gamma * torch.where(terminated.bool(), 0.0, next_values) - values


def episode_ends(terminated: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """ends[t, n] = the last step of the episode that step t belongs to, within the batch:
    the first k >= t with a done flag, or T - 1. (T, N) long."""
    done = terminated.bool() | truncated.bool()
    T = done.shape[0]
    ends = torch.empty(done.shape, dtype=torch.long)
    ends[T - 1] = T - 1
    for t in range(T - 2, -1, -1):
        ends[t] = torch.where(done[t], t, ends[t + 1])
    return ends


def n_step_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                   truncated: torch.Tensor, gamma: float) -> torch.Tensor:
    """G[n-1, t] = sum_{l<n} gamma^l r_{t+l} + gamma^n V(s_{t+n}), stopped at the episode's end.

    If the episode (or batch) ends at step k before t+n-1, the n-step return is the full return to
    k with its own bootstrap gamma^(k-t+1) (1 - terminated_k) next_values[k]. (T, N) -> (T, T, N).
    """
    T, N = rewards.shape
    ends = episode_ends(terminated, truncated)  # (T, N)
    steps = torch.arange(T)
    bootstrap = torch.where(terminated.bool(), 0.0, next_values)  # value after step k, (T, N)
    out = torch.zeros(T, T, N, dtype=rewards.dtype)
    for t in range(T):
        lag = (steps - t).clamp_min(0).to(rewards.dtype)[:, None]  # (T, 1)
        inside = (steps[:, None] >= t) & (steps[:, None] <= ends[t][None])  # (T, N) steps of t's episode
        discounted = torch.cumsum(torch.where(inside, gamma ** lag * rewards, 0.0), 0)  # (T, N)
        last = torch.minimum((t + steps)[:, None], ends[t][None])  # (n, N): last step of the n-step return
        rewards_part = discounted.gather(0, last)
        out[:, t] = rewards_part + gamma ** (last - t + 1).to(rewards.dtype) * bootstrap.gather(0, last)
    return out


def monte_carlo_advantages(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                           terminated: torch.Tensor, truncated: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t - V(s_t): the discounted return to the end of the episode (bootstrapped only where the
    episode was cut, not terminated) minus the value. (T, N)."""
    G = n_step_returns(rewards, next_values, terminated, truncated, gamma)
    T = rewards.shape[0]
    full = episode_ends(terminated, truncated) - torch.arange(T)[:, None]  # n - 1 of the full return
    return G.gather(0, full[None]).squeeze(0) - values


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                   truncated: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Forward-view lambda-return: G^lam_t = (1-lam) sum_{n<K} lam^(n-1) G^(n)_t + lam^(K-1) G^(K)_t,
    K = the number of steps left in the episode (the weights of the longer returns collapse onto
    the full return). (T, N)."""
    G = n_step_returns(rewards, next_values, terminated, truncated, gamma)  # (n, t, N)
    T = rewards.shape[0]
    K = episode_ends(terminated, truncated) - torch.arange(T)[:, None] + 1  # (T, N)
    n = torch.arange(1, T + 1, dtype=rewards.dtype)[:, None, None]  # (T, 1, 1)
    lam_t = torch.tensor(lam, dtype=rewards.dtype)
    weights = torch.where(n < K, (1 - lam_t) * lam_t ** (n - 1), 0.0)
    weights = weights + torch.where(n == K, lam_t ** (n - 1), 0.0)
    return (weights * G).sum(0)


def gae_closed_form(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
                    terminated: torch.Tensor, truncated: torch.Tensor, gamma: float,
                    lam: float) -> torch.Tensor:
    """A_t = sum_{l=t}^{end(t)} (gamma lam)^(l-t) delta_l, the sum written out (no recursion). (T, N)."""
    deltas = td_errors(rewards, values, next_values, terminated, gamma)
    ends = episode_ends(terminated, truncated)
    T = rewards.shape[0]
    steps = torch.arange(T)
    out = torch.zeros_like(rewards)
    for t in range(T):
        lag = (steps - t).to(rewards.dtype)[:, None]  # (T, 1)
        inside = (steps[:, None] >= t) & (steps[:, None] <= ends[t][None])  # (T, N)
        out[t] = torch.where(inside, (gamma * lam) ** lag.clamp_min(0) * deltas, 0.0).sum(0)
    return out


def random_batch(n_steps: int, n_envs: int, p_terminated: float, p_truncated: float,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A consistent random (T, N) batch: next_values[t] = values[t+1] inside an episode, the value
    of an unseen final observation at a done step. Both flags may be set on one step."""
    def randn():
        return torch.randn(n_steps, n_envs, generator=generator, dtype=DTYPE)

    def flags(p):
        return torch.rand(n_steps, n_envs, generator=generator, dtype=DTYPE) < p

    rewards, values, final_values = randn(), randn(), randn()
    terminated, truncated = flags(p_terminated), flags(p_truncated)
    done = terminated | truncated
    next_values = torch.cat([values[1:], final_values[-1:]])
    next_values = torch.where(done, final_values, next_values)
    return {"rewards": rewards, "values": values, "next_values": next_values,
            "terminated": terminated, "truncated": truncated}


# ---------------------------------------------------------------------------------------------------
# The day's claim: bias and variance of A_lam(s0, a0) with an imperfect critic


def episodic_random_mdp(n_states: int, n_actions: int, gamma: float, p_end: float,
                        generator: torch.Generator) -> M.TabularMDP:
    """mdp.random_mdp plus one absorbing terminal state (the last index) entered with probability
    p_end from every state-action pair; episodes restart uniformly over the other states."""
    base = M.random_mdp(n_states, n_actions, gamma, generator)
    S = n_states + 1
    P = torch.zeros(S, n_actions, S, dtype=DTYPE)
    P[:n_states, :, :n_states] = (1.0 - p_end) * base.P
    P[:n_states, :, n_states] = p_end
    P[n_states, :, n_states] = 1.0
    R = torch.zeros(S, n_actions, dtype=DTYPE)
    R[:n_states] = base.R
    terminal = torch.zeros(S, dtype=torch.bool)
    terminal[n_states] = True
    start = torch.where(terminal, 0.0, 1.0 / n_states).to(DTYPE)
    return M.TabularMDP(P, R, gamma, terminal, start)


def noisy_critic(V: torch.Tensor, offset: float, noise: float, generator: torch.Generator) -> torch.Tensor:
    """V_hat(s) = V(s) + offset + noise * xi_s, with xi_s ~ N(0, 1) fixed per state (terminal included:
    a real critic outputs some number on the terminal observation too)."""
    return V + offset + noise * torch.randn(V.shape, generator=generator, dtype=V.dtype)


@dataclass
class Rollouts:
    states: torch.Tensor  # (T, N) observation at each step (after any reset)
    next_states: torch.Tensor  # (T, N) the real next state of each step (terminal before a reset)
    rewards: torch.Tensor  # (T, N)
    terminated: torch.Tensor  # (T, N) bool


def _sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One categorical draw per row of probs (N, K) by inverting the CDF."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    idx = torch.searchsorted(probs.cumsum(-1), u).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def rollout(mdp: M.TabularMDP, policy: torch.Tensor, s0: int, a0: int, horizon: int, n_envs: int,
            reward_noise: float, generator: torch.Generator) -> Rollouts:
    """N environments in lock-step, all starting in s0 with first action a0, then following policy;
    an environment that falls into the terminal state is reset from mdp.start (auto-reset)."""
    T, N = horizon, n_envs
    states = torch.empty(T, N, dtype=torch.long)
    next_states = torch.empty(T, N, dtype=torch.long)
    rewards = torch.empty(T, N, dtype=DTYPE)
    s = torch.full((N,), s0, dtype=torch.long)
    for t in range(T):
        a = torch.full((N,), a0, dtype=torch.long) if t == 0 else _sample(policy[s], generator)
        s_next = _sample(mdp.P[s, a], generator)
        noise = torch.randn(N, generator=generator, dtype=DTYPE)
        states[t], next_states[t], rewards[t] = s, s_next, mdp.R[s, a] + reward_noise * noise
        reset = _sample(mdp.start.expand(N, -1), generator)
        s = torch.where(mdp.terminal[s_next], reset, s_next)
    return Rollouts(states, next_states, rewards, mdp.terminal[next_states])


def batch_from_rollouts(ro: Rollouts, V_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The compute_gae inputs for rollouts scored by critic V_hat (no time limit: truncated = 0;
    the last step of the batch bootstraps from V_hat of its next state)."""
    return {"rewards": ro.rewards, "values": V_hat[ro.states], "next_values": V_hat[ro.next_states],
            "terminated": ro.terminated, "truncated": torch.zeros_like(ro.terminated)}


def first_step_advantages(gae_fn: Callable, batch: dict[str, torch.Tensor], gamma: float,
                          lambdas: torch.Tensor) -> torch.Tensor:
    """A_lam at t = 0 of every rollout, for each lam: (L, N). One batch, so the lambdas share their
    random numbers (common random numbers: differences between lambdas are not sampling noise)."""
    return torch.stack([gae_fn(**batch, gamma=gamma, lam=float(lam))[0][0] for lam in lambdas])


def analytic_first_step_bias(mdp: M.TabularMDP, policy: torch.Tensor, V_hat: torch.Tensor, Q: torch.Tensor,
                             s0: int, a0: int, horizon: int, lam: float) -> float:
    """Exact E[A_lam(s0, a0)] + V_hat(s0) - Q(s0, a0) for the rollouts above, from the sub-probability
    d_l of still being in the first episode at step l: E[A] = sum_l (gamma lam)^l E[delta_l; alive]."""
    gamma = mdp.gamma
    live = (~mdp.terminal).to(DTYPE)
    P_pi = torch.einsum("sa,sat->st", policy, mdp.P) * live  # (S, S), transitions that stay alive
    R_pi = (policy * mdp.R).sum(-1)
    mean_delta = R_pi + gamma * P_pi @ V_hat - V_hat  # E[delta | alive in s], s != terminal
    first_delta = mdp.R[s0, a0] + gamma * (mdp.P[s0, a0] * live) @ V_hat - V_hat[s0]
    expected, d = first_delta, mdp.P[s0, a0] * live
    for l in range(1, horizon):
        expected = expected + (gamma * lam) ** l * (d @ mean_delta)
        d = d @ P_pi
    return (expected + V_hat[s0] - Q[s0, a0]).item()


@dataclass
class SweepResult:
    lambdas: torch.Tensor  # (L,)
    variance: torch.Tensor  # (L,) sample variance of A_lam(s0, a0) over the rollouts
    bias: torch.Tensor  # (L,) mean(A_lam) + V_hat(s0) - Q(s0, a0)
    bias_se: torch.Tensor  # (L,) standard error of that mean
    bias_analytic: torch.Tensor  # (L,) the exact expectation of the same bias
    perfect_bias: torch.Tensor  # (L,) the bias with V_hat = V^pi on the same rollouts
    perfect_se: torch.Tensor  # (L,)
    perfect_variance: torch.Tensor  # (L,)
    q_value: float  # Q^pi(s0, a0)
    critic_error: torch.Tensor  # (S,) V_hat - V^pi


def run(cfg: GAEConfig, generator: torch.Generator, gae_fn: Callable = compute_gae, s0: int = 0,
        a0: int = 0) -> SweepResult:
    """Draw an episodic MDP, a policy and a wrong critic; roll out N episodes from (s0, a0); estimate
    A_lam(s0, a0) for every lam on the grid with the same rollouts."""
    mdp = episodic_random_mdp(cfg.n_states, cfg.n_actions, cfg.gamma, cfg.p_end, generator)
    policy = M.random_policy(mdp.n_states, mdp.n_actions, generator)
    V = M.evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, policy)  # V(terminal) = 0
    Q = M.q_from_v(mdp.P, mdp.R, mdp.gamma, V)
    V_hat = noisy_critic(V, cfg.critic_offset, cfg.critic_noise, generator)
    V_hat[mdp.terminal] = cfg.terminal_value
    ro = rollout(mdp, policy, s0, a0, cfg.horizon, cfg.n_rollouts, cfg.reward_noise, generator)
    lambdas = torch.linspace(0.0, 1.0, cfg.n_lambdas, dtype=DTYPE)
    n = cfg.n_rollouts

    def stats(critic):
        A = first_step_advantages(gae_fn, batch_from_rollouts(ro, critic), cfg.gamma, lambdas)  # (L, N)
        estimate = A + critic[s0]  # an estimate of Q(s0, a0): the critic's baseline added back
        return estimate.mean(1) - Q[s0, a0], estimate.std(1) / n ** 0.5, A.var(1)

    bias, se, variance = stats(V_hat)
    perfect_bias, perfect_se, perfect_var = stats(V)
    analytic = torch.tensor([analytic_first_step_bias(mdp, policy, V_hat, Q, s0, a0, cfg.horizon, float(lam))
                             for lam in lambdas], dtype=DTYPE)
    return SweepResult(lambdas, variance, bias, se, analytic, perfect_bias, perfect_se, perfect_var,
                       Q[s0, a0].item(), V_hat - V)
