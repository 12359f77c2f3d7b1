"""The closed loop: the tiny Llama learns to reverse a digit string, trained with modules.training.

    sequence  <bos> x_1 ... x_n <sep> x_n ... x_1        loss only on the n answer tokens
    metric    exact match of the greedy continuation (KV cache) on fresh strings

Reversal needs attention to a position that moves with each answer token (x_{n+1-i} for the i-th
answer), so it cannot be solved by a fixed offset: RoPE's relative positions and the causal mask
must both be right for the model to learn it in a few hundred steps.

Builds on: transformer.py and sampling.py (the model, greedy generation), modules.training (AdamW,
warmup-cosine, clipping). Deviations: none; run(cfg, generator) is the whole experiment.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from modules.training import IGNORE_INDEX, OptimConfig, configure_optimizer, train
from modules.transformer.sampling import generate
from modules.transformer.transformer import ModelConfig, Transformer, apply_rope, forward_flops, rms_norm

__all__ = ["TransformerConfig", "reverse_task_batch", "task_model_config", "train_reverse_task",
           "reverse_exact_match", "ReverseTaskResult", "run", "KV_CACHE_SPEEDUP_GOAL", "kv_cache_speedup",
           "steady_malloc"]


@dataclass(frozen=True)
class TransformerConfig:
    """What the transformer audit runs: model size, the reversal task, and the decoding checks."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: two query heads share each key/value head
    d_ff: int = 88  # about 8/3 d_model, as Llama sizes its SwiGLU
    rope_theta: float = 100.0  # head_dim 8: base 1e4 turns by 1, .1, .01, .001 rad/token; 100 by 1, .32, .1, .03
    n_symbols: int = 10  # digits 0..9; <bos> and <sep> are ids 10 and 11
    n_items: int = 3  # length of the string to reverse
    steps: int = 150  # optimizer steps of the closed loop
    batch_size: int = 32
    lr: float = 2e-2  # peak; warmup then cosine to lr / 10
    warmup_steps: int = 20
    eval_size: int = 256  # held-out strings for exact match
    min_exact_match: float = 0.9  # outcome bar: toy seeds 0-19 and full seeds 0-4 all reach 1.0; 0.9 leaves 10 %
    decode_steps: int = 80  # KV-cache vs recompute comparison length (>= 64)
    speed_new_tokens: int = 64  # tokens generated (batch 1) for the KV-cache speedup measurement
    speed_repeats: int = 1  # runs of each (cached, recomputed) for that measurement; the median is reported
    n_rows: int = 512  # random logit rows per sampling check

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "d_model": ">= 1", "n_layers": ">= 1", "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1",
        "rope_theta": "> 1", "n_symbols": ">= 2", "n_items": ">= 1", "steps": ">= 1", "batch_size": ">= 1",
        "lr": ">= 0", "warmup_steps": ">= 0", "eval_size": ">= 1", "min_exact_match": "[0, 1]",
        "decode_steps": ">= 1", "speed_new_tokens": ">= 1", "speed_repeats": ">= 1", "n_rows": ">= 1",
    }

    def __post_init__(self):
        if self.decode_steps < 1 or self.n_items < 1 or self.steps < 1 or self.speed_repeats < 1:
            raise ValueError("decode_steps, n_items, steps and speed_repeats must be positive")

    @classmethod
    def toy(cls) -> TransformerConfig:
        return cls()

    @classmethod
    def full(cls) -> TransformerConfig:
        return cls(n_items=6, steps=600, batch_size=64, lr=1e-2, warmup_steps=30, eval_size=1024,
                   n_rows=4096, speed_new_tokens=256, speed_repeats=3)


def task_model_config(cfg: TransformerConfig) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.n_symbols + 2, d_model=cfg.d_model, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta,
                       max_seq_len=2 * cfg.n_items + 2 + cfg.speed_new_tokens)


def reverse_task_batch(cfg: TransformerConfig, batch_size: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, 2n + 1): next-token pairs of <bos> x <sep> reverse(x), with
    targets = IGNORE_INDEX everywhere but the n answer tokens."""
    bos, sep, n = cfg.n_symbols, cfg.n_symbols + 1, cfg.n_items
    x = torch.randint(0, cfg.n_symbols, (batch_size, n), generator=generator)
    seq = torch.cat([torch.full((batch_size, 1), bos), x, torch.full((batch_size, 1), sep), x.flip(1)], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, :n] = IGNORE_INDEX  # positions that predict x and <sep>: not part of the task
    return inputs, targets


def train_reverse_task(cfg: TransformerConfig, generator: torch.Generator, *, rope_fn: Callable = apply_rope,
                       norm_fn: Callable = rms_norm,
                       on_step: Callable[[int, dict], None] | None = None,
                       init_generator: torch.Generator | None = None) -> tuple[Transformer, list[dict]]:
    """Build the model (init from ``init_generator``, the global RNG if None) and train it with
    AdamW + warmup-cosine + clipping on batches drawn from ``generator``."""
    model = Transformer(task_model_config(cfg), rope_fn=rope_fn, norm_fn=norm_fn, generator=init_generator)
    optim_cfg = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=cfg.warmup_steps, weight_decay=0.1)
    optimizer, scheduler = configure_optimizer(model, optim_cfg, cfg.steps)
    history = train(model, lambda g: reverse_task_batch(cfg, cfg.batch_size, g), optimizer, scheduler,
                    cfg.steps, generator=generator, grad_clip=optim_cfg.grad_clip, on_step=on_step)
    return model, history


@torch.no_grad()
def reverse_exact_match(model: Transformer, cfg: TransformerConfig, n_strings: int,
                        generator: torch.Generator) -> tuple[float, float]:
    """(exact-match rate, per-token accuracy) of greedy decoding with the KV cache on fresh strings."""
    inputs, _ = reverse_task_batch(cfg, n_strings, generator)
    prompt = inputs[:, : cfg.n_items + 2]  # <bos> x <sep>
    answer = inputs[:, 1: cfg.n_items + 1].flip(1)
    out = generate(model, prompt, cfg.n_items)[:, cfg.n_items + 2:]
    correct = out == answer
    return correct.all(dim=1).float().mean().item(), correct.float().mean().item()


@dataclass
class ReverseTaskResult:
    """What run() returns: the trained model, its training curve and its held-out scores."""

    model: Transformer
    history: list[dict]  # per optimizer step: loss (mean NLL of the answer tokens), lr, grad_norm
    exact_match: float  # fraction of fresh strings reversed entirely right (chance: 10^-n_items)
    token_accuracy: float  # fraction of answer tokens right


def run(cfg: TransformerConfig, generator: torch.Generator, *, rms_norm: Callable = rms_norm,
        apply_rope: Callable = apply_rope,
        on_step: Callable[[int, dict], None] | None = None) -> ReverseTaskResult:
    """The experiment: init the model and train it on reversal (both from ``generator``), then
    measure greedy exact match on ``cfg.eval_size`` fresh strings. The kernels are the model's."""
    model, history = train_reverse_task(cfg, generator, rope_fn=apply_rope, norm_fn=rms_norm, on_step=on_step,
                                        init_generator=generator)
    exact, token_acc = reverse_exact_match(model, cfg, cfg.eval_size, generator)
    return ReverseTaskResult(model, history, exact, token_acc)


def steady_malloc() -> str:
    """Make glibc's malloc serve large blocks from the heap in every process (a fixed mmap threshold of
    64 MiB, no trimming below 256 MiB) and say in a few words what was done. Call it before timing.

    By default glibc moves its mmap threshold as the program runs, so whether a block of a few
    hundred KB is mmap-ed, its pages faulted in anew at every allocation, depends on what the process
    freed before. Recomputation allocates T x T score tensors that grow every step. On one 2-core
    machine the same recomputation took 0.42 s in some processes and 0.55-0.62 s in others, with
    twice the page faults, so the KV-cache speed-up read anywhere from 3.8x to 5.5x. Pinned, it took
    0.42 s in every process. PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same
    reason; mallopt is enough here. Where malloc is not glibc's, nothing is changed."""
    import ctypes
    import ctypes.util

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        pinned = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) == 1
    except (OSError, AttributeError, TypeError):
        pinned = False
    return "malloc pinned" if pinned else "default allocator (not glibc)"


KV_CACHE_SPEEDUP_GOAL = (256, 5.0)  # (new tokens, speed-up): the cache must beat recomputation 5x at 256 tokens


def kv_cache_speedup(model: Transformer, prompt: torch.Tensor, n_new: int, repeats: int = 1) -> dict:
    """Greedy generation of ``n_new`` tokens with and without the KV cache, ``repeats`` times each
    (interleaved, so a burst of load hits both alike): the median wall-clock seconds of each, their
    ratio, the FLOP ratio of the two (exact, from forward_flops) and whether they gave the same tokens.
    The allocator is made steady first (steady_malloc; "allocator" says whether it could be)."""
    allocator = steady_malloc()
    seconds: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            tokens[use_cache] = generate(model, prompt, n_new, use_cache=use_cache)
            seconds[use_cache].append(time.perf_counter() - start)
    cached, full = statistics.median(seconds[True]), statistics.median(seconds[False])
    B, P = prompt.shape
    mc = model.cfg
    flops_cached = forward_flops(mc, P, B) + sum(forward_flops(mc, 1, B, cached=P + t) for t in range(n_new - 1))
    flops_full = sum(forward_flops(mc, P + t, B) for t in range(n_new))
    return {"seconds_cached": cached, "seconds_full": full, "speedup": full / cached,
            "flop_ratio": flops_full / flops_cached, "same_tokens": bool(torch.equal(tokens[True], tokens[False])),
            "allocator": allocator}
