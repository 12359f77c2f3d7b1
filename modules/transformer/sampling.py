"""Sampling: logits filters (top-k, top-p), repetition penalty, temperature, and generate() with a KV cache.

    temperature  p = softmax(z / T);  T -> 0 puts all mass on argmax z (greedy), T = 0 is argmax itself
    top-k        keep the k largest logits
    top-p        keep the smallest set of most likely tokens whose mass is >= p (the nucleus)
    penalty      for tokens already generated: z -> z / r if z > 0 else z * r   (CTRL, HF's convention)
Order per step (as HF): repetition penalty -> temperature -> top-k -> top-p -> sample.

Builds on: transformer.py (the model and its KV cache). Deviations from HF's logits warpers: top-k
keeps exactly k tokens (ties to the lowest index) where HF keeps every token tied with the k-th.
"""
from __future__ import annotations

from typing import Callable

import torch

from modules.transformer.transformer import KVCache, Transformer

__all__ = ["top_k_filter", "top_p_filter", "apply_repetition_penalty", "sample_next_token", "generate"]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row and set the others to -inf.

    logits: (..., V) float; 1 <= k <= V. Exactly k entries per row stay finite, unchanged. Ties at the
    k-th value go to the LOWEST indices: rank the row by a stable descending sort (equal logits keep
    their vocabulary order) and keep the first k. (HF's TopKLogitsWarper and nanoGPT threshold at the
    k-th value instead, which keeps every tied token: more than k. torch.topk makes no promise about
    which of several tied entries it returns.) Returns a new tensor of the same shape.
    """
    order = logits.sort(dim=-1, descending=True, stable=True).indices  # (..., V) ranks, ties by index
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.

    logits: (..., V) float; p in (0, 1]. With probs = softmax(logits) sorted in decreasing order, a
    token is kept iff the mass of the tokens ranked strictly before it is < p. So the token whose
    probability carries the cumulative mass across p is kept (dropping it would leave mass < p),
    and the most likely token is always kept. p = 1 keeps every token: a float cumulative sum
    reaches 1.0 early when the tail is below its rounding error (float32 [30, 0, 0, 0] sums to
    exactly 1 after the first token), so it is not consulted there. Removed entries become -inf;
    returns a new tensor of the same shape.
    """
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumulative sum
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)  # back to vocab order
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in ``generated`` (B, S) less likely: z / penalty if z > 0 else
    z * penalty (penalty > 1). logits (B, V); other tokens are unchanged."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, generated, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None, top_k_fn: Callable = top_k_filter,
                      top_p_fn: Callable = top_p_filter) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        logits = top_k_fn(logits, top_k)
    if top_p < 1.0:
        logits = top_p_fn(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, use_cache: bool = True,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             top_k_fn: Callable = top_k_filter, top_p_fn: Callable = top_p_filter,
             return_logits: bool = False):
    """Extend ``prompt`` (B, P) by ``max_new_tokens`` tokens -> (B, P + n).

    With ``use_cache`` the prompt is run once (prefill) and every later step feeds only the newest
    token, reading earlier keys/values from the KV cache: O(T) work per step instead of O(T^2).
    Without it every step re-runs the whole sequence (what nanoGPT's generate does). A row that has
    produced ``eos_id`` keeps emitting it; generation stops early once every row has. With
    ``return_logits`` also returns the raw next-token logits of each step (B, n, V).
    """
    # inference_mode skips autograd's bookkeeping (version counters, views) on every op: a decode step
    # of a tiny model is mostly that overhead. Its tensors cannot enter autograd later, so the results
    # are cloned out of it (rollouts are trained on).
    with torch.inference_mode():
        tokens, step_logits = _generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, repetition_penalty=repetition_penalty, use_cache=use_cache,
                                        eos_id=eos_id, generator=generator, top_k_fn=top_k_fn, top_p_fn=top_p_fn)
        logits = torch.stack(step_logits, dim=1) if return_logits else None
    return (tokens.clone(), logits.clone()) if return_logits else tokens.clone()  # outside: normal tensors


def _generate(model, prompt, max_new_tokens, *, temperature, top_k, top_p, repetition_penalty, use_cache, eos_id,
              generator, top_k_fn, top_p_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.eval()
    B, P = prompt.shape
    cache = KVCache(model.cfg, B, P + max_new_tokens, dtype=model.lm_head.weight.dtype) if use_cache else None
    tokens, step_logits = prompt, []
    logits = model(prompt, cache)[:, -1]  # prefill
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        step_logits.append(logits)
        z = apply_repetition_penalty(logits, tokens, repetition_penalty) if repetition_penalty != 1.0 else logits
        next_token = sample_next_token(z, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                       top_k_fn=top_k_fn, top_p_fn=top_p_fn)
        if eos_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            done |= next_token == eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = (model(next_token[:, None], cache) if use_cache else model(tokens))[:, -1]
    return tokens, step_logits
