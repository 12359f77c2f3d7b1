"""Audit of the advantage module (day 3): the policy gradient theorem, the score-function estimator,
and why a baseline V(s) and the advantage A = Q - V keep it unbiased while cutting its variance."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules import advantage as M
from modules.mdp import evaluate_policy_exact, q_from_v, random_mdp

REWARD_SHIFT = 5.0  # the constant added to every reward in the shift-invariance check
OFFSET_SWEEP = (0.0, 1.0, 2.0, 4.0, 8.0)  # reward offsets for the variance-vs-offset curve
SWEEP_EPISODES = 4_000  # episodes reused for each point of that curve
BATCH_SIZES = (1, 4, 16, 64, 256, 1024)  # batch sizes for the MSE-vs-batch-size curve
FINAL_BAR = 0.95  # every advantage agent ends this far from uniform to J* (seeds 0-35 reach >= 0.984)


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


@audit("advantage", day=3, title="Advantage and baselines: why Q - V reduces variance",
       config=M.AdvantageConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_advantage(ctx: Context, *, discounted_returns=M.discounted_returns,
                    advantage_from_q=M.advantage_from_q, exact_policy_gradient=M.exact_policy_gradient,
                    policy_gradient_estimate=M.policy_gradient_estimate) -> None:
    cfg: M.AdvantageConfig = ctx.config
    g_task, g_sample, g_train = ctx.generator(0), ctx.generator(1), ctx.generator(2)
    mdp = M.layered_mdp(cfg.n_layers, cfg.width, cfg.n_actions, cfg.gamma, cfg.reward_offset,
                        cfg.reward_scale, g_task)
    S, A_, T = mdp.n_states, mdp.n_actions, cfg.n_layers
    theta = cfg.theta_scale * torch.randn(S, A_, generator=g_task, dtype=M.DTYPE)
    probs = torch.softmax(theta, -1)
    V = evaluate_policy_exact(mdp.P, mdp.R, mdp.gamma, probs)
    Q = q_from_v(mdp.P, mdp.R, mdp.gamma, V)

    # ---- exact math -----------------------------------------------------------------------------
    hand = discounted_returns(torch.tensor([[1.0, 1.0, 1.0]], dtype=M.DTYPE), 0.9)
    hand_err = (hand - torch.tensor([[2.71, 1.9, 1.0]], dtype=M.DTYPE)).abs().max().item()
    s0 = M.sample_categorical(mdp.start.expand(cfg.n_episodes, S), g_sample)
    states, actions, rewards = M.sample_episodes(mdp, probs, s0, T, cfg.reward_noise, g_sample)
    G = discounted_returns(rewards, cfg.gamma)
    next_G = torch.cat([G[:, 1:], torch.zeros_like(G[:, :1])], dim=1)
    rec_err = (G - (rewards + cfg.gamma * next_G)).abs().max().item()
    ctx.check("discounted_returns_satisfy_recursion", max(hand_err, rec_err) < 1e-12,
              f"[1,1,1] -> {[round(x, 4) for x in hand[0].tolist()]}, max recursion error {rec_err:.1e}",
              "[2.71, 1.9, 1.0] and |G_t - r_t - gamma G_t+1| < 1e-12",
              "The return-to-go is the discounted sum of the rewards from step t on; it obeys "
              "G_t = r_t + gamma G_t+1 and is what a Monte-Carlo policy gradient weights each step by.",
              hint="loop backwards over time with a running sum; start from 0 after the last step.")

    A = advantage_from_q(Q, probs)
    adv_err = (A - (Q - V[:, None])).abs().max().item()
    ctx.check("advantage_is_q_minus_v", adv_err < 1e-10, adv_err, "max |A - (Q - V^pi)| < 1e-10",
              "The advantage says how much better action a is than the policy's average action in s: "
              "A(s,a) = Q(s,a) - V(s) with V(s) = E_pi[Q(s,a)].",
              hint="V(s) = sum_a pi(a|s) Q(s,a): weight by the policy, do not take the plain mean or max.")
    zero_mean = (probs * A).sum(-1).abs().max().item()
    ctx.check("advantage_has_zero_mean_under_policy", zero_mean < 1e-10, zero_mean,
              "max_s |sum_a pi(a|s) A(s,a)| < 1e-10",
              "On average over its own actions the policy is exactly as good as itself, so E_pi[A] = 0: "
              "the advantage only ranks actions, it carries no state-level offset.",
              hint="subtract the pi-weighted mean of Q over actions, broadcast over the action axis.")

    def autograd_of_J(m, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone().requires_grad_(True)
        return torch.autograd.grad(M.expected_return(m, logits), logits)[0]

    true_grad = autograd_of_J(mdp, theta)  # the trusted dJ/dtheta, used by every check below
    dense = random_mdp(6, 3, 0.8, g_task)  # the theorem holds for any MDP, not only layered ones
    dense_theta = torch.randn(6, 3, generator=g_task, dtype=M.DTYPE)
    pgt_err = max((exact_policy_gradient(m.P, m.R, m.gamma, m.start, th) - autograd_of_J(m, th))
                  .abs().max().item() for m, th in ((mdp, theta), (dense, dense_theta)))
    ctx.check("policy_gradient_theorem_matches_autograd", pgt_err < 1e-10, pgt_err,
              "max |grad_PGT - autograd dJ/dtheta| < 1e-10",
              "The policy gradient theorem gives dJ/dtheta[s,a] = d(s) pi(a|s) A(s,a) without "
              "differentiating through the dynamics; it equals autograd of the exact J(theta).",
              hint="d is the discounted visitation start^T (I - gamma P_pi)^-1 and the weight is Q - V.")
    ctx.progress(0.1)

    n_small = 64
    st, ac = states[:n_small], actions[:n_small]
    w = torch.randn(n_small, T, generator=g_sample, dtype=M.DTYPE)
    th = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(th, -1)[st, ac]  # (n, T)
    (auto,) = torch.autograd.grad((w * logp).sum() / n_small, th)
    est_err = (policy_gradient_estimate(theta, st, ac, w) - auto).abs().max().item()
    ctx.check("policy_gradient_estimate_matches_autograd", est_err < 1e-12, est_err,
              "max |kernel - autograd of mean sum_t w_t log pi(a_t|s_t)| < 1e-12",
              "For a softmax policy grad_theta[s] log pi(a|s) = onehot(a) - pi(.|s), so REINFORCE is the "
              "weighted sum of these rows: the same as backpropagating -mean(w * logp).",
              hint="subtract pi(.|s) from the one-hot action, and accumulate rows with index_add.")

    every_s = torch.arange(S).repeat_interleave(A_)[:, None]  # (S*A, 1): each (s, a) pair once
    every_a = torch.arange(A_).repeat(S)[:, None]
    pi_w = probs[every_s, every_a]  # weight pi(a|s): the exact expectation over a ~ pi
    score_mean = (policy_gradient_estimate(theta, every_s, every_a, pi_w) * S * A_).abs().max().item()
    ctx.check("score_function_has_zero_mean", score_mean < 1e-12, score_mean,
              "max_s |sum_a pi(a|s) grad log pi(a|s)| < 1e-12",
              "E_{a~pi}[grad log pi(a|s)] = grad sum_a pi(a|s) = grad 1 = 0, which is why subtracting "
              "any baseline b(s) leaves the policy gradient unbiased.",
              hint="the score must be onehot(a) - pi(.|s); without the -pi it has mean pi, not 0.")

    # a constant added to every reward moves G_t and V(s_t) equally: G - V and A do not change
    shifted = M.shift_rewards(mdp, REWARD_SHIFT)
    V_sh = evaluate_policy_exact(shifted.P, shifted.R, shifted.gamma, probs)
    A_sh = advantage_from_q(q_from_v(shifted.P, shifted.R, shifted.gamma, V_sh), probs)
    sub = slice(0, SWEEP_EPISODES)
    w0 = M.estimator_weights(G[sub], states[sub], actions[sub], V, A, cfg.gamma, cfg.weight_by_gamma_t)
    w1 = M.estimator_weights(discounted_returns(rewards[sub] + REWARD_SHIFT, cfg.gamma), states[sub],
                             actions[sub], V_sh, A_sh, cfg.gamma, cfg.weight_by_gamma_t)
    change = {name: (policy_gradient_estimate(theta, states[sub], actions[sub], w1[name])
                     - policy_gradient_estimate(theta, states[sub], actions[sub], w0[name]))
              .abs().max().item() for name in M.ESTIMATORS}
    ctx.check("baseline_gradient_is_invariant_to_reward_shift",
              change["baseline"] < 1e-9 and change["advantage"] < 1e-9,
              f"change: baseline {change['baseline']:.1e}, advantage {change['advantage']:.1e}, "
              f"reinforce {change['reinforce']:.3g}", "baseline and advantage < 1e-9",
              "Adding c to every reward shifts G_t and V(s_t) by the same amount, so G - V (and A) is "
              "unchanged and so is the sampled gradient; without a baseline the estimate moves.",
              hint="the returns must be discounted exactly as V is; gamma ignored in G_t breaks it.")
    ctx.progress(0.2)

    # ---- Monte-Carlo: unbiasedness and variance of the three estimators --------------------------
    N = cfg.n_episodes
    J = M.expected_return(mdp, theta).item()
    G0_mean, G0_se = G[:, 0].mean().item(), (G[:, 0].std() / math.sqrt(N)).item()
    z_J = (G0_mean - J) / max(G0_se, 1e-12)
    ctx.check("mean_return_matches_exact_J", abs(z_J) <= cfg.z_max,
              f"{G0_mean:.4f} ± {G0_se:.4f} vs J={J:.4f} (z={z_J:.2f})", f"|z| <= {cfg.z_max:g}",
              "J(theta) = sum_s start(s) V^pi(s) is the expected discounted return, so the sampled G_0 "
              "averages to it within its standard error.", kind="outcome",
              hint="G_0 discounts step t by gamma^t; an undiscounted sum overshoots J.")

    weights = M.estimator_weights(G, states, actions, V, A, cfg.gamma, cfg.weight_by_gamma_t)
    samples = {name: M.per_episode_gradients(policy_gradient_estimate, theta, states, actions, w)
               for name, w in weights.items()}  # (N, S, A) one gradient per episode
    ctx.progress(0.35)
    worst_z, worst_at, flat_err = 0.0, "", 0.0
    trace, mse_curves = {}, {}
    for name, grads in samples.items():
        mean, se = grads.mean(0), grads.std(0) / math.sqrt(N)
        varies = se > 1e-12  # the end state's row is never sampled: exactly 0 on both sides
        z = ((mean - true_grad) / se.clamp_min(1e-300))[varies].abs()
        if z.numel() and z.max().item() > worst_z:
            worst_z, worst_at = z.max().item(), name
        flat_err = max(flat_err, (mean - true_grad)[~varies].abs().max().item() if (~varies).any() else 0.0)
        trace[name] = grads.var(0).sum().item()
        mse_curves[name] = [((grads[: N // b * b].reshape(N // b, b, S, A_).mean(1) - true_grad) ** 2)
                            .sum((-1, -2)).mean().item() for b in BATCH_SIZES]
    n_comp = len(M.ESTIMATORS) * int(varies.sum())
    ctx.check("estimators_are_unbiased", worst_z <= cfg.z_max and flat_err < 1e-12,
              f"max|z|={worst_z:.2f} ({worst_at}) over {n_comp} components",
              f"max over estimators and components of |mean - exact| / SE <= {cfg.z_max:g}",
              "REINFORCE, the V(s) baseline and the true advantage all average to the exact policy "
              "gradient: a state-only baseline has zero-mean score, and E[G_t | s_t, a_t] = Q(s_t, a_t).",
              kind="outcome",
              hint="weight step t by gamma^t (the discounted objective) and use reward-to-go, not the "
                   "whole-episode return; the score must be onehot(a) - pi(.|s).")
    ratio_rb = trace["reinforce"] / trace["baseline"]
    ratio_ba = trace["baseline"] / trace["advantage"]
    ctx.check("variance_decreases_reinforce_baseline_advantage",
              trace["reinforce"] > trace["baseline"] > trace["advantage"],
              f"tr Cov: {trace['reinforce']:.3g} > {trace['baseline']:.3g} > {trace['advantage']:.3g}",
              "tr Cov strictly decreasing (REINFORCE > V(s) baseline > advantage)",
              "The baseline removes the action-independent part of the return and the advantage also "
              "removes the noise of the rest of the episode, so each step shrinks the gradient variance.",
              kind="outcome",
              hint="the advantage weight must be Q - V, not Q: Q still carries the large V(s) offset.")
    ctx.series("estimator/trace_cov", [trace[n] for n in M.ESTIMATORS], [0, 1, 2],
               x_label="estimator (0 REINFORCE G_t, 1 G_t - V(s_t), 2 A(s_t,a_t))", smooth=False)
    for name in M.ESTIMATORS:
        ctx.series(f"estimator/log10_mse_{name}", [math.log10(v) for v in mse_curves[name]],
                   [math.log2(b) for b in BATCH_SIZES], x_label="log2 batch size (episodes)",
                   group="estimator/log10_mse_vs_batch_size", smooth=False)
    ctx.scalar("var ratio reinforce/baseline", ratio_rb)
    ctx.scalar("var ratio baseline/advantage", ratio_ba)
    ctx.scalar("var ratio reinforce/advantage", trace["reinforce"] / trace["advantage"])
    ctx.scalar("max |z| unbiasedness", worst_z)

    # variance against the reward offset, on the same episodes: quadratic without a baseline, flat with
    sweep = {name: [] for name in M.ESTIMATORS}
    for c in OFFSET_SWEEP:
        m_c = M.shift_rewards(mdp, c - cfg.reward_offset)
        V_c = evaluate_policy_exact(m_c.P, m_c.R, m_c.gamma, probs)
        A_c = advantage_from_q(q_from_v(m_c.P, m_c.R, m_c.gamma, V_c), probs)
        G_c = discounted_returns(rewards[sub] + (c - cfg.reward_offset), cfg.gamma)
        w_c = M.estimator_weights(G_c, states[sub], actions[sub], V_c, A_c, cfg.gamma, cfg.weight_by_gamma_t)
        for name in M.ESTIMATORS:
            grads = M.per_episode_gradients(policy_gradient_estimate, theta, states[sub], actions[sub],
                                            w_c[name])
            sweep[name].append(grads.var(0).sum().item())
    for name in M.ESTIMATORS:
        ctx.series(f"variance/trace_cov_{name}", sweep[name], OFFSET_SWEEP, x_label="reward offset",
                   group="variance/trace_cov_vs_reward_offset", smooth=False)
    ctx.progress(0.5)

    # ---- closed loop: stochastic gradient ascent with each estimator ----------------------------
    steps = cfg.train_steps
    result = M.train(mdp, cfg, g_train, returns_fn=discounted_returns, advantage_fn=advantage_from_q,
                     estimate_fn=policy_gradient_estimate,
                     on_step=lambda s: ctx.progress(0.5 + 0.5 * (s + 1) / steps))
    score = result.normalized  # (steps + 1, estimator, agent)
    mean_curve = score.mean(-1)  # (steps + 1, estimator)
    for i, name in enumerate(M.ESTIMATORS):
        ctx.series(f"charts/normalized_return_{name}", mean_curve[:, i],
                   torch.arange(steps + 1) * cfg.episodes_per_step, x_label="episodes per agent",
                   group="charts/normalized_return")
    adv = M.ESTIMATORS.index("advantage")
    final_adv = score[-1, adv]
    ctx.check("gradient_ascent_with_advantage_reaches_optimum", final_adv.min().item() >= FINAL_BAR,
              f"min over {cfg.n_agents} agents {final_adv.min().item():.3f} "
              f"(mean {final_adv.mean().item():.3f})",
              f"(J - J_uniform) / (J* - J_uniform) >= {FINAL_BAR} for every agent",
              "Following the advantage-weighted gradient climbs J(theta) from the uniform policy to "
              "nearly the optimum found by value iteration.", kind="outcome",
              hint="ascend (theta += lr * g), and weight by A = Q - V with the sign kept.")

    def episodes_to_target(i: int) -> float:
        hit = (mean_curve[:, i] >= cfg.target_fraction).nonzero()
        return hit[0].item() * cfg.episodes_per_step if hit.numel() else math.inf

    need = {name: episodes_to_target(i) for i, name in enumerate(M.ESTIMATORS)}
    budget = steps * cfg.episodes_per_step
    text = {k: (f"{v:.0f}" if math.isfinite(v) else f"> {budget}") for k, v in need.items()}
    ctx.check("advantage_needs_fewer_episodes_than_reinforce",
              math.isfinite(need["advantage"]) and 2 * need["advantage"] <= need["reinforce"],
              f"advantage {text['advantage']}, baseline {text['baseline']}, reinforce {text['reinforce']}",
              f"episodes per agent until the agents' mean J is {cfg.target_fraction:g} of the way to J*: "
              "advantage <= half of reinforce",
              "With the same step size, lower-variance gradients waste fewer samples and avoid locking "
              "into a poor deterministic policy, so the agents' mean J climbs much faster.", kind="outcome",
              hint="the advantage estimator must be unbiased and low-variance: A = Q - V, times gamma^t.")
    ctx.scalar("J* (value iteration)", result.J_star)
    ctx.scalar("J uniform policy", result.J_uniform)
    for i, name in enumerate(M.ESTIMATORS):
        ctx.scalar(f"final normalized J {name} (mean)", score[-1, i].mean())
    ctx.progress(1.0)
