"""Audit of the policy_gradient module (day 3): REINFORCE for sequences against the exact gradient of
an enumerable autoregressive policy; baselines, reward-to-go, and the closed loop."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules.policy_gradient import policy_gradient as M

HAND = {"logprobs": [[-1.0, -2.0], [-0.5, 9.0]], "mask": [[1.0, 1.0], [1.0, 0.0]],
        "rewards": [2.0, 0.0], "baseline": 1.0}  # the docstring's worked example
HAND_LOSS, HAND_GRAD = 1.25, [[-0.5, -0.5], [0.5, 0.0]]  # dL/dlogprobs = -(R - b) * mask / B
EXACT_TOL = 1e-12  # float64 sums over ~100 sequences
BASELINE_GRID = 81  # constant baselines on which the exact variance is evaluated
BASELINE_STEP = 0.01  # b* must also beat b* - step and b* + step
MIN_VISITS = 500  # z-test only components whose prefix the sample is expected to visit this often
BATCH_GROUPS = (1, 4, 16, 64, 256)  # batch sizes (in groups) for the MSE-vs-batch-size curve
VARIANCE_BAR = 2.0  # tr Cov(no baseline) / tr Cov(RLOO); measured 3.1-5.3 (toy 0-29), 3.8-5.2 (full 0-5)
FINAL_BAR = 0.95  # every RLOO agent ends this far from uniform to J*; measured >= 0.99 (toy 0-29, full 0-5)


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


@audit("policy_gradient", day=3, title="REINFORCE for sequences: exact gradient, baselines, reward-to-go",
       config=M.PolicyGradientConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_policy_gradient(ctx: Context, *, reinforce_loss=M.reinforce_loss) -> None:
    cfg: M.PolicyGradientConfig = ctx.config
    g_task, g_sample, g_train = ctx.generator(0), ctx.generator(1), ctx.generator(2)
    task = M.SequenceTask(cfg.vocab_size, cfg.max_len)
    enum = M.enumerate_task(task)
    P, V, k = task.n_prefixes, task.vocab_size, cfg.group_size
    theta = cfg.theta_scale * torch.randn(P, V, generator=g_task, dtype=M.DTYPE)
    probs = M.sequence_probs(theta, enum)  # (N,) p(y) of every sequence
    J = (probs @ enum.rewards).item()
    true_grad = M.exact_gradient(theta, enum).flatten()  # autograd through the exact sum: the truth
    ctx.scalar("sequences enumerated", enum.tokens.shape[0])
    ctx.scalar("J(theta) at the test logits", J)

    # ---- exact math -----------------------------------------------------------------------------
    total = probs.sum().item()
    ctx.check("sequence_probabilities_sum_to_one", abs(total - 1.0) < EXACT_TOL,
              f"{enum.tokens.shape[0]} sequences, sum p = {total:.15f}", f"|sum_y p(y) - 1| < {EXACT_TOL:g}",
              "p(y) is the product of the token probabilities up to and including EOS; summed over every "
              "possible sequence it is 1, which is what makes J and grad J exact sums.",
              hint="stop at the first EOS: tokens after it are padding and their log-probs must be masked.")

    lp = torch.tensor(HAND["logprobs"], dtype=M.DTYPE)
    mask2 = torch.tensor(HAND["mask"], dtype=M.DTYPE)
    rewards2 = torch.tensor(HAND["rewards"], dtype=M.DTYPE)
    hand_err = 0.0
    for b in (HAND["baseline"], torch.tensor(HAND["baseline"], dtype=M.DTYPE),
              torch.full((2,), HAND["baseline"], dtype=M.DTYPE)):  # float, 0-dim and (B,) baselines
        leaf = lp.clone().requires_grad_(True)
        loss = reinforce_loss(leaf, rewards2, b, mask2)
        (grad,) = torch.autograd.grad(loss, leaf)
        hand_err = max(hand_err, abs(loss.item() - HAND_LOSS),
                       (grad - torch.tensor(HAND_GRAD, dtype=M.DTYPE)).abs().max().item())
    ctx.check("reinforce_loss_matches_hand_vector", hand_err < EXACT_TOL,
              f"max error {hand_err:.2e} (loss and dL/dlogprobs, 3 baseline forms)",
              f"loss {HAND_LOSS}, dL/dlogprobs {HAND_GRAD}, error < {EXACT_TOL:g}",
              "L = -(1/B) sum_i (R_i - b) sum_t m_it log pi_it: each token's log-prob gets the weight "
              "-(R_i - b)/B, the same for every token of a sequence and 0 on padding.",
              hint="minus sign, (R - b) not (R + b), sum over tokens, mean over sequences.")

    # a sampled batch: the model's own log-probs after EOS are finite garbage the mask must remove
    B = 64
    tokens = M.sample_sequences(theta, torch.zeros(B, dtype=torch.long), task, g_sample)
    mask = M.response_mask(tokens, task.eos)
    rewards = M.token_rewards(tokens, mask, task.eos).sum(-1)
    model_lp = M.token_logprobs(theta, tokens, M.prefix_ids(tokens, task))
    garbage = 10.0 * torch.randn(B, cfg.max_len + 3, generator=g_sample, dtype=M.DTYPE)
    padded_lp = torch.cat([model_lp, garbage[:, cfg.max_len:]], dim=1)  # 3 extra pad columns
    padded_lp[:, :cfg.max_len] = torch.where(mask.bool(), model_lp, garbage[:, :cfg.max_len])
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=M.DTYPE)], dim=1)
    outs = []
    for values, m in ((model_lp, mask), (padded_lp, padded_mask)):
        leaf = values.clone().requires_grad_(True)
        loss = reinforce_loss(leaf, rewards, 1.0, m)
        (grad,) = torch.autograd.grad(loss, leaf)
        outs.append((loss.item(), grad))
    d_loss = abs(outs[0][0] - outs[1][0])
    d_grad = (outs[0][1] - outs[1][1][:, :cfg.max_len]).abs().max().item()
    pad_grad = max(torch.where(m == 0, out[1], 0.0).abs().max().item()
                   for out, m in zip(outs, (mask, padded_mask)))
    worst = max(d_loss, d_grad, pad_grad)
    ctx.check("loss_ignores_padded_positions", worst < EXACT_TOL,
              f"|dL| {d_loss:.1e}, |d grad| {d_grad:.1e}, |grad on padding| {pad_grad:.1e}",
              f"all < {EXACT_TOL:g} after replacing padded log-probs and adding 3 pad columns",
              "Only generated tokens (EOS included) carry the sequence's log-probability; whatever the model "
              "computes after EOS is padding and must get exactly zero weight.",
              hint="multiply (or torch.where) by the mask before summing over tokens.")

    leaf = model_lp.clone().requires_grad_(True)
    r_leaf = rewards.clone().requires_grad_(True)
    b_scalar = torch.tensor(1.0, dtype=M.DTYPE, requires_grad=True)
    b_vector = torch.full((B,), 1.0, dtype=M.DTYPE, requires_grad=True)
    leaks = 0.0
    for b in (b_scalar, b_vector):
        grads = torch.autograd.grad(reinforce_loss(leaf, r_leaf, b, mask), [r_leaf, b],
                                    allow_unused=True)
        leaks = max([leaks] + [g.abs().max().item() for g in grads if g is not None])
    ctx.check("advantage_is_detached", leaks == 0.0, f"max |dL/dR|, |dL/db| = {leaks:.3g}", "exactly 0",
              "The advantage R - b is a constant weight: the policy gradient flows only through log pi, "
              "and a learned baseline must not be trained by the policy loss.",
              hint="(rewards - baseline).detach() before multiplying by the log-probs.")
    ctx.progress(0.1)

    # exact mean and variance of one-sequence estimators: sequence y gets its own copy of the table
    def per_seq(surrogate) -> torch.Tensor:
        return M.per_sequence_gradients(theta, enum.tokens, task, surrogate)

    R_all, m_all, r_all = enum.rewards, enum.mask, enum.token_rewards
    scores = per_seq(lambda x: reinforce_loss(x, torch.ones_like(R_all), 0.0, m_all))  # grad log p(y)
    b_star = M.optimal_constant_baseline(probs, R_all, scores)
    exact_var, bias = {}, 0.0
    for name, b in (("no_baseline", 0.0), ("mean_reward", J), ("optimal", b_star), ("shift_5", 5.0)):
        table = per_seq(lambda x, b=b: reinforce_loss(x, R_all, b, m_all))
        mean, exact_var[name] = M.exact_moments(probs, table)
        bias = max(bias, (mean - true_grad).abs().max().item())
    ctx.check("expected_estimate_equals_exact_gradient", bias < EXACT_TOL,
              f"max |E[g] - grad J| = {bias:.2e} over b in {{0, J, b*, 5}}",
              f"< {EXACT_TOL:g}, E[g] = sum_y p(y) g(y) over all {enum.tokens.shape[0]} sequences",
              "The log-derivative trick: sum_y p(y) (R(y) - b) grad log p(y) = grad J for any constant b, "
              "because sum_y p(y) grad log p(y) = grad sum_y p(y) = 0.",
              hint="sum the token log-probs per sequence (no length normalisation) and average sequences.")

    rtg_var = {}
    rtg_bias = 0.0
    for name, b in (("reward_to_go", 0.0), ("reward_to_go_mean_reward", J)):
        table = per_seq(lambda x, b=b: M.reward_to_go_loss(x, r_all, b, m_all, reinforce_loss))
        mean, rtg_var[name] = M.exact_moments(probs, table)
        rtg_bias = max(rtg_bias, (mean - true_grad).abs().max().item())
    ctx.check("reward_to_go_has_the_same_expectation", rtg_bias < EXACT_TOL,
              f"max |E[g_rtg] - grad J| = {rtg_bias:.2e} (b = 0 and b = J)", f"< {EXACT_TOL:g}",
              "Token t cannot change rewards already paid before it, so E[r_k grad log pi_t] = 0 for k < t: "
              "weighting each token by its reward-to-go G_t keeps the expectation and drops noise.",
              hint="reward r_k must credit the tokens 0..k (mask t <= k); a reward placed one token late or "
                   "early breaks causality.")
    exact_var.update(rtg_var)

    grid = torch.linspace(R_all.min().item() - 1.0, R_all.max().item() + 1.0, BASELINE_GRID).tolist()

    def exact_trace(b: float) -> float:
        return M.exact_moments(probs, per_seq(lambda x: reinforce_loss(x, R_all, b, m_all)))[1]

    curve = [exact_trace(b) for b in grid]
    rivals = curve + [exact_trace(b_star - BASELINE_STEP), exact_trace(b_star + BASELINE_STEP)]
    gap = exact_var["optimal"] - min(rivals)
    ctx.check("optimal_constant_baseline_minimises_variance", gap <= 1e-9 * max(rivals),
              f"b* = {b_star:.4f} (J = {J:.4f}): tr Cov {exact_var['optimal']:.5f}, "
              f"at b* ± {BASELINE_STEP:g} and on the grid >= {min(rivals):.5f}",
              f"tr Cov(b*) <= tr Cov(b) for b* ± {BASELINE_STEP:g} and {BASELINE_GRID} grid values",
              "tr Cov of (R - b) grad log p is a parabola in b with minimum at b* = E[R |s|^2] / E[|s|^2]: "
              "the mean reward is close to, but not exactly, the best constant baseline.",
              hint="the scores s come from the kernel with R = 1, b = 0; if it length-normalises or ignores "
                   "the mask they lose their zero mean and b* = E[R |s|^2] / E[|s|^2] is no longer the "
                   "minimum.")
    ctx.series("variance/exact_trace_cov_vs_baseline", curve, grid, x_label="constant baseline b",
               smooth=False)
    ctx.series("variance/exact_trace_cov_at_b_star", [exact_var["optimal"]], [b_star],
               x_label="constant baseline b", group="variance/exact_trace_cov_vs_baseline", smooth=False)
    names = list(exact_var)
    ctx.series("variance/exact_trace_cov", [exact_var[n] for n in names], list(range(len(names))),
               x_label="estimator (" + ", ".join(f"{i} {n}" for i, n in enumerate(names)) + ")", smooth=False)
    ctx.scalar("b* optimal constant baseline", b_star)
    for name in names:
        ctx.scalar(f"exact tr Cov {name}", exact_var[name])
    ctx.progress(0.3)

    # ---- Monte-Carlo: the sampled estimators ---------------------------------------------------
    G = cfg.n_groups
    tokens = M.sample_sequences(theta, torch.zeros(G * k, dtype=torch.long), task, g_sample,
                                cfg.sample_temperature)
    mask = M.response_mask(tokens, task.eos)
    tok_r = M.token_rewards(tokens, mask, task.eos)
    rewards = tok_r.sum(-1)
    r_mean, r_se = rewards.mean().item(), (rewards.std() / math.sqrt(G * k)).item()
    z_J = (r_mean - J) / max(r_se, 1e-12)
    ctx.check("sampled_mean_reward_matches_exact_J", abs(z_J) <= cfg.z_max,
              f"{r_mean:.4f} ± {r_se:.4f} vs J={J:.4f} (z={z_J:.2f})", f"|z| <= {cfg.z_max:g}",
              "The rollout samples from the same distribution whose log-probs the loss uses, so the "
              "average sampled reward estimates J = sum_y p(y) R(y).", kind="outcome",
              hint="sample at temperature 1 (or compute the log-probs at the rollout's temperature).")

    loo = M.leave_one_out_baseline(rewards.view(G, k)).reshape(-1)
    group_mean = M.group_mean_baseline(rewards.view(G, k)).reshape(-1)
    surrogates = {
        "no_baseline": lambda x: reinforce_loss(x, rewards, 0.0, mask),
        "rloo": lambda x: reinforce_loss(x, rewards, loo, mask),
        "rloo_reward_to_go": lambda x: M.reward_to_go_loss(x, tok_r, loo, mask, reinforce_loss),
        "group_mean": lambda x: reinforce_loss(x, rewards, group_mean, mask),
    }
    groups = {}  # (G, D): one gradient estimate per group of k sequences (its batch mean)
    for name, surrogate in surrogates.items():
        groups[name] = M.per_sequence_gradients(theta, tokens, task, surrogate).view(G, k, -1).mean(1)
    ctx.progress(0.5)

    # skewed components of rarely visited prefixes break the normal approximation: test the others
    tested = (M.prefix_visits(probs, enum) * G * k >= MIN_VISITS).repeat_interleave(V)
    worst_z, worst_at = 0.0, ""
    for name in M.ESTIMATORS:
        est = groups[name]
        mean, se = est.mean(0), est.std(0) / math.sqrt(G)
        z = ((mean - true_grad) / se.clamp_min(1e-300))[tested].abs()
        if z.max().item() > worst_z:
            worst_z, worst_at = z.max().item(), name
    n_comp = len(M.ESTIMATORS) * int(tested.sum())
    ctx.check("sampled_gradient_is_unbiased", worst_z <= cfg.z_max,
              f"max|z| = {worst_z:.2f} ({worst_at}) over {n_comp} components",
              f"max over estimators and components of |mean - grad J| / SE <= {cfg.z_max:g} (SE over "
              f"{G} groups; components of prefixes expected >= {MIN_VISITS} times)",
              "REINFORCE, RLOO and reward-to-go with RLOO all average to the exact gradient: a baseline "
              "built from the other samples is independent of the sequence it is subtracted from.",
              kind="outcome",
              hint="no length normalisation, baseline from the other samples only, rollout and loss at the "
                   "same temperature.")
    ctx.scalar("max |z| unbiasedness", worst_z)

    # R_i - mean(R) = (k-1)/k (R_i - mean of the others): the plain group mean is RLOO shrunk by (k-1)/k
    shrink = (k - 1) / k
    identity_err = (groups["group_mean"] - shrink * groups["rloo"]).abs().max().item()
    proj = (groups["group_mean"] @ true_grad) / (true_grad ** 2).sum()  # (G,) along grad J, in its units
    c, c_se = proj.mean().item(), (proj.std() / math.sqrt(G)).item()
    ctx.check("group_mean_baseline_shrinks_gradient", identity_err < EXACT_TOL,
              f"max |g_mean - {shrink:.2f} g_rloo| = {identity_err:.1e}; sampled E[g_mean] = "
              f"{c:.3f} ± {c_se:.3f} x grad J", f"g_mean = (k-1)/k g_rloo per group (error < {EXACT_TOL:g})",
              "A baseline that includes the sample's own reward is correlated with its score: R_i - mean(R) "
              "= (k-1)/k (R_i - mean of the others), so the expected gradient shrinks to (k-1)/k grad J.",
              hint="RLOO divides the sum of the *other* k-1 rewards by k-1; the group mean divides all k "
                   "by k.")
    ctx.scalar("group-mean estimator / grad J", c)

    trace = {name: est.var(0).sum().item() * k for name, est in groups.items()}  # per sequence
    ratio = trace["no_baseline"] / trace["rloo"]
    ctx.check("baseline_reduces_variance", ratio >= VARIANCE_BAR,
              f"tr Cov per sequence: no baseline {trace['no_baseline']:.3g}, RLOO {trace['rloo']:.3g}, "
              f"RLOO + reward-to-go {trace['rloo_reward_to_go']:.3g} (ratio {ratio:.2f})",
              f"tr Cov(no baseline) / tr Cov(RLOO) >= {VARIANCE_BAR}",
              "Rewards here are all >= 0, so without a baseline every sampled sequence is pushed up; "
              "subtracting the others' mean keeps only 'better or worse than usual' and the noise drops.",
              kind="outcome", hint="subtract the baseline (R - b), do not add it.")
    ctx.series("variance/trace_cov", [trace[n] for n in M.ESTIMATORS], list(range(len(M.ESTIMATORS))),
               x_label="estimator (" + ", ".join(f"{i} {n}" for i, n in enumerate(M.ESTIMATORS)) + ")",
               smooth=False)
    for name in M.ESTIMATORS:
        est = groups[name]
        mse = [((est[: G // b * b].view(G // b, b, -1).mean(1) - true_grad) ** 2).sum(-1).mean().item()
               for b in BATCH_GROUPS if G // b >= 4]
        ctx.series(f"variance/log10_mse_{name}", [math.log10(v) for v in mse],
                   [math.log2(b * k) for b in BATCH_GROUPS if G // b >= 4],
                   x_label="log2 batch size (sequences)",
                   group="variance/log10_mse_vs_batch_size", smooth=False)
        ctx.scalar(f"sampled tr Cov {name}", trace[name])
    ctx.scalar("variance ratio no_baseline / rloo", ratio)
    ctx.progress(0.6)

    # ---- closed loop: gradient ascent on the gold reward, many agents at once -------------------
    steps = cfg.train_steps
    result = M.train(enum, cfg, g_train, loss_fn=reinforce_loss,
                     on_step=lambda s: ctx.progress(0.6 + 0.4 * (s + 1) / steps))
    score = result.normalized  # (steps + 1, 2, n_agents)
    x = torch.arange(steps + 1) * cfg.batch_size
    ctx.series("charts/expected_reward_rloo", result.J[:, 0].mean(-1), x, x_label="sequences per agent",
               group="charts/expected_reward")
    ctx.series("charts/expected_reward_no_baseline", result.J[:, 1].mean(-1), x,
               x_label="sequences per agent", group="charts/expected_reward")
    ctx.series("charts/expected_reward_exact_gradient", result.J_exact_ascent, x,
               x_label="sequences per agent", group="charts/expected_reward")
    ctx.series("reward", result.batch_reward[:, 0], x[:-1], x_label="sequences per agent")
    ctx.series("reward_std", result.batch_reward_std[:, 0], x[:-1], x_label="sequences per agent")
    final = score[-1]
    ctx.check("gradient_ascent_reaches_near_optimal_reward", final[0].min().item() >= FINAL_BAR,
              f"worst of {cfg.n_agents} RLOO agents {final[0].min().item():.3f} "
              f"(mean {final[0].mean().item():.3f});"
              f" J {result.J_uniform:.3f} -> {result.J[-1, 0].min().item():.3f}, J* = {result.J_star:g}",
              f"(J - J_uniform) / (J* - J_uniform) >= {FINAL_BAR} for every agent",
              "Stochastic gradient ascent with the REINFORCE estimate climbs the exact expected gold reward "
              "from the uniform policy to nearly the best sequence's reward.", kind="outcome",
              hint="the loss is minus the objective: descending it must raise J.")
    locked = (final < FINAL_BAR).double().mean(-1)  # fraction of agents stuck below the bar
    ctx.scalar("agents below the bar: rloo", locked[0])
    ctx.scalar("agents below the bar: no_baseline", locked[1])
    ctx.scalar("J uniform policy", result.J_uniform)
    ctx.scalar("J* (best sequence)", result.J_star)
    ctx.scalar("final normalized J rloo (mean)", final[0].mean())
    ctx.scalar("final normalized J no_baseline (mean)", final[1].mean())
    ctx.scalar("final normalized J exact gradient",
               (result.J_exact_ascent[-1] - result.J_uniform) / (result.J_star - result.J_uniform))
    ctx.progress(1.0)
