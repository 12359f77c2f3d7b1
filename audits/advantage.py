"""Audit of the advantage module (day 3): the policy gradient theorem, the score-function estimator,
and why a baseline V(s) and the advantage A = Q - V keep it unbiased while cutting its variance."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules import advantage as M
from modules.mdp import TabularMDP, evaluate_policy_exact, q_from_v, random_mdp

REWARD_SHIFT = 5.0  # the constant added to every reward in the shift-invariance check
OFFSET_SWEEP = (0.0, 1.0, 2.0, 4.0, 8.0)  # reward offsets for the variance-vs-offset curve
SWEEP_EPISODES = 4_000  # episodes reused for each point of that curve
BATCH_SIZES = (1, 4, 16, 64, 256, 1024)  # batch sizes for the MSE-vs-batch-size curve
EXACT_TOL = 1e-10  # float64 linear solves on ~13 states


def _example_returns() -> dict:
    return {"rewards": torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]], dtype=M.DTYPE), "gamma": 0.9}


def _example_advantage() -> dict:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 3, generator=g, dtype=M.DTYPE), -1)
    return {"q": torch.randn(4, 3, generator=g, dtype=M.DTYPE), "probs": probs}


def _example_exact() -> dict:
    g = torch.Generator().manual_seed(0)
    m = M.layered_mdp(2, 2, 3, 0.9, 1.0, 1.0, g)
    return {"P": m.P, "R": m.R, "gamma": m.gamma, "start": m.start,
            "theta": torch.randn(m.n_states, m.n_actions, generator=g, dtype=M.DTYPE)}


def _example_estimate() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"theta": torch.randn(5, 3, generator=g, dtype=M.DTYPE),
            "states": torch.randint(0, 5, (8, 2), generator=g),
            "actions": torch.randint(0, 3, (8, 2), generator=g),
            "weights": torch.randn(8, 2, generator=g, dtype=M.DTYPE)}


KERNELS = [
    kernel(M.discounted_returns, example=_example_returns,
           hint="run backwards: G_t = r_t + gamma * G_{t+1}, starting from 0 after the last step."),
    kernel(M.advantage_from_q, example=_example_advantage,
           hint="V(s) is the pi-weighted mean of Q(s, .), not the plain mean over actions or the max."),
    kernel(M.exact_policy_gradient, example=_example_exact,
           hint="dJ/dtheta[s,a] = d(s) pi(a|s) (Q(s,a) - V(s)) with the discounted visitation "
                "d = start^T (I - gamma P_pi)^-1 (a transpose solve, not the uniform distribution)."),
    kernel(M.policy_gradient_estimate, example=_example_estimate,
           hint="grad_theta[s] log softmax(theta[s])[a] = onehot(a) - pi(.|s): subtract pi, and add "
                "(index_add) into row s, since a state can appear many times."),
]

adv = Audit("advantage", day=3, title="Advantage and baselines: why Q - V reduces variance",
            config=M.AdvantageConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=M.DTYPE)


def _grad_of(exact_policy_gradient, mdp: TabularMDP, theta: torch.Tensor) -> torch.Tensor:
    return exact_policy_gradient(mdp.P, mdp.R, mdp.gamma, mdp.start, theta)


# ---- the task and one random policy, with its exact values and gradient ------------------------------

@adv.fixture
def policy(cfg, g):
    """The layered MDP (4 layers x 3 states, 3 actions, gamma 0.9) and logits theta ~ N(0, 1)."""
    return M.random_test_policy(cfg, g)


@adv.fixture
def episodes(cfg, g, policy):
    """n_episodes rollouts of the test policy: states, actions (N, T) and noisy rewards (N, T)."""
    s0 = M.sample_categorical(policy.mdp.start.expand(cfg.n_episodes, -1), g)
    return M.sample_episodes(policy.mdp, policy.probs, s0, cfg.n_layers, cfg.reward_noise, g)


@adv.fixture
def returns(cfg, episodes, discounted_returns):
    return discounted_returns(episodes[2], cfg.gamma)


@adv.fixture
def advantages(policy, advantage_from_q):
    return advantage_from_q(policy.Q, policy.probs)


# ---- exact math -------------------------------------------------------------------------------------

@adv.check("< 1e-12", hint="loop backwards over time with a running sum; start from 0 after the last step.")
def discounted_returns_satisfy_recursion(cfg, episodes, returns, discounted_returns):
    """The return-to-go is the discounted sum of the rewards from step t on: [1, 1, 1] at gamma 0.9 gives
    [2.71, 1.9, 1.0], and on every sampled episode G_t = r_t + gamma G_{t+1} with G_T = 0."""
    hand = discounted_returns(_t([[1.0, 1.0, 1.0]]), 0.9)
    rewards, G = episodes[2], returns
    next_G = torch.cat([G[:, 1:], torch.zeros_like(G[:, :1])], dim=1)
    return [max_error(hand, _t([[2.71, 1.9, 1.0]])), max_error(G, rewards + cfg.gamma * next_G)]


@adv.check(f"< {EXACT_TOL}", hint="V(s) = sum_a pi(a|s) Q(s,a): weight by the policy, do not take the plain "
                                  "mean or max.")
def advantage_is_q_minus_v(policy, advantages):
    """The advantage says how much better action a is than the policy's average action in s:
    A(s,a) = Q(s,a) - V(s) with V(s) = E_pi[Q(s,a)] (compared with V^pi from the linear solve)."""
    return max_error(advantages, policy.Q - policy.V[:, None])


@adv.check(f"< {EXACT_TOL}", hint="subtract the pi-weighted mean of Q over actions, broadcast over the action "
                                  "axis.")
def advantage_has_zero_mean_under_policy(policy, advantages, advantage_from_q, g):
    """On average over its own actions the policy is exactly as good as itself, so E_pi[A] = 0 in every
    state: the advantage only ranks actions, it carries no state-level offset (any Q, any pi)."""
    q = 3.0 * torch.randn(7, 4, generator=g, dtype=M.DTYPE)
    probs = torch.softmax(2.0 * torch.randn(7, 4, generator=g, dtype=M.DTYPE), -1)
    return [(policy.probs * advantages).sum(-1).abs(), (probs * advantage_from_q(q, probs)).sum(-1).abs()]


@adv.check(f"< {EXACT_TOL}", hint="d is the discounted visitation start^T (I - gamma P_pi)^-1 and the weight "
                                  "is Q - V.")
def policy_gradient_theorem_matches_autograd(exact_policy_gradient, policy, g):
    """The policy gradient theorem gives dJ/dtheta[s,a] = d(s) pi(a|s) A(s,a) without differentiating
    through the dynamics; it equals autograd of the exact J(theta), on the layered task and on a dense MDP."""
    dense = random_mdp(6, 3, 0.8, g)
    dense_theta = torch.randn(6, 3, generator=g, dtype=M.DTYPE)
    return [max_error(_grad_of(exact_policy_gradient, policy.mdp, policy.theta), policy.grad),
            max_error(_grad_of(exact_policy_gradient, dense, dense_theta),
                      M.autograd_policy_gradient(dense, dense_theta))]


@adv.check(f"< {EXACT_TOL}", hint="a one-state bandit that loops forever is visited 1 / (1 - gamma) times: "
                                  "d(s) is a discounted count, not a probability.")
def exact_gradient_matches_bandit_closed_form(exact_policy_gradient):
    """One state looping on itself with rewards r = [1, 0, 2], pi = [.5, .25, .25], gamma = 0.9: V = pi.r
    / (1 - gamma) = 10, d = 10, so dJ/dtheta = d pi (r - pi.r) = [0, -2.5, 2.5]."""
    P = torch.ones(1, 3, 1, dtype=M.DTYPE)
    theta = torch.log(_t([[0.5, 0.25, 0.25]]))
    grad = exact_policy_gradient(P, _t([[1.0, 0.0, 2.0]]), 0.9, _t([1.0]), theta)
    return max_error(grad, _t([[0.0, -2.5, 2.5]]))


@adv.check(f"< {EXACT_TOL}", hint="weight by A = Q - V, not by Q: Q still carries V(s), which is not zero.")
def exact_gradient_vanishes_when_actions_do_not_matter(exact_policy_gradient, g):
    """If neither the reward nor the next state depends on the action, every action is as good as the
    average (A = 0), so J does not depend on theta and the exact gradient is 0, whatever V is."""
    base = random_mdp(6, 3, 0.9, g)
    P = base.P[:, :1].expand(-1, 3, -1).contiguous()  # (S, A, S): action 0's row for every action
    R = 2.0 + base.R[:, :1].expand(-1, 3).contiguous()  # positive values, the same for every action
    theta = torch.randn(6, 3, generator=g, dtype=M.DTYPE)
    return max_error(exact_policy_gradient(P, R, base.gamma, base.start, theta), torch.zeros(6, 3, dtype=M.DTYPE))


@adv.check("< 1e-12", hint="subtract pi(.|s) from the one-hot action, and accumulate rows with index_add.")
def policy_gradient_estimate_matches_autograd(policy_gradient_estimate, policy, episodes, g):
    """For a softmax policy grad_theta[s] log pi(a|s) = onehot(a) - pi(.|s), so REINFORCE is the weighted
    sum of these rows: the same as backpropagating mean(sum_t w_t log pi(a_t|s_t)) (states repeat)."""
    n, T = 64, episodes[0].shape[1]
    states, actions = episodes[0][:n], episodes[1][:n]
    w = torch.randn(n, T, generator=g, dtype=M.DTYPE)
    th = policy.theta.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad((w * torch.log_softmax(th, -1)[states, actions]).sum() / n, th)
    return max_error(policy_gradient_estimate(policy.theta, states, actions, w), auto)


@adv.check("< 1e-12", hint="the score must be onehot(a) - pi(.|s); without the -pi it has mean pi, not 0.")
def score_function_has_zero_mean(policy_gradient_estimate, policy):
    """E_{a~pi}[grad log pi(a|s)] = grad sum_a pi(a|s) = grad 1 = 0, which is why subtracting any baseline
    b(s) leaves the policy gradient unbiased (each (s, a) weighted by pi(a|s), the exact expectation)."""
    S, A = policy.probs.shape
    every_s = torch.arange(S).repeat_interleave(A)[:, None]  # (S*A, 1): each (s, a) pair once
    every_a = torch.arange(A).repeat(S)[:, None]
    pi_w = policy.probs[every_s, every_a]
    return policy_gradient_estimate(policy.theta, every_s, every_a, pi_w).abs() * S * A


@adv.check({"baseline": "< 1e-9", "advantage": "< 1e-9"},
           hint="the returns must be discounted exactly as V is; gamma ignored in G_t breaks it.")
def baseline_gradient_is_invariant_to_reward_shift(cfg, policy, episodes, discounted_returns, advantage_from_q,
                                                   policy_gradient_estimate):
    """Adding c to every reward shifts G_t and V(s_t) by the same amount, so G - V (and A) is unchanged
    and so is the sampled gradient; without a baseline the estimate moves."""
    states, actions, rewards = (x[:SWEEP_EPISODES] for x in episodes)
    grads = []
    for c in (0.0, REWARD_SHIFT):
        m = M.shift_rewards(policy.mdp, c)
        V = evaluate_policy_exact(m.P, m.R, m.gamma, policy.probs)
        A = advantage_from_q(q_from_v(m.P, m.R, m.gamma, V), policy.probs)
        weights = M.estimator_weights(discounted_returns(rewards + c, cfg.gamma), states, actions, V, A,
                                      cfg.gamma, cfg.weight_by_gamma_t)
        grads.append({name: policy_gradient_estimate(policy.theta, states, actions, w) for name, w in weights.items()})
    change = {name: max_error(grads[0][name], grads[1][name]) for name in M.ESTIMATORS}
    return measure({"baseline": change["baseline"], "advantage": change["advantage"]},
                   f"+{REWARD_SHIFT:g} on every reward; REINFORCE moves by {change['reinforce']:.3g}")


# ---- Monte-Carlo: unbiasedness and variance of the three estimators --------------------------------

@adv.check("<= z_max", kind="outcome", hint="G_0 discounts step t by gamma^t; an undiscounted sum overshoots J.")
def mean_return_matches_exact_J(policy, returns):
    """J(theta) = sum_s start(s) V^pi(s) is the expected discounted return, so the sampled G_0 (bounded
    rewards plus Gaussian noise: light tails) averages to it within its standard error."""
    G0 = returns[:, 0]
    mean, se = G0.mean().item(), (G0.std() / math.sqrt(G0.numel())).item()
    return measure(abs(mean - policy.J) / se, f"{mean:.4f} ± {se:.4f} vs J = {policy.J:.4f}")


@adv.fixture(cost=2)
def samples(cfg, policy, episodes, returns, advantages, policy_gradient_estimate):
    """(N, S, A): one gradient per episode for REINFORCE, the V(s) baseline and the advantage."""
    return M.estimator_samples(policy_gradient_estimate, policy.theta, episodes[0], episodes[1], returns,
                               policy.V, advantages, cfg.gamma, cfg.weight_by_gamma_t)


@adv.check({"max_z": "<= z_max", "unvisited_rows": "< 1e-12"}, kind="outcome",
           hint="weight step t by gamma^t (the discounted objective) and use reward-to-go, not the whole-episode "
                "return; the score must be onehot(a) - pi(.|s).")
def estimators_are_unbiased(cfg, policy, samples):
    """REINFORCE, the V(s) baseline and the true advantage all average to the exact policy gradient: a
    state-only baseline has zero-mean score, and E[G_t | s_t, a_t] = Q(s_t, a_t). Per-episode estimates have
    light tails, so |mean - exact| / SE is normal on the rows of states visited often enough."""
    visits = M.expected_visits(policy.mdp, policy.probs, cfg.n_layers) * cfg.n_episodes  # exact, not sampled
    tested, unvisited = visits >= cfg.min_visits, visits == 0
    zs, flat = [], []
    for name in M.ESTIMATORS:
        grads = samples[name]
        mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
        zs.append(((mean - policy.grad) / se)[tested].abs())
        flat.append(max_error(mean[unvisited], policy.grad[unvisited]))
    return measure({"max_z": torch.cat(zs), "unvisited_rows": flat},
                   f"{len(M.ESTIMATORS)} estimators x {int(tested.sum()) * policy.probs.shape[1]} components")


@adv.check({"reinforce_over_baseline": ">= min_variance_ratio_baseline",
            "baseline_over_advantage": ">= min_variance_ratio_advantage"}, kind="outcome",
           hint="the advantage weight must be Q - V, not Q: Q still carries the large V(s) offset.")
def variance_decreases_reinforce_baseline_advantage(samples):
    """The baseline removes the action-independent part of the return and the advantage also removes the
    noise of the rest of the episode, so each step shrinks tr Cov of the per-episode gradient."""
    trace = {name: grads.var(0).sum().item() for name, grads in samples.items()}
    return measure({"reinforce_over_baseline": trace["reinforce"] / trace["baseline"],
                    "baseline_over_advantage": trace["baseline"] / trace["advantage"]},
                   f"tr Cov {trace['reinforce']:.3g} > {trace['baseline']:.3g} > {trace['advantage']:.3g}")


# ---- closed loop: stochastic gradient ascent with each estimator ----------------------------------

@adv.fixture(cost=3)
def loop(cfg, g, policy, discounted_returns, advantage_from_q, policy_gradient_estimate):
    """n_agents agents per estimator climb J from the uniform policy (theta = 0), 16 episodes a step."""
    return M.train(policy.mdp, cfg, g, returns_fn=discounted_returns, advantage_fn=advantage_from_q,
                   estimate_fn=policy_gradient_estimate)


@adv.check("<= max_final_gap", kind="outcome", hint="ascend (theta += lr * g), and weight by A = Q - V with the "
                                                   "sign kept.")
def gradient_ascent_with_advantage_reaches_optimum(loop):
    """Following the advantage-weighted gradient climbs J(theta) from the uniform policy to nearly the
    optimum of value iteration: (J* - J) / (J* - J_uniform), 1 at the start, ends near 0 for every agent."""
    gap = 1.0 - loop.normalized[-1, M.ESTIMATORS.index("advantage")]
    return measure(gap, f"worst of {gap.numel()} agents (mean gap {gap.mean().item():.3f})")


@adv.check(">= min_speedup", kind="outcome",
           hint="the advantage estimator must be unbiased and low-variance: A = Q - V, times gamma^t.")
def advantage_needs_fewer_episodes_than_reinforce(cfg, loop):
    """With the same step size, lower-variance gradients waste fewer samples and avoid locking into a
    poor deterministic policy, so the agents' mean J gets near J* several times sooner. A run that never
    gets there counts as the whole budget (so the ratio is a lower bound)."""
    curve = loop.normalized.mean(-1)  # (steps + 1, estimator)
    budget = cfg.train_steps * cfg.episodes_per_step

    def episodes_to_target(name: str) -> float:
        hit = (curve[:, M.ESTIMATORS.index(name)] >= cfg.target_fraction).nonzero()
        return hit[0].item() * cfg.episodes_per_step if hit.numel() else math.inf

    need = {name: episodes_to_target(name) for name in M.ESTIMATORS}
    text = ", ".join(f"{k} {v:.0f}" if math.isfinite(v) else f"{k} > {budget}" for k, v in need.items())
    return measure(min(need["reinforce"], budget) / need["advantage"], f"episodes per agent to "
                   f"{cfg.target_fraction:g} of the way to J*: {text}")


# ---- report ----------------------------------------------------------------------------------------

ESTIMATOR_WORDS = {"reinforce": r"REINFORCE ($G_t$)", "baseline": r"baseline ($G_t - V(s_t)$)",
                   "advantage": r"advantage ($A(s_t, a_t)$)"}
TRACE = "tr Cov of the gradient estimate"


@adv.report
def estimator_curves(ctx, policy, samples):
    trace = {name: grads.var(0).sum().item() for name, grads in samples.items()}
    ctx.series("estimator/trace_cov", [trace[n] for n in M.ESTIMATORS], [0, 1, 2],
               x_label="estimator (weight of the score function)", smooth=False,
               label="gradient variance per estimator", y_label=TRACE, ticks=[ESTIMATOR_WORDS[n] for n in M.ESTIMATORS])
    for name, grads in samples.items():
        N = grads.shape[0]
        sizes = [b for b in BATCH_SIZES if N // b >= 1]
        mse = [((grads[: N // b * b].reshape(N // b, b, *grads.shape[1:]).mean(1) - policy.grad) ** 2)
               .sum((-1, -2)).mean().item() for b in sizes]
        ctx.series(f"estimator/log10_mse_{name}", [math.log10(v) for v in mse], [math.log2(b) for b in sizes],
                   x_label=r"$\log_2$ batch size (episodes)", group="estimator/log10_mse_vs_batch_size", smooth=False,
                   label=ESTIMATOR_WORDS[name], y_label=r"$\log_{10}$ squared error to the true gradient",
                   title="Gradient error against batch size")
        ctx.scalar(f"log10 MSE {name} at {sizes[-1]} episodes", math.log10(mse[-1]))
    ctx.scalar("J(theta) at the test policy", policy.J)
    ctx.scalar("var ratio reinforce/baseline", trace["reinforce"] / trace["baseline"])
    ctx.scalar("var ratio baseline/advantage", trace["baseline"] / trace["advantage"])
    ctx.scalar("var ratio reinforce/advantage", trace["reinforce"] / trace["advantage"])
    for name in M.ESTIMATORS:
        ctx.scalar(f"tr Cov {name}", trace[name])


@adv.report
def variance_vs_reward_offset(ctx, cfg, policy, episodes, discounted_returns, advantage_from_q,
                              policy_gradient_estimate):
    """Variance against the reward offset, on the same episodes: quadratic without a baseline, flat with."""
    states, actions, rewards = (x[:SWEEP_EPISODES] for x in episodes)
    sweep = {name: [] for name in M.ESTIMATORS}
    for c in OFFSET_SWEEP:
        m = M.shift_rewards(policy.mdp, c - cfg.reward_offset)
        V = evaluate_policy_exact(m.P, m.R, m.gamma, policy.probs)
        A = advantage_from_q(q_from_v(m.P, m.R, m.gamma, V), policy.probs)
        G = discounted_returns(rewards + (c - cfg.reward_offset), cfg.gamma)
        for name, grads in M.estimator_samples(policy_gradient_estimate, policy.theta, states, actions, G, V, A,
                                               cfg.gamma, cfg.weight_by_gamma_t).items():
            sweep[name].append(grads.var(0).sum().item())
    for name in M.ESTIMATORS:
        ctx.series(f"variance/trace_cov_{name}", sweep[name], OFFSET_SWEEP, x_label="reward offset (added to every reward)",
                   group="variance/trace_cov_vs_reward_offset", smooth=False, label=ESTIMATOR_WORDS[name],
                   y_label=TRACE, title="Gradient variance against a reward offset")
        for i in (0, -1):
            ctx.scalar(f"tr Cov {name} at reward offset {OFFSET_SWEEP[i]:g}", sweep[name][i])


@adv.report
def learning_curves(ctx, cfg, loop):
    score = loop.normalized  # (steps + 1, estimator, agent)
    x = torch.arange(cfg.train_steps + 1) * cfg.episodes_per_step
    for i, name in enumerate(M.ESTIMATORS):
        ctx.series(f"charts/normalized_return_{name}", score[:, i].mean(-1), x, x_label="episodes per agent",
                   group="charts/normalized_return", label=ESTIMATOR_WORDS[name], key=name == "advantage", smooth=False,
                   y_label="exact normalised return, mean over agents (0 uniform, 1 optimal)",
                   title="Learning curves per estimator")
        ctx.scalar(f"final normalized J {name} (mean)", score[-1, i].mean())
    ctx.scalar("final normalized J advantage (worst agent)", score[-1, M.ESTIMATORS.index("advantage")].min())
    ctx.scalar("J* (value iteration)", loop.J_star)
    ctx.scalar("J uniform policy", loop.J_uniform)
