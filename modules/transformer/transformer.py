"""Transformer: a tiny decoder-only Llama with RMSNorm, RoPE, SwiGLU, grouped-query attention and a KV cache.

    RMSNorm    y = x / sqrt(mean(x^2) + eps) * g                    (no mean subtraction, no bias)
    RoPE       (x_i, x_{i+d/2}) rotated by m * theta^(-2i/d)        (half-split layout, as HF Llama)
    Attention  softmax(q k^T / sqrt(d_head) + causal mask) v,  n_kv_heads <= n_heads (GQA; 1 = MQA)
    SwiGLU     FFN(x) = W_down (silu(W_gate x) * W_up x)
    Block      h = x + Attn(RMSNorm(x));  out = h + FFN(RMSNorm(h))  (pre-norm)

Builds on: nothing; it is the substrate of sft, dpo, ppo, lora and vlm. Sampling lives in sampling.py,
the toy task and closed loop in task.py.
Deviations from HF LlamaForCausalLM: none in the math. Parameter names are HF's (hf_state_dict() adds
the "model." prefix), so the same weights load into LlamaForCausalLM and give the same logits. No
dropout, no biases, no RoPE scaling; all sequences in a batch share positions (no padding mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FORMULAS", "ModelConfig",
    "rms_norm", "apply_rope",
    "RMSNorm", "causal_mask", "expand_kv_heads", "softmax_last_dim", "KVCache",
    "Attention", "SwiGLU", "Block", "Transformer",
    "count_parameters", "count_model_parameters", "forward_flops", "kv_cache_bytes",
    "hf_config_kwargs", "hf_state_dict",
]

FORMULAS = [
    ("RMSNorm", r"$y=\frac{x}{\sqrt{\frac{1}{d}\sum_i x_i^2+\epsilon}}\odot g$"),
    ("RoPE (half-split)", r"$x'_i = x_i\cos m\omega_i - x_{i+d/2}\sin m\omega_i,\ "
                          r"\omega_i=\theta^{-2i/d}$"),
    ("Relative position", r"$\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$"),
    ("Attention", r"$\mathrm{softmax}\left(\frac{QK^T}{\sqrt{d_h}}+M\right)V$"),
    ("SwiGLU", r"$\mathrm{FFN}(x)=W_{down}(\mathrm{silu}(W_{gate}x)\odot W_{up}x)$"),
    ("Parameters", r"$N=Vd(2-\mathrm{tied})+L(2dHd_h+2dKd_h+3dd_{ff}+2d)+d$"),
]


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the model (HF LlamaConfig names in the comments)."""

    vocab_size: int = 32  # vocab_size
    d_model: int = 64  # hidden_size
    n_layers: int = 2  # num_hidden_layers
    n_heads: int = 4  # num_attention_heads
    n_kv_heads: int = 2  # num_key_value_heads: = n_heads is MHA, 1 is MQA, in between GQA
    d_ff: int = 172  # intermediate_size (Llama: about 8/3 d, rounded)
    max_seq_len: int = 512  # max_position_embeddings (informational: the RoPE table grows as needed)
    rope_theta: float = 10000.0  # rope_theta
    norm_eps: float = 1e-5  # rms_norm_eps (released Llama-2/3 configs use 1e-5)
    tie_embeddings: bool = False  # tie_word_embeddings: lm_head shares the embedding matrix
    init_std: float = 0.02  # initializer_range: N(0, init_std) for every matrix

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# ---------------------------------------------------------------------------------------------------
# Kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * weight.

    x: (..., d); weight: (d,) the learned gain g (initialised to ones); eps is added INSIDE the
    square root. No mean subtraction and no bias (that would be LayerNorm). Half-precision input
    (float16, bfloat16) is normalised in float32 -- x^2 overflows float16 beyond |x| = 256 -- and cast
    back to its dtype before the gain, as HF Llama does. Returns x's shape and x's dtype, whatever the
    gain's dtype. With weight = 1 every output row has root-mean-square 1 (up to eps).
    """
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        h = x.float()
        return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)).to(dtype)
    y = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return y if y.dtype == dtype else y.to(dtype)  # a float64 gain would promote float32 x to float64


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding in the half-split layout of HF Llama / GPT-NeoX.

    x: (B, H, T, d) queries or keys, d even; positions: (T,) integer absolute positions of the T
    tokens (with a KV cache the new tokens start at the cache length, not at 0); theta: the base.
    For i in [0, d/2) the pair (x[i], x[i + d/2]) at position m is rotated by the angle m * w_i,
    w_i = theta^(-2i/d):
        x'[i]       = x[i] cos(m w_i) - x[i + d/2] sin(m w_i)
        x'[i + d/2] = x[i + d/2] cos(m w_i) + x[i] sin(m w_i)
    i.e. x' = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), cos/sin = cat(a, a).
    Angles in float32 (float64 for float64 x). Returns x's shape and dtype. Norms are preserved and
    <apply_rope(q, m), apply_rope(k, n)> depends on m - n only. The cos/sin values are looked up in a
    table computed once (as HF's rotary embedding caches them), so a decode step does no trigonometry.
    """
    d = x.shape[-1]
    cos, signed_sin = _rope_table_rows(positions, d, theta, x.dtype)  # (T, d) each
    # rotate_half(x) * sin = cat(x2, x1) * cat(-sin_a, sin_a): the sign lives in the table, and
    # roll(x, d/2) swaps the halves in one op (the same numbers as cat(-x2, x1) * sin, bit for bit)
    return x * cos + x.roll(d // 2, dims=-1) * signed_sin


_ROPE_TABLES: dict[tuple, torch.Tensor] = {}  # (d, theta, dtype, device) -> (n, 2, d): cos, signed sin
_ROPE_TABLE_MAX = 1 << 20  # positions beyond this are computed directly, not tabled


def _rope_table_rows(positions: torch.Tensor, d: int, theta: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, cat(-sin_a, sin_a)) of the positions, (T, d) each, read from a table built once per (d,
    theta, dtype, device) for positions 0 .. n-1 and grown (to twice the size, at least) when a larger
    position comes: a decode step costs one index_select instead of a pow, a product, a cos and a sin.
    The table holds exactly the values the direct formula gives (the same float products of integer
    positions). Negative or non-integer positions are computed directly."""
    key = (d, float(theta), dtype, positions.device)
    table = _ROPE_TABLES.get(key)
    if table is not None:
        try:
            rows = table.index_select(0, positions)  # (T, 2, d); raises for an index < 0 or >= n
            return rows[:, 0], rows[:, 1]
        except (IndexError, RuntimeError):  # beyond the table, or positions not integers
            pass
    if (positions.is_floating_point() or positions.numel() == 0 or int(positions.min()) < 0
            or int(positions.max()) >= _ROPE_TABLE_MAX):
        return _rope_rows_direct(positions, d, theta, dtype)
    n = min(max(int(positions.max()) + 1, 2 * (0 if table is None else table.shape[0]), 512), _ROPE_TABLE_MAX)
    table = _ROPE_TABLES[key] = torch.stack(_rope_rows_direct(torch.arange(n, device=positions.device), d, theta,
                                                              dtype), dim=1)  # (n, 2, d)
    rows = table.index_select(0, positions)
    return rows[:, 0], rows[:, 1]


def _rope_rows_direct(positions: torch.Tensor, d: int, theta: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=angle_dtype, device=positions.device) / d))  # (d/2,)
    angles = positions.to(angle_dtype)[:, None] * inv_freq  # (T, d/2): angle m * w_i
    emb = torch.cat((angles, angles), dim=-1)
    sin = emb.sin()
    return emb.cos().to(dtype), torch.cat((-sin[:, : d // 2], sin[:, d // 2:]), dim=-1).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Model pieces (parameter names follow HF Llama)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, norm_fn: Callable = rms_norm):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps, self.norm_fn = eps, norm_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def causal_mask(q_len: int, k_len: int) -> torch.Tensor:
    """(q_len, k_len) bool, True where attention is allowed. The queries are the LAST q_len of the
    k_len positions (a KV cache holds the earlier ones): query i sees key j iff j <= k_len - q_len + i."""
    return torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)


def expand_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, d) -> (B, n_kv * n_rep, S, d): each KV head is shared by n_rep consecutive query
    heads, so query head j reads KV head j // n_rep (repeat_interleave, not tile)."""
    if n_rep == 1:
        return x
    B, n_kv, S, d = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, S, d).reshape(B, n_kv * n_rep, S, d)


def softmax_last_dim(scores: torch.Tensor) -> torch.Tensor:
    """exp(s - max) / sum exp(s - max) over the last axis; -inf entries get probability 0.

    Written out because torch's CPU softmax is several times slower on short rows whose length is
    not a multiple of the vector width (T = 11, say), which is all a tiny model ever has."""
    e = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


class KVCache:
    """Keys (after RoPE) and values of every layer for the tokens processed so far, preallocated.

    Per token it holds 2 * n_layers * n_kv_heads * head_dim numbers: GQA shrinks it by n_heads / n_kv.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.length = 0  # tokens already stored (advanced by Transformer.forward after all layers)
        self._layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layers)]  # per-layer views, made once

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (B, n_kv, T, d) and return all of this layer's keys and values."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.k.shape[3]}")
        layer_k, layer_v = self._layers[layer]  # (B, n_kv, max_len, d)
        layer_k[:, :, self.length:end] = k
        layer_v[:, :, self.length:end] = v
        return layer_k[:, :, :end], layer_v[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope_fn: Callable = apply_rope):
        super().__init__()
        self.layer, self.rope_fn, self.rope_theta = layer, rope_fn, cfg.rope_theta
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, H * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, K * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, K * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, cfg.d_model, bias=False)
        self.keep_probs = False  # set True to keep the last attention probabilities in self.probs (for plots)
        self.probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd)
        qk = self.rope_fn(torch.cat((q, k), dim=1), positions, self.rope_theta)  # one call rotates both
        q, k = qk[:, :H], qk[:, H:]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, hd), S = cached + T
        k, v = expand_kv_heads(k, H // K), expand_kv_heads(v, H // K)  # (B, H, S, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, T, S)
        if T > 1:  # a single query is the newest token: it may see every key, so there is no mask
            scores = scores.masked_fill(~causal_mask(T, k.shape[2]), float("-inf"))
        probs = softmax_last_dim(scores)
        if self.keep_probs:
            self.probs = probs.detach()  # (B, H, T, S), like HF's output_attentions
        out = (probs @ v).transpose(1, 2).reshape(B, T, H * hd)  # heads side by side again
        return self.o_proj(out)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope_fn: Callable, norm_fn: Callable):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, norm_fn)
        self.self_attn = Attention(cfg, layer, rope_fn)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, norm_fn)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V). Pass a KVCache to decode incrementally:
    then ``tokens`` are only the new tokens, placed after the ``cache.length`` already stored."""

    def __init__(self, cfg: ModelConfig, *, rope_fn: Callable = apply_rope, norm_fn: Callable = rms_norm,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, rope_fn, norm_fn) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, norm_fn)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std, generator=generator)  # None: global RNG
        if cfg.tie_embeddings:  # one (V, d) matrix both reads tokens in and scores them out
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor | None, cache: KVCache | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                layer_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``inputs_embeds`` (B, T, d) replaces the embedding lookup (a VLM's visual tokens among the
        text's embeddings; pass tokens=None); ``layer_hook(i, x) -> x`` runs before block i (Flamingo
        inserts its gated cross-attention there). Both default to None: the plain token model."""
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1])
        for i, layer in enumerate(self.layers):
            if layer_hook is not None:
                x = layer_hook(i, x)
            x = layer(x, positions, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.lm_head(self.norm(x))  # (B, T, V)


# ---------------------------------------------------------------------------------------------------
# Exact counts: parameters, FLOPs, cache bytes


def count_parameters(cfg: ModelConfig) -> int:
    """Closed form: V d (2, or 1 if tied) + L (attention + SwiGLU + 2 norms) + final norm.

    attention = d H hd (q) + 2 d K hd (k, v) + H hd d (o); SwiGLU = 3 d d_ff; a norm = d gains.
    Llama-2-7B (V 32000, d 4096, L 32, H = K = 32, d_ff 11008, untied) gives 6,738,415,616.
    """
    d, hd, H, K = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    attention = d * H * hd + 2 * d * K * hd + H * hd * d
    per_layer = attention + 3 * d * cfg.d_ff + 2 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * per_layer + d


def count_model_parameters(model: nn.Module) -> int:
    """Parameters actually stored (a tied matrix counted once: nn.Module.parameters() deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: ModelConfig, seq_len: int, batch_size: int = 1, cached: int = 0) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass of ``seq_len`` new tokens that attend to
    ``cached`` earlier ones, exactly as this implementation computes them:

        2 T (N_matmul)  +  2 * 2 L H hd T S          with S = cached + T
    N_matmul = L (attention + SwiGLU matrices) + V d (lm_head; the embedding is a lookup, no FLOPs);
    the second term is q k^T and probs @ v over the full (T, S) score matrix (masked entries are
    computed too). Training (forward + backward) costs 3x this: PaLM's 6N + 12 L H hd T per token.
    """
    d, hd, H, K = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    matmul_params = cfg.n_layers * (d * H * hd + 2 * d * K * hd + H * hd * d + 3 * d * cfg.d_ff) \
        + cfg.vocab_size * d
    S = cached + seq_len
    return batch_size * (2 * seq_len * matmul_params + 4 * cfg.n_layers * H * hd * seq_len * S)


def kv_cache_bytes(cfg: ModelConfig, n_tokens: int, bytes_per_elem: int = 2) -> int:
    """2 (K and V) * L * n_kv_heads * head_dim * bytes per element, per token (bf16 by default).
    Llama-2-70B (L 80, K 8, hd 128): 327,680 bytes per token, 1.25 GiB for 4096 tokens."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_elem * n_tokens


# ---------------------------------------------------------------------------------------------------
# Interop with HF transformers (no import of it here: plain dicts)


def hf_config_kwargs(cfg: ModelConfig) -> dict:
    """Keyword arguments of transformers.LlamaConfig describing the same model."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std)


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state_dict under LlamaForCausalLM's names: everything but lm_head lives under "model."."""
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in model.state_dict().items()}
