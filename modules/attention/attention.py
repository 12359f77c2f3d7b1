"""Attention: reference softmax attention and a tiled FlashAttention-style forward (online softmax).

    Attention:        O = softmax(Q K^T / sqrt(d) + mask) V          (mask: 0 where allowed, -inf elsewhere)
    Online softmax:   a softmax over keys split into blocks is a fold of per-block states (m, l, acc):
                      m = max(m_a, m_b),  l = e^(m_a-m) l_a + e^(m_b-m) l_b,
                      acc = e^(m_a-m) acc_a + e^(m_b-m) acc_b,   O = acc / l
    GQA:              query head h reads key/value head h // (H / H_kv)   (repeat_kv)

Builds on: nothing (an issue-4 substrate module; the tiny Llama has its own attention inside the model).
Deviations: the tiled forward is plain PyTorch looping over tiles in Python (the FlashAttention-2 loop
order: query blocks outside, key blocks inside, un-normalised accumulator divided once at the end). It
shows the algorithm and its O(N) memory, not the GPU speed: there is no SRAM here, and no backward.
Peak memory is measured by counting the bytes of every tensor PyTorch allocates (see PeakMemory).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FORMULAS", "AttentionConfig",
    "attention_mask", "scaled_dot_product_attention", "repeat_kv",
    "softmax_state", "empty_softmax_state", "merge_softmax_states", "flash_attention_forward",
    "PeakMemory", "peak_memory_bytes", "memory_sweep", "growth_exponent",
]

FORMULAS = [
    ("Scaled dot-product attention",
     r"$O=\mathrm{softmax}\left(\frac{QK^\top}{\sqrt{d}}+M\right)V,\ M_{ij}\in\{0,-\infty\}$"),
    ("Online softmax: merge two states",
     r"$m=\max(m_a,m_b),\ \ell=e^{m_a-m}\ell_a+e^{m_b-m}\ell_b,\ "
     r"\mathrm{acc}=e^{m_a-m}\mathrm{acc}_a+e^{m_b-m}\mathrm{acc}_b$"),
    ("Tiled output", r"$O_i=\mathrm{acc}_i/\ell_i$ after folding every key block $j$ into row block $i$"),
    ("Memory", r"reference $\Theta(N^2)$ (scores), tiled $\Theta(Nd + B_rB_c)$ (one tile + running state)"),
]


@dataclass(frozen=True)
class AttentionConfig:
    dtype: Literal["float32", "float64"] = "float64"  # precision of the exactness checks (memory: float32)
    n_cases: int = 24  # random (shape, block sizes, mask) cases, tiled vs reference
    max_seq_len: int = 80  # longest key sequence in the random cases
    max_head_dim: int = 64  # largest head dimension in the random cases
    max_block: int = 40  # largest block size in the random cases (block sizes start at 1)
    tol: float = 1e-6  # max |difference| allowed for "equals" checks
    n_merge_cases: int = 16  # random splits of a softmax into 2-5 partial states
    gqa_heads: int = 8  # query heads in the GQA check
    gqa_kv_heads: int = 2  # key/value heads in the GQA check (must divide gqa_heads)
    memory_min_len: int = 256  # memory sweep: N = min_len, 2 min_len, ..., max_len
    memory_max_len: int = 4096  # the ratio reference / tiled is reported at this N
    memory_head_dim: int = 64  # head dimension of the memory sweep (batch 1, 1 head, causal)
    memory_block: int = 128  # block size of the tiled forward in the memory sweep
    max_linear_exponent: float = 1.15  # tiled: growth exponent of peak bytes in N must stay below this
    min_quadratic_exponent: float = 1.85  # reference: at least this (it materialises N x N scores)
    min_memory_ratio: float = 20.0  # reference peak / tiled peak at memory_max_len (bar set for N = 4096)

    def __post_init__(self):
        if self.gqa_kv_heads < 1 or self.gqa_heads % self.gqa_kv_heads:
            raise ValueError(f"gqa_kv_heads={self.gqa_kv_heads} must divide gqa_heads={self.gqa_heads}")
        lo, hi = self.memory_min_len, self.memory_max_len
        ratio = hi // max(lo, 1)
        if lo < 1 or ratio < 4 or ratio & (ratio - 1) or lo * ratio != hi:
            raise ValueError("memory_max_len must be memory_min_len times a power of two >= 4 "
                             f"(a doubling sweep of at least 3 lengths), got {lo}..{hi}")
        if self.n_cases < 1 or self.max_seq_len < 2 or self.max_head_dim < 1 or self.max_block < 1:
            raise ValueError("n_cases, max_seq_len (>= 2), max_head_dim and max_block must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def memory_seq_lens(self) -> list[int]:
        lens = [self.memory_min_len]
        while lens[-1] < self.memory_max_len:
            lens.append(2 * lens[-1])
        return lens

    @classmethod
    def toy(cls) -> AttentionConfig:
        return cls()

    @classmethod
    def full(cls) -> AttentionConfig:
        return cls(n_cases=96, max_seq_len=160, max_block=64, n_merge_cases=64)


# ---------------------------------------------------------------------------------------------------
# Reference attention


def attention_mask(n_q: int, n_k: int, causal: bool = False, window: int | None = None) -> torch.Tensor | None:
    """Boolean (n_q, n_k) mask, True where query i may attend to key j (None: no masking at all).

    Queries are the *last* n_q positions of the key sequence (as when decoding with a KV cache): query i
    sits at position p = n_k - n_q + i. Causal (needs n_q <= n_k): j <= p. Sliding window (only with
    causal, as in Mistral): also j > p - window, i.e. each query sees its `window` most recent keys,
    itself included.
    """
    if window is not None and not causal:
        raise ValueError("a sliding window is defined here only together with causal=True")
    if not causal:
        return None
    pos = torch.arange(n_k - n_q, n_k)[:, None]  # (n_q, 1) absolute query positions
    keys = torch.arange(n_k)[None, :]  # (1, n_k)
    allowed = keys <= pos
    if window is not None:
        allowed = allowed & (keys > pos - window)
    return allowed


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference attention: O = softmax(Q K^T / sqrt(d) with disallowed scores set to -inf) V.

    q: (B, H, Nq, d), k: (B, H, Nk, d), v: (B, H, Nk, dv)  ->  O: (B, H, Nq, dv), same dtype as q.
    mask: None (every query sees every key) or a bool tensor broadcastable to (B, H, Nq, Nk), True
    where query i may attend to key j (torch's convention for a boolean attn_mask). Every query row must
    be allowed at least one key. The softmax is over the key axis (the last one), so each row of
    attention weights sums to 1. For grouped-query attention, expand k and v with repeat_kv first.
    This materialises the (Nq, Nk) score matrix: memory grows as N^2.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: expand H_kv key/value heads to H = H_kv * n_rep query heads.

    x: (B, H_kv, N, d)  ->  (B, H_kv * n_rep, N, d), where output head h is a copy of input head
    h // n_rep (each KV head serves n_rep consecutive query heads), i.e.
    torch.repeat_interleave(x, n_rep, dim=1). n_rep = 1 returns x unchanged (multi-head attention);
    H_kv = 1 is multi-query attention.
    """
    B, H_kv, N, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None].expand(B, H_kv, n_rep, N, d).reshape(B, H_kv * n_rep, N, d)


# ---------------------------------------------------------------------------------------------------
# Online softmax: a softmax is a fold of partial states


def softmax_state(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial state of attention over one block of keys: (m, l, acc).

    scores: (..., R, n) already scaled and masked (-inf where not allowed), v: (..., n, dv).
    m = rowmax(scores), l = sum_j e^(s_j - m), acc = sum_j e^(s_j - m) v_j. A row with every key masked
    gives the empty state (m = -inf, l = 0, acc = 0) instead of NaN.
    """
    m = scores.amax(dim=-1)  # (..., R)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a fully masked row has m = -inf
    p = torch.exp(scores - m_safe[..., None])  # (..., R, n), exactly 0 where masked
    return m, p.sum(dim=-1), p @ v


def empty_softmax_state(shape: tuple[int, ...], dv: int, dtype: torch.dtype = torch.float32):
    """The identity of merge_softmax_states: m = -inf, l = 0, acc = 0 (a softmax over no keys)."""
    return (torch.full(shape, float("-inf"), dtype=dtype), torch.zeros(shape, dtype=dtype),
            torch.zeros(*shape, dv, dtype=dtype))


def merge_softmax_states(m_a: torch.Tensor, l_a: torch.Tensor, acc_a: torch.Tensor,
                         m_b: torch.Tensor, l_b: torch.Tensor, acc_b: torch.Tensor):
    """Combine two partial softmax-attention states over disjoint key sets into one (online softmax).

    A state over a key set S is (m, l, acc) with m = max_{j in S} s_j, l = sum_{j in S} e^(s_j - m) and
    acc = sum_{j in S} e^(s_j - m) v_j; the attention output over S is acc / l.
    m_*, l_*: (...,), acc_*: (..., dv)  ->  (m, l, acc) of the union S_a + S_b, same shapes:
        m = max(m_a, m_b),  l = e^(m_a - m) l_a + e^(m_b - m) l_b,  acc = e^(m_a - m) acc_a + e^(m_b - m) acc_b.
    The empty state (m = -inf, l = 0, acc = 0) must act as the identity, and merging two empty states
    must give the empty state, never NaN (-inf - (-inf) is NaN: treat m = -inf specially).
    """
    m = torch.maximum(m_a, m_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: keep everything at 0
    scale_a, scale_b = torch.exp(m_a - m_safe), torch.exp(m_b - m_safe)  # each <= 1: no overflow
    return m, scale_a * l_a + scale_b * l_b, scale_a[..., None] * acc_a + scale_b[..., None] * acc_b


# ---------------------------------------------------------------------------------------------------
# Tiled FlashAttention-style forward


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            window: int | None = None, block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Tiled exact attention with an online softmax: never materialises the (Nq, Nk) score matrix.

    q: (B, H, Nq, d), k: (B, H, Nk, d), v: (B, H, Nk, dv)  ->  O: (B, H, Nq, dv), same dtype as q,
    equal to softmax(Q K^T / sqrt(d) + mask) V up to rounding. block_q / block_k: rows of Q and of K/V
    per tile (any positive ints; the last block of each may be shorter). For each block of queries,
    keep a running row max m, normaliser l and un-normalised output acc (start: -inf, 0, 0); for each
    block of keys: S = Q_i K_j^T / sqrt(d), masked to -inf; m_new = max(m, rowmax S);
    P = exp(S - m_new); l = e^(m - m_new) l + rowsum P; acc = e^(m - m_new) acc + P V_j; m = m_new.
    Finally O_i = acc / l. Masks (queries are the last Nq positions: query i is at p = Nk - Nq + i):
    causal (needs Nq <= Nk) keeps keys j <= p; window (only with causal) also requires j > p - window.
    Rows or whole tiles with no allowed key must not produce NaN; tiles entirely outside the mask may
    be skipped.
    Extra memory: O(B H (Nq dv + block_q block_k)), linear in the sequence length.
    """
    if window is not None and not causal:
        raise ValueError("a sliding window is defined here only together with causal=True")
    B, H, Nq, d = q.shape
    Nk, dv = k.shape[-2], v.shape[-1]
    offset = Nk - Nq  # absolute position of query 0
    out = torch.empty(B, H, Nq, dv, dtype=q.dtype)
    for i0 in range(0, Nq, block_q):
        i1 = min(i0 + block_q, Nq)
        p_first, p_last = offset + i0, offset + i1 - 1  # positions of this block's first and last query
        q_blk = q[:, :, i0:i1] / math.sqrt(d)  # (B, H, bq, d)
        m = torch.full((B, H, i1 - i0), float("-inf"), dtype=q.dtype)  # running row max
        l = torch.zeros(B, H, i1 - i0, dtype=q.dtype)  # running normaliser
        acc = torch.zeros(B, H, i1 - i0, dv, dtype=q.dtype)  # running un-normalised output
        # visit only the key blocks that intersect the band [first allowed key, last allowed key]
        k_lo = max(0, p_first - window + 1) if window is not None else 0
        k_hi = min(Nk, p_last + 1) if causal else Nk
        for j0 in range(k_lo - k_lo % block_k, k_hi, block_k):
            j1 = min(j0 + block_k, Nk)
            scores = q_blk @ k[:, :, j0:j1].transpose(-2, -1)  # (B, H, bq, bk): the only tile in memory
            # only tiles that straddle the diagonal (or the window's edge) need an element-wise mask
            if (causal and j1 - 1 > p_first) or (window is not None and j0 <= p_last - window):
                pos = torch.arange(p_first, p_last + 1)[:, None]  # (bq, 1)
                keys = torch.arange(j0, j1)[None, :]  # (1, bk)
                allowed = keys <= pos
                if window is not None:
                    allowed = allowed & (keys > pos - window)
                scores = scores.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m, scores.amax(dim=-1))
            # a row that has not seen an allowed key yet has m_new = -inf; exp(-inf - (-inf)) would be NaN
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(scores - m_safe[..., None])  # (B, H, bq, bk)
            alpha = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[:, :, j0:j1]
            m = m_new
        out[:, :, i0:i1] = acc / l[..., None]  # normalise once, at the end (FlashAttention-2)
    return out


# ---------------------------------------------------------------------------------------------------
# Measuring peak memory


class PeakMemory(TorchDispatchMode):
    """Count the bytes PyTorch allocates while the mode is active, and their peak.

    Every ATen operation (after autograd and composite ops are decomposed) passes through
    __torch_dispatch__. A result whose storage is not one of the operation's inputs' storages is a new
    allocation: its storage's bytes are added to `live`. Views and in-place results share a storage and
    add nothing. A storage's bytes are subtracted when the last tensor viewing it is garbage-collected
    (weakref callbacks; tensors created before the mode, such as the inputs, are never counted).
    `peak` is the maximum of `live`: the extra memory the code needed, its output included.
    tests/test_attention.py checks this accounting against torch.profiler's allocator events.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._views: dict[int, int] = {}  # storage address -> live tensors on it
        self._bytes: dict[int, int] = {}  # storage address -> size
        self._refs: dict[int, weakref.ref] = {}  # kept alive so that their callbacks run

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ in a torch.compile guard by default, which imports torch._dynamo
        # (about a second) on first use; nothing is compiled here
        return False

    def _release(self, ref: weakref.ref, key: int) -> None:
        del self._refs[id(ref)]
        self._views[key] -= 1
        if self._views[key] == 0:
            self.live -= self._bytes.pop(key)
            del self._views[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = None
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._views:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in _tensors(args) + _tensors(kwargs)}
                if key in inputs or storage.nbytes() == 0:  # a view of (or in place on) an uncounted tensor
                    continue
                self._views[key], self._bytes[key] = 0, storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._views[key] += 1
            ref = weakref.ref(t, lambda ref, key=key: self._release(ref, key))
            self._refs[id(ref)] = ref
        return out


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in an ATen op's arguments or results: a tensor, or a tuple / list / dict holding
    tensors or lists of tensors (torch.cat's argument)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    found = []
    for item in tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (tuple, list)) else ():
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            found.extend(x for x in item if isinstance(x, torch.Tensor))
    return found


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch while running fn() (the result is dropped after the call)."""
    with PeakMemory() as meter:
        fn()
    return meter.peak


def memory_sweep(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 seq_lens: list[int], head_dim: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> list[int]:
    """Peak bytes of attend(q, k, v) for q, k, v of shape (1, 1, N, head_dim), for each N in seq_lens.
    Whatever attend builds (masks included) is counted; the inputs are not."""
    peaks = []
    for n in seq_lens:
        q, k, v = (torch.randn(1, 1, n, head_dim, generator=generator, dtype=dtype) for _ in range(3))
        peaks.append(peak_memory_bytes(lambda: attend(q, k, v)))
    return peaks


def growth_exponent(seq_lens: list[int], peaks: list[int]) -> float:
    """The exponent b of the N-dependent part of memory, a + c N^b, from the last three points of a
    doubling sweep: the increment from N/2 to N is 2^b times the increment from N/4 to N/2, so
    b = log2(increment ratio): 1 for linear growth, 2 for quadratic, whatever the constant a is."""
    if len(peaks) < 3 or seq_lens[-1] != 2 * seq_lens[-2] or seq_lens[-2] != 2 * seq_lens[-3]:
        raise ValueError("growth_exponent needs at least three doubling sequence lengths")
    last, before = peaks[-1] - peaks[-2], peaks[-2] - peaks[-3]
    if last <= 0:
        return 0.0  # not growing at all
    return math.log2(last / before) if before > 0 else float("inf")
