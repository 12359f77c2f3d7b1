"""Continuous (iteration-level) batching against static batching, on one request trace and KV budget.

    static       take the requests that have arrived (as many as fit when each reserves its prompt +
                 max_new_tokens, as a contiguous cache must), run until the LONGEST is done, return
                 the batch together, then form the next batch
    continuous   every step: admit waiting requests while blocks are free (one block kept in reserve),
                 prefill them, decode one token for every running request, and retire finished ones;
                 when a running request needs a block and none is free, preempt the request admitted
                 last (free its blocks, requeue it first; it is recomputed from prompt + its tokens)

Time is counted in model steps: a step is one batched forward (prefill of the admitted requests or a
decode of the running ones), which costs about the same for any batch size while decoding is
memory-bound. Throughput = generated tokens / steps; TTFT = step of the first token - arrival;
latency = step the request is returned - arrival. The model really runs (greedy decoding through the
paged cache), and wall-clock seconds are recorded beside the step counts.

Builds on: paged.py. Deviations from vLLM: no chunked prefill, no swapping, greedy decoding, output
lengths fixed by the trace (no EOS).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from modules.inference.paged import PagedKVCache, blocks_needed, paged_attention, paged_decode_step, paged_prefill
from modules.transformer import Transformer

__all__ = ["Request", "request_trace", "ServeResult", "serve_continuous", "serve_static", "percentile"]


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float  # in model steps
    prompt: torch.Tensor  # (P,) token ids
    output_len: int  # tokens to generate


def request_trace(n: int, rate: float, prompt_len: tuple[int, int], max_new_tokens: int, vocab_size: int,
                  generator: torch.Generator) -> list[Request]:
    """n requests: Poisson arrivals (exponential gaps of mean 1/rate steps), prompt lengths uniform on
    prompt_len (inclusive), output lengths uniform on 1..max_new_tokens, prompt tokens uniform."""
    gaps = -torch.log1p(-torch.rand(n, generator=generator)) / rate
    arrivals = gaps.cumsum(0).tolist()
    lengths = torch.randint(prompt_len[0], prompt_len[1] + 1, (n,), generator=generator).tolist()
    outputs = torch.randint(1, max_new_tokens + 1, (n,), generator=generator).tolist()
    return [Request(i, arrivals[i], torch.randint(0, vocab_size, (lengths[i],), generator=generator), outputs[i])
            for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default)."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()


@dataclass
class ServeResult:
    """What a serving policy did with a trace."""

    policy: str
    tokens: dict[int, list[int]]  # generated tokens per request id
    first_token: dict[int, int] = field(default_factory=dict)  # step at which each request's first token exists
    finish: dict[int, int] = field(default_factory=dict)  # step at which each request is returned
    steps: int = 0  # makespan in model steps
    wall_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # sequences computed per step
    blocks_used: list[int] = field(default_factory=list)  # physical blocks allocated after each step
    blocks_held: list[int] = field(default_factory=list)  # blocks the policy keeps from others (static: its reservation)
    tokens_stored: list[int] = field(default_factory=list)  # K/V slots holding a real token after each step
    preemptions: int = 0
    leaked_blocks: int = 0  # blocks still held after every request was returned (0 when freeing works)
    n_blocks: int = 0

    def summary(self, trace: list[Request]) -> dict[str, float]:
        arrival = {r.id: r.arrival for r in trace}
        ttft = [self.first_token[i] - arrival[i] for i in arrival]
        latency = [self.finish[i] - arrival[i] for i in arrival]
        generated = sum(len(t) for t in self.tokens.values())
        return {"throughput": generated / self.steps, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99),
                "tokens_per_second": generated / max(self.wall_seconds, 1e-9), "steps": self.steps}


def _record(result: ServeResult, cache: PagedKVCache, batch: int, held: int | None = None) -> None:
    result.batch_sizes.append(batch)
    result.blocks_used.append(cache.n_blocks - cache.n_free)
    result.blocks_held.append(result.blocks_used[-1] if held is None else held)
    result.tokens_stored.append(sum(cache.lengths.values()))


@torch.inference_mode()
def serve_continuous(model: Transformer, trace: list[Request], n_blocks: int, block_size: int, max_batch: int,
                     attention_fn: Callable = paged_attention, max_steps: int = 100_000) -> ServeResult:
    """Iteration-level scheduling under a budget of n_blocks KV blocks (see the module docstring)."""
    model.eval()
    cache = PagedKVCache(model, n_blocks, block_size)
    result = ServeResult("continuous", {r.id: [] for r in trace}, n_blocks=n_blocks)
    pending, waiting, running = deque(sorted(trace, key=lambda r: r.arrival)), deque(), []
    start, t = time.perf_counter(), 0
    while pending or waiting or running:
        while pending and pending[0].arrival <= t:
            waiting.append(pending.popleft())
        if not waiting and not running:
            t = math.ceil(pending[0].arrival)  # idle until the next arrival
            continue
        admitted = []
        while waiting and len(running) + len(admitted) < max_batch:
            r = waiting[0]
            seq = torch.cat([r.prompt, torch.tensor(result.tokens[r.id], dtype=torch.long)])  # recompute after preemption
            if cache.n_free < blocks_needed(len(seq), block_size) + 1:  # one block kept for running sequences
                break
            waiting.popleft()
            cache.add(r.id)
            result.tokens[r.id].append(int(paged_prefill(model, cache, r.id, seq).argmax()))
            result.first_token.setdefault(r.id, t + 1)
            admitted.append(r)
        if not admitted and not running:  # waiting requests, nothing running, and still no room: blocks leaked
            raise RuntimeError(f"request {waiting[0].id} cannot be admitted into an idle pool "
                               f"({cache.n_free} of {n_blocks} blocks free)")
        decoding = list(running)
        while sum(cache.blocks_to_append(r.id) for r in decoding) > cache.n_free:  # preempt, last admitted first
            victim = decoding.pop()
            running.remove(victim)
            cache.free(victim.id)
            waiting.appendleft(victim)
            result.preemptions += 1
        if decoding:
            last = torch.tensor([result.tokens[r.id][-1] for r in decoding])
            logits = paged_decode_step(model, cache, [r.id for r in decoding], last, attention_fn)
            for r, token in zip(decoding, logits.argmax(-1).tolist()):
                result.tokens[r.id].append(token)
        t += 1
        running = decoding + admitted
        for r in list(running):
            if len(result.tokens[r.id]) >= r.output_len:
                running.remove(r)
                cache.free(r.id)
                result.finish[r.id] = t
        _record(result, cache, len(decoding) + len(admitted))
        if t > max_steps:
            raise RuntimeError(f"continuous batching did not finish in {max_steps} steps")
    result.steps, result.wall_seconds = t, time.perf_counter() - start
    result.leaked_blocks = cache.n_blocks - cache.n_free
    return result


@torch.inference_mode()
def serve_static(model: Transformer, trace: list[Request], n_blocks: int, block_size: int, max_batch: int,
                 max_new_tokens: int, attention_fn: Callable = paged_attention,
                 max_steps: int = 100_000) -> ServeResult:
    """Request-level scheduling: each batch reserves prompt + max_new_tokens per request and runs until
    its longest request is done; the batch is returned together."""
    model.eval()
    cache = PagedKVCache(model, n_blocks, block_size)
    result = ServeResult("static", {r.id: [] for r in trace}, n_blocks=n_blocks)
    pending = deque(sorted(trace, key=lambda r: r.arrival))
    start, t = time.perf_counter(), 0
    while pending:
        if pending[0].arrival > t:
            t = math.ceil(pending[0].arrival)
        batch, reserved = [], 0
        while pending and pending[0].arrival <= t and len(batch) < max_batch:
            need = blocks_needed(len(pending[0].prompt) + max_new_tokens, block_size)
            if reserved + need > n_blocks:
                break
            reserved += need
            batch.append(pending.popleft())
        for r in batch:  # the prefill step
            cache.add(r.id)
            result.tokens[r.id].append(int(paged_prefill(model, cache, r.id, r.prompt).argmax()))
            result.first_token[r.id] = t + 1
        t += 1
        _record(result, cache, len(batch), reserved)
        for _ in range(max(r.output_len for r in batch) - 1):  # decode until the longest is done
            active = [r for r in batch if len(result.tokens[r.id]) < r.output_len]
            last = torch.tensor([result.tokens[r.id][-1] for r in active])
            logits = paged_decode_step(model, cache, [r.id for r in active], last, attention_fn)
            for r, token in zip(active, logits.argmax(-1).tolist()):
                result.tokens[r.id].append(token)
            t += 1
            _record(result, cache, len(batch), reserved)  # finished rows hold their slot until the batch ends
        for r in batch:
            cache.free(r.id)
            result.finish[r.id] = t
        if t > max_steps:
            raise RuntimeError(f"static batching did not finish in {max_steps} steps")
    result.steps, result.wall_seconds = t, time.perf_counter() - start
    result.leaked_blocks = cache.n_blocks - cache.n_free
    return result
