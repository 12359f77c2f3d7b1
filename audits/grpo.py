"""Audit of the grpo module (day 8): group-relative advantages, the clipped loss with a k3 KL term, the
loss aggregations behind the length bias, DAPO's dynamic sampling and token-mean update, and GRPO's
closed loop on a verifiable arithmetic task, where group normalisation is measured to even out prompt
difficulty."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from llmaudit.audit import Audit, kernel, max_error, measure, worst
from modules.grpo import grpo as M

DT = torch.float64
VECTOR_TOL = 1e-6  # the vectors are given to 7 digits
ZERO_TOL = 1e-6  # advantages of all-equal groups (exactly 0 in the reference)
SUM_TOL = 1e-5  # float32 sums of 8 advantages of size ~1
AFFINE_TOL = 1e-4  # eps = 1e-6 in the denominator breaks exact invariance at the 1e-6 relative level
GRAD_TOL = 1e-9  # float64 autograd against closed forms
RATIO_TOL = 1e-5  # |rho - 1| on the first update after a rollout (float32, the same forward twice)

# (rewards, G, scale_rewards, expected advantages): the closed form (r - mean) / (unbiased std + 1e-6),
# the numbers verl's GRPO estimator gives; [1,1,1,0]: mean .75, unbiased std .5
_S = 0.5 + 1e-6
ADVANTAGE_VECTORS = [
    ([1.0, 0.0, 0.0, 1.0], 4, True, [0.8660239, -0.8660239, -0.8660239, 0.8660239]),
    ([1.0, 0.0, 0.0, 0.0], 4, True, [1.499997, -0.499999, -0.499999, -0.499999]),
    ([1.0, 0.0], 2, True, [0.7071058, -0.7071058]),
    ([1.0, 0.0, 0.0, 1.0], 4, False, [0.5, -0.5, -0.5, 0.5]),
    ([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], 4, True,
     [0.8660239, -0.8660239, -0.8660239, 0.8660239, 0.25 / _S, 0.25 / _S, 0.25 / _S, -0.75 / _S]),
]
# k3 = exp(ref - lp) - (ref - lp) - 1 in closed form: lp -1 / ref -1.5 and swapped; d k3 / d lp = 1 - exp(ref - lp)
K3_PLUS, K3_MINUS, K3_GRAD = 0.1065307, 0.1487213, 0.3934693
# (A, rho, eps_low, eps_high) -> per-token loss max(-A rho, -A clip(rho)), and whether the clip binds
CLIP_TABLE = [(1.0, 1.5, 0.2, 0.2, -1.2, True), (1.0, 0.5, 0.2, 0.2, -0.5, False), (-1.0, 0.5, 0.2, 0.2, 0.8, True),
              (-1.0, 1.5, 0.2, 0.2, 1.5, False), (2.0, 1.1, 0.2, 0.2, -2.2, False),
              (1.0, 1.3, 0.2, 0.28, -1.28, True), (-1.0, 0.75, 0.2, 0.28, 0.8, True)]
# A = [+1, -1], lengths [1, 3], T = 4, rho = 1, beta = 0, by hand: verl's four aggregations
LENGTH_BIAS = {"seq-mean-token-mean": 0.0, "token-mean": 0.5, "seq-mean-token-sum-norm": 0.5, "seq-mean-token-sum": 1.0}


def _adv_example() -> dict:
    return {"rewards": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 1.0]), "group_size": 4,
            "scale_rewards": True, "eps": 1e-6}


def _loss_example() -> dict:
    g = torch.Generator().manual_seed(0)
    lp = -2.0 * torch.rand(4, 3, generator=g, dtype=DT)
    return {"logprobs": lp, "old_logprobs": lp + 0.1 * torch.randn(4, 3, generator=g, dtype=DT),
            "ref_logprobs": lp + 0.1 * torch.randn(4, 3, generator=g, dtype=DT),
            "advantages": torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=DT),
            "response_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=DT),
            "clip_eps_low": 0.2, "clip_eps_high": 0.28, "beta": 0.04, "loss_agg_mode": "seq-mean-token-mean"}


KERNELS = [
    kernel(M.grpo_advantages, example=_adv_example,
           hint="view(-1, G) so that each row is one prompt's group; unbiased std (n - 1); an all-equal group "
                "must come out exactly 0 (test max - min); scale_rewards=False is Dr. GRPO (no std)."),
    kernel(M.grpo_loss, example=_loss_example,
           hint="per-token max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)) + beta k3 to the REFERENCE; A is (N,), "
                "broadcast over tokens; mask with torch.where before exp; reduce with the requested aggregation."),
]

grpo = Audit("grpo", day=8, title="GRPO: group-relative advantages without a critic, Dr. GRPO and DAPO",
             config=M.GRPOConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


# ---- advantages: closed-form vectors -------------------------------------------------------------

@grpo.check(f"< {VECTOR_TOL}", hint="torch.std is unbiased by default; a population std gives +-1.0; the mean "
                                    "must be per group.")
def advantages_match_reference_vectors(grpo_advantages):
    """A = (r - group mean)/(sample std + eps): [1,0,0,1] gives +-0.866 because the unbiased std is 0.577;
    Dr. GRPO only subtracts the mean and gives +-0.5; two groups in one batch are normalised apart."""
    return [max_error(grpo_advantages(torch.tensor(r), G, scale, 1e-6), torch.tensor(want))
            for r, G, scale, want in ADVANTAGE_VECTORS]


# ---- the policy before RL, and one big probe rollout over every problem --------------------------

@grpo.fixture(cost=8)
def sft(cfg, g):
    """The SFT policy (the warm-up on the fallible demonstrator) and its training history."""
    return M.warm_up_policy(cfg, g)


@grpo.fixture
def probe(cfg, g, sft):
    """G sampled answers from the SFT policy to each of the 100 problems, scored by the verifier."""
    policy, _ = sft
    return M.rollout(policy, policy, M.V.all_problems(cfg.task), cfg, g)


@grpo.check(f"< {SUM_TOL}", hint="subtract the mean of each group (rows of rewards.view(-1, G)), not of the batch.")
def advantages_sum_to_zero_within_each_group(grpo_advantages, probe, cfg):
    """The group mean is the baseline, so within every group the advantages cancel: the group pushes its
    better answers up exactly as much as its worse ones down (GRPO and Dr. GRPO)."""
    G = cfg.group_size
    return torch.cat([grpo_advantages(probe.rewards, G, scale, cfg.adv_eps).reshape(-1, G).sum(1).abs()
                      for scale in (True, False)])


@grpo.check(f"< {ZERO_TOL}", hint="without a guard, (r - mean)/(std + eps) turns float rounding into advantages "
                                  "of ~1e-2; with eps = 0 it is NaN.")
def all_equal_groups_get_zero_advantage(grpo_advantages, probe, cfg):
    """All-right or all-wrong groups carry no signal: r - mean = 0. Test max - min rather than std > 0,
    because the float sum of eight 0.1s leaves a tiny std that eps cannot hide."""
    G = cfg.group_size
    made = torch.tensor([0.0] * G + [1.0] * G + [0.1] * G + [0.3] * G)  # float32 0.1 and 0.3 do not sum exactly
    constant = M.constant_groups(probe.rewards, G)
    out = []
    for scale in (True, False):
        out.append(grpo_advantages(made, G, scale, cfg.adv_eps).abs().reshape(-1))
        out.append(grpo_advantages(probe.rewards, G, scale, cfg.adv_eps).reshape(-1, G)[constant].abs().reshape(-1))
    return measure(torch.cat(out), f"constant groups of 0, 1, 0.1, 0.3 and the {int(constant.sum())} all-equal "
                                   "groups of the rollout, GRPO and Dr. GRPO")


@grpo.check({"grpo": f"< {AFFINE_TOL}", "dr_grpo": f"< {AFFINE_TOL}"},
            hint="scale_rewards=False must skip the division; a large eps breaks the invariance.")
def std_advantages_invariant_to_affine_rewards(grpo_advantages, probe, cfg):
    """Dividing by the group std makes the advantage blind to the reward's scale and offset: A(3r+7) =
    A(r); Dr. GRPO keeps the scale, A(3r+7) = 3 A(r), which is why it is scale-sensitive."""
    G, eps, r = cfg.group_size, cfg.adv_eps, probe.rewards
    return {"grpo": max_error(grpo_advantages(3.0 * r + 7.0, G, True, eps), grpo_advantages(r, G, True, eps)),
            "dr_grpo": max_error(grpo_advantages(3.0 * r + 7.0, G, False, eps),
                                 3.0 * grpo_advantages(r, G, False, eps))}


# ---- the day's claim: raw rewards depend on difficulty, group-relative advantages do not ----------

def _levels(probe, G: int) -> torch.Tensor:
    return probe.difficulty.reshape(-1, G)[:, 0]  # (B,) one difficulty per group


@grpo.check(">= min_difficulty_gap", kind="outcome",
            hint="a warm-up that is as good on carries as on easy sums leaves no gap.")
def raw_rewards_differ_by_difficulty(probe, cfg):
    """Prompts differ in difficulty: the same policy earns much less on carry problems, so a batch-wide
    baseline would push every easy answer up and every hard answer down."""
    raw, level = probe.rewards.reshape(-1, cfg.group_size).mean(1), _levels(probe, cfg.group_size)
    easy, hard = raw[level == 0].mean(), raw[level == 1].mean()
    return measure(easy - hard, f"mean reward of the SFT policy: easy {easy.item():.3f}, hard {hard.item():.3f}")


@grpo.check({"mean": "< 1e-4", "std_error": "< 1e-3"},
            hint="a batch-wide mean/std reintroduces the difficulty: easy prompts get positive mean advantage.")
def group_advantages_equalise_difficulty(grpo_advantages, probe, cfg):
    """Subtracting each group's mean removes the prompt's difficulty (the mean estimates V(prompt)) and
    dividing by its std gives every prompt one scale: per level, mean 0 and pooled std sqrt((G-1)/G)."""
    G = cfg.group_size
    adv = grpo_advantages(probe.rewards, G, True, cfg.adv_eps).reshape(-1, G)
    informative, level = ~M.constant_groups(probe.rewards, G), _levels(probe, G)
    means, errors = [], []
    for d in (0, 1):
        sel = adv[informative & (level == d)].reshape(-1)
        means.append(sel.mean().abs())
        errors.append((sel.pow(2).mean().sqrt() - math.sqrt((G - 1) / G)).abs())
    return {"mean": torch.stack(means), "std_error": torch.stack(errors)}


# ---- DAPO: dynamic sampling and the token-mean update ----------------------------------------------

@grpo.check("== 0", hint="compare max and min of each group; keep whole groups, not single answers.")
def dapo_drops_exactly_the_all_equal_groups(probe, cfg):
    """All-equal groups have zero advantage and no gradient; DAPO filters them so the batch is made of
    groups with signal (TRL logs their share as frac_reward_zero_std)."""
    G = cfg.group_size
    keep = M.dynamic_sampling_keep(probe.rewards, G)
    r = probe.rewards.reshape(-1, G)
    expected = (r.max(1).values > r.min(1).values).repeat_interleave(G)
    wrong = int((keep != expected).sum()) if keep.shape == expected.shape else len(expected)
    return measure(wrong, f"{int(expected.sum()) // G} of {len(r)} groups have signal; answers kept or dropped "
                          "wrongly")


@grpo.check(f"< {AFFINE_TOL}", hint="token-mean divides by the number of tokens kept; dropped groups must not "
                                    "count in it.")
def dapo_update_is_a_token_mean_over_groups_with_signal(grpo_advantages, grpo_loss, probe, cfg):
    """On the first update after a rollout (rho = 1, pi = pi_ref), DAPO's loss gives every kept token the
    gradient -A_i / (tokens kept): all-equal groups are dropped, and long answers are not diluted."""
    dapo, G = replace(cfg, variant="dapo"), cfg.group_size
    batch = M.policy_batch(probe, dapo, grpo_advantages)
    logprobs = batch.old_logprobs.clone().requires_grad_(True)
    loss, _ = M.policy_loss(logprobs, batch, dapo, grpo_loss)
    (grad,) = torch.autograd.grad(loss, logprobs)
    groups = probe.rewards.reshape(-1, G).tolist()
    signal = [i for i, r in enumerate(groups) if max(r) > min(r)]
    want_adv = torch.tensor([a for i in signal for a in M.group_advantages(groups[i], cfg.adv_eps)], dtype=DT)
    mask = probe.mask.reshape(len(groups), G, -1)[signal].reshape(len(want_adv), -1).to(DT)
    n_tokens = mask.sum()
    return measure(max_error(grad * n_tokens, -want_adv[:, None] * mask),
                   f"{len(signal)} of {len(groups)} groups kept, {int(n_tokens)} tokens; gradient x tokens vs -A")


# ---- the loss: clip table, KL term, length bias, padding --------------------------------------------

@grpo.check({"value": f"< {VECTOR_TOL}", "gradient": f"< {GRAD_TOL}"},
            hint="max(-A rho, -A clip(rho)), not min, and clip_eps_high on the upper side only.")
def clipped_surrogate_matches_table_and_zeroes_clipped_gradients(grpo_loss):
    """The clip is a pessimistic bound: (A, rho) = (1, 1.5) gives -1.2, (-1, .5) gives .8, (1, .5) -.5;
    once rho leaves [1-eps_low, 1+eps_high] in the direction the advantage favours, the token's gradient
    is exactly 0. DAPO's clip-higher (.28) raises only the upper bound: (1, 1.3) gives -1.28."""
    values, grads = [], []
    for A, r, lo, hi, want, clipped in CLIP_TABLE:
        lp = _t(math.log(r)).view(1, 1).requires_grad_(True)
        loss, per_token = grpo_loss(lp, _t(0.0).view(1, 1), lp.detach(), _t(A), _t(1.0).view(1, 1), lo, hi, 0.0,
                                    "token-mean")
        (grad,) = torch.autograd.grad(loss, lp)
        values += [abs(loss.item() - want), abs(per_token.item() - want)]
        grads.append(abs(grad.item() - (0.0 if clipped else -A * r)))
    return {"value": values, "gradient": grads}


@grpo.check(f"< {VECTOR_TOL}", hint="k3 uses ref - logprobs (not logprobs - ref, and not old_logprobs).")
def kl_term_is_k3_to_the_reference(grpo_loss):
    """GRPO puts beta * KL(pi || pi_ref) in the loss with k3 = pi_ref/pi - log(pi_ref/pi) - 1 (>= 0,
    unbiased), against the frozen reference, never the old policy: lp -1 / ref -1.5 gives 0.1065307 and
    a gradient beta * (1 - pi_ref/pi) = beta * 0.3934693."""
    lp = _t(-1.0, -1.5).view(2, 1).requires_grad_(True)
    ref, old, ones, beta = _t(-1.5, -1.0).view(2, 1), _t(-0.7, -2.2).view(2, 1), torch.ones(2, 1, dtype=DT), 0.5
    _, per_token = grpo_loss(lp, lp.detach(), ref, _t(0.0, 0.0), ones, 0.2, 0.2, beta, "token-mean")
    (kl_grad,) = torch.autograd.grad(per_token[0, 0], lp)
    _, per_token_old = grpo_loss(lp.detach(), old, ref, _t(0.0, 0.0), ones, 0.2, 0.2, beta, "token-mean")
    return [abs(per_token[0, 0].item() - beta * K3_PLUS), abs(per_token[1, 0].item() - beta * K3_MINUS),
            abs(kl_grad[0, 0].item() - beta * K3_GRAD), max_error(per_token_old, per_token.detach())]


@grpo.check({"value": f"< {VECTOR_TOL}", "gradient": f"< {GRAD_TOL}"},
            hint="reduce with the requested loss_agg_mode; padding must not count in |o_i|.")
def length_bias_vector_reproduced(grpo_loss):
    """A = [+1, -1], lengths [1, 3], T = 4: seq-mean-token-mean 0, token-mean 0.5, sum-norm 0.5,
    seq-mean-token-sum 1. Averaging inside each answer (1/|o_i|) gives a short right answer 3x the
    per-token push of a long wrong one's penalty; token-mean (DAPO) and a constant T (Dr. GRPO) do not."""
    lengths = torch.tensor([1, 3])
    mask = (torch.arange(4)[None] < lengths[:, None]).to(DT)
    A = _t(1.0, -1.0)[:, None]
    norms = {"seq-mean-token-mean": 2 * lengths[:, None].to(DT), "token-mean": mask.sum(),
             "seq-mean-token-sum-norm": _t(4.0), "seq-mean-token-sum": _t(2.0)}
    values, grads = [], []
    for mode, want in LENGTH_BIAS.items():
        lp = torch.full((2, 4), -1.0, dtype=DT).requires_grad_(True)
        loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), A[:, 0], mask, 0.2, 0.2, 0.0, mode)
        (grad,) = torch.autograd.grad(loss, lp)
        values.append(abs(loss.item() - want))
        grads.append(max_error(grad, -A / norms[mode] * mask))
    return {"value": values, "gradient": grads}


@grpo.check(f"< {GRAD_TOL}", hint="torch.where(mask, x, 0) before exp and before aggregating; never multiply a NaN "
                                  "by the mask.")
def padding_never_changes_loss_or_gradient(grpo_loss, g):
    """Tokens after EOS are not part of the answer: whatever the padded log-probs hold (NaN included),
    the loss and the gradient come from the response mask alone (NaN * 0 is NaN, so select with where)."""
    N, T = 12, 6
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    valid = torch.arange(T)[None] < lengths[:, None]
    mask = valid.to(DT)
    lp0 = -3.0 * torch.rand(N, T, generator=g, dtype=DT)
    old0, ref0 = (lp0 + 0.3 * torch.randn(N, T, generator=g, dtype=DT) for _ in range(2))
    adv = torch.randn(N, generator=g, dtype=DT)
    diffs = []
    for mode in LENGTH_BIAS:
        out = []
        for fill in (torch.zeros(N, T, dtype=DT), torch.full((N, T), float("nan"), dtype=DT)):
            lp = torch.where(valid, lp0, fill).requires_grad_(True)
            loss, _ = grpo_loss(lp, torch.where(valid, old0, fill), torch.where(valid, ref0, fill), adv, mask,
                                0.2, 0.28, 0.04, mode)
            out.append((loss, torch.autograd.grad(loss, lp)[0]))
        (l0, g0), (l1, g1) = out
        diffs += [abs(l0.item() - l1.item()), max_error(g0, g1), (g1 * (1 - mask)).abs().max().item()]
    return measure(diffs, "loss and gradient change with NaN in every padded slot, 4 aggregation modes")


# ---- the closed loop ---------------------------------------------------------------------------------

@grpo.fixture(cost=10)
def trained(cfg, g, sft, grpo_advantages, grpo_loss):
    """GRPO from the SFT policy (a copy; the SFT policy itself is the frozen reference)."""
    return M.run(cfg, g, grpo_advantages=grpo_advantages, grpo_loss=grpo_loss, sft=sft[0])


@grpo.check({"ratio_deviation": f"< {RATIO_TOL}", "clipped_share": "== 0"},
            hint="old log-probs from the sampling policy at the same temperature, not from the reference.")
def ratio_is_one_on_first_update_after_each_rollout(trained):
    """pi_old is the policy that sampled the rollout, so before the first step rho = 1 exactly; the clip
    only binds on the following updates of the same rollout."""
    h = trained.history
    later = [x["clip_ratio/region_mean"] for x in h if math.isfinite(x["clip_ratio/region_mean"])]
    return measure({"ratio_deviation": [x["ratio_first_update_max_dev"] for x in h],
                    "clipped_share": [x["clip_ratio_first_update"] for x in h]},
                   f"{len(h)} rollouts; the last update of each clips up to {max(later, default=0.0):.3f} of tokens")


@grpo.check({"start": "in [initial_band_low, initial_band_high]", "end": ">= min_accuracy", "rise": ">= min_rise"},
            kind="outcome",
            hint="a flipped advantage sign or a KL that outweighs the reward keeps it at the SFT level.")
def accuracy_rises_from_sft_level_to_bar(trained):
    """With a verifier as the reward and the group mean as the baseline, the policy learns the carry and
    the answer format without any critic: sampled accuracy on all 100 problems rises from the SFT level."""
    a, b = trained.start, trained.end
    return measure({"start": a.accuracy, "end": b.accuracy, "rise": b.accuracy - a.accuracy},
                   f"easy {a.accuracy_by_difficulty[0]:.2f} -> {b.accuracy_by_difficulty[0]:.2f}, hard "
                   f"{a.accuracy_by_difficulty[1]:.2f} -> {b.accuracy_by_difficulty[1]:.2f}; greedy "
                   f"{a.greedy_accuracy:.2f} -> {b.greedy_accuracy:.2f}")


@grpo.check({"kl": "<= max_kl", "moved": ">= min_kl"}, kind="outcome",
            hint="a learning rate ten times too large runs away from the reference; lr = 0 never leaves it.")
def kl_to_reference_stays_bounded(trained):
    """The beta * k3 term keeps the policy near the SFT reference while the reward rises: the per-token
    KL over the last 5 rollouts stays small, but is not 0 (that would mean the policy never moved)."""
    kl = torch.tensor([h["kl"] for h in trained.history[-5:]]).mean()
    return measure({"kl": kl, "moved": kl}, f"per-token k3 KL {trained.history[0]['kl']:.2g} at the start, "
                                            f"{kl.item():.3f} nats over the last 5 rollouts")


# ---- the report ----------------------------------------------------------------------------------------

ACCURACY = "accuracy (fraction of sampled answers)"
CURVES = {
    "reward": dict(label="verifier reward", y_label="reward per answer (0 wrong, 1 right)"),
    "reward_std": dict(label="reward spread within a group", y_label="reward std within a group"),
    "frac_reward_zero_std": dict(label="groups with all-equal rewards", y_label="groups without signal (fraction)"),
    "kl": dict(label=r"KL to the reference ($k_3$)", y_label="KL per token (nats)"),
    "entropy": dict(label="policy entropy", y_label="entropy per token (nats)"),
    "clip_ratio/region_mean": dict(label="clipped, either side", y_label="clipped (fraction of tokens)",
                                   title="Share of tokens clipped"),
    "clip_ratio/low_mean": dict(label=r"clipped below ($1-\epsilon$)", y_label="clipped (fraction of tokens)"),
    "clip_ratio/high_mean": dict(label=r"clipped above ($1+\epsilon$)", y_label="clipped (fraction of tokens)"),
    "completions/mean_length": dict(label="answer length", y_label="tokens per answer"),
    "loss": dict(label="GRPO loss", y_label="loss (advantage units)"),
    "grad_norm": dict(label="gradient norm before clipping", y_label="gradient L2 norm"),
    "eval/accuracy": dict(label="all problems", y_label=ACCURACY, key=True, title="Accuracy on the 100 problems"),
    "eval/accuracy_easy": dict(label="easy (no carry)", y_label=ACCURACY),
    "eval/accuracy_hard": dict(label="hard (a carry)", y_label=ACCURACY),
}


@grpo.report
def curves(ctx, cfg, sft, trained):
    ctx.series("warmup/loss", [h["loss"] for h in sft[1]], x_label="warm-up step",
               label="warm-up loss (supervised)", y_label="loss per answer token (nats)")
    h = trained.history
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                 "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "loss", "grad_norm"):
        ctx.series(name, [x[name] for x in h], x_label="GRPO step", group="clip_ratio" if "clip_ratio" in name else "",
                   **CURVES[name])
    steps = [e.step for e in trained.evals]
    for name, values in (("eval/accuracy", [e.accuracy for e in trained.evals]),
                         ("eval/accuracy_easy", [e.accuracy_by_difficulty[0] for e in trained.evals]),
                         ("eval/accuracy_hard", [e.accuracy_by_difficulty[1] for e in trained.evals])):
        ctx.series(name, values, steps, x_label="GRPO step", group="eval/accuracy", **CURVES[name])
    ctx.scalar("accuracy: SFT policy", trained.start.accuracy)
    ctx.scalar("accuracy: after GRPO", trained.end.accuracy)
    ctx.scalar("greedy accuracy: SFT policy", trained.start.greedy_accuracy)
    ctx.scalar("greedy accuracy: after GRPO", trained.end.greedy_accuracy)
    ctx.scalar("per-token KL over the last 5 rollouts", torch.tensor([h["kl"] for h in trained.history[-5:]]).mean())
    s = M.variant_settings(cfg)
    ctx.scalar("variant", f"{cfg.variant} (std {s.scale_rewards}, {s.loss_agg_mode}, clip {cfg.clip_eps_low:g}/"
                          f"{s.clip_eps_high:g}, dynamic sampling {s.dynamic_sampling})")
    # measured on the live objects: what is trained, and that the reference did not move
    policy, reference = trained.policy, trained.reference
    ctx.scalar("parameters: policy (trained)", sum(p.numel() for p in policy.parameters() if p.requires_grad))
    ctx.scalar("parameters: reference (frozen)", sum(p.numel() for p in reference.parameters() if not p.requires_grad))
    ctx.scalar("reference drift from the SFT policy",
               worst([(a - b).abs().max() for a, b in zip(reference.parameters(), sft[0].parameters())]))


@grpo.report
def difficulty(ctx, cfg, probe, grpo_advantages):
    G = cfg.group_size
    raw, level = probe.rewards.reshape(-1, G).mean(1), _levels(probe, G)
    batch_baseline = (probe.rewards - probe.rewards.mean()).reshape(-1, G).mean(1)  # REINFORCE, one baseline
    adv = grpo_advantages(probe.rewards, G, True, cfg.adv_eps).reshape(-1, G)
    informative = ~M.constant_groups(probe.rewards, G)
    for d, name in ((0, "easy (no carry)"), (1, "hard (carry)")):
        ctx.scalar(f"raw reward at start: {name}", raw[level == d].mean())
        ctx.scalar(f"batch-mean baseline: mean advantage {name}", batch_baseline[level == d].mean())
        sel = adv[informative & (level == d)]
        ctx.scalar(f"group advantage: mean {name}", sel.mean())
        ctx.scalar(f"group advantage: std {name}", sel.pow(2).mean().sqrt())
    ctx.scalar("frac_reward_zero_std at start", M.constant_groups(probe.rewards, G).float().mean())
