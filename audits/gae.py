"""Audit of the GAE module (day 4): the recursion's exact properties, and lambda's bias-variance trade-off."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules import gae as M

TOL = 1e-10  # float64 round-off over a few dozen steps


def _example() -> dict:
    batch = M.random_batch(5, 3, 0.2, 0.2, torch.Generator().manual_seed(0))
    return {**batch, "gamma": 0.99, "lam": 0.95}


KERNELS = [
    kernel(M.compute_gae, example=_example,
           hint="delta uses (1 - terminated) * next_values; the chain A_{t+1} is cut by terminated OR "
                "truncated; returns = advantages + values, unwhitened."),
]

gae = Audit("gae", day=4, title="GAE: lambda trades bias for variance", config=M.GAEConfig,
            kernels=KERNELS, formulas=M.FORMULAS)


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=M.DTYPE)[:, None]  # (T, 1)


def _against_trend(y: torch.Tensor, increasing: bool) -> float:
    """The largest single step against the trend, as a fraction of the curve's range."""
    steps = y[1:] - y[:-1] if increasing else y[:-1] - y[1:]
    return ((-steps).clamp_min(0).max() / (y.max() - y.min()).clamp_min(1e-12)).item()


# ---- hand-worked vectors (closed forms worked by hand; verl's and CleanRL's conventions) ----------

VERL = {"rewards": _column([0, 0, 1]), "values": _column([.5, .6, .7]), "next_values": _column([.6, .7, 0]),
        "terminated": _column([0, 0, 1]), "truncated": _column([0, 0, 0])}
VERL_EXPECTED = [(1.0, 1.0, [0.5, 0.4, 0.3], [1.0, 1.0, 1.0]),
                 (0.9, 0.0, [0.04, 0.03, 0.3], [0.54, 0.63, 1.0]),
                 (0.9, 1.0, [0.31, 0.30, 0.30], [0.81, 0.9, 1.0]),
                 (0.9, 0.95, [0.2849575, 0.2865, 0.3], [0.7849575, 0.8865, 1.0])]


@gae.check("< 1e-6", hint="the last step is terminal: its delta is r - V with no bootstrap.")
def matches_verl_test_vectors(compute_gae):
    """Rewards [0,0,1], values [.5,.6,.7] ending in a terminal: (gamma, lam) = (1,1) gives [.5,.4,.3],
    (.9,0) the TD errors [.04,.03,.3], (.9,.95) gives [.2849575,.2865,.3]."""
    errors = []
    for gamma, lam, adv, ret in VERL_EXPECTED:
        A, R = compute_gae(**VERL, gamma=gamma, lam=lam)
        errors += [max_error(A, _column(adv)), max_error(R, _column(ret))]
    return errors


@gae.check("< 1e-6", hint="the done flag of step t cuts the link from A_{t+1} to A_t (not done of t+1).")
def matches_cleanrl_dones_vector(compute_gae):
    """An episode ending at t=1 gives delta_1 = r - V = 0.5 and cuts the chain, so A_0 only sees two
    steps: [1.46525, 0.5, 1.9307975, 0.995]."""
    batch = {"rewards": _column([1, 1, 1, 1]), "values": _column([.5] * 4), "next_values": _column([.5] * 4),
             "terminated": _column([0, 1, 0, 0]), "truncated": _column([0, 0, 0, 0])}
    A, _ = compute_gae(**batch, gamma=0.99, lam=0.95)
    return max_error(A, _column([1.46525, 0.5, 1.9307975, 0.995]))


# ---- random batches with episode boundaries: each result against an independent oracle ------------

@gae.fixture
def cases(cfg, g):
    """(gamma, lam, batch) triples: the edges (1, 1), (.99, .95), (.9, .5), then random pairs."""
    pairs = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)]
    pairs += [(0.5 + 0.5 * torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item())
              for _ in range(cfg.n_cases)]
    return [(gamma, lam, M.random_batch(cfg.n_steps, cfg.n_envs, cfg.p_terminated, cfg.p_truncated, g))
            for gamma, lam in pairs]


@gae.check(f"< {TOL}", hint="lam must multiply the carried A_{t+1}; a hard-coded 0.95 ignores the argument.")
def lambda_zero_is_td_error(compute_gae, cases):
    """With lam = 0 the advantage is the one-step TD error r + gamma V(s') - V(s): lowest variance, but
    it inherits every error of the critic."""
    return [max_error(compute_gae(**b, gamma=gm, lam=0.0)[0],
                      M.td_errors(b["rewards"], b["values"], b["next_values"], b["terminated"], gm))
            for gm, _, b in cases]


@gae.check(f"< {TOL}", hint="the carried term is gamma * lam * A_{t+1}; dropping gamma breaks the telescoping.")
def lambda_one_is_discounted_return_minus_value(compute_gae, cases):
    """With lam = 1 the V(s_{t+1}) terms telescope away: A_t = discounted return to the episode's end
    minus V(s_t), which is unbiased whatever the critic."""
    return [max_error(compute_gae(**b, gamma=gm, lam=1.0)[0], M.monte_carlo_advantages(**b, gamma=gm))
            for gm, _, b in cases]


@gae.check(f"< {TOL}", hint="the decay per step is gamma * lam, not lam alone.")
def recursion_equals_closed_form_sum(compute_gae, cases):
    """The backward recursion is just an O(T) way to compute sum_l (gamma lam)^l delta_{t+l} up to the
    end of the episode."""
    return [max_error(compute_gae(**b, gamma=gm, lam=lm)[0], M.gae_closed_form(**b, gamma=gm, lam=lm))
            for gm, lm, b in cases]


@gae.check(f"< {TOL}", hint="whiten the advantages in the loss, never inside GAE and never the returns.")
def returns_are_lambda_returns(compute_gae, cases):
    """A + V is the forward-view lambda-return, a weighted mix of n-step returns in reward units; that
    is why the critic regresses on it and not on whitened advantages."""
    return [max_error(compute_gae(**b, gamma=gm, lam=lm)[1],
                      M.lambda_returns(b["rewards"], b["next_values"], b["terminated"], b["truncated"], gm, lm))
            for gm, lm, b in cases]


@gae.check("<= 1e-12", hint="return advantages + values, not the advantages alone.")
def returns_equal_advantages_plus_values(compute_gae, cases):
    """returns = advantages + values by definition; the critic target and the actor's signal must come
    from the same estimate."""
    out = []
    for gm, lm, b in cases:
        A, R = compute_gae(**b, gamma=gm, lam=lm)
        out.append(max_error(R, A + b["values"]))
    return out


@gae.check("<= 1e-12", hint="cut with done = terminated | truncated, not terminated alone.")
def no_leak_across_episode_boundary(compute_gae, cases, cfg, g):
    """Rewards and values of the next episode must not leak into this one: the chain is cut at every
    done, terminated or truncated."""
    leaks = []
    for gm, lm, b in cases:
        first_end = M.episode_ends(b["terminated"], b["truncated"])[0]  # (N,) end of each env's first episode
        after = torch.arange(cfg.n_steps)[:, None] > first_end[None]  # (T, N)
        junk = 1e3 * torch.randn(3, *after.shape, generator=g, dtype=M.DTYPE)
        changed = dict(b, rewards=torch.where(after, junk[0], b["rewards"]),
                       values=torch.where(after, junk[1], b["values"]),
                       next_values=torch.where(after, junk[2], b["next_values"]))
        A0, R0 = compute_gae(**b, gamma=gm, lam=lm)
        A1, R1 = compute_gae(**changed, gamma=gm, lam=lm)
        leaks += [max_error(A0[~after], A1[~after]), max_error(R0[~after], R1[~after])]
    return leaks


@gae.check(f"< {TOL}", hint="OR-ing truncated into the bootstrap mask (CleanRL ppo.py) or using values[t+1] "
                            "(the first observation of the next episode) both break this.")
def truncation_bootstraps_from_next_value(compute_gae, cases):
    """A time limit is not a real end: the truncated step still bootstraps from the value of its final
    observation, then the chain stops."""
    errors = []
    for gm, lm, b in cases:
        A, _ = compute_gae(**b, gamma=gm, lam=lm)
        cut = b["truncated"] & ~b["terminated"]
        one_step = b["rewards"] + gm * b["next_values"] - b["values"]
        errors.append(max_error(A[cut], one_step[cut]))
    return measure(errors, f"{sum(int((b['truncated'] & ~b['terminated']).sum()) for _, _, b in cases)} "
                           "truncated steps")


@gae.check("<= 1e-12", hint="multiply next_values by (1 - terminated) in delta.")
def termination_does_not_bootstrap(compute_gae, cases, g):
    """After a real termination there is no future reward, so the value of the terminal observation must
    not enter the target: A = r - V there, whatever V(terminal obs) is."""
    errors = []
    for gm, lm, b in cases:
        A, _ = compute_gae(**b, gamma=gm, lam=lm)
        term = b["terminated"]
        moved = dict(b, next_values=torch.where(term, 1e3 * torch.randn(term.shape, generator=g, dtype=M.DTYPE),
                                                b["next_values"]))
        errors += [max_error(A[term], (b["rewards"] - b["values"])[term]),
                   max_error(compute_gae(**moved, gamma=gm, lam=lm)[0], A)]
    return errors


@gae.check(f"< {TOL}", hint="no reward clipping or normalisation inside the advantage computation.")
def linear_in_rewards(compute_gae, cases, g):
    """For fixed values GAE is linear in the rewards, so reward scaling or clipping must happen before
    it, as an explicit choice: A(r1 + c r2) = A(r1) + c A0(r2), A0 with zero values."""
    errors = []
    for gm, lm, b in cases:
        other = torch.randn(b["rewards"].shape, generator=g, dtype=M.DTYPE) * 3.0
        zeros = torch.zeros_like(b["values"])
        A_sum, _ = compute_gae(**dict(b, rewards=b["rewards"] + 2.5 * other), gamma=gm, lam=lm)
        A_1, _ = compute_gae(**b, gamma=gm, lam=lm)
        A_2, _ = compute_gae(**dict(b, rewards=other, values=zeros, next_values=zeros), gamma=gm, lam=lm)
        errors.append(max_error(A_sum, A_1 + 2.5 * A_2))
    return errors


@gae.check("<= 1e-12", hint="keep the done mask per env (shape (N,)); `if dones.any(): reset` mixes envs.")
def envs_are_independent(compute_gae, cases, cfg):
    """Each column of the (T, N) batch is its own trajectory: one env's done must not cut, and its
    rewards must not reach, another env's advantages."""
    gm, lm, b = cases[-1]
    A, R = compute_gae(**b, gamma=gm, lam=lm)
    errors = []
    for n in range(cfg.n_envs):
        A_n, R_n = compute_gae(**{k: v[:, n:n + 1] for k, v in b.items()}, gamma=gm, lam=lm)
        errors += [max_error(A_n, A[:, n:n + 1]), max_error(R_n, R[:, n:n + 1])]
    return errors


# ---- the day's claim: larger lambda, more variance, less bias --------------------------------------

@gae.fixture(cost=20)
def sweep(cfg, g, compute_gae):
    """Many rollouts from one (s0, a0) of a random episodic MDP, A_lam for every lam on a grid."""
    return M.run(cfg, g, gae_fn=compute_gae)


@gae.check({"ratio": ">= min_variance_ratio", "step_back": "<= monotone_slack"}, kind="outcome",
           hint="lam must reach the recursion; a fixed lam gives a flat curve.")
def variance_grows_with_lambda(sweep):
    """A larger lam sums more future rewards and transitions with less discounting by the critic, so
    the estimate's variance grows towards that of the Monte-Carlo return."""
    var = sweep.variance
    return measure({"ratio": var[-1] / var[0], "step_back": _against_trend(var, increasing=True)},
                   f"Var[A] {var[0].item():.3f} -> {var[-1].item():.3f}")


@gae.check("<= z_max", kind="outcome", hint="no bootstrap after a termination, and the chain cut at every done.")
def bias_vanishes_at_lambda_one(sweep):
    """At lam = 1 the critic only enters as the baseline V(s0) (and a negligible end-of-batch
    bootstrap), so A + V_hat(s0) is an unbiased estimate of Q(s0, a0): |bias| / SE stays small."""
    bias, se = sweep.bias[-1].item(), sweep.bias_se[-1].item()
    return measure(abs(bias / se), f"bias {bias:+.4f} ± {se:.4f}")


@gae.check({"z_at_lambda0": ">= min_bias_z_at_lambda0", "drop": "> 0", "step_back": "<= monotone_slack"},
           kind="outcome", hint="lam must weight the TD errors; with lam ignored the bias is flat.")
def bias_shrinks_with_lambda(sweep):
    """A critic that overestimates by e biases A_lam + V_hat(s0) by (1 - lam) sum_l gamma^l lam^(l-1)
    E[e(s_l)]: the full gamma e at lam = 0, nothing at lam = 1."""
    bias, se = sweep.bias, sweep.bias_se
    return measure({"z_at_lambda0": bias[0] / se[0], "drop": bias[0].abs() - bias[-1].abs(),
                    "step_back": _against_trend(bias.abs(), increasing=False)},
                   f"bias {bias[0].item():+.3f} -> {bias[-1].item():+.3f}")


@gae.check("<= z_max_grid", kind="outcome",
           hint="any mistake in the recursion shifts E[A_lam] away from the exact sum.")
def monte_carlo_bias_matches_analytic(sweep):
    """The sampled bias agrees, in standard errors at every lam, with the exact expectation
    sum_l (gamma lam)^l E[delta_l] computed from the MDP's state distribution."""
    return ((sweep.bias - sweep.bias_analytic) / sweep.bias_se).abs()


@gae.check("<= z_max_grid", kind="outcome", hint="delta must use gamma * V(s'); a missing gamma biases every lam.")
def perfect_critic_is_unbiased_for_every_lambda(sweep):
    """With V_hat = V^pi every TD error after the first has mean zero, so any lam is unbiased (in
    standard errors): the bias of small lam comes from the critic, not from lam."""
    return (sweep.perfect_bias / sweep.perfect_se).abs()


VAR, BIAS = r"Var[$\hat A_0$] (reward$^2$)", r"bias of $\hat A_0$ (reward units)"
CURVES = {"advantage/variance": dict(label="wrong critic", y_label=VAR, key=True,
                                     title=r"Variance of the advantage against $\lambda$"),
          "advantage/variance_perfect_critic": dict(label="perfect critic", y_label=VAR),
          "advantage/bias": dict(label="wrong critic, measured", y_label=BIAS,
                                 title=r"Bias of the advantage against $\lambda$"),
          "advantage/bias_analytic": dict(label="wrong critic, closed form", y_label=BIAS),
          "advantage/bias_perfect_critic": dict(label="perfect critic, measured", y_label=BIAS)}


@gae.report
def curves(ctx, sweep):
    lams, var, bias = sweep.lambdas, sweep.variance, sweep.bias
    for name, y, group in [("advantage/variance", var, "advantage/variance"),
                           ("advantage/variance_perfect_critic", sweep.perfect_variance, "advantage/variance"),
                           ("advantage/bias", bias, "advantage/bias"),
                           ("advantage/bias_analytic", sweep.bias_analytic, "advantage/bias"),
                           ("advantage/bias_perfect_critic", sweep.perfect_bias, "advantage/bias")]:
        ctx.series(name, y, lams, x_label=r"GAE $\lambda$", group=group, smooth=False, **CURVES[name])
    ctx.scalar("Var[A] lam=0", var[0])
    ctx.scalar("Var[A] lam=1", var[-1])
    ctx.scalar("variance ratio lam=1/lam=0", var[-1] / var[0])
    ctx.scalar("bias lam=0", bias[0])
    ctx.scalar("bias lam=1", bias[-1])
    ctx.scalar("bias SE lam=1", sweep.bias_se[-1])
    ctx.scalar("Q(s0,a0)", sweep.q_value)
    ctx.scalar("mean critic error", sweep.critic_error[:-1].mean())
