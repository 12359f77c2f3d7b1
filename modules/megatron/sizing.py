"""Sizing arithmetic of decoder-only LLMs from an HF config.json: parameters, FLOPs, training memory,
KV cache and MFU. Plain Python integers, no torch: exact for any size (Llama-2-7B = 6,738,415,616).

    params       V d (2, or 1 if tied) + L (attention + MLP + norms [+ biases, q/k norms]) + d
    FLOPs/token  forward 2 N_mm + 4 L H hd T;  training 3x: 6 N_mm + 12 L H hd T  (PaLM, nanoGPT)
                 N_mm = the weights of every matmul: the embedding lookup excluded, lm_head included
                 (a tied lm_head still costs its V d multiply-adds); T = context length; the causal
                 mask is not halved (the full T x T scores are computed, as modules.transformer does)
    memory       per GPU model states: Psi / (tp pp) parameters, then ZeRO over dp with w, g, K bytes
    KV cache     2 (K and V) L n_kv hd bytes per token
    MFU          tokens/s x training FLOPs per token / (GPUs x peak FLOP/s)

``llmaudit calc`` prints these; modules.transformer's count_parameters / forward_flops / kv_cache_bytes
agree with them on its configs (tests/test_megatron.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# HF config.json fields of well-known checkpoints (copied field by field from their published configs)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                   "tie_word_embeddings": False},
    "llama-2-13b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 5120, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "intermediate_size": 13824,
                    "tie_word_embeddings": False},
    "llama-2-70b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
                    "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                   "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
                    "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                   "tie_word_embeddings": False},
    "qwen2-7b": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                 "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
             "n_positions": 1024},
    "minimind2-small": {"model_type": "minimind", "vocab_size": 6400, "hidden_size": 512, "num_hidden_layers": 8,
                        "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1408,
                        "tie_word_embeddings": True},
    "minimind-3": {"model_type": "qwen3", "vocab_size": 6400, "hidden_size": 768, "num_hidden_layers": 8,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 96, "intermediate_size": 2432,
                   "tie_word_embeddings": True},
}

# bytes per parameter: weights, gradients, optimizer states (K); "mixed" keeps an fp32 master copy
PRECISIONS = {("mixed", "adam"): (2, 2, 12), ("mixed", "sgd"): (2, 2, 8),
              ("fp32", "adam"): (4, 4, 8), ("fp32", "sgd"): (4, 4, 4)}


@dataclass(frozen=True)
class ModelSpec:
    """What the arithmetic needs from a config.json."""

    name: str
    arch: str  # "llama" (Llama, Mistral, Qwen2/3, minimind: RMSNorm, SwiGLU, RoPE) or "gpt2"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    tied: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3 / minimind-3: an RMSNorm gain of head_dim on q and on k
    n_positions: int = 0  # learned position embeddings (GPT-2)


def spec_from_config(config: dict[str, Any], name: str = "config") -> ModelSpec:
    """A ModelSpec from the fields of an HF config.json (llama-family or gpt2)."""
    try:
        if config.get("model_type") == "gpt2":
            d = int(config["n_embd"])
            return ModelSpec(name, "gpt2", int(config["vocab_size"]), d, int(config["n_layer"]), int(config["n_head"]),
                             int(config["n_head"]), d // int(config["n_head"]), int(config.get("n_inner") or 4 * d),
                             True, n_positions=int(config.get("n_positions", 1024)))
        d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kind = config.get("model_type", "llama")
        return ModelSpec(name, "llama", int(config["vocab_size"]), d, int(config["num_hidden_layers"]), heads,
                         int(config.get("num_key_value_heads") or heads), int(config.get("head_dim") or d // heads),
                         int(config["intermediate_size"]), bool(config.get("tie_word_embeddings", False)),
                         qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
                         qk_norm=kind == "qwen3")
    except KeyError as exc:
        raise ValueError(f"{name}: config.json lacks the field {exc.args[0]!r}") from None


def preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return spec_from_config(PRESETS[name], name)


def load_config(path: str | Path) -> ModelSpec:
    path = Path(path)
    return spec_from_config(json.loads(path.read_text()), path.name)


def params_breakdown(s: ModelSpec) -> dict[str, int]:
    """Parameter counts by part, and their total."""
    d, hd, H, K, L = s.d_model, s.head_dim, s.n_heads, s.n_kv_heads, s.n_layers
    if s.arch == "gpt2":  # LayerNorms with biases, fused qkv, GELU MLP, every Linear with a bias
        attention = d * 3 * d + 3 * d + d * d + d
        mlp = d * s.d_ff + s.d_ff + s.d_ff * d + d
        norms = 2 * 2 * d
        parts = {"embedding": s.vocab_size * d, "positions": s.n_positions * d, "lm_head": 0}
        final_norm = 2 * d
    else:
        attention = d * H * hd + 2 * d * K * hd + H * hd * d
        attention += (H + 2 * K) * hd if s.qkv_bias else 0
        attention += 2 * hd if s.qk_norm else 0
        mlp = 3 * d * s.d_ff
        norms = 2 * d
        parts = {"embedding": s.vocab_size * d, "positions": 0, "lm_head": 0 if s.tied else s.vocab_size * d}
        final_norm = d
    parts |= {"attention": L * attention, "mlp": L * mlp, "norms": L * norms + final_norm}
    parts["total"] = sum(parts.values())
    return parts


def count_params(s: ModelSpec) -> int:
    return params_breakdown(s)["total"]


def matmul_params(s: ModelSpec) -> int:
    """Weights that enter a matmul per token: every layer's matrices and the lm_head (V d, tied or not)."""
    d, hd, H, K = s.d_model, s.head_dim, s.n_heads, s.n_kv_heads
    if s.arch == "gpt2":
        per_layer = 4 * d * d + 2 * d * s.d_ff
    else:
        per_layer = d * H * hd + 2 * d * K * hd + H * hd * d + 3 * d * s.d_ff
    return s.n_layers * per_layer + s.vocab_size * d


def flops_per_token(s: ModelSpec, seq_len: int) -> dict[str, int]:
    """Forward and training (forward + backward = 3x) FLOPs per token at context length seq_len."""
    n_mm = matmul_params(s)
    attention = 4 * s.n_layers * s.n_heads * s.head_dim * seq_len  # q k^T and probs v, full T x T
    forward = 2 * n_mm + attention
    return {"matmul_params": n_mm, "forward": forward, "attention_forward": attention, "training": 3 * forward}


def zero_bytes(psi: float, n: int, stage: int, w: int = 2, g: int = 2, k: int = 12) -> float:
    """Model-state bytes per rank under ZeRO ``stage`` over n data-parallel ranks (w/g/k bytes per param)."""
    return {0: (w + g + k) * psi, 1: (w + g) * psi + k * psi / n, 2: w * psi + (g + k) * psi / n,
            3: (w + g + k) * psi / n}[stage]


def training_memory(s: ModelSpec, *, dp: int = 1, tp: int = 1, pp: int = 1, zero_stage: int = 0,
                    precision: str = "mixed", optimizer: str = "adam") -> dict[str, float]:
    """Model-state bytes per GPU (activations excluded): Psi / (tp pp) per GPU, ZeRO over dp."""
    if (precision, optimizer) not in PRECISIONS:
        raise ValueError(f"precision x optimizer must be one of {sorted(PRECISIONS)}")
    w, g, k = PRECISIONS[(precision, optimizer)]
    psi = count_params(s) / (tp * pp)
    return {"params_per_gpu": psi, "weights": w * psi if zero_stage < 3 else w * psi / dp,
            "bytes_per_gpu": zero_bytes(psi, dp, zero_stage, w, g, k), "gpus": dp * tp * pp}


def kv_cache(s: ModelSpec, *, seq_len: int = 4096, batch: int = 1, bytes_per_elem: int = 2) -> dict[str, int]:
    per_token = 2 * s.n_layers * s.n_kv_heads * s.head_dim * bytes_per_elem
    return {"bytes_per_token": per_token, "total_bytes": per_token * seq_len * batch}


def mfu(s: ModelSpec, *, tokens_per_s: float, peak_flops: float, n_gpus: int = 1, seq_len: int = 4096) -> dict:
    """Model FLOPs utilisation: the training FLOPs the model needs per second over the hardware's peak."""
    per_token = flops_per_token(s, seq_len)["training"]
    achieved = tokens_per_s * per_token
    return {"training_flops_per_token": per_token, "achieved_flops": achieved, "mfu": achieved / (n_gpus * peak_flops)}


def spec_dict(s: ModelSpec) -> dict[str, Any]:
    return asdict(s)


def spec_from_model_config(cfg: Any, name: str = "tiny llama") -> ModelSpec:
    """The ModelSpec of a modules.transformer.ModelConfig (read by attribute: no torch import here)."""
    return ModelSpec(name, "llama", cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                     cfg.d_model // cfg.n_heads, cfg.d_ff, cfg.tie_embeddings)
