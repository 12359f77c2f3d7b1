"""attention: kernels against torch's SDPA and each other, hypothesis properties, the memory meter against
torch's profiler, the audit, and one mutant per check."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import modules.attention.attention as MA
from llmaudit.registry import get_audit
from modules import attention as M

D64 = torch.float64


def _qkv(seed: int, B: int, H: int, Nq: int, Nk: int, d: int, dv: int, dtype=D64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, H, Nq, d, generator=g, dtype=dtype),
            scale * torch.randn(B, H, Nk, d, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, dv, generator=g, dtype=dtype))


@st.composite
def attention_cases(draw):
    """Random shapes, block sizes (ragged last blocks included) and masks: none, causal, causal + window."""
    Nk = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["none", "causal", "window"]))
    return {"seed": draw(st.integers(0, 2**31 - 1)), "B": draw(st.integers(1, 2)), "H": draw(st.integers(1, 3)),
            "Nq": draw(st.integers(1, Nk)), "Nk": Nk, "d": draw(st.integers(1, 16)), "dv": draw(st.integers(1, 16)),
            "block_q": draw(st.integers(1, 20)), "block_k": draw(st.integers(1, 20)), "causal": kind != "none",
            "window": draw(st.integers(1, Nk + 5)) if kind == "window" else None}


def _case_tensors(c, dtype=D64):
    return _qkv(c["seed"], c["B"], c["H"], c["Nq"], c["Nk"], c["d"], c["dv"], dtype)


# --- masks -------------------------------------------------------------------------------------------


def test_causal_mask_is_lower_triangular_and_matches_torch_is_causal():
    assert torch.equal(M.attention_mask(6, 6, causal=True), torch.ones(6, 6, dtype=torch.bool).tril())
    q, k, v = _qkv(0, 1, 2, 6, 6, 4, 3)
    ours = M.scaled_dot_product_attention(q, k, v, M.attention_mask(6, 6, causal=True))
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12)


def test_queries_are_the_last_positions_when_fewer_than_keys():
    mask = M.attention_mask(2, 5, causal=True)  # queries at positions 3 and 4, as when decoding with a cache
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert M.attention_mask(1, 7, causal=True).all()  # one decoding step sees the whole cache


def test_torch_is_causal_is_top_left_aligned_so_decoding_needs_our_mask():
    # torch's is_causal builds tril(ones(Nq, Nk)): with fewer queries than keys the queries are treated as
    # the *first* positions; during decoding with a KV cache they are the last ones (our convention)
    q, k, v = _qkv(0, 1, 1, 2, 5, 4, 4)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(top_left, F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 5).bool().tril()))
    ours = M.scaled_dot_product_attention(q, k, v, M.attention_mask(2, 5, causal=True))
    assert not torch.allclose(ours, top_left)
    assert torch.allclose(ours, M.flash_attention_forward(q, k, v, causal=True, block_k=2), atol=1e-12)


def test_sliding_window_keeps_the_w_most_recent_keys():
    mask = M.attention_mask(8, 8, causal=True, window=3)
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert mask[5].nonzero().flatten().tolist() == [3, 4, 5]
    assert M.attention_mask(4, 4) is None
    with pytest.raises(ValueError):
        M.attention_mask(4, 4, causal=False, window=2)


# --- reference attention --------------------------------------------------------------------------


def test_reference_hand_worked_example():
    # one query, two keys with scores 0 and ln 3 after scaling: weights 1/4, 3/4
    d = 4
    q = torch.zeros(1, 1, 1, d, dtype=D64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, d, dtype=D64)
    k[0, 0, 1, 0] = math.log(3.0) * math.sqrt(d)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=D64)
    assert torch.allclose(M.scaled_dot_product_attention(q, k, v), torch.tensor([[[[0.25, 0.75]]]], dtype=D64))


@settings(max_examples=60, deadline=None)
@given(attention_cases())
def test_reference_matches_torch_sdpa(c):
    q, k, v = _case_tensors(c)
    mask = M.attention_mask(c["Nq"], c["Nk"], c["causal"], c["window"])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(M.scaled_dot_product_attention(q, k, v, mask), want, atol=1e-12, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12), st.integers(1, 12))
def test_reference_with_an_arbitrary_boolean_mask_matches_torch(seed, Nq, Nk):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(seed, 2, 2, Nq, Nk, 5, 3)
    mask = torch.rand(2, 1, Nq, Nk, generator=g) < 0.5
    mask[..., 0] = True  # every row sees at least one key
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(M.scaled_dot_product_attention(q, k, v, mask), want, atol=1e-12, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 20))
def test_attention_without_mask_ignores_the_order_of_keys(seed, Nk):
    q, k, v = _qkv(seed, 1, 2, 5, Nk, 4, 3)
    perm = torch.randperm(Nk, generator=torch.Generator().manual_seed(seed))
    for attend in (M.scaled_dot_product_attention, lambda q, k, v: M.flash_attention_forward(q, k, v, block_k=3)):
        assert torch.allclose(attend(q, k, v), attend(q, k[:, :, perm], v[:, :, perm]), atol=1e-12)


# --- tiled forward ---------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(attention_cases())
def test_flash_matches_reference_and_torch(c):
    q, k, v = _case_tensors(c)
    mask = M.attention_mask(c["Nq"], c["Nk"], c["causal"], c["window"])
    out = M.flash_attention_forward(q, k, v, c["causal"], c["window"], c["block_q"], c["block_k"])
    assert out.shape == (c["B"], c["H"], c["Nq"], c["dv"]) and out.dtype == q.dtype
    assert torch.allclose(out, M.scaled_dot_product_attention(q, k, v, mask), atol=1e-12, rtol=0)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_flash_in_float32_agrees_within_float32_rounding(c):
    q, k, v = _case_tensors(c, torch.float32)
    mask = M.attention_mask(c["Nq"], c["Nk"], c["causal"], c["window"])
    out = M.flash_attention_forward(q, k, v, c["causal"], c["window"], c["block_q"], c["block_k"])
    assert out.dtype == torch.float32
    assert torch.allclose(out, M.scaled_dot_product_attention(q, k, v, mask), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_window_covering_the_sequence_equals_causal(c):
    q, k, v = _case_tensors(c)
    causal = M.flash_attention_forward(q, k, v, True, None, c["block_q"], c["block_k"])
    for w in (c["Nk"], c["Nk"] + 1, 10 * c["Nk"]):
        assert torch.equal(M.flash_attention_forward(q, k, v, True, w, c["block_q"], c["block_k"]), causal)


@settings(max_examples=30, deadline=None)
@given(attention_cases())
def test_identity_values_read_out_the_attention_matrix(c):
    q, k, _ = _case_tensors(c)
    eye = torch.eye(c["Nk"], dtype=D64).expand(c["B"], c["H"], -1, -1)
    P = M.flash_attention_forward(q, k, eye, c["causal"], c["window"], c["block_q"], c["block_k"])
    mask = M.attention_mask(c["Nq"], c["Nk"], c["causal"], c["window"])
    scores = q @ k.transpose(-2, -1) / math.sqrt(c["d"])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    assert torch.allclose(P, torch.softmax(scores, -1), atol=1e-12)
    assert torch.allclose(P.sum(-1), torch.ones((), dtype=D64), atol=1e-12)
    if mask is not None:
        assert (P.masked_select(~mask.expand_as(P)) == 0).all()


def test_window_of_one_returns_each_positions_own_value():
    q, k, v = _qkv(3, 2, 2, 9, 9, 4, 5)
    assert torch.allclose(M.flash_attention_forward(q, k, v, True, 1, 4, 3), v, atol=1e-12)


def test_huge_scores_do_not_overflow_in_float32():
    q, k, v = _qkv(1, 1, 2, 33, 33, 8, 4, torch.float32, scale=30.0)  # scores of order 1e3: e^s overflows
    out = M.flash_attention_forward(q, k, v, True, None, 8, 8)
    ref = M.scaled_dot_product_attention(q, k, v, M.attention_mask(33, 33, True))
    assert torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-5)


def test_window_requires_causal():
    q, k, v = _qkv(0, 1, 1, 4, 4, 2, 2)
    with pytest.raises(ValueError):
        M.flash_attention_forward(q, k, v, causal=False, window=2)


# --- online softmax --------------------------------------------------------------------------------


def _states(seed: int, rows: int, n: int, dv: int, p_masked: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    scores = 4 * torch.randn(rows, n, generator=g, dtype=D64)
    scores = scores.masked_fill(torch.rand(rows, n, generator=g) < p_masked, float("-inf"))
    return scores, torch.randn(n, dv, generator=g, dtype=D64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 30), st.integers(1, 5), st.data())
def test_merging_split_states_equals_the_full_softmax(seed, rows, n, dv, data):
    scores, v = _states(seed, rows, n, dv)
    scores[:, 0] = 0.0  # every row has one allowed key
    cut = data.draw(st.integers(1, n - 1))
    m, l, acc = M.merge_softmax_states(*M.softmax_state(scores[:, :cut], v[:cut]),
                                       *M.softmax_state(scores[:, cut:], v[cut:]))
    assert torch.allclose(acc / l[:, None], torch.softmax(scores, -1) @ v, atol=1e-12)
    assert torch.allclose(m + l.log(), torch.logsumexp(scores, -1), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 24))
def test_merge_is_commutative_and_associative(seed, n):
    scores, v = _states(seed, 4, n, 3)
    a, b, c = (M.softmax_state(scores[:, s], v[s]) for s in (slice(0, n // 3), slice(n // 3, 2 * n // 3),
                                                              slice(2 * n // 3, n)))
    ab_c = M.merge_softmax_states(*M.merge_softmax_states(*a, *b), *c)
    a_bc = M.merge_softmax_states(*a, *M.merge_softmax_states(*b, *c))
    c_ba = M.merge_softmax_states(*c, *M.merge_softmax_states(*b, *a))
    for x, y in ((ab_c, a_bc), (ab_c, c_ba)):
        assert torch.equal(x[0], y[0])  # the max is exact
        assert torch.allclose(x[1], y[1], atol=1e-12) and torch.allclose(x[2], y[2], atol=1e-12)


def test_empty_state_is_the_identity_and_never_nan():
    scores, v = _states(0, 3, 6, 2)
    scores[1] = float("-inf")  # row 1 sees no key in this block
    state = M.softmax_state(scores, v)
    assert state[0][1] == float("-inf") and state[1][1] == 0 and (state[2][1] == 0).all()
    empty = M.empty_softmax_state((3,), 2, D64)
    for merged in (M.merge_softmax_states(*empty, *state), M.merge_softmax_states(*state, *empty)):
        for got, want in zip(merged, state):
            assert torch.equal(got, want)
    both_empty = M.merge_softmax_states(*empty, *empty)
    assert not any(t.isnan().any() for t in both_empty)
    assert (both_empty[1] == 0).all() and (both_empty[2] == 0).all()


# --- GQA --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4))
def test_repeat_kv_is_repeat_interleave(seed, H_kv, n_rep):
    x = torch.randn(2, H_kv, 5, 3, generator=torch.Generator().manual_seed(seed))
    out = M.repeat_kv(x, n_rep)
    assert torch.equal(out, torch.repeat_interleave(x, n_rep, dim=1))
    for h in range(H_kv * n_rep):
        assert torch.equal(out[:, h], x[:, h // n_rep])


def test_gqa_matches_torch_enable_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 11, 4, generator=g, dtype=D64)
    k, v = (torch.randn(2, 2, 11, 4, generator=g, dtype=D64) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = M.attention_mask(11, 11, causal=True)
    got = M.scaled_dot_product_attention(q, M.repeat_kv(k, 4), M.repeat_kv(v, 4), mask)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(M.flash_attention_forward(q, M.repeat_kv(k, 4), M.repeat_kv(v, 4), True, None, 3, 5),
                          want, atol=1e-12)


# --- the memory meter -------------------------------------------------------------------------------


def test_peak_memory_counts_allocations_and_frees():
    n = 1000
    x = torch.ones(n)  # created before the meter: not counted

    def work():
        a = x * 2  # +4n
        b = a + 1  # +4n (peak 8n)
        del a  # -4n
        c = b[10:]  # a view: nothing
        c.mul_(3)  # in place: nothing
        d = torch.empty(3 * n)  # +12n (peak 16n)
        del d
        return b

    assert M.peak_memory_bytes(work) == 16 * n
    assert M.peak_memory_bytes(lambda: x[5:].view(-1, 5).t()) == 0  # views of an input allocate nothing


class _PassThrough(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _profiler_peak(fn) -> int:
    """Peak of torch.profiler's CPU allocator events (allocations positive, frees negative), with a
    pass-through dispatch mode so that the same kernels run as under PeakMemory."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with _PassThrough():
            fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("n", [128, 512])
def test_peak_memory_agrees_with_torch_profiler(n):
    q, k, v = _qkv(0, 1, 1, n, n, 32, 32, torch.float32)
    runs = [lambda: M.scaled_dot_product_attention(q, k, v, M.attention_mask(n, n, True)),
            lambda: M.flash_attention_forward(q, k, v, True, None, 64, 64)]
    for fn in runs:
        assert M.peak_memory_bytes(fn) == _profiler_peak(fn)


def test_reference_memory_is_dominated_by_the_score_matrix():
    n = 512
    q, k, v = _qkv(0, 1, 1, n, n, 16, 16, torch.float32)
    peak = M.peak_memory_bytes(lambda: M.scaled_dot_product_attention(q, k, v, M.attention_mask(n, n, True)))
    assert peak >= 2 * 4 * n * n  # at least two float32 (N, N) tensors alive at once (scores, probabilities)
    tiled = M.peak_memory_bytes(lambda: M.flash_attention_forward(q, k, v, True, None, 64, 64))
    assert tiled < 4 * (4 * n * 16 + 4 * 64 * 64) + 4 * 3 * n  # a few (N, d) states and (64, 64) tiles


def test_doubling_exponents_of_linear_and_quadratic_sequences():
    lens = [256, 512, 1024, 2048]
    linear = M.doubling_exponents([5000 + 3 * n for n in lens])
    assert all(0 < e < 1 for e in linear) and linear == sorted(linear)  # -> 1 as the N term dominates
    assert M.doubling_exponents([3 * n * n for n in lens]) == pytest.approx([2.0] * 3)
    # two linear phases (a loop peak, then a larger end peak) never exceed 1, unlike the increment ratio
    assert max(M.doubling_exponents([max(300_000 + 72 * n, 150 * n) for n in [256, 512, 1024, 2048, 4096]])) <= 1
    assert M.doubling_exponents([7] * 4) == [0.0] * 3


def test_config_rejects_a_sweep_that_is_not_doubling():
    with pytest.raises(ValueError):
        M.AttentionConfig(memory_min_len=256, memory_max_len=3000)
    with pytest.raises(ValueError):
        M.AttentionConfig(gqa_heads=8, gqa_kv_heads=3)
    assert M.AttentionConfig().memory_seq_lens == [256, 512, 1024, 2048, 4096]


# --- the experiment: memory sweep -------------------------------------------------------------------


def test_run_reports_linear_tiled_and_quadratic_reference_memory():
    r = M.run(M.AttentionConfig(), torch.Generator().manual_seed(0))
    assert r.seq_lens == [256, 512, 1024, 2048, 4096]
    assert max(r.flash_exponents) < 0.5 and r.reference_exponents == pytest.approx([2.0] * 4)
    assert r.reference_peaks[-1] == 160 * 2**20  # scores + masked copy (64 MiB each) + mask and ~mask
    assert r.flash_peaks[-1] - r.flash_peaks[-2] == 2048 * 16 * 4  # grows by the output only
    assert r.ratio > 250 and max(r.tile_units) < 4


def test_extra_memory_in_tiles_by_hand():
    # N = 100, d = 8, tiles 10 x 20: output 800 elements; budget 200 + 100 * 10 = 1200 elements
    assert M.extra_memory_in_tiles([4 * (800 + 1200)], [100], 8, 10, 20) == [1.0]


# --- the audit ---------------------------------------------------------------------------------------


def test_audit_passes_toy():
    r = audit_once("attention", "toy")
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    assert {c.kind for c in r.checks} == {"invariant", "outcome"}
    assert r.scalars["memory ratio at N=4096"] >= 100


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_audit_passes_full(seed):
    r = audit_once("attention", "full", seed)
    assert r.passed, [c for c in r.checks if not c.passed] or r.error


def test_same_seed_same_result():
    first, again = audit_once("attention", "toy", 3), audit_once("attention", "toy", 3)
    assert first.deterministic_dict() == again.deterministic_dict()


def test_set_overrides_reach_the_audit():
    r = audit_once("attention", overrides={"memory_max_len": "1024", "min_memory_ratio": "5", "n_cases": "8"})
    assert r.passed
    assert "memory ratio at N=1024" in r.scalars
    assert r.check("flash_matches_reference").detail.startswith("8 cases")


def test_memory_checks_name_only_the_kernel_they_measure():
    spec = get_audit("attention")
    assert spec.check_spec("flash_memory_is_bounded_by_the_tile_size").kernels == ("flash_attention_forward",)
    assert spec.check_spec("reference_memory_grows_quadratically").kernels == ()  # module code: the meter


# --- mutants: each breaks the property its check names ------------------------------------------------

ref_sdpa, ref_flash, ref_merge = M.scaled_dot_product_attention, M.flash_attention_forward, M.merge_softmax_states


def sdpa_unscaled(q, k, v, mask=None):
    return ref_sdpa(q * math.sqrt(q.shape[-1]), k, v, mask)


def sdpa_softmax_without_max(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    e = scores.exp()  # no max subtracted: inf / inf past a score of 88.7 in float32
    return (e / e.sum(-1, keepdim=True)) @ v


def sdpa_softmax_over_queries(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-2).nan_to_num() @ v


def flash_variant(*, rescale_acc=True, mask_diagonal=True, guard=True):
    """The reference tiled loop with one step optionally broken."""
    def flash(q, k, v, causal=False, window=None, block_q=64, block_k=64):
        B, H, Nq, d = q.shape
        Nk, offset = k.shape[-2], k.shape[-2] - q.shape[-2]
        out = torch.empty(B, H, Nq, v.shape[-1], dtype=q.dtype)
        for i0 in range(0, Nq, block_q):
            i1 = min(i0 + block_q, Nq)
            m = torch.full((B, H, i1 - i0), float("-inf"), dtype=q.dtype)
            l = torch.zeros(B, H, i1 - i0, dtype=q.dtype)
            acc = torch.zeros(B, H, i1 - i0, v.shape[-1], dtype=q.dtype)
            for j0 in range(0, min(Nk, offset + i1) if causal else Nk, block_k):
                j1 = min(j0 + block_k, Nk)
                s = q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(-2, -1) / math.sqrt(d)
                if causal and mask_diagonal:
                    pos, keys = torch.arange(offset + i0, offset + i1)[:, None], torch.arange(j0, j1)[None, :]
                    ok = (keys <= pos) & ((keys > pos - window) if window is not None else True)
                    s = s.masked_fill(~ok, float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), 0.0, m_new) if guard else m_new
                p, alpha = torch.exp(s - m_safe[..., None]), torch.exp(m - m_safe)
                l = alpha * l + p.sum(-1)
                acc = (alpha[..., None] if rescale_acc else 1.0) * acc + p @ v[:, :, j0:j1]
                m = m_new
            out[:, :, i0:i1] = acc / l[..., None]
        return out
    return flash


def flash_window_replaces_causality(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    if window is None:
        return ref_flash(q, k, v, causal, None, block_q, block_k)
    Nq, Nk = q.shape[-2], k.shape[-2]
    pos, keys = torch.arange(Nk - Nq, Nk)[:, None], torch.arange(Nk)[None, :]
    return ref_sdpa(q, k, v, (keys - pos).abs() < window)  # |p - j| < W: sees the future too


def flash_full_matrix(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    return ref_sdpa(q, k, v, M.attention_mask(q.shape[-2], k.shape[-2], causal, window))


def flash_with_workspace(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    workspace = torch.empty(16 * 2**20)  # 64 MiB "sized for the longest context", whatever N is
    out = ref_flash(q, k, v, causal, window, block_q, block_k)
    del workspace
    return out


def flash_whole_rows(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    """Tiles the queries only: each (block_q, Nk) row block of scores at once, its mask built per block.
    Exact, and linear in N -- but block_q x N, not block_q x block_k."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i0 in range(0, Nq, block_q):
        i1 = min(i0 + block_q, Nq)
        pos, keys = torch.arange(Nk - Nq + i0, Nk - Nq + i1)[:, None], torch.arange(Nk)[None, :]
        allowed = ((keys <= pos) & ((keys > pos - window) if window is not None else True)) if causal else None
        out[:, :, i0:i1] = ref_sdpa(q[:, :, i0:i1], k, v, allowed)
    return out


def flash_whole_columns(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    """Tiles the keys only (every query against one key block): an (Nq, block_k) score tile."""
    return ref_flash(q, k, v, causal, window, q.shape[-2], block_k)


def flash_fa1_order(q, k, v, causal=False, window=None, block_q=64, block_k=64):
    """FlashAttention-1's loop order: key blocks outside, query blocks inside, (m, l, acc) kept for every
    row. A legitimate tiled forward: O(N (d + 2)) state plus one tile."""
    B, H, Nq, d = q.shape
    Nk, offset = k.shape[-2], k.shape[-2] - q.shape[-2]
    m = torch.full((B, H, Nq), float("-inf"), dtype=q.dtype)
    l = torch.zeros(B, H, Nq, dtype=q.dtype)
    acc = torch.zeros(B, H, Nq, v.shape[-1], dtype=q.dtype)
    for j0 in range(0, Nk, block_k):
        j1 = min(j0 + block_k, Nk)
        for i0 in range(0, Nq, block_q):
            i1 = min(i0 + block_q, Nq)
            s = q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(-2, -1) / math.sqrt(d)
            if causal:
                pos, keys = torch.arange(offset + i0, offset + i1)[:, None], torch.arange(j0, j1)[None, :]
                ok = (keys <= pos) & ((keys > pos - window) if window is not None else True)
                s = s.masked_fill(~ok, float("-inf"))
            m_new = torch.maximum(m[:, :, i0:i1], s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p, alpha = torch.exp(s - m_safe[..., None]), torch.exp(m[:, :, i0:i1] - m_safe)
            l[:, :, i0:i1] = alpha * l[:, :, i0:i1] + p.sum(-1)
            acc[:, :, i0:i1] = alpha[..., None] * acc[:, :, i0:i1] + p @ v[:, :, j0:j1]
            m[:, :, i0:i1] = m_new
    return acc / l[..., None]


def merge_without_rescaling(m_a, l_a, acc_a, m_b, l_b, acc_b):
    return torch.maximum(m_a, m_b), l_a + l_b, acc_a + acc_b


def merge_rescaling_only_l(m_a, l_a, acc_a, m_b, l_b, acc_b):
    m, l, _ = ref_merge(m_a, l_a, acc_a, m_b, l_b, acc_b)
    return m, l, acc_a + acc_b


def merge_without_guard(m_a, l_a, acc_a, m_b, l_b, acc_b):
    m = torch.maximum(m_a, m_b)
    a, b = torch.exp(m_a - m), torch.exp(m_b - m)
    return m, a * l_a + b * l_b, a[..., None] * acc_a + b[..., None] * acc_b


def repeat_kv_tiled(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


def repeat_kv_over_sequence(x, n_rep):
    return torch.repeat_interleave(x, n_rep, dim=2)


def sweep_at_the_first_length(attend, seq_lens, head_dim, generator, dtype=torch.float32):
    """A memory sweep whose inputs all have the first length (the loop variable is not used)."""
    return M.memory_sweep(attend, [seq_lens[0]] * len(seq_lens), head_dim, generator, dtype)


MUTANTS = [
    Mutant("reference_matches_torch_sdpa", "no 1/sqrt(d)", {"scaled_dot_product_attention": sdpa_unscaled}),
    Mutant("flash_matches_reference", "acc not rescaled",
           {"flash_attention_forward": flash_variant(rescale_acc=False)}),
    Mutant("flash_matches_reference", "no -inf guard", {"flash_attention_forward": flash_variant(guard=False)}),
    Mutant("softmax_is_stable_for_large_scores", "exp without the row max",
           {"scaled_dot_product_attention": sdpa_softmax_without_max}),
    Mutant("attention_rows_sum_to_one", "softmax over queries",
           {"scaled_dot_product_attention": sdpa_softmax_over_queries}),
    Mutant("masked_keys_get_zero_weight", "diagonal tiles unmasked",
           {"flash_attention_forward": flash_variant(mask_diagonal=False)}),
    Mutant("window_covering_sequence_equals_causal", "window replaces causality",
           {"flash_attention_forward": flash_window_replaces_causality}),
    Mutant("online_softmax_merge_equals_full_softmax", "no rescaling",
           {"merge_softmax_states": merge_without_rescaling}),
    Mutant("online_softmax_merge_equals_full_softmax", "no -inf guard", {"merge_softmax_states": merge_without_guard}),
    Mutant("merge_matches_hand_worked_example", "acc not rescaled", {"merge_softmax_states": merge_rescaling_only_l}),
    Mutant("empty_state_is_the_merge_identity", "no -inf guard", {"merge_softmax_states": merge_without_guard}),
    Mutant("repeat_kv_matches_hand_worked_vector", "repeat, not interleave", {"repeat_kv": repeat_kv_tiled}),
    Mutant("repeat_kv_equals_repeat_interleave", "repeated along the sequence", {"repeat_kv": repeat_kv_over_sequence}),
    Mutant("gqa_repeat_kv_matches_per_group_attention", "repeat, not interleave", {"repeat_kv": repeat_kv_tiled}),
    Mutant("flash_memory_grows_linearly", "full score matrix", {"flash_attention_forward": flash_full_matrix}),
    Mutant("reference_memory_grows_quadratically", "sweep ignores N",
           patch=lambda: mock.patch.object(MA, "memory_sweep", sweep_at_the_first_length)),
    Mutant("flash_peak_memory_far_below_reference", "64 MiB workspace",
           {"flash_attention_forward": flash_with_workspace}),
    Mutant("flash_memory_is_bounded_by_the_tile_size", "whole rows of scores",
           {"flash_attention_forward": flash_whole_rows}),
    Mutant("flash_memory_is_bounded_by_the_tile_size", "whole columns of scores",
           {"flash_attention_forward": flash_whole_columns}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("attention", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("attention", MUTANTS)


def test_flash_variant_is_correct_when_unbroken():  # so that each mutant above breaks exactly one step
    checks = ["flash_matches_reference", "masked_keys_get_zero_weight", "window_covering_sequence_equals_causal"]
    assert audit_once("attention", only=checks, flash_attention_forward=flash_variant()).passed


def test_whole_row_scores_are_exact_and_linear_but_not_tile_bounded():
    """The blind spot the tile check closes: right values, linear growth, a large saving -- and yet
    block_q x N scores at a time."""
    r = audit_once("attention", flash_attention_forward=flash_whole_rows)
    for name in ("flash_matches_reference", "masked_keys_get_zero_weight", "flash_memory_grows_linearly"):
        assert r.check(name).passed, r.check(name)
    assert r.check("flash_memory_is_bounded_by_the_tile_size").measured > 2 * M.AttentionConfig().max_tile_units


def test_fa1_loop_order_is_a_legitimate_tiled_forward():
    r = audit_once("attention", flash_attention_forward=flash_fa1_order)
    assert r.passed, [c for c in r.checks if not c.passed]
