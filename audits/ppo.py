"""Audit of the ppo module (day 7): the clipped surrogate, KL estimators, whitening and masks on crafted
and real rollout batches, then RLHF-PPO's closed loop against a gold reward, and reward hacking at beta = 0."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules import reward_model as RM
from modules.ppo import ppo as M

DT = torch.float64
VECTOR_TOL = 1e-6  # rl-anchors.md section 0 / 4 vectors (7 digits)
GRAD_TOL = 1e-12  # float64 autograd against the closed form
RATIO_TOL = 1e-6  # |ratio - 1| on the first minibatch (same forward code on both sides: exactly 0 here)
PAD_TOL = 1e-6  # float32 losses with and without extra padding columns
WHITEN_TOL = 1e-5  # mean 0 / std 1 of whitened float32 advantages
REWARD_TOL = 1e-5  # row sums of float32 token rewards
KL_Z = 4.0  # sampled KL estimates within 4 standard errors of the exact KL
K3_ROUNDING = 1e-6  # float32 exp(-x) + x - 1 can round to -6e-8 for tiny x
EXTRA_PAD = 3  # padding columns appended in the padding check
SMOOTH = 3  # iterations averaged when reading the ends of the reward-hacking curves
# rl-anchors section 4.1 item 2 (eps 0.2; no dual clip here) and item 3 (clip-higher 0.28): (A, r, high, loss, clipped)
CLIP_TABLE = [(1.0, 1.5, None, -1.2, True), (1.0, 0.5, None, -0.5, False), (-1.0, 0.5, None, 0.8, True),
              (-1.0, 1.5, None, 1.5, False), (-1.0, 5.0, None, 5.0, False), (1.0, 5.0, None, -1.2, True),
              (2.0, 1.1, None, -2.2, False), (1.0, 1.3, 0.28, -1.28, True), (-1.0, 0.75, 0.28, 0.8, True)]
# rl-anchors section 4.4: (lp, ref) -> (k1, k2, k3) and d/dlp at (-1, -1.5)
KL_VECTORS = [((-1.0, -1.5), (0.5, 0.125, 0.1065307)), ((-1.5, -1.0), (-0.5, 0.125, 0.1487213)),
              ((-2.0, -2.0), (0.0, 0.0, 0.0))]
KL_GRADS = (1.0, 0.5, 0.3934693)
KL_EXPECT = (0.5108256, 0.7339459, 0.5108256)  # E_p[k1], E_p[k2], E_p[k3] for p = [.5, .5], q = [.9, .1]
# rl-anchors section 4.3 (V_old 1, clip 0.2): (vpred, return, loss); section 4.5: adaptive KL
VALUE_VECTORS = [(1.5, 2.0, 0.32), (1.1, 2.0, 0.405), (0.5, 2.0, 1.125), (1.5, 1.0, 0.125)]
ADAPTIVE_VECTORS = [(12.0, 0.201024), (0.0, 0.198976), (6.0, 0.2), (6.6, 0.200512)]


def _example_clip() -> dict:
    g = torch.Generator().manual_seed(0)
    old = -2.0 * torch.rand(2, 5, generator=g)
    return {"logprobs": old + 0.3 * torch.randn(2, 5, generator=g), "old_logprobs": old,
            "advantages": torch.randn(2, 5, generator=g), "mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
            "clip_eps": 0.2, "clip_eps_high": None}


def _example_kl() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"logprobs": -2.0 * torch.rand(2, 5, generator=g), "ref_logprobs": -2.0 * torch.rand(2, 5, generator=g)}


def _example_whiten() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"values": torch.randn(2, 5, generator=g), "mask": torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2]),
            "shift_mean": True}


KERNELS = [
    kernel(M.ppo_clip_loss, example=_example_clip,
           hint="per token max(-A r, -A clamp(r, 1 - eps, 1 + eps_high)) (max of the negatives, i.e. min of the "
                "objectives), averaged over mask == 1 only; clipfrac counts clipped > unclipped strictly."),
    kernel(M.kl_estimators, example=_example_kl,
           hint="log_ratio = logprobs - ref_logprobs; k1 = log_ratio, k2 = log_ratio^2 / 2, k3 = exp(-log_ratio) + "
                "log_ratio - 1 (the ratio inside k3 is ref / pi, not pi / ref)."),
    kernel(M.masked_whiten, example=_example_whiten,
           hint="mean and unbiased variance over mask == 1 only (torch.where, so NaN padding stays out); "
                "(v - mean) * rsqrt(var + 1e-8); padding is returned as 0."),
]


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


def _tail(ys: list[float]) -> float:
    return sum(ys[-SMOOTH:]) / len(ys[-SMOOTH:])


def _smoothed(ys: list[float]) -> list[float]:
    return [sum(ys[max(0, i - SMOOTH + 1):i + 1]) / len(ys[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(ys))]


@audit("ppo", day=7, title="PPO for a language model: the clipped surrogate, KL-penalised rewards, four models",
       config=M.PPOConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_ppo(ctx: Context, *, ppo_clip_loss=M.ppo_clip_loss, kl_estimators=M.kl_estimators,
              masked_whiten=M.masked_whiten) -> None:
    cfg: M.PPOConfig = ctx.config
    g_math, g_sft, g_rm, g_ppo, g_eval, g_hack = (ctx.generator(i) for i in range(6))
    bos, sep, eos, pad = M.special_ids(cfg)
    P = M.prompt_len(cfg)

    # ---- the clipped surrogate on crafted tokens -----------------------------------------------------
    worst, wrong_flags = 0.0, []
    for adv, r, high, want, want_clipped in CLIP_TABLE:
        loss, clipfrac, _ = ppo_clip_loss(_t(math.log(r))[None], _t(0.0)[None], _t(adv)[None], _t(1.0)[None],
                                          0.2, high)
        worst = max(worst, abs(float(loss) - want))
        if bool(float(clipfrac) > 0.5) != want_clipped:
            wrong_flags.append((adv, r))
    # pessimism on a grid: the per-token loss is never below the unclipped -A r
    grid_r = torch.linspace(0.3, 2.0, 18, dtype=DT)
    grid_a = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=DT)
    optimism = 0.0
    for a in grid_a:
        for r in grid_r:
            loss, _, _ = ppo_clip_loss(torch.log(r)[None, None], _t(0.0)[None], a[None, None], _t(1.0)[None], 0.2)
            optimism = max(optimism, float(-a * r - loss))
    ok = worst < VECTOR_TOL and not wrong_flags and optimism <= VECTOR_TOL
    ctx.check("clip_table_matches_reference", ok,
              f"max error {worst:.1e} over {len(CLIP_TABLE)} tokens; wrong clip flags {wrong_flags or 'none'}; "
              f"max(-A r - loss) = {optimism:.1e}",
              "(A=1, r=1.5) -> -1.2 clipped; (A=-1, r=0.5) -> 0.8 clipped; (A=1, r=1.3, high .28) -> -1.28; "
              f"error < {VECTOR_TOL:g}; loss >= -A r everywhere",
              "The clipped loss is max(-A r, -A clip(r)): a pessimistic bound of the unclipped one, flat once the "
              "ratio has moved far enough in the direction the advantage wants.",
              hint="max of the two negated terms (min of the objectives); clip with 1 - eps and 1 + eps_high.")

    # its gradient on a crafted batch: zero on tokens clipped in the clipped direction, -A r / n elsewhere
    B, T, eps = 6, 12, 0.2
    ratio = torch.linspace(0.5, 1.6, B * T, dtype=DT).reshape(B, T)
    sign = torch.where(torch.arange(B * T).reshape(B, T) % 3 == 0, -1.0, 1.0).to(DT)
    adv = sign * (1 + torch.rand(B, T, generator=g_math, dtype=DT))
    mask = (torch.arange(T)[None] < torch.tensor([12, 9, 7, 12, 3, 10])[:, None]).to(DT)
    logprobs = (torch.log(ratio) - 1.0).requires_grad_(True)
    loss, _, _ = ppo_clip_loss(logprobs, torch.full((B, T), -1.0, dtype=DT), adv, mask, eps)
    (grad,) = torch.autograd.grad(loss, logprobs)
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    want = torch.where(clipped | ~mask.bool(), 0.0, -adv * ratio / mask.sum())
    grad_err = (grad - want).abs().max().item()
    n_clipped = int((clipped & mask.bool()).sum())
    leak = grad[clipped & mask.bool()].abs().max().item()
    ctx.check("clipped_tokens_get_zero_gradient", grad_err < GRAD_TOL,
              f"|grad| on {n_clipped} clipped tokens <= {leak:.1e}; max error vs -A r / n elsewhere {grad_err:.1e}",
              f"0 on clipped and padded tokens, -A r / n_valid on the others; error < {GRAD_TOL:g}",
              "Once r > 1 + eps with A > 0 (or r < 1 - eps with A < 0) the clipped term is a constant, so that "
              "token stops pushing: this is how PPO keeps one batch from moving the policy too far.",
              hint="clamp the ratio, not the log-prob; the max must pick the clamped (constant) term there.")

    # ---- KL estimators: reference vectors and exact expectations -------------------------------------
    errs = []
    for (lp, ref), want_k in KL_VECTORS:
        k = kl_estimators(_t(lp), _t(ref))
        errs += [abs(float(a) - b) for a, b in zip(k, want_k)]
    lp = _t(-1.0).requires_grad_(True)
    ks = kl_estimators(lp, _t(-1.5))
    grads = [float(torch.autograd.grad(k, lp, retain_graph=True)[0]) for k in ks]
    errs += [abs(a - b) for a, b in zip(grads, KL_GRADS)]
    p, q = _t(0.5, 0.5), _t(0.9, 0.1)
    expect = [float((p * k).sum()) for k in kl_estimators(p.log(), q.log())]
    errs += [abs(a - b) for a, b in zip(expect, KL_EXPECT)]
    x, y = 10 * torch.randn(4096, generator=g_math, dtype=DT), 10 * torch.randn(4096, generator=g_math, dtype=DT)
    _, k2, k3 = kl_estimators(x, y)
    lowest = min(float(k2.min()), float(k3.min()))
    ctx.check("kl_estimators_match_reference_vectors", max(errs) < VECTOR_TOL and lowest >= 0,
              f"max error {max(errs):.1e}; E_p[k1,k2,k3] = {', '.join(f'{e:.7f}' for e in expect)}; "
              f"min k2, k3 over 4096 random pairs {lowest:.1e}",
              f"(lp -1, ref -1.5) -> (0.5, 0.125, 0.1065307), grads (1, 0.5, 0.3934693); E_p = KL = 0.5108256 "
              f"for k1 and k3, 0.7339459 for k2; k2, k3 >= 0; error < {VECTOR_TOL:g}",
              "k1 = log(p/q) and k3 = q/p - log(q/p) - 1 are unbiased for KL(p||q) under samples from p, k3 is "
              "never negative; k2 is biased in value but its gradient is the reverse-KL gradient.",
              hint="inside k3 the ratio is ref / pi = exp(-log_ratio); the sign of the log term follows.")

    # ---- the four roles ------------------------------------------------------------------------------
    sft = M.sft_policy(cfg, g_sft)
    rm, rm_history = M.honest_reward_model(sft, cfg, g_rm)
    ctx.series("rm/loss", [h["loss"] for h in rm_history], x_label="reward-model step")
    heldout = RM.preference_pairs(M.task_config(cfg), 512, g_eval)
    ctx.scalar("reward model: held-out pairwise accuracy vs gold", RM.pairwise_accuracy(rm, heldout, pad))
    policy, reference = M.actor_and_reference(sft)
    critic = M.new_critic(sft)
    frozen_before = {name: [t.detach().clone() for t in model.state_dict().values()]
                     for name, model in (("reference", reference), ("reward model", rm))}
    reward_fn = M.reward_fn_from_model(rm, pad)
    prompts_fn = lambda n, g: M.make_prompts(cfg, n, g)  # noqa: E731
    before = M.evaluate(sft, reference, cfg, g_eval)
    ctx.progress(0.3)

    # ---- the closed loop: RLHF-PPO with the KL penalty -----------------------------------------------
    def on_iteration(it: int, record: dict) -> None:
        ctx.progress(0.3 + 0.35 * (it + 1) / cfg.iterations)

    policy, history = M.train_ppo(policy, reference, critic, reward_fn, prompts_fn, cfg, g_ppo, eos_id=eos,
                                  pad_id=pad, gold_fn=RM.gold_reward, ppo_clip_loss=ppo_clip_loss,
                                  kl_estimators=kl_estimators, masked_whiten=masked_whiten,
                                  on_iteration=on_iteration)
    groups = {"objective/scores": "objective/scores_vs_gold", "objective/gold_reward": "objective/scores_vs_gold"}
    for name in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores",
                 "objective/scores_std", "objective/gold_reward", "objective/kl_coef", "policy/approxkl_avg",
                 "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/clipfrac_avg",
                 "response_length"):
        ctx.series(name, [h[name] for h in history], x_label="PPO iteration", group=groups.get(name, ""))
    after = M.evaluate(policy, reference, cfg, g_eval)

    dev = max(h["first_ratio_dev"] for h in history)
    first_clip = max(h["first_clipfrac"] for h in history)
    ctx.check("ratio_is_one_on_first_minibatch", dev < RATIO_TOL and first_clip == 0.0,
              f"max |ratio - 1| = {dev:.1e}, max clipfrac = {first_clip:g} over {len(history)} rollouts",
              f"|ratio - 1| < {RATIO_TOL:g} and clipfrac == 0 on the first minibatch after every rollout",
              "Before the first update the policy IS pi_old, so every ratio is exactly 1 and nothing is clipped; "
              "anything else means rollout and training log-probs disagree (temperature, dropout, padding).",
              hint="old log-probs from the rollout policy (not the reference), the same temperature on both sides, "
                   "clipfrac counted with a strict >.")

    changed = [name for name, model in (("reference", reference), ("reward model", rm))
               if not all(torch.equal(a, b) for a, b in zip(frozen_before[name], model.state_dict().values()))]
    ctx.check("reference_and_reward_model_weights_unchanged", not changed,
              "bit-identical" if not changed else f"changed: {', '.join(changed)}", "bit-identical after PPO",
              "Of PPO's four models only the actor and the critic learn; the reference anchors the KL penalty and "
              "the reward model defines the objective, so both must stay frozen.",
              hint="deep-copy the SFT model for the reference; never hand its parameters to an optimizer.")

    # a real rollout batch: SFT samples (varied lengths), stale old log-probs, the trained policy's new ones
    prompts = prompts_fn(cfg.rollout_batch, g_eval)
    ro = M.collect_rollout(sft, reference, critic, reward_fn, prompts, cfg.max_len + 1, eos, pad, g_eval,
                           cfg.temperature)
    mask = ro.mask
    with torch.no_grad():
        new_logprobs, entropy = M.policy_logprobs(policy, ro.tokens, P, cfg.temperature)
        new_values = M.critic_values(critic, ro.tokens, P)
    beta = cfg.kl_coef
    rewards = M.kl_penalized_rewards(new_logprobs, ro.ref_logprobs, ro.scores, mask, beta)
    k1 = torch.where(mask.bool(), new_logprobs - ro.ref_logprobs, torch.zeros_like(new_logprobs))
    last = mask.sum(1).long() - 1  # responses are right-padded: the last valid token is at length - 1
    rows = torch.arange(mask.shape[0])
    row_err = (rewards.sum(1) - (ro.scores - beta * k1.sum(1))).abs().max().item()
    last_err = (rewards[rows, last] + beta * k1[rows, last] - ro.scores).abs().max().item()
    outside = rewards[~mask.bool()].abs().max().item() if (~mask.bool()).any() else 0.0
    ctx.check("score_on_last_valid_token", max(row_err, last_err, outside) < REWARD_TOL,
              f"row sums vs score - beta sum k1: {row_err:.1e}; last valid token: {last_err:.1e}; "
              f"outside the mask: {outside:.1e} (lengths {int(mask.sum(1).min())}..{int(mask.sum(1).max())})",
              f"all < {REWARD_TOL:g}",
              "The reward model scores the whole response, so its score is the reward of the last valid token "
              "(EOS); every token pays -beta k1; padding gets nothing (TRL's slot after EOS is an off-by-one).",
              hint="index the last 1 of the mask (length - 1), not the first pad (length) nor the last column.")

    advantages, _ = M.response_gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
    white = masked_whiten(advantages, mask)
    valid = mask.bool()
    w = white[valid].double()
    mean_err, std_err = abs(w.mean().item()), abs(w.std().item() - 1.0)
    dirty = advantages.clone()
    dirty[~valid] = float("nan")
    dirty[~valid & (torch.arange(mask.shape[1])[None] % 2 == 0)] = 1e9
    pad_diff = (masked_whiten(dirty, mask)[valid] - white[valid]).abs().max().item()
    vec = masked_whiten(_t(1.0, 2.0, 3.0, 4.0)[None], torch.ones(1, 4, dtype=DT))
    vec_masked = masked_whiten(_t(1.0, 2.0, 3.0, 4.0)[None], _t(1.0, 1.0, 1.0, 0.0)[None])
    vec_err = max((vec - _t(-1.161895, -0.387298, 0.387298, 1.161895)).abs().max().item(),
                  (vec_masked[0, :3] - _t(-1.0, 0.0, 1.0)).abs().max().item())
    ok = max(mean_err, std_err) < WHITEN_TOL and pad_diff == 0.0 and vec_err < VECTOR_TOL
    ctx.check("advantages_whitened_over_valid_tokens_only", ok,
              f"valid mean {mean_err:.1e}, |std - 1| {std_err:.1e} over {int(valid.sum())} tokens; NaN/1e9 padding "
              f"changes them by {pad_diff:.1e}; vectors error {vec_err:.1e}",
              f"mean 0 and std 1 within {WHITEN_TOL:g}; padding content changes nothing; [1,2,3,4] -> "
              "[-1.1619, -0.3873, 0.3873, 1.1619], mask [1,1,1,0] -> [-1, 0, 1]",
              "Statistics over padding would shift every advantage by a length-dependent amount; the mean and "
              "(unbiased) variance must come from valid tokens only.",
              hint="torch.where(mask, values, 0) before summing, divide by mask.sum(), Bessel n / (n - 1).")

    # padding never changes the loss: append pad columns and fill every padded slot with garbage
    extra = torch.full((mask.shape[0], EXTRA_PAD), pad)
    tokens_padded = torch.cat([ro.tokens, extra], dim=1)
    mask_padded = torch.cat([mask, torch.zeros(mask.shape[0], EXTRA_PAD)], dim=1)

    def garbage(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = torch.cat([x, torch.zeros(x.shape[0], EXTRA_PAD)], dim=1)
        return torch.where(mask_padded.bool(), x, torch.full_like(x, fill))

    with torch.no_grad():
        lp_padded, ent_padded = M.policy_logprobs(policy, tokens_padded, P, cfg.temperature)
        v_padded = M.critic_values(critic, tokens_padded, P)
        returns = advantages + ro.values
        plain = [*ppo_clip_loss(new_logprobs, ro.old_logprobs, white, mask, cfg.clip_eps),
                 M.value_loss(new_values, ro.values, returns, mask, cfg.clip_value)[0], M.masked_mean(entropy, mask)]
        padded = [*ppo_clip_loss(lp_padded, garbage(ro.old_logprobs, float("nan")), garbage(white, 1e9),
                                 mask_padded, cfg.clip_eps),
                  M.value_loss(v_padded, garbage(ro.values, float("nan")), garbage(returns, 1e9), mask_padded,
                               cfg.clip_value)[0], M.masked_mean(ent_padded, mask_padded)]
    diffs = [abs(float(a) - float(b)) if math.isfinite(float(b)) else math.inf for a, b in zip(plain, padded)]
    ctx.check("padding_never_changes_the_loss", max(diffs) < PAD_TOL,
              f"max change {max(diffs):.1e} (policy loss {float(plain[0]):.4f}, clipfrac {float(plain[1]):.3f}, "
              f"approxkl {float(plain[2]):.4f}, value loss {float(plain[3]):.4f}) with {EXTRA_PAD} extra pad "
              "columns and NaN/1e9 in every padded slot",
              f"policy loss, clipfrac, approxkl, value loss and entropy each change < {PAD_TOL:g}",
              "A token-mean over valid tokens does not depend on how much padding follows or what it holds; "
              "mean() over the padded tensor, or mask * NaN = NaN, breaks this silently.",
              hint="reduce with the mask (torch.where, then sum / mask.sum()), never .mean() or x * mask.")

    # ---- value clipping and the KL controllers (core pieces the loop uses) ----------------------------
    v_err = 0.0
    for vpred, ret, want_v in VALUE_VECTORS:
        got, _ = M.value_loss(_t(vpred), _t(1.0), _t(ret), _t(1.0), 0.2)
        v_err = max(v_err, abs(float(got) - want_v))
    vp, ret_v = 3 * torch.randn(256, generator=g_math, dtype=DT), 3 * torch.randn(256, generator=g_math, dtype=DT)
    vl, _ = M.value_loss(vp, torch.zeros(256, dtype=DT), ret_v, torch.ones(256, dtype=DT), 0.2)
    below = float(0.5 * ((vp - ret_v) ** 2).mean() - vl)
    ctx.check("value_clipping_matches_reference", v_err < VECTOR_TOL and below <= VECTOR_TOL,
              f"max error {v_err:.1e} on {len(VALUE_VECTORS)} vectors; unclipped MSE/2 - loss = {below:.1e}",
              "(V 1.5, G 2) -> 0.32, (1.1, 2) -> 0.405, (0.5, 2) -> 1.125, (1.5, 1) -> 0.125 (V_old 1, clip .2); "
              "loss >= unclipped MSE / 2",
              "The value clip keeps the critic near its rollout values like the ratio clip keeps the actor; the max "
              "makes it a pessimistic bound, so it can only slow the critic down, never reward a jump.",
              hint="clip V around V_old (not around the return), then take the max of the two squared errors.")

    adaptive_err = 0.0
    for kl, want_beta in ADAPTIVE_VECTORS:
        ctl = M.AdaptiveKLController(0.2, 6.0, 10000)
        ctl.update(kl, n_steps=256)
        adaptive_err = max(adaptive_err, abs(ctl.value - want_beta))
    extreme = M.AdaptiveKLController(0.2, 6.0, 10000)
    extreme.update(600.0, n_steps=256)  # the error is clipped at +0.2
    adaptive_err = max(adaptive_err, abs(extreme.value - 0.201024))
    fixed = M.FixedKLController(0.2)
    fixed.update(12.0, n_steps=256)
    betas = [h["objective/kl_coef"] for h in history]
    ctx.check("adaptive_kl_controller_matches_reference", adaptive_err < VECTOR_TOL and fixed.value == 0.2,
              f"max error {adaptive_err:.1e}; fixed stays {fixed.value:g}; loop beta {betas[0]:.4f} -> {betas[-1]:.4f} "
              f"({cfg.kl_ctl}, target {cfg.kl_target:g} nats)",
              "(beta .2, target 6, horizon 10000, n 256): KL 12 -> 0.201024, 0 -> 0.198976, 6.6 -> 0.200512, "
              f"600 -> 0.201024 (error clipped); error < {VECTOR_TOL:g}",
              "The adaptive controller is proportional control: beta grows when the KL overshoots its target and "
              "shrinks when it undershoots, by at most 20% of n/horizon per update.",
              hint="clip KL / target - 1 to [-0.2, 0.2] and scale by n_steps / horizon.")

    # ---- KL estimators on policy samples vs the exact KL ---------------------------------------------
    with torch.no_grad():
        samples, smask = after["tokens"], after["mask"]
        lp_s, _ = M.policy_logprobs(policy, samples, P, cfg.temperature)
        ref_s, _ = M.policy_logprobs(reference, samples, P, cfg.temperature)
        exact = M.token_kl_exact(policy, reference, samples, smask, P, cfg.temperature).sum(1)
    k1_s, _, k3_s = kl_estimators(lp_s, ref_s)
    zero = torch.zeros_like(lp_s)
    k1_seq, k3_seq = (torch.where(smask.bool(), k, zero).sum(1) for k in (k1_s, k3_s))
    n = exact.numel()
    z = [abs((k - exact).mean().item()) / ((k - exact).std().item() / math.sqrt(n) + 1e-12) for k in (k1_seq, k3_seq)]
    k3_min = float(k3_s[smask.bool()].min())
    ctx.check("kl_estimates_track_exact_kl", max(z) < KL_Z and k3_min >= -K3_ROUNDING,
              f"exact {exact.mean().item():.3f}, k1 {k1_seq.mean().item():.3f} (z {z[0]:.1f}), k3 "
              f"{k3_seq.mean().item():.3f} (z {z[1]:.1f}) nats per sequence, {n} samples of the trained policy; "
              f"min k3 {k3_min:.1e}",
              f"|mean k - exact| < {KL_Z:g} standard errors for k1 and k3; k3 >= 0 on every token (float32: "
              f">= -{K3_ROUNDING:g})",
              "Averaged over tokens sampled from the policy, k1 and k3 estimate the same KL that the full next-token "
              "distributions give exactly; k3 has lower variance and is never negative.",
              hint="the estimators need samples from pi (the policy), not from the reference.")

    gain = after["gold"] - before["gold"]
    ctx.check("gold_reward_rises_above_sft", gain >= cfg.min_gold_gain,
              f"{before['gold']:.2f} -> {after['gold']:.2f} (gain {gain:+.2f}; {cfg.eval_prompts} samples; "
              f"reward-model score {history[0]['objective/scores']:.2f} -> {history[-1]['objective/scores']:.2f})",
              f"gain >= {cfg.min_gold_gain:g}",
              "PPO never sees the gold reward: it climbs the reward model's score, and the gold reward of fresh "
              "samples shows that the proxy led somewhere real.",
              kind="outcome", hint="a flipped sign in the loss or advantages lowers the gold reward.")
    ctx.check("kl_to_reference_stays_bounded", after["kl"] <= cfg.max_kl,
              f"exact sequence KL {after['kl']:.2f} nats (mean length {before['length']:.1f} -> {after['length']:.1f})",
              f"<= {cfg.max_kl:g} nats",
              "The per-token -beta KL reward keeps the policy near the SFT model; without it the reward model is "
              "exploited (see the reward-hacking curves).",
              kind="outcome", hint="the KL must be taken against the frozen reference with beta > 0.")
    ctx.scalar("gold reward: SFT policy", before["gold"])
    ctx.scalar("gold reward: PPO policy", after["gold"])
    ctx.scalar("KL(PPO || SFT), nats", after["kl"])
    ctx.progress(0.7)

    # ---- reward hacking: beta = 0 against a proxy trained on a biased annotator's labels -------------
    if not cfg.hack:
        return
    proxy = M.train_biased_reward_model(sft, cfg, g_hack)
    proxy_agreement = RM.pairwise_accuracy(proxy, heldout, pad)
    ctx.scalar("proxy: held-out pairwise agreement with gold", proxy_agreement)
    hack_policy, _ = M.actor_and_reference(sft)

    def on_hack(it: int, record: dict) -> None:
        ctx.progress(0.75 + 0.25 * (it + 1) / cfg.hack_iterations)

    _, hack = M.train_ppo(hack_policy, reference, M.new_critic(sft), M.reward_fn_from_model(proxy, pad), prompts_fn,
                          cfg, g_hack, eos_id=eos, pad_id=pad, iterations=cfg.hack_iterations, kl_coef=0.0,
                          gold_fn=RM.gold_reward, ppo_clip_loss=ppo_clip_loss, kl_estimators=kl_estimators,
                          masked_whiten=masked_whiten, on_iteration=on_hack)
    proxy_curve = [h["objective/scores"] for h in hack]
    gold_curve = [h["objective/gold_reward"] for h in hack]
    kl_curve = [h["objective/kl"] for h in hack]
    for name, ys in (("hacking/proxy_score", proxy_curve), ("hacking/gold_reward", gold_curve),
                     ("hacking/kl", kl_curve)):
        ctx.series(name, ys, x_label="PPO iteration (beta = 0, biased proxy)", group="reward_hacking")
    gold_s = _smoothed(gold_curve)
    peak = max(range(len(gold_s)), key=gold_s.__getitem__)
    proxy_gain = _tail(proxy_curve) - proxy_curve[0]
    gold_drop = gold_s[peak] - _tail(gold_curve)
    kl_end = _tail(kl_curve)
    gold_end = _tail(gold_curve)
    stalls_or_falls = gold_drop >= cfg.min_gold_drop or gold_end - before["gold"] <= cfg.max_stall_gain
    ok = proxy_gain >= cfg.min_proxy_gain and stalls_or_falls and kl_end > cfg.max_kl
    ctx.check("reward_hacking_without_kl_penalty", ok,
              f"proxy {proxy_curve[0]:.2f} -> {_tail(proxy_curve):.2f}; gold {gold_curve[0]:.2f} -> peak "
              f"{gold_s[peak]:.2f} (iteration {peak}) -> {gold_end:.2f} (SFT {before['gold']:.2f}); KL "
              f"{kl_end:.1f} nats (proxy agrees with gold on {proxy_agreement:.0%} of held-out pairs)",
              f"proxy gain >= {cfg.min_proxy_gain:g}; gold ends >= {cfg.min_gold_drop:g} below its peak (falls) or "
              f"<= SFT + {cfg.max_stall_gain:g} (stalls); KL ends above {cfg.max_kl:g} nats",
              "With beta = 0 nothing ties the policy to the SFT model, so it climbs whatever the proxy rewards: the "
              "proxy score keeps rising while the gold reward turns down and the KL runs away (Goodhart).",
              kind="outcome", hint="set beta > 0 (and watch objective/kl): the KL penalty is what prevents this.")
    ctx.scalar("hacking: proxy score end", _tail(proxy_curve))
    ctx.scalar("hacking: gold reward peak", gold_s[peak])
    ctx.scalar("hacking: gold reward end", gold_end)
    ctx.scalar("hacking: KL end, nats", kl_end)
    ctx.progress(1.0)
