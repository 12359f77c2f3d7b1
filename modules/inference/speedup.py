"""Wall-clock speed-up of speculative decoding, when the draft is much cheaper than the target.

    tokens per target call  = (1 - alpha^(gamma+1)) / (1 - alpha)
    speed-up (predicted)    = (1 - alpha^(gamma+1)) / ((1 - alpha) * (gamma * c + 1))     (Leviathan et al. 2023)
    c = time of one draft call / time of one target call

A random target gives no speed-up: no cheap draft agrees with it. So both models are trained here, on
text from one random first-order Markov chain (training.markov_chain): a deep target and a 1-layer
draft that learn the same next-token distribution, as a real draft is trained on the target's data.
Then plain sampling from the target (one call per token, KV cache) and speculative sampling
(speculative_generate_cached) are timed on the same prompts, interleaved, median of ``repeats``.
On a CPU a call of a model this small costs about the same for 1 or gamma + 1 tokens (its time is
per-layer overhead, as a large model's decode step is bound by reading its weights), which is the
regime where speculation pays.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from modules.inference.speculative import expected_tokens_per_call, rewind_cache, speculative_generate_cached
from modules.training import markov_chain, sample_markov, supervised_warm_up
from modules.transformer import KVCache, ModelConfig, Transformer, generate

__all__ = ["SpeedConfig", "SpeedPair", "train_speed_pair", "predicted_speedup", "call_seconds", "SpeedRow",
           "time_speculation"]


@dataclass(frozen=True)
class SpeedConfig:
    """The two models and their training (a target many layers deep, a 1-layer draft), and the timing."""

    vocab_size: int = 32
    sharpness: float = 2.0  # the chain's logits are N(0, 1) * sharpness: lower -> higher entropy, lower alpha
    target_layers: int = 6
    target_d_model: int = 48
    draft_d_model: int = 32
    train_steps: int = 120
    batch: int = 16
    seq_len: int = 32
    lr: float = 1e-2
    n_prompts: int = 4  # sequences generated per timing (batch 1 each: latency, not throughput)
    prompt_len: int = 4
    n_new: int = 64
    gammas: tuple[int, ...] = (1, 2, 3, 4, 6)
    repeats: int = 3  # timings per setting; the median is kept


@dataclass
class SpeedPair:
    target: Transformer
    draft: Transformer
    chain: tuple[torch.Tensor, torch.Tensor]  # (P, pi) of the Markov chain both learned


def _model(cfg: SpeedConfig, n_layers: int, d_model: int, generator: torch.Generator) -> Transformer:
    return Transformer(ModelConfig(vocab_size=cfg.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4,
                                   n_kv_heads=2, d_ff=8 * d_model // 3, init_std=0.02), generator=generator)


def train_speed_pair(cfg: SpeedConfig, generator: torch.Generator) -> SpeedPair:
    """A target of cfg.target_layers layers and a 1-layer draft, each trained on the chain's text."""
    chain = markov_chain(cfg.vocab_size, 1, cfg.sharpness, generator)

    def next_batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = sample_markov(*chain, cfg.batch, cfg.seq_len + 1, g)
        return x[:, :-1], x[:, 1:]

    models = []
    for layers, d_model in ((cfg.target_layers, cfg.target_d_model), (1, cfg.draft_d_model)):
        model = _model(cfg, layers, d_model, generator)
        supervised_warm_up(model, next_batch, cfg.train_steps, cfg.lr, generator)
        models.append(model.eval())
    return SpeedPair(models[0], models[1], chain)


def predicted_speedup(alpha: float, gamma: int, c: float) -> float:
    """Expected wall-clock speed-up: tokens per target call over the cost of a round in target calls."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * c + 1)


@torch.inference_mode()
def call_seconds(model: Transformer, n_tokens: int, context: int, repeats: int = 200) -> float:
    """Median seconds of one cached forward over n_tokens new tokens after ``context`` cached ones."""
    cache = KVCache(model.cfg, 1, context + n_tokens)
    model(torch.zeros(1, context, dtype=torch.long), cache)
    x, times = torch.zeros(1, n_tokens, dtype=torch.long), []
    for _ in range(repeats):
        rewind_cache(cache, context)
        start = time.perf_counter()
        model(x, cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class SpeedRow:
    gamma: int
    alpha: float  # accepted drafts / drafts judged
    tokens_per_call: float
    seconds_plain: float  # median over repeats, all prompts
    seconds_speculative: float
    c: float  # draft call / target call, measured
    verify: float  # target call over gamma + 1 tokens / over 1 token, measured (the paper's formula takes 1)
    predicted: float  # predicted_speedup(alpha, gamma, c)

    @property
    def speedup(self) -> float:
        return self.seconds_plain / self.seconds_speculative


def time_speculation(pair: SpeedPair, cfg: SpeedConfig, generator: torch.Generator,
                     accept_fn=None) -> list[SpeedRow]:
    """Plain cached sampling from the target vs speculative sampling, on the same prompts, for each gamma
    (plain and speculative runs interleaved, so a burst of load hits both alike)."""
    kwargs = {} if accept_fn is None else {"accept_fn": accept_fn}
    prompts = sample_markov(*pair.chain, cfg.n_prompts, cfg.prompt_len, generator)
    context = cfg.prompt_len + cfg.n_new // 2
    target_one = call_seconds(pair.target, 1, context)  # the unit every ratio below is taken against
    c = call_seconds(pair.draft, 1, context) / target_one
    rows = []
    for gamma in cfg.gammas:
        plain, spec, accepted = [], [], []
        for r in range(cfg.repeats):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            start = time.perf_counter()
            for prompt in prompts:
                generate(pair.target, prompt[None], cfg.n_new, temperature=1.0,
                         generator=torch.Generator().manual_seed(seed))
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            runs = [speculative_generate_cached(pair.target, pair.draft, prompt, cfg.n_new, gamma, temperature=1.0,
                                                generator=torch.Generator().manual_seed(seed), **kwargs)
                    for prompt in prompts]
            spec.append(time.perf_counter() - start)
            accepted += [n for _, n in runs]
        n = torch.cat(accepted)
        alpha = n.sum().item() / torch.where(n < gamma, n + 1, n).sum().item()
        verify = call_seconds(pair.target, gamma + 1, context) / target_one
        rows.append(SpeedRow(gamma, alpha, (n + 1).double().mean().item(), statistics.median(plain),
                             statistics.median(spec), c, verify, predicted_speedup(alpha, gamma, c)))
    return rows
