"""MDP: the five-tuple (S, A, P, R, gamma) as tensors; Bellman backups; value and policy iteration.

    Bellman expectation:  V^pi(s) = sum_a pi(a|s) [ R(s,a) + gamma * sum_s' P(s'|s,a) V^pi(s') ]
    Bellman optimality:   V*(s)   = max_a        [ R(s,a) + gamma * sum_s' P(s'|s,a) V*(s')   ]
    Exact evaluation:     V^pi = (I - gamma P_pi)^{-1} R_pi

Builds on: nothing (day 1).
Deviations: rewards are expected rewards R(s,a) = sum_s' P(s'|s,a) r(s,a,s'); a terminal state is
absorbing (a self-loop with zero reward), which is the same as "no bootstrap after done" for every
gamma < 1. Everything is float64, so fixed points can be checked to 1e-10. The experiment
(``run``) solves FrozenLake and a gridworld by value and policy iteration, then rolls the optimal
policy out in the real gymnasium env.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

__all__ = [
    "DTYPE", "FORMULAS", "MDPConfig", "TabularMDP", "Solution", "MDPResult",
    "from_transition_table", "frozen_lake", "gridworld_table", "gridworld", "random_mdp", "random_policy",
    "q_from_v", "bellman_expectation_backup", "bellman_optimality_backup", "evaluate_policy_exact",
    "greedy_policy", "value_iteration", "iterative_policy_evaluation", "policy_iteration",
    "bellman_residual", "monte_carlo_returns", "expected_return", "make_mdps", "solve_by_value_iteration",
    "solve_by_policy_iteration", "run",
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
    n_random_policies: int = 16  # random stochastic policies compared against V* (and random MDPs per check)
    n_iterative_policies: int = 1  # random policies per MDP evaluated by iterated expectation backups
    n_value_pairs: int = 128  # random (V1, V2) pairs per MDP for the contraction check
    mc_episodes: int = 400  # Monte-Carlo episodes of the optimal policy in the real gymnasium env
    # |mean return - V*(s0)| / SE is N(0, 1)-distributed (bounded returns, n >= 400: the CLT holds);
    # 4 SE fail a correct run with probability 6e-5. Worst of toy seeds 0-19 / full seeds 0-4: see README.
    mc_z: float = 4.0

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "gamma": "[0, 1)", "tol": "> 0", "max_iters": ">= 1", "n_random_policies": ">= 1",
        "n_iterative_policies": ">= 1", "n_value_pairs": ">= 1", "mc_episodes": ">= 2", "mc_z": "> 0",
    }

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
        return cls(n_random_policies=64, n_iterative_policies=8, n_value_pairs=2048, mc_episodes=4000)


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


def gridworld_table(slip: float = 0.1, step_reward: float = -0.04, layout: tuple[str, ...] = GRID):
    """A small gridworld of our own as a gymnasium-style table ``P[s][a] = [(prob, s', r, done), ...]``
    plus its start state: actions left/down/right/up move one cell with probability 1 - slip,
    otherwise a uniformly random other direction; walls and edges leave you in place; landing on X
    or G ends the episode with -1 or +1. Unlike FrozenLake's table, the rows of X and G list their
    ordinary moves (with rewards): making them absorbing is ``from_transition_table``'s job."""
    rows, cols = len(layout), len(layout[0])
    cells = [(r, c) for r in range(rows) for c in range(cols) if layout[r][c] != "#"]
    index = {cell: i for i, cell in enumerate(cells)}
    moves = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # same action order as FrozenLake: left, down, right, up
    reward_of = {"X": -1.0, "G": 1.0}
    table: dict[int, dict[int, list]] = {}
    for (r, c), s in index.items():
        table[s] = {}
        for a in range(len(moves)):
            outcomes = []
            for b, (dr, dc) in enumerate(moves):
                p = 1.0 - slip if a == b else slip / (len(moves) - 1)
                nr, nc = r + dr, c + dc
                s_next = index.get((nr, nc), s) if 0 <= nr < rows and 0 <= nc < cols else s
                kind = layout[cells[s_next][0]][cells[s_next][1]]
                outcomes.append((p, s_next, reward_of.get(kind, step_reward), kind in reward_of))
            table[s][a] = outcomes
    start = next(index[cell] for cell in cells if layout[cell[0]][cell[1]] == "S")
    return table, start


def gridworld(gamma: float = 0.95, slip: float = 0.1, step_reward: float = -0.04,
              layout: tuple[str, ...] = GRID) -> TabularMDP:
    """``gridworld_table`` as a TabularMDP (X and G absorbing with zero reward)."""
    table, s0 = gridworld_table(slip, step_reward, layout)
    start = torch.zeros(len(table), dtype=DTYPE)
    start[s0] = 1.0
    return from_transition_table(table, gamma, start)


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
    Q: torch.Tensor | None = None  # (S, A) one-step lookahead of V: R + gamma P V


def value_iteration(mdp: TabularMDP, tol: float = 1e-12, max_iters: int = 100_000,
                    backup: Callable = bellman_optimality_backup) -> Solution:
    """Iterate V <- T* V from V = 0 until the sup-norm change is below ``tol`` (or is NaN)."""
    V = torch.zeros(mdp.n_states, dtype=DTYPE)
    deltas = []
    for it in range(1, max_iters + 1):
        V_new = backup(mdp.P, mdp.R, mdp.gamma, V)
        deltas.append((V_new - V).abs().max().item())
        V = V_new
        if not deltas[-1] >= tol:  # converged, or NaN: iterating further cannot help
            break
    Q = q_from_v(mdp.P, mdp.R, mdp.gamma, V)
    return Solution(V, greedy_policy(Q), it, deltas, Q)


def iterative_policy_evaluation(mdp: TabularMDP, policy: torch.Tensor, tol: float = 1e-12,
                                max_iters: int = 100_000,
                                backup: Callable = bellman_expectation_backup) -> torch.Tensor:
    """Iterate V <- T^pi V from V = 0 until the sup-norm change is below ``tol`` (or is NaN)."""
    V = torch.zeros(mdp.n_states, dtype=DTYPE)
    for _ in range(max_iters):
        V_new = backup(mdp.P, mdp.R, mdp.gamma, policy, V)
        done = not (V_new - V).abs().max().item() >= tol
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
    V = evaluate(mdp.P, mdp.R, mdp.gamma, policy)
    return Solution(V, policy, it, [float(c) for c in changes], q_from_v(mdp.P, mdp.R, mdp.gamma, V))


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


def expected_return(table: dict, start: torch.Tensor, actions: torch.Tensor, gamma: float,
                    tol: float = 1e-16, max_steps: int = 100_000) -> float:
    """E[sum_t gamma^t r_t] of the deterministic policy ``actions[s]`` from the start distribution,
    straight from a gymnasium-style table: what the Monte-Carlo average converges to.

    The state distribution d_t is pushed forward one step at a time; probability mass that reaches a
    done transition leaves (no absorbing states, no linear solve), and the sum stops once
    gamma^t * (mass still running) < tol, so the neglected tail is below tol / (1 - gamma).
    """
    S = len(table)
    keep = torch.zeros(S, S, dtype=DTYPE)  # keep[s, s']: P(s' and not done | s, actions[s])
    reward = torch.zeros(S, dtype=DTYPE)  # E[r | s, actions[s]]
    for s in range(S):
        for prob, s_next, r, done in table[s][int(actions[s])]:
            reward[s] += prob * r
            if not done:
                keep[s, int(s_next)] += prob
    d, total, discount = start.to(DTYPE).clone(), 0.0, 1.0
    for _ in range(max_steps):
        total += discount * (d @ reward).item()
        d, discount = d @ keep, discount * gamma
        if discount * d.sum().item() < tol:
            break
    return total


# ---------------------------------------------------------------------------------------------------
# The experiment: FrozenLake and the gridworld, solved two ways, then played in the real env


@dataclass
class MDPResult:
    mdps: dict[str, TabularMDP]  # "frozen_lake", "gridworld"
    tables: dict[str, dict]  # the gymnasium-style tables they were built from
    value_iteration: dict[str, Solution]  # V*, Q* and the greedy policy, per MDP
    policy_iteration: dict[str, Solution]
    expected_return: dict[str, float]  # E[G] of VI's greedy policy from the start, through the table
    v_star_start: dict[str, float]  # sum_s start(s) V*(s): what expected_return must equal
    mc_returns: torch.Tensor  # (mc_episodes,) discounted returns of VI's greedy policy in the real env


def make_mdps(cfg: MDPConfig):
    """FrozenLake (gymnasium) and the gridworld: (mdps, tables, env), keyed "frozen_lake", "gridworld"."""
    lake, env = frozen_lake(cfg.gamma, cfg.map_name, cfg.is_slippery)
    grid_table, s0 = gridworld_table()
    start = torch.zeros(len(grid_table), dtype=DTYPE)
    start[s0] = 1.0
    mdps = {"frozen_lake": lake, "gridworld": from_transition_table(grid_table, cfg.gamma, start)}
    return mdps, {"frozen_lake": env.unwrapped.P, "gridworld": grid_table}, env


def solve_by_value_iteration(mdps: dict[str, TabularMDP], cfg: MDPConfig,
                             backup: Callable = bellman_optimality_backup) -> dict[str, Solution]:
    return {name: value_iteration(m, cfg.tol, cfg.max_iters, backup=backup) for name, m in mdps.items()}


def solve_by_policy_iteration(mdps: dict[str, TabularMDP],
                              evaluate: Callable = evaluate_policy_exact) -> dict[str, Solution]:
    return {name: policy_iteration(m, evaluate=evaluate) for name, m in mdps.items()}


def run(cfg: MDPConfig, generator: torch.Generator, *,
        bellman_optimality_backup: Callable = bellman_optimality_backup,
        evaluate_policy_exact: Callable = evaluate_policy_exact) -> MDPResult:
    """Solve both MDPs by value iteration and by policy iteration; evaluate VI's greedy policy exactly
    from the tables, and play it for ``cfg.mc_episodes`` episodes in the real FrozenLake env."""
    mdps, tables, env = make_mdps(cfg)
    vi = solve_by_value_iteration(mdps, cfg, bellman_optimality_backup)
    pi = solve_by_policy_iteration(mdps, evaluate_policy_exact)
    actions = {name: sol.policy.argmax(-1) for name, sol in vi.items()}
    expected = {name: expected_return(tables[name], m.start, actions[name], m.gamma) for name, m in mdps.items()}
    v_start = {name: (m.start @ vi[name].V).item() for name, m in mdps.items()}
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    returns = monte_carlo_returns(env, actions["frozen_lake"], cfg.mc_episodes, cfg.gamma, seed)
    return MDPResult(mdps, tables, vi, pi, expected, v_start, returns)
