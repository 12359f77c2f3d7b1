"""transformer: kernels against slow re-implementations and HF Llama, hypothesis properties, the audit,
one mutant per check."""
from __future__ import annotations

import math
import platform
import sys

import pytest
import torch
from conftest import Mutant, assert_every_check_has_a_mutant, assert_mutant_fails, audit_once, mutant_params, patched
from hypothesis import given, settings
from hypothesis import strategies as st

import modules.transformer.sampling as S
import modules.transformer.transformer as TT
from llmaudit.registry import get_audit
from modules import transformer as M

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_half_precision_keeps_dtype_and_does_not_overflow(dtype):
    x = (torch.randn(4, 8) * 1000).to(dtype)  # x^2 overflows float16
    want = x.double() / x.double().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    for gain in (torch.ones(8), torch.ones(8, dtype=dtype)):  # a float32 gain must not promote the output
        y = M.rms_norm(x, gain)
        assert y.dtype == dtype
        assert torch.allclose(y.double(), want, rtol=1e-2, atol=1e-2)


def test_rms_norm_float32_path_is_unchanged():
    """The model's ordinary path (float32 input and gain) computes weight * x * rsqrt(mean(x^2) + eps)."""
    x, w = torch.randn(3, 5, 16), torch.rand(16) + 0.5
    assert torch.equal(M.rms_norm(x, w, 1e-5), w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)))


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


def test_kv_cache_bytes_llama2_anchors():  # the published Llama-2 configs (HF config.json)
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
def test_parameter_count_of_published_models(name, kwargs, total):  # HF config.json of each model
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


def test_top_k_with_ties_keeps_the_lowest_indices():
    assert torch.isfinite(M.top_k_filter(torch.zeros(1, 10), 3)).flatten().tolist() == [True] * 3 + [False] * 7
    out = M.top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]]), 2)
    assert torch.isfinite(out).flatten().tolist() == [False, True, True, False, False, False]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 4), st.data())
def test_top_k_ties_follow_a_stable_ranking(seed, V, n_values, data):
    k = data.draw(st.integers(1, V))
    row = torch.randint(0, n_values, (V,), generator=torch.Generator().manual_seed(seed)).float()
    ranked = sorted(range(V), key=lambda i: (-row[i].item(), i))  # larger first, then lower index
    assert set(torch.isfinite(M.top_k_filter(row, k)).nonzero().flatten().tolist()) == set(ranked[:k])


def test_top_p_edge_cases():
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0]])
    assert torch.isfinite(M.top_p_filter(logits, 1e-6)).sum() == 1  # only the argmax
    assert torch.isfinite(M.top_p_filter(logits, 1.0)).all()
    peaked = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # float32: the cumulative sum is 1.0 after the first token
    assert torch.equal(M.top_p_filter(peaked, 1.0), peaked)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.floats(0.0, 60.0))
def test_top_p_one_keeps_every_token(seed, V, lead):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(seed))
    logits[:, 0] += lead
    assert torch.equal(M.top_p_filter(logits, 1.0), logits)


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


# --- run() without the engine ----------------------------------------------------------------------


def test_run_is_reproducible_from_its_generator():
    cfg = M.TransformerConfig(steps=3, warmup_steps=1, eval_size=8)
    a, b = (M.run(cfg, torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.history == b.history and a.exact_match == b.exact_match
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_transformer_init_from_a_generator_is_reproducible():
    a, b, c = (M.Transformer(TINY, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert abs(a.lm_head.weight.std().item() - TINY.init_std) < 0.02


# --- The audit -------------------------------------------------------------------------------------


def test_audit_passes_toy():
    r = audit_once("transformer", "toy")
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    assert {c.kind for c in r.checks} == {"invariant", "outcome"}
    assert "kv_cache/max_abs_diff_vs_recompute" in r.series and "exact match" in r.scalars


@pytest.mark.slow
def test_audit_passes_full():
    r = audit_once("transformer", "full", 1)
    assert r.passed, [c for c in r.checks if not c.passed] or r.error
    assert r.check("flop_count_matches_closed_form").passed


def test_same_seed_same_result():
    first, second = audit_once("transformer", "toy", 2), audit_once("transformer", "toy", 2)
    assert first.deterministic_dict() == second.deterministic_dict()


def test_kernel_examples_and_stubs():
    spec = get_audit("transformer")
    for k in spec.kernels:
        out = k.fn(**k.example())
        assert out.shape == next(iter(k.example().values())).shape
        assert "raise NotImplementedError" in k.stub()


def test_other_correct_kernels_pass():
    """Correct implementations written differently from the reference pass every invariant."""
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
        out = logits.masked_fill(probs < threshold, float("-inf"))
        return logits.clone() if p >= 1 else out

    def top_k_by_rank(logits, k):
        rank = torch.argsort(logits, dim=-1, descending=True, stable=True).argsort(dim=-1)
        return logits.masked_fill(rank >= k, float("-inf"))

    def rms_norm_upcast(x, weight, eps=1e-6):
        h = x.double()
        return (weight.double() * h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)).to(x.dtype)

    invariants = [c.name for c in get_audit("transformer").checks_for("toy") if c.kind == "invariant"]
    r = audit_once("transformer", "toy", 0, only=invariants, apply_rope=rope_complex, top_p_filter=top_p_loop_free,
                   top_k_filter=top_k_by_rank, rms_norm=rms_norm_upcast)
    assert r.passed, [(c.name, c.measured_text) for c in r.checks if not c.passed]


# --- Mutants: each breaks the property its check names, on every seed ------------------------------

ref_rope, ref_norm, ref_top_k, ref_top_p = M.apply_rope, M.rms_norm, M.top_k_filter, M.top_p_filter


def rms_sum(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rms_eps_outside(x, weight, eps=1e-6):
    return weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)


def rms_in_half(x, weight, eps=1e-6):  # squares in the input dtype: float16 overflows
    return weight.to(x.dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_gain_dtype(x, weight, eps=1e-6):  # the old reference: a float32 gain promotes half input to float32
    h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_quadratic(x, positions, theta=10000.0):
    return ref_rope(x, positions.double() ** 2 / 7, theta)


def rope_no_minus(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    a = positions.to(x.dtype)[:, None] * inv
    cos, sin = torch.cat([a.cos()] * 2, -1), torch.cat([a.sin()] * 2, -1)
    return x * cos + torch.cat([x[..., d // 2:], x[..., : d // 2]], -1) * sin  # no -x2


def rope_interleaved(x, positions, theta=10000.0):
    d = x.shape[-1]
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return ref_rope(x[..., perm], positions, theta)[..., torch.argsort(perm)]


def rope_restarts_at_zero(x, positions, theta=10000.0):
    return ref_rope(x, positions - positions[0], theta)


def top_k_threshold(offset):
    """Keep every logit >= the (k + offset)-th largest: ties with it survive too (HF, nanoGPT)."""
    def fn(logits, k):
        kth = logits.topk(min(k + offset, logits.shape[-1]), dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))
    return fn


def top_k_torch_topk(logits, k):  # the old reference: which of several ties topk returns is unspecified
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_k_ties_to_highest_index(logits, k):
    return ref_top_k(logits.flip(-1), k).flip(-1)


def top_p_inclusive(logits, p):  # cumsum > p: the token that crosses p is dropped
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = sorted_logits.softmax(-1).cumsum(-1) > p
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))


def top_p_one_too_many(logits, p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    remove = probs.cumsum(-1) - 2 * probs >= p  # the mass before the previous token
    return logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))


def top_p_cumsum_at_one(logits, p):  # the old reference: p = 1 thresholds a cumulative sum that rounds to 1
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    remove = probs.cumsum(dim=-1) - probs >= p
    return logits.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), float("-inf"))


_real_sample = S.sample_next_token


def _sample_with_multiplied_temperature(logits, *, temperature=1.0, **kwargs):
    return _real_sample(logits * temperature * temperature if temperature else logits, temperature=temperature,
                        **kwargs)


def _penalty_always_divides(logits, generated, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, generated, True)
    return torch.where(seen, logits / penalty, logits)


_real_count, _real_flops = TT.count_parameters, TT.forward_flops

MUTANTS = [
    Mutant("rms_norm_output_has_unit_rms", "sum instead of mean", {"rms_norm": rms_sum}),
    Mutant("rms_norm_matches_llama_formula", "eps outside the sqrt", {"rms_norm": rms_eps_outside}),
    Mutant("rms_norm_half_precision_is_computed_in_float32", "squares in float16", {"rms_norm": rms_in_half}),
    Mutant("rms_norm_half_precision_is_computed_in_float32", "gain dtype promotes", {"rms_norm": rms_gain_dtype}),
    Mutant("rope_score_depends_only_on_offset", "angle quadratic in position", {"apply_rope": rope_quadratic}),
    Mutant("rope_preserves_norm", "rotate_half without the minus", {"apply_rope": rope_no_minus}),
    Mutant("rope_matches_half_split_reference", "interleaved pairs", {"apply_rope": rope_interleaved}),
    Mutant("future_tokens_do_not_change_past_logits", "causal mask off by one",
           patch=patched(TT, "causal_mask", lambda q, k: torch.ones(q, k, dtype=torch.bool).tril(k - q + 1))),
    Mutant("kv_cache_matches_full_recompute", "positions restart at 0 with a cache",
           {"apply_rope": rope_restarts_at_zero}),
    Mutant("gqa_with_n_kv_equal_n_heads_is_mha", "kv heads reversed",
           patch=patched(TT, "expand_kv_heads", lambda x, n_rep: x.flip(1) if n_rep == 1
                        else x.repeat_interleave(n_rep, dim=1).flip(1))),
    Mutant("gqa_equals_mha_with_repeated_kv_heads", "kv heads tiled, not interleaved",
           patch=patched(TT, "expand_kv_heads", lambda x, n_rep: x.repeat(1, n_rep, 1, 1))),
    Mutant("top_k_keeps_exactly_k", "threshold at the (k+1)-th", {"top_k_filter": top_k_threshold(1)}),
    Mutant("top_k_ties_keep_lowest_indices", "threshold keeps ties", {"top_k_filter": top_k_threshold(0)}),
    Mutant("top_k_ties_keep_lowest_indices", "torch.topk's tie order", {"top_k_filter": top_k_torch_topk}),
    Mutant("top_k_ties_keep_lowest_indices", "ties to the highest index",
           {"top_k_filter": top_k_ties_to_highest_index}),
    Mutant("top_k_one_samples_the_argmax", "threshold at the (k+1)-th", {"top_k_filter": top_k_threshold(1)}),
    Mutant("top_p_keeps_smallest_nucleus", "inclusive cumsum drops the crossing token",
           {"top_p_filter": top_p_inclusive}),
    Mutant("top_p_keeps_smallest_nucleus", "one token too many", {"top_p_filter": top_p_one_too_many}),
    Mutant("top_p_one_keeps_every_token", "float cumsum at p = 1", {"top_p_filter": top_p_cumsum_at_one}),
    Mutant("top_p_near_zero_keeps_only_the_argmax", "inclusive cumsum empties the row",
           {"top_p_filter": top_p_inclusive}),
    Mutant("temperature_to_zero_is_greedy", "temperature multiplies",
           patch=patched(S, "sample_next_token", _sample_with_multiplied_temperature)),
    Mutant("repetition_penalty_demotes_only_seen_tokens", "negative logits divided",
           patch=patched(S, "apply_repetition_penalty", _penalty_always_divides)),
    Mutant("parameter_count_matches_closed_form", "tied head counted twice",
           patch=patched(TT, "count_parameters",
                         lambda cfg: _real_count(cfg) + cfg.tie_embeddings * cfg.vocab_size * cfg.d_model)),
    Mutant("flop_count_matches_closed_form", "attention FLOPs forgotten", mode="full",
           patch=patched(TT, "forward_flops",
                         lambda cfg, seq_len, batch_size=1, cached=0: _real_flops(cfg, seq_len, batch_size, cached)
                        - 4 * cfg.n_layers * cfg.d_model * seq_len * (cached + seq_len) * batch_size)),
    Mutant("reverse_task_exact_match", "8 optimizer steps", overrides={"steps": "8", "warmup_steps": "2"}),
]


@mutant_params(MUTANTS)
def test_mutant_breaks_its_check(mutant):
    assert_mutant_fails("transformer", mutant)


def test_every_check_has_a_mutant():
    assert_every_check_has_a_mutant("transformer", MUTANTS)


# --- Speed: what a decode step no longer does (the numbers are in scripts/bench.py) ----------------


def _rope_by_formula(x, positions, theta=10000.0):  # the formula of the docstring, computed per call
    d = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=dtype) / d))
    emb = torch.cat([positions.to(dtype)[:, None] * inv_freq] * 2, dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos().to(x.dtype) + torch.cat((-x2, x1), dim=-1) * emb.sin().to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_table_gives_the_formula_bit_for_bit(dtype):
    """The cos/sin table changes nothing: the same bits for positions inside it, past its end (it grows),
    negative or fractional (computed directly), for every dtype."""
    g = torch.Generator().manual_seed(0)
    for positions in (torch.arange(0, 7), torch.arange(500, 530), torch.tensor([3000, 5, 4097]),
                      torch.tensor([-4, 2]), torch.tensor([0.5, 2.0])):
        x = torch.randn(2, 3, len(positions), 16, generator=g).to(dtype)
        for theta in (100.0, 10000.0):
            assert torch.equal(M.apply_rope(x, positions, theta), _rope_by_formula(x, positions, theta))


def test_a_one_token_cached_step_builds_no_causal_mask():
    """A lone query is the newest token and may see every key: decoding must not rebuild a mask."""
    model, calls = _model(), []

    def recording_mask(q_len, k_len):
        calls.append(q_len)
        return torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=k_len - q_len)

    prompt = torch.randint(0, 32, (2, 5))
    with patched(TT, "causal_mask", recording_mask)():
        cached = M.generate(model, prompt, 6)
        assert calls == [5] * TINY.n_layers  # the prefill only
        calls.clear()
        recomputed = M.generate(model, prompt, 6, use_cache=False)
        assert calls == [t for t in range(5, 11) for _ in range(TINY.n_layers)]
    assert torch.equal(cached, recomputed)


def test_generated_tokens_and_logits_can_be_trained_on():
    """generate() runs under inference_mode, but what it returns is an ordinary tensor: a rollout is
    fed back into a training forward and backward."""
    model = _model()
    tokens, logits = M.generate(model, torch.randint(0, 32, (2, 4)), 5, return_logits=True)
    assert not tokens.is_inference() and not logits.is_inference()
    model.train()
    model(tokens).logsumexp(-1).mean().backward()
    assert model.embed_tokens.weight.grad is not None


def test_kv_cache_speedup_reports_medians_and_the_same_tokens():
    model = _model()
    r = M.kv_cache_speedup(model, torch.randint(0, 32, (1, 4)), 12, repeats=3)
    assert r["same_tokens"] and r["seconds_cached"] > 0 and r["seconds_full"] > 0
    assert r["speedup"] == pytest.approx(r["seconds_full"] / r["seconds_cached"]) and r["flop_ratio"] > 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_steady_malloc_pins_glibc_and_the_speedup_says_so():
    assert M.steady_malloc() == "malloc pinned"
    r = M.kv_cache_speedup(_model(), torch.randint(0, 32, (1, 4)), 4)
    assert r["allocator"] == "malloc pinned"
