"""Audit of the GAE module (day 4): the recursion's exact properties, and lambda's bias-variance trade-off."""
from __future__ import annotations

import torch

from llmaudit.audit import Context, audit, kernel
from modules import gae as M


def _example() -> dict:
    batch = M.random_batch(5, 3, 0.2, 0.2, torch.Generator().manual_seed(0))
    return {**batch, "gamma": 0.99, "lam": 0.95}


KERNELS = [
    kernel(M.compute_gae, example=_example,
           hint="delta uses (1 - terminated) * next_values; the chain A_{t+1} is cut by terminated OR "
                "truncated; returns = advantages + values, unwhitened."),
]


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=M.DTYPE)[:, None]  # (T, 1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _against_trend(y: torch.Tensor, increasing: bool) -> float:
    """The largest single step against the trend, as a fraction of the curve's range."""
    steps = y[1:] - y[:-1] if increasing else y[:-1] - y[1:]
    return ((-steps).clamp_min(0).max() / (y.max() - y.min()).clamp_min(1e-12)).item()


@audit("gae", day=4, title="GAE: lambda trades bias for variance", config=M.GAEConfig,
       kernels=KERNELS, formulas=M.FORMULAS)
def audit_gae(ctx: Context, *, compute_gae=M.compute_gae) -> None:
    cfg: M.GAEConfig = ctx.config
    tol = 1e-10  # float64 round-off over a few dozen steps

    # --- hand-worked vectors (rl-anchors.md section 3) -----------------------------------------
    verl = {"rewards": _column([0, 0, 1]), "values": _column([.5, .6, .7]), "next_values": _column([.6, .7, 0]),
            "terminated": _column([0, 0, 1]), "truncated": _column([0, 0, 0])}
    expected = [(1.0, 1.0, [0.5, 0.4, 0.3], [1.0, 1.0, 1.0]),
                (0.9, 0.0, [0.04, 0.03, 0.3], [0.54, 0.63, 1.0]),
                (0.9, 1.0, [0.31, 0.30, 0.30], [0.81, 0.9, 1.0]),
                (0.9, 0.95, [0.2849575, 0.2865, 0.3], [0.7849575, 0.8865, 1.0])]
    err = 0.0
    for gamma, lam, adv, ret in expected:
        A, R = compute_gae(**verl, gamma=gamma, lam=lam)
        err = max(err, _max_abs(A, _column(adv)), _max_abs(R, _column(ret)))
    ctx.check("matches_verl_test_vectors", err < 1e-6, err, "max error < 1e-6",
              "rewards [0,0,1], values [.5,.6,.7] ending in a terminal: (gamma, lam) = (1,1) gives "
              "[.5,.4,.3], (.9,0) the TD errors [.04,.03,.3], (.9,.95) gives [.2849575,.2865,.3].",
              hint="the last step is terminal: its delta is r - V with no bootstrap.")

    cleanrl = {"rewards": _column([1, 1, 1, 1]), "values": _column([.5] * 4), "next_values": _column([.5] * 4),
               "terminated": _column([0, 1, 0, 0]), "truncated": _column([0, 0, 0, 0])}
    A, _ = compute_gae(**cleanrl, gamma=0.99, lam=0.95)
    err = _max_abs(A, _column([1.46525, 0.5, 1.9307975, 0.995]))
    ctx.check("matches_cleanrl_dones_vector", err < 1e-6, err, "max error < 1e-6",
              "An episode ending at t=1 gives delta_1 = r - V = 0.5 and cuts the chain, so A_0 only "
              "sees two steps: [1.46525, 0.5, 1.9307975, 0.995].",
              hint="the done flag of step t cuts the link from A_{t+1} to A_t (not done of t+1).")
    ctx.progress(0.05)

    # --- random batches with episode boundaries: each result against an independent oracle ----
    g = ctx.generator(1)
    pairs = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)]
    pairs += [(0.5 + 0.5 * torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item())
              for _ in range(cfg.n_cases)]
    cases = [(gamma, lam, M.random_batch(cfg.n_steps, cfg.n_envs, cfg.p_terminated, cfg.p_truncated, g))
             for gamma, lam in pairs]

    err = max(_max_abs(compute_gae(**b, gamma=gm, lam=0.0)[0],
                       M.td_errors(b["rewards"], b["values"], b["next_values"], b["terminated"], gm))
              for gm, _, b in cases)
    ctx.check("lambda_zero_is_td_error", err < tol, err, f"max |A - delta| < {tol:g}",
              "With lam = 0 the advantage is the one-step TD error r + gamma V(s') - V(s): lowest "
              "variance, but it inherits every error of the critic.",
              hint="lam must multiply the carried A_{t+1}; a hard-coded 0.95 ignores the argument.")

    err = max(_max_abs(compute_gae(**b, gamma=gm, lam=1.0)[0], M.monte_carlo_advantages(**b, gamma=gm))
              for gm, _, b in cases)
    ctx.check("lambda_one_is_discounted_return_minus_value", err < tol, err, f"max |A - (G - V)| < {tol:g}",
              "With lam = 1 the V(s_{t+1}) terms telescope away: A_t = discounted return to the episode's "
              "end minus V(s_t), which is unbiased whatever the critic.",
              hint="the carried term is gamma * lam * A_{t+1}; dropping gamma breaks the telescoping.")

    err = max(_max_abs(compute_gae(**b, gamma=gm, lam=lm)[0], M.gae_closed_form(**b, gamma=gm, lam=lm))
              for gm, lm, b in cases)
    ctx.check("recursion_equals_closed_form_sum", err < tol, err, f"max error < {tol:g}",
              "The backward recursion is just an O(T) way to compute sum_l (gamma lam)^l delta_{t+l} "
              "up to the end of the episode.",
              hint="the decay per step is gamma * lam, not lam alone.")

    err = max(_max_abs(compute_gae(**b, gamma=gm, lam=lm)[1],
                       M.lambda_returns(b["rewards"], b["next_values"], b["terminated"], b["truncated"], gm, lm))
              for gm, lm, b in cases)
    ctx.check("returns_are_lambda_returns", err < tol, err, f"max |returns - G^lam| < {tol:g}",
              "A + V is the forward-view lambda-return, a weighted mix of n-step returns in reward "
              "units; that is why the critic regresses on it and not on whitened advantages.",
              hint="whiten the advantages in the loss, never inside GAE and never the returns.")

    err = max(((R - (A + b["values"])).abs().max().item()
               for gm, lm, b in cases for A, R in [compute_gae(**b, gamma=gm, lam=lm)]))
    ctx.check("returns_equal_advantages_plus_values", err <= 1e-12, err, "max |R - (A + V)| <= 1e-12",
              "returns = advantages + values by definition; the critic target and the actor's signal "
              "must come from the same estimate.",
              hint="return advantages + values, not the advantages alone.")
    ctx.progress(0.2)

    # episode boundaries: what happens after a done cannot reach back
    leak = 0.0
    for gm, lm, b in cases:
        first_end = M.episode_ends(b["terminated"], b["truncated"])[0]  # (N,) end of each env's first episode
        after = torch.arange(cfg.n_steps)[:, None] > first_end[None]  # (T, N)
        junk = 1e3 * torch.randn(3, *after.shape, generator=g, dtype=M.DTYPE)
        changed = dict(b, rewards=torch.where(after, junk[0], b["rewards"]),
                       values=torch.where(after, junk[1], b["values"]),
                       next_values=torch.where(after, junk[2], b["next_values"]))
        A0, R0 = compute_gae(**b, gamma=gm, lam=lm)
        A1, R1 = compute_gae(**changed, gamma=gm, lam=lm)
        leak = max(leak, _max_abs(A0[~after], A1[~after]), _max_abs(R0[~after], R1[~after]))
    ctx.check("no_leak_across_episode_boundary", leak <= 1e-12, leak, "max change <= 1e-12",
              "Rewards and values of the next episode must not leak into this one: the chain is cut "
              "at every done, terminated or truncated.",
              hint="cut with done = terminated | truncated, not terminated alone.")

    err = 0.0
    for gm, lm, b in cases:
        A, _ = compute_gae(**b, gamma=gm, lam=lm)
        cut = b["truncated"] & ~b["terminated"]
        one_step = b["rewards"] + gm * b["next_values"] - b["values"]
        err = max(err, _max_abs(A[cut], one_step[cut]))
    ctx.check("truncation_bootstraps_from_next_value", err < tol, err,
              f"max |A - (r + gamma V(s_final) - V)| < {tol:g} at truncated steps",
              "A time limit is not a real end: the truncated step still bootstraps from the value of "
              "its final observation, then the chain stops.",
              hint="OR-ing truncated into the bootstrap mask (CleanRL ppo.py) or using values[t+1] (the "
                   "first observation of the next episode) both break this.")

    err = 0.0
    for gm, lm, b in cases:
        A, _ = compute_gae(**b, gamma=gm, lam=lm)
        term = b["terminated"]
        moved = dict(b, next_values=torch.where(term, 1e3 * torch.randn(term.shape, generator=g, dtype=M.DTYPE),
                                                b["next_values"]))
        err = max(err, _max_abs(A[term], (b["rewards"] - b["values"])[term]),
                  _max_abs(compute_gae(**moved, gamma=gm, lam=lm)[0], A))
    ctx.check("termination_does_not_bootstrap", err <= 1e-12, err,
              "A = r - V at terminated steps, and V(terminal obs) changes nothing (<= 1e-12)",
              "After a real termination there is no future reward, so the value of the terminal "
              "observation must not enter the target.",
              hint="multiply next_values by (1 - terminated) in delta.")

    err = 0.0
    for gm, lm, b in cases:
        other = torch.randn(b["rewards"].shape, generator=g, dtype=M.DTYPE) * 3.0
        zeros = torch.zeros_like(b["values"])
        A_sum, _ = compute_gae(**dict(b, rewards=b["rewards"] + 2.5 * other), gamma=gm, lam=lm)
        A_1, _ = compute_gae(**b, gamma=gm, lam=lm)
        A_2, _ = compute_gae(**dict(b, rewards=other, values=zeros, next_values=zeros), gamma=gm, lam=lm)
        err = max(err, _max_abs(A_sum, A_1 + 2.5 * A_2))
    ctx.check("linear_in_rewards", err < tol, err, f"max |A(r1 + c r2) - A(r1) - c A0(r2)| < {tol:g}",
              "For fixed values GAE is linear in the rewards (A0 = with zero values), so reward "
              "scaling or clipping must happen before it, as an explicit choice.",
              hint="no reward clipping or normalisation inside the advantage computation.")

    gm, lm, b = cases[-1]
    A, R = compute_gae(**b, gamma=gm, lam=lm)
    err = 0.0
    for n in range(cfg.n_envs):
        A_n, R_n = compute_gae(**{k: v[:, n:n + 1] for k, v in b.items()}, gamma=gm, lam=lm)
        err = max(err, _max_abs(A_n, A[:, n:n + 1]), _max_abs(R_n, R[:, n:n + 1]))
    ctx.check("envs_are_independent", err <= 1e-12, err, "batched == one env at a time (<= 1e-12)",
              "Each column of the (T, N) batch is its own trajectory: one env's done must not cut, and "
              "its rewards must not reach, another env's advantages.",
              hint="keep the done mask per env (shape (N,)); `if dones.any(): reset` mixes envs.")
    ctx.progress(0.35)

    # --- the day's claim: larger lambda, more variance, less bias ------------------------------
    sweep = M.bias_variance_sweep(cfg, ctx.generator(2), gae_fn=compute_gae)
    lams, var, bias, se = sweep.lambdas, sweep.variance, sweep.bias, sweep.bias_se
    ctx.progress(0.9)

    ratio = (var[-1] / var[0]).item()
    var_back = _against_trend(var, increasing=True)
    ctx.check("variance_grows_with_lambda", ratio >= cfg.min_variance_ratio and var_back <= cfg.monotone_slack,
              f"Var[A] {var[0].item():.3f} -> {var[-1].item():.3f} (x{ratio:.1f}), worst step back "
              f"{100 * var_back:.1f}% of range",
              f"Var(lam=1)/Var(lam=0) >= {cfg.min_variance_ratio:g}, steps back <= {100 * cfg.monotone_slack:g}%",
              "A larger lam sums more future rewards and transitions with less discounting by the "
              "critic, so the estimate's variance grows towards that of the Monte-Carlo return.",
              kind="outcome", hint="lam must reach the recursion; a fixed lam gives a flat curve.")

    z_one = (bias[-1] / se[-1]).item()
    ctx.check("bias_vanishes_at_lambda_one", abs(z_one) <= cfg.z_max,
              f"bias {bias[-1].item():+.4f} ± {se[-1].item():.4f} (z={z_one:+.2f})", f"|z| <= {cfg.z_max:g}",
              "At lam = 1 the critic only enters as the baseline V(s0) (and a negligible end-of-batch "
              "bootstrap), so A + V_hat(s0) is an unbiased estimate of Q(s0, a0).",
              kind="outcome", hint="no bootstrap after a termination, and the chain cut at every done.")

    z_zero = (bias[0] / se[0]).item()
    drop = (bias[0].abs() - bias[-1].abs()).item()
    bias_back = _against_trend(bias.abs(), increasing=False)
    ctx.check("bias_shrinks_with_lambda", z_zero >= cfg.min_bias_z_at_lambda0 and drop > 0
              and bias_back <= cfg.monotone_slack,
              f"bias {bias[0].item():+.3f} (z={z_zero:.0f}) -> {bias[-1].item():+.3f}, worst step back "
              f"{100 * bias_back:.1f}% of range",
              f"z(lam=0) >= {cfg.min_bias_z_at_lambda0:g}, |bias| falls, steps back <= {100 * cfg.monotone_slack:g}%",
              "A critic that overestimates by e biases A_lam + V_hat(s0) by (1 - lam) sum_l gamma^l "
              "lam^(l-1) E[e(s_l)]: the full gamma e at lam = 0, nothing at lam = 1.",
              kind="outcome", hint="lam must weight the TD errors; with lam ignored the bias is flat.")

    z_analytic = ((bias - sweep.bias_analytic) / se).abs().max().item()
    ctx.check("monte_carlo_bias_matches_analytic", z_analytic <= cfg.z_max_grid,
              f"max |measured - exact| = {z_analytic:.2f} SE", f"<= {cfg.z_max_grid:g} SE at every lam",
              "The sampled bias agrees with the exact expectation sum_l (gamma lam)^l E[delta_l] "
              "computed from the MDP's state distribution.",
              kind="outcome", hint="any mistake in the recursion shifts E[A_lam] away from the exact sum.")

    z_perfect = (sweep.perfect_bias / sweep.perfect_se).abs().max().item()
    ctx.check("perfect_critic_is_unbiased_for_every_lambda", z_perfect <= cfg.z_max_grid,
              f"max |bias| = {z_perfect:.2f} SE", f"<= {cfg.z_max_grid:g} SE at every lam",
              "With V_hat = V^pi every TD error after the first has mean zero, so any lam is unbiased: "
              "the bias of small lam comes from the critic, not from lam.",
              kind="outcome", hint="delta must use gamma * V(s'); a missing gamma biases every lam.")

    ctx.series("advantage/variance", var, lams, x_label="lambda", group="advantage/variance", smooth=False)
    ctx.series("advantage/variance_perfect_critic", sweep.perfect_variance, lams, x_label="lambda",
               group="advantage/variance", smooth=False)
    ctx.series("advantage/bias", bias, lams, x_label="lambda", group="advantage/bias", smooth=False)
    ctx.series("advantage/bias_analytic", sweep.bias_analytic, lams, x_label="lambda", group="advantage/bias",
               smooth=False)
    ctx.series("advantage/bias_perfect_critic", sweep.perfect_bias, lams, x_label="lambda",
               group="advantage/bias", smooth=False)
    ctx.scalar("Var[A] lam=0", var[0])
    ctx.scalar("Var[A] lam=1", var[-1])
    ctx.scalar("variance ratio lam=1/lam=0", ratio)
    ctx.scalar("bias lam=0", bias[0])
    ctx.scalar("bias lam=1", bias[-1])
    ctx.scalar("bias SE lam=1", se[-1])
    ctx.scalar("Q(s0,a0)", sweep.q_value)
    ctx.scalar("mean critic error", sweep.critic_error[:-1].mean())
    ctx.progress(1.0)
