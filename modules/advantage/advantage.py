"""Advantage: why weighting the score by A = Q - V instead of the return cuts the gradient's variance.

    Policy gradient theorem:  grad J = sum_s d(s) sum_a pi(a|s) grad log pi(a|s) Q(s,a),
                              d(s) = sum_t gamma^t Pr(s_t = s)   (discounted visitation)
    Tabular softmax:          dJ/dtheta[s,a] = d(s) pi(a|s) A(s,a),   A = Q - V
    Monte-Carlo estimate:     g = sum_t gamma^t grad log pi(a_t|s_t) w_t,   E[g] = grad J for
                              w_t = G_t (REINFORCE), G_t - V(s_t) (baseline), A(s_t, a_t) (advantage)

A baseline b(s) adds no bias because E_{a~pi}[grad log pi(a|s)] = 0; it removes variance because it
takes out the part of the return that does not depend on the action. Replacing the sampled G_t by its
expectation Q(s_t, a_t) removes the noise of the rest of the episode as well.

Builds on: mdp (TabularMDP, evaluate_policy_exact, q_from_v, value_iteration).
Deviations: the MDP is finite-horizon and layered (the state includes the time step, as a token
position does in an LLM), so every episode has exactly H steps and the exact values are the
infinite-horizon ones of modules.mdp (the last layer moves to an absorbing zero-reward state). The
"advantage" estimator uses the true A^pi, which a real agent must learn (a critic, day 4's GAE).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modules.mdp import DTYPE, TabularMDP, evaluate_policy_exact, q_from_v, value_iteration

__all__ = [
    "DTYPE", "FORMULAS", "ESTIMATORS", "AdvantageConfig",
    "discounted_returns", "advantage_from_q", "exact_policy_gradient", "policy_gradient_estimate",
    "layered_mdp", "shift_rewards", "replicate", "expected_return", "sample_categorical",
    "sample_episodes", "estimator_weights", "per_episode_gradients", "TestPolicy", "random_test_policy",
    "autograd_policy_gradient", "expected_visits", "estimator_samples", "TrainResult", "train",
    "AdvantageResult", "run",
]

FORMULAS = [
    ("Policy gradient theorem",
     r"$\nabla J=\sum_s d^\pi(s)\sum_a \pi(a|s)\,\nabla\log\pi(a|s)\,Q^\pi(s,a)$"),
    ("Tabular softmax", r"$\partial J/\partial\theta_{s,a}=d^\pi(s)\,\pi(a|s)\,A^\pi(s,a)$"),
    ("Advantage", r"$A^\pi(s,a)=Q^\pi(s,a)-V^\pi(s),\quad \sum_a\pi(a|s)A^\pi(s,a)=0$"),
    ("Baseline adds no bias",
     r"$\mathbb{E}_{a\sim\pi}[\nabla\log\pi(a|s)\,b(s)]=b(s)\,\nabla\sum_a\pi(a|s)=0$"),
    ("Estimator", r"$\hat g=\sum_t\gamma^t\,\nabla\log\pi(a_t|s_t)\,(G_t-b(s_t))$"),
]

ESTIMATORS = ("reinforce", "baseline", "advantage")  # weights G_t, G_t - V(s_t), A(s_t, a_t)


@dataclass(frozen=True)
class AdvantageConfig:
    n_layers: int = 4  # horizon H: the state space is H layers of `width` states, then an end state
    width: int = 3  # states per layer
    n_actions: int = 3
    gamma: float = 0.9
    reward_offset: float = 2.0  # added to every mean reward (LLM rewards are rarely centred)
    reward_scale: float = 1.0  # std of the mean rewards R(s, a) around the offset
    reward_noise: float = 1.0  # std of a sampled reward around R(s, a)
    theta_scale: float = 1.0  # std of the random logits at which the estimators are compared
    weight_by_gamma_t: bool = True  # the gamma^t factor of step t; without it the estimate is biased
    n_episodes: int = 4_000  # episodes sampled to compare the three estimators
    z_max: float = 5.0  # Monte-Carlo bound in standard errors (for unbiasedness: the max over components)
    min_visits: float = 200.0  # z-test only the rows of states the sample is expected to visit this often
    n_agents: int = 4  # learners per estimator in the closed loop (run in parallel as one tensor)
    episodes_per_step: int = 16  # episodes per gradient step, per agent
    train_steps: int = 150
    lr: float = 2.0  # gradient-ascent step on the logits
    target_fraction: float = 0.9  # "solved" = J reaches this fraction of the way from uniform to J*
    # outcome bars, from `llmaudit sweep advantage` (toy seeds 0-19, full seeds 0-4)
    min_variance_ratio_baseline: float = 3.0  # tr Cov(REINFORCE) / tr Cov(V(s) baseline); worst toy seed 4.61
    min_variance_ratio_advantage: float = 3.0  # tr Cov(V(s) baseline) / tr Cov(advantage); worst toy seed 4.00
    max_final_gap: float = 0.03  # the worst advantage agent's (J* - J) / (J* - J_uniform); worst toy seed 0.0168
    min_speedup: float = 2.5  # episodes to target, REINFORCE (at least) / advantage; worst toy seed 3.1

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_layers": ">= 1", "width": ">= 1", "n_actions": ">= 2", "gamma": "[0, 1)", "reward_offset": "(-inf, inf)",
        "reward_scale": ">= 0", "reward_noise": ">= 0", "theta_scale": ">= 0", "n_episodes": ">= 1024",
        "z_max": "> 0", "min_visits": ">= 0", "n_agents": ">= 1", "episodes_per_step": ">= 1", "train_steps": ">= 1",
        "lr": ">= 0", "target_fraction": "(0, 1]", "min_variance_ratio_baseline": "> 0",
        "min_variance_ratio_advantage": "> 0", "max_final_gap": ">= 0", "min_speedup": "> 0",
    }

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if min(self.n_layers, self.width, self.n_agents, self.episodes_per_step) < 1 or self.n_actions < 2:
            raise ValueError("n_layers, width, n_agents, episodes_per_step must be >= 1 and n_actions >= 2")
        if self.n_episodes < 1024:
            raise ValueError("n_episodes must be at least 1024 (the MSE-vs-batch-size curve needs it)")

    @classmethod
    def toy(cls) -> AdvantageConfig:
        return cls()

    @classmethod
    def full(cls) -> AdvantageConfig:
        # worst full seeds 0-4: variance ratios 4.66 and 4.64, final gap 0.0113, speedup 8.0
        return cls(n_episodes=40_000, n_agents=16, train_steps=200, max_final_gap=0.02, min_speedup=5.0)


# ---------------------------------------------------------------------------------------------------
# Kernels


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1}, with G_{T-1} = r_{T-1} (the episode ends after T steps).

    rewards: (N, T) float, one row per episode  ->  (N, T) returns, same dtype.
    Example: rewards [1, 1, 1], gamma 0.9  ->  [2.71, 1.9, 1.0].
    """
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def advantage_from_q(q: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A(s,a) = Q(s,a) - V(s) with V(s) = sum_a pi(a|s) Q(s,a), so that sum_a pi(a|s) A(s,a) = 0.

    q: (S, A) action values of the policy, probs: (S, A) the policy pi(a|s) (rows sum to 1)
    ->  (S, A) advantages.
    """
    return q - (probs * q).sum(-1, keepdim=True)


def exact_policy_gradient(P: torch.Tensor, R: torch.Tensor, gamma: float, start: torch.Tensor,
                          theta: torch.Tensor) -> torch.Tensor:
    """grad J for pi = softmax(theta[s]) by the policy gradient theorem, in closed form:

        dJ/dtheta[s,a] = d(s) * pi(a|s) * A(s,a),   J = sum_s start(s) V(s),
        d = start^T (I - gamma P_pi)^{-1}  (discounted visitation, sum_t gamma^t Pr(s_t = s)),
        A = Q - V,  Q(s,a) = R(s,a) + gamma sum_s' P(s'|s,a) V(s'),  V = (I - gamma P_pi)^{-1} R_pi.

    P: (S, A, S), R: (S, A), gamma in [0, 1), start: (S,) initial distribution, theta: (S, A) logits
    ->  (S, A) gradient of J with respect to theta.
    """
    probs = torch.softmax(theta, dim=-1)
    V = evaluate_policy_exact(P, R, gamma, probs)
    Q = q_from_v(P, R, gamma, V)
    P_pi = torch.einsum("sa,sat->st", probs, P)  # (S, S)
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    d = torch.linalg.solve((eye - gamma * P_pi).T, start)  # (S,) d^T (I - gamma P_pi) = start^T
    return d[:, None] * probs * (Q - V[:, None])


def policy_gradient_estimate(theta: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """Score-function (REINFORCE) estimate for a tabular softmax policy pi(.|s) = softmax(theta[s]):

        g = (1/N) sum_i sum_t weights[i,t] * grad_theta log pi(actions[i,t] | states[i,t]),
        grad_{theta[s]} log pi(a|s) = onehot(a) - pi(.|s);  rows of theta other than s get 0.

    theta: (S, A) logits; states, actions: (N, T) integer indices (N episodes of T steps);
    weights: (N, T) float (G_t, G_t - V(s_t), A(s_t,a_t), times gamma^t)  ->  (S, A) estimate,
    summed over steps and averaged over episodes.
    """
    probs = torch.softmax(theta, dim=-1)
    A = theta.shape[-1]
    score = F.one_hot(actions, A).to(theta.dtype) - probs[states]  # (N, T, A)
    grad = torch.zeros_like(theta).index_add_(0, states.reshape(-1),
                                              (weights[..., None] * score).reshape(-1, A))
    return grad / states.shape[0]


# ---------------------------------------------------------------------------------------------------
# The task: a layered finite-horizon MDP (position t is part of the state, as in a token sequence)


def layered_mdp(n_layers: int, width: int, n_actions: int, gamma: float, reward_offset: float,
                reward_scale: float, generator: torch.Generator) -> TabularMDP:
    """States t*width .. (t+1)*width - 1 form layer t; layer t moves to layer t+1 (Dirichlet(1) rows)
    and the last layer to the absorbing end state S-1, so every episode takes exactly n_layers steps.
    Mean rewards are reward_offset + reward_scale * N(0, 1); the end state pays 0."""
    S, end = n_layers * width + 1, n_layers * width
    P = torch.zeros(S, n_actions, S, dtype=DTYPE)
    for t in range(n_layers):
        rows = slice(t * width, (t + 1) * width)
        if t + 1 < n_layers:
            w = -torch.rand(width, n_actions, width, generator=generator, dtype=DTYPE).log()
            P[rows, :, (t + 1) * width:(t + 2) * width] = w / w.sum(-1, keepdim=True)
        else:
            P[rows, :, end] = 1.0
    P[end, :, end] = 1.0
    R = reward_offset + reward_scale * torch.randn(S, n_actions, generator=generator, dtype=DTYPE)
    R[end] = 0.0
    start = torch.zeros(S, dtype=DTYPE)
    start[:width] = 1.0 / width
    terminal = torch.zeros(S, dtype=torch.bool)
    terminal[end] = True
    return TabularMDP(P, R, gamma, terminal, start)


def shift_rewards(mdp: TabularMDP, c: float) -> TabularMDP:
    """The same MDP with c added to every reward (terminal states keep paying 0)."""
    R = torch.where(mdp.terminal[:, None], mdp.R, mdp.R + c)
    return TabularMDP(mdp.P, R, mdp.gamma, mdp.terminal, mdp.start)


def replicate(mdp: TabularMDP, copies: int) -> TabularMDP:
    """`copies` disjoint copies of `mdp` as one block-diagonal MDP: copy k owns states k*S .. k*S+S-1.
    Many agents then share one exact evaluation and one sampler (no Python loop per agent)."""
    S, A = mdp.n_states, mdp.n_actions
    P = torch.zeros(copies, S, A, copies, S, dtype=mdp.P.dtype)
    idx = torch.arange(copies)
    P[idx, :, :, idx, :] = mdp.P
    return TabularMDP(P.reshape(copies * S, A, copies * S), mdp.R.repeat(copies, 1), mdp.gamma,
                      mdp.terminal.repeat(copies), mdp.start.repeat(copies) / copies)


def expected_return(mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    """J(theta) = sum_s start(s) V^pi(s) for pi = softmax(theta), exact and differentiable."""
    V = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, torch.softmax(theta, dim=-1))
    return mdp.start @ V


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (N, K) by inverting the CDF (much faster than torch.multinomial
    for many short rows)."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    return (probs.cumsum(-1) < u).sum(-1).clamp_max(probs.shape[-1] - 1)


def sample_episodes(mdp: TabularMDP, probs: torch.Tensor, s0: torch.Tensor, horizon: int,
                    reward_noise: float, generator: torch.Generator):
    """Roll out len(s0) episodes in parallel for `horizon` steps: a ~ pi(.|s), r = R(s,a) + noise,
    s' ~ P(.|s,a). probs is one policy (S, A) for every episode or one per episode (N, S, A).
    Returns states, actions (N, T) long and rewards (N, T) float."""
    N = s0.shape[0]
    probs = probs.expand(N, *probs.shape[-2:])
    rows = torch.arange(N)
    states = torch.empty(N, horizon, dtype=torch.long)
    actions = torch.empty(N, horizon, dtype=torch.long)
    rewards = torch.empty(N, horizon, dtype=mdp.R.dtype)
    s = s0
    for t in range(horizon):
        a = sample_categorical(probs[rows, s], generator)
        noise = torch.randn(N, generator=generator, dtype=mdp.R.dtype)
        states[:, t], actions[:, t], rewards[:, t] = s, a, mdp.R[s, a] + reward_noise * noise
        s = sample_categorical(mdp.P[s, a], generator)
    return states, actions, rewards


# ---------------------------------------------------------------------------------------------------
# The three estimators


def estimator_weights(returns: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                      V: torch.Tensor, A: torch.Tensor, gamma: float,
                      weight_by_gamma_t: bool = True) -> dict[str, torch.Tensor]:
    """Per-step weights (N, T) of the three estimators, each times gamma^t: the discounted objective
    counts a decision at step t only gamma^t as much (dropping it is the common, biased shortcut)."""
    T = returns.shape[1]
    discount = gamma ** torch.arange(T, dtype=returns.dtype)
    if not weight_by_gamma_t:
        discount = torch.ones_like(discount)
    raw = {"reinforce": returns, "baseline": returns - V[states], "advantage": A[states, actions]}
    return {name: w * discount for name, w in raw.items()}


def per_episode_gradients(estimate: Callable, theta: torch.Tensor, states: torch.Tensor,
                          actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One gradient sample per episode, (N, S, A), from a batch-mean estimator such as
    policy_gradient_estimate: episode i gets its own copy of the state space (states + i*S), so one
    call on N copies of theta returns every episode's gradient in its own block (times 1/N)."""
    N, (S, A) = states.shape[0], theta.shape
    offset = (torch.arange(N) * S)[:, None]
    flat = estimate(theta.repeat(N, 1), states + offset, actions, weights)  # (N*S, A)
    return flat.reshape(N, S, A) * N


# ---------------------------------------------------------------------------------------------------
# The estimators at one random policy: the exact truth, and one sampled gradient per episode


@dataclass(frozen=True)
class TestPolicy:
    """A random softmax policy on the layered task with its exact values and gradient: the truth."""

    mdp: TabularMDP
    theta: torch.Tensor  # (S, A) logits
    probs: torch.Tensor  # (S, A) softmax(theta)
    V: torch.Tensor  # (S,) V^pi
    Q: torch.Tensor  # (S, A) Q^pi
    J: float  # sum_s start(s) V^pi(s)
    grad: torch.Tensor  # (S, A) dJ/dtheta by autograd through the exact evaluation


def autograd_policy_gradient(mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    """dJ/dtheta by differentiating the exact J(theta) (linear solve and all): an oracle that knows
    nothing of the policy gradient theorem."""
    theta = theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad(expected_return(mdp, theta), theta)[0]


def random_test_policy(cfg: AdvantageConfig, generator: torch.Generator) -> TestPolicy:
    """The layered MDP of cfg and logits theta ~ theta_scale * N(0, 1), with V, Q, J and grad J."""
    mdp = layered_mdp(cfg.n_layers, cfg.width, cfg.n_actions, cfg.gamma, cfg.reward_offset, cfg.reward_scale,
                      generator)
    theta = cfg.theta_scale * torch.randn(mdp.n_states, mdp.n_actions, generator=generator, dtype=DTYPE)
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, probs)
    return TestPolicy(mdp, theta, probs, V, q_from_v(mdp.P, mdp.R, mdp.gamma, V), (mdp.start @ V).item(),
                      autograd_policy_gradient(mdp, theta))


def expected_visits(mdp: TabularMDP, probs: torch.Tensor, horizon: int) -> torch.Tensor:
    """sum_{t < horizon} Pr(s_t = s) from the start distribution: how often one episode visits s. -> (S,)"""
    P_pi = torch.einsum("sa,sat->st", probs, mdp.P)
    dist, total = mdp.start.clone(), torch.zeros_like(mdp.start)
    for _ in range(horizon):
        total += dist
        dist = dist @ P_pi
    return total


def estimator_samples(estimate: Callable, theta: torch.Tensor, states: torch.Tensor, actions: torch.Tensor,
                      returns: torch.Tensor, V: torch.Tensor, A: torch.Tensor, gamma: float,
                      weight_by_gamma_t: bool = True) -> dict[str, torch.Tensor]:
    """One gradient sample per episode, (N, S, A), for each estimator (REINFORCE, V(s) baseline,
    advantage), all from the same episodes."""
    weights = estimator_weights(returns, states, actions, V, A, gamma, weight_by_gamma_t)
    return {name: per_episode_gradients(estimate, theta, states, actions, w) for name, w in weights.items()}


# ---------------------------------------------------------------------------------------------------
# The closed loop: stochastic gradient ascent on J with each estimator, many agents at once


@dataclass
class TrainResult:
    J: torch.Tensor  # (steps + 1, n_estimators, n_agents) exact J(theta) before each step and at the end
    J_uniform: float  # J of the uniform policy (theta = 0, where every agent starts)
    J_star: float  # the optimum, by value iteration

    @property
    def normalized(self) -> torch.Tensor:
        """(J - J_uniform) / (J* - J_uniform): 0 at the start, 1 at the optimum."""
        return (self.J - self.J_uniform) / (self.J_star - self.J_uniform)


def train(mdp: TabularMDP, cfg: AdvantageConfig, generator: torch.Generator, *,
          estimators: tuple[str, ...] = ESTIMATORS,
          returns_fn: Callable = discounted_returns, advantage_fn: Callable = advantage_from_q,
          estimate_fn: Callable = policy_gradient_estimate,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """theta <- theta + lr * g_hat for n_agents agents per estimator, all from theta = 0.

    Agent b lives in block b of one block-diagonal MDP (see `replicate`): one exact evaluation gives
    every agent's V, Q, A and J, and one kernel call on the stacked logits gives every agent's
    gradient (block b only receives agent b's episodes).
    """
    E, M, S, T = len(estimators), cfg.n_agents, mdp.n_states, cfg.n_layers
    B, n = E * M, cfg.episodes_per_step  # block b belongs to estimator b // M
    big = replicate(mdp, B)
    theta = torch.zeros(B * S, mdp.n_actions, dtype=DTYPE)
    block = torch.arange(B).repeat_interleave(n)  # (B*n,) the agent of each episode
    J_uniform = expected_return(mdp, torch.zeros(S, mdp.n_actions, dtype=DTYPE)).item()
    J_star = (mdp.start @ value_iteration(mdp).V).item()
    history = []
    for step in range(cfg.train_steps + 1):
        probs = torch.softmax(theta, dim=-1)  # (B*S, A)
        V = evaluate_policy_exact(big.P, big.R, big.gamma, probs)
        history.append((big.start * V).reshape(B, S).sum(-1) * B)  # J of each agent
        if step == cfg.train_steps:
            break
        A = advantage_fn(q_from_v(big.P, big.R, big.gamma, V), probs)
        s0 = sample_categorical(mdp.start.expand(B * n, S), generator)
        local, actions, rewards = sample_episodes(mdp, probs.reshape(B, S, -1)[block], s0, T,
                                                  cfg.reward_noise, generator)
        states = local + (block * S)[:, None]  # (B*n, T) indices into the block-diagonal MDP
        w = estimator_weights(returns_fn(rewards, cfg.gamma), states, actions, V, A, cfg.gamma,
                              cfg.weight_by_gamma_t)
        weights = torch.stack([w[name] for name in estimators])[block // M, torch.arange(B * n)]
        # the kernel averages over all B*n episodes; an agent's own mean is B times its block
        theta = theta + cfg.lr * B * estimate_fn(theta, states, actions, weights)
        if on_step is not None:
            on_step(step)
    J = torch.stack(history).reshape(-1, E, M)
    return TrainResult(J=J, J_uniform=J_uniform, J_star=J_star)


@dataclass
class AdvantageResult:
    policy: TestPolicy  # the random policy and its exact gradient
    samples: dict[str, torch.Tensor]  # (n_episodes, S, A) per-episode gradient of each estimator
    train: TrainResult  # the closed loop


def run(cfg: AdvantageConfig, generator: torch.Generator, *, discounted_returns: Callable = discounted_returns,
        advantage_from_q: Callable = advantage_from_q,
        policy_gradient_estimate: Callable = policy_gradient_estimate) -> AdvantageResult:
    """The day's experiment: sample the three estimators at a random policy (compare their mean with
    policy.grad and their variances), then climb J with each of them from the uniform policy."""
    pol = random_test_policy(cfg, generator)
    s0 = sample_categorical(pol.mdp.start.expand(cfg.n_episodes, -1), generator)
    states, actions, rewards = sample_episodes(pol.mdp, pol.probs, s0, cfg.n_layers, cfg.reward_noise, generator)
    samples = estimator_samples(policy_gradient_estimate, pol.theta, states, actions,
                                discounted_returns(rewards, cfg.gamma), pol.V, advantage_from_q(pol.Q, pol.probs),
                                cfg.gamma, cfg.weight_by_gamma_t)
    result = train(pol.mdp, cfg, generator, returns_fn=discounted_returns, advantage_fn=advantage_from_q,
                   estimate_fn=policy_gradient_estimate)
    return AdvantageResult(pol, samples, result)
