"""The inference audit's configuration, the models it serves, and the KV-cache size formula.

    KV bytes = 2 (K and V) * layers * kv_heads * head_dim * seq * batch * bytes per element
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.transformer import ModelConfig, Transformer

__all__ = ["InferenceConfig", "FORMULAS", "kv_cache_bytes", "sharp_model"]

FORMULAS = [
    ("KV cache bytes", r"$M_{KV}=2\,L\,n_{kv}\,d_h\,S\,B\,b$"),
    ("Paged waste", r"$w=\lceil n/S_b\rceil S_b-n<S_b$"),
    ("Acceptance", r"$P(\mathrm{accept}\ x)=\min\left(1,\frac{p(x)}{q(x)}\right)$"),
    ("Residual", r"$p'(x)=\frac{\max(0,p(x)-q(x))}{\sum_{x'}\max(0,p(x')-q(x'))}$"),
    ("Tokens per call", r"$\frac{1-\alpha^{\gamma+1}}{1-\alpha}$"),
    ("Wall-clock speed-up", r"$\frac{1-\alpha^{\gamma+1}}{(1-\alpha)(\gamma c+1)},\ c=t_{draft}/t_{target}$"),
    ("int8 absmax", r"$s_j=\frac{\max_i|W_{ji}|}{127},\ Q=\mathrm{round}(W/s_j)$"),
]


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, seq: int, batch: int, bytes: int = 2) -> int:
    """2 * layers * kv_heads * head_dim * seq * batch * bytes: Llama-2-7B (32, 32, 128), 4096 tokens,
    batch 1, bf16 -> 2 GiB."""
    return 2 * layers * kv_heads * head_dim * seq * batch * bytes


@dataclass(frozen=True)
class InferenceConfig:
    """What the inference audit runs: the served model, the paged cache, the trace, speculation, int8."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # GQA: the paged kernel groups query heads by KV head
    d_ff: int = 88
    vocab_size: int = 32
    init_std: float = 0.2  # a random model with sharp logits (near-uniform ones would hide errors)
    block_size: int = 16  # tokens per KV block (vLLM's default)
    decode_steps: int = 40  # paged vs contiguous generation length (crosses 3 block boundaries)
    n_parallel: int = 4  # parallel samples forked from one prompt (copy-on-write)
    n_requests: int = 24  # requests in the trace
    arrival_rate: float = 0.5  # requests per model step (Poisson)
    prompt_min: int = 4
    prompt_max: int = 16
    max_new_tokens: int = 48  # output lengths uniform on 1..max_new_tokens
    kv_blocks: int = 12  # the KV budget of both schedulers, in blocks (tight: preemption happens)
    max_batch: int = 16  # sequences per step at most
    min_throughput_gain: float = 1.8  # outcome bar, continuous / static tokens per step: toy seeds 0-19 reach 2.00-2.80
    min_p99_latency_gain: float = 2.0  # outcome bar, static / continuous p99 latency: toy seeds reach 2.29-4.54
    spec_vocab: int = 4  # vocabulary of the chi-square models (V^m cells)
    spec_new: int = 2  # continuation length m of the chi-square test
    spec_samples: int = 1000  # continuations sampled for the chi-square test
    gamma: int = 3  # draft tokens per round
    max_gamma: int = 4  # the acceptance curve runs gamma = 1..max_gamma
    curve_samples: int = 32  # sequences per gamma on the acceptance curve
    curve_new: int = 16  # tokens each (and of the greedy comparison)
    unigram_rounds: int = 20000  # rounds of the tokens-per-call test
    significance: float = 1e-3  # chi-square test level (a correct sampler fails it this often per run)
    max_z: float = 4.0  # tokens per call vs the formula, in standard errors
    min_tokens_per_call: float = 2.0  # outcome bar at gamma = max_gamma: toy seeds reach 2.29-2.83
    ppl_samples: int = 64  # sequences sampled from the model for the perplexity change
    ppl_len: int = 32
    max_ppl_change: float = 0.005  # outcome bar, relative perplexity change of int8 weights: toy seeds <= 0.0014
    speedup: bool = False  # time speculative decoding (a trained deep target, a 1-layer draft): full mode only
    speed_target_layers: int = 6  # the timed target's depth (the draft has 1 layer)

    RANGES = {
        "d_model": ">= 1", "n_layers": ">= 2", "n_heads": ">= 1", "n_kv_heads": ">= 1", "d_ff": ">= 1",
        "vocab_size": ">= 2", "init_std": "> 0", "block_size": ">= 1", "decode_steps": ">= 1", "n_parallel": ">= 2",
        "n_requests": ">= 1", "arrival_rate": "> 0", "prompt_min": ">= 1", "prompt_max": ">= 1",
        "max_new_tokens": ">= 1", "kv_blocks": ">= 2", "max_batch": ">= 1", "min_throughput_gain": ">= 0",
        "min_p99_latency_gain": ">= 0", "spec_vocab": ">= 2", "spec_new": ">= 1", "spec_samples": ">= 1",
        "gamma": ">= 1", "max_gamma": ">= 1", "curve_samples": ">= 1", "curve_new": ">= 1",
        "unigram_rounds": ">= 2", "significance": "(0, 1)", "max_z": "> 0", "min_tokens_per_call": ">= 0",
        "ppl_samples": ">= 1", "ppl_len": ">= 2", "max_ppl_change": ">= 0", "speed_target_layers": ">= 1",
    }

    def __post_init__(self):
        if self.prompt_min > self.prompt_max:
            raise ValueError("prompt_min must not exceed prompt_max")
        if self.kv_blocks < -(-(self.prompt_max + self.max_new_tokens) // self.block_size) + 1:
            raise ValueError("kv_blocks must hold the longest request plus one block")

    @classmethod
    def toy(cls) -> InferenceConfig:
        return cls()

    @classmethod
    def full(cls) -> InferenceConfig:
        # bars: full seeds 0-4 reach throughput 2.58-3.14, p99 3.81-4.82, tokens per call (gamma 6) 2.54-2.98
        return cls(n_requests=64, decode_steps=80, spec_samples=4000, max_gamma=6, curve_samples=128, curve_new=24,
                   unigram_rounds=100000, ppl_samples=256, min_throughput_gain=2.3, min_p99_latency_gain=3.4,
                   min_tokens_per_call=2.3, speedup=True)

    def model_config(self, vocab_size: int | None = None, n_layers: int | None = None) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size or self.vocab_size, d_model=self.d_model,
                           n_layers=n_layers or self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, init_std=self.init_std)


def sharp_model(cfg: InferenceConfig, generator: torch.Generator, vocab_size: int | None = None,
                n_layers: int | None = None) -> Transformer:
    """A random tiny Llama initialised from generator (init std cfg.init_std: sharp, far from uniform logits)."""
    return Transformer(cfg.model_config(vocab_size, n_layers), generator=generator).eval()
