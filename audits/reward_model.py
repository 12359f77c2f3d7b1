"""Audit of the reward model (day 7): the Bradley–Terry loss, where the score is read, and a closed loop
that learns a preference ranking from noisy pairs and agrees with the gold reward."""
from __future__ import annotations

import math

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.reward_model import reward_model as M
from modules.transformer import Transformer

LN2 = math.log(2.0)
F64 = torch.float64
EXACT = 1e-6  # closed forms and 7-digit reference constants
ROUND_OFF = 1e-9  # float64 identities


def _example_bt() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"chosen_rewards": torch.randn(4, generator=g), "rejected_rewards": torch.randn(4, generator=g),
            "margin": None}


def _example_last_token() -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    return {"values": torch.randn(3, 5, generator=g), "attention_mask": mask}


KERNELS = [
    kernel(M.bradley_terry_loss, example=_example_bt,
           hint="loss = -logsigmoid(r_chosen - r_rejected - margin).mean(); accuracy = (r_chosen > "
                "r_rejected).float().mean(); log(sigmoid(x)) is -inf in float32 once the gap is below -88."),
    kernel(M.last_token_rewards, example=_example_last_token,
           hint="the index of the last real token is the rightmost 1 of the mask: T - 1 - mask.flip(-1).argmax(-1) "
                "(mask.sum(-1) - 1 only for right padding); values[:, -1] reads padding, mask.sum(-1) the first pad."),
]

rm_audit = Audit("reward_model", day=7, title="Reward model: the Bradley–Terry pairwise loss",
                 config=M.RewardModelConfig, kernels=KERNELS, formulas=M.FORMULAS)


# ---- the loss, on its own: closed forms and TRL's vectors -----------------------------------------

@rm_audit.check(f"< {EXACT}", hint="the loss is the MEAN of -log sigmoid(gap) over pairs (a sum gives B ln 2); "
                                  "no hinge, no extra terms.")
def loss_is_ln2_when_rewards_equal(bradley_terry_loss, g):
    """With equal rewards the model says 50/50, so the loss is -log sigmoid(0) = ln 2 = 0.693147: the
    value a freshly initialised reward model starts from."""
    r = torch.randn(256, generator=g, dtype=F64) * 3
    loss, _ = bradley_terry_loss(r, r.clone())
    return max_error(loss, LN2)


TRL_CASES = [  # (chosen, rejected, margin) -> (loss, accuracy): TRL reward_trainer vectors, then a batch with a tie
    ([2.0], [1.0], None, 0.3132617, 1.0),
    ([2.0], [1.0], 1.0, LN2, 1.0),
    ([2.0, 1.0, 0.5], [1.0, 1.0, 3.0], [1.0, 0.0, 0.5], 1.4782939, 1 / 3),
]


@rm_audit.check(f"< {EXACT}", hint="subtract the margin (r_c - r_r - m), accept a float or a (B,) margin, "
                                  "count only strict wins.")
def loss_matches_trl_reference_vector(bradley_terry_loss):
    """(2, 1) gives -log sigmoid(1) = 0.3132617; a margin of 1 is SUBTRACTED from the gap (ln 2); in the
    batch [(2,1,m=1), (1,1), (.5,3,m=.5)] the tie is not a correct ranking: loss 1.4782939, accuracy 1/3."""
    errors = []
    for chosen, rejected, margin, want_loss, want_acc in TRL_CASES:
        m = torch.tensor(margin, dtype=F64) if isinstance(margin, list) else margin
        loss, acc = bradley_terry_loss(torch.tensor(chosen, dtype=F64), torch.tensor(rejected, dtype=F64), m)
        errors += [max_error(loss, want_loss), max_error(torch.as_tensor(acc, dtype=F64), want_acc)]
    return errors


@rm_audit.check(f"< {ROUND_OFF}", hint="the loss must depend on r_chosen - r_rejected only, not on each reward "
                                       "through its own sigmoid.")
def loss_is_invariant_to_reward_shift(bradley_terry_loss, g):
    """Bradley–Terry sees only reward differences, so adding a constant to every reward changes
    nothing; that is why RM scores must be normalised before RL."""
    a, b = torch.randn(256, generator=g, dtype=F64) * 2, torch.randn(256, generator=g, dtype=F64) * 2
    base, _ = bradley_terry_loss(a, b)
    return [max_error(bradley_terry_loss(a + c, b + c)[0], base) for c in (-7.0, 3.0, 50.0)]


@rm_audit.check(f"< {ROUND_OFF}", hint="both rewards must stay in the graph (no .detach() on either) and the loss "
                                       "is a mean over pairs.")
def loss_gradient_is_sigmoid_of_reward_gap(bradley_terry_loss, g):
    """dL/dr_c = -sigma(r_r - r_c + m) / B = -dL/dr_r: each pair pushes its two rewards apart, hardest
    on mis-ranked pairs, hardly at all on pairs already ranked by a wide gap."""
    rc = (torch.randn(64, generator=g, dtype=F64) * 2).requires_grad_()
    rr = (torch.randn(64, generator=g, dtype=F64) * 2).requires_grad_()
    m = torch.rand(64, generator=g, dtype=F64)
    loss, _ = bradley_terry_loss(rc, rr, m)
    if not loss.requires_grad:
        return measure(math.inf, "the loss carries no gradient")
    grad_c, grad_r = torch.autograd.grad(loss, (rc, rr), allow_unused=True)
    weight = torch.sigmoid(rr.detach() - rc.detach() + m) / rc.numel()
    return [math.inf if grad_c is None else max_error(grad_c, -weight),
            math.inf if grad_r is None else max_error(grad_r, weight)]


@rm_audit.check("< 1e-3", hint="use F.logsigmoid(gap) (or F.softplus(-gap)), never torch.log(torch.sigmoid(gap)) "
                               "or log(1 + exp(-gap)).")
def loss_is_finite_for_large_reward_gaps(bradley_terry_loss):
    """-log sigmoid(x) = softplus(-x) is computed stably: in float32 a gap of -400 costs 400 and +400
    costs 0, where log(sigmoid(x)) underflows to -inf once a pair is ranked confidently wrong."""
    big = torch.tensor([200.0, -200.0])  # float32: sigmoid(-400) underflows to 0
    wrong, _ = bradley_terry_loss(big[1:], big[:1])  # gap -400
    right, _ = bradley_terry_loss(big[:1], big[1:])  # gap +400
    return measure([max_error(wrong, 400.0), max_error(right, 0.0)],
                   f"gap -400: {float(wrong):.6g}, gap +400: {float(right) + 0.0:.3g}")


# ---- where the score is read ---------------------------------------------------------------------

def _masks(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """(B, T) bool masks: right-padded rows, left-padded rows, and some rows with no padding at all."""
    length = torch.randint(1, T + 1, (B, 1), generator=g)
    length[: B // 8] = T  # no padding
    pos = torch.arange(T)[None]
    left = torch.arange(B)[:, None] % 2 == 1
    return torch.where(left, pos >= T - length, pos < length)


def _rightmost(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 of each row, OpenRLHF's way: T - 1 - argmax of the flipped mask."""
    return mask.shape[1] - 1 - mask.long().flip(-1).argmax(-1)


@rm_audit.check("< 1e-12", hint="take the rightmost 1 of the mask; mask.sum(-1) - 1 is right only for right padding.")
def reads_the_rightmost_real_token_under_left_and_right_padding(last_token_rewards, g):
    """With right padding the last real token is at mask.sum() - 1, with left padding it is the last
    column: the score is the value at the rightmost 1 of the mask, whichever side was padded."""
    values = torch.randn(64, 12, generator=g, dtype=F64)
    mask = _masks(g, 64, 12)
    want = values.gather(1, _rightmost(mask)[:, None]).squeeze(1)
    return [max_error(last_token_rewards(values, mask.long()), want),
            max_error(last_token_rewards(values, mask), want)]


@rm_audit.check("< 1e-12", hint="gather one value per row; a mean or sum over the mask counts the prompt.")
def reward_ignores_prompt_and_earlier_positions(last_token_rewards, g):
    """r(x, y) is the value at the end of the response: the values at the prompt, at earlier response
    tokens and at the pads must not move it, and moving the last real token's value by 1 moves it by 1."""
    values = torch.randn(64, 12, generator=g, dtype=F64)
    mask = _masks(g, 64, 12)
    last = torch.nn.functional.one_hot(_rightmost(mask), 12).bool()  # (B, T)
    base = last_token_rewards(values, mask)
    elsewhere = values + torch.where(last, 0.0, 10 * torch.randn(values.shape, generator=g, dtype=F64))
    return [max_error(last_token_rewards(elsewhere, mask), base),
            max_error(last_token_rewards(values + last.double(), mask), base + 1)]


@rm_audit.fixture
def probe_rm(cfg):
    """An untrained tiny Llama with a value head (std 1, so every position's value differs): the
    padding property holds for any weights, since it comes from the causal mask and the read index."""
    return M.reward_model_from_lm(Transformer(M.model_config(cfg)), head_init_std=1.0).eval()


@rm_audit.check("< 1e-5", hint="gather at the rightmost real token (mask.sum(-1) - 1 here), not at the last "
                               "column or the first pad.")
def padding_does_not_change_reward(last_token_rewards, probe_rm, cfg, g):
    """The value head is read at the last real token (<eos>); with right padding and a causal mask that
    position never sees the pads, so the score equals the unpadded sequence's (float32 round-off)."""
    pad = M.special_tokens(cfg)[3]
    seqs = M.sample_sequences(cfg, M.sample_targets(cfg, cfg.pad_checks, g), g)  # right-padded
    padded = torch.cat([seqs, torch.full((seqs.shape[0], cfg.extra_pad), pad)], dim=1)
    lengths = (seqs != pad).sum(dim=1)
    with torch.no_grad():
        batch_scores = M.score(probe_rm, padded, pad, reward_fn=last_token_rewards)
        alone = torch.empty(seqs.shape[0])
        for n in lengths.unique().tolist():  # each length group alone, no padding: value at the last position
            rows = lengths == n
            alone[rows] = M.token_values(probe_rm, seqs[rows, :n])[:, -1]
    return max_error(batch_scores, alone)


@rm_audit.check("== 0", hint="count from the first response token (after <sep>), not from the prompt's digit.")
def gold_reward_counts_the_response_only(cfg, g):
    """The gold reward is how often the target digit occurs in the RESPONSE; the prompt names that
    digit once, and counting it would add 1 to every sequence (invisible to pairwise labels)."""
    seqs = M.sample_sequences(cfg, M.sample_targets(cfg, 256, g), g)
    eos = M.special_tokens(cfg)[2]
    slow = [sum(t == row[1] for t in row[3:row.index(eos)]) for row in seqs.tolist()]
    return measure(int((M.gold_reward(seqs) != torch.tensor(slow, dtype=torch.float32)).sum()),
                   f"of {len(slow)} sequences")


# ---- the closed loop: noisy pairs in, a ranking that agrees with the gold reward out ----------------

@rm_audit.fixture(cost=20)
def trained(ctx, cfg, g, bradley_terry_loss, last_token_rewards):
    """Warm-up LM -> value head -> Bradley–Terry on noisy pairs, scored with the two kernels."""
    return M.run(cfg, g, bradley_terry_loss=bradley_terry_loss, last_token_rewards=last_token_rewards,
                 on_step=lambda step, record: ctx.progress(step + 1, cfg.steps))


@rm_audit.check(">= min_accuracy", kind="outcome",
                hint="a sign error in the loss ranks pairs backwards; reading padding as the score hides the answer.")
def heldout_pairwise_accuracy(trained):
    """Trained on pairs with flipped labels, the RM still ranks clean held-out pairs by the gold
    reward: BT fits the probability of a preference, and label noise only flattens it."""
    return measure(trained.accuracy_after, f"before training {trained.accuracy_before:.3f}")


@rm_audit.check(">= min_spearman", kind="outcome",
                hint="pairs must be labelled by the gold reward and the score read at <eos>.")
def reward_correlates_with_gold(trained):
    """The RM is a proxy, useful for RL only if its score orders responses the way the true reward does;
    BT fixes rewards up to a per-prompt constant, so the ranks are compared within each prompt."""
    return measure(trained.within_prompt_spearman,
                   f"pooled Spearman {M.spearman(trained.scores.flatten(), trained.gold.flatten()):.3f}")


@rm_audit.report
def curves(ctx, cfg, trained):
    h = trained.history
    if trained.lm_history:
        ctx.series("warmup/lm_loss", [r["loss"] for r in trained.lm_history], x_label="warm-up step",
                   label="warm-up language-model loss", y_label="loss per token (nats)")
        ctx.scalar("warm-up LM loss (nats/token)", trained.lm_history[-1]["loss"])
    ctx.series("train/loss", [r["loss"] for r in h], x_label="reward-model step",
               label="Bradley-Terry loss", y_label="loss per pair (nats)")
    ctx.series("rewards/chosen", [r["chosen"] for r in h], x_label="reward-model step", group="rewards",
               label="chosen answers", y_label="RM score (logits)", title="Scores of chosen vs rejected answers")
    ctx.series("rewards/rejected", [r["rejected"] for r in h], x_label="reward-model step", group="rewards",
               label="rejected answers", y_label="RM score (logits)")
    ctx.series("rewards/margins", [r["margin"] for r in h], x_label="reward-model step",
               label="score margin, chosen minus rejected", y_label="RM score margin (logits)")
    evals = [(i, r["eval_accuracy"]) for i, r in enumerate(h) if "eval_accuracy" in r] + \
        [(cfg.steps, trained.curve_accuracy_after)]
    ctx.series("eval/accuracy", [a for _, a in evals], [i for i, _ in evals], x_label="reward-model step", smooth=False,
               label="held-out pairwise accuracy", y_label="pairs ranked right (fraction)", key=True)
    scores, gold = trained.scores.flatten(), trained.gold.flatten()
    levels = gold.unique()
    ctx.series("eval/mean_score_by_gold", [scores[gold == v].mean().item() for v in levels], levels,
               x_label="gold reward (count of the target digit)", smooth=False,
               label="mean RM score at each gold reward", y_label="RM score (logits)")
    ctx.scalar("parameters", sum(p.numel() for p in trained.rm.parameters()))
    ctx.scalar("held-out accuracy before", trained.accuracy_before)
    ctx.scalar("held-out accuracy after", trained.accuracy_after)
    ctx.scalar("first-step loss", h[0]["loss"])
    ctx.scalar("label noise (training pairs flipped)", cfg.label_noise)
    ctx.scalar("Spearman within prompts", trained.within_prompt_spearman)
    ctx.scalar("Spearman pooled", M.spearman(scores, gold))
    ctx.scalar("Pearson pooled", M.pearson(scores, gold))
