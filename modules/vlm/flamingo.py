"""Flamingo's connector: a Perceiver resampler turns the patches into M latents, and gated
cross-attention layers, inserted before every frozen LM block, let the text read them.

    latents  L <- L + Attn(q = L, kv = [Z; L]);  L <- L + FFN(L)         (Perceiver resampler)
    y <- y + tanh(alpha_xattn) Attn(q = y, kv = L)                         (gated cross-attention)
    y <- y + tanh(alpha_dense) FFN(y),   then the frozen LM block           (both alpha start at 0)

At initialisation tanh(0) = 0: the model IS the frozen LM, logit for logit. The text keeps its own
length (no visual tokens in the sequence), so self-attention and the KV cache do not grow with the
image. Builds on: task.py, modules.transformer (layer_hook). Deviations: one resampler layer, one
image per sequence (no per-image masking of the cross-attention), no <image>/<EOC> tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from modules.transformer import ModelConfig, forward_flops
from modules.vlm.qformer import cross_attention_probs
from modules.vlm.task import Connector, Frozen, Scenes, VLMConfig, patchify


@dataclass(frozen=True)
class FlamingoConfig(VLMConfig):
    """The shared task (VLMConfig), the resampler's latents and Flamingo's outcome bars."""

    n_latents: int = 4  # M latents out of the Perceiver resampler (Flamingo: 64)
    min_accuracy: float = 0.43  # held-out accuracy; sweep toy seeds 0-19: 0.480 .. 0.748 (text-only about 0.2)
    min_gate: float = 0.01  # min |tanh(alpha)| after training (all start at 0); toy worst 0.018, full 0.019
    n_text_cost: int = 32  # text length of the cost table (context and attention FLOPs)

    RANGES = {"n_latents": ">= 1", "min_gate": "[0, 1]", "n_text_cost": ">= 1"}

    @classmethod
    def full(cls):
        # full seeds 0-9: 0.9995 .. 1.000 (with bare questions in the LM's pretraining one seed in ten stalled at 0.85)
        return cls(encoder_steps=150, lm_steps=300, steps=800, eval_size=2048, min_accuracy=0.9)


def gated_cross_attention(x: torch.Tensor, visual: torch.Tensor, alpha: torch.Tensor, w_q: torch.Tensor,
                          w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Flamingo's tanh-gated cross-attention, residual included.

        y = x + tanh(alpha) * concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h W_o^T
        Q = x W_q^T,  K = visual W_k^T,  V = visual W_v^T,  d_h = d / n_heads

    x: (B, T, d) the LM's hidden states (text only); visual: (B, M, d) the resampler's latents; alpha:
    a scalar tensor, initialised to 0 so that y = x exactly; w_q, w_k, w_v, w_o: (d, d), nn.Linear
    layout. No mask: every text position sees every latent. Returns (B, T, d).
    """
    B, T, d = x.shape
    M, h = visual.shape[1], d // n_heads
    q = (x @ w_q.T).view(B, T, n_heads, h).transpose(1, 2)  # (B, H, T, h)
    k = (visual @ w_k.T).view(B, M, n_heads, h).transpose(1, 2)  # (B, H, M, h)
    v = (visual @ w_v.T).view(B, M, n_heads, h).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(h), dim=-1)  # (B, H, T, M)
    return x + torch.tanh(alpha) * ((probs @ v).transpose(1, 2).reshape(B, T, d) @ w_o.T)


def _ffn(d: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class PerceiverResampler(nn.Module):
    """Patches (B, P, d_vision), any P -> M latents (B, M, d): the latents attend to [patches; latents]."""

    def __init__(self, n_latents: int, d_vision: int, d: int, n_heads: int):
        super().__init__()
        self.latents = nn.Parameter(0.02 * torch.randn(n_latents, d))
        self.inp = nn.Linear(d_vision, d)
        self.norm_media, self.norm_latents = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, bias=False, batch_first=True)
        self.ffn, self.n_heads = _ffn(d), n_heads

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        media = self.norm_media(self.inp(patch_features))  # (B, P, d)
        lat = self.norm_latents(self.latents.expand(media.shape[0], -1, -1))  # (B, M, d)
        kv = torch.cat([media, lat], dim=1)  # the latents' own keys and values join the patches'
        lat = self.latents + self.attn(lat, kv, kv, need_weights=False)[0]
        return lat + self.ffn(lat)

    def attention_map(self, patch_features: torch.Tensor) -> torch.Tensor:
        """(B, P): the latents' attention on the patches (not on themselves), averaged over heads and latents."""
        media = self.norm_media(self.inp(patch_features))
        lat = self.norm_latents(self.latents.expand(media.shape[0], -1, -1))
        w_q, w_k, _ = self.attn.in_proj_weight.chunk(3)
        probs = cross_attention_probs(lat, torch.cat([media, lat], dim=1), w_q, w_k, self.n_heads)
        return probs[..., : media.shape[1]].mean(dim=(1, 2))


class GatedXAttnDense(nn.Module):
    """One GATED XATTN-DENSE layer: gated cross-attention to the latents, then a gated FFN."""

    def __init__(self, d: int, n_heads: int, cross_attention: Callable):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.alpha_xattn, self.alpha_dense = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.ffn, self.n_heads, self.cross_attention = _ffn(d), n_heads, cross_attention

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        y = self.cross_attention(x, latents, self.alpha_xattn, self.q_proj.weight, self.k_proj.weight,
                                 self.v_proj.weight, self.o_proj.weight, self.n_heads)
        return y + torch.tanh(self.alpha_dense) * self.ffn(y)


class Flamingo(Connector):
    """Resampler + one gated layer before each frozen LM block; the text sequence has no visual tokens."""

    def __init__(self, n_latents: int, d_vision: int, d_model: int, n_heads: int, n_lm_layers: int,
                 cross_attention: Callable = gated_cross_attention):
        super().__init__()
        self.resampler = PerceiverResampler(n_latents, d_vision, d_model, n_heads)
        self.xattn = nn.ModuleList(GatedXAttnDense(d_model, n_heads, cross_attention) for _ in range(n_lm_layers))
        self.n_visual = 0

    def gates(self) -> torch.Tensor:
        """(2 L,) tanh of every gate: the share of each visual update that reaches the LM."""
        return torch.tanh(torch.stack([a for layer in self.xattn for a in (layer.alpha_xattn, layer.alpha_dense)]))

    def logits(self, frozen: Frozen, scenes: Scenes, ids: torch.Tensor) -> torch.Tensor:
        latents = self.resampler(frozen.encoder(patchify(scenes.images)))  # (B, M, d)
        return frozen.lm(ids, layer_hook=lambda i, x: self.xattn[i](x, latents))


# ---------------------------------------------------------------------------------------------------
# The day-13 claim in numbers: what concatenation and cross-attention cost as the image grows


def attention_flops(lm: ModelConfig, n_text: int, n_visual: int, n_latents: int, how: str) -> int:
    """Score and value matmul FLOPs (2 per multiply-add, full score matrices) of one forward pass.

    concat: L layers of self-attention over T = n_text + n_visual tokens: 4 L d T^2.
    xattn:  self-attention over the text only, 4 L d n_text^2, plus a cross-attention of the text to
            M latents per LM layer, 4 L d n_text M, plus the resampler's M latents over P + M keys,
            4 d M (P + M).
    """
    d, L = lm.d_model, lm.n_layers
    if how == "concat":
        return 4 * L * d * (n_text + n_visual) ** 2
    if how == "xattn":
        return 4 * L * d * n_text ** 2 + 4 * L * d * n_text * n_latents + 4 * d * n_latents * (n_visual + n_latents)
    raise ValueError(f"how must be 'concat' or 'xattn', got {how!r}")


def cost_table(lm: ModelConfig, n_text: int, n_latents: int, n_visuals: list[int]) -> list[list]:
    """Rows: n_visual, LM context (concat / xattn), attention FLOPs (concat / xattn), their ratio, and
    the whole LM forward's FLOPs with concatenation (forward_flops of the longer sequence)."""
    rows = []
    for n in n_visuals:
        concat, xattn = (attention_flops(lm, n_text, n, n_latents, how) for how in ("concat", "xattn"))
        rows.append([n, n_text + n, n_text, concat, xattn, round(concat / xattn, 2), forward_flops(lm, n_text + n)])
    return rows


def flamingo_trainable_parameters(n_latents: int, d_vision: int, d: int, n_lm_layers: int) -> int:
    """Closed form: resampler (latents M d, input d_v d + d, two LayerNorms 4 d, attention 4 d^2, FFN
    with its LayerNorm 4 d^2 + 5 d) plus per LM layer (four d^2 projections, two gates, FFN 4 d^2 + 5 d)."""
    ffn = 4 * d * d + 5 * d
    resampler = n_latents * d + d_vision * d + d + 4 * d + 4 * d * d + ffn
    return resampler + n_lm_layers * (4 * d * d + 2 + ffn)


FLAMINGO_FORMULAS = [
    ("Gated cross-attention", r"$y \leftarrow y + \tanh(\alpha)\,\mathrm{Attn}(q=y,\ kv=X_{latent})$, $\alpha_0=0$"),
    ("Perceiver resampler", r"$L \leftarrow L + \mathrm{Attn}(q=L,\ kv=[Z;L])$"),
    ("Attention cost", r"concat $4Ld(T+P)^2$ vs x-attn $4Ld(T^2+TM)+4dM(P+M)$"),
]
