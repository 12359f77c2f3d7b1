"""Audit of the byte-level BPE tokenizer (day 5): the two kernels against hand-worked vectors and a
recount, one merge at a time; the work incremental training saves, counted in tokens read; round trips,
the rank-order encoder, special tokens and JSON save/load; compression as the vocabulary grows."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from llmaudit.audit import Audit, kernel, measure
from modules import tokenizer as T


def _example_step() -> dict:
    return {"state": T.BPEState.from_chunks({b"hello": 3, b" yellow": 2, b" hell": 1, b"lll": 2}),
            "new_id": 256}


def _example_merge() -> dict:
    return {"ids": [97, 97, 97, 98, 97, 97], "pair": (97, 97), "new_id": 256}


KERNELS = [
    kernel(T.bpe_train_step, example=_example_step,
           hint="pop the max count from the heap, ties to the smallest pair; at each merge site only "
                "(a, b), (x, a), (b, y) lose the chunk's weight and (x, N), (N, y) gain it."),
    kernel(T.merge_pair, example=_example_merge,
           hint="scan left to right and skip past a replaced pair: [a, a, a] with (a, a) -> [N, a]."),
]

tokenizer = Audit("tokenizer", day=5, title="Byte-level BPE tokenizer", config=T.TokenizerConfig,
                  kernels=KERNELS, formulas=T.FORMULAS)


# ---- the kernels on hand-worked vectors ----------------------------------------------------------

@tokenizer.check("== 0", hint="ties must go to the smallest pair (a, b); minbpe's first-seen rule learns (aa)a "
                              "instead.")
def aaabdaaabac_learns_wikipedia_merges(bpe_train_step, merge_pair):
    """aa is the most frequent pair; then aa-a and a-b tie at 2 and the smaller pair (a, b) wins, so the
    merges are Z=aa, Y=ab, X=ZY and the text encodes as X d X a c: Wikipedia's worked example."""
    tok = T.train_bpe("aaabdaaabac", 256 + 3, specials=(), step=bpe_train_step, merge=merge_pair)
    merges, ids = list(tok.merges), tok.encode_ordinary("aaabdaaabac")
    want_merges, want_ids = [(97, 97), (97, 98), (256, 257)], [258, 100, 258, 97, 99]
    wrong = sum(m != w for m, w in zip(merges, want_merges)) + abs(len(merges) - 3)
    wrong += sum(i != w for i, w in zip(ids, want_ids)) + abs(len(ids) - 5)
    return measure(wrong, f"merges {merges}, ids {ids}")


@tokenizer.check("== 0", hint="a distinct chunk stands for weights[i] copies: every count change is times w.")
def bpe_train_step_matches_hand_worked_example(bpe_train_step):
    """Chunks aaab (x2) and ab (x3): (a, b) occurs 2 + 3 = 5 times and beats (a, a) with 4, then (a, a),
    then the two new tokens; a fourth step finds every chunk a single token and returns None."""
    state = T.BPEState.from_chunks({b"aaab": 2, b"ab": 3})
    got = [bpe_train_step(state, 256)]
    wrong = (state.chunks != [[97, 97, 256], [256]]) + (state.counts != {(97, 97): 2, (97, 256): 2})
    got += [bpe_train_step(state, 257), bpe_train_step(state, 258), bpe_train_step(state, 259)]
    got = [None if p is None else tuple(p) for p in got]
    wrong += sum(p != w for p, w in zip(got, [(97, 98), (97, 97), (257, 256), None]))
    return measure(int(wrong), f"pairs {got}")


@tokenizer.check("== 0", hint="scan left to right and continue after a match: [a, a, a] -> [N, a].")
def merge_pair_matches_hand_worked_vectors(merge_pair):
    """Replacement is left to right and non-overlapping: [5,6,5,6,7] with (5,6) gives [99,99,7], [a,a,a]
    with (a,a) gives [N,a] (never [a,N]), [a,a,a,a] gives [N,N]; the input list is left unchanged."""
    cases = [([5, 6, 5, 6, 7], (5, 6), [99, 99, 7]), ([97, 97, 97], (97, 97), [99, 97]),
             ([97, 97, 97, 97], (97, 97), [99, 99]), ([], (1, 2), []), ([1], (1, 2), [1]),
             ([1, 2, 3, 1], (3, 1), [1, 2, 99]), ([2, 1, 2], (1, 2), [2, 99])]
    wrong = 0
    for ids, pair, want in cases:
        before = list(ids)
        wrong += (merge_pair(ids, pair, 99) != want) + (ids != before)
    return measure(wrong, f"of {len(cases)} vectors")


@tokenizer.check("== 0", hint="replace every occurrence, not only the first; keep the unmatched tail.")
def merge_pair_equals_str_replace(g, merge_pair):
    """Mapping ids to characters, merge_pair is exactly str.replace: left to right, non-overlapping,
    every occurrence (random id lists over a 3-letter alphabet, so pairs and runs abound)."""
    wrong = 0
    for _ in range(200):
        ids = torch.randint(0, 3, (int(torch.randint(0, 30, ())),), generator=g).tolist()
        a, b = torch.randint(0, 3, (2,), generator=g).tolist()
        want = [ord(c) for c in "".join(map(chr, ids)).replace(chr(a) + chr(b), chr(300))]
        wrong += merge_pair(ids, (a, b), 300) != want
    return measure(wrong, "of 200 random lists")


# ---- one merge at a time against a recount of the state ------------------------------------------

@tokenizer.fixture(cost=3)
def steps(ctx, cfg, g, bpe_train_step):
    """bench_merges merges of a bench corpus, each compared with an independent oracle started from the
    same state: the best pair of its own counts, the chunks merged by the reference merge_pair, the
    counts updated by recounting every merged chunk (and, every 16 merges, the whole state)."""
    state = T.BPEState.from_chunks(T.chunk_counts(T.mixed_corpus(cfg.bench_bytes, g, cfg.zh_fraction)))
    counts = T.pair_counts(state.chunks, state.weights)
    log = {"first_wrong": None, "counts": 0, "chunks": 0, "index": 0, "heap": 0, "steps": 0}
    step_s = recount_s = 0.0
    for i in range(cfg.bench_merges + 1):
        if i % 16 == 0 or i == cfg.bench_merges:  # the whole state, recounted from scratch
            start = time.process_time()
            recount = T.pair_counts(state.chunks, state.weights)
            recount_s += (time.process_time() - start) * min(16, cfg.bench_merges - i + 1)
            log["counts"] += _differ(recount, counts) + _differ(recount, state.counts)
            log["index"] += _missing_from_index(state)
            log["heap"] += len(set(recount) - {(a, b) for c, a, b in state.heap if recount.get((a, b)) == -c})
        if i == cfg.bench_merges:
            break
        want, new_id = T.best_pair(counts), 256 + i
        chunks = list(state.chunks)  # the lists themselves, to compare with after the step
        merged = {j: m for j, c in enumerate(chunks) if want and want[0] in c
                  for m in [T.merge_pair(c, want, new_id)] if len(m) < len(c)}
        start = time.process_time()
        got = bpe_train_step(state, new_id)
        step_s += time.process_time() - start
        log["steps"] += 1
        if (None if got is None else tuple(got)) != want:
            log["first_wrong"] = (i, want, got)
            break
        if want is None:
            break
        expected = [merged.get(j, c) for j, c in enumerate(chunks)]
        log["chunks"] += sum(a != b for a, b in zip(state.chunks, expected)) + abs(len(state.chunks) - len(expected))
        touched = set()
        for j, m in merged.items():  # the oracle's counts: recount each merged chunk
            w = state.weights[j]
            for p in zip(chunks[j], chunks[j][1:]):
                counts[p] -= w
                touched.add(p)
            for p in zip(m, m[1:]):
                counts[p] = counts.get(p, 0) + w
        for p in touched:
            if counts[p] == 0:
                del counts[p]
        log["counts"] += _differ(counts, state.counts)
        ctx.progress(i, cfg.bench_merges)
    ctx.scalar("step_vs_recount_speedup_cpu", round(recount_s / max(step_s, 1e-9), 2), timed=True)
    return log


def _differ(a: dict, b: dict) -> int:
    """Pairs whose counts differ between two {pair: count} dicts."""
    return 0 if a == b else len(set(a.items()) ^ set(b.items()))


def _missing_from_index(state: T.BPEState) -> int:
    """(pair, chunk) holdings that where[pair] does not list."""
    missing = 0
    for i, ids in enumerate(state.chunks):
        for p in set(zip(ids, ids[1:])):
            missing += i not in state.where.get(p, ())
    return missing


@tokenizer.check("== 0", hint="pop until a heap entry matches its pair's current count; ties to the smallest "
                              "pair, i.e. the smallest (-count, a, b).")
def incremental_merges_equal_recount_merges(steps):
    """Updating pair counts only where the merged pair occurred is an exact bookkeeping trick, so every
    step must pick the pair a full recount of the same state picks (compared one merge at a time)."""
    if steps["first_wrong"] is None:
        return measure(0, f"{steps['steps']} merges equal")
    i, want, got = steps["first_wrong"]
    return measure(1, f"merge {i}: {got}, the recount gives {want}")


@tokenizer.check({"counts": "== 0", "chunks": "== 0", "index": "== 0", "heap": "== 0"},
                 hint="at x a b y the counts of (a, b), (x, a), (b, y) drop by w and (x, N), (N, y) rise; in "
                      "a b a b the left neighbour of the second site is the new N.")
def bpe_train_step_keeps_state_exact(steps):
    """After each merge the state must describe the merged corpus: counts equal a recount, every chunk
    is merged left to right, where[p] lists every chunk holding p and the heap has a live entry per
    pair; otherwise a later merge silently goes wrong."""
    return measure({k: steps[k] for k in ("counts", "chunks", "index", "heap")},
                   f"over {steps['steps']} merges (index and heap every 16)")


# ---- the experiment: training on the generated corpus ---------------------------------------------

@tokenizer.fixture
def corpus(cfg, g):
    return T.make_corpus(cfg, g)


@tokenizer.fixture(cost=4)
def trained(cfg, corpus, bpe_train_step):
    """The vocabulary learned with the audited step, and the tokens each merge read."""
    return T.learn_merges(corpus.text, cfg.vocab_size, step=bpe_train_step)


@tokenizer.check("== 0", hint="a step that returns a pair twice or an unknown id (stale counts) ends training "
                              "early, with fewer merges than asked; specials must not reuse merge ids.")
def vocab_size_is_256_plus_merges_plus_specials(cfg, trained):
    """The vocabulary is the 256 bytes, one new token per merge and the special tokens, with ids 0..V-1
    and no gaps or collisions, so the embedding table has exactly V rows."""
    tok = trained.tokenizer
    missing = len(set(range(cfg.vocab_size)) - set(tok.vocab)) + len(set(tok.vocab) - set(range(cfg.vocab_size)))
    return measure(missing + abs(tok.vocab_size - (256 + len(tok.merges) + len(tok.special_tokens))),
                   f"{tok.vocab_size} = 256 + {len(tok.merges)} + {len(tok.special_tokens)}, asked {cfg.vocab_size}")


@tokenizer.check(">= min_work_ratio", kind="outcome",
                 hint="find the chunks through where[pair]; recounting or scanning every chunk per merge "
                      "reads the whole corpus each time.")
def incremental_training_reads_far_less_than_recount(trained):
    """Recounting all pairs after every merge reads the whole corpus each time, O(merges x corpus); the
    incremental step reads only the chunks listed in where[pair]. Counted in tokens, not seconds, so
    the saving is the same on every machine."""
    read, total = sum(trained.tokens_read), sum(trained.state_tokens)
    return measure(total / max(read, 1), f"{total} tokens to recount vs {read} read, {len(trained.tokens_read)} "
                                         f"merges")


@tokenizer.check({"at_full_vocab": ">= min_bytes_per_token", "smallest_step": ">= min_compression_step"},
                 kind="outcome", hint="merging rare pairs (wrong argmax) buys no compression.")
def bytes_per_token_rises_with_vocab_size(ctx, cfg, trained, corpus, merge_pair):
    """Each merge turns a frequent pair into one token, so held-out text from the same distribution needs
    fewer tokens as the vocabulary grows: more bytes per token at every size, so shorter sequences and
    cheaper attention."""
    tok = T.Tokenizer(trained.tokenizer.merges, trained.tokenizer.special_tokens, merge=merge_pair)
    sizes, bpt = T.compression_curve(tok, corpus.heldout, cfg.curve_points)
    ctx.series("tokenizer/bytes_per_token", bpt, sizes, x_label="vocabulary size (tokens)", smooth=False, key=True,
               label="compression of held-out text", y_label="bytes per token")
    ctx.scalar("bytes_per_token_heldout", round(bpt[-1], 4))
    return measure({"at_full_vocab": bpt[-1], "smallest_step": [b - a for a, b in zip(bpt, bpt[1:])]},
                   f"{bpt[0]:.2f} -> {bpt[-1]:.2f} bytes/token (V {sizes[0]} -> {sizes[-1]})")


# ---- encoding with the audited merge_pair, on merges learned by the reference ----------------------

@tokenizer.fixture(cost=3)
def reference_tokenizer(cfg, corpus):
    """The vocabulary the reference trainer learns on a prefix of the corpus (module code): the checks
    of encoding, special tokens and save/load run on it, whatever step is audited."""
    return T.train_bpe(corpus.text[:cfg.encoder_corpus_bytes], cfg.vocab_size)


@tokenizer.fixture
def strings(cfg, g):
    """Random Unicode (CJK, emoji with ZWJ, combining marks, controls, astral) and runs like 'aaaaaaa'."""
    return T.random_unicode_strings(cfg.n_random_strings, cfg.max_string_len, g) + T.REPEATED_RUNS


@tokenizer.check("== 0", hint="decoding token by token turns the halves of a Chinese character or emoji into "
                              "U+FFFD; a merge must keep every id it does not replace.")
def decode_encode_round_trips_any_unicode(reference_tokenizer, corpus, strings, merge_pair):
    """Byte-level BPE covers every byte, so any string round-trips, as long as merging loses no token
    and decoding joins the bytes of all tokens before decoding UTF-8 once (a token may end inside a
    character)."""
    tok = T.Tokenizer(reference_tokenizer.merges, reference_tokenizer.special_tokens, merge=merge_pair)
    byte_level = T.Tokenizer({}, T.special_token_ids(0), merge=merge_pair)
    texts = strings + [corpus.heldout]
    bad = sum(tok.decode(tok.encode_ordinary(s)) != s or byte_level.decode(byte_level.encode_ordinary(s)) != s
              for s in texts)
    return measure(bad, f"of {len(texts)} texts (random strings, runs, the held-out text)")


@tokenizer.check("== 0", hint="merge the pair with the lowest rank, not the most frequent pair in the text, "
                              "and replace it left to right.")
def encoding_equals_naive_rank_order_encoder(reference_tokenizer, corpus, strings, merge_pair):
    """Encoding applies merges in the order they were learned (lowest rank first), which is what
    applying the whole merge list in rank order to each chunk does (encode_naive, which never calls
    merge_pair)."""
    tok = T.Tokenizer(reference_tokenizer.merges, reference_tokenizer.special_tokens, merge=merge_pair)
    probes = [corpus.heldout[:min(len(corpus.heldout) // 5, 8000)]] + strings[:200] + T.REPEATED_RUNS
    return measure(sum(tok.encode_ordinary(s) != T.encode_naive(s, tok.merges) for s in probes),
                   f"of {len(probes)} texts differ")


# ---- special tokens and save/load: module code, on the reference vocabulary -----------------------

@tokenizer.fixture
def documents(g, corpus, strings):
    """ChatML documents built from known pieces, with near-miss special strings inside the text."""
    return _chat_documents(strings, corpus.heldout, g)


@tokenizer.check("== 0", hint="re.escape the special strings before joining them with '|': '|' is regex syntax.")
def special_tokens_are_single_ids_never_split(reference_tokenizer, documents):
    """With specials allowed, each <|im_start|> / <|im_end|> occurrence becomes exactly its one id and
    the text between them is encoded as ordinary text."""
    tok, (docs, pieces) = reference_tokenizer, documents
    wrong = 0
    for doc, parts in zip(docs, pieces):
        expected = [i for kind, s in parts
                    for i in ([tok.token_id(s)] if kind == "special" else tok.encode_ordinary(s))]
        got = tok.encode(doc, allowed_special="all")
        wrong += got != expected or tok.decode(got) != doc
    return measure(wrong, f"of {len(docs)} ChatML documents wrong")


@tokenizer.check({"leaked": "== 0", "not_refused": "== 0"},
                 hint="allowed_special='none' must encode special strings as plain bytes, and the default must "
                      "refuse them.")
def ordinary_text_never_yields_special_ids(reference_tokenizer, corpus, strings, documents):
    """Special ids come only from an explicit allow-list, so user text that merely contains '<|im_end|>'
    cannot end a turn or inject a role (prompt injection); by default encode refuses such text."""
    tok, docs = reference_tokenizer, documents[0]
    special_ids = set(tok.special_ids)
    leaked = sum(len(special_ids.intersection(tok.encode_ordinary(s))) for s in [corpus.heldout] + strings + docs)
    leaked += sum(len(special_ids.intersection(tok.encode(d, allowed_special="none"))) for d in docs)
    leaked += tok.token_id(T.IM_END) in tok.encode(docs[0], allowed_special={T.IM_START})
    not_refused = 0
    for d in docs:
        try:
            tok.encode(d)
            not_refused += 1
        except ValueError:
            pass
    return measure({"leaked": leaked, "not_refused": not_refused}, f"{len(docs)} documents")


@tokenizer.check("== 0", hint="a merge list saved in any order but rank order reassigns ids on load.")
def json_save_load_preserves_encoding(reference_tokenizer, corpus, documents):
    """The merges are saved in rank order (their ids are implied by the order) together with the special
    tokens, so a reloaded tokenizer has the same vocabulary and encodes identically."""
    tok, probe = reference_tokenizer, corpus.heldout[:min(len(corpus.heldout) // 5, 8000)] + "".join(documents[0][:3])
    with tempfile.TemporaryDirectory() as tmp:
        path = tok.save(Path(tmp) / "tokenizer.json")
        try:
            loaded = T.Tokenizer.load(path)
        except (ValueError, KeyError) as exc:  # a file that does not load is a failed round trip
            return measure(len(tok.vocab), f"load failed: {type(exc).__name__} {exc}")
    differ = sum(loaded.vocab.get(i) != b for i, b in tok.vocab.items()) + len(set(loaded.vocab) - set(tok.vocab))
    differ += loaded.special_tokens != tok.special_tokens
    differ += loaded.encode(probe, allowed_special="all") != tok.encode(probe, allowed_special="all")
    return measure(differ, "vocabulary entries, specials and encodings that differ")


def _chat_documents(strings: list[str], heldout: str, g: torch.Generator) -> tuple[list[str], list[list]]:
    near_misses = ("<|im_", "im_end|>", "<|", "|>", "<|im_start", "< |im_end| >", "<|IM_END|>", "<||>")
    docs, pieces = [], []
    for k in range(0, len(strings) - 3, 4):
        parts: list[tuple[str, str]] = []
        for role, s in (("system", strings[k]), ("user", strings[k + 1]), ("assistant", strings[k + 2])):
            start = int(torch.randint(0, max(len(heldout) - 80, 1), (), generator=g))
            miss = near_misses[int(torch.randint(0, len(near_misses), (), generator=g))]
            content = s + miss + heldout[start:start + 60] + strings[k + 3][:5]
            parts += [("special", T.IM_START), ("text", f"{role}\n{content}"), ("special", T.IM_END), ("text", "\n")]
        doc = "".join(s for _, s in parts)
        if sum(doc.count(s) for s in T.SPECIAL_TOKENS) == sum(kind == "special" for kind, _ in parts):
            docs.append(doc)  # skip the rare document where pieces happen to spell a special
            pieces.append(parts)
    return docs, pieces


@tokenizer.report
def headline(ctx, corpus, trained, reference_tokenizer):
    ctx.scalar("corpus_MB", round(len(corpus.text.encode("utf-8")) / 1e6, 3))
    ctx.scalar("vocab_size", trained.tokenizer.vocab_size)
    ctx.scalar("work_ratio_recount_over_incremental", round(trained.work_ratio, 3))
    ctx.scalar("train_cpu_s", round(trained.cpu_s, 3), timed=True)
    sample = corpus.heldout[:len(corpus.heldout) // 5]
    fresh = reference_tokenizer.truncated(len(reference_tokenizer.merges))  # a cold chunk cache
    _, encode_s = T.time_call(T.bytes_per_token, fresh, sample)
    ctx.scalar("encode_MB_per_s", round(len(sample.encode("utf-8")) / 1e6 / max(encode_s, 1e-9), 3), timed=True)
