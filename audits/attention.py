"""Audit of the attention module (day 5): the reference against torch, the tiled forward against the
reference, the online-softmax merge, GQA's repeat_kv, and the peak memory of both forwards as N grows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmaudit.audit import Audit, kernel, max_error, measure, worst
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

attention = Audit("attention", day=5, title="Attention: reference softmax attention and a tiled FlashAttention forward",
                  config=M.AttentionConfig, kernels=KERNELS, formulas=M.FORMULAS)

CASE_FIELDS = ("B", "H", "Nq", "Nk", "d", "dv", "block_q", "block_k", "causal", "window")


def _qkv(case: dict, g: torch.Generator, dtype: torch.dtype, dv: int | None = None):
    B, H, Nq, Nk, d = case["B"], case["H"], case["Nq"], case["Nk"], case["d"]
    return (torch.randn(B, H, Nq, d, generator=g, dtype=dtype), torch.randn(B, H, Nk, d, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, dv or case["dv"], generator=g, dtype=dtype))


def _mask(case: dict) -> torch.Tensor | None:
    return M.attention_mask(case["Nq"], case["Nk"], case["causal"], case["window"])


def _tiled(flash, q, k, v, case: dict, window: int | None = None, causal: bool | None = None):
    return flash(q, k, v, case["causal"] if causal is None else causal,
                 case["window"] if causal is None else window, case["block_q"], case["block_k"])


def _ragged(cases: list[dict]) -> int:
    return sum(bool(c["Nq"] % c["block_q"] or c["Nk"] % c["block_k"]) for c in cases)


# ---- random shapes, block sizes and masks ---------------------------------------------------------

@attention.fixture
def cases(cfg, g):
    """Fixed edge cases (one token, one decoding step, blocks larger than or dividing the sequence,
    one-element tiles, window 1, fewer queries than keys), then random ones with ragged last blocks."""
    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    n = cfg.max_seq_len
    fixed = [(1, 1, 1, 1, 3, 2, 1, 1, False, None), (2, 2, 1, n, 8, 5, 1, 7, True, None),
             (1, 3, 10, 10, 4, 4, 64, 64, True, None), (1, 2, 32, 32, 8, 8, 8, 16, True, None),
             (2, 1, 9, 9, 5, 3, 1, 1, True, 3), (1, 2, 17, 17, 6, 6, 5, 3, True, 1),
             (1, 2, 13, 29, 7, 9, 4, 6, True, 5)]
    out = [dict(zip(CASE_FIELDS, c)) for c in fixed]
    for i in range(max(0, cfg.n_cases - len(out))):
        mask_kind = ("none", "causal", "window")[i % 3]
        Nk = r(2, n)
        Nq = Nk if i % 2 == 0 else r(1, Nk)
        floor = max(1, math.ceil(max(Nq, Nk) / 16))  # at most 16 x 16 tiles: keeps the Python loop short
        out.append({"B": r(1, 2), "H": r(1, 3), "Nq": Nq, "Nk": Nk, "d": r(1, cfg.max_head_dim),
                    "dv": r(1, cfg.max_head_dim), "block_q": r(floor, max(floor, cfg.max_block)),
                    "block_k": r(floor, max(floor, cfg.max_block)), "causal": mask_kind != "none",
                    "window": r(1, Nk) if mask_kind == "window" else None})
    return out


@attention.check("< tol", hint="the scale is 1/sqrt(head_dim); the mask goes in as -inf before the softmax "
                               "(True = allowed).")
def reference_matches_torch_sdpa(cfg, g, cases, scaled_dot_product_attention):
    """softmax(QK^T/sqrt(d) + mask) V is exactly what torch.nn.functional.scaled_dot_product_attention
    computes; a hand-written version must agree to rounding."""
    errors = []
    for case in cases:
        q, k, v = _qkv(case, g, cfg.torch_dtype)
        mask = _mask(case)
        errors.append(max_error(scaled_dot_product_attention(q, k, v, mask),
                                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
    return measure(errors, f"{len(cases)} cases")


@attention.check("< tol", hint="rescale l and acc by exp(m_old - m_new) at every tile, mask the diagonal tiles "
                               "element-wise, and guard rows whose running max is still -inf.")
def flash_matches_reference(ctx, cfg, g, cases, flash_attention_forward):
    """Online softmax is exact, not an approximation: tiling changes the order of the sums, never the
    result, for any block sizes, masks and ragged last blocks."""
    errors = []
    for case in cases:
        q, k, v = _qkv(case, g, cfg.torch_dtype)
        errors.append(max_error(_tiled(flash_attention_forward, q, k, v, case),
                                M.scaled_dot_product_attention(q, k, v, _mask(case))))
    ctx.series("equivalence/log10_max_abs_diff_flash", [math.log10(max(e, 1e-300)) if math.isfinite(e) else 0.0
                                                         for e in errors], x_label="random case (index)", smooth=False,
               label="flash attention against the reference", y_label=r"$\log_{10}$ max abs difference")
    return measure(errors, f"{len(cases)} cases, {_ragged(cases)} with a ragged last block")


@attention.check("< 1e-3", hint="subtract each row's max before exp (torch.softmax does); in float32 exp(89) is "
                                "already inf. The tiled forward gets this from its running max m.")
def softmax_is_stable_for_large_scores(g, scaled_dot_product_attention, flash_attention_forward):
    """Scores of several hundred (large activations, no QK-norm) are routine in float32: exp overflows
    past 88.7, so exp(s) / sum exp(s) is inf / inf = NaN. Subtracting the row max first gives the same
    softmax, every exponent <= 0. Both kernels, with and without a causal mask, against float64."""
    errors, biggest = [], 0.0
    for causal in (False, True):
        q, k = (10.0 * torch.randn(2, 1, 2, 24, 8, generator=g)).unbind(0)  # float32: |scores| up to ~500
        v = torch.randn(1, 2, 24, 8, generator=g)
        mask = torch.ones(24, 24, dtype=torch.bool).tril() if causal else None
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        biggest = max(biggest, (q @ k.transpose(-2, -1)).abs().max().item() / math.sqrt(8))
        for out in (scaled_dot_product_attention(q, k, v, mask),
                    flash_attention_forward(q, k, v, causal=causal, block_q=5, block_k=7)):
            errors.append(max_error(out, want))
    return measure(errors, f"float32, |score| up to {biggest:.0f}")


@attention.check({"row_sum_error": "< tol", "min_weight": ">= 0"},
                 hint="softmax over dim=-1 (keys), not dim=-2; the tiled forward must divide by l at the end.")
def attention_rows_sum_to_one(cfg, g, cases, scaled_dot_product_attention, flash_attention_forward):
    """Each query's weights are a softmax over keys: non-negative and summing to one (read out by
    feeding V = identity), for the reference and the tiled forward."""
    row_errors, weights = [], []
    for case in [c for c in cases if c["Nk"] <= 96][:12]:
        q, k, _ = _qkv(case, g, cfg.torch_dtype)
        eye = torch.eye(case["Nk"], dtype=cfg.torch_dtype).expand(case["B"], case["H"], -1, -1)
        for P in (scaled_dot_product_attention(q, k, eye, _mask(case)),
                  _tiled(flash_attention_forward, q, k, eye, case)):
            if tuple(P.shape) != (case["B"], case["H"], case["Nq"], case["Nk"]):
                row_errors.append(math.inf)
                continue
            row_errors.append(max_error(P.double().sum(-1), torch.ones(P.shape[:-1], dtype=torch.float64)))
            weights.append(P.min())
    return {"row_sum_error": row_errors, "min_weight": weights}


@attention.check("< 1e-12", hint="apply the mask inside the diagonal tiles too, and intersect the window with "
                                 "causality.")
def masked_keys_get_zero_weight(cfg, g, cases, scaled_dot_product_attention, flash_attention_forward):
    """A future key (causal) or a key beyond the sliding window gets probability exactly 0, so no
    information leaks from positions the model must not see."""
    leaks = []
    for case in [c for c in cases if c["causal"] and c["Nk"] <= 96][:12]:
        q, k, _ = _qkv(case, g, cfg.torch_dtype)
        eye = torch.eye(case["Nk"], dtype=cfg.torch_dtype).expand(case["B"], case["H"], -1, -1)
        allowed = _mask(case)
        for P in (scaled_dot_product_attention(q, k, eye, allowed), _tiled(flash_attention_forward, q, k, eye, case)):
            if tuple(P.shape) != (case["B"], case["H"], case["Nq"], case["Nk"]):
                leaks.append(math.inf)
                continue
            leaks.append(P.double().abs().masked_fill(allowed, 0).max())
    return leaks


@attention.check("< tol", hint="the window is an extra lower bound j > p - W on top of the causal bound j <= p, "
                               "not a replacement for it.")
def window_covering_sequence_equals_causal(cfg, g, cases, flash_attention_forward):
    """A sliding window of W keys only removes keys more than W-1 positions back; when W >= N it removes
    nothing, so the result is plain causal attention."""
    errors = []
    for case in [c for c in cases if c["causal"]][:8]:
        q, k, v = _qkv(case, g, cfg.torch_dtype)
        causal_only = _tiled(flash_attention_forward, q, k, v, case, causal=True, window=None)
        for w in (case["Nk"], case["Nk"] + 3, 4 * case["Nk"]):
            errors.append(max_error(_tiled(flash_attention_forward, q, k, v, case, causal=True, window=w), causal_only))
    return measure(errors, f"{len(errors)} runs")


# ---- online softmax: merging partial (m, l, acc) states ---------------------------------------------

@attention.check({"output": "< tol", "logsumexp": "< tol"},
                 hint="rescale both l and acc of each side by exp(m_side - max); empty blocks (m = -inf) must "
                      "merge as the identity, not as NaN.")
def online_softmax_merge_equals_full_softmax(cfg, g, merge_softmax_states):
    """A softmax over keys split into blocks is a fold of (max, sum, output) states rescaled by
    exp(m_old - m_new), in any order: what lets FlashAttention, flash-decoding and ring attention
    stream keys without ever holding all scores."""
    dtype, outputs, lses = cfg.torch_dtype, [], []
    for _ in range(cfg.n_merge_cases):
        rows, n_keys, dv = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (5, 41), (1, 9)))
        scores = 3 * torch.randn(2, rows, n_keys, generator=g, dtype=dtype)
        allowed = torch.rand(2, rows, n_keys, generator=g) < 0.6
        allowed[..., int(torch.randint(0, n_keys, (1,), generator=g))] = True  # one key per row at least
        scores = scores.masked_fill(~allowed, float("-inf"))  # some rows are empty in some parts
        v = torch.randn(2, n_keys, dv, generator=g, dtype=dtype)
        n_parts = int(torch.randint(2, 6, (1,), generator=g))
        cuts = sorted(torch.randperm(n_keys - 1, generator=g)[:n_parts - 1].add(1).tolist())
        parts = [M.softmax_state(scores[..., a:b], v[:, a:b]) for a, b in zip([0] + cuts, cuts + [n_keys])]
        folded = M.empty_softmax_state((2, rows), dv, dtype)  # a left fold from the identity ...
        for part in parts:
            folded = merge_softmax_states(*folded, *part)
        while len(parts) > 1:  # ... and a tree, the order flash-decoding and ring attention use
            parts = [merge_softmax_states(*parts[i], *parts[i + 1]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        want = torch.softmax(scores, dim=-1) @ v
        for m, l, acc in (folded, parts[0]):
            outputs.append(max_error(acc / l[..., None], want))
            lses.append(max_error(m + l.log(), torch.logsumexp(scores, dim=-1)))
    return {"output": outputs, "logsumexp": lses}


@attention.check("< 1e-12", hint="m = max(m_a, m_b); l and acc of each side are multiplied by exp(m_side - m).")
def merge_matches_hand_worked_example(merge_softmax_states):
    """One key of score 0 and value [1, 0] merged with one key of score ln 3 and value [0, 1]: m = ln 3,
    l = 1/3 + 1 = 4/3, acc = [1/3, 1], so the output acc / l is the softmax mix [1/4, 3/4]."""
    f64 = torch.float64
    m, l, acc = merge_softmax_states(torch.tensor([0.0], dtype=f64), torch.tensor([1.0], dtype=f64),
                                     torch.tensor([[1.0, 0.0]], dtype=f64),
                                     torch.tensor([math.log(3.0)], dtype=f64), torch.tensor([1.0], dtype=f64),
                                     torch.tensor([[0.0, 1.0]], dtype=f64))
    return [max_error(m, torch.tensor([math.log(3.0)], dtype=f64)), max_error(l, torch.tensor([4 / 3], dtype=f64)),
            max_error(acc, torch.tensor([[1 / 3, 1.0]], dtype=f64)),
            max_error(acc / l[..., None], torch.tensor([[0.25, 0.75]], dtype=f64))]


def _differ(got, want) -> int:
    """Elements of a merged state (m, l, acc) that differ from the expected one; NaN always differs."""
    return sum(int((torch.as_tensor(a) != b).sum()) if torch.as_tensor(a).shape == b.shape else b.numel() + 1
               for a, b in zip(got, want))


@attention.check("== 0", hint="with m_a = m_b = -inf, exp(m_a - max) is exp(nan): substitute 0 for the max of "
                              "two empty states.")
def empty_state_is_the_merge_identity(cfg, g, merge_softmax_states):
    """A block where a row sees no key has the state (m, l, acc) = (-inf, 0, 0); merging it must change
    nothing, and two empty states must merge to an empty one, not NaN (a fully masked tile in a sliding
    window is exactly this)."""
    dtype = cfg.torch_dtype
    scores = 4 * torch.randn(5, 7, generator=g, dtype=dtype)
    scores[1] = float("-inf")  # row 1 sees no key of this block
    state = M.softmax_state(scores, torch.randn(7, 3, generator=g, dtype=dtype))
    empty = M.empty_softmax_state((5,), 3, dtype)
    wrong = _differ(merge_softmax_states(*empty, *state), state) + _differ(merge_softmax_states(*state, *empty), state)
    wrong += _differ(merge_softmax_states(*empty, *empty), empty)
    return measure(wrong, "elements that differ from the exact state (NaN counts)")


# ---- GQA --------------------------------------------------------------------------------------------

@attention.check("== 0", hint="output head h is input head h // n_rep: x[:, :, None].expand(...).reshape(...).")
def repeat_kv_matches_hand_worked_vector(repeat_kv):
    """Two KV heads holding 0 and 1, repeated 3 times: the query heads read [0, 0, 0, 1, 1, 1]
    (repeat_interleave); [0, 1, 0, 1, 0, 1] would pair query head h with KV head h % 2."""
    x = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3)  # (B, H_kv, N, d)
    out = repeat_kv(x, 3)
    if tuple(out.shape) != (1, 6, 2, 3):
        return measure(math.inf, f"shape {tuple(out.shape)}")
    return measure(int((out[0, :, 0, 0] != torch.tensor([0.0, 0, 0, 1, 1, 1])).sum()),
                   f"heads {out[0, :, 0, 0].tolist()}")


@attention.check("== 0", hint="repeat along dim 1 (heads), not the sequence; n_rep = 1 returns the input.")
def repeat_kv_equals_repeat_interleave(g, repeat_kv):
    """Expanding H_kv heads n_rep times is torch.repeat_interleave(x, n_rep, dim=1), for MQA (H_kv = 1),
    GQA and plain multi-head attention (n_rep = 1, unchanged)."""
    wrong = []
    for H_kv, n_rep in ((1, 4), (2, 3), (3, 1), (4, 2)):
        x = torch.randn(2, H_kv, 5, 3, generator=g)
        out = repeat_kv(x, n_rep)
        want = torch.repeat_interleave(x, n_rep, dim=1)
        wrong.append(int((out != want).sum()) if out.shape == want.shape else want.numel())
    return wrong


@attention.check("< tol", hint="use repeat_interleave along the head axis; x.repeat(1, n_rep, 1, 1) pairs head h "
                               "with h % H_kv instead.")
def gqa_repeat_kv_matches_per_group_attention(cfg, g, repeat_kv, scaled_dot_product_attention,
                                              flash_attention_forward):
    """In grouped-query attention query head h shares key/value head h // (H / H_kv); repeat_kv expands
    the KV cache to match, so the cache is H / H_kv times smaller than MHA's."""
    H, H_kv, dtype = cfg.gqa_heads, cfg.gqa_kv_heads, cfg.torch_dtype
    n_rep, N, d = H // H_kv, min(48, cfg.max_seq_len), 16
    q = torch.randn(2, H, N, d, generator=g, dtype=dtype)
    k, v = (torch.randn(2, H_kv, N, d, generator=g, dtype=dtype) for _ in range(2))
    mask = M.attention_mask(N, N, causal=True)
    per_group = torch.stack([F.scaled_dot_product_attention(q[:, h], k[:, h // n_rep], v[:, h // n_rep],
                                                            attn_mask=mask) for h in range(H)], dim=1)
    k_rep, v_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return measure([max_error(scaled_dot_product_attention(q, k_rep, v_rep, mask), per_group),
                    max_error(flash_attention_forward(q, k_rep, v_rep, True, None, 16, 16), per_group)],
                   f"{H} query heads, {H_kv} kv heads")


# ---- peak memory as N doubles (batch 1, one head, causal, float32; bytes every ATen op allocates) ------

@attention.fixture(cost=4)
def reference_memory(cfg, g):
    """The module's reference attention over the sweep: what the tiled forward is compared with."""
    return M.reference_memory_sweep(cfg, g)


@attention.fixture(cost=4)
def flash_memory(cfg, g, flash_attention_forward):
    return M.flash_memory_sweep(cfg, g, flash_attention_forward)


@attention.check("<= max_linear_exponent", kind="outcome",
                 hint="never build a (Nq, Nk) tensor in the tiled forward: no full mask, no full score matrix.")
def flash_memory_grows_linearly(cfg, flash_memory):
    """The tiled forward holds one block_q x block_k tile plus O(N d) state and output, so doubling N at
    most doubles its peak memory (log2 of the ratio <= 1), where N x N scores would quadruple it."""
    return measure(M.doubling_exponents(flash_memory),
                   f"peak {flash_memory[0] / 2**20:.3f} -> {flash_memory[-1] / 2**20:.3f} MiB")


@attention.check(">= min_quadratic_exponent", kind="outcome",
                 hint="the reference must materialise the (Nq, Nk) scores; the meter must count every ATen "
                      "allocation, composite ops included.")
def reference_memory_grows_quadratically(cfg, reference_memory):
    """The reference (module code) holds the N x N scores and their masked copy, so doubling N
    quadruples its peak memory (log2 of the ratio = 2): the cost the tiled forward removes."""
    return measure(M.doubling_exponents(reference_memory),
                   f"peak {reference_memory[0] / 2**20:.3f} -> {reference_memory[-1] / 2**20:.1f} MiB")


@attention.check(">= min_memory_ratio", kind="outcome",
                 hint="tile the queries too, and allocate no workspace sized for the longest context.")
def flash_peak_memory_far_below_reference(cfg, reference_memory, flash_memory):
    """At long context the score matrix dominates: tiling cuts peak attention memory by orders of
    magnitude, which is what makes long sequences fit."""
    ratio = reference_memory[-1] / max(flash_memory[-1], 1)
    return measure(ratio, f"at N={cfg.memory_seq_lens[-1]}: {reference_memory[-1] / 2**20:.1f} MiB vs "
                          f"{flash_memory[-1] / 2**20:.3f} MiB")


@attention.check("<= max_tile_units", kind="outcome",
                 hint="score one block_q x block_k tile at a time: a (block_q, N) row of scores is still linear "
                      "in N but block_q / d times larger than the running state.")
def flash_memory_is_bounded_by_the_tile_size(cfg, flash_memory):
    """Beyond its output, a tiled forward needs one block_q x block_k score tile and at most a running
    (m, l, acc) per query row; scoring whole rows of keys at once is O(block_q N), which a linear
    growth exponent alone does not reveal."""
    units = M.extra_memory_in_tiles(flash_memory, cfg.memory_seq_lens, cfg.memory_head_dim,
                                    cfg.memory_block_q, cfg.memory_block_k)
    return measure(units, f"tile {cfg.memory_block_q}x{cfg.memory_block_k}, d={cfg.memory_head_dim}, "
                          f"N={cfg.memory_seq_lens[0]}..{cfg.memory_seq_lens[-1]}")


@attention.report
def memory_curves(ctx, cfg, reference_memory, flash_memory):
    lens = cfg.memory_seq_lens
    ctx.series("memory/reference_peak_mib", [p / 2**20 for p in reference_memory], lens,
               x_label="sequence length N (tokens)", group="memory/peak_mib", smooth=False,
               label="reference attention (N x N scores)", y_label="peak memory (MiB)", key=True,
               title="Peak memory against sequence length")
    ctx.series("memory/flash_peak_mib", [p / 2**20 for p in flash_memory], lens,
               x_label="sequence length N (tokens)", group="memory/peak_mib", smooth=False,
               label="flash attention (tiles)", y_label="peak memory (MiB)")
    units = M.extra_memory_in_tiles(flash_memory, lens, cfg.memory_head_dim, cfg.memory_block_q, cfg.memory_block_k)
    ctx.scalar(f"memory ratio at N={lens[-1]}", round(reference_memory[-1] / max(flash_memory[-1], 1), 2))
    ctx.scalar(f"reference peak MiB at N={lens[-1]}", round(reference_memory[-1] / 2**20, 3))
    ctx.scalar(f"tiled peak MiB at N={lens[-1]}", round(flash_memory[-1] / 2**20, 3))
    ctx.scalar("tiled growth exponent (last doubling)", round(M.doubling_exponents(flash_memory)[-1], 3))
    ctx.scalar("reference growth exponent (last doubling)", round(M.doubling_exponents(reference_memory)[-1], 3))
    ctx.scalar("tiled extra memory, max tile units", round(worst(units), 3))
