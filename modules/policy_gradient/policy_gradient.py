"""Policy gradient: REINFORCE for sequences, checked against the exact gradient of an enumerable policy.

    Objective:       J(theta) = E_{y ~ pi_theta}[R(y)] = sum_y p_theta(y) R(y)
    Log-derivative:  grad J = E_y[ R(y) grad log p_theta(y) ],   log p_theta(y) = sum_t log pi(y_t | y_<t)
    Estimator:       g = (1/B) sum_i (R_i - b_i) sum_t mask_it grad log pi(y_it | y_i,<t)
    Reward-to-go:    g_rtg = (1/B) sum_i sum_t mask_it grad log pi(y_it | y_i,<t) (G_it - b_i),
                     G_it = sum_{k >= t} r_ik    (token t cannot change rewards paid before it)

A baseline b that does not depend on the sampled sequence adds no bias, because
E[grad log p(y)] = grad sum_y p(y) = 0; it cuts variance because it removes the part of R that every
sequence shares.

Builds on: advantage (the score-function estimator on an MDP; sample_categorical).
Deviations: the "language model" is a table of logits with one row per prefix (every prefix of content
tokens shorter than max_len), so the handful of possible sequences can be enumerated and J, grad J and
every estimator's exact mean and variance are sums over all of them. One prompt (the empty one);
no discount (gamma = 1). Everything is float64 so exact identities hold to 1e-12.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from modules.advantage import sample_categorical

__all__ = [
    "DTYPE", "FORMULAS", "ESTIMATORS", "PolicyGradientConfig", "reinforce_loss",
    "SequenceTask", "response_mask", "token_rewards", "enumerate_sequences", "prefix_ids",
    "token_logprobs", "sample_sequences", "Enumeration", "enumerate_task", "sequence_probs",
    "prefix_visits", "sequence_index", "expected_reward", "exact_gradient", "leave_one_out_baseline",
    "group_mean_baseline", "optimal_constant_baseline", "reward_to_go_loss", "per_sequence_gradients",
    "exact_moments", "Landscape", "random_landscape", "Rollouts", "sample_rollouts", "group_gradients",
    "TrainResult", "train", "PolicyGradientResult", "run",
]

DTYPE = torch.float64

FORMULAS = [
    ("Objective", r"$J(\theta)=\mathbb{E}_{y\sim\pi_\theta}[R(y)]=\sum_y p_\theta(y)\,R(y)$"),
    ("Log-derivative trick",
     r"$\nabla J=\mathbb{E}_y\left[R(y)\,\nabla\log p_\theta(y)\right],\quad "
     r"\log p_\theta(y)=\sum_t\log\pi_\theta(y_t|y_{<t})$"),
    ("REINFORCE loss",
     r"$L=-\frac{1}{B}\sum_i (R_i-b_i)\sum_t m_{i,t}\log\pi_\theta(y_{i,t}|y_{i,<t})$"),
    ("Baseline adds no bias", r"$\mathbb{E}_y[b\,\nabla\log p_\theta(y)]=b\,\nabla\sum_y p_\theta(y)=0$"),
    ("Leave-one-out (RLOO)", r"$b_i=\frac{1}{k-1}\sum_{j\neq i}R_j$"),
    ("Optimal constant baseline",
     r"$b^*=\mathbb{E}[R\,\|\nabla\log p\|^2]\,/\,\mathbb{E}[\|\nabla\log p\|^2]$"),
]

ESTIMATORS = ("no_baseline", "rloo", "rloo_reward_to_go")  # the sampled estimators compared


@dataclass(frozen=True)
class PolicyGradientConfig:
    vocab_size: int = 4  # V: tokens 0..V-2 are content tokens, token V-1 is EOS
    max_len: int = 4  # L: at most L tokens; an EOS (kept in the mask) may end a sequence earlier
    theta_scale: float = 0.5  # std of the random logits at which the estimators are compared
    group_size: int = 4  # k sequences per group for the leave-one-out and group-mean baselines
    n_groups: int = 2_000  # groups sampled to test the estimators (n_groups * group_size sequences)
    sample_temperature: float = 1.0  # rollout temperature; log-probs are taken at 1.0, so != 1 is a mismatch
    z_max: float = 5.0  # Monte-Carlo bound in standard errors (bounded per-group estimates, see the audit)
    min_visits: int = 500  # z-test only gradient components whose prefix is expected this often in the sample
    n_agents: int = 8  # learners per estimator in the closed loop (one tensor, no loop per agent)
    batch_size: int = 32  # sequences per gradient step and agent (RLOO baseline over that batch)
    train_steps: int = 150
    lr: float = 2.0  # gradient-ascent step on the logits
    # outcome bars, from `llmaudit sweep policy_gradient` (toy seeds 0-19, full seeds 0-4)
    min_variance_ratio: float = 3.0  # tr Cov(no baseline) / tr Cov(RLOO); worst seed 3.64 (toy), 3.72 (full)
    max_final_gap: float = 0.1  # the RLOO agents' mean (J* - J) / (J* - J_uniform) at the end; worst toy
    #                             seed 0.0075: the bar leaves room for one of 8 agents locked (+0.067)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "vocab_size": ">= 3", "max_len": ">= 2", "theta_scale": ">= 0", "group_size": ">= 2", "n_groups": ">= 256",
        "sample_temperature": "> 0", "z_max": "> 0", "min_visits": ">= 0", "n_agents": ">= 1", "batch_size": ">= 2",
        "train_steps": ">= 1", "lr": ">= 0", "min_variance_ratio": "> 0", "max_final_gap": ">= 0",
    }

    def __post_init__(self):
        if self.vocab_size < 3 or self.max_len < 2:
            raise ValueError("vocab_size must be >= 3 (two content tokens and EOS) and max_len >= 2")
        if (self.vocab_size - 1) ** self.max_len > 100_000:
            raise ValueError("too many sequences to enumerate: keep (vocab_size - 1) ** max_len <= 1e5")
        if self.group_size < 2 or self.batch_size < 2:
            raise ValueError("group_size and batch_size must be >= 2 (a leave-one-out mean needs others)")
        if self.n_groups < 256 or self.n_agents < 1 or self.train_steps < 1:
            raise ValueError("n_groups must be >= 256, n_agents and train_steps >= 1")
        if self.sample_temperature <= 0:
            raise ValueError("sample_temperature must be > 0")

    @classmethod
    def toy(cls) -> PolicyGradientConfig:
        return cls()

    @classmethod
    def full(cls) -> PolicyGradientConfig:
        # worst full seed 0.039 (seed 3: one of 16 agents locked at 0.53, the others at 0.005)
        return cls(n_groups=10_000, n_agents=16, train_steps=200, max_final_gap=0.05)


# ---------------------------------------------------------------------------------------------------
# Kernel


def reinforce_loss(logprobs: torch.Tensor, rewards: torch.Tensor, baseline: float | torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE surrogate loss for sampled sequences; minus its gradient is the policy-gradient estimate.

        L = -(1/B) * sum_i (R_i - b_i) * sum_t mask[i,t] * logprobs[i,t],   with (R_i - b_i) detached,

    so -grad L = (1/B) sum_i (R_i - b_i) grad log pi(y_i), log pi(y_i) = sum_t log pi(y_t | y_<t).
    Tokens are summed within a sequence (not averaged over its length) and sequences are averaged
    over the batch: that is the unbiased estimate of grad E[R]. Positions with mask 0 (after EOS,
    padding) hold arbitrary finite numbers and must change neither the loss nor its gradient.
    No gradient flows into rewards or baseline (a learned baseline must not be trained by this loss).

    logprobs: (B, T) float, log pi(y_t | y_<t) of the sampled tokens (requires grad);
    rewards:  (B,) float, one reward per sequence;
    baseline: a float, a 0-dim tensor, or a (B,) tensor (one baseline per sequence);
    mask:     (B, T) bool or 0/1 float, 1 = a generated token (EOS included)
    ->  0-dim tensor, the loss.
    Example: logprobs [[-1, -2], [-0.5, 9]], mask [[1, 1], [1, 0]], rewards [2, 0], baseline 1
             ->  -((2-1)*(-3) + (0-1)*(-0.5)) / 2 = 1.25
    """
    advantage = (rewards - baseline).detach()  # (B,): a constant weight, no gradient into R or b
    seq_logprob = torch.where(mask.bool(), logprobs, 0.0).sum(-1)  # (B,) log pi(y_i)
    return -(advantage * seq_logprob).mean()


# ---------------------------------------------------------------------------------------------------
# The task: "count up". Content tokens 0..C-1, EOS = C. A token earns 1 when it is a content token
# larger than the content token before it, and the EOS earns 1 for stopping. With C = 3, L = 4 the best
# sequence is 0 1 2 EOS (R = 3).


@dataclass(frozen=True)
class SequenceTask:
    vocab_size: int
    max_len: int

    @property
    def eos(self) -> int:
        return self.vocab_size - 1

    @property
    def n_content(self) -> int:
        return self.vocab_size - 1

    @property
    def n_prefixes(self) -> int:
        """Rows of the logit table: every content prefix of length 0 .. max_len - 1."""
        return sum(self.n_content ** t for t in range(self.max_len))


def response_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (the EOS itself is a generated token).
    tokens: (B, T) long  ->  (B, T) float."""
    is_eos = (tokens == eos).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).to(DTYPE)


def token_rewards(tokens: torch.Tensor, mask: torch.Tensor, eos: int) -> torch.Tensor:
    """r_t = 1 if token t is a content token larger than the content token before it, 1 if it is the
    (first) EOS, else 0; zero where mask is 0. tokens, mask: (B, T)  ->  (B, T) float; R = r.sum(-1)."""
    content = tokens != eos
    up = torch.zeros_like(content)
    up[:, 1:] = content[:, 1:] & content[:, :-1] & (tokens[:, 1:] > tokens[:, :-1])
    return (up | ~content).to(DTYPE) * mask


def enumerate_sequences(task: SequenceTask) -> torch.Tensor:
    """Every distinct sequence once: k content tokens then EOS (k < L), or L content tokens.
    Positions after the EOS are filled with EOS (masked out). -> (N, L) long."""
    L, C = task.max_len, task.n_content
    rows = []
    for k in range(L + 1):
        for content in itertools.product(range(C), repeat=k):
            rows.append(list(content) + [task.eos] * (L - k))
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# The policy: one row of logits per prefix (a tabular autoregressive model)


def prefix_ids(tokens: torch.Tensor, task: SequenceTask) -> torch.Tensor:
    """Row of the logit table that predicts token t: the index of the prefix y_<t among all prefixes
    (length-t prefixes start at offset sum_{s<t} C^s, then base-C digits). Positions after an EOS get
    some valid row: their log-probs are garbage that the mask must remove. (B, T) -> (B, T) long."""
    C = task.n_content
    ids = torch.empty_like(tokens)
    running = torch.zeros_like(tokens[:, 0])  # index of y_<t among the length-t prefixes
    offset = 0
    for t in range(tokens.shape[1]):
        ids[:, t] = offset + running
        offset += C ** t
        running = running * C + tokens[:, t].clamp_max(C - 1)
    return ids


def token_logprobs(table: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | y_<t) = log_softmax(table[prefix row])[y_t]. table: (rows, V); tokens, ids: (B, T)
    -> (B, T), differentiable with respect to table."""
    logp = torch.log_softmax(table[ids], dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


@torch.no_grad()
def sample_sequences(table: torch.Tensor, blocks: torch.Tensor, task: SequenceTask,
                     generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Roll out len(blocks) sequences at once, token by token. Sequence i reads the logit table of
    block blocks[i] (rows blocks[i] * n_prefixes ...), so many policies sample in one call.
    After an EOS the sequence keeps emitting EOS (masked later). -> (B, L) long tokens."""
    B, L, C, P = blocks.shape[0], task.max_len, task.n_content, task.n_prefixes
    tokens = torch.full((B, L), task.eos, dtype=torch.long)
    alive = torch.ones(B, dtype=torch.bool)
    running = torch.zeros(B, dtype=torch.long)
    base, offset = blocks * P, 0
    for t in range(L):
        probs = torch.softmax(table[base + offset + running] / temperature, dim=-1)  # (B, V)
        token = torch.where(alive, sample_categorical(probs, generator), task.eos)
        tokens[:, t] = token
        alive &= token != task.eos
        offset += C ** t
        running = running * C + token.clamp_max(C - 1)
    return tokens


# ---------------------------------------------------------------------------------------------------
# Exact quantities by enumeration


@dataclass(frozen=True)
class Enumeration:
    task: SequenceTask
    tokens: torch.Tensor  # (N, L) every sequence
    mask: torch.Tensor  # (N, L)
    token_rewards: torch.Tensor  # (N, L)
    rewards: torch.Tensor  # (N,) R(y)
    ids: torch.Tensor  # (N, L) prefix rows


def enumerate_task(task: SequenceTask) -> Enumeration:
    tokens = enumerate_sequences(task)
    mask = response_mask(tokens, task.eos)
    r = token_rewards(tokens, mask, task.eos)
    return Enumeration(task, tokens, mask, r, r.sum(-1), prefix_ids(tokens, task))


def sequence_probs(table: torch.Tensor, enum: Enumeration) -> torch.Tensor:
    """p(y) = prod_t pi(y_t | y_<t) over the masked tokens, for every enumerated y.
    table: (n_prefixes, V) or (A * n_prefixes, V) for A policies  ->  (N,) or (A, N)."""
    P = enum.task.n_prefixes
    A = table.shape[0] // P
    ids = enum.ids[None] + (torch.arange(A) * P)[:, None, None]  # (A, N, L)
    logp = token_logprobs(table, enum.tokens.expand(A, -1, -1), ids)
    probs = (logp * enum.mask).sum(-1).exp()  # (A, N)
    return probs[0] if A == 1 else probs


def prefix_visits(probs: torch.Tensor, enum: Enumeration) -> torch.Tensor:
    """Expected number of times each row of the table is used per sampled sequence:
    sum_y p(y) #{t : mask_t(y) = 1, prefix row of y_<t = row}. probs: (N,)  ->  (n_prefixes,)."""
    used = (probs[:, None] * enum.mask).flatten()
    return torch.zeros(enum.task.n_prefixes, dtype=DTYPE).index_add_(0, enum.ids.flatten(), used)


def sequence_index(tokens: torch.Tensor, enum: Enumeration) -> torch.Tensor:
    """Row of enum.tokens equal to each sampled sequence (positions after EOS hold EOS in both).
    tokens: (B, L) -> (B,) long."""
    place = enum.task.vocab_size ** torch.arange(enum.task.max_len)
    codes = (enum.tokens * place).sum(-1)
    order = codes.argsort()
    return order[torch.searchsorted(codes[order], (tokens * place).sum(-1))]


def expected_reward(table: torch.Tensor, enum: Enumeration) -> torch.Tensor:
    """J = sum_y p(y) R(y), exact and differentiable; (A,) for A stacked policies."""
    return sequence_probs(table, enum) @ enum.rewards


def exact_gradient(table: torch.Tensor, enum: Enumeration) -> torch.Tensor:
    """grad J by autograd through the exact sum over all sequences. -> same shape as table."""
    table = table.detach().clone().requires_grad_(True)
    return torch.autograd.grad(expected_reward(table, enum), table)[0]


# ---------------------------------------------------------------------------------------------------
# Baselines (rewards grouped as (G, k): k sequences sampled for the same prompt)


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: b_i = mean of the other k - 1 rewards of the group; independent of y_i, so unbiased.
    (G, k) -> (G, k)."""
    k = rewards.shape[-1]
    return (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def group_mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """The plain group mean, which includes R_i itself: E[g] shrinks to (k - 1)/k grad J. (G, k) -> (G, k)."""
    return rewards.mean(-1, keepdim=True).expand_as(rewards)


def optimal_constant_baseline(probs: torch.Tensor, rewards: torch.Tensor, scores: torch.Tensor) -> float:
    """The constant b minimising the trace of the covariance of (R - b) grad log p(y):
    b* = E[R |s|^2] / E[|s|^2], s = grad log p(y). Minimising E|(R - b) s|^2 minimises the variance
    only because E[s] = 0 makes the mean E[(R - b) s] independent of b.
    probs, rewards: (N,), scores: (N, D)."""
    sq = (scores ** 2).sum(-1)
    return ((probs * rewards * sq).sum() / (probs * sq).sum()).item()


# ---------------------------------------------------------------------------------------------------
# Estimators through the kernel


def reward_to_go_loss(logprobs: torch.Tensor, token_rewards: torch.Tensor, baseline: float | torch.Tensor,
                      mask: torch.Tensor, loss_fn: Callable = reinforce_loss) -> torch.Tensor:
    """-(1/B) sum_i sum_t mask_it logprobs_it (G_it - b_i) with G_it = sum_{k>=t} r_ik, written with the
    sequence-level loss: reward r_k credits only the tokens 0..k, i.e. it is a sequence reward for the
    prefix mask (t <= k), and the baseline multiplies the whole sequence as before.
    logprobs, token_rewards, mask: (B, T)  ->  0-dim loss."""
    T = logprobs.shape[1]
    upto = torch.tril(torch.ones(T, T, dtype=mask.dtype))  # upto[k, t] = 1 if t <= k
    loss = loss_fn(logprobs, torch.zeros_like(token_rewards[:, 0]), baseline, mask)
    for k in range(T):
        loss = loss + loss_fn(logprobs, token_rewards[:, k], 0.0, mask * upto[k])
    return loss


def per_sequence_gradients(table: torch.Tensor, tokens: torch.Tensor, task: SequenceTask,
                           surrogate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One gradient-ascent sample per sequence, (N, n_prefixes * V), from a batch-mean surrogate loss
    such as lambda logprobs: reinforce_loss(logprobs, R, b, mask). Sequence i reads its own copy of the
    table, so one backward pass puts sequence i's gradient (times 1/N) in block i."""
    N, (P, V) = tokens.shape[0], table.shape
    big = table.detach().repeat(N, 1).requires_grad_(True)  # (N * P, V)
    ids = prefix_ids(tokens, task) + (torch.arange(N) * P)[:, None]
    (grad,) = torch.autograd.grad(surrogate(token_logprobs(big, tokens, ids)), big)
    return -grad.reshape(N, P * V) * N  # minus: the loss descends, the estimate ascends


def exact_moments(probs: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean and trace of the covariance of a one-sequence estimator whose value on sequence y is
    samples[y], under y ~ p: (sum_y p g, sum_y p |g|^2 - |sum_y p g|^2). probs (N,), samples (N, D)."""
    mean = probs @ samples
    return mean, ((probs * (samples ** 2).sum(-1)).sum() - (mean ** 2).sum()).item()


# ---------------------------------------------------------------------------------------------------
# The estimators at one random policy: the exact truth, and samples of every estimator


@dataclass(frozen=True)
class Landscape:
    """A random policy of the enumerable task with its exact J and grad J: the ground truth."""

    enum: Enumeration
    theta: torch.Tensor  # (n_prefixes, V) logits
    probs: torch.Tensor  # (N,) p(y) of every sequence
    J: float  # sum_y p(y) R(y)
    grad: torch.Tensor  # (n_prefixes * V,) exact grad J, by autograd through the exact sum


def random_landscape(cfg: PolicyGradientConfig, generator: torch.Generator) -> Landscape:
    """theta ~ theta_scale * N(0, 1) on the task of cfg, with p(y), J and grad J by enumeration."""
    enum = enumerate_task(SequenceTask(cfg.vocab_size, cfg.max_len))
    theta = cfg.theta_scale * torch.randn(enum.task.n_prefixes, cfg.vocab_size, generator=generator, dtype=DTYPE)
    probs = sequence_probs(theta, enum)
    return Landscape(enum, theta, probs, (probs @ enum.rewards).item(), exact_gradient(theta, enum).flatten())


@dataclass(frozen=True)
class Rollouts:
    tokens: torch.Tensor  # (B, L) sampled sequences, grouped as (G, k) in row order
    mask: torch.Tensor  # (B, L) response mask (EOS included)
    token_rewards: torch.Tensor  # (B, L)
    rewards: torch.Tensor  # (B,) R(y)


def sample_rollouts(land: Landscape, n: int, generator: torch.Generator, temperature: float = 1.0) -> Rollouts:
    """n sequences from the landscape's policy (at `temperature`), with masks and rewards."""
    task = land.enum.task
    tokens = sample_sequences(land.theta, torch.zeros(n, dtype=torch.long), task, generator, temperature)
    mask = response_mask(tokens, task.eos)
    r = token_rewards(tokens, mask, task.eos)
    return Rollouts(tokens, mask, r, r.sum(-1))


def group_gradients(land: Landscape, ro: Rollouts, group_size: int,
                    loss_fn: Callable = reinforce_loss) -> dict[str, torch.Tensor]:
    """One gradient estimate per group of k sequences (the group's batch mean) for each estimator:
    no baseline, RLOO, RLOO with reward-to-go, and the plain group mean. name -> (G, n_prefixes * V)."""
    G, k = ro.rewards.shape[0] // group_size, group_size
    rewards, mask = ro.rewards, ro.mask
    loo = leave_one_out_baseline(rewards.view(G, k)).reshape(-1)
    group_mean = group_mean_baseline(rewards.view(G, k)).reshape(-1)
    surrogates = {
        "no_baseline": lambda x: loss_fn(x, rewards, 0.0, mask),
        "rloo": lambda x: loss_fn(x, rewards, loo, mask),
        "rloo_reward_to_go": lambda x: reward_to_go_loss(x, ro.token_rewards, loo, mask, loss_fn),
        "group_mean": lambda x: loss_fn(x, rewards, group_mean, mask),
    }
    return {name: per_sequence_gradients(land.theta, ro.tokens, land.enum.task, f).view(G, k, -1).mean(1)
            for name, f in surrogates.items()}


# ---------------------------------------------------------------------------------------------------
# The closed loop: stochastic gradient ascent on J, many agents at once


@dataclass
class TrainResult:
    J: torch.Tensor  # (steps + 1, 2, n_agents) exact J before each step and at the end: [:, 0] RLOO,
    #                  [:, 1] no baseline
    J_exact_ascent: torch.Tensor  # (steps + 1,) the same step size with the exact gradient
    batch_reward: torch.Tensor  # (steps, 2) mean sampled reward of the batch per estimator
    batch_reward_std: torch.Tensor  # (steps, 2)
    J_uniform: float  # J of the uniform policy (all logits 0, where every agent starts)
    J_star: float  # max_y R(y): a deterministic policy emitting the best sequence

    @property
    def normalized(self) -> torch.Tensor:
        """(J - J_uniform) / (J* - J_uniform): 0 at the start, 1 at the optimum."""
        return (self.J - self.J_uniform) / (self.J_star - self.J_uniform)


def train(enum: Enumeration, cfg: PolicyGradientConfig, generator: torch.Generator, *,
          loss_fn: Callable = reinforce_loss, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """theta <- theta - lr * grad loss for 2 * n_agents agents from theta = 0: the first n_agents
    subtract the leave-one-out baseline over their batch, the others no baseline. Agent a owns rows
    a * n_prefixes ... of one stacked table; one rollout and one kernel call serve every agent."""
    task, M, n = enum.task, cfg.n_agents, cfg.batch_size
    P, V, A = task.n_prefixes, task.vocab_size, 2 * cfg.n_agents
    table = torch.zeros(A * P, V, dtype=DTYPE)
    exact = torch.zeros(P, V, dtype=DTYPE)
    blocks = torch.arange(A).repeat_interleave(n)  # (A * n,) the agent of each sequence
    uses_baseline = (torch.arange(A) < M).to(DTYPE)[:, None]  # (A, 1)
    J, J_exact, reward_mean, reward_std = [], [], [], []
    for step in range(cfg.train_steps + 1):
        with torch.no_grad():
            J.append(expected_reward(table, enum))
            J_exact.append(expected_reward(exact, enum))
        if step == cfg.train_steps:
            break
        tokens = sample_sequences(table, blocks, task, generator, cfg.sample_temperature)
        mask = response_mask(tokens, task.eos)
        rewards = token_rewards(tokens, mask, task.eos).sum(-1)  # (A * n,)
        baseline = (leave_one_out_baseline(rewards.view(A, n)) * uses_baseline).reshape(-1)
        theta = table.requires_grad_(True)
        logprobs = token_logprobs(theta, tokens, prefix_ids(tokens, task) + (blocks * P)[:, None])
        (grad,) = torch.autograd.grad(loss_fn(logprobs, rewards, baseline, mask), theta)
        # the kernel averages over all A * n sequences; an agent's own batch mean is A times its block
        table = (table - cfg.lr * A * grad).detach()
        exact = exact + cfg.lr * exact_gradient(exact, enum)
        per_agent = rewards.view(2, M * n)
        reward_mean.append(per_agent.mean(-1))
        reward_std.append(per_agent.std(-1))
        if on_step is not None:
            on_step(step)
    return TrainResult(J=torch.stack(J).view(-1, 2, M), J_exact_ascent=torch.stack(J_exact),
                       batch_reward=torch.stack(reward_mean), batch_reward_std=torch.stack(reward_std),
                       J_uniform=J[0][0].item(), J_star=enum.rewards.max().item())


@dataclass
class PolicyGradientResult:
    landscape: Landscape  # the random policy and its exact J, grad J
    groups: dict[str, torch.Tensor]  # sampled per-group gradient estimates of each estimator
    train: TrainResult  # the closed loop


def run(cfg: PolicyGradientConfig, generator: torch.Generator, *,
        reinforce_loss: Callable = reinforce_loss) -> PolicyGradientResult:
    """The day's experiment: sample every estimator at random logits (compare with landscape.grad),
    then climb J by stochastic gradient ascent with and without a baseline."""
    land = random_landscape(cfg, generator)
    ro = sample_rollouts(land, cfg.n_groups * cfg.group_size, generator, cfg.sample_temperature)
    groups = group_gradients(land, ro, cfg.group_size, reinforce_loss)
    return PolicyGradientResult(land, groups, train(land.enum, cfg, generator, loss_fn=reinforce_loss))
