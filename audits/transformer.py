"""Audit of the tiny Llama: RMSNorm, RoPE, causality, KV cache, GQA, sampling filters, counts, a closed loop."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from llmaudit.audit import Context, audit, kernel
from modules import transformer as M


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
                "subtraction (that is LayerNorm)."),
    kernel(M.apply_rope, example=_example_rope,
           hint="pair dimension i with i + d/2 (half-split, not interleaved); angle = position * "
                "theta^(-2i/d); x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1)."),
    kernel(M.top_k_filter, example=lambda: {"logits": _example_logits(), "k": 3},
           hint="take the indices of topk and mask everything else to -inf; thresholding on the k-th value "
                "keeps more than k entries when there are ties."),
    kernel(M.top_p_filter, example=lambda: {"logits": _example_logits(), "p": 0.9},
           hint="sort descending, softmax, exclusive cumulative sum: drop a token only if the mass BEFORE it "
                "already reaches p, so the token that crosses p is kept; scatter the mask back."),
]


def _sharp_model(cfg: M.TransformerConfig, **changes) -> M.ModelConfig:
    """A random model with init_std 0.2 so that logits and attention are far from uniform (a check on
    near-zero logits would pass for anything)."""
    base = dict(vocab_size=32, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta, init_std=0.2)
    return M.ModelConfig(**{**base, **changes})


@audit("transformer", day=5, title="Tiny Llama: RMSNorm, RoPE, SwiGLU, GQA, KV cache, sampling",
       config=M.TransformerConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_transformer(ctx: Context, *, rms_norm=M.rms_norm, apply_rope=M.apply_rope,
                      top_k_filter=M.top_k_filter, top_p_filter=M.top_p_filter) -> None:
    cfg: M.TransformerConfig = ctx.config
    g = ctx.generator(0)
    f64 = torch.float64

    # --- RMSNorm ------------------------------------------------------------------------------
    scales = torch.logspace(-0.3, 1.3, 64, dtype=f64)[:, None]  # rows of RMS 0.5 .. 20
    x = torch.randn(64, 48, generator=g, dtype=f64) * scales + torch.randn(64, 1, generator=g, dtype=f64)
    gain = torch.rand(48, generator=g, dtype=f64) + 0.5
    rms = lambda y: y.pow(2).mean(-1).sqrt()  # noqa: E731
    unit_err = max((rms(rms_norm(x, torch.ones(48, dtype=f64), 1e-6)) - 1).abs().max().item(),
                   (rms(rms_norm(x, gain, 1e-6) / gain) - 1).abs().max().item())
    ctx.check("rms_norm_output_has_unit_rms", unit_err < 1e-5, unit_err, "max |RMS(y / g) - 1| < 1e-5",
              "RMSNorm rescales each token vector to root-mean-square 1 and only then applies the learned gain.",
              hint="divide by sqrt(mean(x^2)), a mean over the feature axis (not a sum, not the sequence "
                   "axis), and multiply by the gain after normalising.")
    small = torch.randn(16, 48, generator=g, dtype=f64) * 0.3 + 0.2  # eps = 0.1 matters at this scale
    want = small / torch.sqrt(small.pow(2).mean(-1, keepdim=True) + 0.1) * gain
    formula_err = (rms_norm(small, gain, 0.1) - want).abs().max().item()
    ctx.check("rms_norm_matches_llama_formula", formula_err < 1e-12, formula_err,
              "max |y - x / sqrt(mean(x^2) + eps) * g| < 1e-12",
              "Llama's RMSNorm has no mean subtraction and no bias, and eps goes inside the square root.",
              hint="LayerNorm-style centring or eps added after the sqrt changes the output when eps "
                   "is not negligible.")

    # --- RoPE ---------------------------------------------------------------------------------
    hd = cfg.d_model // cfg.n_heads
    q = torch.randn(1, 1, 1, hd, generator=g, dtype=f64)
    k = torch.randn(1, 1, 1, hd, generator=g, dtype=f64)
    m = torch.randint(0, 2048, (256,), generator=g)
    n = torch.randint(0, 2048, (256,), generator=g)
    shift = torch.randint(-1000, 1000, (256,), generator=g)
    shift = torch.maximum(shift, -torch.minimum(m, n))  # keep positions >= 0
    rot = lambda v, pos: apply_rope(v.expand(1, 1, len(pos), hd), pos, cfg.rope_theta)[0, 0]  # noqa: E731
    dots = (rot(q, m) * rot(k, n)).sum(-1)
    dots_shifted = (rot(q, m + shift) * rot(k, n + shift)).sum(-1)
    rel_err = ((dots - dots_shifted).abs() / (q.norm() * k.norm())).max().item()
    ctx.check("rope_score_depends_only_on_offset", rel_err < 1e-9, rel_err,
              "max |<R_m q, R_n k> - <R_(m+s) q, R_(n+s) k>| / (|q||k|) < 1e-9",
              "RoPE rotates q and k by angles proportional to their positions, so their dot product sees "
              "only the relative position m - n.",
              hint="use the same frequencies for q and k and angles linear in the position.")
    xs = torch.randn(2, 3, 40, hd, generator=g, dtype=f64)
    pos = torch.randint(0, 4096, (40,), generator=g)
    norm_err = ((apply_rope(xs, pos, cfg.rope_theta).norm(dim=-1) - xs.norm(dim=-1)).abs()
                / xs.norm(dim=-1)).max().item()
    ctx.check("rope_preserves_norm", norm_err < 1e-12, norm_err, "max relative |‖R x‖ - ‖x‖| < 1e-12",
              "Each pair of dimensions is rotated, and rotations do not change vector length.",
              hint="cos multiplies x, sin multiplies rotate_half(x) = cat(-x2, x1); a missing minus sign "
                   "or mismatched halves is no longer a rotation.")
    ref_err = 0.0
    for theta in (10000.0, 500000.0):  # Llama-2 and Llama-3 bases
        omega = theta ** (-torch.arange(0, hd, 2, dtype=f64) / hd)  # (hd/2,)
        z = torch.complex(xs[..., : hd // 2], xs[..., hd // 2:])  # pair i with i + d/2
        z = z * torch.polar(torch.ones_like(omega), pos.to(f64)[:, None] * omega)
        ref = torch.cat([z.real, z.imag], dim=-1)
        ref_err = max(ref_err, (apply_rope(xs, pos, theta) - ref).abs().max().item())
    ctx.check("rope_matches_half_split_reference", ref_err < 1e-9, ref_err,
              "max |RoPE(x) - complex rotation of (x_i, x_(i+d/2))| < 1e-9 for theta 1e4 and 5e5",
              "HF Llama pairs dimension i with i + d/2 and rotates it by position * theta^(-2i/d); Meta's "
              "interleaved pairs (2i, 2i+1) give the same model only after permuting q/k weights.",
              hint="interleaved pairs, a hard-coded theta or positions starting at 1 all break this.")
    ctx.progress(0.1)

    # --- Causality and the KV cache ------------------------------------------------------------
    model = M.Transformer(_sharp_model(cfg), rope_fn=apply_rope, norm_fn=rms_norm).eval()
    V = model.cfg.vocab_size
    with torch.no_grad():
        tokens = torch.randint(0, V, (4, 24), generator=g)
        logits = model(tokens)
        leak = 0.0
        for t0 in (1, 8, 16, 23):
            changed = tokens.clone()
            changed[:, t0:] = torch.randint(0, V, (4, 24 - t0), generator=g)
            leak = max(leak, (model(changed)[:, :t0] - logits[:, :t0]).abs().max().item())
    ctx.check("future_tokens_do_not_change_past_logits", leak < 1e-6, leak,
              "max |Δ logits[:t]| < 1e-6 when tokens >= t change",
              "The causal mask lets position t attend only to positions <= t, so a decoder can be trained "
              "on all next-token predictions of a sequence in one pass.",
              hint="query i may see key j only if j <= i; anything that mixes across the sequence axis "
                   "(a norm or softmax over the wrong axis) also leaks the future.")

    prompt = torch.randint(0, V, (4, 8), generator=g)
    seq, step_logits = M.generate(model, prompt, cfg.decode_steps, return_logits=True)
    with torch.no_grad():
        full = model(seq[:, :-1])[:, prompt.shape[1] - 1:]  # the logits that predicted each new token
    per_step = (step_logits - full).abs().amax(dim=(0, 2))
    cache_err = per_step.max().item()
    ctx.check("kv_cache_matches_full_recompute", cache_err < 1e-5, cache_err,
              f"max |logits_cached - logits_full| < 1e-5 over {cfg.decode_steps} steps",
              "Cached keys and values of earlier tokens never change, so decoding one token at a time with "
              "a KV cache gives the same logits as re-running the whole sequence.",
              hint="new tokens must get positions starting at the cache length (not 0) in RoPE, and keys "
                   "are cached after the rotation.")
    ctx.series("kv_cache/max_abs_diff_vs_recompute", per_step, x_label="decode step", smooth=False)
    ctx.progress(0.2)

    # --- GQA ----------------------------------------------------------------------------------
    mha = M.Transformer(_sharp_model(cfg, n_kv_heads=cfg.n_heads), rope_fn=apply_rope, norm_fn=rms_norm).double()
    attn = mha.layers[0].self_attn
    xa = torch.randn(2, 12, cfg.d_model, generator=g, dtype=f64)
    positions = torch.arange(12)
    B, T, H = 2, 12, cfg.n_heads
    with torch.no_grad():
        qh = apply_rope(attn.q_proj(xa).view(B, T, H, hd).transpose(1, 2), positions, cfg.rope_theta)
        kh = apply_rope(attn.k_proj(xa).view(B, T, H, hd).transpose(1, 2), positions, cfg.rope_theta)
        vh = attn.v_proj(xa).view(B, T, H, hd).transpose(1, 2)
        sdpa = attn.o_proj(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
                           .reshape(B, T, H * hd))
        mha_err = (attn(xa, positions) - sdpa).abs().max().item()
    ctx.check("gqa_with_n_kv_equal_n_heads_is_mha", mha_err < 1e-10, mha_err,
              "max |attention - torch SDPA multi-head attention| < 1e-10 (float64)",
              "With as many KV heads as query heads every query head has its own keys and values: GQA "
              "reduces to ordinary multi-head attention.",
              hint="scale scores by 1/sqrt(head_dim), mask before the softmax, and keep the head order "
                   "when splitting and merging heads.")

    gqa = M.Transformer(_sharp_model(cfg), rope_fn=apply_rope, norm_fn=rms_norm).double()
    wide = M.Transformer(_sharp_model(cfg, n_kv_heads=cfg.n_heads), rope_fn=apply_rope, norm_fn=rms_norm).double()
    rep = cfg.n_heads // cfg.n_kv_heads
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (K hd, d) -> (H hd, d), head j -> j // rep
            state[name] = w.view(cfg.n_kv_heads, hd, -1).repeat_interleave(rep, dim=0).reshape(cfg.n_heads * hd, -1)
    wide.load_state_dict(state)
    with torch.no_grad():
        gqa_err = (gqa(tokens) - wide(tokens)).abs().max().item()
    ctx.check("gqa_equals_mha_with_repeated_kv_heads", gqa_err < 1e-10, gqa_err,
              "max |logits_GQA - logits_MHA(kv weights repeated)| < 1e-10 (float64)",
              f"In GQA query head j reads KV head j // {rep}: it equals MHA whose key/value projections are "
              "copied across each group, with n_heads / n_kv_heads times less KV cache.",
              hint="expand KV heads with repeat_interleave (head j // rep), not tile/repeat (head j % n_kv).")
    ctx.progress(0.3)

    # --- Sampling -----------------------------------------------------------------------------
    rows = torch.randn(cfg.n_rows, 50, generator=g) * (torch.rand(cfg.n_rows, 1, generator=g) * 4 + 0.5)
    topk_bad = 0
    for kk in (1, 3, 10, 50):
        out = top_k_filter(rows, kk)
        kept = torch.isfinite(out)
        dropped_max = rows.masked_fill(kept, float("-inf")).amax(-1)
        kept_min = rows.masked_fill(~kept, float("inf")).amin(-1)
        bad = (kept.sum(-1) != kk) | (kept_min < dropped_max) | (out[kept] != rows[kept]).any()
        topk_bad += int(bad.sum())
    ctx.check("top_k_keeps_exactly_k", topk_bad == 0, f"{topk_bad} bad rows of {4 * cfg.n_rows}",
              "0 rows with != k kept or a kept token below a dropped one",
              "Top-k sampling renormalises over exactly the k most likely tokens.",
              hint="mask by the topk indices; `logits < kth_value` keeps every token tied with the k-th.")

    rows64 = rows.double()
    probs = rows64.softmax(-1)
    topp_bad, nucleus_sizes = 0, []
    ps = (0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99)
    for p in ps:
        out = top_p_filter(rows64, p)
        kept = torch.isfinite(out)
        mass = (probs * kept).sum(-1)
        kept_min = probs.masked_fill(~kept, float("inf")).amin(-1)
        dropped_max = probs.masked_fill(kept, float("-inf")).amax(-1)
        bad = (mass < p - 1e-12) | (mass - kept_min >= p + 1e-12) | (kept_min < dropped_max) \
            | (out[kept] != rows64[kept]).any()
        topp_bad += int(bad.sum())
        nucleus_sizes.append(kept.sum(-1).double().mean().item())
    ctx.check("top_p_keeps_smallest_nucleus", topp_bad == 0, f"{topp_bad} bad rows of {len(ps) * cfg.n_rows}",
              "0 rows where the kept mass < p, a smaller top set would reach p, or a kept token is below a "
              "dropped one",
              "Nucleus sampling keeps the fewest most-likely tokens whose probabilities add up to at least p, "
              "so it adapts the candidate count to how peaked the distribution is.",
              hint="an inclusive cumsum > p mask drops the token that crosses p; shift the mask by one "
                   "(exclusive cumsum) so it is kept.")
    ctx.series("sampling/top_p_nucleus_size", nucleus_sizes, x=list(ps), x_label="p", smooth=False)

    gapped = rows.clone()
    gapped[torch.arange(cfg.n_rows), rows.argmax(-1)] += 0.05  # the best token leads by >= 0.05
    greedy = gapped.argmax(-1)
    temps = (2.0, 1.0, 0.5, 0.2, 0.1, 0.03, 0.01, 1e-3, 1e-4)
    sg = ctx.generator(3)
    agree = [(M.sample_next_token(gapped, temperature=t, generator=sg) == greedy).double().mean().item()
             for t in temps]
    ctx.series("sampling/argmax_rate", agree, x=list(temps), x_label="temperature", smooth=False)
    seq_greedy = M.generate(model, prompt, 32)
    seq_cold = M.generate(model, prompt, 32, temperature=1e-6, generator=sg)
    seq_agree = (seq_greedy == seq_cold).all().item()
    ctx.check("temperature_to_zero_is_greedy", agree[-1] == 1.0 and seq_agree,
              f"argmax rate {agree[-1]:.4f} at T=1e-4 (T=1: {agree[1]:.3f}); 32-step generation equal: {seq_agree}",
              "argmax rate 1 at T=1e-4 and identical sequences at T=1e-6",
              "softmax(z / T) concentrates on the largest logit as T -> 0, so sampling becomes greedy decoding.",
              hint="divide the logits by T (multiplying flattens the distribution instead).")

    pen_logits = torch.randn(8, V, generator=g) * 2
    history = torch.randint(0, V, (8, 6), generator=g)
    penalized = M.apply_repetition_penalty(pen_logits, history, 1.3)
    seen = torch.zeros_like(pen_logits, dtype=torch.bool).scatter_(-1, history, True)
    expected = torch.where(pen_logits > 0, pen_logits / 1.3, pen_logits * 1.3)
    pen_bad = int(((penalized != expected) & seen).sum() + ((penalized != pen_logits) & ~seen).sum()
                  + ((penalized >= pen_logits) & seen & (pen_logits != 0)).sum())
    ctx.check("repetition_penalty_demotes_only_seen_tokens", pen_bad == 0, f"{pen_bad} wrong logits",
              "0: seen logits z -> z/1.3 if z > 0 else 1.3 z; unseen unchanged",
              "The CTRL penalty lowers every already-generated token's logit (dividing a positive logit, "
              "multiplying a negative one) and leaves the rest alone.",
              hint="dividing a negative logit by the penalty raises it, making the repeat MORE likely.")
    ctx.progress(0.4)

    # --- Exact counts ---------------------------------------------------------------------------
    configs = [_sharp_model(cfg), _sharp_model(cfg, tie_embeddings=True), _sharp_model(cfg, n_kv_heads=1),
               _sharp_model(cfg, n_kv_heads=cfg.n_heads), M.task_model_config(cfg)]
    mismatches = [(M.count_parameters(c), M.count_model_parameters(M.Transformer(c))) for c in configs]
    mismatches = [pair for pair in mismatches if pair[0] != pair[1]]
    llama2_7b = M.count_parameters(M.ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                                                 n_kv_heads=32, d_ff=11008))
    ctx.check("parameter_count_matches_closed_form", not mismatches and llama2_7b == 6_738_415_616,
              f"{len(configs) - len(mismatches)}/{len(configs)} configs equal; Llama-2-7B {llama2_7b:,}",
              f"{len(configs)}/{len(configs)} (tied, MQA, GQA, MHA); Llama-2-7B 6,738,415,616",
              "N = V d (2 or 1 if tied) + L (2 d H hd + 2 d K hd + 3 d d_ff + 2 d) + d: attention, SwiGLU "
              "and two RMSNorm gains per layer, plus the final norm.",
              hint="a tied lm_head is one matrix, GQA shrinks only k/v, SwiGLU has three matrices.")
    ctx.scalar("parameters (task model)", M.count_parameters(M.task_model_config(cfg)))

    if cfg.flop_counter:  # trusted-library cross-check of forward_flops (and 3x for training)
        from torch.utils.flop_counter import FlopCounterMode

        counted, formula = [], []
        fmodel = M.Transformer(_sharp_model(cfg), rope_fn=apply_rope, norm_fn=rms_norm)
        xf = torch.randint(0, V, (2, 16), generator=g)
        with FlopCounterMode(display=False) as fc:
            fmodel(xf)
        counted.append(fc.get_total_flops()), formula.append(M.forward_flops(fmodel.cfg, 16, 2))
        with FlopCounterMode(display=False) as fc:
            fmodel(xf).sum().backward()
        counted.append(fc.get_total_flops()), formula.append(3 * M.forward_flops(fmodel.cfg, 16, 2))
        cache = M.KVCache(fmodel.cfg, 2, 17)
        with torch.no_grad():
            fmodel(xf, cache)
            with FlopCounterMode(display=False) as fc:
                fmodel(xf[:, :1], cache)
        counted.append(fc.get_total_flops()), formula.append(M.forward_flops(fmodel.cfg, 1, 2, cached=16))
        ctx.check("flop_count_matches_closed_form", counted == formula,
                  f"counted {counted} vs formula {formula}", "equal (forward, forward+backward, cached step)",
                  "Forward FLOPs = 2 x (matmul parameters) per token + 4 L H hd T S for scores and weighted "
                  "values; training is 3x forward (PaLM's 6N + 12 L H hd T).",
                  hint="count the lm_head but not the embedding lookup; attention costs grow with the "
                       "context length S.")
    ctx.progress(0.45)

    # --- Closed loop: learn to reverse a digit string ------------------------------------------
    def on_step(step: int, record: dict) -> None:
        ctx.log("train/loss", record["loss"], step)
        ctx.log("train/learning_rate", record["lr"], step)
        ctx.log("train/grad_norm", record["grad_norm"], step)
        ctx.progress(0.45 + 0.4 * (step + 1) / cfg.steps)

    task_model, history = M.train_reverse_task(cfg, ctx.generator(1), rope_fn=apply_rope, norm_fn=rms_norm,
                                               on_step=on_step)
    exact, token_acc = M.reverse_exact_match(task_model, cfg, cfg.eval_size, ctx.generator(2))
    ctx.check("reverse_task_exact_match", exact >= cfg.min_exact_match, exact, f">= {cfg.min_exact_match}",
              f"Trained for {cfg.steps} steps with our AdamW + warmup-cosine + clipping, the model reverses "
              f"unseen {cfg.n_items}-digit strings by greedy decoding with the KV cache (chance: "
              f"{10.0 ** -cfg.n_items:.0e}).", kind="outcome",
              hint="a loss stuck near log(10) means attention cannot find positions (RoPE, mask); one answer "
                   "position stuck at chance is the RoPE-base effect in the README (theta too large).")
    ctx.scalar("exact match", exact)
    ctx.scalar("answer token accuracy", token_acc)
    ctx.scalar("final train loss", history[-1]["loss"])

    # --- KV-cache speedup at speed_new_tokens generated tokens --------------------------------
    speed_prompt = torch.randint(0, cfg.n_symbols, (1, cfg.n_items + 2), generator=ctx.generator(4))
    timings = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        out = M.generate(task_model, speed_prompt, cfg.speed_new_tokens, use_cache=use_cache)
        timings[use_cache] = time.perf_counter() - start
        timings[f"tokens_{use_cache}"] = out
    P, n_new = speed_prompt.shape[1], cfg.speed_new_tokens
    mc = task_model.cfg
    flops_cached = M.forward_flops(mc, P) + sum(M.forward_flops(mc, 1, cached=P + t) for t in range(n_new - 1))
    flops_full = sum(M.forward_flops(mc, P + t) for t in range(n_new))
    ctx.scalar(f"kv_cache_speedup_wallclock_{n_new}_tokens", timings[False] / timings[True], timed=True)
    ctx.scalar(f"kv_cache_flop_ratio_{n_new}_tokens", flops_full / flops_cached)
    ctx.scalar("kv_cache_same_tokens", bool((timings["tokens_True"] == timings["tokens_False"]).all()))
    ctx.progress(1.0)
