"""Tokenizer: byte-level BPE with a GPT-4-style split, ChatML special tokens, JSON save/load.

    training:  repeat  (a, b) = argmax_pair count(pair);  new id = 256 + rank;  replace a b -> new id
    encoding:  repeat  (a, b) = argmin_pair rank(pair) over adjacent pairs;  replace;  until no pair has a rank
    decoding:  b"".join(vocab[i] for i in ids).decode("utf-8")      (join first, decode once)
    vocab:     256 bytes + one token per merge + the special tokens

Builds on: nothing (the language-model substrate; sft imports it). run(cfg) trains on a generated zh/en
corpus, counting the tokens each merge reads (the machine-independent cost of training), and measures
compression on held-out text as the vocabulary grows.
Deviations from minbpe / tiktoken: ties between equally frequent pairs go to the smallest pair
(a, b) instead of the first pair seen, so that an incremental trainer and a recount-every-merge trainer
learn exactly the same merges (and "aaabdaaabac" learns Wikipedia's aa, ab, (aa)(ab)). The GPT-4 split
pattern is written with the standard library's `re` (which has no \\p{L}); it equals the `regex`-module
pattern on every assigned code point (checked in the tests).
"""
from __future__ import annotations

import array
import functools
import gc
import heapq
import itertools
import json
import random
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable


__all__ = [
    "FORMULAS", "TokenizerConfig", "GPT4_SPLIT_PATTERN", "split_regex", "split_text",
    "PAD", "BOS", "EOS", "IM_START", "IM_END", "SPECIAL_TOKENS", "render_chatml",
    "special_token_ids", "merge_pair", "BPEState", "pair_counts", "best_pair", "bpe_train_step",
    "CountingChunks", "chunk_counts", "Training", "learn_merges", "train_bpe", "train_bpe_naive",
    "Tokenizer", "allowed_specials", "special_split_regex", "encode_naive",
    "EN_WORDS", "ZH_WORDS", "EMOJI", "mixed_corpus", "REPEATED_RUNS", "random_unicode_strings",
    "bytes_per_token", "compression_curve", "time_call", "Corpus", "make_corpus", "TokenizerResult", "run",
]

FORMULAS = [
    ("Merge rule (training)", r"$(a,b)^{*}=\arg\max_{(a,b)}\ \sum_{w} n_w\,\#_{(a,b)}(w)$"),
    ("Encoding", r"$(a,b)=\arg\min_{(a,b)\in\mathrm{pairs}(x)}\ \mathrm{rank}(a,b)$"),
    ("Vocabulary", r"$|V| = 256 + n_{\mathrm{merges}} + n_{\mathrm{special}}$"),
    ("Compression", r"$\mathrm{bytes/token}=|\mathrm{utf8}(x)|\ /\ |\mathrm{encode}(x)|$"),
    ("Work ratio", r"$\sum_t |\mathrm{state}_t|\ /\ \sum_t |\mathrm{chunks\ read}_t|$ (recount / incremental)"),
]


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 512  # total: 256 bytes + merges + the 5 special tokens
    corpus_bytes: int = 60_000  # generated zh/en training text (full mode: ~1 MB)
    heldout_bytes: int = 20_000  # generated text of the same kind, never trained on
    zh_fraction: float = 0.5  # share of Chinese sentences in the generated corpus
    curve_points: int = 6  # vocabulary sizes on the bytes-per-token curve (prefixes of the merges)
    encoder_corpus_bytes: int = 60_000  # prefix of the corpus the reference vocabulary for the encoding,
    # special-token and save/load checks is trained on (they test module code and merge_pair, not training)
    bench_bytes: int = 16_000  # corpus for the one-merge-at-a-time comparison with an independent oracle
    bench_merges: int = 128  # merges compared one at a time (counts, chunks, index, heap)
    min_work_ratio: float = 9.0  # tokens a recount reads / tokens the incremental steps read, over the
    # whole training: worst of toy seeds 0-19 is 11.2 (60 KB, 251 merges), bar 9; recounting gives 0.5
    n_random_strings: int = 300  # random Unicode strings for the round trip
    max_string_len: int = 40  # code points per random string
    min_bytes_per_token: float = 1.9  # held-out compression at the full vocabulary: worst of toy seeds
    # 0-19 is 2.18, bar 1.9
    min_compression_step: float = 0.05  # bytes/token gained from each curve point to the next: worst of toy
    # seeds 0-19 is 0.105 (full seeds 0-4: 0.168), bar 0.05; merging the rarest pair gains ~0

    # allowed values of the numeric fields, checked before any work (a --set outside is a usage error)
    RANGES = {
        "vocab_size": ">= 261", "corpus_bytes": ">= 1", "heldout_bytes": ">= 1", "zh_fraction": "[0, 1]",
        "curve_points": ">= 2", "encoder_corpus_bytes": ">= 1", "bench_bytes": ">= 1000", "bench_merges": ">= 1",
        "min_work_ratio": "> 0", "n_random_strings": ">= 1", "max_string_len": ">= 1", "min_bytes_per_token": "> 0",
        "min_compression_step": ">= 0",
    }

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {self.vocab_size}")
        if not 0.0 <= self.zh_fraction <= 1.0:
            raise ValueError(f"zh_fraction must be in [0, 1], got {self.zh_fraction}")
        if self.curve_points < 2:
            raise ValueError("curve_points must be at least 2")
        if self.bench_merges < 1 or self.bench_bytes < 1000:
            raise ValueError("the step-by-step comparison needs bench_merges >= 1 and bench_bytes >= 1000")

    @classmethod
    def toy(cls) -> TokenizerConfig:
        return cls()

    @classmethod
    def full(cls) -> TokenizerConfig:
        return cls(vocab_size=1024, corpus_bytes=1_000_000, heldout_bytes=100_000, curve_points=8,
                   encoder_corpus_bytes=200_000, bench_bytes=30_000, bench_merges=128, n_random_strings=2000,
                   min_bytes_per_token=3.4,  # worst of full seeds 0-4 is 3.77 (1 MB, V = 1024), bar 3.4
                   min_work_ratio=14.0)  # worst of full seeds 0-4 is 18.3 (763 merges), bar 14


# ------------------------------------------------------------------------------------------------
# Pre-tokenization: the GPT-4 split pattern without the `regex` module

# verbatim from tiktoken's cl100k_base (via minbpe); needs the `regex` module for \p{L}, \p{N}, ?+ and ++
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# Unicode White_Space (Python's \s also matches the separators \x1c-\x1f; `regex` and tiktoken do not)
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _char_class(chars: Iterable[str]) -> str:
    """'a', 'b', 'c', 'x' -> 'a-cx' (contents of a [...] class, escaped)."""
    cps, parts = sorted(map(ord, chars)), []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = re.escape(chr(cps[i])), re.escape(chr(cps[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(parts)


@functools.cache
def split_regex() -> re.Pattern:
    """GPT4_SPLIT_PATTERN for the standard library's `re` (built once, ~0.1 s).

    `re` knows \\w (letters, numbers, _) and \\d (decimal digits, category Nd) but not \\p{L} / \\p{N}.
    The gap is the numbers that are not decimal digits (categories Nl and No: Ⅻ, ², ①, ...), so
        \\p{N} = [\\d X]     \\p{L} = [^\\W\\d_ X]     [^\\p{L}\\p{N}] = [^\\w] or _
    with X listed once from unicodedata. The possessive ?+ and ++ are dropped: after them comes either
    a letter run that cannot start on the optional character, or [\\r\\n]* which never fails, so
    backtracking into them never changes a match.
    """
    every_char = array.array("I", range(0x110000)).tobytes().decode("utf-32-le", "surrogatepass")
    other_numbers = _char_class(c for c in filter(str.isnumeric, every_char)
                                if unicodedata.category(c) in ("Nl", "No"))
    letter = rf"[^\W\d_{other_numbers}]"
    number = rf"[\d{other_numbers}]"
    not_letter_number_newline = r"(?:[^\w\r\n]|_)"
    not_space_letter_number = rf"(?:[^\w{_WS}]|_)"
    return re.compile(
        rf"'(?i:[sdmt]|ll|ve|re)"  # English contractions
        rf"|{not_letter_number_newline}?{letter}+"  # a word with at most one leading symbol/space
        rf"|{number}{{1,3}}"  # numbers in groups of at most three digits
        rf"| ?{not_space_letter_number}+[\r\n]*"  # punctuation runs
        rf"|[{_WS}]*[\r\n]"  # newlines (with the spaces before them)
        rf"|[{_WS}]+(?![^{_WS}])"  # spaces, leaving the last one to the next word
        rf"|[{_WS}]+")


def split_text(text: str) -> list[str]:
    """Pre-tokenize: the chunks that BPE merges never cross. ''.join(split_text(t)) == t."""
    return split_regex().findall(text)


# ------------------------------------------------------------------------------------------------
# Special tokens (ChatML + pad/bos/eos); their ids follow the merges

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)


def render_chatml(messages: list[tuple[str, str]]) -> str:
    """[(role, content), ...] -> '<|im_start|>role\\ncontent<|im_end|>\\n...' (ChatML)."""
    return "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)


def special_token_ids(n_merges: int, specials: Iterable[str] = SPECIAL_TOKENS) -> dict[str, int]:
    """Specials come right after the merges: 256 + n_merges, 256 + n_merges + 1, ..."""
    return {tok: 256 + n_merges + k for k, tok in enumerate(specials)}


# ------------------------------------------------------------------------------------------------
# Kernels


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, scanning left to right.

    ids:    list[int], length n >= 0 (token ids)
    pair:   (a, b), two token ids
    new_id: int, the id of the merged token
    returns a new list[int] (``ids`` is not modified). Occurrences do not overlap: the scan takes the
    leftmost match and continues after it, so [a, a, a] with pair (a, a) becomes [new_id, a].
    Example: merge_pair([5, 6, 5, 6, 7], (5, 6), 99) == [99, 99, 7].
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


@dataclass
class BPEState:
    """Everything an incremental BPE trainer keeps between merges (see ``bpe_train_step``)."""

    chunks: list[list[int]]  # the distinct pre-tokenized chunks, as current token ids
    weights: list[int]  # weights[i] = how many times chunk i occurs in the corpus
    counts: dict[tuple[int, int], int]  # weighted count of every adjacent pair (only counts > 0)
    where: dict[tuple[int, int], set[int]]  # indices of chunks that may contain the pair (a superset)
    heap: list[tuple[int, int, int]] = field(default_factory=list)  # (-count, a, b), stale entries allowed

    @classmethod
    def from_chunks(cls, chunk_counts: dict[bytes, int]) -> BPEState:
        """Build the state from {chunk bytes: occurrences} (chunk order = dict order)."""
        chunks = [list(c) for c in chunk_counts]
        weights = list(chunk_counts.values())
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, ids in enumerate(chunks):
            for p in zip(ids, ids[1:]):
                where[p].add(i)
        counts = pair_counts(chunks, weights)
        heap = [(-c, a, b) for (a, b), c in counts.items()]
        heapq.heapify(heap)
        return cls(chunks, weights, counts, dict(where), heap)


def pair_counts(chunks: Iterable[list[int]], weights: Iterable[int]) -> dict[tuple[int, int], int]:
    """Recount: {(a, b): sum of weight x occurrences of (a, b)} over all chunks (only counts > 0)."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for ids, w in zip(chunks, weights):
        for p in zip(ids, ids[1:]):
            counts[p] += w
    return dict(counts)


def best_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int] | None:
    """The most frequent pair, ties to the smallest (a, b); None when there is no pair."""
    if not counts:
        return None
    top = max(counts.values())
    return min(p for p, c in counts.items() if c == top)


def bpe_train_step(state: BPEState, new_id: int) -> tuple[int, int] | None:
    """One merge of BPE training, updating the pair counts incrementally (in place).

    state.chunks:  list[list[int]], the distinct chunks of the corpus as token ids
    state.weights: list[int], weights[i] = occurrences of chunk i in the corpus
    state.counts:  dict[(a, b) -> int], count(a, b) = sum_i weights[i] * #occurrences of (a, b) in
                   chunks[i]; exact, and only pairs with a positive count are present
    state.where:   dict[(a, b) -> set[int]], for every pair in counts, a set of chunk indices that
                   contains every chunk holding the pair (extra indices are allowed)
    state.heap:    list of (-count, a, b) kept by heapq: every pair in counts has an entry with its
                   current count; entries whose count is out of date may remain and are skipped
    new_id:        the id to give the merged token N (256 + number of merges so far)

    1. Pick the most frequent pair (a, b); ties go to the smallest pair (compare a, then b), i.e. the
       smallest (-count, a, b) in the heap.
    2. In every chunk listed in where[(a, b)], replace (a, b) by N left to right, non-overlapping (as
       ``merge_pair``). Counts change only at the merge sites: for x a b y -> x N y (weight w),
       (a, b), (x, a), (b, y) lose w and (x, N), (N, y) gain w, where x is the token now left of the
       site (an N made a moment ago in a b a b) and y the old token to its right.
    3. Leave counts, where and heap describing the new chunks. Never recount the corpus: read only
       the chunks listed in where[(a, b)] (the audit counts the tokens a step reads through
       state.chunks), and change counts only at the merge sites, which also keeps it fast on the clock.
    Returns the merged pair (a, b), or None if no pair is left (every chunk is a single token).
    """
    counts, heap, where = state.counts, state.heap, state.where
    while heap:  # pop until an entry matches its pair's current count (the rest are stale)
        neg_count, a, b = heapq.heappop(heap)
        if counts.get((a, b)) == -neg_count:
            break
    else:
        return None
    delta: dict[tuple[int, int], int] = defaultdict(int)
    for i in where.pop((a, b)):
        ids, w = state.chunks[i], state.weights[i]
        out, j, n, merged = [], 0, len(ids), False
        while j < n:
            if j + 1 < n and ids[j] == a and ids[j + 1] == b:
                delta[a, b] -= w
                if out:  # x a b -> x N
                    x = out[-1]
                    delta[x, a] -= w
                    delta[x, new_id] += w
                    where.setdefault((x, new_id), set()).add(i)
                if j + 2 < n:  # a b y -> N y
                    y = ids[j + 2]
                    delta[b, y] -= w
                    delta[new_id, y] += w
                    where.setdefault((new_id, y), set()).add(i)
                out.append(new_id)
                j, merged = j + 2, True
            else:
                out.append(ids[j])
                j += 1
        if merged:  # (an index may be stale: the pair can have left this chunk in an earlier merge)
            state.chunks[i] = out
    for p, d in delta.items():
        if d == 0:  # e.g. (N, a) added by one site of a b a b and taken back by the next
            continue
        c = counts.get(p, 0) + d
        if c > 0:
            counts[p] = c
            heapq.heappush(heap, (-c, p[0], p[1]))
        else:
            del counts[p]
    return a, b


# ------------------------------------------------------------------------------------------------
# Training


def chunk_counts(text: str) -> dict[bytes, int]:
    """{utf-8 chunk: occurrences}, in order of first appearance."""
    return dict(Counter(c.encode("utf-8") for c in split_text(text)))


class CountingChunks(list):
    """The chunks of a BPEState, counting the tokens a training step reads through them: every chunk
    it indexes or iterates over adds its length to ``read``. A machine-independent measure of a
    step's work: a recount reads every chunk, an incremental step only those listed in where[pair].
    ``tokens()`` (what one recount would read) re-measures only the chunks read or written since its
    last call, so counting costs about what the step itself reads."""

    def __init__(self, chunks: Iterable[list[int]] = ()):
        super().__init__(chunks)
        self.read = 0
        self._lengths = [len(c) for c in list.__iter__(self)]
        self._total = sum(self._lengths)
        self._touched: set[int] = set()
        self._all_touched = False

    def _touch(self, index) -> None:
        if isinstance(index, int):
            self._touched.add(index % len(self))
        else:
            self._all_touched = True

    def __getitem__(self, index):
        item = super().__getitem__(index)
        self.read += len(item) if isinstance(index, int) else sum(map(len, item))
        self._touch(index)
        return item

    def __setitem__(self, index, value):
        super().__setitem__(index, value)
        self._touch(index)

    def __iter__(self):
        self._all_touched = True
        for chunk in super().__iter__():
            self.read += len(chunk)
            yield chunk

    def tokens(self) -> int:
        """All tokens held, without counting them as read."""
        if self._all_touched or len(self) != len(self._lengths):
            self._lengths = [len(c) for c in list.__iter__(self)]
            self._total = sum(self._lengths)
        else:
            for i in self._touched:
                n = len(list.__getitem__(self, i))
                self._total += n - self._lengths[i]
                self._lengths[i] = n
        self._touched.clear()
        self._all_touched = False
        return self._total


@dataclass
class Training:
    """What learn_merges measured: the tokenizer, and per merge the tokens the step read through
    state.chunks next to the tokens of the whole state (what recounting the pairs would read)."""

    tokenizer: Tokenizer
    tokens_read: list[int]
    state_tokens: list[int]
    cpu_s: float

    @property
    def work_ratio(self) -> float:
        """Tokens a recount would read over the whole training / tokens the steps read."""
        return sum(self.state_tokens) / max(sum(self.tokens_read), 1)


def learn_merges(text: str, vocab_size: int, specials: Iterable[str] = SPECIAL_TOKENS, *,
                 step: Callable = bpe_train_step, merge: Callable = merge_pair) -> Training:
    """Learn vocab_size - 256 - len(specials) merges from ``text`` with ``step``, counting the tokens
    each step reads. Stops early when the corpus is exhausted or ``step`` returns an invalid pair (a
    pair merged twice, an unknown id); then the vocabulary is smaller than asked."""
    specials = tuple(specials)
    start = time.process_time()
    collecting = gc.isenabled()
    # Training allocates millions of small lists and tuples and frees them by reference counting; the
    # cyclic collector would only walk every live object again and again (torch's too, if loaded).
    gc.disable()
    try:
        training = _learn_merges(text, vocab_size, specials, step, merge)
    finally:
        if collecting:
            gc.enable()
    training.cpu_s = time.process_time() - start
    return training


def _learn_merges(text: str, vocab_size: int, specials: tuple[str, ...], step: Callable,
                  merge: Callable) -> Training:
    state = BPEState.from_chunks(chunk_counts(text))
    merges: dict[tuple[int, int], int] = {}
    tokens_read, state_tokens = [], []
    for i in range(vocab_size - 256 - len(specials)):
        if not isinstance(state.chunks, CountingChunks):  # (again, if a step replaced the list)
            state.chunks = CountingChunks(state.chunks)
        chunks = state.chunks
        state_tokens.append(chunks.tokens())
        before = chunks.read
        pair = step(state, 256 + i)
        tokens_read.append(chunks.read - before)
        if pair is None:  # the corpus is exhausted: every chunk is one token
            break
        pair = tuple(pair)
        if pair in merges or not all(0 <= t < 256 + i for t in pair):
            break  # a broken step: keep what was learned so far
        merges[pair] = 256 + i
    tok = Tokenizer(merges, special_token_ids(len(merges), specials), merge=merge)
    return Training(tok, tokens_read, state_tokens, cpu_s=0.0)


def train_bpe(text: str, vocab_size: int, specials: Iterable[str] = SPECIAL_TOKENS, *,
              step: Callable = bpe_train_step, merge: Callable = merge_pair) -> Tokenizer:
    """Learn vocab_size - 256 - len(specials) merges from ``text`` with ``step`` (incremental); the
    tokenizer encodes with ``merge``. See learn_merges."""
    return learn_merges(text, vocab_size, specials, step=step, merge=merge).tokenizer


def train_bpe_naive(text: str, vocab_size: int, specials: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """The recount-every-merge trainer (minbpe's RegexTokenizer, with our tie rule): count every
    pair of every chunk of the corpus, merge the best one everywhere, repeat. O(merges x text)."""
    specials = tuple(specials)
    chunks = [list(c.encode("utf-8")) for c in split_text(text)]
    merges: dict[tuple[int, int], int] = {}
    for i in range(vocab_size - 256 - len(specials)):
        stats: dict[tuple[int, int], int] = defaultdict(int)
        for ids in chunks:
            for p in zip(ids, ids[1:]):
                stats[p] += 1
        if not stats:
            break
        pair = best_pair(stats)  # most frequent, then smallest pair
        merges[pair] = 256 + i
        chunks = [merge_pair(ids, pair, 256 + i) for ids in chunks]
    return Tokenizer(merges, special_token_ids(len(merges), specials))


# ------------------------------------------------------------------------------------------------
# The tokenizer: encode, decode, special tokens, save/load


def allowed_specials(allowed: str | set[str], specials: dict[str, int], text: str) -> dict[str, int]:
    """Which special tokens ``encode`` may emit for ``text``.

    "all": every special; "none": none (their strings are encoded as ordinary text); "none_raise"
    (the default, as tiktoken): none, and a special string inside the text is an error; a set: those.
    """
    if allowed == "all":
        return dict(specials)
    if allowed == "none":
        return {}
    if allowed == "none_raise":
        found = [s for s in specials if s in text]
        if found:
            raise ValueError(f"text contains special token(s) {found}; pass allowed_special='all' to "
                             "encode them as special ids or 'none' to encode them as ordinary text")
        return {}
    if isinstance(allowed, (set, frozenset)):
        return {s: i for s, i in specials.items() if s in allowed}
    raise ValueError(f"allowed_special must be 'all', 'none', 'none_raise' or a set, got {allowed!r}")


def special_split_regex(specials: Iterable[str]) -> re.Pattern:
    """A pattern whose re.split keeps the specials as separate parts; escaped ('|' is regex syntax),
    longest first so that one special that is a prefix of another never wins."""
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


_NO_MERGE = 1 << 62  # the "rank" of a pair that has no merge


class Tokenizer:
    """Byte-level BPE: merges {(a, b): new_id} with new_id = 256 + rank, plus special tokens."""

    def __init__(self, merges: dict[tuple[int, int], int], special_tokens: dict[str, int],
                 merge: Callable = merge_pair):
        self.merges = dict(merges)
        self.special_tokens = dict(special_tokens)
        self.merge = merge  # the merge_pair used by encoding (an audited kernel)
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for (a, b), new_id in sorted(self.merges.items(), key=lambda kv: kv[1]):
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        for tok, i in self.special_tokens.items():
            self.vocab[i] = tok.encode("utf-8")
        self.special_ids = {i: tok for tok, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_id(self, special: str) -> int:
        return self.special_tokens[special]

    def truncated(self, n_merges: int) -> Tokenizer:
        """The tokenizer BPE would have learned with only the first n_merges merges (training is greedy,
        so a shorter run learns a prefix of the same merges); specials move to follow them."""
        merges = {p: i for p, i in self.merges.items() if i < 256 + n_merges}
        return Tokenizer(merges, special_token_ids(len(merges), self.special_tokens), merge=self.merge)

    def encode_chunk(self, data: bytes) -> list[int]:
        """Merge the lowest-rank pair present (new ids grow with rank), until no pair has a merge."""
        ids = list(data)
        rank_of = self.merges.get
        while len(ids) >= 2:
            ranks = list(map(rank_of, zip(ids, ids[1:]), itertools.repeat(_NO_MERGE)))
            best = min(ranks)
            if best == _NO_MERGE:
                break
            k = ranks.index(best)
            merged = self.merge(ids, (ids[k], ids[k + 1]), best)
            if len(merged) >= len(ids):  # a merge that merges nothing would loop forever
                raise ValueError(f"merge {(ids[k], ids[k + 1])} -> {best} left {len(ids)} ids as {len(merged)}")
            ids = merged
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ignoring special tokens (their strings are plain text). Chunks are cached."""
        out: list[int] = []
        cache = self._cache
        for chunk in split_text(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = cache[chunk] = self.encode_chunk(chunk.encode("utf-8"))
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special: str | set[str] = "none_raise") -> list[int]:
        """Encode text; special-token strings become their single id only where allowed."""
        special = allowed_specials(allowed_special, self.special_tokens, text)
        if not special:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for part in special_split_regex(special).split(text):
            if part in special:
                ids.append(special[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Join the bytes of all tokens, then decode once (a token may end inside a character)."""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except KeyError as exc:
            raise ValueError(f"invalid token id {exc.args[0]}") from None
        return data.decode("utf-8", errors="replace")

    # -- save / load as JSON: merges in rank order (their ids are implied), specials with their ids

    def to_dict(self) -> dict:
        ranked = sorted(self.merges.items(), key=lambda kv: kv[1])
        return {"format": "llmaudit-bpe", "version": 1, "pattern": GPT4_SPLIT_PATTERN,
                "merges": [[a, b] for (a, b), _ in ranked], "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_dict(cls, d: dict, merge: Callable = merge_pair) -> Tokenizer:
        if d.get("format") != "llmaudit-bpe" or d.get("version") != 1:
            raise ValueError("not an llmaudit-bpe v1 tokenizer")
        if d.get("pattern") != GPT4_SPLIT_PATTERN:
            raise ValueError("unknown split pattern")
        merges = {(a, b): 256 + i for i, (a, b) in enumerate(d["merges"])}
        return cls(merges, {str(k): int(v) for k, v in d["special_tokens"].items()}, merge=merge)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, merge: Callable = merge_pair) -> Tokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), merge=merge)


def encode_naive(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """The reference encoder: for every chunk, apply each merge in rank order to the whole chunk.
    Slow (O(merges x length)), independent of Tokenizer.encode_chunk and of merge_pair."""
    ranked = sorted(merges.items(), key=lambda kv: kv[1])
    out: list[int] = []
    for chunk in split_text(text):
        ids = list(chunk.encode("utf-8"))
        for (a, b), new_id in ranked:
            if len(ids) < 2:
                break
            if a not in ids:
                continue
            merged, i = [], 0
            while i < len(ids):
                if ids[i] == a and i + 1 < len(ids) and ids[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out.extend(ids)
    return out


# ------------------------------------------------------------------------------------------------
# Data: a generated zh/en corpus and random Unicode strings (no downloads)

EN_WORDS = (
    "the of and to a in is that for it as with was on be by this are from at or an not have which but "
    "one all can they their has been more will model data training loss learning policy reward value "
    "token tokens attention gradient layer network language we use each step time test train batch "
    "sequence output input number first new other some what when how about into than only two "
    "would these also after most over such where many used state action function then very between "
    "large small better while because update optimizer memory cache head heads weight weights "
    "norm vector matrix sample samples answer question interview engineer paper result results "
    "however example simple human preference feedback fine tuning label labels objective "
    "probability distribution entropy temperature greedy search length context window position "
    "embedding encoder decoder transformer byte pair merge merges vocabulary text corpus"
).split()

ZH_WORDS = (
    "的 是 在 了 和 我们 模型 数据 训练 学习 损失 函数 策略 奖励 价值 注意力 梯度 参数 语言 "
    "大 小 一个 这个 可以 需要 因为 所以 如果 但是 然后 通过 使用 进行 计算 问题 方法 结果 "
    "面试 工程师 强化 监督 微调 对齐 人类 反馈 偏好 优化 更新 步骤 批次 序列 输出 输入 "
    "词表 分词 字节 合并 编码 解码 文本 语料 概率 分布 熵 温度 采样 贪心 搜索 长度 上下文 "
    "位置 嵌入 向量 矩阵 层 网络 头 权重 缓存 显存 速度 时间 每个 之后 之前 非常 更好 "
    "简单 例子 论文 实验 评估 指标 正确 错误 答案 提示 对话 助手 用户 系统 中文 英文 "
    "我 你 他 她 它 这 那 有 没有 不 也 都 就 还 很 会 能 要 说 看 想 做 去 来 时候 现在 今天"
).split()

EMOJI = ("😀", "🚀", "🤖", "✨", "👍🏽", "🇨🇳", "👨‍👩‍👧", "❤️", "🎉", "🔥")


def mixed_corpus(n_bytes: int, generator: torch.Generator, zh_fraction: float = 0.5) -> str:
    """Deterministic mixed Chinese/English text of about n_bytes UTF-8 bytes: Zipf-distributed words,
    sentences with punctuation, numbers, the odd emoji, paragraphs separated by blank lines."""
    import torch  # here, not at the top: training and encoding never need torch (1.6 s to import)

    rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))  # fast scalar draws
    en_cum = list(itertools.accumulate(1.0 / (k + 2.7) for k in range(len(EN_WORDS))))
    zh_cum = list(itertools.accumulate(1.0 / (k + 2.7) for k in range(len(ZH_WORDS))))
    paragraphs, size = [], -2  # (no separator before the first paragraph)
    while size < n_bytes:
        zh = rng.random() < zh_fraction
        sentences = []
        for _ in range(rng.randint(2, 5)):
            n_words = rng.randint(4, 14)
            number = str(rng.randint(0, 99_999) if rng.random() < 0.5 else rng.randint(1990, 2029))
            if zh:
                words = rng.choices(ZH_WORDS, cum_weights=zh_cum, k=n_words)
                if rng.random() < 0.6:
                    words.insert(n_words // 2, "，")
                if rng.random() < 0.2:
                    words.insert(1, number + rng.choice(("年", "个", "次")))
                sentence = "".join(words) + rng.choices("。？！", (0.7, 0.15, 0.15))[0]
            else:
                words = rng.choices(EN_WORDS, cum_weights=en_cum, k=n_words)
                words[0] = words[0].capitalize()
                if rng.random() < 0.4:
                    words[n_words // 2] += ","
                if rng.random() < 0.2:
                    words.insert(2, number)
                sentence = " ".join(words) + rng.choices(".?!", (0.7, 0.15, 0.15))[0]
            if rng.random() < 0.05:
                sentence += " " + rng.choice(EMOJI)
            sentences.append(sentence)
        paragraph = ("" if zh else " ").join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 2
    return "\n\n".join(paragraphs)


# runs of one character: with (c, c) merged, left-to-right replacement gives N c, right-to-left c N
REPEATED_RUNS = ["\n" * 7, "0" * 7, "的" * 7, "a" * 7, " " * 7 + "x", "!" * 7, "。" * 7, "😀" * 5]

# (lo, hi, weight): code-point ranges the random strings draw from
_UNICODE_RANGES = (
    (0x20, 0x7E, 30), (0x09, 0x0D, 4), (0x4E00, 0x9FFF, 15), (0x3000, 0x303F, 3), (0xFF00, 0xFFEF, 3),
    (0x1F300, 0x1FAFF, 8), (0x200D, 0x200D, 2), (0xFE0F, 0xFE0F, 1), (0x00A0, 0x024F, 6),
    (0x0300, 0x036F, 3), (0xAC00, 0xD7A3, 4), (0x0400, 0x04FF, 3), (0x0600, 0x06FF, 2),
    (0x0900, 0x097F, 2), (0x2160, 0x2188, 1), (0x00, 0x1F, 1), (0xE000, 0xF8FF, 1),
    (0x10000, 0x10FFFF, 3),
)


def random_unicode_strings(n: int, max_len: int, generator: torch.Generator) -> list[str]:
    """n random strings of 0..max_len code points: ASCII, whitespace, CJK, emoji (+ZWJ, VS16),
    accents and combining marks, Hangul, Cyrillic, Arabic, Devanagari, Roman numerals, controls,
    private use and astral planes. Surrogates are excluded (they cannot be UTF-8 encoded)."""
    import torch

    lo = torch.tensor([r[0] for r in _UNICODE_RANGES], dtype=torch.int64)
    hi = torch.tensor([r[1] for r in _UNICODE_RANGES], dtype=torch.int64)
    w = torch.tensor([r[2] for r in _UNICODE_RANGES], dtype=torch.float64)
    lengths = torch.randint(0, max_len + 1, (n,), generator=generator)
    total = int(lengths.sum())
    which = torch.multinomial(w, max(total, 1), replacement=True, generator=generator)[:total]
    offset = (torch.rand(total, generator=generator, dtype=torch.float64)
              * (hi[which] - lo[which] + 1).double()).long()
    cps = (lo[which] + offset).tolist()
    cps = [cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD for cp in cps]
    out, start = [], 0
    for length in lengths.tolist():
        out.append("".join(map(chr, cps[start:start + length])))
        start += length
    return out


# ------------------------------------------------------------------------------------------------
# Measurements


def bytes_per_token(tok: Tokenizer, text: str) -> float:
    """UTF-8 bytes per token: the compression a vocabulary buys on ``text``."""
    return len(text.encode("utf-8")) / max(len(tok.encode_ordinary(text)), 1)


def compression_curve(tok: Tokenizer, text: str, points: int) -> tuple[list[int], list[float]]:
    """Bytes per token of ``text`` for vocabularies made of the first k merges, k on a quadratic grid
    from 0 to all (training is greedy, so these are the tokenizers shorter runs learn)."""
    n = len(tok.merges)
    ks = sorted({round(n * (f / (points - 1)) ** 2) for f in range(points)})
    sizes = [256 + k + len(tok.special_tokens) for k in ks]
    return sizes, [bytes_per_token(tok.truncated(k), text) for k in ks]  # each with a cold chunk cache


def time_call(fn: Callable, *args, **kwargs):
    """(result, CPU seconds of this process) of one call: unlike the wall clock, CPU time does not
    count the time other programs on a shared machine take."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


# ------------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class Corpus:
    text: str  # the training corpus
    heldout: str  # text of the same kind, never trained on


def make_corpus(cfg: TokenizerConfig, generator: torch.Generator) -> Corpus:
    return Corpus(mixed_corpus(cfg.corpus_bytes, generator, cfg.zh_fraction),
                  mixed_corpus(cfg.heldout_bytes, generator, cfg.zh_fraction))


@dataclass
class TokenizerResult:
    corpus: Corpus
    training: Training  # the tokenizer, and the tokens each merge read
    vocab_sizes: list[int]  # the compression curve: vocabulary sizes ...
    bytes_per_token: list[float]  # ... and held-out bytes per token at each (rising, ~1.0 -> 2.2 toy)


def run(cfg: TokenizerConfig, generator: torch.Generator, *, bpe_train_step: Callable = bpe_train_step,
        merge_pair: Callable = merge_pair) -> TokenizerResult:
    """Train on a generated zh/en corpus with ``bpe_train_step`` (counting what each merge reads), then
    encode held-out text with ``merge_pair`` at growing vocabulary sizes."""
    corpus = make_corpus(cfg, generator)
    training = learn_merges(corpus.text, cfg.vocab_size, step=bpe_train_step, merge=merge_pair)
    sizes, bpt = compression_curve(training.tokenizer, corpus.heldout, cfg.curve_points)
    return TokenizerResult(corpus, training, sizes, bpt)
