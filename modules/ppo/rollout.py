"""Rollouts of a language-model policy: sample responses that stop at EOS, and score their tokens.

    response mask  1 on generated tokens up to and including the first EOS, 0 on the padding after it
    log-probs      log pi(y_t | x, y_<t) read from logits[:, P - 1 + t]  (logits at t predict token t + 1)
    values         V(x, y_<t) from a critic (the tiny Llama with a d -> 1 head) at the same positions

Prompts of one batch have the same length P, so generation needs no left padding; responses are
right-padded after EOS, and the causal mask keeps every real token from seeing that padding.
Builds on: transformer (tiny Llama, generate with the KV cache), policy_gradient (response_mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.policy_gradient import response_mask
from modules.ppo.core import entropy_from_logits
from modules.transformer import Transformer, generate

__all__ = ["sample_responses", "response_logits", "token_logprobs", "policy_logprobs", "critic_values"]


@torch.no_grad()
def sample_responses(policy: Transformer, prompts: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
                     generator: torch.Generator, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (B, P) -> (tokens (B, P + max_new_tokens), mask (B, max_new_tokens)).

    Tokens after a response's first EOS are set to ``pad_id``; a response that never emits EOS is cut
    at ``max_new_tokens`` (and treated as ended there). mask is float: 1 up to and including EOS."""
    P = prompts.shape[1]
    tokens = generate(policy, prompts, max_new_tokens, temperature=temperature, eos_id=eos_id, generator=generator)
    response = tokens[:, P:]
    if response.shape[1] < max_new_tokens:  # generate() stops once every row has emitted EOS
        fill = torch.full((response.shape[0], max_new_tokens - response.shape[1]), eos_id)
        response = torch.cat([response, fill], dim=1)
    mask = response_mask(response, eos_id).float()
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    return torch.cat([prompts, response], dim=1), mask


def response_logits(model: Transformer, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """(B, P + T) tokens -> (B, T, out) outputs at the positions that predict the T response tokens."""
    out = model(tokens[:, :-1])[:, n_prompt - 1:]
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``targets``: (B, T, V), (B, T) -> (B, T).
    Use the SAME temperature as the sampler, or ratio != 1 before the first update."""
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def policy_logprobs(policy: Transformer, tokens: torch.Tensor, n_prompt: int,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_t), entropy of pi(. | x, y_<t)), each (B, T), for the response tokens of ``tokens``.
    One forward pass; gradients flow when the caller has them enabled."""
    logits = response_logits(policy, tokens, n_prompt) / temperature
    return token_logprobs(logits, tokens[:, n_prompt:]), entropy_from_logits(logits)


def critic_values(critic: Transformer, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """V(x, y_<t) for every response token t: a critic whose head outputs one number -> (B, T)."""
    return response_logits(critic, tokens, n_prompt).squeeze(-1)
