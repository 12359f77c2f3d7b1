"""TD learning: bootstrap from the next estimate instead of waiting for the return.

    TD error:          delta = r + gamma * (1 - done) * V(s') - V(s)
    Update:            V(s) <- V(s) + alpha * delta
    Q-learning:        y = r + gamma * (1 - done) * max_a' Q(s', a')                (off-policy)
    SARSA:             y = r + gamma * (1 - done) * Q(s', a'),  a' the action taken   (on-policy)
    Expected SARSA:    y = r + gamma * (1 - done) * sum_a' pi(a'|s') Q(s', a')

Builds on: mdp (TabularMDP, random_mdp, random_policy, evaluate_policy_exact, value_iteration, q_from_v).
Deviations: CliffWalking runs as a batch of independent agents in one (B, S, A) tensor that
auto-resets like a gymnasium vector env, for a fixed number of steps rather than episodes. Sutton &
Barto keep alpha = 0.5; we keep it for the first 60% of the steps and then anneal it linearly to
0.02, because with alpha fixed at 0.5 SARSA's noisy targets leave 20-30% of its greedy policies
(full mode; 35-50% in toy mode) looping on a wall bump at the moment training stops. The online
curves and Q-learning's result do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from modules.mdp import (DTYPE, TabularMDP, evaluate_policy_exact, q_from_v, random_mdp, random_policy,
                         value_iteration)

__all__ = [
    "FORMULAS", "TDConfig", "ALGORITHMS",
    "epsilon_greedy_probs", "td0_target", "q_learning_target", "sarsa_target", "expected_sarsa_target",
    "td_update",
    "CliffTensorEnv", "make_cliff_env", "compare_with_gymnasium", "sample_actions",
    "CliffRun", "train_cliff", "episode_returns", "last_episodes_mean", "greedy_rollout",
    "random_deterministic_mdp", "td0_evaluation", "q_learning_generative",
    "EvaluationRun", "QStarRun", "TDResult", "td0_experiment", "q_star_experiment", "cliff_experiment", "run",
]

FORMULAS = [
    ("TD error", r"$\delta_t = r_t + \gamma\,(1-d_t)\,V(s_{t+1}) - V(s_t)$"),
    ("TD update", r"$V(s_t) \leftarrow V(s_t) + \alpha\,\delta_t$"),
    ("Q-learning target", r"$y = r + \gamma\,(1-d)\,\max_{a'} Q(s',a')$"),
    ("SARSA target", r"$y = r + \gamma\,(1-d)\,Q(s',a'),\quad a' \sim \pi_\epsilon(\cdot|s')$"),
    ("Expected SARSA target", r"$y = r + \gamma\,(1-d)\,\sum_{a'} \pi_\epsilon(a'|s')\,Q(s',a')$"),
    ("epsilon-greedy",
     r"$\pi_\epsilon(a|s) = \epsilon/|A| + (1-\epsilon)\,[a \in \arg\max_b Q(s,b)]\,/\,|\arg\max|$"),
]

ALGORITHMS = ("q_learning", "sarsa", "expected_sarsa")


@dataclass(frozen=True)
class TDConfig:
    # CliffWalking-v1 control, Sutton & Barto Example 6.6
    n_agents: int = 32  # independent agents per algorithm; all 3 algorithms learn side by side in one tensor
    steps: int = 4500  # batched env steps: every agent takes this many steps (episodes back to back)
    alpha: float = 0.5  # step size of the book's example
    alpha_final: float = 0.02  # step size reached (linearly) at the last step
    anneal_from: float = 0.6  # fraction of the steps after which alpha starts to anneal
    epsilon: float = 0.1  # exploration of the epsilon-greedy behaviour policy
    gamma: float = 1.0  # CliffWalking is undiscounted in the book
    greedy_max_steps: int = 100  # a greedy rollout that has not reached the goal by then is a loop
    tail_episodes: int = 20  # online returns are compared over each agent's last episodes
    # Outcome bars: below the worst of toy seeds 0-19 / full seeds 0-4 (`llmaudit sweep td`), margin in brackets.
    min_optimal_fraction: float = 0.9  # Q-learning agents whose greedy path returns -13 (worst 1.0 toy and full: 11 %)
    min_safe_fraction: float = 0.55  # SARSA agents whose greedy path is safe: reaches the goal, < -13, no fall
    #                                  (worst toy 0.625: 14 %; full bar 0.85, worst 0.961: 13 %)
    min_expected_safe_fraction: float = 0.85  # the same for expected SARSA (worst toy 0.969: 14 %; full bar 0.9,
    #                                           worst 1.0: 11 %)
    min_online_gap: float = 14.0  # median agent's online return, SARSA minus Q-learning (worst toy 16.0: 14 %;
    #                               full bar 22, worst 26.3: 20 %)
    # tensor env vs the real gymnasium env
    n_env_sequences: int = 16  # random action sequences replayed in both
    env_sequence_length: int = 100  # steps per sequence (episodes reset inside a sequence)
    # TD(0) policy evaluation on a random MDP (from `mdp`)
    eval_states: int = 8
    eval_actions: int = 3
    eval_gamma: float = 0.9
    eval_agents: int = 256  # independent TD(0) learners; their average is compared with V^pi
    eval_steps: int = 3000  # transitions per learner along one continuing trajectory
    eval_alpha_c: float = 20.0  # step size c / (c + n - 1) at the n-th visit of a state (1, then ~c/n)
    eval_tol: float = 0.15  # sup-norm error of the learners' mean value vs V^pi (worst toy 0.118: 21 %;
    #                         full: 8000 steps, bar 0.05, worst 0.033: 34 %)
    # Q-learning -> Q* on a small deterministic MDP, uniformly random behaviour
    qstar_states: int = 5
    qstar_actions: int = 2
    qstar_gamma: float = 0.9
    qstar_agents: int = 16
    qstar_steps: int = 3000  # one uniformly drawn (s, a) per agent per step
    qstar_alpha: float = 0.5
    qstar_tol: float = 1e-4  # max |Q - Q*| over agents, states and actions (worst toy 1.3e-5: 87 %; full bar
    #                          1e-6, worst 1.7e-7: 83 %)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_agents": ">= 1", "steps": ">= 1", "alpha": "(0, 1]", "alpha_final": "(0, 1]", "anneal_from": "[0, 1)",
        "epsilon": "[0, 1]", "gamma": "[0, 1]", "greedy_max_steps": ">= 1", "tail_episodes": ">= 1",
        "min_optimal_fraction": "[0, 1]", "min_safe_fraction": "[0, 1]", "min_expected_safe_fraction": "[0, 1]",
        "min_online_gap": ">= 0", "n_env_sequences": ">= 1", "env_sequence_length": ">= 1", "eval_states": ">= 2",
        "eval_actions": ">= 1", "eval_gamma": "[0, 1)", "eval_agents": ">= 1", "eval_steps": ">= 1",
        "eval_alpha_c": "> 0", "eval_tol": "> 0", "qstar_states": ">= 2", "qstar_actions": ">= 1",
        "qstar_gamma": "[0, 1)", "qstar_agents": ">= 1", "qstar_steps": ">= 1", "qstar_alpha": "(0, 1]",
        "qstar_tol": "> 0",
    }

    def __post_init__(self):
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.anneal_from < 1.0:
            raise ValueError(f"anneal_from must be in [0, 1), got {self.anneal_from}")
        if self.tail_episodes < 1:
            raise ValueError("tail_episodes must be at least 1")

    @classmethod
    def toy(cls) -> TDConfig:
        return cls()

    @classmethod
    def full(cls) -> TDConfig:
        return cls(n_agents=128, steps=16_000, min_optimal_fraction=0.9, min_safe_fraction=0.85,
                   min_expected_safe_fraction=0.9, min_online_gap=22.0, n_env_sequences=64,
                   eval_steps=8000, eval_tol=0.05, qstar_agents=64, qstar_steps=4000, qstar_tol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Kernels: the policy, the one-step targets, and the update


def epsilon_greedy_probs(q_values: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Action probabilities of the epsilon-greedy policy for each row of Q-values.

    pi(a|s) = epsilon / A + (1 - epsilon) * [a is greedy] / (number of greedy actions)

    Every action gets epsilon / A; the remaining 1 - epsilon is split evenly among the actions
    that tie for the maximum. Examples: Q = [1, 3], epsilon = 0.1 -> [0.05, 0.95];
    Q = [2, 2, 0], epsilon = 0.3 -> [0.45, 0.45, 0.1].

    q_values: (..., A) float, epsilon: float in [0, 1]  ->  (..., A) probabilities, rows sum to 1.
    """
    greedy = (q_values == q_values.max(-1, keepdim=True).values).to(q_values.dtype)  # (..., A)
    greedy = greedy / greedy.sum(-1, keepdim=True)
    return epsilon / q_values.shape[-1] + (1.0 - epsilon) * greedy


def td0_target(reward: torch.Tensor, next_value: torch.Tensor, terminated: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """TD(0) target for state values: y = r + gamma * V(s'), and y = r where s' is terminal.

    reward: (B,), next_value: (B,) V(s'), terminated: (B,) float, 1.0 where s' ends the episode
    (then y = r exactly, whatever V(s') holds -- even inf or NaN, so select with torch.where: a
    multiplication by (1 - terminated) gives 0 * inf = NaN), gamma: float  ->  (B,) targets.
    Example: r = 1, V(s') = 3, gamma = 0.9 -> 3.7.
    """
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_value)


def q_learning_target(reward: torch.Tensor, next_q: torch.Tensor, terminated: torch.Tensor,
                      gamma: float) -> torch.Tensor:
    """Q-learning target: y = r + gamma * max_a' Q(s', a'), and y = r where s' is terminal.

    reward: (B,), next_q: (B, A) Q(s', .), terminated: (B,) float, 1.0 where s' ends the episode
    (then y = r exactly, whatever next_q holds -- even inf or NaN: select with torch.where, do not
    multiply by (1 - terminated)), gamma: float  ->  (B,) targets.
    Example: r = 1, Q(s', .) = [1, 3], gamma = 0.9 -> 1 + 0.9 * 3 = 3.7.
    """
    return reward + gamma * torch.where(terminated.bool(), 0.0, next_q.max(-1).values)


def sarsa_target(reward: torch.Tensor, next_q: torch.Tensor, next_action: torch.Tensor,
                 terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """SARSA target: y = r + gamma * Q(s', a'), a' = the action actually taken in s'; y = r where s'
    is terminal.

    reward: (B,), next_q: (B, A) Q(s', .), next_action: (B,) long in [0, A), terminated: (B,) float,
    1.0 where s' ends the episode (then y = r exactly, whatever next_q holds -- even inf or NaN:
    select with torch.where, do not multiply by (1 - terminated)), gamma: float  ->  (B,) targets.
    Example: r = 1, Q(s', .) = [1, 3], a' = 0, gamma = 0.9 -> 1 + 0.9 * 1 = 1.9.
    """
    q_next_taken = next_q.gather(-1, next_action[:, None]).squeeze(-1)  # (B,)
    return reward + gamma * torch.where(terminated.bool(), 0.0, q_next_taken)


def expected_sarsa_target(reward: torch.Tensor, next_q: torch.Tensor, next_probs: torch.Tensor,
                          terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """Expected SARSA target: y = r + gamma * sum_a' pi(a'|s') Q(s', a'), and y = r where s' is terminal.

    reward: (B,), next_q: (B, A) Q(s', .), next_probs: (B, A) pi(.|s') (rows sum to 1),
    terminated: (B,) float, 1.0 where s' ends the episode (then y = r exactly, whatever next_q
    holds -- even inf or NaN: select with torch.where, do not multiply by (1 - terminated)),
    gamma: float  ->  (B,) targets.
    Example: r = 1, Q(s', .) = [1, 3], pi(.|s') = [0.05, 0.95], gamma = 0.9 -> 1 + 0.9 * 2.9 = 3.61.
    """
    return reward + gamma * torch.where(terminated.bool(), 0.0, (next_probs * next_q).sum(-1))


def td_update(estimate: torch.Tensor, target: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Move the estimate a fraction alpha of the way to the target: x + alpha * (target - x).

    estimate: (B,) current V(s) or Q(s, a), target: (B,), alpha: float or (B,) step sizes in [0, 1]
    ->  (B,) new estimates (alpha = 0 keeps the estimate, alpha = 1 replaces it by the target).
    Example: x = 2, target = 3.7, alpha = 0.5 -> 2.85.
    """
    return estimate + alpha * (target - estimate)


# ---------------------------------------------------------------------------------------------------
# CliffWalking as a batched tensor env, built from gymnasium's own transition table


class CliffTensorEnv:
    """A deterministic gymnasium toy-text env as lookup tables, stepped for a whole batch at once.

    Built from ``env.unwrapped.P[s][a] = [(1.0, next_state, reward, terminated)]``. ``step`` takes
    (B,) states and actions and returns (B,) next states, rewards and terminated flags (float 0/1).
    With ``autoreset=True`` a terminal step returns the start state as next state, as a gymnasium
    vector env does, so a batch of agents can run episodes back to back.
    """

    def __init__(self, table: dict, start_state: int):
        S, A = len(table), len(table[0])
        self.n_states, self.n_actions, self.start_state = S, A, start_state
        self.next_state = torch.zeros(S * A, dtype=torch.long)  # flat index s * A + a
        self.reward = torch.zeros(S * A, dtype=DTYPE)
        self.terminated = torch.zeros(S * A, dtype=DTYPE)
        for s in range(S):
            for a in range(A):
                outcomes = table[s][a]
                if len(outcomes) != 1 or outcomes[0][0] != 1.0:
                    raise ValueError("CliffTensorEnv needs a deterministic table (is_slippery=False)")
                _, s_next, reward, terminated = outcomes[0]
                self.next_state[s * A + a] = int(s_next)
                self.reward[s * A + a] = float(reward)
                self.terminated[s * A + a] = float(terminated)
        self.next_state_autoreset = torch.where(self.terminated.bool(), start_state, self.next_state)

    def step(self, state: torch.Tensor, action: torch.Tensor, autoreset: bool = False):
        sa = state * self.n_actions + action
        next_state = self.next_state_autoreset[sa] if autoreset else self.next_state[sa]
        return next_state, self.reward[sa], self.terminated[sa]


def make_cliff_env():
    """CliffWalking-v1 twice: as a ``CliffTensorEnv`` and as the real gymnasium env (for checks)."""
    import gymnasium as gym

    env = gym.make("CliffWalking-v1")
    start = int(env.unwrapped.initial_state_distrib.argmax())
    return CliffTensorEnv(env.unwrapped.P, start), env


def compare_with_gymnasium(tensor_env: CliffTensorEnv, gym_env, actions: torch.Tensor, seed: int) -> int:
    """Replay (n, T) action sequences in both envs; return the number of steps where the next state,
    reward, terminated flag or the auto-reset state (the start state, after a terminal step) differ."""
    n, T = actions.shape
    state = torch.full((n,), tensor_env.start_state)
    tensor_steps = []
    for t in range(T):
        s_next, r, term = tensor_env.step(state, actions[:, t])
        s_reset, _, _ = tensor_env.step(state, actions[:, t], autoreset=True)
        tensor_steps.append(torch.stack([s_next.to(DTYPE), r, term, s_reset.to(DTYPE)], -1))  # (n, 4)
        state = s_reset
    tensor_steps = torch.stack(tensor_steps, 1).tolist()  # (n, T, 4)
    mismatches = 0
    for i in range(n):
        gym_env.reset(seed=seed + i)
        for t in range(T):
            obs, reward, terminated, truncated, _ = gym_env.step(int(actions[i, t]))
            after = gym_env.reset()[0] if terminated or truncated else obs
            mismatches += [obs, float(reward), float(terminated), after] != tensor_steps[i][t]
    return mismatches


def sample_actions(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One action per row of (B, A) probabilities, by inverting the CDF with one uniform per row."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    return (u > probs.cumsum(-1)[:, :-1]).sum(-1)  # (B,) long in [0, A)


@dataclass
class CliffRun:
    Q: dict[str, torch.Tensor]  # algorithm -> (N, S, A) learned Q tables
    returns: dict[str, torch.Tensor]  # algorithm -> (N, E) online (epsilon-greedy) episode returns, NaN-padded
    episodes: dict[str, torch.Tensor]  # algorithm -> (N,) episodes each agent finished
    episodes_constant_alpha: dict[str, torch.Tensor]  # algorithm -> (N,) of those, finished before alpha anneals


def train_cliff(env: CliffTensorEnv, n_agents: int, steps: int, alpha: float, alpha_final: float,
                anneal_from: float, epsilon: float, gamma: float, generator: torch.Generator,
                epsilon_greedy_probs: Callable = epsilon_greedy_probs,
                q_learning_target: Callable = q_learning_target, sarsa_target: Callable = sarsa_target,
                expected_sarsa_target: Callable = expected_sarsa_target,
                td_update: Callable = td_update) -> CliffRun:
    """Q-learning, SARSA and expected SARSA, n_agents each, learning CliffWalking for `steps` steps.

    All 3 * n_agents agents live in one (B, S, A) tensor: rows [0, N) are Q-learning, [N, 2N) SARSA,
    [2N, 3N) expected SARSA. Every step each agent draws a' ~ epsilon-greedy(Q(s')) once: SARSA
    bootstraps from that very a' and then takes it; the other two take it as well (their targets do
    not depend on it). The batch auto-resets, so after a terminal step the next state handed to the
    targets is the start state, and terminated = 1 must make them ignore it. The step size is alpha
    for the first `anneal_from` of the steps, then falls linearly to alpha_final.
    """
    S, A, N = env.n_states, env.n_actions, n_agents
    B = len(ALGORITHMS) * N
    Q = torch.zeros(B, S, A, dtype=DTYPE)
    q_rows, q_flat = Q.view(B * S, A), Q.view(-1)  # views for flat gathers / writes
    row_base = torch.arange(B) * S
    q, s, e = slice(0, N), slice(N, 2 * N), slice(2 * N, B)  # rows of each algorithm
    state = torch.full((B,), env.start_state)
    action = sample_actions(epsilon_greedy_probs(q_rows[row_base + state], epsilon), generator)
    rewards, dones = [], []  # (B,) per step, turned into per-episode returns at the end
    for t in range(steps):
        progress = min(max((t / steps - anneal_from) / (1.0 - anneal_from), 0.0), 1.0)
        step_size = alpha + (alpha_final - alpha) * progress
        next_state, reward, terminated = env.step(state, action, autoreset=True)
        next_q = q_rows[row_base + next_state]  # (B, A)
        next_probs = epsilon_greedy_probs(next_q, epsilon)
        next_action = sample_actions(next_probs, generator)
        target = torch.cat([
            q_learning_target(reward[q], next_q[q], terminated[q], gamma),
            sarsa_target(reward[s], next_q[s], next_action[s], terminated[s], gamma),
            expected_sarsa_target(reward[e], next_q[e], next_probs[e], terminated[e], gamma)])
        sa = (row_base + state) * A + action
        q_flat.index_copy_(0, sa, td_update(q_flat[sa], target, step_size))
        rewards.append(reward)
        dones.append(terminated)
        state, action = next_state, next_action
    dones = torch.stack(dones)
    returns, finished = episode_returns(torch.stack(rewards), dones)
    before = dones[:int(anneal_from * steps)].sum(0).long()  # (B,) episodes finished at constant alpha
    split = {name: slice(i * N, (i + 1) * N) for i, name in enumerate(ALGORITHMS)}
    return CliffRun(Q={k: Q[v] for k, v in split.items()}, returns={k: returns[v] for k, v in split.items()},
                    episodes={k: finished[v] for k, v in split.items()},
                    episodes_constant_alpha={k: before[v] for k, v in split.items()})


def episode_returns(rewards: torch.Tensor, dones: torch.Tensor):
    """Undiscounted return of every finished episode of every agent.

    rewards, dones: (T, B) per step, dones 1.0 on an episode's last step  ->  (returns (B, E), finished
    (B,)) with E the most episodes any agent finished; an agent's unfinished slots are NaN.
    """
    T, B = rewards.shape
    episode_id = (dones.cumsum(0) - dones).long()  # (T, B) the episode each step belongs to
    finished = dones.sum(0).long()  # (B,)
    E = int(finished.max())
    keep = episode_id < E  # drop the steps of the episode still running at the end
    totals = torch.zeros(B, E, dtype=rewards.dtype)
    agent = torch.arange(B).expand(T, B)
    totals.index_put_((agent[keep], episode_id[keep]), rewards[keep], accumulate=True)
    return totals.masked_fill(torch.arange(E) >= finished[:, None], float("nan")), finished


def last_episodes_mean(returns: torch.Tensor, finished: torch.Tensor, k: int) -> torch.Tensor:
    """Mean return of each agent's last k finished episodes: returns (N, E), finished (N,) -> (N,).
    NaN for an agent that finished fewer than k episodes."""
    if returns.shape[1] == 0:
        return torch.full(finished.shape, float("nan"), dtype=returns.dtype)
    idx = finished[:, None] - k + torch.arange(k)  # (N, k)
    tail = returns.gather(1, idx.clamp(min=0))
    return tail.mean(1).masked_fill(finished < k, float("nan"))


def greedy_rollout(env: CliffTensorEnv, Q: torch.Tensor, max_steps: int):
    """Follow argmax_a Q(s, a) from the start state for every table in Q (N, S, A).

    Returns (return, reached_goal, falls), each (N,): a table whose path loops or is cut at
    ``max_steps`` has reached_goal False; falls counts cliff steps (reward -100).
    """
    N = Q.shape[0]
    rows = Q.reshape(N * env.n_states, env.n_actions)
    base = torch.arange(N) * env.n_states
    state = torch.full((N,), env.start_state)
    total = torch.zeros(N, dtype=DTYPE)
    done = torch.zeros(N, dtype=torch.bool)
    falls = torch.zeros(N, dtype=torch.long)
    for _ in range(max_steps):
        action = rows[base + state].argmax(-1)
        next_state, reward, terminated = env.step(state, action)
        total += torch.where(done, 0.0, reward)
        falls += ((reward <= -100) & ~done).long()
        done |= terminated.bool()
        state = next_state
    return total, done, falls


# ---------------------------------------------------------------------------------------------------
# TD(0) policy evaluation and Q-learning to Q* on small MDPs


def random_deterministic_mdp(n_states: int, n_actions: int, gamma: float,
                             generator: torch.Generator) -> TabularMDP:
    """Each (s, a) leads to one uniformly drawn next state; standard-normal rewards; no terminals."""
    next_state = torch.randint(n_states, (n_states, n_actions), generator=generator)
    P = torch.nn.functional.one_hot(next_state, n_states).to(DTYPE)  # (S, A, S)
    R = torch.randn(n_states, n_actions, generator=generator, dtype=DTYPE)
    start = torch.full((n_states,), 1.0 / n_states, dtype=DTYPE)
    return TabularMDP(P, R, gamma, torch.zeros(n_states, dtype=torch.bool), start)


def td0_evaluation(mdp: TabularMDP, policy: torch.Tensor, n_agents: int, steps: int, alpha_c: float,
                   generator: torch.Generator, n_checkpoints: int = 50,
                   td0_target: Callable = td0_target, td_update: Callable = td_update):
    """TD(0) estimates of V^pi by n_agents independent learners, each on one continuing trajectory.

    At the n-th visit of a state its step size is c / (c + n - 1): 1 at the first visit, then
    about c / n, so sum alpha = inf and sum alpha^2 < inf (Robbins-Monro); a larger c forgets the
    zero initialisation faster, which matters when gamma is close to 1. Returns V (n_agents, S),
    checkpoints (K,) and V_history (K, n_agents, S), V saved at K evenly spaced steps.
    """
    S, A = mdp.n_states, mdp.n_actions
    joint_cdf = (policy[:, :, None] * mdp.P).reshape(S, A * S).cumsum(-1)[:, :-1]  # P(a, s'|s), flat a * S + s'
    reward_of = mdp.R.repeat_interleave(S, dim=1)  # (S, A * S): R(s, a) for each flat (a, s')
    V = torch.zeros(n_agents, S, dtype=DTYPE)
    V_flat = V.view(-1)
    visits = torch.zeros(n_agents * S, dtype=DTYPE)
    base = torch.arange(n_agents) * S
    no_terminal = torch.zeros(n_agents, dtype=DTYPE)
    state = sample_actions(mdp.start.expand(n_agents, S), generator)
    u = torch.rand(steps, n_agents, 1, generator=generator, dtype=DTYPE)  # one uniform per step and learner
    every = max(1, steps // n_checkpoints)
    checkpoints, history = [], []
    for t in range(1, steps + 1):
        k = (u[t - 1] > joint_cdf[state]).sum(-1)  # (N,) the sampled (action, next state), flat
        next_state, reward = k % S, reward_of[state, k]
        idx = base + state
        n = visits[idx] + 1.0  # this visit is the n-th of (learner, state)
        visits[idx] = n
        target = td0_target(reward, V_flat[base + next_state], no_terminal, mdp.gamma)
        V_flat.index_copy_(0, idx, td_update(V_flat[idx], target, alpha_c / (n + (alpha_c - 1.0))))
        state = next_state
        if t % every == 0:
            checkpoints.append(t)
            history.append(V.clone())
    return V, torch.tensor(checkpoints), torch.stack(history)


def q_learning_generative(mdp: TabularMDP, n_agents: int, steps: int, alpha: float,
                          generator: torch.Generator, n_checkpoints: int = 50,
                          q_learning_target: Callable = q_learning_target,
                          td_update: Callable = td_update):
    """Q-learning with uniformly random behaviour: every step each agent updates one uniformly drawn
    (s, a) with s' ~ P(.|s, a). The behaviour never looks at Q, yet the greedy values converge to Q*
    (that is what off-policy means). Returns (Q (n_agents, S, A), checkpoints, Q_history (K, N, S, A)).
    """
    S, A = mdp.n_states, mdp.n_actions
    Q = torch.zeros(n_agents, S, A, dtype=DTYPE)
    q_rows, q_flat = Q.view(-1, A), Q.view(-1)
    base = torch.arange(n_agents) * S
    P_cdf = mdp.P.cumsum(-1)[:, :, :-1]
    no_terminal = torch.zeros(n_agents, dtype=DTYPE)
    every = max(1, steps // n_checkpoints)
    checkpoints, history = [], []
    for t in range(1, steps + 1):
        state = torch.randint(S, (n_agents,), generator=generator)
        action = torch.randint(A, (n_agents,), generator=generator)
        u = torch.rand(n_agents, 1, generator=generator, dtype=DTYPE)
        next_state = (u > P_cdf[state, action]).sum(-1)
        target = q_learning_target(mdp.R[state, action], q_rows[base + next_state], no_terminal, mdp.gamma)
        sa = (base + state) * A + action
        q_flat.index_copy_(0, sa, td_update(q_flat[sa], target, alpha))
        if t % every == 0:
            checkpoints.append(t)
            history.append(Q.clone())
    return Q, torch.tensor(checkpoints), torch.stack(history)


# ---------------------------------------------------------------------------------------------------
# The experiment: TD(0) -> V^pi, Q-learning -> Q*, and the three control algorithms on CliffWalking


@dataclass
class EvaluationRun:
    v_pi: torch.Tensor  # (S,) exact V^pi by the linear solve
    checkpoints: torch.Tensor  # (K,) transitions per learner
    history: torch.Tensor  # (K, N, S) every learner's V at each checkpoint

    @property
    def mean_error(self) -> torch.Tensor:
        """(K,) sup-norm error of the learners' average: what is left once the step-size noise averages out."""
        return (self.history.mean(1) - self.v_pi).abs().amax(-1)

    @property
    def single_error(self) -> torch.Tensor:
        """(K,) sup-norm error of one learner, averaged over learners."""
        return (self.history - self.v_pi).abs().amax(-1).mean(-1)


@dataclass
class QStarRun:
    q_star: torch.Tensor  # (S, A) by value iteration
    checkpoints: torch.Tensor  # (K,) updates per agent
    history: torch.Tensor  # (K, N, S, A)

    @property
    def error(self) -> torch.Tensor:
        """(K,) max |Q - Q*| over agents, states and actions."""
        return (self.history - self.q_star).abs().flatten(1).amax(-1)


def td0_experiment(cfg: TDConfig, generator: torch.Generator, *, td0_target: Callable = td0_target,
                   td_update: Callable = td_update) -> EvaluationRun:
    """TD(0) on a random MDP and a random stochastic policy, against V^pi from the linear solve."""
    mdp = random_mdp(cfg.eval_states, cfg.eval_actions, cfg.eval_gamma, generator)
    policy = random_policy(cfg.eval_states, cfg.eval_actions, generator)
    v_pi = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, policy)
    _, checkpoints, history = td0_evaluation(mdp, policy, cfg.eval_agents, cfg.eval_steps, cfg.eval_alpha_c,
                                             generator, td0_target=td0_target, td_update=td_update)
    return EvaluationRun(v_pi, checkpoints, history)


def q_star_experiment(cfg: TDConfig, generator: torch.Generator, *, q_learning_target: Callable = q_learning_target,
                      td_update: Callable = td_update) -> QStarRun:
    """Q-learning with uniformly random behaviour on a small deterministic MDP, against Q* from value iteration."""
    mdp = random_deterministic_mdp(cfg.qstar_states, cfg.qstar_actions, cfg.qstar_gamma, generator)
    q_star = q_from_v(mdp.P, mdp.R, mdp.gamma, value_iteration(mdp, tol=1e-13).V)
    _, checkpoints, history = q_learning_generative(mdp, cfg.qstar_agents, cfg.qstar_steps, cfg.qstar_alpha,
                                                    generator, q_learning_target=q_learning_target,
                                                    td_update=td_update)
    return QStarRun(q_star, checkpoints, history)


def cliff_experiment(cfg: TDConfig, generator: torch.Generator, env: CliffTensorEnv | None = None,
                     **kernels: Callable):
    """``train_cliff`` with the config's settings, then every agent's greedy path:
    (CliffRun, {algorithm: (return, reached_goal, falls)})."""
    env = env if env is not None else make_cliff_env()[0]
    result = train_cliff(env, cfg.n_agents, cfg.steps, cfg.alpha, cfg.alpha_final, cfg.anneal_from, cfg.epsilon,
                         cfg.gamma, generator, **kernels)
    return result, {name: greedy_rollout(env, result.Q[name], cfg.greedy_max_steps) for name in ALGORITHMS}


@dataclass
class TDResult:
    td0: EvaluationRun
    q_star: QStarRun
    cliff: CliffRun
    greedy: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # algorithm -> (return, reached, falls)


def run(cfg: TDConfig, generator: torch.Generator, *, epsilon_greedy_probs: Callable = epsilon_greedy_probs,
        td0_target: Callable = td0_target, q_learning_target: Callable = q_learning_target,
        sarsa_target: Callable = sarsa_target, expected_sarsa_target: Callable = expected_sarsa_target,
        td_update: Callable = td_update) -> TDResult:
    """The day's three experiments, each with the kernels it uses."""
    td0 = td0_experiment(cfg, generator, td0_target=td0_target, td_update=td_update)
    q_star = q_star_experiment(cfg, generator, q_learning_target=q_learning_target, td_update=td_update)
    cliff, greedy = cliff_experiment(cfg, generator, epsilon_greedy_probs=epsilon_greedy_probs,
                                     q_learning_target=q_learning_target, sarsa_target=sarsa_target,
                                     expected_sarsa_target=expected_sarsa_target, td_update=td_update)
    return TDResult(td0, q_star, cliff, greedy)
