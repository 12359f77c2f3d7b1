"""Attention: reference softmax attention and a tiled FlashAttention-style forward (online softmax).

    Attention:        O = softmax(Q K^T / sqrt(d) + mask) V          (mask: 0 where allowed, -inf elsewhere)
    Online softmax:   a softmax over keys split into blocks is a fold of per-block states (m, l, acc):
                      m = max(m_a, m_b),  l = e^(m_a-m) l_a + e^(m_b-m) l_b,
                      acc = e^(m_a-m) acc_a + e^(m_b-m) acc_b,   O = acc / l
    GQA:              query head h reads key/value head h // (H / H_kv)   (repeat_kv)

Builds on: nothing. A standalone day-5 lesson on the attention operator itself: the tiny Llama of
modules/transformer keeps its own attention inside the model (its expand_kv_heads is repeat_kv here).
Deviations: the tiled forward is plain PyTorch looping over tiles in Python (the FlashAttention-2 loop
order: query blocks outside, key blocks inside, un-normalised accumulator divided once at the end). It
shows the algorithm and its O(N) memory, not the GPU speed: there is no SRAM here, and no backward.
Peak memory is measured by counting the bytes of every tensor PyTorch allocates (see PeakMemory);
run(cfg) sweeps it over the sequence length for both forwards.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch

# Private module, deliberately: PyTorch has no public API that reports what each ATen op allocates on
# the CPU. torch.profiler's public events aggregate memory per op (no order, so no peak), and the
# public TorchFunctionMode (torch.overrides) sees a call before composite ops decompose: under it,
# F.scaled_dot_product_attention with a boolean mask shows its (N, dv) output but not the (N, N)
# scores it allocates inside, which is exactly what the memory checks must see. TorchDispatchMode is
# the mechanism PyTorch's "Extending PyTorch" notes teach for this; tests/test_attention.py checks
# our count against torch.profiler's allocator events byte for byte.
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FORMULAS", "AttentionConfig",
    "attention_mask", "scaled_dot_product_attention", "repeat_kv",
    "softmax_state", "empty_softmax_state", "merge_softmax_states", "flash_attention_forward",
    "PeakMemory", "peak_memory_bytes", "memory_sweep", "doubling_exponents", "extra_memory_in_tiles",
    "MemoryResult", "reference_memory_sweep", "flash_memory_sweep", "run",
]

FORMULAS = [
    ("Scaled dot-product attention",
     r"$O=\mathrm{softmax}\left(\frac{QK^\top}{\sqrt{d}}+M\right)V,\ M_{ij}\in\{0,-\infty\}$"),
    ("Online softmax: merge two states",
     r"$m=\max(m_a,m_b),\ \ell=e^{m_a-m}\ell_a+e^{m_b-m}\ell_b,\ "
     r"\mathrm{acc}=e^{m_a-m}\mathrm{acc}_a+e^{m_b-m}\mathrm{acc}_b$"),
    ("Tiled output", r"$O_i=\mathrm{acc}_i/\ell_i$ after folding every key block $j$ into row block $i$"),
    ("Memory", r"reference $\Theta(N^2)$ (scores), tiled $\Theta(Nd + B_rB_c)$ (one tile + running state)"),
    ("Growth exponent", r"$\log_2 M(2N)/M(N)$: $\leq 1$ for linear memory, $2$ for the $N\times N$ scores"),
    ("Tile budget", r"$(\mathrm{peak}-|O|)\ /\ (B_rB_c + N_q(d_v+2))$ stays a small constant"),
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
    memory_head_dim: int = 16  # head dimension of the memory sweep (batch 1, 1 head, causal, float32);
    # small next to the blocks, so that a (block_q, N) row of scores is 8x one row state (N, d + 2)
    memory_block_q: int = 128  # query rows per tile of the tiled forward in the memory sweep
    memory_block_k: int = 128  # key rows per tile of the tiled forward in the memory sweep
    # The memory sweep counts bytes, so it gives the same numbers on every seed and machine, in both modes:
    # tiled doubling exponents <= 0.38, reference 2.00 at every doubling, ratio 298.7 at N = 4096, at most
    # 3.57 tile units (at N = 256). Each bar keeps at least 15 % of its scale to spare.
    max_linear_exponent: float = 1.5  # tiled: log2 peak(2N) / peak(N) at every doubling (measured <= 0.38;
    # any linear memory gives <= 1, FA1's loop order 0.72; the (N, N) scores give 2)
    min_quadratic_exponent: float = 1.7  # reference: the same, >= this (measured 2.00: N x N scores)
    min_memory_ratio: float = 100.0  # reference peak / tiled peak at memory_max_len (measured 298.7)
    max_tile_units: float = 5.0  # tiled: (peak - output) / (one score tile + one row state per query),
    # at every N (measured <= 3.57; FA1's loop order, keeping (m, l, acc) for every row, <= 3.19; a forward
    # that scores whole (block_q, N) rows reaches 17.6 at N = 4096)

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "n_cases": ">= 1", "max_seq_len": ">= 2", "max_head_dim": ">= 1", "max_block": ">= 1", "tol": "> 0",
        "n_merge_cases": ">= 1", "gqa_heads": ">= 1", "gqa_kv_heads": ">= 1", "memory_min_len": ">= 1",
        "memory_max_len": ">= 4", "memory_head_dim": ">= 1", "memory_block_q": ">= 1", "memory_block_k": ">= 1",
        "max_linear_exponent": "> 0", "min_quadratic_exponent": "> 0", "min_memory_ratio": "> 0",
        "max_tile_units": "> 0",
    }

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
        if self.memory_block_q < 1 or self.memory_block_k < 1 or self.memory_head_dim < 1:
            raise ValueError("memory_block_q, memory_block_k and memory_head_dim must be positive")

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
        # Private hook, deliberately: by default TorchDispatchMode wraps __torch_dispatch__ in a
        # torch.compile guard that imports torch._dynamo on first use (1-3 s, longer than the whole
        # audit); nothing is compiled here, and there is no public switch for it.
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


def doubling_exponents(peaks: list[int]) -> list[float]:
    """log2(M(2N) / M(N)) for each doubling of a sweep N, 2N, 4N, ...: the local growth exponent of
    memory M. For M = a + c N^b with a >= 0 it is at most b and tends to b as the N^b term dominates;
    any linear memory, even the max of two linear phases (a loop, then a final division), stays <= 1,
    and the N x N scores of the reference give 2."""
    return [math.log2(b / a) if a > 0 else (0.0 if b == 0 else math.inf) for a, b in zip(peaks, peaks[1:])]


def extra_memory_in_tiles(peaks: list[int], seq_lens: list[int], head_dim: int, block_q: int, block_k: int,
                          itemsize: int = 4) -> list[float]:
    """What a tiled forward holds beyond its output, in units of what it may hold: one score tile
    (block_q x block_k) plus one running state (m, l, acc: d + 2 numbers) per query row, the latter
    for implementations that keep every row's state at once (FlashAttention-1's loop order).
    (peak - N dv) / (block_q block_k + N (dv + 2)), in elements, for each N (batch 1, one head, dv = d).
    A small constant for a real tiled forward; it grows like block_q N / (N d) = block_q / d for one
    that scores a whole (block_q, N) row of keys at once, and like N for one holding (N, N) scores."""
    return [(peak / itemsize - n * head_dim) / (block_q * block_k + n * (head_dim + 2))
            for peak, n in zip(peaks, seq_lens)]


# ---------------------------------------------------------------------------------------------------
# The experiment: peak memory of both forwards as the sequence grows


@dataclass(frozen=True)
class MemoryResult:
    """Peak bytes of the reference and of the tiled forward at N = memory_min_len ... memory_max_len
    (batch 1, one head, causal, float32)."""

    seq_lens: list[int]
    reference_peaks: list[int]  # bytes; Theta(N^2): the score matrix and its masked copy
    flash_peaks: list[int]  # bytes; Theta(N d): the output, plus a few tiles
    tile_units: list[float]  # extra_memory_in_tiles of the tiled forward, per N

    @property
    def reference_exponents(self) -> list[float]:
        """log2 of the reference's peak ratio at each doubling of N: 2 for (N, N) scores."""
        return doubling_exponents(self.reference_peaks)

    @property
    def flash_exponents(self) -> list[float]:
        """log2 of the tiled forward's peak ratio at each doubling of N: at most 1 for linear memory."""
        return doubling_exponents(self.flash_peaks)

    @property
    def ratio(self) -> float:
        """Reference peak / tiled peak at the longest sequence."""
        return self.reference_peaks[-1] / max(self.flash_peaks[-1], 1)


def reference_memory_sweep(cfg: AttentionConfig, generator: torch.Generator,
                           attend: Callable | None = None) -> list[int]:
    """Peak bytes of the reference attention (or ``attend``) with a causal mask, for each N of the sweep."""
    attend = attend or scaled_dot_product_attention
    return memory_sweep(lambda q, k, v: attend(q, k, v, attention_mask(q.shape[-2], k.shape[-2], True)),
                        cfg.memory_seq_lens, cfg.memory_head_dim, generator)


def flash_memory_sweep(cfg: AttentionConfig, generator: torch.Generator,
                       flash: Callable = flash_attention_forward) -> list[int]:
    """Peak bytes of the tiled forward (causal, memory_block_q x memory_block_k tiles), for each N."""
    return memory_sweep(lambda q, k, v: flash(q, k, v, True, None, cfg.memory_block_q, cfg.memory_block_k),
                        cfg.memory_seq_lens, cfg.memory_head_dim, generator)


def run(cfg: AttentionConfig, generator: torch.Generator, *,
        scaled_dot_product_attention: Callable = scaled_dot_product_attention,
        flash_attention_forward: Callable = flash_attention_forward) -> MemoryResult:
    """The memory sweep of both forwards (the exactness checks live in the audit: they are pure math)."""
    flash_peaks = flash_memory_sweep(cfg, generator, flash_attention_forward)
    return MemoryResult(cfg.memory_seq_lens, reference_memory_sweep(cfg, generator, scaled_dot_product_attention),
                        flash_peaks, extra_memory_in_tiles(flash_peaks, cfg.memory_seq_lens, cfg.memory_head_dim,
                                                           cfg.memory_block_q, cfg.memory_block_k))
