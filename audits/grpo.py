"""Audit of the grpo module (day 8): group-relative advantages, the clipped loss with a k3 KL term, the
loss aggregations behind the length bias, DAPO's dynamic sampling, and GRPO's closed loop on a verifiable
arithmetic task, where group normalisation is measured to even out prompt difficulty."""
from __future__ import annotations

import copy
import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules.grpo import grpo as M

DT = torch.float64
VECTOR_TOL = 1e-6  # rl-anchors.md section 5 vectors (7 digits)
EXACT_TOL = 1e-6  # zeros of advantages (exact by construction)
SUM_TOL = 1e-5  # float32 sums of 8 advantages of size ~1
AFFINE_TOL = 1e-4  # eps = 1e-6 in the denominator breaks exact invariance at the 1e-6 relative level
GRAD_TOL = 1e-9  # float64 autograd against closed forms
RATIO_TOL = 1e-5  # P4: |rho - 1| on the first update after a rollout (float32, same forward twice)
# section 5: [1,0,0,1] -> verl (eps 1e-6); [1,0,0,0]; [1,0]; Dr. GRPO
VEC_1001, VEC_1000, VEC_10 = 0.8660239, (1.499997, -0.499999), 0.7071058
K3_PLUS, K3_MINUS, K3_GRAD = 0.1065307, 0.1487213, 0.3934693  # section 4.4 (lp -1 / ref -1.5 and swapped)
# section 4.6 item 2/3: (A, ratio, eps_low, eps_high) -> per-token loss, clipped?
CLIP_TABLE = [(1.0, 1.5, 0.2, 0.2, -1.2, True), (1.0, 0.5, 0.2, 0.2, -0.5, False), (-1.0, 0.5, 0.2, 0.2, 0.8, True),
              (-1.0, 1.5, 0.2, 0.2, 1.5, False), (2.0, 1.1, 0.2, 0.2, -2.2, False),
              (1.0, 1.3, 0.2, 0.28, -1.28, True), (-1.0, 0.75, 0.2, 0.28, 0.8, True)]
# section 5 item 8: A = [+1, -1], lengths [1, 3], T = 4, ratio 1, beta 0
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


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


@audit("grpo", day=8, title="GRPO: group-relative advantages without a critic, Dr. GRPO and DAPO",
       config=M.GRPOConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_grpo(ctx: Context, *, grpo_advantages=M.grpo_advantages, grpo_loss=M.grpo_loss) -> None:
    cfg: M.GRPOConfig = ctx.config
    G = cfg.group_size
    settings = M.variant_settings(cfg)
    g_warm, g_probe, g_train, g_rand = ctx.generator(0), ctx.generator(1), ctx.generator(2), ctx.generator(3)

    # ---- advantages: reference vectors ---------------------------------------------------------------
    a1001 = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, True, 1e-6)
    a1000 = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, True, 1e-6)
    a10 = grpo_advantages(torch.tensor([1.0, 0.0]), 2, True, 1e-6)
    dr = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, False, 1e-6)
    two = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]), 4, True, 1e-6)
    s = 0.5 + 1e-6  # [1,1,1,0]: mean .75, unbiased std .5
    want_two = torch.tensor([VEC_1001, -VEC_1001, -VEC_1001, VEC_1001, 0.25 / s, 0.25 / s, 0.25 / s, -0.75 / s])
    errs = [(a1001 - torch.tensor([VEC_1001, -VEC_1001, -VEC_1001, VEC_1001])).abs().max(),
            (a1000 - torch.tensor([VEC_1000[0]] + [VEC_1000[1]] * 3)).abs().max(),
            (a10 - torch.tensor([VEC_10, -VEC_10])).abs().max(),
            (dr - torch.tensor([0.5, -0.5, -0.5, 0.5])).abs().max(), (two - want_two).abs().max()]
    vec_err = max(float(e) for e in errs)
    ctx.check("advantages_match_reference_vectors", vec_err < VECTOR_TOL,
              f"[1,0,0,1] -> {a1001[0].item():+.7f}, [1,0,0,0] -> {a1000[0].item():.6f}/{a1000[1].item():.6f}, "
              f"[1,0] -> {a10[0].item():.7f}, Dr. GRPO -> {dr[0].item():+.3f} (max error {vec_err:.1e})",
              f"+-{VEC_1001}, {VEC_1000[0]}/{VEC_1000[1]}, +-{VEC_10}, +-0.5; two groups at once; "
              f"error < {VECTOR_TOL:g}",
              "A = (r - group mean)/(sample std + eps): [1,0,0,1] gives +-0.866 because the unbiased std is 0.577; "
              "Dr. GRPO only subtracts the mean and gives +-0.5.",
              hint="torch.std is unbiased by default; a population std gives +-1.0; the mean must be per group.")

    # ---- the policy before RL, and one big probe rollout over every problem --------------------------
    policy, warm = M.warm_up_policy(cfg, g_warm)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ctx.series("warmup/loss", [h["loss"] for h in warm], x_label="warm-up step")
    ctx.progress(0.2)
    problems = M.V.all_problems(cfg.task)
    probe = M.rollout(policy, reference, problems, cfg, g_probe)
    rewards = probe.rewards  # (100 G,)
    level = probe.difficulty.view(-1, G)[:, 0]  # (100,) one difficulty per group

    adv = grpo_advantages(rewards, G, True, cfg.adv_eps)
    adv_dr = grpo_advantages(rewards, G, False, cfg.adv_eps)
    sums = max(adv.view(-1, G).sum(1).abs().max().item(), adv_dr.view(-1, G).sum(1).abs().max().item())
    ctx.check("advantages_sum_to_zero_within_each_group", sums < SUM_TOL,
              f"max |sum_group A| = {sums:.1e} over {len(level)} groups of {G} (GRPO and Dr. GRPO)",
              f"< {SUM_TOL:g}",
              "The group mean is the baseline, so within every group the advantages cancel: the group pushes "
              "its better answers up exactly as much as its worse ones down.",
              hint="subtract the mean of each group (rows of rewards.view(-1, G)), not of the batch.")

    constant = M.constant_groups(rewards, G)
    made = torch.tensor([0.0] * G + [1.0] * G + [0.1] * G + [0.3] * G)  # float32 0.1 and 0.3 do not sum exactly
    made_adv = torch.cat([grpo_advantages(made, G, True, cfg.adv_eps), grpo_advantages(made, G, False, cfg.adv_eps)])
    rollout_const = torch.cat([adv.view(-1, G)[constant].reshape(-1), adv_dr.view(-1, G)[constant].reshape(-1)])
    zero_err = torch.cat([made_adv, rollout_const]).abs().max().item()
    ok = math.isfinite(zero_err) and zero_err < EXACT_TOL
    ctx.check("all_equal_groups_get_zero_advantage", ok,
              f"max |A| = {zero_err:.1e} on constant groups of 0, 1, 0.1, 0.3 and the "
              f"{int(constant.sum())} all-equal groups of the rollout",
              f"exactly 0 (< {EXACT_TOL:g}), never NaN",
              "All-right or all-wrong groups carry no signal: r - mean = 0. Test max - min rather than std > 0, "
              "because the float sum of eight 0.1s leaves a tiny std that eps cannot hide.",
              hint="without a guard, (r - mean)/(std + eps) turns float rounding into advantages of ~1e-2; "
                   "with eps = 0 it is NaN.")

    a, b = 3.0, 7.0
    scaled = grpo_advantages(a * rewards + b, G, True, cfg.adv_eps)
    scaled_dr = grpo_advantages(a * rewards + b, G, False, cfg.adv_eps)
    aff_err = (scaled - adv).abs().max().item()
    dr_err = (scaled_dr - a * adv_dr).abs().max().item()
    ctx.check("std_advantages_invariant_to_affine_rewards", aff_err < AFFINE_TOL and dr_err < AFFINE_TOL,
              f"max |A(3r+7) - A(r)| = {aff_err:.1e}; Dr. GRPO max |A(3r+7) - 3 A(r)| = {dr_err:.1e}",
              f"both < {AFFINE_TOL:g}",
              "Dividing by the group std makes the advantage blind to the reward's scale and offset; Dr. GRPO "
              "keeps the scale (x3), which is why it is unbiased but scale-sensitive.",
              hint="scale_rewards=False must skip the division; a large eps breaks the invariance.")

    # ---- the day's claim: raw rewards depend on difficulty, group-relative advantages do not ----------
    raw = rewards.view(-1, G).mean(1)
    raw_easy, raw_hard = raw[level == 0].mean().item(), raw[level == 1].mean().item()
    batch_baseline = (rewards - rewards.mean()).view(-1, G).mean(1)  # REINFORCE with one batch-wide baseline
    ctx.scalar("raw reward at start: easy (no carry)", raw_easy)
    ctx.scalar("raw reward at start: hard (carry)", raw_hard)
    ctx.scalar("batch-mean baseline: mean advantage easy", batch_baseline[level == 0].mean().item())
    ctx.scalar("batch-mean baseline: mean advantage hard", batch_baseline[level == 1].mean().item())
    gap = raw_easy - raw_hard
    ctx.check("raw_rewards_differ_by_difficulty", gap >= cfg.min_difficulty_gap,
              f"mean reward easy {raw_easy:.3f} vs hard {raw_hard:.3f} (gap {gap:+.3f}) from the SFT policy",
              f"easy - hard >= {cfg.min_difficulty_gap:g}",
              "Prompts differ in difficulty: the same policy earns much less on carry problems, so a batch-wide "
              "baseline would push every easy answer up and every hard answer down.",
              kind="outcome", hint="a warm-up that is as good on carries as on easy sums leaves no gap.")

    informative = ~constant
    stats, worst_mean, worst_std = [], 0.0, 0.0
    target_std = math.sqrt((G - 1) / G)  # unit sample std per group -> population std sqrt((G-1)/G)
    for d, name in ((0, "easy"), (1, "hard")):
        sel = adv.view(-1, G)[informative & (level == d)].reshape(-1)
        m, s = sel.mean().item(), sel.pow(2).mean().sqrt().item()
        stats.append(f"{name}: mean {m:+.1e}, std {s:.4f} ({sel.numel() // G} groups)")
        worst_mean, worst_std = max(worst_mean, abs(m)), max(worst_std, abs(s - target_std))
        ctx.scalar(f"group advantage: mean {name}", m)
        ctx.scalar(f"group advantage: std {name}", s)
    ctx.check("group_advantages_equalise_difficulty", worst_mean < 1e-4 and worst_std < 1e-3,
              "; ".join(stats), f"mean 0 (< 1e-4) and std sqrt((G-1)/G) = {target_std:.4f} (within 1e-3) per level",
              "Subtracting each group's mean removes the prompt's difficulty (the mean estimates V(prompt)) and "
              "dividing by its std gives every prompt the same scale, whatever its raw reward level.",
              hint="a batch-wide mean/std reintroduces the difficulty: easy prompts get positive mean advantage.")
    ctx.progress(0.3)

    # ---- DAPO's dynamic sampling ----------------------------------------------------------------------
    keep = M.dynamic_sampling_keep(rewards, G)
    expected_keep = (rewards.view(-1, G).max(1).values > rewards.view(-1, G).min(1).values).repeat_interleave(G)
    kept_rewards = rewards[keep].view(-1, G)
    still_constant = int(M.constant_groups(rewards[keep], G).sum()) if bool(keep.any()) else 0
    ok = torch.equal(keep, expected_keep) and still_constant == 0 and len(kept_rewards) > 0
    ctx.check("dapo_drops_exactly_the_all_equal_groups", ok,
              f"kept {len(kept_rewards)} of {len(level)} groups; frac_reward_zero_std = {constant.float().mean():.3f}; "
              f"constant groups left {still_constant}",
              "kept = the groups with max > min, none else",
              "All-equal groups have zero advantage and no gradient; DAPO filters them so the batch is made of "
              "groups with signal (TRL logs their share as frac_reward_zero_std).",
              hint="compare max and min of each group; keep whole groups, not single answers.")
    ctx.scalar("frac_reward_zero_std at start", constant.float().mean().item())

    # ---- the loss: clip table, KL term, length bias, padding ------------------------------------------
    worst_val, worst_grad, rows = 0.0, 0.0, []
    for A, r, lo, hi, want, clipped in CLIP_TABLE:
        lp = _t(math.log(r)).view(1, 1).requires_grad_(True)
        loss, per_token = grpo_loss(lp, _t(0.0).view(1, 1), lp.detach(), _t(A), _t(1.0).view(1, 1), lo, hi, 0.0,
                                    "token-mean")
        (grad,) = torch.autograd.grad(loss, lp)
        want_grad = 0.0 if clipped else -A * r
        worst_val = max(worst_val, abs(loss.item() - want), abs(per_token.item() - want))
        worst_grad = max(worst_grad, abs(grad.item() - want_grad))
        rows.append(f"({A:g},{r:g})->{loss.item():.3f}")
    ctx.check("clipped_surrogate_matches_table_and_zeroes_clipped_gradients",
              worst_val < VECTOR_TOL and worst_grad < GRAD_TOL,
              f"{', '.join(rows)}; value error {worst_val:.1e}, gradient error {worst_grad:.1e}",
              "(A,rho): (1,1.5) -1.2, (1,.5) -.5, (-1,.5) .8, (-1,1.5) 1.5, (2,1.1) -2.2; clip-higher .28: "
              "(1,1.3) -1.28, (-1,.75) .8; gradient 0 on clipped tokens",
              "The clip is a pessimistic bound: once rho leaves [1-eps_low, 1+eps_high] in the direction the "
              "advantage favours, the token's gradient is exactly zero; DAPO raises only the upper bound.",
              hint="max(-A rho, -A clip(rho)) — not min — and clip_eps_high on the upper side only.")

    lp = _t(-1.0, -1.5).view(2, 1).requires_grad_(True)
    ref = _t(-1.5, -1.0).view(2, 1)
    old = _t(-0.7, -2.2).view(2, 1)  # a different old policy: the KL must not read it
    beta = 0.5
    _, per_token = grpo_loss(lp, lp.detach(), ref, _t(0.0, 0.0), torch.ones(2, 1, dtype=DT), 0.2, 0.2, beta,
                             "token-mean")
    (kl_grad,) = torch.autograd.grad(per_token[0, 0], lp)
    _, per_token_old = grpo_loss(lp.detach(), old, ref, _t(0.0, 0.0), torch.ones(2, 1, dtype=DT), 0.2, 0.2, beta,
                                 "token-mean")
    kl_err = max(abs(per_token[0, 0].item() - beta * K3_PLUS), abs(per_token[1, 0].item() - beta * K3_MINUS),
                 abs(kl_grad[0, 0].item() - beta * K3_GRAD),
                 (per_token_old - per_token.detach()).abs().max().item())
    ctx.check("kl_term_is_k3_to_the_reference", kl_err < VECTOR_TOL,
              f"beta k3 = {per_token[0, 0].item() / beta:.7f}, {per_token[1, 0].item() / beta:.7f}; gradient / beta "
              f"{kl_grad[0, 0].item() / beta:.7f}; independent of pi_old (max error {kl_err:.1e})",
              f"k3 {K3_PLUS}, {K3_MINUS}; d/dlogpi = beta (1 - pi_ref/pi) = beta {K3_GRAD}",
              "GRPO puts beta * KL(pi || pi_ref) in the loss with k3 = pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, "
              "unbiased), against the frozen reference, never the old policy, and not inside the reward.",
              hint="k3 uses ref - logprobs (not logprobs - ref, and not old_logprobs).")

    worst_val, worst_grad, got = 0.0, 0.0, []
    lengths = torch.tensor([1, 3])
    mask = (torch.arange(4)[None] < lengths[:, None]).to(DT)
    for mode, want in LENGTH_BIAS.items():
        lp = torch.full((2, 4), -1.0, dtype=DT).requires_grad_(True)
        loss, _ = grpo_loss(lp, lp.detach(), lp.detach(), _t(1.0, -1.0), mask, 0.2, 0.2, 0.0, mode)
        (grad,) = torch.autograd.grad(loss, lp)
        A = torch.tensor([1.0, -1.0], dtype=DT)[:, None]
        norm = {"seq-mean-token-mean": 2 * lengths[:, None].to(DT), "token-mean": mask.sum(),
                "seq-mean-token-sum-norm": torch.tensor(4.0, dtype=DT),
                "seq-mean-token-sum": torch.tensor(2.0, dtype=DT)}[mode]
        want_grad = -A / norm * mask
        worst_val = max(worst_val, abs(loss.item() - want))
        worst_grad = max(worst_grad, (grad - want_grad).abs().max().item())
        got.append(f"{mode} {loss.item():.3g}")
    ctx.check("length_bias_vector_reproduced", worst_val < VECTOR_TOL and worst_grad < GRAD_TOL,
              f"{', '.join(got)}; per-token gradient error {worst_grad:.1e}",
              "A=[+1,-1], lengths [1,3], T=4: seq-mean-token-mean 0.0, token-mean 0.5, sum-norm 0.5, "
              "seq-mean-token-sum 1.0; gradient -A_i/(B|o_i|) for GRPO",
              "Averaging inside each answer (1/|o_i|) gives a short right answer 3x the per-token push of a long "
              "wrong one's penalty: the length bias; token-mean (DAPO) and a constant T (Dr. GRPO) remove it.",
              hint="reduce with the requested loss_agg_mode; padding must not count in |o_i|.")

    N, T = 12, 6
    lengths = torch.randint(1, T + 1, (N,), generator=g_rand)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    base_lp = -3.0 * torch.rand(N, T, generator=g_rand, dtype=DT)
    base_old = base_lp + 0.3 * torch.randn(N, T, generator=g_rand, dtype=DT)
    base_ref = base_lp + 0.3 * torch.randn(N, T, generator=g_rand, dtype=DT)
    advs = torch.randn(N, generator=g_rand, dtype=DT)
    junk = torch.full((N, T), float("nan"), dtype=DT)
    pad_err = 0.0
    for mode in LENGTH_BIAS:
        out = []
        for fill in (torch.zeros(N, T, dtype=DT), junk):
            lp = torch.where(mask.bool(), base_lp, fill).requires_grad_(True)
            old = torch.where(mask.bool(), base_old, fill)
            ref = torch.where(mask.bool(), base_ref, fill)
            loss, _ = grpo_loss(lp, old, ref, advs, mask, 0.2, 0.28, 0.04, mode)
            (grad,) = torch.autograd.grad(loss, lp)
            out.append((loss, grad))
        (l0, g0), (l1, g1) = out
        diff = max(abs(l0.item() - l1.item()), (g0 - g1).abs().max().item(), (g1 * (1 - mask)).abs().max().item())
        pad_err = max(pad_err, diff if math.isfinite(diff) else float("inf"))
    ctx.check("padding_never_changes_loss_or_gradient", pad_err < GRAD_TOL,
              f"max change of loss/gradient with NaN in every padded slot: {pad_err:.1e} (4 aggregation modes)",
              f"< {GRAD_TOL:g}, gradient 0 on padding",
              "Tokens after EOS are not part of the answer: whatever the padded log-probs hold, the loss and the "
              "gradient come from the response mask alone (NaN * 0 is NaN, so select with where).",
              hint="torch.where(mask, x, 0) before exp and before aggregating; never multiply a NaN by the mask.")
    ctx.progress(0.35)

    # ---- the closed loop --------------------------------------------------------------------------------
    def on_step(step: int, record: dict) -> None:
        ctx.progress(0.35 + 0.6 * (step + 1) / cfg.steps)

    history, evals = M.train_grpo(policy, reference, cfg, g_train, advantages_fn=grpo_advantages, loss_fn=grpo_loss,
                                  on_step=on_step)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                 "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "loss", "grad_norm"):
        group = "clip_ratio" if name.startswith("clip_ratio") else ""
        ctx.series(name, [h[name] for h in history], x_label="GRPO step", group=group)
    steps = [e.step for e in evals]
    ctx.series("eval/accuracy", [e.accuracy for e in evals], steps, x_label="GRPO step", group="eval/accuracy")
    ctx.series("eval/accuracy_easy", [e.accuracy_by_difficulty[0] for e in evals], steps, x_label="GRPO step",
               group="eval/accuracy")
    ctx.series("eval/accuracy_hard", [e.accuracy_by_difficulty[1] for e in evals], steps, x_label="GRPO step",
               group="eval/accuracy")

    dev = max(h["ratio_first_update_max_dev"] for h in history)
    clip0 = max(h["clip_ratio_first_update"] for h in history)
    later_clip = max((h["clip_ratio/region_mean"] for h in history if cfg.updates_per_rollout > 1
                      and math.isfinite(h["clip_ratio/region_mean"])), default=0.0)
    ctx.check("ratio_is_one_on_first_update_after_each_rollout", dev < RATIO_TOL and clip0 == 0.0,
              f"max |rho - 1| = {dev:.1e}, clip ratio {clip0:g} over {len(history)} rollouts "
              f"(later updates clip up to {later_clip:.3f})",
              f"|rho - 1| < {RATIO_TOL:g} and nothing clipped on the first update",
              "pi_old is the policy that sampled the rollout, so before the first step rho = 1 exactly; the clip "
              "only binds on the following updates of the same rollout.",
              hint="old log-probs from the sampling policy at the same temperature, not from the reference.")

    before, after = evals[0], evals[-1]
    ok = cfg.initial_band_low <= before.accuracy <= cfg.initial_band_high and after.accuracy >= cfg.min_accuracy
    ctx.check("accuracy_rises_from_sft_level_to_bar", ok,
              f"{before.accuracy:.3f} -> {after.accuracy:.3f} (easy {before.accuracy_by_difficulty[0]:.2f} -> "
              f"{after.accuracy_by_difficulty[0]:.2f}, hard {before.accuracy_by_difficulty[1]:.2f} -> "
              f"{after.accuracy_by_difficulty[1]:.2f}; greedy {before.greedy_accuracy:.2f} -> "
              f"{after.greedy_accuracy:.2f})",
              f"start in [{cfg.initial_band_low:g}, {cfg.initial_band_high:g}], end >= {cfg.min_accuracy:g}",
              "With a verifier as the reward and the group mean as the baseline, the policy learns the carry and "
              "the answer format without any critic.",
              kind="outcome",
              hint="a flipped advantage sign or a KL that outweighs the reward keeps it at the SFT level.")

    final_kl = history[-1]["kl"]
    ctx.check("kl_to_reference_stays_bounded", 0.0 < final_kl <= cfg.max_kl,
              f"per-token k3 KL {history[0]['kl']:.2g} -> {final_kl:.3f} nats", f"in (0, {cfg.max_kl:g}]",
              "The beta * k3 term keeps the policy near the SFT reference while the reward rises; KL 0 would mean "
              "the policy never moved.",
              kind="outcome", hint="the KL term must be + beta * k3 (a minus sign rewards running away).")

    ctx.scalar("accuracy: SFT policy", before.accuracy)
    ctx.scalar("accuracy: after GRPO", after.accuracy)
    ctx.scalar("greedy accuracy: SFT -> GRPO", f"{before.greedy_accuracy:.2f} -> {after.greedy_accuracy:.2f}")
    ctx.scalar("variant", f"{cfg.variant} (std {settings.scale_rewards}, {settings.loss_agg_mode}, "
                          f"clip {cfg.clip_eps_low:g}/{settings.clip_eps_high:g}, dynamic sampling "
                          f"{settings.dynamic_sampling})")
    ctx.scalar("models: trained / frozen", "policy / reference (no critic, no reward model)")
    ctx.progress(1.0)
