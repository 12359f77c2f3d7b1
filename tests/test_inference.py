"""Inference: the paged cache against contiguous attention, the schedulers, speculative decoding's exact
distribution, int8 quantisation, the audit, and one mutant per check."""
from __future__ import annotations

import itertools
import math
from unittest import mock

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

from llmaudit.registry import get_audit
from modules import inference as M
from modules.inference import paged as P
from modules.inference import speculative as S
from modules.transformer import expand_kv_heads, generate

F64 = torch.float64


def tiny_model(seed: int = 0, vocab_size: int = 32):
    return M.sharp_model(M.InferenceConfig(), torch.Generator().manual_seed(seed), vocab_size)


# ------------------------------------------------------------------------------------------------
# The paged cache


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(4, 4), (4, 2), (4, 1)]), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_paged_attention_equals_attention_over_the_gathered_keys(B, heads, S_b, seed):
    H, K = heads
    g, d, n_blocks = torch.Generator().manual_seed(seed), 4, 12
    k_pool, v_pool = torch.randn(n_blocks, K, S_b, d, generator=g, dtype=F64), torch.randn(n_blocks, K, S_b, d, generator=g, dtype=F64)
    tables = torch.stack([torch.randperm(n_blocks, generator=g)[:3] for _ in range(B)])
    lens = torch.randint(1, 3 * S_b + 1, (B,), generator=g)
    q = torch.randn(B, H, d, generator=g, dtype=F64)
    out = M.paged_attention(q, k_pool, v_pool, tables, lens)
    for b in range(B):
        keys = torch.cat([k_pool[i] for i in tables[b]], dim=1)[None, :, : lens[b]]  # (1, K, n, d)
        values = torch.cat([v_pool[i] for i in tables[b]], dim=1)[None, :, : lens[b]]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b][None, :, None], expand_kv_heads(keys, H // K), expand_kv_heads(values, H // K))[0, :, 0]
        torch.testing.assert_close(out[b], want, atol=1e-12, rtol=0)


def test_padding_entries_of_the_block_table_are_never_read():
    ex = get_audit("inference").kernel("paged_attention").example()  # block size 4, contexts 11 and 6
    ex["block_tables"][0] = torch.tensor([3, 2, 5])  # now block 0 only pads row 1 (6 tokens fit in blocks 1, 4)
    ex["key_cache"][0], ex["value_cache"][0] = 0.0, 0.0
    clean = M.paged_attention(**ex)
    ex["key_cache"][0], ex["value_cache"][0] = 1e6, -1e6  # stale data of another sequence
    assert torch.equal(M.paged_attention(**ex), clean)


def test_allocator_counts_references_and_recycles_blocks():
    a = P.BlockAllocator(3)
    b0, b1 = a.allocate(), a.allocate()
    assert (b0, b1, a.n_free) == (0, 1, 1)
    a.share(b0)
    a.release(b0)
    assert a.n_free == 1  # still referenced once
    a.release(b0)
    assert a.n_free == 2 and a.allocate() == 0  # freed blocks are reused
    a.allocate()
    with pytest.raises(P.NoFreeBlocks):
        a.allocate()


def test_fork_shares_blocks_and_the_first_write_copies_the_partial_one():
    model = tiny_model()
    cache = M.PagedKVCache(model, 8, 4)
    cache.add(0)
    M.paged_prefill(model, cache, 0, torch.arange(6))  # 2 blocks, the second half full
    cache.fork(0, 1)
    assert cache.tables[1] == cache.tables[0] and cache.n_free == 6
    assert cache.blocks_to_append(1) == 1  # the shared partial block must be copied
    shared_full, shared_tail = cache.tables[0]
    cache.append_slots(1, 1)
    assert cache.tables[1][0] == shared_full and cache.tables[1][1] != shared_tail
    assert torch.equal(cache.k[:, cache.tables[1][1], :, :2], cache.k[:, shared_tail, :, :2])
    cache.free(0)
    cache.free(1)
    assert cache.n_free == 8


def test_waste_is_only_in_the_last_block():
    for n in range(1, 70):
        assert 0 <= P.blocks_needed(n, 16) * 16 - n < 16


def test_paged_decoding_equals_contiguous_generation_token_for_token():
    model = tiny_model(3)
    prompts = [torch.randint(0, 32, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 16, 17)]
    cache = M.PagedKVCache(model, 30, 16)
    tokens = []
    for i, p in enumerate(prompts):
        cache.add(i)
        tokens.append([int(M.paged_prefill(model, cache, i, p).argmax())])
    for _ in range(39):
        logits = M.paged_decode_step(model, cache, [0, 1, 2], torch.tensor([t[-1] for t in tokens]))
        for t, z in zip(tokens, logits):
            t.append(int(z.argmax()))
    for p, t in zip(prompts, tokens):
        assert generate(model, p[None], 40)[0, len(p):].tolist() == t


# ------------------------------------------------------------------------------------------------
# The schedulers


def test_trace_follows_its_stated_distributions_and_is_deterministic():
    a = M.request_trace(500, 0.5, (4, 16), 48, 32, torch.Generator().manual_seed(0))
    b = M.request_trace(500, 0.5, (4, 16), 48, 32, torch.Generator().manual_seed(0))
    assert [r.arrival for r in a] == [r.arrival for r in b]
    assert all(4 <= len(r.prompt) <= 16 and 1 <= r.output_len <= 48 for r in a)
    assert a[-1].arrival / len(a) == pytest.approx(2.0, rel=0.15)  # mean gap 1 / rate
    assert M.percentile([1, 2, 3, 4], 50) == 2.5


def test_both_schedulers_serve_every_request_fully_and_free_the_pool():
    model = tiny_model()
    trace = M.request_trace(12, 1.0, (4, 16), 48, 32, torch.Generator().manual_seed(1))
    c = M.serve_continuous(model, trace, 8, 16, 16)  # a tight budget: preemption happens
    s = M.serve_static(model, trace, 8, 16, 16, 48)
    assert c.preemptions > 0 and c.leaked_blocks == s.leaked_blocks == 0
    assert all(len(c.tokens[r.id]) == len(s.tokens[r.id]) == r.output_len for r in trace)
    assert c.tokens == s.tokens  # greedy: scheduling never changes a request's tokens
    assert max(c.blocks_used) <= 8


# ------------------------------------------------------------------------------------------------
# Speculative decoding


probs = st.integers(2, 4).flatmap(lambda V: st.tuples(st.just(V), st.integers(0, 2**31 - 1)))


@settings(max_examples=15, deadline=None)
@given(probs, st.integers(1, 2))
def test_speculative_marginals_are_exactly_the_target_for_context_free_tables(vs, gamma):
    V, seed = vs
    g = torch.Generator().manual_seed(seed)
    p, q = torch.rand(V, generator=g, dtype=F64) ** 3, torch.rand(V, generator=g, dtype=F64) ** 3
    p, q = p / p.sum(), q / q.sum()
    dist = M.exact_speculative_distribution(lambda s: p, lambda s: q, V, gamma, 2)
    for a, b in itertools.product(range(V), repeat=2):
        assert dist.get((a, b), 0.0) == pytest.approx((p[a] * p[b]).item(), abs=1e-12)


def test_identical_draft_is_always_accepted_and_formula_limits():
    p = torch.full((4, 3, 5), 0.2, dtype=F64)
    n, nxt = M.speculative_accept(p, p[:, :2], torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2, dtype=F64))
    assert n.tolist() == [2] * 4 and torch.allclose(nxt, p[:, 2])
    assert M.expected_tokens_per_call(1.0, 4) == 5 and M.expected_tokens_per_call(0.0, 4) == 1
    assert M.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)


def test_layer_skip_draft_shares_the_targets_first_layers():
    model = tiny_model()
    draft = M.layer_skip_draft(model, 1)
    assert len(draft.layers) == 1 and torch.equal(draft.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in model.parameters())


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_cached_greedy_speculation_is_the_targets_greedy_output(draft_layers, gamma, prompt_len, seed):
    model = tiny_model(seed)
    model_3 = M.sharp_model(M.InferenceConfig(n_layers=3), torch.Generator().manual_seed(seed))
    for target in (model, model_3):
        draft = M.layer_skip_draft(target, min(draft_layers, target.cfg.n_layers - 1))
        prompt = torch.randint(0, 32, (prompt_len,), generator=torch.Generator().manual_seed(seed + 1))
        got, rounds = M.speculative_generate_cached(target, draft, prompt, 20, gamma, temperature=0.0)
        assert torch.equal(got, generate(target, prompt[None], 20)[0])
        assert rounds.min() >= 0 and rounds.max() <= gamma and int((rounds + 1).sum()) >= 20


def test_cached_speculative_samples_follow_the_target_and_rewind_both_caches():
    cfg = M.InferenceConfig()
    g = torch.Generator().manual_seed(7)
    target = M.sharp_model(cfg, g, vocab_size=4)
    draft = M.sharp_model(cfg, g, vocab_size=4, n_layers=1)  # unrelated: many rejections, many rewinds
    prompt, n, m = torch.tensor([1, 0, 3]), 3000, 2
    cells, all_accepted = torch.zeros(16), 0
    for _ in range(n):
        tokens, rounds = M.speculative_generate_cached(target, draft, prompt, m, 2, generator=g)
        cells[tokens[3] * 4 + tokens[4]] += 1
        all_accepted += int((rounds == 2).sum())
    expected = M.target_continuation_distribution(target, prompt, m) * n
    _, _, p_value = M.chi_square_test(cells.double(), expected)
    assert p_value > 1e-3 and all_accepted > 0  # the draft's catch-up branch (all drafts kept) ran too


def test_speedup_formula_limits():
    assert M.predicted_speedup(0.8, 4, 0.0) == pytest.approx(M.expected_tokens_per_call(0.8, 4))
    assert M.predicted_speedup(0.0, 4, 0.25) == pytest.approx(0.5)  # every draft wasted: 1 token per 2 target-calls
    assert M.predicted_speedup(1.0, 3, 0.25) == pytest.approx(4 / 1.75)


def test_time_speculation_measures_every_gamma():
    cfg = M.SpeedConfig(target_layers=2, train_steps=4, n_prompts=1, n_new=6, gammas=(1, 3), repeats=1)
    g = torch.Generator().manual_seed(0)
    rows = M.time_speculation(M.train_speed_pair(cfg, g), cfg, g)
    assert [r.gamma for r in rows] == [1, 3]
    for r in rows:
        assert 0 <= r.alpha <= 1 and 1 <= r.tokens_per_call <= r.gamma + 1
        assert r.seconds_plain > 0 and r.seconds_speculative > 0 and r.c > 0 and r.verify > 0
        assert r.predicted == pytest.approx(M.predicted_speedup(r.alpha, r.gamma, r.c))


def test_target_continuation_distribution_sums_to_one():
    model = tiny_model(vocab_size=4)
    dist = M.target_continuation_distribution(model, torch.tensor([1, 2, 3]), 3)
    assert dist.shape == (64,) and dist.sum().item() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# int8


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.floats(1e-4, 1e3), st.integers(0, 2**31 - 1))
def test_int8_round_trip_is_within_half_a_step(rows, cols, scale, seed):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = M.quantize_int8_per_channel(W)
    assert q.dtype == torch.int8 and s.shape == (rows,)
    assert ((W - M.dequantize(q, s)).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.abs().amax(1) == 127).all()


def test_int8_zero_row_and_memory():
    q, s = M.quantize_int8_per_channel(torch.zeros(2, 3))
    assert torch.equal(q, torch.zeros(2, 3, dtype=torch.int8)) and torch.isfinite(s).all()
    _, nbytes = M.quantize_model(tiny_model())
    assert 0.25 < nbytes["int8"] / nbytes["float32"] < 0.3


def test_kv_cache_bytes_of_llama_2_7b():
    assert M.kv_cache_bytes(32, 32, 128, 4096, 1, 2) == 2 * 2**30


# ------------------------------------------------------------------------------------------------
# The audit


def test_audit_passes_toy():
    result = audit_once("inference", "toy", 0)
    assert result.error is None, result.error
    assert result.passed, [(c.name, c.measured) for c in result.checks if not c.passed]
    assert {c.kind for c in result.checks} == {"invariant", "outcome"}
    assert "spec/tokens_per_call" in result.series and "spec/speedup" not in result.series  # timed: full only


@pytest.mark.slow
def test_audit_passes_full():
    result = audit_once("inference", "full", 0)
    assert result.passed, (result.error, [(c.name, c.measured) for c in result.checks if not c.passed])
    timed = [t for t in result.tables if t.startswith("Wall clock")]  # the speed-up is timed, in full mode only
    assert timed and timed[0] in result.timed and "spec/speedup" in result.timed
    assert "spec/speedup" not in result.deterministic_dict()["series"]


def test_audit_is_deterministic():
    only = ["continuous_batching_raises_throughput", "speculative_samples_pass_chi_square_against_target",
            "int8_weights_barely_change_perplexity"]
    a, b = audit_once("inference", "toy", 3, only=only), audit_once("inference", "toy", 3, only=only)
    assert a.deterministic_dict() == b.deterministic_dict()


def test_kernel_examples_and_stubs():
    spec = get_audit("inference")
    for name in ("paged_attention", "speculative_accept", "quantize_int8_per_channel"):
        k = spec.kernel(name)
        k.fn(**k.example())
        stub = k.stub(f"my_{name}.py")
        assert f"def {name}(" in stub and "raise NotImplementedError" in stub


# ------------------------------------------------------------------------------------------------
# Mutants: each check must fail for a plausible wrong kernel, setting or piece of module code


def paged_with(*, mask=True, tiled_heads=False, context_shift=0):
    def fn(query, key_cache, value_cache, block_tables, context_lens):
        B, H, d = query.shape
        _, K, S_b, _ = key_cache.shape
        M_ = block_tables.shape[1]
        keys = key_cache[block_tables].permute(0, 2, 1, 3, 4).reshape(B, K, M_ * S_b, d)
        values = value_cache[block_tables].permute(0, 2, 1, 3, 4).reshape(B, K, M_ * S_b, d)
        if tiled_heads:  # query head h reads KV head h % K
            keys, values = keys.repeat(1, H // K, 1, 1), values.repeat(1, H // K, 1, 1)
        else:
            keys, values = expand_kv_heads(keys, H // K), expand_kv_heads(values, H // K)
        scores = torch.einsum("bhd,bhsd->bhs", query, keys) / math.sqrt(d)
        if mask:
            valid = torch.arange(M_ * S_b) < (context_lens + context_shift)[:, None]
            scores = scores.masked_fill(~valid[:, None], float("-inf"))
        return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), values)
    return fn


def accept_with(*, rule="ratio", stop=True, residual="p_minus_q", never=False):
    def fn(target_probs, draft_probs, draft_tokens, uniforms):
        B, gamma, V = draft_probs.shape
        p_x = target_probs[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_x = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)
        accepted = {"ratio": uniforms * q_x < p_x, "p": uniforms < p_x}[rule]
        if never:
            accepted = torch.zeros_like(accepted)
        n = accepted.long().cumprod(1).sum(1) if stop else accepted.long().sum(1)
        res = {"p_minus_q": (target_probs[:, :gamma] - draft_probs).clamp_min(0), "p": target_probs[:, :gamma],
               "q": draft_probs}[residual]
        nxt = torch.cat([res, target_probs[:, gamma:]], dim=1)[torch.arange(B), n]
        return n, nxt / nxt.sum(-1, keepdim=True)
    return fn


def quantize_with(*, rounding=torch.round, per_tensor=False, levels=127, dtype=torch.int8):
    def fn(weight):
        absmax = weight.abs().amax().expand(weight.shape[0]) if per_tensor else weight.abs().amax(1)
        scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
        return rounding(weight / scale[:, None]).clamp(-levels, levels).to(dtype), scale
    return fn


def continuous_is_static(model, trace, n_blocks, block_size, max_batch, attention_fn=M.paged_attention, **_):
    return M.serve_static(model, trace, n_blocks, block_size, max_batch, 48, attention_fn)


MUTANTS = [
    Mutant("paged_attention_matches_dense_attention", "no length mask", {"paged_attention": paged_with(mask=False)}),
    Mutant("paged_generation_matches_contiguous_cache", "new token masked out",
           {"paged_attention": paged_with(context_shift=-1)}),
    Mutant("forked_samples_share_the_prompt_until_written", "no copy-on-write",
           patch=lambda: mock.patch.object(P.PagedKVCache, "copy_on_write", lambda self, seq: None)),
    Mutant("paged_waste_is_under_one_block_per_sequence", "a block allocated ahead",
           patch=patched(P, "blocks_needed", lambda n, block_size: -(-n // block_size) + 1)),
    Mutant("served_tokens_are_each_requests_greedy_tokens", "KV heads tiled",
           {"paged_attention": paged_with(tiled_heads=True)}),
    Mutant("finished_requests_free_every_block", "free keeps the blocks", raises=True,
           patch=lambda: mock.patch.object(P.BlockAllocator, "release", lambda self, block: None)),
    Mutant("continuous_batching_raises_throughput", "continuous is static",
           patch=patched(M, "serve_continuous", continuous_is_static)),
    Mutant("continuous_batching_cuts_p99_latency", "continuous is static",
           patch=patched(M, "serve_continuous", continuous_is_static)),
    Mutant("acceptance_probability_is_min_one_p_over_q", "accept iff u < p", {"speculative_accept": accept_with(rule="p")}),
    Mutant("speculative_output_equals_target_distribution_exactly", "resample from p",
           {"speculative_accept": accept_with(residual="p")}),
    Mutant("speculative_samples_pass_chi_square_against_target", "resample from p",
           {"speculative_accept": accept_with(residual="p")}),
    Mutant("greedy_speculative_equals_greedy_target", "resample from q",
           {"speculative_accept": accept_with(residual="q")}),
    Mutant("tokens_per_call_match_the_formula", "no stop at the first rejection",
           {"speculative_accept": accept_with(stop=False)}),
    Mutant("speculation_yields_several_tokens_per_target_call", "every draft rejected",
           {"speculative_accept": accept_with(never=True)}),
    Mutant("cached_speculation_equals_greedy_target", "cache rewound one token too far",
           patch=patched(S, "rewind_cache", lambda cache, length: setattr(cache, "length", length - 1))),
    Mutant("int8_error_is_at_most_half_a_step", "round toward zero",
           {"quantize_int8_per_channel": quantize_with(rounding=torch.trunc)}),
    Mutant("per_channel_scales_follow_each_row", "one scale per tensor",
           {"quantize_int8_per_channel": quantize_with(per_tensor=True)}),
    Mutant("int8_weights_take_one_byte_plus_a_scale_per_row", "codes stored as int16",
           {"quantize_int8_per_channel": quantize_with(dtype=torch.int16)}),
    Mutant("int8_weights_barely_change_perplexity", "4-bit levels",
           {"quantize_int8_per_channel": quantize_with(levels=7)}),
]


def test_reference_options_reproduce_the_references():
    ex = get_audit("inference").kernel("paged_attention").example()
    torch.testing.assert_close(paged_with()(**ex), M.paged_attention(**ex))
    ex = get_audit("inference").kernel("speculative_accept").example()
    for a, b in zip(accept_with()(**ex), M.speculative_accept(**ex)):
        assert torch.equal(a, b)
    W = torch.randn(5, 7)
    for a, b in zip(quantize_with()(W), M.quantize_int8_per_channel(W)):
        assert torch.equal(a, b)


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("inference", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("inference", MUTANTS)


def test_chi_square_pools_small_cells_and_matches_known_values():
    stat, dof, p = M.chi_square_test(torch.tensor([10.0, 10, 10, 10]), torch.tensor([10.0, 10, 10, 10]))
    assert (stat, dof, p) == (0.0, 3, 1.0)
    stat, dof, p = M.chi_square_test(torch.tensor([18.0, 22, 30, 30]), torch.tensor([25.0, 25, 25, 25]))
    assert dof == 3 and stat == pytest.approx(4.32) and p == pytest.approx(0.2289, abs=1e-4)  # chi2.sf(4.32, 3)
    _, dof, _ = M.chi_square_test(torch.tensor([1.0, 2, 50, 47]), torch.tensor([3.0, 3, 47, 47]))
    assert dof == 2  # the two cells expected at 3 are pooled into one of 6
