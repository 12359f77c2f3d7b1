"""Audit of SFT (day 5): CE = NLL, the loss mask, and pretraining -> SFT on single-digit arithmetic."""
from __future__ import annotations

import torch

from llmaudit.audit import Context, audit, kernel
from modules import sft as M
from modules.tokenizer import IM_END
from modules.training import IGNORE_INDEX, perplexity
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


def _random_case(g: torch.Generator, B: int, T: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels with a random prompt length per row and random right padding."""
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    prompt = torch.randint(1, T - 1, (B, 1), generator=g)
    end = prompt + 1 + torch.randint(0, T, (B, 1), generator=g)
    t = torch.arange(T)
    labels[(t < prompt) | (t >= end)] = IGNORE_INDEX
    return logits, labels


@audit("sft", day=5, title="SFT: cross-entropy = NLL, the loss mask, pretraining then chat fine-tuning",
       config=M.SFTConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_sft(ctx: Context, *, sft_loss=M.sft_loss) -> None:
    cfg: M.SFTConfig = ctx.config
    g = ctx.generator(0)
    data = M.build_data(cfg, ctx.generator(1))
    tok = data.tok
    ctx.scalar("vocab_size", tok.vocab_size)
    ctx.scalar("sft_prompts / held_out_prompts", f"{len(data.sft_facts)} / {len(data.held_out_facts)}")

    # --- the mask: only assistant replies and their <|im_end|> are supervised -------------------
    wrong = 0
    for f, (ids, labels) in zip(data.sft_facts, data.sft_examples):
        kept = [t for t in labels if t != IGNORE_INDEX]
        wrong += kept != tok.encode(M.reply_text(f, cfg.echo_question)) + [tok.token_id(IM_END)]
    ctx.check("labels_cover_only_assistant_replies", wrong == 0, f"{wrong} of {len(data.sft_examples)} wrong",
              "0 conversations", "The loss is p(reply | prompt): system and user turns, role headers and "
              "padding are -100, the reply and its closing <|im_end|> are learned (the model must learn to stop).",
              hint="find each '<|im_start|>assistant\\n' header and keep the tokens after it up to and "
                   "including the next <|im_end|>; everything else is -100.")

    # --- CE = NLL: the kernel against log-softmax + gather by hand ----------------------------
    errors = []
    for B, T, V in ((1, 3, 3), (4, 9, 17), (8, 23, tok.vocab_size)):
        logits, labels = _random_case(g, B, T, V)
        errors.append(abs(float(sft_loss(logits.double(), labels)) - float(M.nll_by_hand(logits, labels))))
    model = Transformer(M.model_config(cfg, tok.vocab_size))
    batch_ids, batch_labels = data.sft_batch(cfg.grad_check_batch, g, cfg.replay_fraction)
    with torch.no_grad():
        model_logits = model(batch_ids)
    errors.append(abs(float(sft_loss(model_logits, batch_labels)) - float(M.nll_by_hand(model_logits, batch_labels))))
    err = max(errors)
    ctx.check("sft_loss_equals_nll_by_hand", err < 1e-5, err, "|CE - NLL| < 1e-5 (float64 random cases, "
              "float32 model logits)", "With a one-hot target, cross-entropy -sum_k y_k log p_k is -log p_y: "
              "the negative log-likelihood of the supervised tokens, averaged over them.",
              hint="logits[:, :-1] score labels[:, 1:]; the mean runs over labels != ignore_index only.")

    # --- masked positions: their logits and their stored label value do not matter --------------
    logits, labels = _random_case(g, 6, 12, 19)
    logits = logits.double()
    base = sft_loss(logits, labels)
    masked = torch.zeros_like(labels, dtype=torch.bool)
    masked[:, :-1] = labels[:, 1:] == IGNORE_INDEX  # logits[:, t] is scored against labels[:, t+1]
    masked[:, -1] = True  # the last position predicts nothing
    noisy = torch.where(masked[..., None], torch.randn(logits.shape, generator=g, dtype=torch.float64) * 50, logits)
    d_logits = abs(float(sft_loss(noisy, labels) - base))
    try:  # the same mask written with another ignore value (some code bases use the pad id)
        other = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, -1), labels)
        d_label = abs(float(sft_loss(logits, other, ignore_index=-1) - base))
    except (IndexError, RuntimeError) as exc:  # a kernel that hard-codes -100 meets a -1 label
        d_label = f"raised {type(exc).__name__}"
    ok = d_logits < 1e-12 and isinstance(d_label, float) and d_label < 1e-12
    ctx.check("loss_ignores_masked_positions", ok, f"noise on masked logits: {d_logits:.2g}; "
              f"ignore value -100 -> -1: {d_label if isinstance(d_label, str) else format(d_label, '.2g')}",
              "both < 1e-12", "A masked position is in neither the sum nor the denominator, so neither its "
              "logits nor the value stored as its label can change the loss.",
              hint="mask with labels != ignore_index (the argument, not a hard-coded -100) and divide by "
                   "the number of supervised tokens.")

    leaf = logits.clone().requires_grad_(True)
    sft_loss(leaf, labels).backward()
    grad = leaf.grad.abs().amax(dim=-1)  # (B, T) largest gradient entry per position
    masked_grad = float(grad[masked].max())
    live = float(grad[~masked].min()) if (~masked).any() else 0.0
    ctx.check("masked_positions_get_zero_gradient", masked_grad == 0.0 and live > 0,
              f"max |dL/dz| masked = {masked_grad:.2g}, min over supervised = {live:.2g}",
              "masked exactly 0, supervised > 0", "dL/dz_t = (p_t - onehot(y_{t+1})) / N only where "
              "y_{t+1} is supervised; the softmax couples the vocabulary of one position, not positions.",
              hint="a mask applied after averaging, or a shift in the wrong direction, leaks gradient "
                   "into prompt positions.")
    ctx.progress(0.1)

    # --- stage 1: pretraining on raw text ------------------------------------------------------
    pre_hist = M.pretrain(model, data, cfg, g, on_step=lambda i, r: ctx.progress(0.1 + 0.5 * (i + 1) / cfg.pretrain_steps))
    ctx.series("pretrain/loss", [h["loss"] for h in pre_hist])
    raw_acc = M.raw_exact_match(model, data.sft_facts + data.held_out_facts, tok)
    base_em, base_format = M.chat_exact_match(model, data.held_out_facts, tok, cfg.system_prompt, cfg.echo_question)
    ctx.scalar("pretrained raw-text accuracy", raw_acc)
    ctx.scalar("pretrained chat exact match", base_em)
    ctx.scalar("pretrained chat format rate", base_format)

    # --- stage 2: SFT with the kernel, held-out loss and exact match along the way --------------
    held_ids, held_labels = M.pad_batch(data.held_out_examples, data.pad_id)

    def evaluate(step: int) -> None:
        with torch.no_grad():
            ctx.log("eval/loss", float(sft_loss(model(held_ids), held_labels)), step)
        em, _ = M.chat_exact_match(model, data.held_out_facts, tok, cfg.system_prompt, cfg.echo_question)
        ctx.log("eval/exact_match", em, step)
        model.train()

    evaluate(0)

    def on_step(i: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], i + 1)
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.sft_steps:
            evaluate(i + 1)
        ctx.progress(0.6 + 0.4 * (i + 1) / cfg.sft_steps)

    sft_hist = M.supervised_finetune(model, data, cfg, g, loss_kernel=sft_loss, on_step=on_step)
    losses = [h["loss"] for h in sft_hist]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    ratio = last / first if first > 0 else float("nan")
    ctx.check("sft_loss_decreases", ratio <= 1 - cfg.min_loss_drop, f"{first:.3f} -> {last:.3f} (x{ratio:.3f})",
              f"last 10% / first 10% <= {1 - cfg.min_loss_drop:g}", "SFT is maximum likelihood on the replies: "
              "gradient descent on the masked cross-entropy must drive it down.", kind="outcome",
              hint="a loss that does not fall usually means the labels are misaligned with the logits "
                   "(no shift) or the learning rate never left warmup.")

    em, fmt = M.chat_exact_match(model, data.held_out_facts, tok, cfg.system_prompt, cfg.echo_question)
    seen_em, _ = M.chat_exact_match(model, data.sft_facts, tok, cfg.system_prompt, cfg.echo_question)
    with torch.no_grad():
        held_logits = model(held_ids)
    ppl = perplexity(held_logits[:, :-1], held_labels[:, 1:])
    ctx.scalar("held-out perplexity (reply tokens)", ppl)
    ctx.scalar("held-out exact match after SFT", em)
    ctx.scalar("SFT-prompt exact match after SFT", seen_em)
    ctx.scalar("format rate after SFT", fmt)
    # toy mode pretrains too briefly to learn the addition table, so it sets no exact-match bar and
    # records the number only; a check whose bar is 0 could never fail, so it is not recorded then
    if cfg.min_exact_match > 0:
        ctx.check("sft_exact_match_on_held_out_prompts", em >= cfg.min_exact_match,
                  f"{em:.3f} (format {fmt:.3f}; SFT prompts {seen_em:.3f})", f">= {cfg.min_exact_match:g}",
                  "Greedy decoding with the KV cache answers questions never seen in SFT: the facts come from "
                  "pretraining, SFT taught the chat format around them.", kind="outcome",
                  hint="check the shift and the mask first; a kernel that scores logits[:, t] against "
                       "labels[:, t] trains the model to copy its input.")
    ctx.check("pretrained_model_does_not_follow_chat_format",
              base_format <= cfg.max_base_format_rate and fmt >= cfg.min_format_rate and raw_acc >= cfg.min_raw_accuracy,
              f"format {base_format:.3f} before SFT, {fmt:.3f} after; raw-text accuracy {raw_acc:.3f}",
              f"format <= {cfg.max_base_format_rate:g} before and >= {cfg.min_format_rate:g} after SFT; "
              f"raw-text accuracy >= {cfg.min_raw_accuracy:g}",
              "The base model knows the facts as raw text but never saw <|im_end|> or the role headers: "
              "only SFT teaches it to answer inside the chat template and to stop.", kind="outcome",
              hint="if pretraining text already contains chat transcripts, the base model partly follows "
                   "the template (pretrain_chat_fraction).")
