"""MDP: the five-tuple (S, A, P, R, gamma) as tensors; Bellman backups; value and policy iteration.

    Bellman expectation:  V^pi(s) = sum_a pi(a|s) [ R(s,a) + gamma * sum_s' P(s'|s,a) V^pi(s') ]
    Bellman optimality:   V*(s)   = max_a        [ R(s,a) + gamma * sum_s' P(s'|s,a) V*(s')   ]
    Exact evaluation:     V^pi = (I - gamma P_pi)^{-1} R_pi

Builds on: nothing (day 1).
Deviations: rewards are expected rewards R(s,a) = sum_s' P(s'|s,a) r(s,a,s'); a terminal state is
absorbing (a self-loop with zero reward), which is the same as "no bootstrap after done" for every
gamma < 1. Everything is float64, so fixed points can be checked to 1e-10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

__all__ = [
    "DTYPE", "FORMULAS", "MDPConfig", "TabularMDP", "Solution",
    "from_transition_table", "frozen_lake", "gridworld", "random_mdp", "random_policy",
    "q_from_v", "bellman_expectation_backup", "bellman_optimality_backup", "evaluate_policy_exact",
    "greedy_policy", "value_iteration", "iterative_policy_evaluation", "policy_iteration",
    "bellman_residual", "monte_carlo_returns",
]

DTYPE = torch.float64

FORMULAS = [
    ("Bellman expectation",
     r"$V^\pi(s)=\sum_a \pi(a|s)\left[R(s,a)+\gamma\sum_{s'}P(s'|s,a)\,V^\pi(s')\right]$"),
    ("Bellman optimality", r"$V^*(s)=\max_a\left[R(s,a)+\gamma\sum_{s'}P(s'|s,a)\,V^*(s')\right]$"),
    ("Exact policy evaluation", r"$V^\pi=(I-\gamma P_\pi)^{-1}R_\pi$"),
    ("Contraction", r"$\|T V_1 - T V_2\|_\infty \leq \gamma\,\|V_1 - V_2\|_\infty$"),
]


@dataclass(frozen=True)
class MDPConfig:
    gamma: float = 0.99  # discount used on FrozenLake and the gridworld
    map_name: Literal["4x4", "8x8"] = "4x4"  # FrozenLake map
    is_slippery: bool = True  # FrozenLake dynamics: 1/3 intended move, 1/3 each perpendicular
    tol: float = 1e-12  # value iteration stops when the sup-norm change is below this
    max_iters: int = 100_000  # safety cap for the iterative methods
    n_random_policies: int = 16  # random stochastic policies compared against V*
    n_value_pairs: int = 256  # random (V1, V2) pairs for the contraction check
    mc_episodes: int = 500  # Monte-Carlo episodes of the optimal policy in the real gymnasium env
    mc_z: float = 4.0  # confidence bound for MC vs V*(s0), in standard errors

    def __post_init__(self):
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if self.mc_episodes < 2:
            raise ValueError("mc_episodes must be at least 2")

    @classmethod
    def toy(cls) -> MDPConfig:
        return cls()

    @classmethod
    def full(cls) -> MDPConfig:
        return cls(n_random_policies=64, n_value_pairs=2048, mc_episodes=4000)


@dataclass(frozen=True)
class TabularMDP:
    """(S, A, P, R, gamma) with S and A implicit in the shapes."""

    P: torch.Tensor  # (S, A, S) P[s, a, s'] = probability of landing in s'
    R: torch.Tensor  # (S, A) expected immediate reward
    gamma: float
    terminal: torch.Tensor  # (S,) bool, absorbing states
    start: torch.Tensor  # (S,) initial-state distribution

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]


# ---------------------------------------------------------------------------------------------------
# Building MDPs


def _absorb(P: torch.Tensor, R: torch.Tensor, terminal: torch.Tensor) -> None:
    """Make terminal states absorbing with zero reward (in place)."""
    idx = terminal.nonzero().flatten()
    P[idx] = 0.0
    P[idx, :, idx] = 1.0
    R[idx] = 0.0


def from_transition_table(table: dict, gamma: float, start: torch.Tensor) -> TabularMDP:
    """Build an MDP from a gymnasium-style table ``P[s][a] = [(prob, next_state, reward, done), ...]``.

    A transition with done=True ends the episode, so its next state is terminal (absorbing).
    """
    S, A = len(table), len(table[0])
    P = torch.zeros(S, A, S, dtype=DTYPE)
    R = torch.zeros(S, A, dtype=DTYPE)
    terminal = torch.zeros(S, dtype=torch.bool)
    for s in range(S):
        for a in range(A):
            for prob, s_next, reward, done in table[s][a]:
                P[s, a, int(s_next)] += prob
                R[s, a] += prob * reward
                if done:
                    terminal[int(s_next)] = True
    _absorb(P, R, terminal)
    return TabularMDP(P, R, gamma, terminal, start.to(DTYPE))


def frozen_lake(gamma: float = 0.99, map_name: str = "4x4", is_slippery: bool = True):
    """gymnasium's FrozenLake-v1 as a TabularMDP, plus the env itself (for Monte-Carlo checks)."""
    import gymnasium as gym

    # a generous time limit: V* is the infinite-horizon value, gymnasium's default cut-off is 100 steps
    env = gym.make("FrozenLake-v1", map_name=map_name, is_slippery=is_slippery, max_episode_steps=10_000)
    start = torch.as_tensor(env.unwrapped.initial_state_distrib, dtype=DTYPE)
    return from_transition_table(env.unwrapped.P, gamma, start), env


GRID = ("S...",
        ".#.X",
        "...G")  # S start, # wall, X pit (-1, terminal), G goal (+1, terminal), . step cost


def gridworld(gamma: float = 0.95, slip: float = 0.1, step_reward: float = -0.04,
              layout: tuple[str, ...] = GRID) -> TabularMDP:
    """A small gridworld of our own: actions left/down/right/up move one cell with probability
    1 - slip, otherwise a uniformly random other direction; walls and edges leave you in place."""
    rows, cols = len(layout), len(layout[0])
    cells = [(r, c) for r in range(rows) for c in range(cols) if layout[r][c] != "#"]
    index = {cell: i for i, cell in enumerate(cells)}
    moves = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # same action order as FrozenLake: left, down, right, up
    S, A = len(cells), len(moves)
    P = torch.zeros(S, A, S, dtype=DTYPE)
    R = torch.zeros(S, A, dtype=DTYPE)
    terminal = torch.tensor([layout[r][c] in "XG" for r, c in cells])
    reward_of = {"X": -1.0, "G": 1.0}
    for (r, c), s in index.items():
        for a in range(A):
            for b, (dr, dc) in enumerate(moves):
                p = 1.0 - slip if a == b else slip / (A - 1)
                nr, nc = r + dr, c + dc
                s_next = index.get((nr, nc), s) if 0 <= nr < rows and 0 <= nc < cols else s
                P[s, a, s_next] += p
                cell = cells[s_next]
                R[s, a] += p * (reward_of.get(layout[cell[0]][cell[1]], step_reward))
    _absorb(P, R, terminal)
    start = torch.zeros(S, dtype=DTYPE)
    start[[index[cell] for cell in cells if layout[cell[0]][cell[1]] == "S"]] = 1.0
    return TabularMDP(P, R, gamma, terminal, start)


def random_mdp(n_states: int, n_actions: int, gamma: float, generator: torch.Generator) -> TabularMDP:
    """A dense random MDP: Dirichlet(1) transition rows, standard-normal rewards, no terminal states."""
    P = -torch.rand(n_states, n_actions, n_states, generator=generator, dtype=DTYPE).log()
    P = P / P.sum(-1, keepdim=True)  # normalised exponentials = Dirichlet(1)
    R = torch.randn(n_states, n_actions, generator=generator, dtype=DTYPE)
    start = torch.full((n_states,), 1.0 / n_states, dtype=DTYPE)
    return TabularMDP(P, R, gamma, torch.zeros(n_states, dtype=torch.bool), start)


def random_policy(n_states: int, n_actions: int, generator: torch.Generator) -> torch.Tensor:
    """A random stochastic policy pi[s, a] (rows sum to 1)."""
    logits = torch.randn(n_states, n_actions, generator=generator, dtype=DTYPE) * 2.0
    return torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Kernels: the Bellman backups and exact evaluation


def q_from_v(P: torch.Tensor, R: torch.Tensor, gamma: float, V: torch.Tensor) -> torch.Tensor:
    """One-step lookahead Q(s,a) = R(s,a) + gamma * sum_s' P(s'|s,a) V(s').

    P: (S, A, S), R: (S, A), V: (S,)  ->  Q: (S, A)
    """
    return R + gamma * P @ V


def bellman_expectation_backup(P: torch.Tensor, R: torch.Tensor, gamma: float, policy: torch.Tensor,
                               V: torch.Tensor) -> torch.Tensor:
    """(T^pi V)(s) = sum_a pi(a|s) [R(s,a) + gamma * sum_s' P(s'|s,a) V(s')].

    P: (S, A, S) transition probabilities, R: (S, A) expected rewards, gamma: discount in [0, 1),
    policy: (S, A) action probabilities (rows sum to 1), V: (S,) values  ->  (S,) backed-up values.
    """
    return (policy * (R + gamma * P @ V)).sum(-1)


def bellman_optimality_backup(P: torch.Tensor, R: torch.Tensor, gamma: float,
                              V: torch.Tensor) -> torch.Tensor:
    """(T* V)(s) = max_a [R(s,a) + gamma * sum_s' P(s'|s,a) V(s')].

    P: (S, A, S) transition probabilities, R: (S, A) expected rewards, gamma: discount in [0, 1),
    V: (S,) values  ->  (S,) backed-up values. T* is a gamma-contraction in the sup-norm.
    """
    return (R + gamma * P @ V).max(-1).values


def evaluate_policy_exact(P: torch.Tensor, R: torch.Tensor, gamma: float,
                          policy: torch.Tensor) -> torch.Tensor:
    """V^pi by one linear solve: (I - gamma P_pi) V = R_pi, with P_pi = sum_a pi(a|s) P(.|s,a).

    P: (S, A, S), R: (S, A), gamma in [0, 1), policy: (S, A)  ->  V^pi: (S,)
    """
    P_pi = torch.einsum("sa,sat->st", policy, P)  # (S, S)
    R_pi = (policy * R).sum(-1)  # (S,)
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    return torch.linalg.solve(eye - gamma * P_pi, R_pi)


# ---------------------------------------------------------------------------------------------------
# Algorithms built on the kernels


def greedy_policy(Q: torch.Tensor) -> torch.Tensor:
    """A deterministic policy (S, A), one-hot on argmax_a Q(s, a) (ties go to the lowest action)."""
    return torch.nn.functional.one_hot(Q.argmax(-1), Q.shape[-1]).to(Q.dtype)


@dataclass
class Solution:
    V: torch.Tensor  # (S,)
    policy: torch.Tensor  # (S, A) greedy with respect to V
    iterations: int
    deltas: list[float]  # sup-norm change per iteration (value iteration) or policy changes (PI)


def value_iteration(mdp: TabularMDP, tol: float = 1e-12, max_iters: int = 100_000,
                    backup: Callable = bellman_optimality_backup) -> Solution:
    """Iterate V <- T* V from V = 0 until the sup-norm change is below ``tol``."""
    V = torch.zeros(mdp.n_states, dtype=DTYPE)
    deltas = []
    for it in range(1, max_iters + 1):
        V_new = backup(mdp.P, mdp.R, mdp.gamma, V)
        deltas.append((V_new - V).abs().max().item())
        V = V_new
        if deltas[-1] < tol:
            break
    return Solution(V, greedy_policy(q_from_v(mdp.P, mdp.R, mdp.gamma, V)), it, deltas)


def iterative_policy_evaluation(mdp: TabularMDP, policy: torch.Tensor, tol: float = 1e-12,
                                max_iters: int = 100_000,
                                backup: Callable = bellman_expectation_backup) -> torch.Tensor:
    """Iterate V <- T^pi V from V = 0 until the sup-norm change is below ``tol``."""
    V = torch.zeros(mdp.n_states, dtype=DTYPE)
    for _ in range(max_iters):
        V_new = backup(mdp.P, mdp.R, mdp.gamma, policy, V)
        done = (V_new - V).abs().max().item() < tol
        V = V_new
        if done:
            break
    return V


def policy_iteration(mdp: TabularMDP, max_iters: int = 1_000,
                     evaluate: Callable = evaluate_policy_exact) -> Solution:
    """Alternate exact evaluation and greedy improvement until the policy is stable.

    Improvement keeps the current action when it is within 1e-12 of the best one, so that ties
    cannot make the loop cycle between equally good policies.
    """
    policy = torch.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.n_actions, dtype=DTYPE)
    changes = []
    for it in range(1, max_iters + 1):
        V = evaluate(mdp.P, mdp.R, mdp.gamma, policy)
        Q = q_from_v(mdp.P, mdp.R, mdp.gamma, V)
        current = (policy * Q).sum(-1)
        improved = greedy_policy(Q)
        keep = (policy.max(-1).values == 1.0) & (current >= Q.max(-1).values - 1e-12)
        new_policy = torch.where(keep[:, None], policy, improved)
        changes.append(int((new_policy != policy).any(-1).sum()))
        if changes[-1] == 0:
            break
        policy = new_policy
    return Solution(evaluate(mdp.P, mdp.R, mdp.gamma, policy), policy, it, [float(c) for c in changes])


def bellman_residual(mdp: TabularMDP, V: torch.Tensor) -> float:
    """|| T* V - V ||_inf: zero exactly at the optimal value function."""
    return (bellman_optimality_backup(mdp.P, mdp.R, mdp.gamma, V) - V).abs().max().item()


def monte_carlo_returns(env, actions: torch.Tensor, episodes: int, gamma: float, seed: int) -> torch.Tensor:
    """Discounted returns of a deterministic policy (``actions[s]``) over real gymnasium episodes."""
    returns = torch.zeros(episodes, dtype=DTYPE)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    acts = actions.tolist()
    for ep in range(episodes):
        if ep:
            obs, _ = env.reset()
        G, discount, done = 0.0, 1.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(acts[obs])
            G += discount * reward
            discount *= gamma
            done = terminated or truncated
        returns[ep] = G
    return returns
