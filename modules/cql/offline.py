"""The offline setting that `cql` (day 10) and `bcq` (day 11) share: one environment whose Q* is known
exactly, fixed data sets of three qualities, and the baselines every offline method is compared with.

    Double DQN target:   y = r + gamma * (1 - done) * Q_target(s', argmax_a' Q_online(s', a'))
    Huber TD loss:       l(d) = d^2 / 2 if |d| < 1 else |d| - 1/2,   d = Q(s, a) - y
    Behaviour cloning:   min_G  -log G(a|s) + beta * mean(logits^2)     (d3rlpy's imitation loss)

Builds on: mdp (FrozenLake as a TabularMDP, value iteration for Q*, exact policy evaluation).
Deviations: the "network" is a one-hot MLP per model (state one-hot -> ReLU hidden -> |A| outputs), so
that unseen actions get their values by generalisation through the shared hidden layer -- the
extrapolation error that makes offline Q-learning overestimate -- while Q* and every policy's return
stay exact. All models (data sets x methods x settings) train side by side as one batched tensor with
full-batch Adam on their whole data set (fitted Q iteration with a target copy every
``target_every`` steps) instead of d3rlpy's minibatches of 32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modules.mdp import DTYPE, TabularMDP, evaluate_policy_exact, frozen_lake, value_iteration

__all__ = [
    "QUALITIES", "OfflineConfig", "double_dqn_target", "huber", "td_loss", "OfflineEnv", "make_env",
    "behaviour_policies", "Dataset", "collect", "make_datasets", "MLPTable", "train_q", "train_bc",
    "policy_returns", "greedy", "unseen_gap", "QRun", "Learner", "learner_layout", "OfflineResult",
]

NET_DTYPE = torch.float32  # the networks; Q*, the data's rewards and every return stay float64
QUALITIES = ("random", "medium", "expert")  # D4RL's names; "expert" is the optimal policy plus noise


@dataclass(frozen=True)
class OfflineConfig:
    """The environment, the data and the optimiser, shared by cql and bcq (their configs extend it)."""

    map_name: str = "4x4"  # FrozenLake map
    slippery: bool = True  # FrozenLake dynamics: 1/3 intended move, 1/3 each perpendicular
    gamma: float = 0.99  # discount of Q*, of the returns and of every TD target
    n_envs: int = 256  # parallel behaviour episodes while collecting a data set
    n_steps: int = 40  # steps per env: a data set holds n_envs * n_steps transitions
    max_episode_steps: int = 100  # gymnasium's time limit for FrozenLake 4x4 (a cut is not a terminal)
    medium_optimal_prob: float = 0.6  # medium: mean P(a*) over states; the rest goes to one fixed worse action
    medium_spread: float = 0.3  # medium: P(a*|s) is drawn per state uniformly in prob +- spread
    expert_noise: float = 0.2  # expert: probability of a uniformly random action instead of a*
    replicates: int = 2  # independently initialised learners per (method, data set); returns are their mean
    hidden: int = 32  # width of the one-hot MLP
    lr: float = 1e-2  # Adam step size
    batch_size: int = 128  # transitions per model per gradient step, drawn uniformly from its data set
    train_steps: int = 600  # gradient steps per model
    target_every: int = 10  # steps between copies of the online net into the target net
    log_every: int = 50  # steps between snapshots of the Q tables (the over-estimation curves)
    bc_steps: int = 200  # full-batch steps of behaviour cloning
    bc_beta: float = 0.01  # L2 penalty on the imitation logits (d3rlpy's beta; the BCQ paper's 0.01)

    RANGES = {
        "gamma": "[0, 1)", "n_envs": ">= 1", "n_steps": ">= 1", "max_episode_steps": ">= 1",
        "medium_optimal_prob": "[0, 1]", "medium_spread": "[0, 0.5]", "expert_noise": "[0, 1]", "replicates": ">= 1", "hidden": ">= 1", "lr": "> 0", "batch_size": ">= 1",
        "train_steps": ">= 1", "target_every": ">= 1", "log_every": ">= 1", "bc_steps": ">= 1", "bc_beta": ">= 0",
    }


# ---------------------------------------------------------------------------------------------------
# Kernels shared by both modules


def double_dqn_target(reward: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor,
                      terminated: torch.Tensor, gamma: float) -> torch.Tensor:
    """Double DQN target: the online net picks the next action, the target net values it.

        a* = argmax_a' Q_online(s', a'),   y = r + gamma * Q_target(s', a*),   y = r where s' is terminal

    reward: (B,), next_q_online: (B, A) Q_online(s', .), next_q_target: (B, A) Q_target(s', .),
    terminated: (B,) float 1.0 where s' ends the episode (then y = r whatever the nets say -- select
    with torch.where, 0 * inf is NaN), gamma: float  ->  (B,) targets.
    Example: r = 1, gamma = 0.9, Q_online(s') = [1, 3], Q_target(s') = [2, 0.5]: a* = 1, y = 1.45
    (plain DQN would take max Q_target = 2 and give 2.8).
    """
    best = next_q_online.argmax(-1, keepdim=True)  # (B, 1) chosen by the online net
    value = next_q_target.gather(-1, best).squeeze(-1)  # (B,) valued by the target net
    return reward + gamma * torch.where(terminated.bool(), 0.0, value)


def huber(diff: torch.Tensor) -> torch.Tensor:
    """d3rlpy's compute_huber_loss with beta = 1: d^2/2 inside |d| < 1, |d| - 1/2 outside (elementwise)."""
    return torch.where(diff.abs() < 1.0, 0.5 * diff ** 2, diff.abs() - 0.5)


def td_loss(q_values: torch.Tensor, actions: torch.Tensor, td_targets: torch.Tensor) -> torch.Tensor:
    """The DQN loss: mean Huber(Q(s, a_data) - y) over the batch. q_values (B, A), actions (B,), td_targets (B,)."""
    q_data = q_values.gather(-1, actions[:, None]).squeeze(-1)
    return huber(q_data - td_targets).mean()


# ---------------------------------------------------------------------------------------------------
# The environment and its exact solution


@dataclass
class OfflineEnv:
    mdp: TabularMDP  # FrozenLake as tensors (terminal states absorbing)
    reward: torch.Tensor  # (S, A, S) r(s, a, s') from gymnasium's table
    q_star: torch.Tensor  # (S, A) by value iteration
    start_state: int

    @property
    def optimal_return(self) -> float:
        return float(self.mdp.start @ self.q_star.max(-1).values)


def make_env(cfg: OfflineConfig) -> OfflineEnv:
    """gymnasium's slippery FrozenLake as an MDP, its per-transition reward r(s, a, s') and Q*."""
    mdp, env = frozen_lake(cfg.gamma, cfg.map_name, is_slippery=cfg.slippery)
    S, A = mdp.n_states, mdp.n_actions
    reward = torch.zeros(S, A, S, dtype=DTYPE)
    for s, row in env.unwrapped.P.items():
        for a, outcomes in row.items():
            for _, s_next, r, _ in outcomes:
                reward[s, a, s_next] = r
    reward[mdp.terminal] = 0.0  # absorbing, as in the MDP
    q_star = value_iteration(mdp, tol=1e-13).Q
    return OfflineEnv(mdp, reward, q_star, int(mdp.start.argmax()))


def behaviour_policies(env: OfflineEnv, cfg: OfflineConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """(S, A) behaviour policy per quality. random: uniform. medium: a* with a probability drawn per
    state in medium_optimal_prob +- medium_spread, else one fixed, randomly drawn worse action: the two
    other actions of each state never appear, and where P(a*|s) < 1/2 the data's most frequent action
    is the worse one. expert: a* with probability 1 - expert_noise, else uniform."""
    S, A = env.q_star.shape
    best = env.q_star.argmax(-1)
    offset = torch.randint(1, A, (S,), generator=generator)
    other = (best + offset) % A  # a uniformly drawn action other than a*
    onehot_best, onehot_other = F.one_hot(best, A).to(DTYPE), F.one_hot(other, A).to(DTYPE)
    uniform = torch.full((S, A), 1.0 / A, dtype=DTYPE)
    u = torch.rand(S, 1, generator=generator, dtype=DTYPE)
    p = (cfg.medium_optimal_prob + cfg.medium_spread * (2 * u - 1)).clamp(0.0, 1.0)  # (S, 1)
    return {"random": uniform, "medium": p * onehot_best + (1 - p) * onehot_other,
            "expert": (1 - cfg.expert_noise) * onehot_best + cfg.expert_noise * uniform}


@dataclass
class Dataset:
    """Transitions of several data sets side by side: every tensor is (D, N)."""

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_states: torch.Tensor
    terminated: torch.Tensor  # float 1.0 where s' is terminal (a time-limit cut is not)

    def counts(self, n_states: int, n_actions: int) -> torch.Tensor:
        """(D, S, A) how often each (s, a) appears in each data set."""
        D = self.states.shape[0]
        flat = torch.arange(D)[:, None] * n_states * n_actions + self.states * n_actions + self.actions
        return torch.bincount(flat.flatten(), minlength=D * n_states * n_actions).view(D, n_states, n_actions)


def collect(env: OfflineEnv, policies: torch.Tensor, n_envs: int, n_steps: int, max_episode_steps: int,
            generator: torch.Generator) -> Dataset:
    """Run D behaviour policies (D, S, A), n_envs episodes each in lock-step for n_steps, resetting at a
    terminal state or the time limit; every step is one stored transition."""
    D, S, A = policies.shape
    policy_cdf, P_cdf, start = policies.cumsum(-1), env.mdp.P.cumsum(-1), env.start_state
    state = torch.full((D, n_envs), start)
    age = torch.zeros(D, n_envs, dtype=torch.long)
    rows = torch.arange(D)[:, None]
    out = {k: [] for k in ("states", "actions", "rewards", "next_states", "terminated")}
    for _ in range(n_steps):
        u = torch.rand(2, D, n_envs, 1, generator=generator, dtype=DTYPE)  # inverse-CDF sampling
        action = (u[0] > policy_cdf[rows, state]).sum(-1).clamp(max=A - 1)  # (D, n_envs)
        next_state = (u[1] > P_cdf[state, action]).sum(-1).clamp(max=S - 1)
        terminated = env.mdp.terminal[next_state]
        for k, v in zip(out, (state, action, env.reward[state, action, next_state], next_state, terminated.to(DTYPE))):
            out[k].append(v)
        age += 1
        reset = terminated | (age >= max_episode_steps)
        state = torch.where(reset, start, next_state)
        age = torch.where(reset, 0, age)
    return Dataset(**{k: torch.cat(v, 1) for k, v in out.items()})


def make_datasets(env: OfflineEnv, cfg: OfflineConfig, generator: torch.Generator):
    """The three data sets (random, medium, expert) and their behaviour policies (3, S, A)."""
    policies = behaviour_policies(env, cfg, generator)
    stacked = torch.stack([policies[q] for q in QUALITIES])
    return collect(env, stacked, cfg.n_envs, cfg.n_steps, cfg.max_episode_steps, generator), stacked


# ---------------------------------------------------------------------------------------------------
# K one-hot MLPs as one batched tensor


class MLPTable:
    """K independent MLPs on a one-hot state: Q_k(s, .) = W2_k relu(W1_k[s] + b1_k) + b2_k.

    A one-hot input makes the first layer a row lookup, so the whole (K, S, A) table is one batched
    matmul; torch.nn.Linear's default init (uniform +-1/sqrt(fan_in))."""

    def __init__(self, K: int, S: int, A: int, hidden: int, generator: torch.Generator):
        def uniform(shape, fan_in):
            w = (torch.rand(*shape, generator=generator, dtype=DTYPE) * 2 - 1) / math.sqrt(fan_in)
            return w.to(NET_DTYPE).requires_grad_()
        self.params = [uniform((K, S, hidden), S), uniform((K, 1, hidden), S),
                       uniform((K, hidden, A), hidden), uniform((K, 1, A), hidden)]

    def table(self, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        W1, b1, W2, b2 = params if params is not None else self.params
        return torch.relu(W1 + b1) @ W2 + b2  # (K, S, A)

    def copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


class Adam:
    """torch.optim.Adam's update (betas .9/.999, eps 1e-8), written out: the first use of torch.optim
    imports a second of compiler machinery, more than this module's whole toy audit may take."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.params)
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(self.lr * (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps))


@dataclass
class QRun:
    """What train_q returns for K models."""

    q: torch.Tensor  # (K, S, A) the final online table
    history: torch.Tensor  # (L, K, S, A) snapshots every log_every steps
    steps: torch.Tensor  # (L,) the step of each snapshot


def train_q(data: Dataset, which: torch.Tensor, S: int, A: int, cfg: OfflineConfig, generator: torch.Generator,
            loss_fn: Callable, next_action: Callable | None = None,
            target_fn: Callable = double_dqn_target) -> QRun:
    """Offline Q-learning of K models, model k on data set which[k] (D, N) -> (K, N).

    loss_fn(q (K, N, A), actions (K, N), td_targets (K, N)) -> scalar, summed over models.
    next_action(next_q_online (K, N, A), k_next_states (K, N)) -> (K, N) the action the target uses
    (None: Double DQN's argmax). The target is target_fn with the online choice handed over as a
    one-hot, so that both choices go through the same kernel.
    """
    K, N = len(which), data.states.shape[1]
    net = MLPTable(K, S, A, cfg.hidden, generator)
    opt = Adam(net.params, lr=cfg.lr)
    base = (torch.arange(K) * S)[:, None]  # row offset of model k in the flattened (K * S, A) table
    ints = torch.stack([data.states, data.actions, data.next_states], -1)[which]  # (K, N, 3)
    floats = torch.stack([data.rewards, data.terminated], -1)[which].to(NET_DTYPE)  # (K, N, 2)
    history, steps = [], []
    for step in range(cfg.train_steps + 1):
        q_tab = net.table()
        if step % cfg.target_every == 0:
            target_tab = q_tab.detach().view(K * S, A)  # the target net: a frozen copy of the online one
        if step % cfg.log_every == 0:
            history.append(q_tab.detach().clone())
            steps.append(step)
        if step == cfg.train_steps:
            break
        pick = torch.randint(N, (K, cfg.batch_size, 1), generator=generator)  # a minibatch per model
        (s, a, s_next), (r, term) = ints.gather(1, pick.expand(-1, -1, 3)).unbind(-1), \
            floats.gather(1, pick.expand(-1, -1, 2)).flatten(0, 1).unbind(-1)
        with torch.no_grad():
            flat_next = (base + s_next).flatten()
            next_online, next_target = q_tab.detach().view(K * S, A)[flat_next], target_tab[flat_next]  # (K * B, A)
            if next_action is not None:
                chosen = next_action(next_online.view(K, -1, A), s_next)  # (K, B)
                next_online = F.one_hot(chosen.flatten(), A).to(NET_DTYPE)
            y = target_fn(r, next_online, next_target, term, cfg.gamma).view(K, -1)
        q = q_tab.view(K * S, A).index_select(0, (base + s).flatten()).view(K, -1, A)  # (K, B, A)
        loss = loss_fn(q, a, y)
        opt.step(loss)
    return QRun(q_tab.detach().to(DTYPE), torch.stack(history).to(DTYPE), torch.tensor(steps))


def train_bc(data: Dataset, S: int, A: int, cfg: OfflineConfig, generator: torch.Generator) -> torch.Tensor:
    """Behaviour cloning on each data set: (D, S, A) imitation logits, trained full-batch by d3rlpy's
    nll + beta * mean(logits^2). With a one-hot state the full-batch mean over the N transitions is a
    count-weighted sum over the table, so each step costs a table, not a data set."""
    D, N = data.states.shape
    counts = data.counts(S, A).to(NET_DTYPE)  # (D, S, A)
    visits = counts.sum(-1)  # (D, S)
    net = MLPTable(D, S, A, cfg.hidden, generator)
    opt = Adam(net.params, lr=cfg.lr)
    for _ in range(cfg.bc_steps):
        logits = net.table()  # (D, S, A)
        nll = -(counts * torch.log_softmax(logits, -1)).sum((1, 2)) / N  # (D,) mean over transitions
        l2 = (visits * (logits ** 2).mean(-1)).sum(-1) / N  # mean(logits^2) over the data's rows
        opt.step((nll + cfg.bc_beta * l2).sum())
    return net.table().detach().to(DTYPE)


# ---------------------------------------------------------------------------------------------------
# Measuring against the truth


def greedy(q: torch.Tensor) -> torch.Tensor:
    """(..., S, A) -> one-hot greedy policies (ties to the lowest action)."""
    return F.one_hot(q.argmax(-1), q.shape[-1]).to(DTYPE)


def policy_returns(env: OfflineEnv, policies: torch.Tensor) -> torch.Tensor:
    """Exact expected discounted return from the start state of each (S, A) policy in (..., S, A)."""
    flat = policies.reshape(-1, *policies.shape[-2:])
    values = torch.stack([evaluate_policy_exact(env.mdp.P, env.mdp.R, env.mdp.gamma, p) for p in flat])
    return (values @ env.mdp.start).view(policies.shape[:-2])


def unseen_gap(q: torch.Tensor, q_star: torch.Tensor, counts: torch.Tensor, terminal: torch.Tensor):
    """Q - Q* on the data's unseen actions: pairs (s, a) with s visited (and not terminal) but a never
    taken there. q (..., S, A), counts (..., S, A) -> (mean gap, max gap), each (...)."""
    visited = (counts.sum(-1, keepdim=True) > 0) & ~terminal[:, None]
    unseen = (visited & (counts == 0)).expand_as(q)
    gap = q - q_star
    n = unseen.sum((-2, -1)).clamp_min(1)
    mean = torch.where(unseen, gap, 0.0).sum((-2, -1)) / n
    worst = torch.where(unseen, gap, -math.inf).amax((-2, -1))
    return mean, worst


# ---------------------------------------------------------------------------------------------------
# The experiment's bookkeeping: which learner is which, and what a run measured


@dataclass(frozen=True)
class Learner:
    method: str  # "dqn" (the naive baseline), the method's own name ("cql", "bcq") or "sweep"
    knob: float  # the method's setting: CQL's alpha, BCQ's tau (0.0 for dqn)
    dataset: int  # index into QUALITIES


def learner_layout(method: str, knob: float, sweep: tuple[float, ...], replicates: int) -> list[Learner]:
    """Every learner of a run, replicates adjacent: naive DQN and the method on each data set, then the
    method's sweep over its knob on the medium data."""
    medium = QUALITIES.index("medium")
    groups = [Learner("dqn", 0.0, d) for d in range(len(QUALITIES))]
    groups += [Learner(method, knob, d) for d in range(len(QUALITIES))]
    groups += [Learner("sweep", k, medium) for k in sweep]
    return [m for m in groups for _ in range(replicates)]


@dataclass
class OfflineResult:
    env: OfflineEnv
    data: Dataset  # the three data sets, (3, N) each field
    behaviour: torch.Tensor  # (3, S, A) the behaviour policies
    counts: torch.Tensor  # (3, S, A) visits of each (s, a) in each data set
    bc_logits: torch.Tensor  # (3, S, A) behaviour cloning
    models: list[Learner]
    run: QRun  # every learner's Q table and its snapshots

    def select(self, method: str, dataset: int | None = None, knob: float | None = None) -> list[int]:
        return [k for k, m in enumerate(self.models) if m.method == method
                and (dataset is None or m.dataset == dataset) and (knob is None or m.knob == knob)]

    def policies_of(self, ks: list[int]) -> torch.Tensor:
        """(len(ks), S, A) the learners' policies: greedy in Q unless the method restricts the argmax."""
        return greedy(self.run.q[ks])

    def returns(self, ks: list[int]) -> float:
        """Mean exact return of the policies of learners ks."""
        return policy_returns(self.env, self.policies_of(ks)).mean().item()

    def gaps(self, ks: list[int], q: torch.Tensor | None = None):
        """(mean, max) of Q - Q* over each learner's unseen pairs: each (len(ks),)."""
        q = self.run.q[ks] if q is None else q
        counts = self.counts[[self.models[k].dataset for k in ks]]
        return unseen_gap(q, self.env.q_star, counts, self.env.mdp.terminal)

    def baseline_returns(self) -> dict[str, torch.Tensor]:
        """(3,) exact returns of the behaviour policies and of behaviour cloning's greedy policies."""
        return {"behaviour": policy_returns(self.env, self.behaviour),
                "bc": policy_returns(self.env, greedy(self.bc_logits))}

    def medium_returns(self, method: str) -> dict[str, float]:
        """Exact returns on the medium data: the method, naive DQN, behaviour cloning, the behaviour policy."""
        medium = QUALITIES.index("medium")
        base = self.baseline_returns()
        return {method: self.returns(self.select(method, medium)), "dqn": self.returns(self.select("dqn", medium)),
                "bc": base["bc"][medium].item(), "behaviour": base["behaviour"][medium].item()}
