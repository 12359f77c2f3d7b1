"""Audit of the dpo module (day 6): the DPO family of losses (sigmoid, cDPO, IPO, and KTO from the module)
and DPO's closed loop on the target-digit task, where a gold reward measures what the implicit reward learned."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.dpo import dpo as M

DT = torch.float64
LN2 = math.log(2.0)
EXACT_TOL = 1e-6  # the loss at policy == reference, computed from float32 model log-probs
VECTOR_TOL = 1e-6  # reference vectors with 7 digits
GRAD_TOL = 1e-9  # float64 autograd against the closed form
LOGP_TOL = 1e-4  # float32 sequence log-probs (|logp| ~ 20), batched vs one prefix at a time
# closed-form vectors (beta 0.1; TRL's dpo_loss test values): chosen log-ratio 2, rejected log-ratio -1, h = 3
VEC_BETA, VEC_CHOSEN, VEC_REJECTED, VEC_EPS = 0.1, 2.0, -1.0, 0.1
VEC_SIGMOID, VEC_CDPO, VEC_IPO, VEC_IPO_LEN, VEC_IPO_AT_REF = 0.5543552, 0.5843552, 4.0, 16.0, 25.0
KTO_AT_REF, KTO_KL_HALF, KTO_CLAMPED = 0.5, 0.4625702, (0.4501660, 0.4750208)


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

dpo = Audit("dpo", day=6, title="DPO without a reward model: sigmoid, cDPO, IPO, KTO and the implicit reward",
            config=M.DPOConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


# ---- the reference policy and its preference pairs --------------------------------------------------

@dpo.fixture(cost=3)
def data(cfg, g):
    """The warmed-up reference and the training / held-out pairs sampled from it, labelled by gold."""
    return M.build_data(cfg, g)


@dpo.check(f"< {LOGP_TOL}", hint="shift by one (logits[:, :-1] score tokens[:, 1:]) and start at the first "
                                "response token.")
def sequence_logps_sum_response_tokens_only(data, cfg):
    """log pi(y|x) is the sum of the response tokens' log-probs, logits[t] scoring token t+1, the prompt
    excluded; a shifted or empty response mask leaves DPO at ln 2 or optimising the wrong thing."""
    reference, P = data.reference, M.prompt_len(cfg)  # the prompt is <bos> d <sep>
    tokens = torch.cat([data.train_pairs.chosen[:16], data.train_pairs.rejected[:16]])
    with torch.no_grad():
        batched = M.sequence_logps(reference, tokens, P)
        slow = torch.zeros(tokens.shape[0])
        for t in range(P, tokens.shape[1]):  # one prefix at a time: the next token's log-prob
            last = torch.log_softmax(reference(tokens[:, :t])[:, -1].float(), dim=-1)
            slow += last.gather(-1, tokens[:, t:t + 1]).squeeze(-1)
    return max_error(batched, slow)


# ---- exact math of the kernel -----------------------------------------------------------------------

@dpo.check({"loss": f"< {EXACT_TOL}", "rewards": f"< {EXACT_TOL}"},
           hint="the rewards are beta * (policy - reference) log-probs: forgetting the reference term makes "
                "them beta * log pi(y), about -1.6 here, instead of 0.")
def loss_is_ln2_and_rewards_zero_at_reference(dpo_loss, data, cfg):
    """At step 0 the policy is the reference, both log-ratios are 0, so the loss is -log sigmoid(0) =
    ln 2 = 0.693 (with or without label smoothing) and every implicit reward is 0."""
    pairs, P = data.train_pairs, M.prompt_len(cfg)
    policy = M.policy_from_reference(data.reference)
    with torch.no_grad():
        chosen, rejected = M.pair_logps(policy, pairs.chosen, pairs.rejected, P)
    loss_err, rewards = [], []
    for eps in (0.0, 0.1, 0.3):
        losses, cr, rr = dpo_loss(chosen, rejected, pairs.ref_chosen_logps, pairs.ref_rejected_logps, cfg.beta,
                                  loss_type="sigmoid", label_smoothing=eps)
        loss_err.append((losses - LN2).abs())
        rewards += [cr.abs(), rr.abs()]
    return measure({"loss": loss_err, "rewards": rewards}, f"{len(pairs)} pairs, eps 0 / 0.1 / 0.3")


@dpo.check(f"< {VECTOR_TOL}", hint="cDPO is -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h); both terms "
                                  "use the same h.")
def dpo_and_cdpo_match_reference_vectors(dpo_loss):
    """With log-ratios 2 and -1 (h = 3, beta 0.1) DPO gives 0.5543552 and cDPO (eps 0.1) 0.5843552, rewards
    0.2 and -0.1; the loss sees the four log-probs only through h, and swapping the pair costs beta h."""
    c, r, zero = _vec(VEC_CHOSEN), _vec(VEC_REJECTED), _vec(0.0)
    sig, cr, rr = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=0.0)
    cdpo, _, _ = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=VEC_EPS)
    swapped, _, _ = dpo_loss(r, c, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=0.0)
    shifted, _, _ = dpo_loss(c + 7.0, r - 3.0, zero + 7.0, zero - 3.0, VEC_BETA)  # the same log-ratios
    errors = [max_error(sig, _vec(VEC_SIGMOID)), max_error(cdpo, _vec(VEC_CDPO)), max_error(cr, _vec(0.2)),
              max_error(rr, _vec(-0.1)), max_error(sig - swapped, _vec(-VEC_BETA * 3.0)), max_error(shifted, sig)]
    return measure(errors, f"sigmoid {sig.item():.7f}, cDPO {cdpo.item():.7f}")


@dpo.check("< 1e-3", hint="F.logsigmoid(beta h) (or -F.softplus(-beta h)), never torch.log(torch.sigmoid(beta h)): "
                         "sigmoid(-200) is 0 in float32.")
def loss_is_finite_for_confident_pairs(dpo_loss):
    """-log sigma(beta h) = softplus(-beta h) must be computed stably. In float32 a pair ranked wrongly at
    beta h = -200 costs 200 (cDPO with eps 0.1: 180), and one ranked rightly costs 0 (cDPO: 20).
    log(sigmoid(.)) underflows to -inf there, and one such pair makes the mean loss of a batch inf."""
    far = torch.tensor([1000.0])  # float32 log-ratios; beta 0.1, h = +-2000
    zero = torch.zeros(1)
    cases = [(-far, far, 0.0, 200.0), (-far, far, VEC_EPS, 180.0), (far, -far, 0.0, 0.0), (far, -far, VEC_EPS, 20.0)]
    losses = [dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="sigmoid", label_smoothing=eps)[0] for c, r, eps, _ in cases]
    return measure([max_error(loss, torch.tensor([want])) for loss, (_, _, _, want) in zip(losses, cases)],
                   "beta h = -200: " + ", ".join(f"{float(x):.6g}" for x in losses[:2])
                   + "; +200: " + ", ".join(f"{float(x) + 0.0:.3g}" for x in losses[2:]))


@dpo.check(f"< {GRAD_TOL}", hint="use per-pair losses and logsigmoid; a hinge or a missing beta changes the weight.")
def gradient_weight_is_sigmoid_of_reward_gap(dpo_loss, cfg, g):
    """Each pair pushes chosen up and rejected down with weight beta sigma(r_hat_rejected - r_hat_chosen):
    large where the implicit reward ranks the pair wrongly, near 0 where it is already right."""
    logps = -20.0 + 10.0 * torch.randn(4, 256, generator=g, dtype=DT)
    pc, pr = logps[0].clone().requires_grad_(True), logps[1].clone().requires_grad_(True)
    rc, rf = logps[2], logps[3]
    losses, _, _ = dpo_loss(pc, pr, rc, rf, cfg.beta)
    if not losses.requires_grad:
        return measure(math.inf, "the losses carry no gradient")
    grad_c, grad_r = torch.autograd.grad(losses.sum(), (pc, pr), allow_unused=True)
    weight = torch.sigmoid(cfg.beta * ((pr - rf) - (pc - rc))).detach()  # sigma(r_hat_rejected - r_hat_chosen)
    return [math.inf if grad_c is None else max_error(-grad_c / cfg.beta, weight),
            math.inf if grad_r is None else max_error(grad_r / cfg.beta, weight)]


@dpo.check("== 0", hint="return beta * logratios.detach().")
def implicit_rewards_are_detached(dpo_loss, cfg, g):
    """The implicit rewards beta log(pi/pi_ref) are metrics (rewards/margins, accuracies); the gradient
    comes from the loss alone, so the returned rewards carry no graph."""
    pc, pr = (-20.0 * torch.rand(2, 8, generator=g, dtype=DT)).requires_grad_(True)
    _, cr, rr = dpo_loss(pc, pr, pc.detach() + 1.0, pr.detach() - 1.0, cfg.beta)
    return measure(sum(bool(getattr(r, "requires_grad", False)) for r in (cr, rr)), "reward tensors with a graph")


@dpo.check(f"< {VECTOR_TOL}", hint="(h - 1/(2 beta))^2, not (beta h - 1/2)^2, and no sigmoid.")
def ipo_matches_reference_vectors(dpo_loss):
    """IPO regresses h onto 1/(2 beta) = 5 instead of pushing it to infinity: 25 at h = 0, 4 at h = 3,
    16 with TRL's length-averaged log-probs (lengths 4 and 2), and 0 with zero gradient at h = 5."""
    c, r, zero = _vec(VEC_CHOSEN), _vec(VEC_REJECTED), _vec(0.0)
    ipo0, _, _ = dpo_loss(zero, zero, zero, zero, VEC_BETA, loss_type="ipo")
    ipo, _, _ = dpo_loss(c, r, zero, zero, VEC_BETA, loss_type="ipo")
    ipo_len, _, _ = dpo_loss(c / 4, r / 2, zero, zero, VEC_BETA, loss_type="ipo")  # lengths (4, 2)
    h_min = _vec(0.5 / VEC_BETA).requires_grad_(True)
    ipo_min, _, _ = dpo_loss(h_min, zero, zero, zero, VEC_BETA, loss_type="ipo")
    grad = torch.autograd.grad(ipo_min.sum(), h_min, allow_unused=True)[0] if ipo_min.requires_grad else None
    return [max_error(ipo0, _vec(VEC_IPO_AT_REF)), max_error(ipo, _vec(VEC_IPO)),
            max_error(ipo_len, _vec(VEC_IPO_LEN)), max_error(ipo_min, zero),
            math.inf if grad is None else max_error(grad, zero)]


# ---- KTO: the module's implementation (not a kernel of this audit) ---------------------------------

@dpo.check(f"< {VECTOR_TOL}", hint="clamp the KL estimate at 0 and put it on the opposite side for undesirable "
                                  "answers.")
def kto_matches_reference_vectors():
    """KTO scores single answers against a KL baseline z: desirable 1 - sigma(beta(logratio - z)),
    undesirable 1 - sigma(beta(z - logratio)), z clamped at 0: 0.5 at the reference, 0.4625702 for both
    sides at z = 0.5, and (0.4501660, 0.4750208) when a negative estimate is clamped."""
    c, r, zero = _vec(VEC_CHOSEN), _vec(VEC_REJECTED), _vec(0.0)
    at_ref, _, _, _ = M.kto_loss(zero, zero, zero, zero, _vec(0.0, 0.0), _vec(0.0, 0.0), VEC_BETA)
    half, _, _, _ = M.kto_loss(c, r, zero, zero, _vec(0.5), zero, VEC_BETA)
    clamped, _, _, kl = M.kto_loss(c, r, zero, zero, _vec(-3.0), zero, VEC_BETA)
    return [max_error(at_ref, _vec(KTO_AT_REF, KTO_AT_REF)), max_error(half, _vec(KTO_KL_HALF, KTO_KL_HALF)),
            max_error(clamped, _vec(*KTO_CLAMPED)), max_error(kl, 0.0)]


@dpo.check({"kl_gradient": "== 0", "matched": "== 0"}, hint="rotate completions by one, (i + 1) % n, and "
                                                           ".detach() the KL estimate.")
def kto_kl_baseline_is_detached_and_mismatched():
    """KTO's KL baseline is estimated on mismatched (x_i, y_{i+1}) pairs and detached: it shifts the
    target, it is not an objective; reversing the batch would leave the middle of an odd batch matched."""
    c, r, zero = _vec(VEC_CHOSEN), _vec(VEC_REJECTED), _vec(0.0)
    kl_logps = _vec(0.3, -0.2, 0.9).requires_grad_(True)
    losses, _, _, _ = M.kto_loss(c.clone().requires_grad_(True), r, zero, zero, kl_logps, _vec(0.0, 0.0, 0.0),
                                 VEC_BETA)
    grad = torch.autograd.grad(losses.sum(), kl_logps, allow_unused=True)[0]
    matched = sum(int((M.mismatched_indices(n) == torch.arange(n)).sum()) for n in range(2, 10))
    return measure({"kl_gradient": 0.0 if grad is None else grad.abs().max().item(), "matched": matched},
                   "prompts that kept their own completion, n = 2..9")


# ---- the closed loop ----------------------------------------------------------------------------------

@dpo.fixture(cost=15)
def trained(ctx, cfg, g, data, dpo_loss):
    """DPO from policy = reference on the training pairs, with the dpo_loss kernel."""
    return M.run(cfg, g, dpo_loss=dpo_loss, data=data,
                 on_step=lambda step, record: ctx.progress(step + 1, cfg.steps))


@dpo.check(">= min_margin", kind="outcome", hint="the loss must decrease in h: -logsigmoid(+beta h), not (-beta h).")
def chosen_logp_rises_relative_to_rejected(trained):
    """DPO only moves the difference: the mean h = log-ratio(y_w) - log-ratio(y_l) on the training pairs
    rises from exactly 0, even when both log-probs fall (the chosen one often falls too)."""
    return measure(trained.margin, f"chosen {trained.chosen_shift:+.2f}, rejected {trained.rejected_shift:+.2f} nats")


@dpo.check({"start": "in [0.45, 0.55]", "end": ">= min_accuracy"}, kind="outcome",
           hint="rewards must be measured against the reference; chosen and rejected not swapped.")
def heldout_preference_accuracy_rises(trained):
    """The policy is an implicit reward model: beta log(pi/pi_ref) starts as a coin flip (every reward 0,
    ties count half) and ends ranking unseen pairs the way the gold reward does."""
    before, after = trained.evals[0], trained.evals[-1]
    return measure({"start": before.heldout_accuracy, "end": after.heldout_accuracy},
                   f"{len(trained.data.heldout)} held-out pairs")


@dpo.check(">= min_gold_gain", kind="outcome",
           hint="a flipped sign lowers the gold reward; too few steps leave it at the reference's.")
def policy_gold_reward_improves(trained, cfg):
    """Sampling from the trained policy and scoring with the gold rule shows real improvement (end minus
    start), not just a better loss on the pairs."""
    before, after = trained.evals[0].gold_reward, trained.evals[-1].gold_reward
    return measure(after - before, f"{before:.2f} -> {after:.2f} of {cfg.response_len}")


@dpo.check({"start": "== 0", "fraction": "<= max_kl_fraction"}, kind="outcome",
           hint="too large a learning rate or too many steps reach the collapse; the policy must start as an "
                "exact copy of the reference. Under Adam a tiny beta alone hardly changes the drift.")
def kl_to_reference_stays_below_collapse(trained):
    """The sequence KL to the reference starts at exactly 0 and ends below the KL of collapsing onto the
    best answer (always the target): with deterministic preferences sigmoid DPO's optimum IS that
    collapse (h -> infinity), so only the training budget keeps the policy short of it."""
    before, after = trained.evals[0].kl, trained.evals[-1].kl
    return measure({"start": before, "fraction": after / trained.collapse_kl},
                   f"{after:.2f} nats; always answering the target costs {trained.collapse_kl:.2f}")


IMPLICIT = r"implicit reward $\beta \log \pi_\theta / \pi_{ref}$ (nats)"
CURVES = {
    "loss": dict(label="DPO loss", y_label="loss per pair (nats)"),
    "rewards/chosen": dict(label="chosen answers", y_label=IMPLICIT, title="Implicit reward: chosen vs rejected"),
    "rewards/rejected": dict(label="rejected answers", y_label=IMPLICIT),
    "rewards/margins": dict(label="reward margin, chosen minus rejected", y_label=IMPLICIT),
    "rewards/accuracies": dict(label="pairs ranked right (training batch)", y_label="ranked right (fraction of pairs)"),
    "logps/chosen": dict(label="chosen answers", y_label="log-probability per answer (nats)",
                         title="Log-probability of chosen vs rejected answers"),
    "logps/rejected": dict(label="rejected answers", y_label="log-probability per answer (nats)"),
    "grad_norm": dict(label="gradient norm before clipping", y_label="gradient L2 norm"),
    "eval/rewards/accuracies": dict(label="held-out pairs ranked right", y_label="ranked right (fraction of pairs)"),
    "eval/rewards/margins": dict(label="held-out reward margin", y_label=IMPLICIT),
    "objective/gold_reward": dict(label="gold reward of sampled answers", y_label="gold reward (target digits per answer)",
                                  key=True),
    "objective/kl": dict(label="KL to the reference", y_label="KL per answer (nats)"),
}


@dpo.report
def curves(ctx, cfg, data, trained):
    p = cfg.warmup_target_prob
    ctx.series("warmup/loss", [h["loss"] for h in data.warm_up_history], x_label="warm-up step",
               label="warm-up loss (supervised)", y_label="loss per response token (nats)")
    ctx.scalar("warm-up response NLL (last step)", data.warm_up_history[-1]["loss"])
    floor = -(p * math.log(p) + (1 - p) * math.log((1 - p) / (cfg.n_digits - 1)))
    ctx.scalar("warm-up data entropy (the floor)", floor)
    ctx.scalar("training pairs (ties dropped)", len(data.train_pairs))
    ctx.scalar("held-out pairs", len(data.heldout))
    groups = {"rewards/chosen": "rewards/chosen_vs_rejected", "rewards/rejected": "rewards/chosen_vs_rejected",
              "logps/chosen": "logps/chosen_vs_rejected", "logps/rejected": "logps/chosen_vs_rejected"}
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "grad_norm"):
        ctx.series(name, [h[name] for h in trained.history], x_label="DPO step", group=groups.get(name, ""),
                   **CURVES[name])
    evals = trained.evals
    steps = [e.step for e in evals]
    for name, values in (("eval/rewards/accuracies", [e.heldout_accuracy for e in evals]),
                         ("eval/rewards/margins", [e.heldout_margin for e in evals]),
                         ("objective/gold_reward", [e.gold_reward for e in evals]),
                         ("objective/kl", [e.kl for e in evals])):
        ctx.series(name, values, steps, x_label="DPO step", **CURVES[name])
    ctx.scalar("gold reward: reference", evals[0].gold_reward)
    ctx.scalar("gold reward: DPO policy", evals[-1].gold_reward)
    ctx.scalar("held-out accuracy", evals[-1].heldout_accuracy)
    ctx.scalar("KL to the reference, nats", evals[-1].kl)
    ctx.scalar("KL of always answering the target, nats", trained.collapse_kl)
    ctx.scalar("KL / collapse KL", evals[-1].kl / trained.collapse_kl)
    ctx.scalar("mean h on the training pairs, nats", trained.margin)
    ctx.scalar("logps/chosen change", trained.chosen_shift)
