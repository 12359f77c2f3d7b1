"""SFT: pretraining, then supervised fine-tuning on ChatML conversations with a loss mask on the prompt.

    pretraining  L = -(1/N) sum_t log p(x_t | x_<t)                 over every token of raw text
    SFT          L = -(1 / sum_t m_t) sum_t m_t log p(x_t | x_<t)    m_t = 1 only on assistant tokens
    CE = NLL     with a one-hot target, -sum_k y_k log p_k = -log p_y
    labels       = input ids, with -100 (ignore_index) on system/user turns, role headers and padding

The task: single-digit arithmetic (user ``3+4=`` -> assistant ``3+4=7``, the reply restating the
question). Pretraining sees every fact as a line of raw text among lines of random words; SFT sees 80 %
of the facts, as ChatML conversations, with a quarter of each batch replayed raw text (InstructGPT's
"ptx" mix, against forgetting). Held-out prompts (facts never seen in SFT) test whether SFT taught the
*format* while the *knowledge* came from pretraining.

Builds on: tokenizer (byte-level BPE, ChatML specials), transformer (tiny Llama, KV cache, generate),
training (AdamW, warmup + cosine, clipping, the train() loop, perplexity).
Deviations: no packing of conversations, no attention mask (conversations are right-padded and the
causal mask keeps real tokens from seeing the padding after them); prompts of one batch have the
same length, so batched greedy decoding needs no left padding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modules.tokenizer import IM_END, IM_START, PAD, SPECIAL_TOKENS, Tokenizer, render_chatml, train_bpe
from modules.training import IGNORE_INDEX, OptimConfig, configure_optimizer, lm_nll, perplexity, train
from modules.transformer import ModelConfig, Transformer, generate

__all__ = [
    "FORMULAS", "SFTConfig",
    "sft_loss", "nll_by_hand", "supervised_count",
    "arithmetic_facts", "split_facts", "fact_line", "reply_text", "chat_messages",
    "build_tokenizer", "assistant_labels", "encode_chat", "pad_batch", "chat_prompts",
    "NOISE_WORDS", "noise_line", "pretrain_stream", "line_starts", "stream_batch", "SFTData", "build_data",
    "model_config", "pretrain", "supervised_finetune",
    "greedy_replies", "chat_exact_match", "raw_exact_match", "SFTResult", "run",
]

FORMULAS = [
    ("CE = NLL", r"$-\sum_k y_k\log p_k=-\log p_y\quad(y\ \mathrm{one\text{-}hot})$"),
    ("SFT loss", r"$L=-\frac{1}{\sum_t m_t}\sum_{t} m_t\log p_\theta(x_t|x_{<t})$"),
    ("Shift", r"$\mathrm{logits}[:, t]\ \mathrm{predicts}\ \mathrm{labels}[:, t+1]$"),
    ("Softmax-CE gradient", r"$\partial L/\partial z_{t,k}=m_{t+1}\,(p_{t,k}-y_{t,k})/\sum m$"),
    ("Perplexity", r"$\mathrm{PPL}=\exp(L)$"),
]


@dataclass(frozen=True)
class SFTConfig:
    """What the sft audit runs: the arithmetic task, the tokenizer, the model, the two training stages."""

    ops: str = "+-"  # operations of the task: a+b and a-b (a >= b)
    max_operand: int = 9  # operands a, b in 0..max_operand (single digits)
    system_prompt: str = "calculator"  # content of the system turn
    echo_question: bool = True  # the reply restates the question ("3+4=7") instead of the bare "7"
    held_out_fraction: float = 0.3  # share of the facts never shown in SFT (the held-out prompts)
    n_merges: int = 24  # BPE merges learned on the task's text (plus 256 bytes and 5 specials)
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128
    rope_theta: float = 100.0
    pretrain_steps: int = 200  # next-token steps on raw text ("3+4=7\n9-4=5\n...")
    pretrain_batch: int = 32
    pretrain_seq_len: int = 24  # tokens per pretraining window (four facts)
    pretrain_lr: float = 5e-3
    pretrain_chat_fraction: float = 0.0  # share of pretraining documents that are ChatML conversations
    pretrain_noise_fraction: float = 0.3  # share of documents that are lines of random words (web-like text)
    sft_steps: int = 100
    sft_batch: int = 32
    sft_lr: float = 3e-3
    replay_fraction: float = 0.25  # share of SFT rows that are raw pretraining text, every token supervised
    warmup_steps: int = 10
    mask_prompt: bool = True  # labels -100 on system/user turns (False: learn every token, as pretraining)
    eval_every: int = 20  # SFT steps between held-out evaluations
    grad_check_batch: int = 8  # conversations in the masked-gradient check
    # outcome bars from `llmaudit sweep sft` (toy seeds 0-19, full seeds 0-4), each below the worst seed:
    max_loss_ratio: float = 0.5  # SFT loss, mean of the last 10% of steps / the first 10%; worst toy 0.448
    max_base_format_rate: float = 0.05  # pretrained-only model emitting a well-formed reply + <|im_end|>; all 0
    min_format_rate: float = 0.9  # the same rate after SFT; all 1.0
    min_raw_accuracy: float = 0.88  # full only: pretrained model continuing "a+b=" in raw text; worst 0.981 (full seeds 0-9)
    min_exact_match: float = 0.8  # full only: held-out exact match after SFT (31 prompts); worst 0.903

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "max_operand": "[0, 9]", "held_out_fraction": "(0, 1)", "n_merges": ">= 0", "d_model": ">= 1",
        "n_layers": ">= 1", "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1", "rope_theta": "> 1",
        "pretrain_steps": ">= 0", "pretrain_batch": ">= 1", "pretrain_seq_len": ">= 2", "pretrain_lr": ">= 0",
        "pretrain_chat_fraction": "[0, 1]", "pretrain_noise_fraction": "[0, 1)", "sft_steps": ">= 1",
        "sft_batch": ">= 1", "sft_lr": ">= 0", "replay_fraction": "[0, 1)", "warmup_steps": ">= 0",
        "eval_every": ">= 1", "grad_check_batch": ">= 1", "max_loss_ratio": "> 0", "max_base_format_rate": "[0, 1]",
        "min_format_rate": "[0, 1]", "min_raw_accuracy": "[0, 1]", "min_exact_match": "[0, 1]",
    }

    def __post_init__(self):
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if not 0 <= self.max_operand <= 9:
            raise ValueError("operands are single digits: max_operand in 0..9")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError("held_out_fraction must be in (0, 1)")

    @classmethod
    def toy(cls) -> SFTConfig:
        # a smoke run of the pipeline, the invariants and the chat format: 60 pretraining steps do not
        # learn the addition table, so the two knowledge checks run in full mode only
        return cls(ops="+", max_operand=4, pretrain_steps=60, pretrain_lr=1e-2, pretrain_noise_fraction=0.0,
                   sft_steps=40, sft_lr=5e-3, eval_every=10)

    @classmethod
    def full(cls) -> SFTConfig:
        return cls(pretrain_steps=350, sft_steps=250, sft_lr=5e-3, held_out_fraction=0.2, eval_every=25)


# ---------------------------------------------------------------------------------------------------
# Kernel: the SFT loss (masked, shifted cross-entropy) and its hand-written twin


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Masked next-token cross-entropy, averaged over the supervised tokens. The kernel shifts.

    logits: (B, T, V) float, the model's output for input_ids (B, T); logits[:, t] is the
            distribution of the token at position t + 1.
    labels: (B, T) int, ALIGNED WITH input_ids (not shifted): labels[:, t] is the token at position
            t, or ignore_index where no loss is taken (system/user turns, role headers, padding).
    So logits[:, :-1] are scored against labels[:, 1:]; logits[:, -1] and labels[:, 0] take no part.
        L = -(1/N) sum over (b, t) with labels[b, t+1] != ignore_index of
                log softmax(logits[b, t])[labels[b, t+1]],      N = number of such (b, t)
    Returns a 0-dim tensor (float32 for float32 logits); NaN if no label is supervised. With a
    one-hot target this cross-entropy IS the negative log-likelihood of the supervised tokens.
    """
    V = logits.shape[-1]
    shift_logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(shift_logits.reshape(-1, V), shift_labels.reshape(-1), ignore_index=ignore_index)


def nll_by_hand(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The same number written out in float64: -(z_y - logsumexp(z)) at supervised positions, mean.

    logsumexp is computed as max + log(sum(exp(z - max))); the label is picked with a gather."""
    z = logits[:, :-1].double()  # (B, T-1, V)
    y = labels[:, 1:]
    mask = y != ignore_index
    top = z.amax(dim=-1, keepdim=True)
    log_z = top.squeeze(-1) + (z - top).exp().sum(dim=-1).log()  # (B, T-1) log partition function
    picked = z.gather(-1, torch.where(mask, y, 0).unsqueeze(-1)).squeeze(-1)  # z_y (any id where masked)
    nll = (log_z - picked) * mask
    return nll.sum() / mask.sum()


def supervised_count(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """N in the SFT loss: labels after the shift (labels[:, 1:]) that are not ignore_index."""
    return (labels[:, 1:] != ignore_index).sum()


# ---------------------------------------------------------------------------------------------------
# The task: single-digit arithmetic, as raw text (pretraining) and as ChatML (SFT)


def arithmetic_facts(ops: str, max_operand: int = 9) -> list[tuple[str, str]]:
    """Every (question, answer) of the task, e.g. ("3+4=", "7"); subtraction only with a >= b."""
    facts = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b:
                    continue
                value = {"+": a + b, "-": a - b, "*": a * b}[op]
                facts.append((f"{a}{op}{b}=", str(value)))
    return facts


def split_facts(facts: list, held_out_fraction: float, generator: torch.Generator) -> tuple[list, list]:
    """A random (sft, held_out) split of the facts."""
    order = torch.randperm(len(facts), generator=generator).tolist()
    n_held = round(held_out_fraction * len(facts))
    return [facts[i] for i in order[n_held:]], [facts[i] for i in order[:n_held]]


def fact_line(fact: tuple[str, str]) -> str:
    """A fact as pretraining text: '3+4=7\\n'."""
    return f"{fact[0]}{fact[1]}\n"


def reply_text(fact: tuple[str, str], echo_question: bool = True) -> str:
    """The assistant's reply: the whole equation '3+4=7' (echo_question) or the bare answer '7'."""
    return fact[0] + fact[1] if echo_question else fact[1]


def chat_messages(fact: tuple[str, str], system_prompt: str, echo_question: bool = True) -> list[tuple[str, str]]:
    """A fact as a conversation: system, user (the question), assistant (the reply)."""
    return [("system", system_prompt), ("user", fact[0]), ("assistant", reply_text(fact, echo_question))]


def build_tokenizer(facts: list, system_prompt: str, n_merges: int) -> Tokenizer:
    """Byte-level BPE trained on the task's raw text and on its conversations (special-token strings
    removed: they are added as specials, never learned as merges)."""
    raw = "".join(fact_line(f) for f in facts) + " ".join(NOISE_WORDS) + "\n"
    chats = "".join(render_chatml(chat_messages(f, system_prompt)) for f in facts)
    chats = re.sub("|".join(re.escape(s) for s in SPECIAL_TOKENS), "\n", chats)
    return train_bpe(raw + chats, 256 + n_merges + len(SPECIAL_TOKENS))


def assistant_labels(ids: list[int], tok: Tokenizer, mask_prompt: bool = True) -> list[int]:
    """Labels of one conversation: the assistant replies and their closing <|im_end|> keep their ids,
    everything else (system and user turns, every role header) is IGNORE_INDEX.

    A reply starts after the header tokens '<|im_start|>assistant\\n' and ends at the next <|im_end|>
    (included: the model must learn to stop). mask_prompt=False returns the ids unchanged."""
    if not mask_prompt:
        return list(ids)
    header = tok.encode(f"{IM_START}assistant\n", allowed_special="all")
    im_end = tok.token_id(IM_END)
    labels, i, n, h = [IGNORE_INDEX] * len(ids), 0, len(ids), len(header)
    while i < n:
        if ids[i:i + h] == header:
            j = i + h
            while j < n and ids[j] != im_end:
                labels[j] = ids[j]
                j += 1
            if j < n:
                labels[j] = im_end
            i = j + 1
        else:
            i += 1
    return labels


def encode_chat(messages: list[tuple[str, str]], tok: Tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one ChatML conversation. The text after the last <|im_end|> (its
    newline) is dropped: generation stops at <|im_end|>."""
    ids = tok.encode(render_chatml(messages), allowed_special="all")
    ids = ids[: len(ids) - ids[::-1].index(tok.token_id(IM_END))]
    return ids, assistant_labels(ids, tok, mask_prompt)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input ids with pad_id, labels with IGNORE_INDEX -> two (B, T) tensors."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def chat_prompts(facts: list, tok: Tokenizer, system_prompt: str) -> torch.Tensor:
    """(B, P) prompts ending with the generation header '<|im_start|>assistant\\n'. Every question has
    the same number of tokens (digit, operator, digit, '='), so the prompts need no padding."""
    prompts = [tok.encode(render_chatml(chat_messages(f, system_prompt)[:2]) + f"{IM_START}assistant\n",
                          allowed_special="all") for f in facts]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("chat prompts of different lengths: batched decoding would need left padding")
    return torch.tensor(prompts)


# ---------------------------------------------------------------------------------------------------
# Data for both stages


NOISE_WORDS = ("the", "answer", "is", "system", "user", "assistant", "calculator", "sum", "of", "and", "minus",
               "plus", "equals", "a", "number", "we", "add", "two", "digits", "question")


def noise_line(generator: torch.Generator) -> str:
    """1 to 6 random words and a newline: text around the facts, as a web page has."""
    n = int(torch.randint(1, 7, (1,), generator=generator))
    return " ".join(NOISE_WORDS[int(i)] for i in torch.randint(len(NOISE_WORDS), (n,), generator=generator)) + "\n"


def pretrain_stream(facts: list, tok: Tokenizer, n_documents: int, chat_fraction: float, noise_fraction: float,
                    system_prompt: str, echo_question: bool, generator: torch.Generator) -> torch.Tensor:
    """One long token stream of n_documents random documents: raw fact lines; with probability
    noise_fraction a line of random words; with probability chat_fraction a whole ChatML conversation
    (0 by default: the base model never sees a special token)."""
    lines = [tok.encode(fact_line(f)) for f in facts]
    noise = [tok.encode(noise_line(generator)) for _ in range(256)]
    chats = [tok.encode(render_chatml(chat_messages(f, system_prompt, echo_question)), allowed_special="all")
             for f in facts]
    pick = torch.randint(len(facts), (n_documents,), generator=generator).tolist()
    pick_noise = torch.randint(len(noise), (n_documents,), generator=generator).tolist()
    kind = torch.rand(n_documents, generator=generator)  # < chat: chat; < chat + noise: noise; else fact
    docs = [chats[i] if u < chat_fraction else noise[j] if u < chat_fraction + noise_fraction else lines[i]
            for i, j, u in zip(pick, pick_noise, kind.tolist())]
    return torch.tensor([t for d in docs for t in d])


def line_starts(stream: torch.Tensor, tok: Tokenizer) -> torch.Tensor:
    """Sorted positions in ``stream`` where a line begins: 0 and every position after a token whose
    text ends with a newline."""
    ends_line = torch.tensor([i not in tok.special_ids and tok.decode([i]).endswith("\n") for i in range(tok.vocab_size)])
    after = ends_line[stream[:-1]].nonzero().squeeze(1) + 1  # a newline at the very end starts no line
    return torch.cat([torch.zeros(1, dtype=torch.long), after])


def stream_batch(stream: torch.Tensor, starts: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, seq_len): windows of the stream that begin where a line begins (a random
    one of the sorted ``starts``), and the same windows moved by one.

    Starting at a line, as packed pretraining rows start after an <eos>, means no row opens in the
    middle of a fact. With random offsets 12 % of the answers in a 24-token row come without their
    question (a target nothing can predict), and every row starts at a different phase of the line:
    measured on this task, the base model then needs about 600 steps to learn the table where
    rows that start at a line need 350."""
    n_fit = int(torch.searchsorted(starts, len(stream) - seq_len))  # these leave room for seq_len + 1 tokens
    pick = starts[torch.randint(n_fit, (batch_size, 1), generator=generator)]
    window = stream[pick + torch.arange(seq_len + 1)]  # (B, seq_len + 1)
    return window[:, :-1], window[:, 1:]


@dataclass
class SFTData:
    """Everything built from one config and seed: tokenizer, fact split, pretraining stream, SFT set."""

    tok: Tokenizer
    sft_facts: list
    held_out_facts: list
    stream: torch.Tensor  # pretraining tokens
    starts: torch.Tensor  # where each line of the pretraining stream begins (line_starts)
    sft_examples: list  # (ids, labels) per SFT conversation
    held_out_examples: list  # (ids, labels) per held-out conversation (for eval/loss)

    @property
    def pad_id(self) -> int:
        return self.tok.token_id(PAD)

    def sft_batch(self, batch_size: int, generator: torch.Generator,
                  replay_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), (B, T): conversations, plus round(replay_fraction * B) rows of raw
        pretraining text whose labels are their ids (replay: keeps what pretraining learned)."""
        n_replay = round(replay_fraction * batch_size)
        pick = torch.randint(len(self.sft_examples), (batch_size - n_replay,), generator=generator).tolist()
        input_ids, labels = pad_batch([self.sft_examples[i] for i in pick], self.pad_id)
        if n_replay:
            raw, _ = stream_batch(self.stream, self.starts, n_replay, input_ids.shape[1], generator)
            input_ids, labels = torch.cat([input_ids, raw]), torch.cat([labels, raw])
        return input_ids, labels


def build_data(cfg: SFTConfig, generator: torch.Generator) -> SFTData:
    facts = arithmetic_facts(cfg.ops, cfg.max_operand)
    tok = build_tokenizer(facts, cfg.system_prompt, cfg.n_merges)
    sft_facts, held_out = split_facts(facts, cfg.held_out_fraction, generator)
    n_docs = cfg.pretrain_steps * cfg.pretrain_batch * cfg.pretrain_seq_len // 4 + 64  # ample tokens
    stream = pretrain_stream(facts, tok, n_docs, cfg.pretrain_chat_fraction, cfg.pretrain_noise_fraction,
                             cfg.system_prompt, cfg.echo_question, generator)
    encode = lambda f: encode_chat(chat_messages(f, cfg.system_prompt, cfg.echo_question), tok, cfg.mask_prompt)  # noqa: E731
    return SFTData(tok, sft_facts, held_out, stream, line_starts(stream, tok), [encode(f) for f in sft_facts], [encode(f) for f in held_out])


# ---------------------------------------------------------------------------------------------------
# The two training stages (both run modules.training.train)


def model_config(cfg: SFTConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta, max_seq_len=64)


def pretrain(model: Transformer, data: SFTData, cfg: SFTConfig, generator: torch.Generator, *,
             on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Next-token prediction on every token of the raw stream (no mask)."""
    optim_cfg = OptimConfig(lr=cfg.pretrain_lr, min_lr=cfg.pretrain_lr / 10, warmup_steps=cfg.warmup_steps)
    optimizer, scheduler = configure_optimizer(model, optim_cfg, cfg.pretrain_steps)
    return train(model, lambda g: stream_batch(data.stream, data.starts, cfg.pretrain_batch, cfg.pretrain_seq_len, g),
                 optimizer, scheduler, cfg.pretrain_steps, generator=generator, grad_clip=optim_cfg.grad_clip,
                 loss_fn=lm_nll, on_step=on_step)


def supervised_finetune(model: Transformer, data: SFTData, cfg: SFTConfig, generator: torch.Generator, *,
                        loss_kernel: Callable = sft_loss,
                        on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """SFT: batches of (input_ids, labels) aligned, scored with ``loss_kernel`` (which shifts).

    train() wants (summed loss, token count); the count is that of labels[:, 1:], which equals the
    count over all labels because labels[:, 0] (the first <|im_start|>) is always ignored."""
    def loss_fn(m: Transformer, input_ids: torch.Tensor, labels: torch.Tensor):
        n = supervised_count(labels)
        return loss_kernel(m(input_ids), labels) * n, n

    optim_cfg = OptimConfig(lr=cfg.sft_lr, min_lr=cfg.sft_lr / 10, warmup_steps=cfg.warmup_steps)
    optimizer, scheduler = configure_optimizer(model, optim_cfg, cfg.sft_steps)
    return train(model, lambda g: data.sft_batch(cfg.sft_batch, g, cfg.replay_fraction), optimizer, scheduler, cfg.sft_steps,
                 generator=generator, grad_clip=optim_cfg.grad_clip, loss_fn=loss_fn, on_step=on_step)


# ---------------------------------------------------------------------------------------------------
# Evaluation: greedy decoding with the KV cache, batched


@torch.no_grad()
def greedy_replies(model: Transformer, prompts: torch.Tensor, tok: Tokenizer, max_new_tokens: int = 4) -> list[tuple[str, bool]]:
    """(reply text, closed?) per prompt: greedy tokens up to the first <|im_end|> (closed = it came)."""
    im_end = tok.token_id(IM_END)
    out = generate(model, prompts, max_new_tokens, eos_id=im_end)[:, prompts.shape[1]:].tolist()
    replies = []
    for row in out:
        closed = im_end in row
        body = row[: row.index(im_end)] if closed else row
        replies.append((tok.decode(body), closed))
    return replies


def chat_exact_match(model: Transformer, facts: list, tok: Tokenizer, system_prompt: str,
                     echo_question: bool = True) -> tuple[float, float]:
    """(exact match, format rate) on ChatML prompts. Exact match: the reply is reply_text(fact),
    closed by <|im_end|>. Format rate: the reply has the reply's shape ('3+4=7' or '7': any digits)
    and is closed by <|im_end|>, right or wrong."""
    replies = greedy_replies(model, chat_prompts(facts, tok, system_prompt), tok, max_new_tokens=8)
    shape = re.compile(r"\d[+\-*]\d=\d+" if echo_question else r"\d+")
    exact = sum(closed and text == reply_text(f, echo_question) for (text, closed), f in zip(replies, facts))
    well_formed = sum(closed and shape.fullmatch(text) is not None for text, closed in replies)
    return exact / len(facts), well_formed / len(facts)


@torch.no_grad()
def raw_exact_match(model: Transformer, facts: list, tok: Tokenizer) -> float:
    """Accuracy of the raw-text continuation: the tokens after '\\n3+4=' decode to '7\\n'."""
    prompts = torch.tensor([tok.encode("\n" + f[0]) for f in facts])
    n_new = max(len(tok.encode(fact_line(("", f[1])))) for f in facts)
    out = generate(model, prompts, n_new)[:, prompts.shape[1]:].tolist()
    hits = sum(tok.decode(row).split("\n")[0] == f[1] for row, f in zip(out, facts))
    return hits / len(facts)


# ---------------------------------------------------------------------------------------------------
# The experiment: pretrain, look at the base model, fine-tune, look again


@dataclass
class SFTResult:
    """What ``run`` measured. Exact match and format rate are on the held-out prompts unless named."""

    data: SFTData
    model: Transformer  # after both stages
    pretrain_history: list[dict]  # train() records of pretraining
    sft_history: list[dict]  # train() records of SFT (loss = the kernel's mean over supervised tokens)
    raw_accuracy: float  # pretrained model: '\n3+4=' continued with '7\n', over every fact
    base_exact_match: float  # pretrained model on ChatML prompts
    base_format_rate: float
    exact_match: float  # after SFT
    format_rate: float
    seen_exact_match: float  # after SFT, on the SFT prompts themselves
    evals: list[tuple[int, float, float]]  # (SFT step, held-out loss, held-out exact match)
    heldout_perplexity: float  # exp(held-out loss) on the reply tokens after SFT

    @property
    def loss_ratio(self) -> float:
        """Mean SFT loss over the last 10 % of steps / over the first 10 % (NaN if the first is 0)."""
        losses = [h["loss"] for h in self.sft_history]
        k = max(1, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        return last / first if first > 0 else float("nan")


def run(cfg: SFTConfig, generator: torch.Generator, *, sft_loss: Callable = sft_loss, data: SFTData | None = None,
        on_progress: Callable[[float], None] | None = None) -> SFTResult:
    """The closed loop: pretraining on raw text, the base model measured on raw text and in ChatML,
    SFT with the ``sft_loss`` kernel (held-out loss and exact match every ``eval_every`` steps), and
    the fine-tuned model measured again. Weights come from the global RNG, data from ``generator``."""
    data = data if data is not None else build_data(cfg, generator)
    tok, progress = data.tok, on_progress or (lambda fraction: None)
    model = Transformer(model_config(cfg, tok.vocab_size))
    pre = pretrain(model, data, cfg, generator, on_step=lambda i, r: progress(0.6 * (i + 1) / cfg.pretrain_steps))
    raw = raw_exact_match(model, data.sft_facts + data.held_out_facts, tok)
    chat = lambda facts: chat_exact_match(model, facts, tok, cfg.system_prompt, cfg.echo_question)  # noqa: E731
    base_em, base_format = chat(data.held_out_facts)
    held_ids, held_labels = pad_batch(data.held_out_examples, data.pad_id)
    evals: list[tuple[int, float, float]] = []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            loss = float(sft_loss(model(held_ids), held_labels))
        evals.append((step, loss, chat(data.held_out_facts)[0]))
        model.train()

    def on_step(i: int, record: dict) -> None:
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.sft_steps:
            evaluate(i + 1)
        progress(0.6 + 0.4 * (i + 1) / cfg.sft_steps)

    evaluate(0)
    history = supervised_finetune(model, data, cfg, generator, loss_kernel=sft_loss, on_step=on_step)
    em, fmt = chat(data.held_out_facts)
    with torch.no_grad():
        ppl = perplexity(model(held_ids)[:, :-1], held_labels[:, 1:])
    return SFTResult(data, model, pre, history, raw, base_em, base_format, em, fmt, chat(data.sft_facts)[0],
                     evals, ppl)
