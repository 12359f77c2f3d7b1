"""BLIP-2's connector: N learned queries cross-attend to the patch features, and only their N
outputs, projected to the LM's width, reach the LM as soft tokens.

    Q = q W_Q,  K = Z W_K,  V = Z W_V,   out = softmax(Q K^T / sqrt(d_h)) V W_O     (per head)

The LM sees exactly N visual tokens whatever the number of patches P: an information bottleneck
(BLIP-2: 32 queries for ViT-g's 257 patches). Builds on: task.py. Deviations: one Q-Former block
(cross-attention + FFN, no query self-attention, no BERT initialisation) trained only with the LM
loss of stage 2; BLIP-2's stage 1 (ITC, ITM, ITG against a text encoder) is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from modules.vlm.task import Connector, Frozen, Scenes, VLMConfig, patchify, prefix_embeddings


@dataclass(frozen=True)
class QFormerConfig(VLMConfig):
    """The shared task (VLMConfig), the number of queries and the Q-Former's outcome bars."""

    n_queries: int = 4  # N learned queries = visual tokens the LM sees (the image has 9 patches)
    min_accuracy: float = 0.5  # held-out accuracy; sweep toy seeds 0-19: 0.559 .. 0.703 (text-only about 0.2)

    RANGES = {"n_queries": ">= 1"}

    @classmethod
    def full(cls):
        # full seeds 0-9: 0.9985 .. 1.000 (with bare questions in the LM's pretraining: 0.54 .. 1.0, bimodal)
        return cls(encoder_steps=150, lm_steps=300, steps=800, eval_size=2048, min_accuracy=0.9)


def qformer_cross_attention(queries: torch.Tensor, patch_features: torch.Tensor, w_q: torch.Tensor,
                            w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Multi-head cross-attention of N queries over P patch features (no mask, no positions).

        Q = queries W_q^T,  K = Z W_k^T,  V = Z W_v^T     split into n_heads heads of d_h = d / n_heads
        out = concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h,   then  out W_o^T

    queries: (B, N, d); patch_features Z: (B, P, d_vision); w_q: (d, d), w_k, w_v: (d, d_vision),
    w_o: (d, d) in nn.Linear's (out, in) layout. Returns (B, N, d): N outputs for any P, each a convex
    mix (per head) of the patches' values, so the result does not depend on the order of the patches.
    """
    B, N, d = queries.shape
    P, h = patch_features.shape[1], d // n_heads
    q = (queries @ w_q.T).view(B, N, n_heads, h).transpose(1, 2)  # (B, H, N, h)
    k = (patch_features @ w_k.T).view(B, P, n_heads, h).transpose(1, 2)  # (B, H, P, h)
    v = (patch_features @ w_v.T).view(B, P, n_heads, h).transpose(1, 2)  # (B, H, P, h)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(h), dim=-1)  # (B, H, N, P)
    return (probs @ v).transpose(1, 2).reshape(B, N, d) @ w_o.T


def cross_attention_probs(queries: torch.Tensor, keys_in: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                          n_heads: int) -> torch.Tensor:
    """(B, H, N, P) attention probabilities of the same cross-attention (for the attention maps)."""
    B, N, d = queries.shape
    P, h = keys_in.shape[1], d // n_heads
    q = (queries @ w_q.T).view(B, N, n_heads, h).transpose(1, 2)
    k = (keys_in @ w_k.T).view(B, P, n_heads, h).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(h), dim=-1)


class QFormer(Connector):
    """N learned queries -> cross-attention to the frozen patch features -> FFN -> linear to d_model."""

    def __init__(self, n_queries: int, d_vision: int, d_model: int, n_heads: int,
                 cross_attention: Callable = qformer_cross_attention):
        super().__init__()
        self.queries = nn.Parameter(0.02 * torch.randn(n_queries, d_model))
        self.q_proj, self.o_proj = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(d_vision, d_model, bias=False) for _ in range(2))
        self.norm_q, self.norm_ffn = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.to_lm = nn.Linear(d_model, d_model)  # BLIP-2's FC layer into the LLM's embedding width
        self.n_heads, self.n_visual, self.cross_attention = n_heads, n_queries, cross_attention

    def weights(self) -> dict[str, torch.Tensor]:
        return {"w_q": self.q_proj.weight, "w_k": self.k_proj.weight, "w_v": self.v_proj.weight,
                "w_o": self.o_proj.weight}

    def query_outputs(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, P, d_vision) for any P -> (B, N, d_model) soft tokens."""
        q = self.queries.expand(patch_features.shape[0], -1, -1)
        q = q + self.cross_attention(self.norm_q(q), patch_features, **self.weights(), n_heads=self.n_heads)
        return self.to_lm(q + self.ffn(self.norm_ffn(q)))

    def attention_map(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, P): the queries' attention over the patches, averaged over heads and queries."""
        q = self.norm_q(self.queries.expand(patch_features.shape[0], -1, -1))
        return cross_attention_probs(q, patch_features, self.q_proj.weight, self.k_proj.weight,
                                     self.n_heads).mean(dim=(1, 2))

    def logits(self, frozen: Frozen, scenes: Scenes, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.query_outputs(frozen.encoder(patchify(scenes.images)))
        return frozen.lm(None, inputs_embeds=prefix_embeddings(frozen.lm, ids, tokens))


def qformer_parameters(n_queries: int, d_vision: int, d_model: int) -> int:
    """Closed form: queries N d; W_Q, W_O d^2 each; W_K, W_V d d_v each; two LayerNorms 4 d; the FFN
    (d -> 2d -> d with biases) 4 d^2 + 3 d; the FC into the LM d^2 + d."""
    d = d_model
    return n_queries * d + 2 * d * d + 2 * d * d_vision + 4 * d + 4 * d * d + 3 * d + d * d + d


QFORMER_FORMULAS = [
    ("Cross-attention", r"$\mathrm{softmax}\left(\frac{(qW_Q)(ZW_K)^T}{\sqrt{d_h}}\right)ZW_V W_O$"),
    ("Output length", r"$N$ tokens for any number of patches $P$"),
]
