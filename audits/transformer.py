"""Audit of the tiny Llama (day 5): RMSNorm, RoPE, causality, KV cache, GQA, sampling filters, exact
counts, and a closed loop that learns to reverse digit strings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmaudit.audit import Audit, kernel, max_error, measure
from modules import transformer as M

F64 = torch.float64


def _example_rms_norm() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 3, 8, generator=g), "weight": torch.rand(8, generator=g) + 0.5, "eps": 1e-6}


def _example_rope() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 2, 5, 8, generator=g), "positions": torch.arange(3, 8), "theta": 10000.0}


def _example_logits() -> torch.Tensor:
    return torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 2


KERNELS = [
    kernel(M.rms_norm, example=_example_rms_norm,
           hint="divide by sqrt(mean(x^2) + eps) over the last axis, then multiply by the gain; no mean "
                "subtraction (that is LayerNorm); half precision is normalised in float32 and returned in "
                "its own dtype."),
    kernel(M.apply_rope, example=_example_rope,
           hint="pair dimension i with i + d/2 (half-split, not interleaved); angle = position * "
                "theta^(-2i/d); x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)."),
    kernel(M.top_k_filter, example=lambda: {"logits": _example_logits(), "k": 3}, finite=False,
           hint="rank each row with a stable descending sort and keep the first k; thresholding at the k-th "
                "value keeps every token tied with it, and torch.topk picks tied entries arbitrarily."),
    kernel(M.top_p_filter, example=lambda: {"logits": _example_logits(), "p": 0.9}, finite=False,
           hint="sort descending, softmax, exclusive cumulative sum: drop a token only if the mass BEFORE it "
                "already reaches p, so the token that crosses p is kept; scatter the mask back; p = 1 keeps all."),
]

transformer = Audit("transformer", day=5, title="Tiny Llama: RMSNorm, RoPE, SwiGLU, GQA, KV cache, sampling",
                    config=M.TransformerConfig, kernels=KERNELS, formulas=M.FORMULAS)


def _sharp_config(cfg: M.TransformerConfig, **changes) -> M.ModelConfig:
    """A random model with init_std 0.2, so that logits and attention are far from uniform (a check on
    near-zero logits would pass for anything)."""
    base = dict(vocab_size=32, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta, init_std=0.2)
    return M.ModelConfig(**{**base, **changes})


def _rms(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).mean(-1).sqrt()


# ---- RMSNorm ---------------------------------------------------------------------------------------

@transformer.check("< 1e-5", hint="divide by sqrt(mean(x^2)), a mean over the feature axis (not a sum, not the "
                                  "sequence axis), and multiply by the gain after normalising.")
def rms_norm_output_has_unit_rms(rms_norm, g):
    """RMSNorm rescales each token vector to root-mean-square 1 and only then applies the learned gain
    (rows of RMS 0.5 to 20 with an offset; eps = 1e-6 moves the RMS by at most 2e-6)."""
    scales = torch.logspace(-0.3, 1.3, 64, dtype=F64)[:, None]
    x = torch.randn(64, 48, generator=g, dtype=F64) * scales + torch.randn(64, 1, generator=g, dtype=F64)
    gain = torch.rand(48, generator=g, dtype=F64) + 0.5
    return [(_rms(rms_norm(x, torch.ones(48, dtype=F64), 1e-6)) - 1).abs(),
            (_rms(rms_norm(x, gain, 1e-6) / gain) - 1).abs()]


@transformer.check("< 1e-12", hint="LayerNorm-style centring, or eps added after the sqrt, changes the output when "
                                   "eps is not negligible.")
def rms_norm_matches_llama_formula(rms_norm, g):
    """Llama's RMSNorm has no mean subtraction and no bias, and eps goes inside the square root:
    y = x / sqrt(mean(x^2) + eps) * g, checked with eps = 0.1 on rows of RMS about 0.35."""
    x = torch.randn(16, 48, generator=g, dtype=F64) * 0.3 + 0.2
    gain = torch.rand(48, generator=g, dtype=F64) + 0.5
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.1) * gain
    return max_error(rms_norm(x, gain, 0.1), want)


@transformer.check({"relative_error": "< 0.02", "wrong_dtype": "== 0"},
                   hint="upcast to float32 before squaring (x^2 overflows float16 beyond 256) and cast the result "
                        "back to x's dtype, even when the gain is float32.")
def rms_norm_half_precision_is_computed_in_float32(rms_norm, g):
    """In float16, x^2 overflows beyond |x| = 256, and in either half dtype a mean of squares loses
    precision, so Llama normalises in float32 and casts back: the output is accurate to the dtype's
    rounding (rows of RMS 0.1 to 1000) and keeps x's dtype whatever the gain's."""
    errors, wrong = [], 0
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(32, 64, generator=g) * torch.logspace(-1, 3, 32)[:, None]).to(dtype)  # RMS 0.1 .. 1000
        x64 = x.double()
        for gain in (torch.rand(64, generator=g) + 0.5, (torch.rand(64, generator=g) + 0.5).to(dtype)):
            y = rms_norm(x, gain, 1e-6)
            want = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * gain.double()
            wrong += int(y.dtype != dtype)
            errors.append((y.double() - want).abs().amax(-1) / want.abs().amax(-1))
    return {"relative_error": errors, "wrong_dtype": wrong}


# ---- RoPE ------------------------------------------------------------------------------------------

@transformer.check("< 1e-9", hint="use the same frequencies for q and k and angles linear in the position.")
def rope_score_depends_only_on_offset(apply_rope, cfg, g):
    """RoPE rotates q and k by angles proportional to their positions, so their dot product sees only
    the relative position: <R_m q, R_n k> = <R_(m+s) q, R_(n+s) k> (relative to |q||k|)."""
    hd = cfg.d_model // cfg.n_heads
    q, k = (torch.randn(1, 1, 1, hd, generator=g, dtype=F64) for _ in range(2))
    m, n = torch.randint(0, 2048, (256,), generator=g), torch.randint(0, 2048, (256,), generator=g)
    shift = torch.randint(-1000, 1000, (256,), generator=g)
    shift = torch.maximum(shift, -torch.minimum(m, n))  # keep positions >= 0

    def rotated(v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return apply_rope(v.expand(1, 1, len(pos), hd), pos, cfg.rope_theta)[0, 0]  # (len(pos), hd)

    dots = (rotated(q, m) * rotated(k, n)).sum(-1)
    shifted = (rotated(q, m + shift) * rotated(k, n + shift)).sum(-1)
    return (dots - shifted).abs() / (q.norm() * k.norm())


@transformer.check("< 1e-12", hint="cos multiplies x, sin multiplies rotate_half(x) = cat(-x2, x1); a missing minus "
                                   "sign or mismatched halves is no longer a rotation.")
def rope_preserves_norm(apply_rope, cfg, g):
    """Each pair of dimensions is rotated, and rotations do not change a vector's length."""
    hd = cfg.d_model // cfg.n_heads
    x = torch.randn(2, 3, 40, hd, generator=g, dtype=F64)
    pos = torch.randint(0, 4096, (40,), generator=g)
    return (apply_rope(x, pos, cfg.rope_theta).norm(dim=-1) - x.norm(dim=-1)).abs() / x.norm(dim=-1)


@transformer.check("< 1e-9", hint="interleaved pairs, a hard-coded theta or positions starting at 1 all break this.")
def rope_matches_half_split_reference(apply_rope, cfg, g):
    """HF Llama pairs dimension i with i + d/2 and rotates it by position * theta^(-2i/d) (theta 1e4 for
    Llama-2, 5e5 for Llama-3); Meta's interleaved pairs (2i, 2i+1) give the same model only after
    permuting the q/k weight rows."""
    hd = cfg.d_model // cfg.n_heads
    x = torch.randn(2, 3, 40, hd, generator=g, dtype=F64)
    pos = torch.randint(0, 4096, (40,), generator=g)
    errors = []
    for theta in (10000.0, 500000.0):
        omega = theta ** (-torch.arange(0, hd, 2, dtype=F64) / hd)  # (hd/2,)
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])  # pair i with i + d/2
        z = z * torch.polar(torch.ones_like(omega), pos.to(F64)[:, None] * omega)
        errors.append(max_error(apply_rope(x, pos, theta), torch.cat([z.real, z.imag], dim=-1)))
    return errors


# ---- The model: causality, KV cache, GQA -----------------------------------------------------------

@transformer.fixture
def sharp_model(cfg, g, rms_norm, apply_rope):
    """A random float32 model with sharp logits, built on the kernels under audit."""
    return M.Transformer(_sharp_config(cfg), rope_fn=apply_rope, norm_fn=rms_norm, generator=g).eval()


@transformer.check("< 1e-6", hint="query i may see key j only if j <= i; anything that mixes across the sequence "
                                  "axis (a norm or softmax over the wrong axis) also leaks the future.")
def future_tokens_do_not_change_past_logits(sharp_model, g):
    """The causal mask lets position t attend only to positions <= t, so a decoder can be trained on all
    next-token predictions of a sequence in one pass."""
    V = sharp_model.cfg.vocab_size
    tokens = torch.randint(0, V, (4, 24), generator=g)
    leaks = []
    with torch.no_grad():
        logits = sharp_model(tokens)
        for t0 in (1, 8, 16, 23):
            changed = tokens.clone()
            changed[:, t0:] = torch.randint(0, V, (4, 24 - t0), generator=g)
            leaks.append(max_error(sharp_model(changed)[:, :t0], logits[:, :t0]))
    return leaks


@transformer.check("< 1e-5", hint="new tokens must get positions starting at the cache length (not 0) in RoPE, and "
                                  "keys are cached after the rotation.")
def kv_cache_matches_full_recompute(sharp_model, cfg, ctx, g):
    """Cached keys and values of earlier tokens never change, so decoding one token at a time with a KV
    cache gives the logits of re-running the whole sequence (float32, logits of std about 1)."""
    prompt = torch.randint(0, sharp_model.cfg.vocab_size, (4, 8), generator=g)
    seq, step_logits = M.generate(sharp_model, prompt, cfg.decode_steps, return_logits=True)
    with torch.no_grad():
        full = sharp_model(seq[:, :-1])[:, prompt.shape[1] - 1:]  # the logits that predicted each new token
    per_step = (step_logits - full).abs().amax(dim=(0, 2))
    ctx.series("kv_cache/max_abs_diff_vs_recompute", per_step, x_label="decode step", smooth=False,
               label="KV cache against full recompute", y_label="max abs logit difference")
    return measure(per_step, f"{cfg.decode_steps} decode steps")


@transformer.check("< 1e-10", hint="scale scores by 1/sqrt(head_dim), mask before the softmax, and keep the head "
                                   "order when splitting and merging heads.")
def gqa_with_n_kv_equal_n_heads_is_mha(apply_rope, cfg, g):
    """With as many KV heads as query heads every query head has its own keys and values: GQA reduces to
    ordinary multi-head attention (torch's scaled_dot_product_attention, float64; one attention layer)."""
    mha = M.Transformer(_sharp_config(cfg, n_kv_heads=cfg.n_heads), rope_fn=apply_rope, generator=g).double()
    attn = mha.layers[0].self_attn
    B, T, H, hd = 2, 12, cfg.n_heads, cfg.d_model // cfg.n_heads
    x = torch.randn(B, T, cfg.d_model, generator=g, dtype=F64)
    positions = torch.arange(T)
    with torch.no_grad():
        q, k, v = (proj(x).view(B, T, H, hd).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * hd)
        return max_error(attn(x, positions), attn.o_proj(sdpa))


@transformer.check("< 1e-10", hint="expand KV heads with repeat_interleave (head j // rep), not tile/repeat "
                                   "(head j % n_kv).")
def gqa_equals_mha_with_repeated_kv_heads(rms_norm, apply_rope, cfg, g):
    """In GQA query head j reads KV head j // (n_heads / n_kv_heads): it equals MHA whose key/value
    projections are copied across each group, with n_heads / n_kv_heads times less KV cache."""
    gqa = M.Transformer(_sharp_config(cfg), rope_fn=apply_rope, norm_fn=rms_norm, generator=g).double()
    wide = M.Transformer(_sharp_config(cfg, n_kv_heads=cfg.n_heads), rope_fn=apply_rope, norm_fn=rms_norm).double()
    rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (K hd, d) -> (H hd, d), head j -> j // rep
            state[name] = w.view(cfg.n_kv_heads, hd, -1).repeat_interleave(rep, dim=0).reshape(cfg.n_heads * hd, -1)
    wide.load_state_dict(state)
    tokens = torch.randint(0, 32, (4, 24), generator=g)
    with torch.no_grad():
        return max_error(gqa(tokens), wide(tokens))


# ---- Sampling filters --------------------------------------------------------------------------------

@transformer.fixture
def logit_rows(cfg, g):
    """(n_rows, 50) float32 logits with scales from 0.5 to 4.5: flat and peaked rows, no ties."""
    return torch.randn(cfg.n_rows, 50, generator=g) * (torch.rand(cfg.n_rows, 1, generator=g) * 4 + 0.5)


def _kept_rows_wrong(rows: torch.Tensor, out: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per row: a kept logit changed, or a kept token below a dropped one."""
    dropped_max = rows.masked_fill(kept, float("-inf")).amax(-1)
    kept_min = rows.masked_fill(~kept, float("inf")).amin(-1)
    changed = (out != rows).logical_and(kept).any(-1)
    return changed | (kept_min < dropped_max)


@transformer.check("== 0", hint="mask by the indices of the k largest; `logits < kth_value` with the wrong k keeps "
                                "one too many.")
def top_k_keeps_exactly_k(top_k_filter, logit_rows):
    """Top-k sampling renormalises over exactly the k most likely tokens and leaves their logits as they
    are (k = 1, 3, 10, 50; rows without ties)."""
    bad = 0
    for k in (1, 3, 10, 50):
        out = top_k_filter(logit_rows, k)
        kept = torch.isfinite(out)
        bad += int(((kept.sum(-1) != k) | _kept_rows_wrong(logit_rows, out, kept)).sum())
    return measure(bad, f"bad rows of {4 * logit_rows.shape[0]}")


@transformer.check("== 0", hint="thresholding at the k-th value keeps every tied token, and torch.topk returns an "
                                "arbitrary subset of ties: rank with a stable sort and keep the first k.")
def top_k_ties_keep_lowest_indices(top_k_filter, cfg, g):
    """When the k-th largest logit is tied, the contract keeps exactly k tokens and breaks the tie by
    vocabulary index (lowest first), so the kept set is reproducible (HF and nanoGPT keep all ties)."""
    rows = torch.randint(0, 4, (cfg.n_rows, 24), generator=g).float()  # every row full of ties
    bad = 0
    for k in (1, 5, 12):
        kept = torch.isfinite(top_k_filter(rows, k))
        rank = (rows[:, None, :] > rows[:, :, None]).sum(-1) \
            + ((rows[:, None, :] == rows[:, :, None]) & torch.ones(24, 24, dtype=torch.bool).tril(-1)).sum(-1)
        want = rank < k  # (rows, V): tokens ahead of j are the larger ones and the equal ones of lower index
        bad += int((kept != want).any(-1).sum())
    return measure(bad, f"wrong kept sets of {3 * cfg.n_rows}")


@transformer.check("== 0", hint="top_k = 1 must leave only the argmax finite.")
def top_k_one_samples_the_argmax(top_k_filter, logit_rows, g):
    """With k = 1 only the most likely token survives the filter, so sampling at temperature 1 is
    greedy decoding."""
    drawn = M.sample_next_token(logit_rows, temperature=1.0, top_k=1, generator=g, top_k_fn=top_k_filter)
    return measure(int((drawn != logit_rows.argmax(-1)).sum()), f"draws off the argmax of {logit_rows.shape[0]}")


@transformer.check("== 0", hint="an inclusive cumsum > p mask drops the token that crosses p; shift the mask by one "
                                "(exclusive cumsum) so it is kept.")
def top_p_keeps_smallest_nucleus(top_p_filter, logit_rows, ctx):
    """Nucleus sampling keeps the fewest most-likely tokens whose probabilities add up to at least p, so
    the candidate count adapts to how peaked the distribution is (p = 0.1 .. 0.99, float64 rows)."""
    rows = logit_rows.double()
    probs = rows.softmax(-1)
    bad, sizes = 0, []
    ps = (0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99)
    for p in ps:
        out = top_p_filter(rows, p)
        kept = torch.isfinite(out)
        mass = (probs * kept).sum(-1)
        kept_min = probs.masked_fill(~kept, float("inf")).amin(-1)
        bad += int(((mass < p - 1e-12) | (mass - kept_min >= p + 1e-12) | _kept_rows_wrong(rows, out, kept)).sum())
        sizes.append(kept.sum(-1).double().mean().item())
    ctx.series("sampling/top_p_nucleus_size", sizes, x=list(ps), x_label="top-p threshold p", smooth=False,
               label="nucleus size", y_label="tokens kept (mean per row)")
    return measure(bad, f"bad rows of {len(ps) * rows.shape[0]}")


@transformer.check("== 0", hint="p = 1 is the whole distribution: a float cumulative sum reaches 1.0 before the tail "
                                "when the tail is below its rounding error, so do not threshold it.")
def top_p_one_keeps_every_token(top_p_filter, logit_rows):
    """p = 1 asks for the whole distribution, so no token may be dropped, even when one logit dominates
    so much that the float32 cumulative sum reaches 1.0 after the first token ([30, 0, 0, 0])."""
    peaked = logit_rows.clone()
    peaked[:, 0] += torch.linspace(0.0, 40.0, len(peaked))  # leads of 0 .. 40: the tail underflows the sum
    rows = torch.cat([torch.tensor([[30.0, 0.0, 0.0, 0.0] + [0.0] * 46]), logit_rows, peaked])
    out = top_p_filter(rows, 1.0)
    return measure(int((out != rows).sum()), f"tokens dropped or changed of {rows.numel()}")


@transformer.check("== 0", hint="keep a token while the mass BEFORE it is < p: the most likely token is always kept.")
def top_p_near_zero_keeps_only_the_argmax(top_p_filter, logit_rows):
    """A tiny p is reached by the most likely token alone, so the nucleus is exactly the argmax: top-p
    never empties a row."""
    kept = torch.isfinite(top_p_filter(logit_rows, 1e-6))
    want = torch.zeros_like(kept).scatter_(-1, logit_rows.argmax(-1, keepdim=True), True)
    return measure(int((kept != want).any(-1).sum()), f"rows not reduced to the argmax of {len(kept)}")


# ---- Temperature and repetition penalty (module code) -----------------------------------------------

@transformer.check("== 0", hint="divide the logits by T (multiplying flattens the distribution instead).")
def temperature_to_zero_is_greedy(sharp_model, logit_rows, ctx, g):
    """softmax(z / T) concentrates on the largest logit as T -> 0, so sampling becomes greedy decoding:
    no draw off the argmax at T = 1e-4 (the best logit leads by >= 0.05) and identical 32-token
    generations at T = 1e-6."""
    gapped = logit_rows.clone()
    gapped[torch.arange(len(gapped)), gapped.argmax(-1)] += 0.05
    greedy = gapped.argmax(-1)
    temps = (2.0, 1.0, 0.5, 0.2, 0.1, 0.03, 0.01, 1e-3, 1e-4)
    off = [int((M.sample_next_token(gapped, temperature=t, generator=g) != greedy).sum()) for t in temps]
    ctx.series("sampling/argmax_rate", [1 - o / len(gapped) for o in off], x=list(temps), x_label="temperature T",
               smooth=False, label="draws equal to the argmax", y_label="argmax draws (fraction)")
    prompt = torch.randint(0, sharp_model.cfg.vocab_size, (4, 8), generator=g)
    cold = M.generate(sharp_model, prompt, 32, temperature=1e-6, generator=g)
    differ = int((M.generate(sharp_model, prompt, 32) != cold).sum())
    return measure(off[-1] + differ, f"{off[-1]} draws off the argmax at T=1e-4 (T=1: {off[1]}); "
                                     f"{differ} generated tokens differ at T=1e-6")


@transformer.check("== 0", hint="dividing a negative logit by the penalty raises it, making the repeat MORE likely.")
def repetition_penalty_demotes_only_seen_tokens(g):
    """The CTRL penalty lowers every already-generated token's logit (dividing a positive logit,
    multiplying a negative one) and leaves the rest alone."""
    logits = torch.randn(8, 32, generator=g) * 2
    history = torch.randint(0, 32, (8, 6), generator=g)
    out = M.apply_repetition_penalty(logits, history, 1.3)
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, history, True)
    want = torch.where(logits > 0, logits / 1.3, logits * 1.3)
    wrong = ((out != want) & seen) | ((out != logits) & ~seen) | ((out >= logits) & seen & (logits != 0))
    return measure(int(wrong.sum()), "wrong logits of 256")


# ---- Exact counts (module code) ------------------------------------------------------------------------

@transformer.check({"configs_wrong": "== 0", "llama2_7b_error": "== 0"},
                   hint="a tied lm_head is one matrix, GQA shrinks only k/v, SwiGLU has three matrices.")
def parameter_count_matches_closed_form(cfg, ctx):
    """N = V d (2, or 1 if tied) + L (2 d H hd + 2 d K hd + 3 d d_ff + 2 d) + d: attention, SwiGLU and two
    RMSNorm gains per layer plus the final norm; Llama-2-7B has 6,738,415,616."""
    configs = [_sharp_config(cfg), _sharp_config(cfg, tie_embeddings=True), _sharp_config(cfg, n_kv_heads=1),
               _sharp_config(cfg, n_kv_heads=cfg.n_heads), M.task_model_config(cfg)]
    wrong = sum(M.count_parameters(c) != M.count_model_parameters(M.Transformer(c)) for c in configs)
    llama2_7b = M.count_parameters(M.ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                                                 n_kv_heads=32, d_ff=11008))
    ctx.scalar("parameters (task model)", M.count_parameters(M.task_model_config(cfg)))
    return measure({"configs_wrong": wrong, "llama2_7b_error": abs(llama2_7b - 6_738_415_616)},
                   f"{len(configs)} configs (tied, MQA, GQA, MHA, task); Llama-2-7B {llama2_7b:,}")


@transformer.check("== 0", modes=("full",), hint="count the lm_head but not the embedding lookup; attention costs "
                                                 "grow with the context length S.")
def flop_count_matches_closed_form(cfg, g):
    """Forward FLOPs = 2 x (matmul parameters) per token + 4 L H hd T S for scores and weighted values;
    training is 3x forward (PaLM's 6N + 12 L H hd T), as torch.utils.flop_counter counts them (full
    mode only: the counter imports torch._dynamo, about a second)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = M.Transformer(_sharp_config(cfg), generator=g)
    x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=g)
    counted, formula = [], [M.forward_flops(model.cfg, 16, 2), 3 * M.forward_flops(model.cfg, 16, 2),
                            M.forward_flops(model.cfg, 1, 2, cached=16)]
    with FlopCounterMode(display=False) as fc:
        model(x)
    counted.append(fc.get_total_flops())
    with FlopCounterMode(display=False) as fc:
        model(x).sum().backward()
    counted.append(fc.get_total_flops())
    cache = M.KVCache(model.cfg, 2, 17)
    with torch.no_grad():
        model(x, cache)
        with FlopCounterMode(display=False) as fc:
            model(x[:, :1], cache)
    counted.append(fc.get_total_flops())
    return measure([abs(a - b) for a, b in zip(counted, formula)],
                   f"counted {counted} (forward, forward+backward, one cached step)")


# ---- Closed loop: learn to reverse a digit string ----------------------------------------------------------

@transformer.fixture(cost=30)
def reversal(cfg, ctx, g, rms_norm, apply_rope):
    """M.run: the model trained on reversal with our AdamW + warmup-cosine + clipping, then scored."""
    def on_step(step: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], step, x_label="optimizer step", key=True,
                label="training loss (reversal)", y_label="loss per token (nats)")
        ctx.log("train/learning_rate", record["lr"], step, x_label="optimizer step", smooth=False,
                label="learning rate", y_label="learning rate (AdamW step size)")
        ctx.log("train/grad_norm", record["grad_norm"], step, x_label="optimizer step",
                label="gradient norm before clipping", y_label="gradient L2 norm")
        ctx.progress(step + 1, cfg.steps)

    return M.run(cfg, g, rms_norm=rms_norm, apply_rope=apply_rope, on_step=on_step)


@transformer.check(">= min_exact_match", kind="outcome",
                   hint="a loss stuck near log(10) means attention cannot find positions (RoPE, mask); one answer "
                        "position stuck at chance is the RoPE-base effect in the README (theta too large).")
def reverse_task_exact_match(reversal, cfg):
    """Trained with our AdamW + warmup-cosine + clipping, the model reverses unseen digit strings by
    greedy decoding with the KV cache: exact match on fresh strings (chance is 10^-n_items)."""
    return measure(reversal.exact_match, f"token accuracy {reversal.token_accuracy:.3f}, "
                                         f"final train loss {reversal.history[-1]['loss']:.3f}")


@transformer.report
def headline(ctx, cfg, reversal, g):
    ctx.scalar("exact match", reversal.exact_match)
    ctx.scalar("answer token accuracy", reversal.token_accuracy)
    ctx.scalar("final train loss", reversal.history[-1]["loss"])
    prompt = torch.randint(0, cfg.n_symbols, (1, cfg.n_items + 2), generator=g)
    speed = M.kv_cache_speedup(reversal.model, prompt, cfg.speed_new_tokens, cfg.speed_repeats)
    n, (goal_tokens, goal) = cfg.speed_new_tokens, M.KV_CACHE_SPEEDUP_GOAL
    ctx.scalar(f"kv_cache_speedup_wallclock_{n}_tokens", round(speed["speedup"], 2), timed=True)
    verdict = "met" if speed["speedup"] >= goal else "missed"
    ctx.scalar(f"kv_cache_speedup_goal_{goal_tokens}_tokens",
               f">= {goal:g}x: {verdict} here (median of {cfg.speed_repeats} runs)" if n == goal_tokens
               else f">= {goal:g}x at {goal_tokens} tokens (full mode)", timed=n == goal_tokens)
    ctx.scalar(f"kv_cache_flop_ratio_{n}_tokens", speed["flop_ratio"])
    ctx.scalar("kv_cache_same_tokens", speed["same_tokens"])
