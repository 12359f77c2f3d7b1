"""Audit of the reward model (day 7): the Bradley–Terry loss, where the score is read, and a closed loop
that learns a preference ranking from noisy pairs and agrees with the gold reward."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Context, audit, kernel
from modules import reward_model as M

LN2 = math.log(2.0)


def _example_bt() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"chosen_rewards": torch.randn(4, generator=g), "rejected_rewards": torch.randn(4, generator=g),
            "margin": None}


def _example_last_token() -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    return {"values": torch.randn(3, 5, generator=g), "attention_mask": mask}


KERNELS = [
    kernel(M.bradley_terry_loss, example=_example_bt,
           hint="loss = -logsigmoid(r_chosen - r_rejected - margin).mean(); accuracy = (r_chosen > "
                "r_rejected).float().mean(); log(sigmoid(x)) is -inf in float32 once the gap is below -88."),
    kernel(M.last_token_rewards, example=_example_last_token,
           hint="the index of the last real token is mask.sum(-1) - 1 for right padding (the rightmost 1 in "
                "general); values[:, -1] reads padding, mask.sum(-1) reads the first pad."),
]


@audit("reward_model", day=7, title="Reward model: the Bradley–Terry pairwise loss", config=M.RewardModelConfig,
       kernels=KERNELS, formulas=M.FORMULAS)
def audit_reward_model(ctx: Context, *, bradley_terry_loss=M.bradley_terry_loss,
                       last_token_rewards=M.last_token_rewards) -> None:
    cfg: M.RewardModelConfig = ctx.config
    g = ctx.generator(0)
    f64 = torch.float64

    # --- the loss, on its own ----------------------------------------------------------------------
    r = torch.randn(256, generator=g, dtype=f64) * 3
    loss_equal, _ = bradley_terry_loss(r, r.clone())
    err = abs(float(loss_equal) - LN2)
    ctx.check("loss_is_ln2_when_rewards_equal", err < 1e-6, float(loss_equal), "ln 2 = 0.693147 (±1e-6)",
              "With equal rewards the model says 50/50, so the loss is -log sigmoid(0) = ln 2: the value a "
              "freshly initialised reward model starts from.",
              hint="the loss is the MEAN of -log sigmoid(gap) over pairs (a sum gives B ln 2); no hinge, "
                   "no extra terms.")

    cases = [  # (chosen, rejected, margin) -> (loss, accuracy): TRL reward_trainer vectors plus a batch
        (torch.tensor([2.0]), torch.tensor([1.0]), None, 0.3132617, 1.0),
        (torch.tensor([2.0]), torch.tensor([1.0]), 1.0, LN2, 1.0),
        (torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 3.0]), torch.tensor([1.0, 0.0, 0.5]), 1.4782939, 1 / 3),
    ]
    worst = 0.0
    for chosen, rejected, margin, want_loss, want_acc in cases:
        loss, acc = bradley_terry_loss(chosen.to(f64), rejected.to(f64), margin if not torch.is_tensor(margin)
                                       else margin.to(f64))
        worst = max(worst, abs(float(loss) - want_loss), abs(float(acc) - want_acc))
    ctx.check("loss_matches_trl_reference_vector", worst < 1e-6, worst,
              "(2,1) -> 0.3132617; margin 1 -> ln 2; batch with a tie -> 1.4782939, accuracy 1/3 (|err| < 1e-6)",
              "-log sigmoid(r_c - r_r - m): the margin is SUBTRACTED from the gap, and a tie is not a correct ranking.",
              hint="subtract the margin (r_c - r_r - m), accept a float or a (B,) margin, count only strict wins.")

    a, b = torch.randn(256, generator=g, dtype=f64) * 2, torch.randn(256, generator=g, dtype=f64) * 2
    base, _ = bradley_terry_loss(a, b)
    shift_err = max(abs(float(bradley_terry_loss(a + c, b + c)[0]) - float(base)) for c in (-7.0, 3.0, 50.0))
    ctx.check("loss_is_invariant_to_reward_shift", shift_err < 1e-9, shift_err, "< 1e-9",
              "Bradley–Terry sees only reward differences, so adding a constant to every reward changes nothing; "
              "that is why RM scores must be normalised before RL.",
              hint="the loss must depend on r_chosen - r_rejected only, not on each reward through its own sigmoid.")

    rc = (torch.randn(64, generator=g, dtype=f64) * 2).requires_grad_()
    rr = (torch.randn(64, generator=g, dtype=f64) * 2).requires_grad_()
    m = torch.rand(64, generator=g, dtype=f64)
    loss, _ = bradley_terry_loss(rc, rr, m)
    loss.backward()
    weight = torch.sigmoid(-(rc.detach() - rr.detach() - m)) / rc.numel()  # sigma(r_r - r_c + m) / B
    grad_err = max((rc.grad + weight).abs().max().item(), (rr.grad - weight).abs().max().item()) \
        if rc.grad is not None and rr.grad is not None else float("inf")
    ctx.check("loss_gradient_is_sigmoid_of_reward_gap", grad_err < 1e-9, grad_err,
              "dL/dr_c = -sigma(r_r - r_c + m) / B = -dL/dr_r (< 1e-9)",
              "Each pair pushes its two rewards apart with weight sigma(r_r - r_c + m): hardest on mis-ranked "
              "pairs, vanishing on pairs already ranked by a wide gap.",
              hint="both rewards must stay in the graph (no .detach() on either) and the loss is a mean over pairs.")

    big = torch.tensor([200.0, -200.0])  # float32: sigmoid(-200) underflows to 0
    loss_wrong, _ = bradley_terry_loss(big[1:], big[:1])  # gap -400
    loss_right, _ = bradley_terry_loss(big[:1], big[1:])  # gap +400
    finite = math.isfinite(float(loss_wrong)) and math.isfinite(float(loss_right))
    stable = finite and abs(float(loss_wrong) - 400.0) < 1e-3 and abs(float(loss_right)) < 1e-6
    ctx.check("loss_is_finite_for_large_reward_gaps", stable,
              f"gap -400: {float(loss_wrong):.6g}, gap +400: {float(loss_right) + 0.0:.3g}",
              "400 and 0, finite (float32)",
              "-log sigmoid(x) = softplus(-x) is computed stably with logsigmoid; log(sigmoid(x)) underflows to "
              "-inf once the model ranks a pair confidently the wrong way.",
              hint="use F.logsigmoid(gap) (or F.softplus(-gap)), never torch.log(torch.sigmoid(gap)) or "
                   "log(1 + exp(-gap)).")
    ctx.progress(0.05)

    # --- the backbone: a short supervised warm-up, then the value head -------------------------------
    lm, lm_history = M.warmup_language_model(cfg, ctx.generator(1))
    if lm_history:
        ctx.series("warmup/lm_loss", [h["loss"] for h in lm_history], x_label="warm-up step")
        ctx.scalar("warm-up LM loss (nats/token)", lm_history[-1]["loss"])
    rm = M.reward_model_from_lm(lm, cfg.head_init_std)
    ctx.progress(0.35)
    bos, sep, eos, pad = M.special_tokens(cfg)
    ctx.scalar("parameters", sum(p.numel() for p in rm.parameters()))

    # --- padding: the score must be read at the last real token ---------------------------------------
    targets = M.sample_targets(cfg, cfg.pad_checks, ctx.generator(5))
    seqs = M.sample_sequences(cfg, targets, ctx.generator(5))  # right-padded, at least one pad column
    padded = torch.cat([seqs, torch.full((seqs.shape[0], cfg.extra_pad), pad)], dim=1)
    with torch.no_grad():
        rm.eval()
        batch_scores = M.score(rm, padded, pad, reward_fn=last_token_rewards)
        lengths = (seqs != pad).sum(dim=1)
        alone = torch.empty(seqs.shape[0])
        for n in lengths.unique().tolist():  # each length group alone, no padding: value at the last position
            rows = lengths == n
            alone[rows] = M.token_values(rm, seqs[rows, :n])[:, -1]
    pad_err = (batch_scores - alone).abs().max().item()
    ctx.check("padding_does_not_change_reward", pad_err < 1e-5, pad_err, "max |r(padded) - r(alone)| < 1e-5",
              "The value head is read at the last real token (<eos>); with right padding and a causal mask that "
              "position never sees the pads, so the score equals the unpadded sequence's.",
              hint="gather at mask.sum(-1) - 1 (the rightmost real token), not at the last column or the first pad.")

    # --- closed loop: train on noisy pairs, evaluate on clean held-out pairs ----------------------------
    eval_pairs = M.preference_pairs(cfg, cfg.eval_pairs, ctx.generator(2))
    acc_before = M.pairwise_accuracy(rm, eval_pairs, pad, last_token_rewards)

    def on_step(step: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], step)
        ctx.log("rewards/chosen", record["chosen"], step, group="rewards")
        ctx.log("rewards/rejected", record["rejected"], step, group="rewards")
        ctx.log("rewards/margins", record["margin"], step)
        if "eval_accuracy" in record:
            ctx.log("eval/accuracy", record["eval_accuracy"], step, smooth=False)
        ctx.progress(0.35 + 0.55 * (step + 1) / cfg.steps)

    history = M.train_reward_model(rm, cfg, ctx.generator(3), loss_fn=bradley_terry_loss,
                                   reward_fn=last_token_rewards, eval_pairs=eval_pairs.head(cfg.eval_curve_pairs),
                                   on_step=on_step)
    acc_after = M.pairwise_accuracy(rm, eval_pairs, pad, last_token_rewards)
    ctx.log("eval/accuracy", M.pairwise_accuracy(rm, eval_pairs.head(cfg.eval_curve_pairs), pad,
                                                 last_token_rewards), cfg.steps)
    ctx.scalar("held-out accuracy before", acc_before)
    ctx.scalar("held-out accuracy after", acc_after)
    ctx.scalar("first-step loss", history[0]["loss"])
    ctx.scalar("label noise (training pairs flipped)", cfg.label_noise)
    ctx.check("heldout_pairwise_accuracy", acc_after >= cfg.min_accuracy, acc_after, f">= {cfg.min_accuracy:g}",
              "Trained on pairs with flipped labels, the RM still ranks clean held-out pairs by the gold reward: "
              "BT fits the probability of a preference, and label noise only flattens it.", kind="outcome",
              hint="a sign error in the loss ranks pairs backwards; reading padding as the score hides the answer.")

    # --- does the proxy agree with the gold reward? ---------------------------------------------------
    gc = ctx.generator(4)
    prompts = M.sample_targets(cfg, cfg.eval_prompts, gc)
    responses = M.sample_sequences(cfg, prompts.repeat_interleave(cfg.eval_responses), gc)
    with torch.no_grad():
        rm.eval()
        scores = M.score(rm, responses, pad, reward_fn=last_token_rewards)
    gold = M.gold_reward(responses)
    within = M.within_prompt_spearman(scores.view(cfg.eval_prompts, -1), gold.view(cfg.eval_prompts, -1))
    pooled, linear = M.spearman(scores, gold), M.pearson(scores, gold)
    ctx.scalar("Spearman within prompts", within)
    ctx.scalar("Spearman pooled", pooled)
    ctx.scalar("Pearson pooled", linear)
    ctx.check("reward_correlates_with_gold", within >= cfg.min_spearman, within,
              f"within-prompt Spearman >= {cfg.min_spearman:g}",
              "The RM is a proxy: it is only useful for RL if its score orders responses the way the true reward "
              "does; BT fixes rewards up to a per-prompt constant, so rank them within each prompt.",
              kind="outcome", hint="pairs must be labelled by the gold reward and the score read at <eos>.")
    levels = gold.unique()
    ctx.series("eval/mean_score_by_gold", [scores[gold == v].mean().item() for v in levels], levels,
               x_label="gold reward (count of the target digit)", smooth=False)
    ctx.progress(1.0)
