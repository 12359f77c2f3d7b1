"""Audit of the inference module (day 15): the paged KV cache, continuous vs static batching,
speculative decoding and int8 weights, all on the tiny Llama of modules.transformer."""
from __future__ import annotations

import itertools
import math

import torch

from llmaudit.audit import Audit, Bound, kernel, max_error, measure
from modules import inference as M
from modules.transformer import expand_kv_heads, generate

F64 = torch.float64


def _example_paged() -> dict:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, 6, 2, 4, 8, generator=g)  # K and V pools: 6 blocks, 2 KV heads, 4 slots, d 8
    return {"query": torch.randn(2, 4, 8, generator=g), "key_cache": pool[0], "value_cache": pool[1],
            "block_tables": torch.tensor([[3, 0, 5], [1, 4, 0]]), "context_lens": torch.tensor([11, 6])}


def _example_accept() -> dict:
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(2, 3, 5, generator=g, dtype=F64), torch.rand(2, 2, 5, generator=g, dtype=F64)
    return {"target_probs": p / p.sum(-1, keepdim=True), "draft_probs": q / q.sum(-1, keepdim=True),
            "draft_tokens": torch.tensor([[1, 4], [0, 2]]), "uniforms": torch.rand(2, 2, generator=g, dtype=F64)}


KERNELS = [
    kernel(M.paged_attention, example=_example_paged,
           hint="gather each sequence's blocks in block-table order, flatten them into one key axis, mask slots at "
                "or beyond context_lens, and let query head h read KV head h // (H / K)."),
    kernel(M.speculative_accept, example=_example_accept,
           hint="accept x_i iff u_i < p_i(x_i) / q_i(x_i); stop at the FIRST rejection; resample from "
                "max(0, p - q) normalised at that position, or from p_gamma when every draft was accepted."),
    kernel(M.quantize_int8_per_channel, example=lambda: {"weight": torch.randn(4, 6, generator=torch.Generator().manual_seed(0))},
           hint="one scale per output row: absmax / 127; round to nearest, clamp to [-127, 127], store int8."),
]

inference = Audit("inference", day=15, title="Serving: paged KV cache, continuous batching, speculative decoding, int8",
                  config=M.InferenceConfig, kernels=KERNELS, formulas=M.FORMULAS)


# ---- the paged KV cache -----------------------------------------------------------------------------

@inference.check("< 1e-12", hint="flatten blocks in table order (not pool order), mask by context length, group "
                                 "query heads by KV head with repeat_interleave semantics.")
def paged_attention_matches_dense_attention(paged_attention, g):
    """Reading K/V through a block table is only an addressing change: the output equals ordinary attention
    over the same keys laid out contiguously (float64, shuffled blocks, GQA, lengths not multiples of 16)."""
    B, H, K, S_b, d, n_blocks = 5, 4, 2, 16, 8, 40
    k_pool, v_pool = (torch.randn(n_blocks, K, S_b, d, generator=g, dtype=F64) for _ in range(2))
    lens = torch.randint(1, 5 * S_b, (B,), generator=g)
    tables = torch.randperm(n_blocks, generator=g)[:B * 5].view(B, 5)
    q = torch.randn(B, H, d, generator=g, dtype=F64)
    out = paged_attention(q, k_pool, v_pool, tables, lens)
    errors = []
    for b in range(B):
        n = int(lens[b])
        keys = k_pool[tables[b]].permute(1, 0, 2, 3).reshape(1, K, -1, d)[:, :, :n]
        values = v_pool[tables[b]].permute(1, 0, 2, 3).reshape(1, K, -1, d)[:, :, :n]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b][None, :, None], expand_kv_heads(keys, H // K), expand_kv_heads(values, H // K))
        errors.append(max_error(out[b], want[0, :, 0]))
    return errors


@inference.fixture
def model(cfg, g):
    """The served model: a random tiny Llama with sharp logits (init std 0.2)."""
    return M.sharp_model(cfg, g)


def _paged_greedy(model, cache, seqs, first_logits, steps, paged_attention):
    """Greedy decoding of seqs already prefilled: per step logits (B, steps, V) and tokens (B, steps)."""
    logits, tokens = [first_logits], [first_logits.argmax(-1)]
    for _ in range(steps - 1):
        logits.append(M.paged_decode_step(model, cache, seqs, tokens[-1], paged_attention))
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(logits, 1), torch.stack(tokens, 1)


@inference.check({"tokens_differing": "== 0", "logit_error": "< 1e-5"},
                 hint="write the new K/V into slot (table[t // 16], t % 16) before attending, and rotate q, k at each "
                      "sequence's own position.")
def paged_generation_matches_contiguous_cache(model, paged_attention, cfg, g):
    """Three sequences of different prompt lengths decode side by side through the paged cache (crossing
    block boundaries): greedy tokens equal the contiguous cache's, logits equal a full recomputation."""
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 13, 16)]
    cache = M.PagedKVCache(model, 3 * (cfg.decode_steps // cfg.block_size + 3), cfg.block_size)
    for i, p in enumerate(prompts):
        cache.add(i)
    first = torch.stack([M.paged_prefill(model, cache, i, p) for i, p in enumerate(prompts)])
    logits, tokens = _paged_greedy(model, cache, [0, 1, 2], first, cfg.decode_steps, paged_attention)
    differing, errors = 0, []
    for i, p in enumerate(prompts):
        want = generate(model, p[None], cfg.decode_steps)[0, len(p):]
        differing += int((want != tokens[i]).sum())
        with torch.no_grad():
            full = model(torch.cat([p, tokens[i]])[None, :-1])[0, len(p) - 1:]
        errors.append(max_error(logits[i], full))
    return {"tokens_differing": differing, "logit_error": errors}


@inference.check({"extra_blocks_at_fork": "== 0", "logit_error": "< 1e-5"},
                 hint="fork copies the block table and raises reference counts; before writing into a shared, "
                      "partly filled block, copy it (copy-on-write).")
def forked_samples_share_the_prompt_until_written(model, paged_attention, cfg, g):
    """Parallel samples of one prompt share its blocks (stored once); the first write into the shared last
    block copies it, so each sample decodes exactly as if it were alone (logits against recomputation)."""
    prompt = torch.randint(0, cfg.vocab_size, (cfg.block_size + 4,), generator=g)  # last block partly filled
    cache = M.PagedKVCache(model, 4 * cfg.n_parallel, cfg.block_size)
    cache.add(0)
    M.paged_prefill(model, cache, 0, prompt)
    prompt_blocks = cache.n_blocks - cache.n_free
    for child in range(1, cfg.n_parallel):
        cache.fork(0, child)
    extra = cache.n_blocks - cache.n_free - prompt_blocks
    seqs = list(range(cfg.n_parallel))
    forced = torch.randperm(cfg.vocab_size, generator=g)[:cfg.n_parallel]  # each sample starts differently
    logits, tokens = [], forced[:, None]
    for _ in range(8):
        logits.append(M.paged_decode_step(model, cache, seqs, tokens[:, -1], paged_attention))
        tokens = torch.cat([tokens, logits[-1].argmax(-1)[:, None]], 1)
    errors = []
    with torch.no_grad():
        for s in seqs:
            full = model(torch.cat([prompt, tokens[s, :-1]])[None])[0, len(prompt):]
            errors.append(max_error(torch.stack(logits, 1)[s], full))
    return {"extra_blocks_at_fork": extra, "logit_error": errors}


@inference.check("< block_size", hint="allocate a block only when a token needs it (ceil(n / block_size)), never ahead.")
def paged_waste_is_under_one_block_per_sequence(model, cfg, g):
    """Blocks are allocated on demand, so a sequence of n tokens wastes ceil(n / 16) * 16 - n < 16 slots,
    only in its last block; a contiguous cache reserves prompt + max_new_tokens for every request."""
    longest = cfg.prompt_max + cfg.max_new_tokens
    cache = M.PagedKVCache(model, cfg.n_requests * (M.blocks_needed(longest, cfg.block_size) + 2), cfg.block_size)
    lengths = torch.randint(cfg.prompt_min + 1, longest + 1, (cfg.n_requests,), generator=g).tolist()
    waste = []
    for seq, n in enumerate(lengths):
        cache.add(seq)
        for _ in range(n):  # one token at a time, as decoding appends them
            cache.append_slots(seq, 1)
        waste.append(len(cache.tables[seq]) * cfg.block_size - n)
    return measure(waste, f"{cfg.n_requests} sequences of {min(lengths)} to {max(lengths)} tokens")


# ---- continuous vs static batching -------------------------------------------------------------------

@inference.fixture(cost=3)
def served(model, paged_attention, cfg, g):
    """One request trace served by both policies under the same KV budget: (trace, continuous, static)."""
    trace = M.request_trace(cfg.n_requests, cfg.arrival_rate, (cfg.prompt_min, cfg.prompt_max), cfg.max_new_tokens,
                            cfg.vocab_size, g)
    continuous = M.serve_continuous(model, trace, cfg.kv_blocks, cfg.block_size, cfg.max_batch, paged_attention)
    static = M.serve_static(model, trace, cfg.kv_blocks, cfg.block_size, cfg.max_batch, cfg.max_new_tokens,
                            paged_attention)
    return trace, continuous, static


@inference.check({"mismatched_tokens": "== 0", "wrong_lengths": "== 0", "preemptions": Bound(">=", 1.0, 0)},
                 hint="a preempted request must be recomputed from its prompt AND the tokens it already produced.")
def served_tokens_are_each_requests_greedy_tokens(model, served):
    """Batching, block tables and preemption must not change any request's output: every generated token
    is the argmax of a full recomputation of that request alone (one right-padded forward, causal); the
    tight KV budget makes continuous batching preempt at least once, so recomputation is exercised."""
    trace, continuous, static = served
    mismatched = wrong = 0
    for result in (continuous, static):
        seqs = [torch.cat([r.prompt, torch.tensor(result.tokens[r.id])]) for r in trace]
        wrong += sum(len(result.tokens[r.id]) != r.output_len for r in trace)
        padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        with torch.no_grad():
            greedy = model(padded).argmax(-1)  # (R, T): the token each position predicts
        for i, (r, seq) in enumerate(zip(trace, seqs)):
            P = len(r.prompt)
            mismatched += int((greedy[i, P - 1:len(seq) - 1] != seq[P:]).sum())
    return {"mismatched_tokens": mismatched, "wrong_lengths": wrong, "preemptions": continuous.preemptions}


@inference.check("== 0", hint="return every block of a finished (or preempted) request to the free list.")
def finished_requests_free_every_block(served):
    """A finished request returns its blocks (reference count to 0, back on the free list), so after the
    trace the pool is whole again; a leak would shrink the usable budget request by request."""
    _, continuous, static = served
    return continuous.leaked_blocks + static.leaked_blocks


@inference.check(">= min_throughput_gain", kind="outcome",
                 hint="admit new requests at every step while blocks are free; do not wait for the batch to drain.")
def continuous_batching_raises_throughput(served):
    """Iteration-level scheduling refills the slots of finished requests at once and allocates blocks as
    tokens come, so more requests run per step than in a static batch that reserves max length and waits
    for its longest member: tokens per step, continuous / static, on the same trace and KV budget."""
    trace, continuous, static = served
    c, s = continuous.summary(trace), static.summary(trace)
    return measure(c["throughput"] / s["throughput"],
                   f"{c['throughput']:.2f} vs {s['throughput']:.2f} tokens/step, {continuous.preemptions} preemptions")


@inference.check(">= min_p99_latency_gain", kind="outcome",
                 hint="a static batch holds short requests until its longest one ends, and queues newcomers meanwhile.")
def continuous_batching_cuts_p99_latency(served):
    """Requests leave as soon as they are done and newcomers join within a step, so tail latency drops:
    static p99 latency / continuous p99 latency (arrival to last token, in model steps)."""
    trace, continuous, static = served
    c, s = continuous.summary(trace), static.summary(trace)
    return measure(s["latency_p99"] / c["latency_p99"], f"p99 {s['latency_p99']:.1f} vs {c['latency_p99']:.1f} steps")


# ---- speculative decoding ----------------------------------------------------------------------------

def _random_probs(shape, g, sharpness=3.0) -> torch.Tensor:
    x = torch.rand(*shape, generator=g, dtype=F64) ** sharpness
    return x / x.sum(-1, keepdim=True)


@inference.check("< 6e-4", hint="accept iff u < p(x) / q(x): comparing u with p(x), or with q(x) / p(x), is wrong.")
def acceptance_probability_is_min_one_p_over_q(speculative_accept, g):
    """A drafted x is kept with probability min(1, p(x)/q(x)): over 1000 evenly spaced uniforms the accepted
    fraction is within 0.5/1000 of it, for every token of random p and q (gamma = 1)."""
    V, N = 6, 1000
    p, q = _random_probs((V,), g), _random_probs((V,), g)
    u = ((torch.arange(N, dtype=F64) + 0.5) / N).repeat(V)[:, None]  # (V N, 1)
    x = torch.arange(V).repeat_interleave(N)[:, None]
    n, _ = speculative_accept(torch.stack([p, p])[None].expand(V * N, 2, V), q[None, None].expand(V * N, 1, V), x, u)
    rate = n.double().view(V, N).mean(1)
    return (rate - (p / q).clamp(max=1)).abs()


@inference.check("< 1e-12", hint="stop at the first rejection and resample from norm(max(0, p - q)) there; resampling "
                                 "from p or q double-counts the tokens the draft already proposes.")
def speculative_output_equals_target_distribution_exactly(speculative_accept, g):
    """Enumerating every draft path and rejection point of random context-dependent p and q (V = 3,
    gamma = 2, three tokens): the probability of each of the 27 outputs equals the target's exactly."""
    V, gamma, m, tables = 3, 2, 3, {}

    def table(kind):
        return lambda prefix: tables.setdefault((kind, prefix), _random_probs((V,), g))

    p_of, q_of = table("p"), table("q")
    got = M.exact_speculative_distribution(p_of, q_of, V, gamma, m, speculative_accept)
    want = {s: math.prod(p_of(s[:i])[s[i]].item() for i in range(m)) for s in itertools.product(range(V), repeat=m)}
    return [abs(got.get(s, 0.0) - w) for s, w in want.items()] + [len(set(got) - set(want))]


@inference.fixture
def spec_models(cfg, g):
    """A tiny-vocabulary target, an unrelated random 1-layer draft (speculation must be exact whatever the
    draft; a poor one rejects often, which gives the test power against a wrong residual), and a prompt."""
    target = M.sharp_model(cfg, g, vocab_size=cfg.spec_vocab)
    draft = M.sharp_model(cfg, g, vocab_size=cfg.spec_vocab, n_layers=1)
    return target, draft, torch.randint(0, cfg.spec_vocab, (5,), generator=g)


@inference.check("> significance", hint="a wrong residual or acceptance rule skews the continuation distribution.")
def speculative_samples_pass_chi_square_against_target(speculative_accept, spec_models, cfg, g):
    """Continuations sampled by speculative decoding (an unrelated 1-layer draft, gamma = 3) follow the target's
    exact distribution over all V^m continuations: Pearson chi-square p-value (cells expected below 5 pooled)."""
    target, draft, prompt = spec_models
    expected = M.target_continuation_distribution(target, prompt, cfg.spec_new) * cfg.spec_samples
    tokens, _ = M.speculative_generate(target, draft, prompt.expand(cfg.spec_samples, -1), cfg.spec_new, cfg.gamma,
                                       generator=g, accept_fn=speculative_accept)
    cells = (tokens[:, len(prompt):] * cfg.spec_vocab ** torch.arange(cfg.spec_new - 1, -1, -1)).sum(1)
    observed = torch.bincount(cells, minlength=len(expected)).double()
    chi2, dof, p_value = M.chi_square_test(observed, expected)  # cells expected below 5 pooled into one
    return measure(p_value, f"chi2 {chi2:.1f} on {dof} dof ({len(expected)} cells, those expected < 5 pooled)")


@inference.check("== 0", hint="with one-hot p and q a draft equal to the target's argmax is accepted, any other is "
                              "rejected and replaced by the argmax.")
def greedy_speculative_equals_greedy_target(speculative_accept, model, cfg, g):
    """Under greedy decoding p and q are one-hot, so speculation accepts exactly the drafts that equal the
    target's argmax and replaces the first other one: the output is the target's greedy output, token for token."""
    prompt = torch.randint(0, cfg.vocab_size, (8, 5), generator=g)
    draft = M.layer_skip_draft(model, 1)
    got, _ = M.speculative_generate(model, draft, prompt, cfg.curve_new, cfg.gamma, temperature=0.0,
                                    accept_fn=speculative_accept)
    return int((got != generate(model, prompt, cfg.curve_new)).sum())


@inference.check("<= max_z", hint="count the accepted drafts before the first rejection, plus the one sampled token.")
def tokens_per_call_match_the_formula(speculative_accept, cfg, g):
    """With context-free p and q every draft is accepted independently with alpha = sum min(p, q), so the
    tokens per target call average (1 - alpha^(gamma+1)) / (1 - alpha): |measured - formula| in standard errors."""
    V, R, z = 8, cfg.unigram_rounds, []
    for gamma in (1, cfg.gamma, cfg.max_gamma):
        p, q = _random_probs((V,), g, 1.0), _random_probs((V,), g, 1.0)
        drafts = torch.multinomial(q, R * gamma, replacement=True, generator=g).view(R, gamma)
        n, _ = speculative_accept(p.expand(R, gamma + 1, V), q.expand(R, gamma, V), drafts,
                                  torch.rand(R, gamma, generator=g, dtype=F64))
        tokens = (n + 1).double()
        want = M.expected_tokens_per_call(torch.minimum(p, q).sum().item(), gamma)
        z.append(abs(tokens.mean().item() - want) / (tokens.std().item() / math.sqrt(R)))
    return z


@inference.fixture(cost=2)
def acceptance_curve(model, speculative_accept, cfg, g):
    """gamma = 1..max_gamma on the served model with its 1-layer draft (temperature 1): measured acceptance
    rate alpha (accepted / drafts judged), tokens per target call, and the formula at that alpha."""
    draft, rows = M.layer_skip_draft(model, 1), []
    prompt = torch.randint(0, cfg.vocab_size, (cfg.curve_samples, 5), generator=g)
    for gamma in range(1, cfg.max_gamma + 1):
        _, n = M.speculative_generate(model, draft, prompt, cfg.curve_new, gamma, generator=g,
                                      accept_fn=speculative_accept)
        alpha = n.sum().item() / torch.where(n < gamma, n + 1, n).sum().item()
        rows.append((gamma, alpha, (n + 1).double().mean().item(), M.expected_tokens_per_call(alpha, gamma)))
    return rows


@inference.check(">= min_tokens_per_call", kind="outcome",
                 hint="accepted drafts are free tokens: a round that always stops at the first draft yields 1 token.")
def speculation_yields_several_tokens_per_target_call(acceptance_curve, cfg):
    """A draft sharing the target's first layer agrees with it often enough that one target pass over
    gamma = max_gamma drafts emits several tokens (the target reads its weights once for all of them)."""
    gamma, alpha, tokens, formula = acceptance_curve[-1]
    return measure(tokens, f"gamma {gamma}: alpha {alpha:.3f}, formula {formula:.2f}")


@inference.check("== 0", hint="after a round keep the unread token plus the k accepted drafts in the target's cache "
                              "and rewind the rest; the draft's cache never holds its last draft.")
def cached_speculation_equals_greedy_target(speculative_accept, model, cfg, g):
    """The KV-cached round a server runs (one target call on [last token, gamma drafts], then both caches
    rewound past the rejected drafts) still gives the target's greedy output token for token: mismatched
    tokens over 8 prompts and gamma = 1, gamma, max_gamma (a cache rewound wrongly shifts every later logit)."""
    draft, bad = M.layer_skip_draft(model, 1), 0
    for prompt in torch.randint(0, cfg.vocab_size, (8, 5), generator=g):
        want = generate(model, prompt[None], cfg.curve_new)[0]
        for gamma in sorted({1, cfg.gamma, cfg.max_gamma}):
            got, _ = M.speculative_generate_cached(model, draft, prompt, cfg.curve_new, gamma, temperature=0.0,
                                                   accept_fn=speculative_accept)
            bad += int((got != want).sum())
    return bad


@inference.fixture(cost=8)
def speed(speculative_accept, cfg, g):
    """Full mode: a deep target and a 1-layer draft trained on one Markov chain's text, and the wall-clock
    time of plain vs speculative sampling from the target for several gamma (speedup.py). None in toy mode."""
    if not cfg.speedup:
        return None
    speed_cfg = M.SpeedConfig(target_layers=cfg.speed_target_layers)
    pair = M.train_speed_pair(speed_cfg, g)
    return speed_cfg, M.time_speculation(pair, speed_cfg, g, accept_fn=speculative_accept)


# ---- int8 weights --------------------------------------------------------------------------------------

@inference.check({"excess_over_half_step": "< 1e-5", "codes_outside_int8": "== 0"},
                 hint="round to nearest (not toward zero) and clamp to [-127, 127] before casting to int8.")
def int8_error_is_at_most_half_a_step(quantize_int8_per_channel, g):
    """Rounding to the nearest of 255 evenly spaced levels misses each weight by at most half a step:
    max |W - s Q| - s/2 per row, in units of the step s, is <= 0 (float32 rounding allows 1e-5)."""
    W = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    q, scale = quantize_int8_per_channel(W)
    error = (W.double() - M.dequantize(q, scale).double()).abs().amax(1)
    outside = int(q.dtype != torch.int8) + int((q.long().abs() > 127).sum())
    return {"excess_over_half_step": (error - scale.double() / 2) / scale.double(), "codes_outside_int8": outside}


@inference.check({"excess_over_1_254": "< 1e-6", "rows_not_at_127": "== 0"},
                 hint="take the absmax per output row (dim 1 of an (out, in) matrix), not over the whole tensor.")
def per_channel_scales_follow_each_row(quantize_int8_per_channel, g):
    """Each output row gets its own scale, so a row of small weights keeps 8 bits of resolution beside a row
    of large ones: every row's error is at most 1/254 of its own absmax (rows spanning 1e-3 to 1e2; measured:
    max error / absmax - 1/254), and each row's largest |W| maps to +-127."""
    W = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    q, scale = quantize_int8_per_channel(W)
    relative = (W.double() - M.dequantize(q, scale).double()).abs().amax(1) / W.double().abs().amax(1)
    return {"excess_over_1_254": relative - 1 / 254, "rows_not_at_127": int((q.long().abs().amax(1) != 127).sum())}


@inference.fixture
def quantized(model, quantize_int8_per_channel):
    """The served model with every linear weight quantised (W8A16) and the bytes of those weights."""
    return M.quantize_model(model, quantize_int8_per_channel)


@inference.check("== 0", hint="store int8 codes (1 byte) and one float32 scale per output row, nothing more.")
def int8_weights_take_one_byte_plus_a_scale_per_row(model, quantized):
    """int8 codes take 1 byte per weight and the scales 4 bytes per output row, against 4 bytes per weight
    in float32 (a little over 1/4): stored bytes minus that count, over every linear layer."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    want = sum(w.numel() + 4 * w.shape[0] for w in linears)
    _, nbytes = quantized
    return measure(nbytes["int8"] - want, f"{nbytes['int8']} of {nbytes['float32']} float32 bytes "
                                          f"({nbytes['int8'] / nbytes['float32']:.3f})")


@inference.check("<= max_ppl_change", kind="outcome",
                 hint="8 bits per channel keep each weight within half a step of 1/127 of its row's absmax.")
def int8_weights_barely_change_perplexity(model, quantized, cfg, g):
    """Weight-only int8 keeps the model's predictions: the relative change of perplexity on sequences
    sampled from the float32 model (temperature 1) is below the bar."""
    samples = generate(model, torch.randint(0, cfg.vocab_size, (cfg.ppl_samples, 1), generator=g), cfg.ppl_len - 1,
                       temperature=1.0, generator=g)
    before, after = M.perplexity(model, samples), M.perplexity(quantized[0], samples)
    return measure(abs(after / before - 1), f"perplexity {before:.3f} -> {after:.3f}")


# ---- the report -----------------------------------------------------------------------------------------

@inference.report
def scheduler_table(ctx, served, cfg):
    trace, continuous, static = served
    rows = []
    for result in (static, continuous):
        s = result.summary(trace)
        rows.append([result.policy, f"{s['throughput']:.2f}", f"{s['ttft_p50']:.1f}", f"{s['ttft_p99']:.1f}",
                     f"{s['latency_p50']:.1f}", f"{s['latency_p99']:.1f}", s["steps"], result.preemptions])
        ctx.scalar(f"{result.policy} tokens/step", s["throughput"])
        ctx.scalar(f"{result.policy} p99 latency (steps)", s["latency_p99"])
        ctx.scalar(f"{result.policy} p99 TTFT (steps)", s["ttft_p99"])
        ctx.scalar(f"{result.policy} tokens/s (wall, this machine)", round(s["tokens_per_second"]), timed=True)
        ctx.series(f"scheduler/{result.policy}_batch_size", result.batch_sizes, x_label="model step",
                   group="scheduler/batch_size", smooth=False, label=f"{result.policy} batching",
                   y_label="sequences per step", title="Sequences computed per step on one trace")
        held = torch.tensor(result.blocks_held, dtype=F64).clamp_min(1) * cfg.block_size
        ctx.series(f"kv/{result.policy}_utilisation", torch.tensor(result.tokens_stored, dtype=F64) / held,
                   x_label="model step", group="kv/utilisation", smooth=False, label=f"{result.policy} batching",
                   y_label="share of held slots storing a token", title="KV block utilisation (static holds its reservation)")
    summaries = [r.summary(trace) for r in (static, continuous)]
    ctx.series("scheduler/latency", [x[f"latency_{q}"] for x in summaries for q in ("p50", "p99")],
               x_label="policy and percentile", smooth=False, label="request latency",
               y_label="model steps (arrival to last token)", title="Request latency: static vs continuous batching",
               ticks=["static p50", "static p99", "continuous p50", "continuous p99"], key=True)
    ctx.table(f"Static vs continuous batching ({cfg.n_requests} requests, {cfg.kv_blocks} blocks of "
              f"{cfg.block_size}; time in model steps)",
              ["policy", "tokens/step", "TTFT p50", "TTFT p99", "latency p50", "latency p99", "steps",
               "preemptions"], rows)
    reserved = sum(len(r.prompt) + cfg.max_new_tokens for r in trace)
    paged = sum(M.blocks_needed(len(r.prompt) + r.output_len, cfg.block_size) * cfg.block_size for r in trace)
    stored = sum(len(r.prompt) + r.output_len for r in trace)
    ctx.scalar("preemptions", continuous.preemptions)
    ctx.scalar("paged KV utilisation", stored / paged)
    ctx.scalar("contiguous KV utilisation", stored / reserved)
    ctx.table("KV slots for the trace's requests at their final length",
              ["cache", "slots", "tokens stored", "utilisation"],
              [["contiguous (prompt + max_new_tokens)", reserved, stored, f"{stored / reserved:.2f}"],
               [f"paged (blocks of {cfg.block_size})", paged, stored, f"{stored / paged:.2f}"]])


@inference.report
def speculation_curve(ctx, acceptance_curve):
    gammas = [r[0] for r in acceptance_curve]
    ctx.series("spec/tokens_per_call", [r[2] for r in acceptance_curve], gammas, x_label=r"draft tokens $\gamma$",
               group="spec/tokens_per_call", smooth=False, label="measured", y_label="tokens per target call",
               title="Speculative decoding: tokens per target call")
    ctx.series("spec/tokens_per_call_formula", [r[3] for r in acceptance_curve], gammas,
               x_label=r"draft tokens $\gamma$", group="spec/tokens_per_call", smooth=False,
               label=r"$(1-\alpha^{\gamma+1})/(1-\alpha)$ at measured $\alpha$", y_label="tokens per target call")
    ctx.series("spec/acceptance_rate", [r[1] for r in acceptance_curve], gammas, x_label=r"draft tokens $\gamma$",
               smooth=False, label=r"acceptance rate $\alpha$", y_label=r"$\alpha$", title="Acceptance rate over gamma")
    ctx.scalar("alpha (gamma=1)", acceptance_curve[0][1])
    ctx.scalar(f"tokens per target call (gamma={gammas[-1]})", acceptance_curve[-1][2])


@inference.report
def speculation_speedup(ctx, speed):
    if speed is None:
        return
    speed_cfg, rows = speed
    table = [[r.gamma, f"{r.alpha:.3f}", f"{r.tokens_per_call:.2f}", f"{r.c:.3f}", f"{r.seconds_plain:.3f}",
              f"{r.seconds_speculative:.3f}", f"{r.speedup:.2f}", f"{r.predicted:.2f}", f"{r.verify:.2f}"] for r in rows]
    ctx.table(f"Wall clock on this machine: {speed_cfg.target_layers}-layer target, 1-layer draft, "
              f"{speed_cfg.n_prompts} prompts x {speed_cfg.n_new} tokens, temperature 1, median of {speed_cfg.repeats}",
              ["gamma", "alpha", "tokens per target call", "c = draft / target call", "plain (s)", "speculative (s)",
               "speed-up", "predicted (paper)", "verify call / 1-token call"], table, timed=True)
    gammas = [r.gamma for r in rows]
    ctx.series("spec/speedup", [r.speedup for r in rows], gammas, x_label=r"draft tokens $\gamma$",
               group="spec/speedup", smooth=False, label="measured (wall clock, this machine)",
               y_label="speed-up over plain decoding (x)", title="Speculative decoding: wall-clock speed-up",
               timed=True)
    ctx.series("spec/speedup_predicted", [r.predicted for r in rows], gammas, x_label=r"draft tokens $\gamma$",
               group="spec/speedup", smooth=False, y_label="speed-up over plain decoding (x)", timed=True,
               label=r"$(1-\alpha^{\gamma+1})/((1-\alpha)(\gamma c+1))$ at measured $\alpha$, $c$")
    best = max(rows, key=lambda r: r.speedup)
    ctx.scalar("speculative speed-up, best gamma (wall, this machine)", round(best.speedup, 2), timed=True)
    ctx.scalar("predicted speed-up at that gamma (paper formula)", round(best.predicted, 2), timed=True)
    ctx.scalar("target call over gamma + 1 tokens / over 1, at that gamma", round(best.verify, 2), timed=True)
    ctx.scalar("draft / target call time c (wall, this machine)", round(rows[0].c, 3), timed=True)


@inference.report
def int8_memory(ctx, quantized, model):
    ctx.scalar("int8 bytes / float32 bytes", quantized[1]["int8"] / quantized[1]["float32"])
