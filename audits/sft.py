"""Audit of SFT (day 5): CE = NLL, the loss mask, and pretraining -> SFT on single-digit arithmetic."""
from __future__ import annotations

import torch

from llmaudit.audit import Audit, kernel, max_error, measure
from modules.sft import sft as M
from modules.tokenizer import IM_END
from modules.training import IGNORE_INDEX
from modules.transformer import Transformer


def _example() -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[1, -1] = IGNORE_INDEX  # padding
    return {"logits": torch.randn(2, 6, 11, generator=g), "labels": labels, "ignore_index": IGNORE_INDEX}


KERNELS = [
    kernel(M.sft_loss, example=_example,
           hint="shift first: logits[:, :-1] predict labels[:, 1:]; then cross-entropy with "
                "ignore_index, averaged over the supervised tokens only (not over B*T)."),
]

sft = Audit("sft", day=5, title="SFT: cross-entropy = NLL, the loss mask, pretraining then chat fine-tuning",
            config=M.SFTConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _random_case(g: torch.Generator, B: int, T: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with a random prompt length per row and random right padding."""
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    prompt = torch.randint(1, T - 1, (B, 1), generator=g)
    end = prompt + 1 + torch.randint(0, T, (B, 1), generator=g)
    t = torch.arange(T)
    labels[(t < prompt) | (t >= end)] = IGNORE_INDEX
    return logits, labels


def _scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose logits are scored, i.e. labels[:, t + 1] is supervised."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored


@sft.fixture
def data(cfg, g):
    """The tokenizer, the fact split, the pretraining stream and the encoded conversations."""
    return M.build_data(cfg, g)


# ---- the mask: only assistant replies and their <|im_end|> are supervised ---------------------------

@sft.check("== 0", hint="find each '<|im_start|>assistant\\n' header and keep the tokens after it up to and "
                        "including the next <|im_end|>; everything else is -100.")
def labels_cover_only_assistant_replies(data, cfg):
    """The loss is p(reply | prompt): system and user turns and role headers are -100; the reply and its
    closing <|im_end|> are learned (the model must learn to stop)."""
    tok, wrong = data.tok, 0
    for fact, (_, labels) in zip(data.sft_facts, data.sft_examples):
        kept = [t for t in labels if t != IGNORE_INDEX]
        wrong += kept != tok.encode(M.reply_text(fact, cfg.echo_question)) + [tok.token_id(IM_END)]
    return measure(wrong, f"of {len(data.sft_examples)} conversations wrong")


# ---- the kernel: CE = NLL, shift, mask -------------------------------------------------------------

@sft.check("< 1e-5", hint="logits[:, :-1] score labels[:, 1:]; the mean runs over labels != ignore_index only.")
def sft_loss_equals_nll_by_hand(sft_loss, data, cfg, g):
    """With a one-hot target, cross-entropy -sum_k y_k log p_k is -log p_y: the negative log-likelihood
    of the supervised tokens, averaged over them (float64 random cases; float32 logits of the model)."""
    errors = []
    for B, T, V in ((1, 3, 3), (4, 9, 17), (8, 23, data.tok.vocab_size)):
        logits, labels = _random_case(g, B, T, V)
        errors.append(max_error(sft_loss(logits.double(), labels), M.nll_by_hand(logits, labels)))
    model = Transformer(M.model_config(cfg, data.tok.vocab_size))
    ids, labels = data.sft_batch(cfg.grad_check_batch, g, cfg.replay_fraction)
    with torch.no_grad():
        logits = model(ids)
    errors.append(max_error(sft_loss(logits, labels), M.nll_by_hand(logits, labels)))
    return errors


@sft.check({"noise_on_masked_logits": "< 1e-12", "ignore_value_as_pad_id": "< 1e-12"},
           hint="mask with labels != ignore_index (the argument, not a hard-coded -100) and divide by the "
                "number of supervised tokens.")
def loss_ignores_masked_positions(sft_loss, g):
    """A masked position is in neither the sum nor the denominator: neither its logits nor the value
    stored as its label (-100, or a pad id some code bases use as ignore_index) can change the loss."""
    V = 19
    pad_id = V - 1  # a real token id, which no supervised label takes below
    logits, labels = _random_case(g, 6, 12, V)
    logits, labels = logits.double(), labels.masked_fill(labels == pad_id, 0)
    base = sft_loss(logits, labels)
    unscored = ~_scored_positions(labels)
    noise = torch.randn(logits.shape, generator=g, dtype=torch.float64) * 50
    noisy = torch.where(unscored[..., None], noise, logits)
    as_pad = labels.masked_fill(labels == IGNORE_INDEX, pad_id)
    return {"noise_on_masked_logits": max_error(sft_loss(noisy, labels), base),
            "ignore_value_as_pad_id": max_error(sft_loss(logits, as_pad, ignore_index=pad_id), base)}


@sft.check({"masked": "== 0", "scored_without_gradient": "== 0"},
           hint="a mask applied after averaging, or a shift in the wrong direction, leaks gradient into prompt "
                "positions.")
def masked_positions_get_zero_gradient(sft_loss, g):
    """dL/dz_t = (p_t - onehot(y_{t+1})) / N only where y_{t+1} is supervised, exactly 0 elsewhere: the
    softmax couples the vocabulary of one position, never two positions."""
    logits, labels = _random_case(g, 6, 12, 19)
    leaf = logits.double().requires_grad_(True)
    loss = sft_loss(leaf, labels)
    grad = torch.autograd.grad(loss, leaf, allow_unused=True)[0] if loss.requires_grad else None
    scored = _scored_positions(labels)
    if grad is None:
        return measure({"masked": 0.0, "scored_without_gradient": int(scored.sum())}, "no gradient reaches the logits")
    per_position = grad.abs().amax(dim=-1)  # (B, T) largest gradient entry per position
    return measure({"masked": per_position[~scored], "scored_without_gradient": int((per_position[scored] == 0).sum())},
                   f"smallest gradient at a scored position {per_position[scored].min().item():.2g}")


@sft.check("< 1e-5", hint="pad the labels with -100 (IGNORE_INDEX), never with the pad id; divide by the number "
                          "of supervised tokens, not by B*T.")
def padding_does_not_change_the_loss(sft_loss, data, cfg):
    """Padding appends positions whose label is -100: more pad columns change neither the supervised
    tokens nor (causal mask) the logits before them, so the loss of a batch padded wider is the same."""
    model = Transformer(M.model_config(cfg, data.tok.vocab_size))
    examples = data.sft_examples[:8] + data.held_out_examples[:8]
    ids, labels = M.pad_batch(examples, data.pad_id)
    filler = [data.pad_id] * (ids.shape[1] + 4)  # a longer row, dropped again: 4 more pad columns
    wide_ids, wide_labels = M.pad_batch(examples + [(filler, filler)], data.pad_id)
    with torch.no_grad():
        narrow = sft_loss(model(ids), labels)
        wide = sft_loss(model(wide_ids[:-1]), wide_labels[:-1])
    return measure(max_error(wide, narrow), f"{ids.shape[1]} -> {wide_ids.shape[1]} columns")


# ---- the closed loop: pretraining teaches the facts, SFT the format ----------------------------------

@sft.fixture(cost=20)
def trained(ctx, cfg, g, data, sft_loss):
    """Pretraining on raw text, then SFT on ChatML with the sft_loss kernel."""
    return M.run(cfg, g, sft_loss=sft_loss, data=data, on_progress=ctx.progress)


@sft.check("<= max_loss_ratio", kind="outcome",
           hint="a loss that does not fall usually means the labels are misaligned with the logits (no shift) or "
                "the learning rate never left warmup.")
def sft_loss_decreases(trained):
    """SFT is maximum likelihood on the replies: gradient descent on the masked cross-entropy drives it
    down (mean of the last 10 % of steps over the first 10 %; the replayed raw text keeps a floor)."""
    losses = [h["loss"] for h in trained.sft_history]
    return measure(trained.loss_ratio, f"{losses[0]:.3f} -> {losses[-1]:.3f}")


@sft.check({"before": "<= max_base_format_rate", "after": ">= min_format_rate"}, kind="outcome",
           hint="if pretraining text already contains chat transcripts, the base model partly follows the "
                "template (pretrain_chat_fraction); a kernel without the shift never learns it.")
def chat_format_comes_from_sft(trained):
    """The base model never saw <|im_end|> or the role headers, so it does not answer inside the chat
    template nor stop; after SFT it replies in the trained shape and closes with <|im_end|>."""
    return measure({"before": trained.base_format_rate, "after": trained.format_rate},
                   f"chat exact match {trained.base_exact_match:.3f} -> {trained.exact_match:.3f}")


@sft.check(">= min_raw_accuracy", kind="outcome", modes=("full",),
           hint="pretraining must see every fact as a raw line; too few steps leave the table unlearned.")
def pretrained_model_knows_the_facts_as_raw_text(trained):
    """Before any SFT, the base model continues the raw text '3+4=' with '7' for (nearly) every fact,
    the held-out ones included: the knowledge is there, only the chat format is missing."""
    return trained.raw_accuracy


@sft.check(">= min_exact_match", kind="outcome", modes=("full",),
           hint="check the shift and the mask first; a kernel that scores logits[:, t] against labels[:, t] "
                "trains the model to copy its input.")
def sft_exact_match_on_held_out_prompts(trained):
    """Greedy decoding with the KV cache answers chat questions never seen in SFT: the facts come from
    pretraining, SFT taught the chat format around them."""
    return measure(trained.exact_match, f"SFT prompts {trained.seen_exact_match:.3f}")


@sft.report
def curves(ctx, trained):
    data = trained.data
    ctx.scalar("vocab_size", data.tok.vocab_size)
    ctx.scalar("sft_prompts / held_out_prompts", f"{len(data.sft_facts)} / {len(data.held_out_facts)}")
    ctx.series("pretrain/loss", [h["loss"] for h in trained.pretrain_history], x_label="pre-training step",
               label="pre-training loss (raw text)", y_label="loss per token (nats)")
    ctx.series("train/loss", [h["loss"] for h in trained.sft_history], range(1, len(trained.sft_history) + 1),
               x_label="SFT step", label="SFT loss (reply tokens only)", y_label="loss per reply token (nats)")
    steps = [e[0] for e in trained.evals]
    ctx.series("eval/loss", [e[1] for e in trained.evals], steps, x_label="SFT step",
               label="held-out SFT loss", y_label="loss per reply token (nats)")
    ctx.series("eval/exact_match", [e[2] for e in trained.evals], steps, smooth=False, x_label="SFT step", key=True,
               label="held-out exact match", y_label="replies exactly right (fraction)")
    ctx.scalar("pretrained raw-text accuracy", trained.raw_accuracy)
    ctx.scalar("pretrained chat exact match", trained.base_exact_match)
    ctx.scalar("pretrained chat format rate", trained.base_format_rate)
    ctx.scalar("held-out perplexity (reply tokens)", trained.heldout_perplexity)
    ctx.scalar("held-out exact match after SFT", trained.exact_match)
    ctx.scalar("SFT-prompt exact match after SFT", trained.seen_exact_match)
    ctx.scalar("format rate after SFT", trained.format_rate)
    ctx.scalar("SFT loss ratio (last / first 10%)", trained.loss_ratio)
