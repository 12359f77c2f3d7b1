"""transformer: kernels against slow re-implementations and HF Llama, hypothesis properties, the audit,
one mutant per check."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_check_fails, audit_once
from hypothesis import given, settings
from hypothesis import strategies as st

import modules.transformer.sampling as S
import modules.transformer.transformer as TT
from modules import transformer as M

FAST = {"steps": "2", "warmup_steps": "1", "eval_size": "8", "speed_new_tokens": "2", "n_rows": "64"}
TINY = M.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88, init_std=0.2)


def _model(cfg: M.ModelConfig = TINY, seed: int = 0, dtype=torch.float32) -> M.Transformer:
    torch.manual_seed(seed)
    return M.Transformer(cfg).to(dtype).eval()


def _slow_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Loop over positions and frequency pairs, rotating (x_i, x_{i+d/2}) by a 2x2 matrix."""
    out = x.clone()
    d = x.shape[-1]
    for t, m in enumerate(positions.tolist()):
        for i in range(d // 2):
            a = m * theta ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = c * x1 - s * x2
            out[..., t, i + d // 2] = s * x1 + c * x2
    return out


# --- RMSNorm ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 64), st.floats(0.1, 100.0))
def test_rms_norm_is_scale_invariant_with_unit_rms(seed, d, c):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, d, generator=g, dtype=torch.float64) + 0.5
    y = M.rms_norm(x, torch.ones(d, dtype=torch.float64), eps=0.0)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(M.rms_norm(c * x, torch.ones(d, dtype=torch.float64), eps=0.0), y, atol=1e-12)


def test_rms_norm_hand_example():  # x = (3, 4): mean square 12.5, eps inside the root
    y = M.rms_norm(torch.tensor([3.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5)
    assert torch.allclose(y, torch.tensor([3.0, 8.0], dtype=torch.float64) / math.sqrt(13.0), atol=1e-15)


def test_rms_norm_keeps_half_precision_dtype():
    x = torch.randn(2, 8).to(torch.bfloat16)
    assert M.rms_norm(x, torch.ones(8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- RoPE ------------------------------------------------------------------------------------------


def test_rope_equals_slow_pairwise_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 3000])
    for theta in (10000.0, 500000.0):
        assert torch.allclose(M.apply_rope(x, pos, theta), _slow_rope(x, pos, theta), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 8), st.integers(0, 5000), st.integers(0, 5000))
def test_rope_rotations_compose_and_invert(seed, half_d, m, n):
    d = 2 * half_d
    x = torch.randn(1, 1, 1, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    at = lambda v, p: M.apply_rope(v, torch.tensor([p]))  # noqa: E731
    assert torch.allclose(at(at(x, m), n), at(x, m + n), atol=1e-9)  # R_n R_m = R_(m+n)
    assert torch.allclose(at(at(x, m), -m), x, atol=1e-9)  # R_-m is the inverse
    assert torch.allclose(at(x, 0), x)  # position 0 is the identity
    assert torch.allclose(at(x, m).norm(), x.norm(), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 4000), st.integers(0, 4000), st.integers(0, 4000))
def test_rope_dot_product_depends_on_offset_only(seed, m, n, s):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64) for _ in range(2))
    dot = lambda a, b: (M.apply_rope(q, torch.tensor([a])) * M.apply_rope(k, torch.tensor([b]))).sum()  # noqa: E731
    assert abs(dot(m, n) - dot(m + s, n + s)) < 1e-9


def test_half_split_equals_interleaved_after_meta_permutation():
    """HF's convert script permutes q/k rows per head: interleaved pairs (2i, 2i+1) -> (i, i + d/2)."""
    d = 8
    x = torch.randn(1, 1, 4, d, dtype=torch.float64)
    pos = torch.arange(4) * 5
    z = torch.view_as_complex(x.reshape(1, 1, 4, d // 2, 2).contiguous())  # Meta: interleaved pairs
    omega = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    meta = torch.view_as_real(z * torch.polar(torch.ones_like(omega), pos[:, None] * omega)).reshape(1, 1, 4, d)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # (x0, x2, .., x1, x3, ..)
    assert torch.allclose(M.apply_rope(x[..., perm], pos), meta[..., perm], atol=1e-12)


# --- Model: causality, cache, GQA ------------------------------------------------------------------


def test_chunked_prefill_and_cache_equal_full_forward():
    model = _model()
    tokens = torch.randint(0, 32, (3, 20))
    full = model(tokens)
    cache = M.KVCache(model.cfg, 3, 20)
    parts = [model(tokens[:, :7], cache), model(tokens[:, 7:12], cache)]
    parts += [model(tokens[:, t:t + 1], cache) for t in range(12, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_generate_with_and_without_cache_agree_and_stop_at_eos():
    model = _model()
    prompt = torch.randint(0, 32, (4, 6))
    a = M.generate(model, prompt, 30, use_cache=True)
    b = M.generate(model, prompt, 30, use_cache=False)
    assert torch.equal(a, b) and a.shape == (4, 36) and torch.equal(a[:, :6], prompt)
    eos = int(a[0, 8])
    c = M.generate(model, prompt, 30, eos_id=eos)
    row = c[0, 6:].tolist()
    assert eos in row and all(t == eos for t in row[row.index(eos):])


def test_cache_size_matches_closed_form_and_gqa_shrinks_it():
    cache = M.KVCache(TINY, batch_size=3, max_len=10)
    assert cache.nbytes == 3 * M.kv_cache_bytes(TINY, 10, bytes_per_elem=4)
    mha = M.ModelConfig(vocab_size=32, d_model=32, n_heads=4, n_kv_heads=4, d_ff=88)
    assert M.kv_cache_bytes(mha, 10) == 2 * M.kv_cache_bytes(TINY, 10)


def test_kv_cache_bytes_llama2_anchors():  # lm-anchors §7
    llama2_7b = M.ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008)
    llama2_70b = M.ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)
    assert M.kv_cache_bytes(llama2_7b, 1) == 524_288
    assert M.kv_cache_bytes(llama2_70b, 1) == 327_680
    assert M.kv_cache_bytes(llama2_70b, 4096) == 1_342_177_280  # 1.25 GiB


@pytest.mark.parametrize("name, kwargs, total", [
    ("Llama-2-7B", dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
     6_738_415_616),
    ("Llama-2-13B", dict(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_ff=13824),
     13_015_864_320),
    ("Llama-2-70B", dict(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672),
     68_976_648_192),
    ("Llama-3-8B", dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
     8_030_261_248),
    ("Mistral-7B", dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336),
     7_241_732_096),
])
def test_parameter_count_of_published_models(name, kwargs, total):  # lm-anchors §3
    assert M.count_parameters(M.ModelConfig(**kwargs)) == total, name


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 1), (4, 2), (4, 4), (2, 2)]), st.booleans(), st.integers(4, 40))
def test_parameter_count_matches_instantiated_model(n_layers, heads, tied, vocab):
    cfg = M.ModelConfig(vocab_size=vocab, d_model=16, n_layers=n_layers, n_heads=heads[0], n_kv_heads=heads[1],
                        d_ff=24, tie_embeddings=tied)
    assert M.count_parameters(cfg) == M.count_model_parameters(M.Transformer(cfg))


def test_forward_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for cfg in (TINY, M.ModelConfig(vocab_size=50, d_model=48, n_layers=1, n_heads=6, n_kv_heads=1, d_ff=64)):
        model = _model(cfg)
        x = torch.randint(0, cfg.vocab_size, (3, 9))
        with FlopCounterMode(display=False) as fc:
            model(x)
        assert fc.get_total_flops() == M.forward_flops(cfg, 9, 3)
        cache = M.KVCache(cfg, 3, 12)
        with torch.no_grad():
            model(x, cache)
            with FlopCounterMode(display=False) as fc:
                model(x[:, :3], cache)
        assert fc.get_total_flops() == M.forward_flops(cfg, 3, 3, cached=9)


def test_tied_embeddings_share_one_matrix():
    model = _model(M.ModelConfig(vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, d_ff=88, tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


# --- Sampling --------------------------------------------------------------------------------------


def _slow_top_p(probs: list[float], p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30), st.floats(0.05, 1.0), st.floats(0.2, 5.0))
def test_top_p_equals_slow_reference(seed, V, p, scale):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    kept = torch.isfinite(M.top_p_filter(logits, p)).nonzero().flatten().tolist()
    probs = logits.softmax(-1).tolist()
    want = _slow_top_p(probs, p)
    mass_before_last = sum(sorted(probs, reverse=True)[: len(want) - 1])
    if abs(mass_before_last - p) > 1e-9:  # away from a float tie at the boundary
        assert set(kept) == want


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.data())
def test_top_k_keeps_the_k_largest(seed, V, data):
    k = data.draw(st.integers(1, V))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(seed))
    out = M.top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    assert torch.equal(out[kept], logits[kept])
    assert (logits.masked_fill(~kept, float("inf")).amin(-1) >= logits.masked_fill(kept, float("-inf")).amax(-1)).all()


def test_top_k_with_ties_keeps_exactly_k():
    assert torch.isfinite(M.top_k_filter(torch.zeros(1, 10), 3)).sum() == 3


def test_top_p_edge_cases():
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0]])
    assert torch.isfinite(M.top_p_filter(logits, 1e-6)).sum() == 1  # only the argmax
    assert torch.isfinite(M.top_p_filter(logits, 1.0)).all()


def test_repetition_penalty_hand_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = M.apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(20000, 4)
    draws = M.sample_next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert (freq - logits[0].double().softmax(-1)).abs().max() < 0.015
    assert torch.equal(M.sample_next_token(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))
    assert torch.equal(M.sample_next_token(logits[:50], temperature=5.0, top_k=1), torch.zeros(50, dtype=torch.long))


# --- HF transformers' LlamaForCausalLM on the same weights (test-only dependency) -----------------


@pytest.mark.parametrize("cfg", [
    TINY,
    M.ModelConfig(vocab_size=40, d_model=48, n_layers=3, n_heads=6, n_kv_heads=6, d_ff=96, rope_theta=500000.0,
                  norm_eps=1e-6, init_std=0.2),
    M.ModelConfig(vocab_size=24, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64, tie_embeddings=True,
                  init_std=0.2),
], ids=["gqa", "mha_theta5e5", "mqa_tied"])
def test_logits_match_hf_llama(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = _model(cfg)
    hf = LlamaForCausalLM(LlamaConfig(**M.hf_config_kwargs(cfg), attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(M.hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff < 1e-5, diff
    assert M.count_model_parameters(ours) == sum(p.numel() for p in hf.parameters())


def test_hf_greedy_generation_with_its_cache_equals_ours():
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = _model()
    hf = LlamaForCausalLM(LlamaConfig(**M.hf_config_kwargs(TINY), attn_implementation="eager")).eval()
    hf.load_state_dict(M.hf_state_dict(ours))
    prompt = torch.randint(0, 32, (2, 5))
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                         pad_token_id=0)
    assert torch.equal(theirs, M.generate(ours, prompt, 20))


def test_rms_norm_and_rope_match_hf_functions():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    norm = LlamaRMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(norm(x), M.rms_norm(x, norm.weight, 1e-5), atol=1e-6)
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    pos = torch.arange(3, 10)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    emb = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)
    hq, hk = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    assert torch.allclose(hq, M.apply_rope(q, pos), atol=1e-6) and torch.allclose(hk, M.apply_rope(k, pos), atol=1e-6)


# --- The audit -------------------------------------------------------------------------------------


def _without_wallclock(result) -> dict:
    return result.deterministic_dict()


def test_audit_passes_toy_and_full():
    r = audit_once("transformer", "toy")
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    for seed in (0, 1):
        r = audit_once("transformer", "full", seed)
        assert r.passed, [c for c in r.checks if not c.passed] or r.error
        assert r.check("flop_count_matches_closed_form").passed


def test_same_seed_same_result():
    first, second = audit_once("transformer", "toy", 2), audit_once("transformer", "toy", 2)
    assert _without_wallclock(first) == _without_wallclock(second)


# --- mutants: each breaks the property its check names -------------------------------------------

ref_rope, ref_norm = M.apply_rope, M.rms_norm


def _fast(**kernels):
    return audit_once("transformer", "toy", 0, overrides=FAST, **kernels)


def test_mutant_rms_sum_instead_of_mean():
    bad = lambda x, weight, eps=1e-6: weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)  # noqa: E731
    assert_check_fails(_fast(rms_norm=bad), "rms_norm_output_has_unit_rms")


def test_mutant_rms_eps_outside_sqrt():
    bad = lambda x, weight, eps=1e-6: weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)  # noqa: E731
    r = _fast(rms_norm=bad)
    assert r.check("rms_norm_output_has_unit_rms").passed  # only the formula check can see it
    assert_check_fails(r, "rms_norm_matches_llama_formula")


def test_mutant_rope_quadratic_angle():
    bad = lambda x, positions, theta=10000.0: ref_rope(x, positions.double() ** 2 / 7, theta)  # noqa: E731
    r = _fast(apply_rope=bad)
    assert r.check("rope_preserves_norm").passed
    assert_check_fails(r, "rope_score_depends_only_on_offset")


def test_mutant_rope_missing_minus_sign():
    def bad(x, positions, theta=10000.0):
        d = x.shape[-1]
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
        a = positions.to(x.dtype)[:, None] * inv
        cos, sin = torch.cat([a.cos()] * 2, -1), torch.cat([a.sin()] * 2, -1)
        return x * cos + torch.cat([x[..., d // 2:], x[..., : d // 2]], -1) * sin  # no -x2

    assert_check_fails(_fast(apply_rope=bad), "rope_preserves_norm")


def test_mutant_rope_interleaved_pairs():
    def interleaved(x, positions, theta=10000.0):
        d = x.shape[-1]
        perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
        return ref_rope(x[..., perm], positions, theta)[..., torch.argsort(perm)]

    r = _fast(apply_rope=interleaved)
    assert r.check("rope_preserves_norm").passed and r.check("rope_score_depends_only_on_offset").passed
    assert_check_fails(r, "rope_matches_half_split_reference")


def test_mutant_causal_mask_off_by_one(monkeypatch):
    monkeypatch.setattr(TT, "causal_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q + 1))
    assert_check_fails(_fast(), "future_tokens_do_not_change_past_logits")


def test_mutant_rope_positions_restart_at_zero_with_cache():
    bad = lambda x, positions, theta=10000.0: ref_rope(x, positions - positions[0], theta)  # noqa: E731
    r = _fast(apply_rope=bad)
    assert r.check("future_tokens_do_not_change_past_logits").passed
    assert_check_fails(r, "kv_cache_matches_full_recompute")


def test_mutant_heads_shuffled(monkeypatch):
    real = TT.expand_kv_heads
    monkeypatch.setattr(TT, "expand_kv_heads", lambda x, n_rep: real(x, n_rep).flip(1))
    assert_check_fails(_fast(), "gqa_with_n_kv_equal_n_heads_is_mha")


def test_mutant_kv_heads_tiled_instead_of_interleaved(monkeypatch):
    monkeypatch.setattr(TT, "expand_kv_heads", lambda x, n_rep: x.repeat(1, n_rep, 1, 1))
    r = _fast()
    assert r.check("gqa_with_n_kv_equal_n_heads_is_mha").passed
    assert_check_fails(r, "gqa_equals_mha_with_repeated_kv_heads")


def test_mutant_top_k_threshold_off_by_one():
    def bad(logits, k):
        kth = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    assert_check_fails(_fast(top_k_filter=bad), "top_k_keeps_exactly_k")


def test_mutant_top_p_drops_the_crossing_token():
    def bad(logits, p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = sorted_logits.softmax(-1).cumsum(-1) > p  # inclusive: the token crossing p is dropped
        return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))

    assert_check_fails(_fast(top_p_filter=bad), "top_p_keeps_smallest_nucleus")


def test_mutant_top_p_keeps_one_too_many():
    def bad(logits, p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - 2 * probs >= p  # mass before the previous token
        return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))

    assert_check_fails(_fast(top_p_filter=bad), "top_p_keeps_smallest_nucleus")


def test_mutant_temperature_multiplies(monkeypatch):
    real = S.sample_next_token

    def bad(logits, *, temperature=1.0, **kwargs):
        return real(logits * temperature * temperature if temperature else logits, temperature=temperature, **kwargs)

    monkeypatch.setattr(S, "sample_next_token", bad)
    monkeypatch.setattr(M, "sample_next_token", bad)
    assert_check_fails(_fast(), "temperature_to_zero_is_greedy")


def test_mutant_repetition_penalty_always_divides(monkeypatch):
    def bad(logits, generated, penalty):
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, generated, True)
        return torch.where(seen, logits / penalty, logits)

    monkeypatch.setattr(M, "apply_repetition_penalty", bad)
    assert_check_fails(_fast(), "repetition_penalty_demotes_only_seen_tokens")


def test_mutant_parameter_count_ignores_tying(monkeypatch):
    real = TT.count_parameters
    untied = lambda cfg: real(cfg) + cfg.tie_embeddings * cfg.vocab_size * cfg.d_model  # noqa: E731
    monkeypatch.setattr(M, "count_parameters", untied)
    assert_check_fails(_fast(), "parameter_count_matches_closed_form")


def test_mutant_flops_forget_attention(monkeypatch):
    real = TT.forward_flops
    monkeypatch.setattr(M, "forward_flops", lambda cfg, seq_len, batch_size=1, cached=0:
                        real(cfg, seq_len, batch_size, cached) - 4 * cfg.n_layers * cfg.d_model * seq_len
                        * (cached + seq_len) * batch_size)
    assert_check_fails(audit_once("transformer", "toy", 0, overrides={**FAST, "flop_counter": "true"}),
                       "flop_count_matches_closed_form")


def test_mutant_too_few_steps_does_not_learn():
    assert_check_fails(audit_once("transformer", "toy", 0, overrides={"steps": "8", "warmup_steps": "2"}),
                       "reverse_task_exact_match")


def test_other_correct_kernels_pass():
    """Correct implementations written differently from the reference must pass every invariant."""
    def rope_complex(x, positions, theta=10000.0):
        d = x.shape[-1]
        omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
        z = z * torch.polar(torch.ones_like(omega), positions.double()[:, None] * omega)
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    def top_p_loop_free(logits, p):
        probs = logits.softmax(-1)
        sorted_probs = probs.sort(-1, descending=True).values
        before = torch.cat([torch.zeros_like(sorted_probs[..., :1]), sorted_probs.cumsum(-1)[..., :-1]], -1)
        threshold = sorted_probs.masked_fill(before >= p, float("inf")).amin(-1, keepdim=True)
        return logits.masked_fill(probs < threshold, float("-inf"))

    r = _fast(apply_rope=rope_complex, top_p_filter=top_p_loop_free,
              rms_norm=lambda x, weight, eps=1e-6: weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))
    assert all(c.passed for c in r.checks if c.kind == "invariant"), [c for c in r.checks if not c.passed]
