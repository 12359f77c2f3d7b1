"""Audit of the policy_gradient module (day 3): REINFORCE for sequences against the exact gradient of
an enumerable autoregressive policy; baselines, reward-to-go, and the closed loop."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.policy_gradient import policy_gradient as M

HAND = {"logprobs": [[-1.0, -2.0], [-0.5, 9.0]], "mask": [[1.0, 1.0], [1.0, 0.0]],
        "rewards": [2.0, 0.0], "baseline": 1.0}  # the docstring's worked example
HAND_LOSS, HAND_GRAD = 1.25, [[-0.5, -0.5], [0.5, 0.0]]  # dL/dlogprobs = -(R - b) * mask / B
EXACT_TOL = 1e-12  # float64 sums over ~100 sequences
BASELINE_GRID = 81  # constant baselines on which the exact variance is evaluated
BASELINE_STEP = 0.01  # b* must also beat b* - step and b* + step
WIDE = 0.5  # the parabola's vertex is found from b* and b* +- WIDE
BATCH_GROUPS = (1, 4, 16, 64, 256)  # batch sizes (in groups) for the MSE-vs-batch-size curve
LOCKED = 0.05  # an agent whose gap to J* stays above this has locked into a poor deterministic policy


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"logprobs": -2.0 * torch.rand(3, 4, generator=g, dtype=M.DTYPE),
            "rewards": torch.tensor([1.0, 0.0, 3.0], dtype=M.DTYPE), "baseline": 1.0,
            "mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=M.DTYPE)}


KERNELS = [
    kernel(M.reinforce_loss, example=_example,
           hint="-(R - b).detach() * (logprobs * mask).sum(-1), then .mean() over the batch: sum tokens, "
                "average sequences, and mind the sign (the loss descends, the policy ascends)."),
]

pg = Audit("policy_gradient", day=3, title="REINFORCE for sequences: exact gradient, baselines, reward-to-go",
           config=M.PolicyGradientConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=M.DTYPE)


def _loss_and_grad(reinforce_loss, logprobs, rewards, baseline, mask):
    leaf = logprobs.clone().requires_grad_(True)
    loss = reinforce_loss(leaf, rewards, baseline, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, grad


# ---- the exact landscape: every sequence enumerated -------------------------------------------------

@pg.fixture
def land(cfg, g):
    """A random policy theta ~ 0.5 N(0, 1) with its exact p(y), J and grad J (autograd of the sum)."""
    return M.random_landscape(cfg, g)


@pg.check(f"< {EXACT_TOL}", hint="stop at the first EOS: tokens after it are padding and their log-probs "
                                 "must be masked.")
def sequence_probabilities_sum_to_one(land):
    """p(y) is the product of the token probabilities up to and including EOS; summed over every possible
    sequence it is 1, which is what makes J and grad J exact sums (module code, no kernel)."""
    total = land.probs.sum().item()
    return measure(abs(total - 1.0), f"{land.enum.tokens.shape[0]} sequences, sum p = {total:.15f}")


@pg.check(f"< {EXACT_TOL}", hint="minus sign, (R - b) not (R + b), sum over tokens, mean over sequences.")
def reinforce_loss_matches_hand_vector(reinforce_loss):
    """L = -(1/B) sum_i (R_i - b) sum_t m_it log pi_it: logprobs [[-1,-2],[-.5,9]], mask [[1,1],[1,0]],
    R [2,0], b 1 give L = 1.25 and dL/dlogprobs [[-.5,-.5],[.5,0]], for a float, 0-dim or (B,) baseline."""
    lp, mask, rewards = _t(HAND["logprobs"]), _t(HAND["mask"]), _t(HAND["rewards"])
    errors = []
    for b in (HAND["baseline"], _t(HAND["baseline"]), torch.full((2,), HAND["baseline"], dtype=M.DTYPE)):
        loss, grad = _loss_and_grad(reinforce_loss, lp, rewards, b, mask)
        errors += [max_error(loss, _t(HAND_LOSS)), max_error(grad, _t(HAND_GRAD))]
    return errors


@pg.check(f"< {EXACT_TOL}", hint="multiply (or torch.where) by the mask before summing over tokens.")
def loss_ignores_padded_positions(reinforce_loss, land, g):
    """Only generated tokens (EOS included) carry the sequence's log-probability; whatever the model
    computes after EOS is padding and must get exactly zero weight, even with extra pad columns."""
    B, L = 64, land.enum.task.max_len
    ro = M.sample_rollouts(land, B, g)
    model_lp = M.token_logprobs(land.theta, ro.tokens, M.prefix_ids(ro.tokens, land.enum.task))
    garbage = 10.0 * torch.randn(B, L + 3, generator=g, dtype=M.DTYPE)
    padded_lp = torch.cat([torch.where(ro.mask.bool(), model_lp, garbage[:, :L]), garbage[:, L:]], dim=1)
    padded_mask = torch.cat([ro.mask, torch.zeros(B, 3, dtype=M.DTYPE)], dim=1)
    loss, grad = _loss_and_grad(reinforce_loss, model_lp, ro.rewards, 1.0, ro.mask)
    loss_p, grad_p = _loss_and_grad(reinforce_loss, padded_lp, ro.rewards, 1.0, padded_mask)
    return measure([max_error(loss_p, loss), max_error(grad_p[:, :L], grad),
                    max_error(grad[ro.mask == 0], torch.zeros(int((ro.mask == 0).sum()), dtype=M.DTYPE)),
                    max_error(grad_p[padded_mask == 0], torch.zeros(int((padded_mask == 0).sum()), dtype=M.DTYPE))],
                   "change in loss, in gradient, and gradient on padding (3 extra pad columns)")


@pg.check("== 0", hint="(rewards - baseline).detach() before multiplying by the log-probs.")
def advantage_is_detached(reinforce_loss, land, g):
    """The advantage R - b is a constant weight: the policy gradient flows only through log pi, and a
    learned baseline must not be trained by the policy loss (dL/dR = dL/db = 0 exactly)."""
    ro = M.sample_rollouts(land, 64, g)
    logprobs = M.token_logprobs(land.theta, ro.tokens, M.prefix_ids(ro.tokens, land.enum.task))
    leaks = []
    for b in (torch.tensor(1.0, dtype=M.DTYPE), torch.full((64,), 1.0, dtype=M.DTYPE)):
        r, b = ro.rewards.clone().requires_grad_(True), b.requires_grad_(True)
        loss = reinforce_loss(logprobs.clone().requires_grad_(True), r, b, ro.mask)
        grads = torch.autograd.grad(loss, [r, b], allow_unused=True)
        leaks += [0.0 if x is None else x.abs().max() for x in grads]
    return leaks


# ---- exact moments of one-sequence estimators: sequence y gets its own copy of the table ------------

def _per_sequence(land, surrogate) -> torch.Tensor:
    return M.per_sequence_gradients(land.theta, land.enum.tokens, land.enum.task, surrogate)


def _exact(land, surrogate) -> tuple[torch.Tensor, float]:
    return M.exact_moments(land.probs, _per_sequence(land, surrogate))


@pg.fixture
def scores(land, reinforce_loss):
    """grad log p(y) of every sequence, through the kernel with R = 1, b = 0."""
    e = land.enum
    return _per_sequence(land, lambda x: reinforce_loss(x, torch.ones_like(e.rewards), 0.0, e.mask))


@pg.check(f"< {EXACT_TOL}", hint="sum the token log-probs per sequence (no length normalisation) and average "
                                 "sequences.")
def expected_estimate_equals_exact_gradient(reinforce_loss, land, scores):
    """The log-derivative trick: sum_y p(y) (R(y) - b) grad log p(y) = grad J for any constant b, because
    sum_y p(y) grad log p(y) = grad sum_y p(y) = 0; checked for b in {0, J, b*, 5}."""
    e = land.enum
    b_star = M.optimal_constant_baseline(land.probs, e.rewards, scores)
    errors = [max_error(_exact(land, lambda x, b=b: reinforce_loss(x, e.rewards, b, e.mask))[0], land.grad)
              for b in (0.0, land.J, b_star, 5.0)]
    return measure(errors, f"over all {e.tokens.shape[0]} sequences")


@pg.check(f"< {EXACT_TOL}", hint="reward r_k must credit the tokens 0..k (mask t <= k); a reward placed one "
                                 "token late or early breaks causality.")
def reward_to_go_has_the_same_expectation(reinforce_loss, land):
    """Token t cannot change rewards already paid before it, so E[r_k grad log pi_t] = 0 for k < t:
    weighting each token by its reward-to-go G_t keeps the expectation (b = 0 and b = J) and drops noise."""
    e = land.enum
    return [max_error(_exact(land, lambda x, b=b: M.reward_to_go_loss(x, e.token_rewards, b, e.mask,
                                                                      reinforce_loss))[0], land.grad)
            for b in (0.0, land.J)]


@pg.fixture
def parabola(land, scores, reinforce_loss):
    """Exact tr Cov of the one-sequence estimator at b*, at b* +- step, b* +- WIDE and on a grid of baselines."""
    e = land.enum
    b_star = M.optimal_constant_baseline(land.probs, e.rewards, scores)
    grid = torch.linspace(e.rewards.min().item() - 1.0, e.rewards.max().item() + 1.0, BASELINE_GRID).tolist()

    def trace(b: float) -> float:
        return _exact(land, lambda x: reinforce_loss(x, e.rewards, b, e.mask))[1]

    return {"b_star": b_star, "at_b_star": trace(b_star), "grid": grid, "curve": [trace(b) for b in grid],
            "neighbours": [trace(b_star - BASELINE_STEP), trace(b_star + BASELINE_STEP)],
            "wide": [trace(b_star - WIDE), trace(b_star + WIDE)]}


@pg.check({"vertex_offset": "< 1e-6", "beaten_by": "<= 1e-9"},
          hint="the scores s come from the kernel with R = 1, b = 0; if it length-normalises or ignores the mask "
               "they lose their zero mean and b* = E[R |s|^2] / E[|s|^2] is no longer the minimum.")
def optimal_constant_baseline_minimises_variance(land, parabola):
    """tr Cov of (R - b) grad log p is exactly a parabola in b with its vertex at b* = E[R |s|^2] / E[|s|^2]:
    the vertex of the parabola through b* and b* +- 0.5 is b* itself, and no baseline on a grid does better.
    The mean reward is close to, but not exactly, the best constant baseline."""
    best, (lo, hi) = parabola["at_b_star"], parabola["wide"]
    curvature = hi - 2 * best + lo  # > 0 for a parabola that opens upwards
    vertex = parabola["b_star"] - WIDE * (hi - lo) / (2 * curvature) if curvature > 0 else math.nan
    excess = [(best - t) / abs(t) if t != 0 else math.nan for t in parabola["curve"] + parabola["neighbours"]]
    return measure({"vertex_offset": abs(vertex - parabola["b_star"]), "beaten_by": excess},
                   f"b* = {parabola['b_star']:.4f} (J = {land.J:.4f}), tr Cov {best:.5f}; beaten_by: relative "
                   f"excess over b* ± {BASELINE_STEP:g} and {BASELINE_GRID} grid values (> 0: a rival wins)")


# ---- Monte-Carlo: the sampled estimators ------------------------------------------------------------

@pg.fixture
def rollouts(cfg, g, land):
    """n_groups * group_size sequences sampled at the rollout temperature (no kernel involved)."""
    return M.sample_rollouts(land, cfg.n_groups * cfg.group_size, g, cfg.sample_temperature)


@pg.fixture(cost=3)
def groups(cfg, land, rollouts, reinforce_loss):
    """Per-group gradient estimates (G, D) of no baseline, RLOO, RLOO + reward-to-go and the group mean."""
    return M.group_gradients(land, rollouts, cfg.group_size, reinforce_loss)


@pg.check("<= z_max", kind="outcome", hint="sample at temperature 1 (or compute the log-probs at the rollout's "
                                           "temperature), stop at the first EOS, read the row of the right prefix.")
def sampled_sequences_follow_exact_probabilities(land, rollouts):
    """The rollout must sample from the very distribution whose log-probs the loss uses: the counts of the
    121 sequences pass a chi-square goodness-of-fit test against the exact p(y) (cells expected fewer than
    5 times pooled), reported as a normal z by the Wilson-Hilferty transform (module code, no kernel)."""
    n = rollouts.tokens.shape[0]
    counts = torch.bincount(M.sequence_index(rollouts.tokens, land.enum), minlength=land.probs.numel()).double()
    expected = n * land.probs
    rare = expected < 5
    if rare.any():  # one pooled cell for the rare sequences
        counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    chi2, df = ((counts - expected) ** 2 / expected).sum().item(), counts.numel() - 1
    z = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return measure(z, f"chi2 = {chi2:.1f} on {df} degrees of freedom ({n} sequences); mean reward "
                      f"{rollouts.rewards.mean().item():.4f} vs J = {land.J:.4f}")


@pg.check("<= z_max", kind="outcome", hint="no length normalisation, baseline from the other samples only, "
                                           "rollout and loss at the same temperature.")
def sampled_gradient_is_unbiased(cfg, land, groups):
    """REINFORCE, RLOO and RLOO with reward-to-go all average to the exact gradient: a baseline built from
    the other samples is independent of the sequence it is subtracted from. Each per-group estimate is
    bounded, so |mean - grad J| / SE is normal for components whose prefix is visited often enough."""
    visits = M.prefix_visits(land.probs, land.enum) * cfg.n_groups * cfg.group_size
    tested = (visits >= cfg.min_visits).repeat_interleave(cfg.vocab_size)  # from the exact p, not the sample
    zs = []
    for name in M.ESTIMATORS:
        est = groups[name]
        z = (est.mean(0) - land.grad) / (est.std(0) / math.sqrt(est.shape[0]))
        zs.append(z[tested].abs())
    return measure(torch.cat(zs), f"max over {len(M.ESTIMATORS)} estimators x {int(tested.sum())} components "
                                  f"(prefixes expected >= {cfg.min_visits} times)")


@pg.check(f"< {EXACT_TOL}", hint="RLOO divides the sum of the *other* k-1 rewards by k-1; the group mean divides "
                                 "all k by k.")
def group_mean_baseline_shrinks_gradient(cfg, groups):
    """A baseline that includes the sample's own reward is correlated with its score: R_i - mean(R) =
    (k-1)/k (R_i - mean of the others), so every group's estimate is (k-1)/k times RLOO's and the expected
    gradient shrinks to (k-1)/k grad J."""
    shrink = (cfg.group_size - 1) / cfg.group_size
    return max_error(groups["group_mean"], shrink * groups["rloo"])


@pg.check(">= min_variance_ratio", kind="outcome", hint="subtract the baseline (R - b), do not add it.")
def baseline_reduces_variance(cfg, groups):
    """Rewards here are all >= 0, so without a baseline every sampled sequence is pushed up; subtracting
    the others' mean keeps only 'better or worse than usual' and tr Cov of the estimate drops."""
    trace = {name: groups[name].var(0).sum().item() * cfg.group_size for name in M.ESTIMATORS}
    return measure(trace["no_baseline"] / trace["rloo"],
                   f"tr Cov per sequence: no baseline {trace['no_baseline']:.3g}, RLOO {trace['rloo']:.3g}")


# ---- closed loop: gradient ascent on the gold reward, many agents at once ---------------------------

@pg.fixture(cost=4)
def loop(cfg, g, land, reinforce_loss):
    """8 (toy) or 16 (full) agents per estimator climb J from the uniform policy, 32 sequences a step."""
    return M.train(land.enum, cfg, g, loss_fn=reinforce_loss)


@pg.check("<= max_final_gap", kind="outcome", hint="the loss is minus the objective: descending it must "
                                                    "raise J.")
def gradient_ascent_reaches_near_optimal_reward(loop):
    """Stochastic gradient ascent with the RLOO estimate climbs the exact expected gold reward from the
    uniform policy to nearly the best sequence's reward: the agents' mean (J* - J) / (J* - J_uniform) goes
    from 1 to near 0 (a rare agent can still lock into a poor deterministic policy)."""
    gap = 1.0 - loop.normalized[-1, 0]  # (n_agents,)
    return measure(gap.mean(), f"worst of {gap.numel()} RLOO agents {gap.max().item():.3f}, "
                               f"{int((gap > LOCKED).sum())} locked; J {loop.J_uniform:.3f} -> "
                               f"{loop.J[-1, 0].mean().item():.3f}, J* = {loop.J_star:g}")


# ---- report ----------------------------------------------------------------------------------------

TRACE = "tr Cov of the gradient estimate"
WORDS = {"no_baseline": "no baseline", "mean_reward": "b = J", "shift_5": "b = 5", "optimal": "b = b*",
         "reward_to_go": "reward-to-go", "reward_to_go_mean_reward": "reward-to-go, b = J", "rloo": "RLOO",
         "rloo_reward_to_go": "RLOO with reward-to-go", "group_mean": "group mean"}


@pg.report
def exact_variances(ctx, land, parabola, reinforce_loss):
    e, b_star = land.enum, parabola["b_star"]
    var = {"no_baseline": 0.0, "mean_reward": land.J, "shift_5": 5.0}
    var = {name: _exact(land, lambda x, b=b: reinforce_loss(x, e.rewards, b, e.mask))[1] for name, b in var.items()}
    var["optimal"] = parabola["at_b_star"]
    for name, b in (("reward_to_go", 0.0), ("reward_to_go_mean_reward", land.J)):
        var[name] = _exact(land, lambda x, b=b: M.reward_to_go_loss(x, e.token_rewards, b, e.mask, reinforce_loss))[1]
    ctx.series("variance/exact_trace_cov_vs_baseline", parabola["curve"], parabola["grid"],
               x_label="constant baseline b (reward units)", smooth=False, label="exact variance",
               y_label=TRACE, title="Exact gradient variance against a constant baseline")
    ctx.series("variance/exact_trace_cov_at_b_star", [var["optimal"]], [b_star], x_label="constant baseline b (reward units)",
               group="variance/exact_trace_cov_vs_baseline", smooth=False, label="optimal baseline b*", y_label=TRACE)
    names = list(var)
    ctx.series("variance/exact_trace_cov", [var[n] for n in names], list(range(len(names))),
               x_label="estimator", smooth=False, ticks=[WORDS[n] for n in names],
               label="exact gradient variance per estimator", y_label=TRACE)
    ctx.scalar("sequences enumerated", e.tokens.shape[0])
    ctx.scalar("J(theta) at the test logits", land.J)
    ctx.scalar("b* - J", b_star - land.J)
    ctx.scalar("b* optimal constant baseline", b_star)
    for name in names:
        ctx.scalar(f"exact tr Cov {name}", var[name])


@pg.report
def sampled_variances(ctx, cfg, land, groups):
    k, G = cfg.group_size, cfg.n_groups
    trace = {name: est.var(0).sum().item() * k for name, est in groups.items()}
    ctx.series("variance/trace_cov", [trace[n] for n in M.ESTIMATORS], list(range(len(M.ESTIMATORS))),
               x_label="estimator", smooth=False, ticks=[WORDS[n] for n in M.ESTIMATORS],
               label="sampled gradient variance per estimator", y_label=TRACE)
    for name in M.ESTIMATORS:
        est, sizes = groups[name], [b for b in BATCH_GROUPS if G // b >= 4]
        mse = [((est[: G // b * b].view(G // b, b, -1).mean(1) - land.grad) ** 2).sum(-1).mean().item()
               for b in sizes]
        ctx.series(f"variance/log10_mse_{name}", [math.log10(v) for v in mse], [math.log2(b * k) for b in sizes],
                   x_label=r"$\log_2$ batch size (sequences)", group="variance/log10_mse_vs_batch_size", smooth=False,
                   label=WORDS[name], y_label=r"$\log_{10}$ squared error to the true gradient",
                   title="Gradient error against batch size")
        ctx.scalar(f"sampled tr Cov {name}", trace[name])
    ctx.scalar("variance ratio no_baseline / rloo", trace["no_baseline"] / trace["rloo"])
    proj = (groups["group_mean"] @ land.grad) / (land.grad ** 2).sum()  # (G,) along grad J, in its units
    ctx.scalar("group-mean estimator / grad J", proj.mean())


@pg.report
def learning_curves(ctx, cfg, loop):
    steps, score = cfg.train_steps, loop.normalized  # (steps + 1, 2, n_agents)
    x = torch.arange(steps + 1) * cfg.batch_size
    j_axis = r"exact $J(\theta)$, mean over agents (reward per sequence)"
    for name, y, words in (("rloo", loop.J[:, 0].mean(-1), "RLOO agents"),
                           ("no_baseline", loop.J[:, 1].mean(-1), "agents without a baseline"),
                           ("exact_gradient", loop.J_exact_ascent, "exact gradient ascent")):
        ctx.series(f"charts/expected_reward_{name}", y, x, x_label="sequences per agent", group="charts/expected_reward",
                   smooth=False,  # exact J, not a noisy sample: an EMA would only lag
                   label=words, y_label=j_axis, key=name == "rloo", title="Learning curves: exact expected reward")
    ctx.series("reward", loop.batch_reward[:, 0], x[:-1], x_label="sequences per agent",
               label="sampled reward, RLOO agents", y_label="reward per sequence")
    ctx.series("reward_std", loop.batch_reward_std[:, 0], x[:-1], x_label="sequences per agent",
               label="spread of the sampled reward, RLOO agents", y_label="reward std per batch")
    final = score[-1]
    locked = (1.0 - final > LOCKED).double().mean(-1)  # fraction of agents locked short of J*
    ctx.scalar("agents locked: rloo", locked[0])
    ctx.scalar("agents locked: no_baseline", locked[1])
    ctx.scalar("J uniform policy", loop.J_uniform)
    ctx.scalar("J* (best sequence)", loop.J_star)
    ctx.scalar("final normalized J rloo (worst agent)", final[0].min())
    ctx.scalar("final normalized J rloo (mean)", final[0].mean())
    ctx.scalar("final normalized J no_baseline (mean)", final[1].mean())
    ctx.scalar("final normalized J exact gradient",
               (loop.J_exact_ascent[-1] - loop.J_uniform) / (loop.J_star - loop.J_uniform))
