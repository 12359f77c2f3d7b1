"""Audit of the dpo module (day 6): the DPO family of losses (sigmoid, cDPO, IPO, KTO) and DPO's closed loop
on the target-digit task, where a gold reward measures what the implicit reward learned."""
from __future__ import annotations

import copy
import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules.dpo import dpo as M

DT = torch.float64
LN2 = math.log(2.0)
EXACT_TOL = 1e-6  # the loss at policy == reference, computed from float32 model log-probs
VECTOR_TOL = 1e-6  # rl-anchors.md section 6 vectors (7 digits)
GRAD_TOL = 1e-9  # float64 autograd against the closed form
LOGP_TOL = 1e-4  # float32 sequence log-probs (|logp| ~ 20), batched vs one prefix at a time
# TRL / rl-anchors section 6 (beta 0.1): chosen_logratio 2, rejected_logratio -1
VEC_BETA, VEC_CHOSEN, VEC_REJECTED, VEC_EPS = 0.1, 2.0, -1.0, 0.1
VEC_SIGMOID, VEC_CDPO, VEC_IPO, VEC_IPO_LEN, VEC_IPO_AT_REF = 0.5543552, 0.5843552, 4.0, 16.0, 25.0
KTO_AT_REF, KTO_KL_HALF, KTO_CLAMPED = 0.5, 0.4625702, (0.4501660, 0.4750208)
BEFORE_BAND = (0.45, 0.55)  # held-out accuracy at step 0: a coin flip (every implicit reward is 0)


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    logps = -20.0 * torch.rand(4, 3, generator=g, dtype=DT)
    return {"policy_chosen_logps": logps[0], "policy_rejected_logps": logps[1], "ref_chosen_logps": logps[2],
            "ref_rejected_logps": logps[3], "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0}


KERNELS = [
    kernel(M.dpo_loss, example=_example,
           hint="h = (pi_c - ref_c) - (pi_r - ref_r); sigmoid: -logsigmoid(beta h) (cDPO mixes in "
                "-eps logsigmoid(-beta h)); ipo: (h - 1/(2 beta))^2; rewards = beta * logratio, detached; "
                "return per-pair losses, not their mean."),
]


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


@audit("dpo", day=6, title="DPO without a reward model: sigmoid, cDPO, IPO, KTO and the implicit reward",
       config=M.DPOConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_dpo(ctx: Context, *, dpo_loss=M.dpo_loss) -> None:
    cfg: M.DPOConfig = ctx.config
    g_warm, g_data, g_train = ctx.generator(0), ctx.generator(1), ctx.generator(2)
    P, beta = M.prompt_len(cfg), cfg.beta

    # ---- the reference policy and the preference data ---------------------------------------------
    reference, warm = M.warm_up_reference(cfg, g_warm)
    ctx.series("warmup/loss", [h["loss"] for h in warm], x_label="warm-up step")
    p = cfg.warmup_target_prob
    optimal_nll = -(p * math.log(p) + (1 - p) * math.log((1 - p) / (cfg.n_digits - 1)))
    ctx.scalar("warm-up response NLL (last step)", warm[-1]["loss"])
    ctx.scalar("warm-up data entropy (the floor)", optimal_nll)
    train_pairs = M.build_preference_pairs(reference, cfg, cfg.n_train_prompts, g_data)
    heldout = M.build_preference_pairs(reference, cfg, cfg.n_eval_prompts, g_data)
    ctx.scalar("training pairs (ties dropped)", len(train_pairs))
    ctx.scalar("held-out pairs", len(heldout))
    ctx.progress(0.15)

    # sequence log-probs sum exactly the response tokens: one forward vs one prefix at a time
    tokens = torch.cat([train_pairs.chosen[:16], train_pairs.rejected[:16]])
    with torch.no_grad():
        batched = M.sequence_logps(reference, tokens, P)
        slow = torch.zeros(tokens.shape[0])
        for t in range(P, tokens.shape[1]):
            last = torch.log_softmax(reference(tokens[:, :t])[:, -1].float(), dim=-1)
            slow += last.gather(-1, tokens[:, t:t + 1]).squeeze(-1)
    logp_err = (batched - slow).abs().max().item()
    ctx.check("sequence_logps_sum_response_tokens_only", logp_err < LOGP_TOL, logp_err, f"< {LOGP_TOL:g}",
              "log pi(y|x) is the sum of the response tokens' log-probs, logits[t] scoring token t+1; the "
              "prompt is excluded, and an empty or shifted response mask leaves DPO at ln 2 or wrong.",
              hint="shift by one (logits[:, :-1] score tokens[:, 1:]) and start at the first response token.")

    # ---- exact math of the kernel -------------------------------------------------------------------
    # policy == reference (the real model before any update): ln 2 for every label smoothing, rewards 0
    policy0 = copy.deepcopy(reference)
    with torch.no_grad():
        chosen0, rejected0 = M.pair_logps(policy0, train_pairs.chosen, train_pairs.rejected, P)
    ln2_err, reward_abs = 0.0, 0.0
    for eps in (0.0, 0.1, 0.3):
        losses, cr, rr = dpo_loss(chosen0, rejected0, train_pairs.ref_chosen_logps, train_pairs.ref_rejected_logps,
                                  beta, loss_type="sigmoid", label_smoothing=eps)
        ln2_err = max(ln2_err, (losses - LN2).abs().max().item())
        reward_abs = max(reward_abs, cr.abs().max().item(), rr.abs().max().item())
    ctx.check("loss_is_ln2_and_rewards_zero_at_reference", ln2_err < EXACT_TOL and reward_abs < EXACT_TOL,
              f"max|L - ln2| = {ln2_err:.1e}, max|reward| = {reward_abs:.1e} ({len(train_pairs)} pairs, eps 0/.1/.3)",
              f"both < {EXACT_TOL:g}",
              "At step 0 the policy is the reference, both log-ratios are 0, so the loss is -log sigmoid(0) "
              "= ln 2 = 0.693 (with or without label smoothing) and every implicit reward is 0.",
              hint="the rewards are beta * (policy - reference) log-probs: forgetting the reference term "
                   "makes them -2 instead of 0.")

    c, r = _vec(VEC_CHOSEN), _vec(VEC_REJECTED)
    zero = _vec(0.0)
    sig, cr, rr = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=0.0)
    cdpo, _, _ = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=VEC_EPS)
    swapped, _, _ = dpo_loss(r, c, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=0.0)
    shifted, _, _ = dpo_loss(c + 7.0, r - 3.0, zero + 7.0, zero - 3.0, VEC_BETA)  # same log-ratios
    vec_err = max(abs(sig.item() - VEC_SIGMOID), abs(cdpo.item() - VEC_CDPO), abs(cr.item() - 0.2),
                  abs(rr.item() + 0.1), abs((sig - swapped).item() + VEC_BETA * 3.0), abs((shifted - sig).item()))
    ctx.check("dpo_and_cdpo_match_reference_vectors", vec_err < VECTOR_TOL,
              f"sigmoid {sig.item():.7f}, cDPO {cdpo.item():.7f}, rewards {cr.item():.3f}/{rr.item():.3f} "
              f"(max error {vec_err:.1e})",
              f"{VEC_SIGMOID}, {VEC_CDPO}, 0.2/-0.1; L(h) - L(-h) = -beta h; error < {VECTOR_TOL:g}",
              "With log-ratios 2 and -1 (h = 3, beta 0.1) DPO gives 0.5544 and cDPO (eps 0.1) 0.5844; the "
              "loss sees the four log-probs only through h, and swapping the pair costs exactly beta h.",
              hint="cDPO is -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h); both terms use the same h.")

    # the per-pair gradient weight, by autograd, on log-probs spanning wrong and right rankings
    g = ctx.generator(3)
    B = 256
    pc = (-20.0 + 10.0 * torch.randn(B, generator=g, dtype=DT)).requires_grad_(True)
    pr = (-20.0 + 10.0 * torch.randn(B, generator=g, dtype=DT)).requires_grad_(True)
    rc, rf = -20.0 + 10.0 * torch.randn(B, generator=g, dtype=DT), -20.0 + 10.0 * torch.randn(B, generator=g, dtype=DT)
    losses, cr, rr = dpo_loss(pc, pr, rc, rf, beta)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (pc, pr))
    weight = torch.sigmoid(beta * ((pr - rf) - (pc - rc))).detach()  # sigma(r_hat_rejected - r_hat_chosen)
    w_err = max((-grad_c / beta - weight).abs().max().item(), (grad_r / beta - weight).abs().max().item())
    ctx.check("gradient_weight_is_sigmoid_of_reward_gap", w_err < GRAD_TOL,
              f"max error {w_err:.1e} over {B} pairs (weights {weight.min().item():.3f}..{weight.max().item():.3f})",
              f"dL_i/dlogpi(y_w) = -beta sigma(r_l - r_w), dL_i/dlogpi(y_l) = +beta sigma(r_l - r_w); < {GRAD_TOL:g}",
              "Each pair pushes chosen up and rejected down with weight sigma(r_hat_rejected - r_hat_chosen): "
              "large where the implicit reward ranks the pair wrongly, near 0 where it is already right.",
              hint="use per-pair losses and logsigmoid; a hinge or a missing beta changes the weight.")

    rewards_need_grad = bool(getattr(cr, "requires_grad", False) or getattr(rr, "requires_grad", False))
    ctx.check("implicit_rewards_are_detached", not rewards_need_grad,
              "requires_grad" if rewards_need_grad else "no grad", "chosen/rejected rewards carry no gradient",
              "The implicit rewards beta * log(pi/pi_ref) are metrics (rewards/margins, accuracies); the "
              "gradient comes from the loss alone.",
              hint="return beta * logratios.detach().")

    # IPO: a squared loss with its minimum at h = 1/(2 beta); TRL averages the log-probs over tokens
    ipo0, _, _ = dpo_loss(zero, zero, zero, zero, VEC_BETA, loss_type="ipo")
    ipo, _, _ = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="ipo")
    ipo_len, _, _ = dpo_loss(c / 4, r / 2, zero, zero, VEC_BETA, loss_type="ipo")  # lengths (4, 2)
    h_min = _vec(0.5 / VEC_BETA).requires_grad_(True)
    ipo_min, _, _ = dpo_loss(h_min, zero, zero, zero, VEC_BETA, loss_type="ipo")
    (grad_min,) = torch.autograd.grad(ipo_min.sum(), h_min)
    ipo_err = max(abs(ipo0.item() - VEC_IPO_AT_REF), abs(ipo.item() - VEC_IPO), abs(ipo_len.item() - VEC_IPO_LEN),
                  abs(ipo_min.item()), abs(grad_min.item()))
    ctx.check("ipo_matches_reference_vectors", ipo_err < VECTOR_TOL,
              f"h=0: {ipo0.item():.4g}, h=3: {ipo.item():.4g}, length-averaged (4,2): {ipo_len.item():.4g}, "
              f"at h=1/(2beta): {ipo_min.item():.1g} (max error {ipo_err:.1e})",
              f"{VEC_IPO_AT_REF}, {VEC_IPO}, {VEC_IPO_LEN}, 0 with zero gradient",
              "IPO regresses h onto 1/(2 beta) = 5 instead of pushing it to infinity, so deterministic "
              "preferences cannot drive the log-ratios without bound.",
              hint="(h - 1/(2 beta))^2, not (beta h - 1/2)^2, and no sigmoid.")

    # KTO (not a kernel: the module's implementation), TRL's vectors
    one = _vec(0.0)
    kto_ref, _, _, _ = M.kto_loss(one, one, one, one, _vec(0.0, 0.0), _vec(0.0, 0.0), VEC_BETA)
    kto_half, _, _, _ = M.kto_loss(c, r, zero, zero, _vec(0.5), _vec(0.0), VEC_BETA)
    kto_neg, _, _, kl_neg = M.kto_loss(c, r, zero, zero, _vec(-3.0), _vec(0.0), VEC_BETA)
    kto_err = max((kto_ref - KTO_AT_REF).abs().max().item(), (kto_half - KTO_KL_HALF).abs().max().item(),
                  (kto_neg - _vec(*KTO_CLAMPED)).abs().max().item(), abs(kl_neg.item()))
    ctx.check("kto_matches_reference_vectors", kto_err < VECTOR_TOL,
              f"ref: {kto_ref.tolist()}, kl=.5: [{kto_half[0].item():.7f}, {kto_half[1].item():.7f}], "
              f"kl=-3 clamped: [{kto_neg[0].item():.7f}, {kto_neg[1].item():.7f}] (max error {kto_err:.1e})",
              f"0.5, {KTO_KL_HALF} (both), {KTO_CLAMPED}; error < {VECTOR_TOL:g}",
              "KTO scores single answers against a KL baseline z: desirable 1 - sigma(beta(logratio - z)), "
              "undesirable 1 - sigma(beta(z - logratio)), with z clamped at 0.",
              hint="clamp the KL estimate at 0 and put it on the opposite side for undesirable answers.")

    kl_lp = _vec(0.3, -0.2, 0.9).requires_grad_(True)
    losses_k, _, _, _ = M.kto_loss(c.clone().requires_grad_(True), r, zero, zero, kl_lp, _vec(0.0, 0.0, 0.0), VEC_BETA)
    kl_grad = torch.autograd.grad(losses_k.sum(), kl_lp, allow_unused=True)[0]
    kl_grad_norm = 0.0 if kl_grad is None else kl_grad.abs().max().item()
    matched = sum(int((M.mismatched_indices(n) == torch.arange(n)).sum()) for n in range(2, 10))
    ctx.check("kto_kl_baseline_is_detached_and_mismatched", kl_grad_norm == 0.0 and matched == 0,
              f"|dL/dKL logps| = {kl_grad_norm:.1e}; {matched} prompts kept their own completion (n = 2..9)",
              "0 and 0",
              "KTO's KL baseline is estimated on mismatched (x_i, y_{i+1}) pairs and detached: it shifts the "
              "target, it is not an objective; reversing the batch leaves the middle of an odd batch matched.",
              hint="rotate completions by one, (i + 1) % n, and .detach() the KL estimate.")
    ctx.progress(0.25)

    # ---- the closed loop ----------------------------------------------------------------------------
    def on_step(step: int, record: dict) -> None:
        ctx.progress(0.25 + 0.7 * (step + 1) / cfg.steps)

    policy, history, evals = M.train_dpo(reference, train_pairs, heldout, cfg, g_train, loss_fn=dpo_loss,
                                         on_step=on_step)
    groups = {"rewards/chosen": "rewards/chosen_vs_rejected", "rewards/rejected": "rewards/chosen_vs_rejected",
              "logps/chosen": "logps/chosen_vs_rejected", "logps/rejected": "logps/chosen_vs_rejected"}
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "grad_norm"):
        ctx.series(name, [h[name] for h in history], x_label="DPO step", group=groups.get(name, ""))
    steps = [e.step for e in evals]
    ctx.series("eval/rewards/accuracies", [e.heldout_accuracy for e in evals], steps, x_label="DPO step")
    ctx.series("eval/rewards/margins", [e.heldout_margin for e in evals], steps, x_label="DPO step")
    ctx.series("objective/gold_reward", [e.gold_reward for e in evals], steps, x_label="DPO step")
    ctx.series("objective/kl", [e.kl for e in evals], steps, x_label="DPO step")

    with torch.no_grad():
        chosen1, rejected1 = M.pair_logps(policy, train_pairs.chosen, train_pairs.rejected, P)
    chosen_shift = (chosen1 - train_pairs.ref_chosen_logps).mean().item()
    rejected_shift = (rejected1 - train_pairs.ref_rejected_logps).mean().item()
    margin = chosen_shift - rejected_shift
    ctx.check("chosen_logp_rises_relative_to_rejected", margin >= cfg.min_margin,
              f"mean h = {margin:.2f} nats (chosen {chosen_shift:+.2f}, rejected {rejected_shift:+.2f})",
              f">= {cfg.min_margin:g} nats",
              "DPO only moves the difference: log pi(y_w) - log pi(y_l) rises relative to the reference, "
              "even when both log-probs fall (the chosen log-prob often falls too).",
              kind="outcome", hint="the loss must decrease in h: -logsigmoid(+beta h), not (-beta h).")

    before, after = evals[0], evals[-1]
    ok = BEFORE_BAND[0] <= before.heldout_accuracy <= BEFORE_BAND[1] and after.heldout_accuracy >= cfg.min_accuracy
    ctx.check("heldout_preference_accuracy_rises_to_bar", ok,
              f"{before.heldout_accuracy:.3f} -> {after.heldout_accuracy:.3f} ({len(heldout)} held-out pairs)",
              f"step 0 in [{BEFORE_BAND[0]}, {BEFORE_BAND[1]}], end >= {cfg.min_accuracy}",
              "The policy is an implicit reward model: beta log(pi/pi_ref) ranks unseen pairs the way the "
              "gold reward does, without a reward model ever being trained.",
              kind="outcome", hint="rewards must be measured against the reference; chosen and rejected not swapped.")

    gain = after.gold_reward - before.gold_reward
    ctx.check("policy_gold_reward_improves", gain >= cfg.min_gold_gain,
              f"{before.gold_reward:.2f} -> {after.gold_reward:.2f} of {cfg.response_len} (gain {gain:+.2f})",
              f"gain >= {cfg.min_gold_gain:g}",
              "Sampling from the trained policy and scoring with the gold rule shows real improvement, not "
              "just a better loss on the pairs.",
              kind="outcome", hint="a flipped sign lowers the gold reward; too few steps leave it at the reference's.")

    # context for the bound: the KL of the deterministic policy that always answers the target digit
    n = cfg.n_digits
    digits = torch.arange(n)[:, None]
    all_target = torch.cat([torch.full((n, 1), M.bos_id(cfg)), digits, torch.full((n, 1), M.sep_id(cfg)),
                            digits.expand(n, cfg.response_len)], dim=1)  # <bos> d <sep> d d ... d
    with torch.no_grad():
        best_kl = -M.sequence_logps(reference, all_target, P).mean().item()
    ctx.scalar("KL of always answering the target, nats", best_kl)
    ctx.check("kl_to_reference_stays_bounded", before.kl == 0.0 and after.kl <= cfg.max_kl,
              f"{before.kl:.2g} -> {after.kl:.2f} nats (always answering the target costs {best_kl:.2f})",
              f"0 at step 0, <= {cfg.max_kl:g} nats at the end",
              "The sequence KL to the reference starts at exactly 0 and stays bounded while the gold reward "
              "rises; with deterministic preferences sigmoid DPO keeps pushing toward the all-target answer.",
              kind="outcome", hint="a tiny beta or a large learning rate lets the policy run away from the reference.")

    ctx.scalar("gold reward: reference", before.gold_reward)
    ctx.scalar("gold reward: DPO policy", after.gold_reward)
    ctx.scalar("held-out accuracy", after.heldout_accuracy)
    ctx.scalar("KL(policy || reference), nats", after.kl)
    ctx.scalar("logps/chosen change", chosen_shift)
    ctx.progress(1.0)
