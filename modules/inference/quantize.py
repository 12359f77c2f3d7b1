"""int8 weight-only quantisation, absmax per output channel (W8A16: weights stored in int8, computed in float).

    s_j = max_i |W_ji| / 127            one scale per output row j (per channel)
    Q_ji = round(W_ji / s_j)  in [-127, 127]
    W_ji ~ s_j Q_ji,   |W_ji - s_j Q_ji| <= s_j / 2
    bytes = out * in * 1 + out * 4       against out * in * 4 in float32

Builds on: modules.transformer (every nn.Linear of the model is quantised; the embedding is a lookup and
stays in float, as bitsandbytes' LLM.int8 leaves it). Deviations: no outlier decomposition (LLM.int8)
and no activation quantisation (SmoothQuant); dequantised weights are multiplied in float32.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn

from modules.transformer import Transformer

__all__ = ["quantize_int8_per_channel", "dequantize", "quantize_model", "perplexity"]


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation of a (out, in) float matrix, one scale per output row.

    Returns (q (out, in) int8, scale (out,) in weight's dtype): scale_j = max_i |W_ji| / 127 (1 for an
    all-zero row), q = round(W / scale_j) clamped to [-127, 127], so W ~ q * scale[:, None] with an
    error of at most scale_j / 2 per entry, and each row's largest |W_ji| maps to +-127 exactly.
    """
    absmax = weight.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale[:, None]


def quantize_model(model: Transformer, quantize_fn: Callable = quantize_int8_per_channel) -> tuple[Transformer, dict]:
    """A copy of model whose every nn.Linear weight is replaced by its quantise-dequantise round trip,
    and the bytes those weights take: {"int8": codes + scales as returned, "float32": before}."""
    quantized = copy.deepcopy(model)
    stored = float32 = 0
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, nn.Linear):
                q, scale = quantize_fn(module.weight)
                stored += q.numel() * q.element_size() + scale.numel() * scale.element_size()
                float32 += module.weight.numel() * 4
                module.weight.copy_(dequantize(q, scale).to(module.weight.dtype))
    return quantized, {"int8": stored, "float32": float32}


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor) -> float:
    """exp(mean next-token NLL) of tokens (B, T) under model."""
    logits = model(tokens[:, :-1]).double()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    return math.exp(nll.item())
