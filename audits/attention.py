"""Audit of the attention module: reference attention, tiled FlashAttention-style forward, online-softmax
merge, GQA repeat_kv, and the peak memory of both forwards as the sequence grows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmaudit.audit import Context, audit, kernel
from modules import attention as M


def _example_sdpa() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"q": torch.randn(1, 2, 5, 4, generator=g), "k": torch.randn(1, 2, 6, 4, generator=g),
            "v": torch.randn(1, 2, 6, 3, generator=g), "mask": M.attention_mask(5, 6, causal=True)}


def _example_flash() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"q": torch.randn(1, 2, 5, 4, generator=g), "k": torch.randn(1, 2, 7, 4, generator=g),
            "v": torch.randn(1, 2, 7, 3, generator=g), "causal": True, "window": None,
            "block_q": 2, "block_k": 3}


def _example_merge() -> dict:
    g = torch.Generator().manual_seed(0)
    scores, v = torch.randn(2, 3, 5, generator=g), torch.randn(2, 5, 4, generator=g)
    return dict(zip(["m_a", "l_a", "acc_a"], M.softmax_state(scores[..., :2], v[:, :2]))) | \
        dict(zip(["m_b", "l_b", "acc_b"], M.softmax_state(scores[..., 2:], v[:, 2:])))


def _example_repeat_kv() -> dict:
    return {"x": torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(0)), "n_rep": 3}


KERNELS = [
    kernel(M.scaled_dot_product_attention, example=_example_sdpa,
           hint="scale by 1/sqrt(d) of the query head dim, set disallowed scores to -inf *before* the "
                "softmax, and take the softmax over the last (key) axis."),
    kernel(M.flash_attention_forward, example=_example_flash,
           hint="whenever the running max grows, rescale both l and acc by exp(m_old - m_new); rows whose "
                "max is still -inf need a guard against -inf - (-inf) = NaN; divide acc by l once at the end."),
    kernel(M.merge_softmax_states, example=_example_merge,
           hint="rescale each side by exp(m_side - m) with m = max(m_a, m_b) before adding; when both m are "
                "-inf use 0 in the exponent so that empty states stay empty instead of NaN."),
    kernel(M.repeat_kv, example=_example_repeat_kv,
           hint="repeat_interleave, not repeat: query head h reads kv head h // n_rep, not h % n_kv."),
]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; inf on a shape mismatch, NaN if either side has a NaN."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _worst(diffs: list[float]) -> float:
    """The largest difference, NaN-propagating (Python's max() would skip a NaN)."""
    return torch.tensor(diffs, dtype=torch.float64).max().item() if diffs else 0.0


def _random_cases(cfg: M.AttentionConfig, g: torch.Generator) -> list[dict]:
    """Shapes, block sizes and masks for tiled-vs-reference: fixed edge cases, then random ones."""
    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    n = cfg.max_seq_len
    cases = [  # (B, H, Nq, Nk, d, dv, block_q, block_k, causal, window)
        (1, 1, 1, 1, 3, 2, 1, 1, False, None),  # a single token
        (2, 2, 1, n, 8, 5, 1, 7, True, None),  # one decoding step over a cache, ragged key blocks
        (1, 3, 10, 10, 4, 4, 64, 64, True, None),  # blocks larger than the sequence
        (1, 2, 32, 32, 8, 8, 8, 16, True, None),  # blocks that divide the sequence exactly
        (2, 1, 9, 9, 5, 3, 1, 1, True, 3),  # one-element tiles with a sliding window
        (1, 2, 17, 17, 6, 6, 5, 3, True, 1),  # window 1: every query sees only itself
        (1, 2, 13, 29, 7, 9, 4, 6, True, 5),  # fewer queries than keys (the last 13 positions)
    ]
    cases = [dict(zip(("B", "H", "Nq", "Nk", "d", "dv", "block_q", "block_k", "causal", "window"), c))
             for c in cases]
    for i in range(max(0, cfg.n_cases - len(cases))):
        mask_kind = ("none", "causal", "window")[i % 3]
        Nk = r(2, n)
        Nq = Nk if i % 2 == 0 else r(1, Nk)
        floor = max(1, math.ceil(max(Nq, Nk) / 16))  # at most 16 x 16 tiles: keeps the Python loop short
        cases.append({"B": r(1, 2), "H": r(1, 3), "Nq": Nq, "Nk": Nk, "d": r(1, cfg.max_head_dim),
                      "dv": r(1, cfg.max_head_dim), "block_q": r(floor, max(floor, cfg.max_block)),
                      "block_k": r(floor, max(floor, cfg.max_block)), "causal": mask_kind != "none",
                      "window": r(1, Nk) if mask_kind == "window" else None})
    return cases


def _qkv(case: dict, g: torch.Generator, dtype: torch.dtype, dv: int | None = None):
    B, H, Nq, Nk, d = case["B"], case["H"], case["Nq"], case["Nk"], case["d"]
    return (torch.randn(B, H, Nq, d, generator=g, dtype=dtype), torch.randn(B, H, Nk, d, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, dv or case["dv"], generator=g, dtype=dtype))


@audit("attention", day=5, title="Attention: reference softmax attention and a tiled FlashAttention forward",
       config=M.AttentionConfig, kernels=KERNELS, formulas=M.FORMULAS)
def audit_attention(ctx: Context, *, scaled_dot_product_attention=M.scaled_dot_product_attention,
                    flash_attention_forward=M.flash_attention_forward,
                    merge_softmax_states=M.merge_softmax_states, repeat_kv=M.repeat_kv) -> None:
    cfg: M.AttentionConfig = ctx.config
    dtype = cfg.torch_dtype
    g_shapes, g_data = ctx.generator(0), ctx.generator(1)
    cases = _random_cases(cfg, g_shapes)

    # 1. the reference against torch's own attention, and the tiled forward against the reference
    torch_diffs, flash_diffs, ragged = [], [], 0
    for case in cases:
        q, k, v = _qkv(case, g_data, dtype)
        mask = M.attention_mask(case["Nq"], case["Nk"], case["causal"], case["window"])
        ref = scaled_dot_product_attention(q, k, v, mask)
        torch_diffs.append(_max_diff(ref, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        tiled = flash_attention_forward(q, k, v, case["causal"], case["window"], case["block_q"], case["block_k"])
        flash_diffs.append(_max_diff(tiled, M.scaled_dot_product_attention(q, k, v, mask)))
        ragged += bool(case["Nq"] % case["block_q"] or case["Nk"] % case["block_k"])
    ctx.progress(0.3)
    worst_torch, worst_flash = _worst(torch_diffs), _worst(flash_diffs)
    ctx.check("reference_matches_torch_sdpa", worst_torch < cfg.tol,
              f"max|diff|={worst_torch:.2e} over {len(cases)} cases", f"< {cfg.tol:g}",
              "softmax(QK^T/sqrt(d) + mask) V is exactly what torch.nn.functional.scaled_dot_product_attention "
              "computes; a hand-written version must agree to rounding.",
              hint="the scale is 1/sqrt(head_dim); the mask goes in as -inf before the softmax (True = allowed).")
    ctx.check("flash_matches_reference", worst_flash < cfg.tol,
              f"max|diff|={worst_flash:.2e} over {len(cases)} cases ({ragged} with a ragged last block)",
              f"< {cfg.tol:g}",
              "Online softmax is exact, not an approximation: tiling changes the order of the sums, never "
              "the result, for any block sizes, masks and ragged last blocks.",
              hint="rescale l and acc by exp(m_old - m_new) at every tile, mask the diagonal tiles element-wise, "
                   "and guard rows whose running max is still -inf.")
    ctx.series("equivalence/log10_max_abs_diff_flash", [math.log10(max(x, 1e-300)) if math.isfinite(x) else 0.0
                                                         for x in flash_diffs],
               x_label="random case", smooth=False)
    ctx.scalar("flash vs reference max |diff|", worst_flash)

    # 2. reading the attention matrix out: with V = identity, O = P itself (one row per query)
    row_errs, masked_weight, negative = [], [], []
    for case in [c for c in cases if c["Nk"] <= 96][:12]:
        q, k, _ = _qkv(case, g_data, dtype)
        eye = torch.eye(case["Nk"], dtype=dtype).expand(case["B"], case["H"], -1, -1)
        mask = M.attention_mask(case["Nq"], case["Nk"], case["causal"], case["window"])
        for P in (scaled_dot_product_attention(q, k, eye, mask),
                  flash_attention_forward(q, k, eye, case["causal"], case["window"], case["block_q"], case["block_k"])):
            if tuple(P.shape) != (case["B"], case["H"], case["Nq"], case["Nk"]):
                row_errs.append(float("inf"))
                continue
            row_errs.append((P.double().sum(-1) - 1).abs().max().item())
            negative.append(-P.min().item())
            if mask is not None:
                masked_weight.append(P.double().abs().masked_fill(mask, 0).max().item())
    worst_row = _worst(row_errs)
    ctx.check("attention_rows_sum_to_one", worst_row < cfg.tol and _worst(negative) <= 0,
              f"max|row sum - 1|={worst_row:.2e}, min weight={-_worst(negative):.2e}", f"< {cfg.tol:g}, weights >= 0",
              "Each query's weights are a softmax over keys: non-negative and summing to one (read out by "
              "feeding V = identity), for the reference and the tiled forward.",
              hint="softmax over dim=-1 (keys), not dim=-2; the tiled forward must divide by l at the end.")
    worst_masked = _worst(masked_weight)
    ctx.check("masked_keys_get_zero_weight", worst_masked < 1e-12, f"max masked weight={worst_masked:.2e}",
              "< 1e-12 (exactly 0 in practice)",
              "A future key (causal) or a key beyond the sliding window gets probability exactly 0, so no "
              "information leaks from positions the model must not see.",
              hint="apply the mask inside the diagonal tiles too, and intersect the window with causality.")
    ctx.progress(0.45)

    # 3. a window at least as long as the sequence changes nothing
    window_diffs = []
    for case in [c for c in cases if c["causal"]][:8]:
        q, k, v = _qkv(case, g_data, dtype)
        causal_only = flash_attention_forward(q, k, v, True, None, case["block_q"], case["block_k"])
        for w in (case["Nk"], case["Nk"] + 3, 4 * case["Nk"]):
            window_diffs.append(_max_diff(flash_attention_forward(q, k, v, True, w, case["block_q"],
                                                                  case["block_k"]), causal_only))
    worst_window = _worst(window_diffs)
    ctx.check("window_covering_sequence_equals_causal", worst_window < cfg.tol,
              f"max|diff|={worst_window:.2e} over {len(window_diffs)} runs", f"< {cfg.tol:g}",
              "A sliding window of W keys only removes keys more than W-1 positions back; when W >= N it "
              "removes nothing, so the result is plain causal attention.",
              hint="the window is an extra lower bound j > p - W on top of the causal bound j <= p, not a "
                   "replacement for it.")

    # 4. online softmax: merging partial (m, l, acc) states equals the softmax over the concatenation
    merge_out, merge_lse = [], []
    for _ in range(cfg.n_merge_cases):
        rows, n_keys, dv = int(torch.randint(1, 9, (1,), generator=g_shapes)), \
            int(torch.randint(5, 41, (1,), generator=g_shapes)), int(torch.randint(1, 9, (1,), generator=g_shapes))
        scores = 3 * torch.randn(2, rows, n_keys, generator=g_data, dtype=dtype)
        allowed = torch.rand(2, rows, n_keys, generator=g_data) < 0.6
        allowed[..., int(torch.randint(0, n_keys, (1,), generator=g_shapes))] = True  # one key per row at least
        scores = scores.masked_fill(~allowed, float("-inf"))
        v = torch.randn(2, n_keys, dv, generator=g_data, dtype=dtype)
        n_parts = int(torch.randint(2, 6, (1,), generator=g_shapes))
        cuts = sorted(torch.randperm(n_keys - 1, generator=g_shapes)[:n_parts - 1].add(1).tolist())
        bounds = list(zip([0] + cuts, cuts + [n_keys]))
        parts = [M.softmax_state(scores[..., a:b], v[:, a:b]) for a, b in bounds]
        folded = M.empty_softmax_state((2, rows), dv, dtype)  # left fold from the identity
        for part in parts:
            folded = merge_softmax_states(*folded, *part)
        while len(parts) > 1:  # and a tree, the order flash-decoding / ring attention use
            parts = [merge_softmax_states(*parts[i], *parts[i + 1]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        want = torch.softmax(scores, dim=-1) @ v
        for m, l, acc in (folded, parts[0]):
            merge_out.append(_max_diff(acc / l[..., None], want))
            merge_lse.append(_max_diff(m + l.log(), torch.logsumexp(scores, dim=-1)))
    worst_merge, worst_lse = _worst(merge_out), _worst(merge_lse)
    ctx.check("online_softmax_merge_equals_full_softmax", worst_merge < cfg.tol and worst_lse < cfg.tol,
              f"output {worst_merge:.2e}, logsumexp {worst_lse:.2e}", f"both < {cfg.tol:g}",
              "A softmax over keys split into blocks is a fold of (max, sum, output) states, rescaled by "
              "exp(m_old - m_new): this is what lets FlashAttention, flash-decoding and ring attention "
              "stream keys without ever holding all scores.",
              hint="rescale both l and acc of each side by exp(m_side - max); empty blocks (m = -inf) must "
                   "merge as the identity, not as NaN.")
    ctx.progress(0.55)

    # 5. GQA: repeat_kv then attention equals attending each query head to its own KV group
    H, H_kv = cfg.gqa_heads, cfg.gqa_kv_heads
    n_rep, N, d = H // H_kv, min(48, cfg.max_seq_len), 16
    q = torch.randn(2, H, N, d, generator=g_data, dtype=dtype)
    k, v = (torch.randn(2, H_kv, N, d, generator=g_data, dtype=dtype) for _ in range(2))
    mask = M.attention_mask(N, N, causal=True)
    per_group = torch.stack([F.scaled_dot_product_attention(q[:, h], k[:, h // n_rep], v[:, h // n_rep],
                                                            attn_mask=mask) for h in range(H)], dim=1)
    k_rep, v_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    gqa_diff = max(_max_diff(scaled_dot_product_attention(q, k_rep, v_rep, mask), per_group),
                   _max_diff(flash_attention_forward(q, k_rep, v_rep, True, None, 16, 16), per_group))
    ctx.check("gqa_repeat_kv_matches_per_group_attention", gqa_diff < cfg.tol,
              f"max|diff|={gqa_diff:.2e} ({H} query heads, {H_kv} kv heads)", f"< {cfg.tol:g}",
              "In grouped-query attention query head h shares key/value head h // (H / H_kv); repeat_kv "
              "expands the KV cache to match, so the KV cache is H / H_kv times smaller than MHA's.",
              hint="use repeat_interleave along the head axis; x.repeat(1, n_rep, 1, 1) pairs head h with "
                   "h % H_kv instead.")
    ctx.progress(0.6)

    # 6. peak memory as N doubles (batch 1, one head, causal, float32; bytes every aten op allocates)
    lens, g_mem = cfg.memory_seq_lens, ctx.generator(2)
    ref_peaks = M.memory_sweep(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, M.attention_mask(q.shape[-2], k.shape[-2], True)),
        lens, cfg.memory_head_dim, g_mem)
    ctx.progress(0.75)
    flash_peaks = M.memory_sweep(
        lambda q, k, v: flash_attention_forward(q, k, v, True, None, cfg.memory_block, cfg.memory_block),
        lens, cfg.memory_head_dim, g_mem)
    ref_exp, flash_exp = M.growth_exponent(lens, ref_peaks), M.growth_exponent(lens, flash_peaks)
    ctx.series("memory/reference_peak_mib", [p / 2**20 for p in ref_peaks], lens, x_label="sequence length N",
               group="memory/peak_mib", smooth=False)
    ctx.series("memory/flash_peak_mib", [p / 2**20 for p in flash_peaks], lens, x_label="sequence length N",
               group="memory/peak_mib", smooth=False)
    ctx.check("flash_memory_linear_reference_quadratic",
              flash_exp <= cfg.max_linear_exponent and ref_exp >= cfg.min_quadratic_exponent,
              f"growth exponent: tiled {flash_exp:.2f}, reference {ref_exp:.2f}",
              f"tiled <= {cfg.max_linear_exponent:g}, reference >= {cfg.min_quadratic_exponent:g}",
              "The reference holds the N x N score matrix (memory ~ N^2); the tiled forward holds one "
              "block_q x block_k tile plus O(N d) running state (memory ~ N).",
              kind="outcome",
              hint="never build a (Nq, Nk) tensor in the tiled forward: no full mask, no full score matrix.")
    ratio = ref_peaks[-1] / max(flash_peaks[-1], 1)
    ctx.check("flash_peak_memory_far_below_reference", ratio >= cfg.min_memory_ratio,
              f"{ratio:.1f}x at N={lens[-1]} ({ref_peaks[-1] / 2**20:.1f} MiB vs {flash_peaks[-1] / 2**20:.2f} MiB)",
              f">= {cfg.min_memory_ratio:g}x",
              "At long context the score matrix dominates: tiling cuts peak attention memory by orders of "
              "magnitude, which is what makes long sequences fit.",
              kind="outcome",
              hint="tile the queries too: a score tile is block_q x block_k, not Nq x block_k; and no "
                   "workspace sized for the longest context.")
    ctx.scalar(f"memory ratio at N={lens[-1]}", round(ratio, 2))
    ctx.scalar(f"reference peak MiB at N={lens[-1]}", round(ref_peaks[-1] / 2**20, 3))
    ctx.scalar(f"tiled peak MiB at N={lens[-1]}", round(flash_peaks[-1] / 2**20, 3))
    ctx.scalar("memory growth exponent (tiled, reference)", f"{flash_exp:.2f}, {ref_exp:.2f}")
    ctx.progress(1.0)
