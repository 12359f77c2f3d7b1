"""Audit of the byte-level BPE tokenizer: round trips, vocabulary bookkeeping, agreement with naive
references, special tokens, JSON save/load, compression versus vocabulary size, training speed."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llmaudit.audit import Context, audit, kernel
from modules import tokenizer as T

# scalars and check values measured by the clock; everything else is a function of (seed, mode, config)


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


@audit("tokenizer", day=5, title="Byte-level BPE tokenizer", config=T.TokenizerConfig,
       kernels=KERNELS, formulas=T.FORMULAS)
def audit_tokenizer(ctx: Context, *, bpe_train_step=T.bpe_train_step, merge_pair=T.merge_pair) -> None:
    cfg: T.TokenizerConfig = ctx.config
    n_special = len(T.SPECIAL_TOKENS)

    # the hand-worked example: Wikipedia's aaabdaaabac -> Z=aa, Y=ab, X=ZY -> X d X a c
    wiki = T.train_bpe("aaabdaaabac", 256 + 3, specials=(), step=bpe_train_step, merge=merge_pair)
    wiki_merges = list(wiki.merges)
    wiki_ids = wiki.encode_ordinary("aaabdaaabac")
    ctx.check("aaabdaaabac_learns_wikipedia_merges",
              wiki_merges == [(97, 97), (97, 98), (256, 257)] and wiki_ids == [258, 100, 258, 97, 99],
              f"merges {wiki_merges}, ids {wiki_ids}",
              "merges (97,97),(97,98),(256,257); ids [258,100,258,97,99]",
              "aa is the most frequent pair; then aa-a and a-b tie at 2 and the smaller pair (a, b) wins, "
              "so the merges are Z=aa, Y=ab, X=ZY, exactly Wikipedia's worked example.",
              hint="ties must go to the smallest pair (a, b); minbpe's first-seen rule learns (aa)a instead.")

    # train on the generated zh/en corpus with the audited kernels
    text = T.mixed_corpus(cfg.corpus_bytes, ctx.generator(0), cfg.zh_fraction)
    heldout = T.mixed_corpus(cfg.heldout_bytes, ctx.generator(1), cfg.zh_fraction)
    ctx.progress(0.05)
    tok, train_s = T.time_call(T.train_bpe, text, cfg.vocab_size, step=bpe_train_step, merge=merge_pair)
    ctx.progress(0.35)
    n_merges = len(tok.merges)
    ids_ok = sorted(tok.vocab) == list(range(cfg.vocab_size))
    ctx.check("vocab_size_is_256_plus_merges_plus_specials",
              tok.vocab_size == 256 + n_merges + n_special == cfg.vocab_size and ids_ok,
              f"{tok.vocab_size} = 256 + {n_merges} + {n_special}" + ("" if ids_ok else ", ids not 0..V-1"),
              f"{cfg.vocab_size}, ids exactly 0..{cfg.vocab_size - 1}",
              "The vocabulary is the 256 bytes, one new token per merge and the special tokens, with ids "
              "0..V-1 and no gaps or collisions, so the embedding table has exactly V rows.",
              hint="a step that returns a pair twice or an unknown id (stale counts) ends training "
                   "early, with fewer merges than asked; specials must not reuse merge ids.")

    # the incremental trainer learns the very same merges as the recount-every-merge trainer, faster
    bench = T.mixed_corpus(cfg.bench_bytes, ctx.generator(3), cfg.zh_fraction)
    bench_vocab = 256 + cfg.bench_merges + n_special
    slow, slow_s = T.time_call(T.train_bpe_naive, bench, bench_vocab)
    fast_runs = [T.time_call(T.train_bpe, bench, bench_vocab, step=bpe_train_step) for _ in range(3)]
    fast, fast_s = fast_runs[0][0], min(s for _, s in fast_runs)
    fast_merges, slow_merges = list(fast.merges), list(slow.merges)
    same = fast_merges == slow_merges
    first_diff = next((k for k, (p, q) in enumerate(zip(fast_merges, slow_merges)) if p != q),
                      min(len(fast_merges), len(slow_merges)))
    ctx.check("incremental_merges_equal_recount_merges", same,
              f"{len(slow_merges)}/{len(slow_merges)} equal" if same
              else f"first difference at merge {first_diff}",
              f"all {cfg.bench_merges} merges identical, in order",
              "Updating pair counts only where the merged pair occurred is an exact bookkeeping trick, "
              "so it must learn exactly what recounting the whole corpus learns.",
              hint="at x a b y the counts of (x, a) and (b, y) drop and (x, N), (N, y) rise; with a b a b "
                   "the left neighbour of the second merge is the new token.")
    ctx.progress(0.55)
    speedup = slow_s / max(fast_s, 1e-9)
    ctx.check("incremental_training_is_much_faster_than_recount", speedup >= cfg.min_speedup,
              f"{speedup:.1f}x ({slow_s:.2f} s vs {fast_s:.3f} s CPU)", f">= {cfg.min_speedup:g}x",
              "Recounting all pairs after every merge costs O(merges x corpus); changing counts only at "
              "the merge sites (chunks found through a pair -> chunks index, the best pair from a lazy "
              "heap) costs about O(corpus + total merge sites).", kind="outcome", timed=True,
              hint="recounting every pair of each affected chunk is not enough on long Chinese chunks: "
                   "at each site update only (x,a), (a,b), (b,y), (x,N), (N,y); pop the best pair from a "
                   "heap.")

    # decode(encode(s)) == s for random Unicode (Chinese, emoji, ZWJ, combining marks, controls...)
    strings = T.random_unicode_strings(cfg.n_random_strings, cfg.max_string_len, ctx.generator(2))
    strings += T.REPEATED_RUNS  # a a a ... where (a, a) is a merge: the order of replacement matters
    byte_level = T.Tokenizer({}, T.special_token_ids(0), merge=merge_pair)
    bad = [s for s in strings if tok.decode(tok.encode_ordinary(s)) != s
           or byte_level.decode(byte_level.encode_ordinary(s)) != s]
    heldout_ok = tok.decode(tok.encode_ordinary(heldout)) == heldout
    ctx.check("decode_encode_round_trips_any_unicode", not bad and heldout_ok,
              f"{len(strings) - len(bad)}/{len(strings)} strings, held-out text "
              f"{'ok' if heldout_ok else 'changed'}",
              f"all {len(strings)} strings and the held-out text",
              "Byte-level BPE covers every byte, so any string round-trips, as long as decoding joins the "
              "bytes of all tokens before decoding UTF-8 once (a token may end inside a character).",
              hint="decoding token by token turns the halves of a Chinese character or emoji into U+FFFD.")
    ctx.progress(0.65)

    # the fast encoder equals the naive one that applies every merge in rank order
    sample = heldout[: min(len(heldout) // 5, 8000)]
    probes = [sample] + strings[:200] + T.REPEATED_RUNS
    mismatches = sum(tok.encode_ordinary(s) != T.encode_naive(s, tok.merges) for s in probes)
    ctx.check("encoding_equals_naive_rank_order_encoder", mismatches == 0,
              f"{mismatches} of {len(probes)} texts differ", "0 differ",
              "Encoding applies merges in the order they were learned (lowest rank first), which is what "
              "applying the whole merge list in rank order to each chunk does.",
              hint="merge the pair with the lowest rank, not the most frequent pair in the text.")

    # special tokens: one id each where allowed; never produced from ordinary text
    docs, pieces = _chat_documents(strings, heldout, ctx)
    wrong = 0
    for doc, parts in zip(docs, pieces):
        expected = [i for kind, s in parts for i in
                    ([tok.token_id(s)] if kind == "special" else tok.encode_ordinary(s))]
        got = tok.encode(doc, allowed_special="all")
        wrong += got != expected or tok.decode(got) != doc
    ctx.check("special_tokens_are_single_ids_never_split", wrong == 0,
              f"{wrong} of {len(docs)} ChatML documents wrong", "0 wrong",
              "With specials allowed, each <|im_start|> / <|im_end|> occurrence becomes exactly its one id "
              "and the text between them is encoded as ordinary text.",
              hint="re.escape the special strings before joining them with '|': '|' is regex syntax.")

    special_ids = set(tok.special_ids)
    leaked = sum(len(special_ids.intersection(tok.encode_ordinary(s))) for s in [heldout] + strings + docs)
    leaked += sum(len(special_ids.intersection(tok.encode(d, allowed_special="none"))) for d in docs)
    only_start = tok.encode(docs[0], allowed_special={T.IM_START})
    leaked += tok.token_id(T.IM_END) in only_start
    raised = 0
    for d in docs:
        try:
            tok.encode(d)
        except ValueError:
            raised += 1
    ctx.check("ordinary_text_never_yields_special_ids", leaked == 0 and raised == len(docs),
              f"{leaked} special ids leaked; default encode raised on {raised}/{len(docs)} documents",
              "0 leaked; raises on every document with a special string",
              "Special ids come only from an explicit allow-list, so user text that merely contains "
              "'<|im_end|>' cannot end a turn or inject a role (prompt injection).",
              hint="allowed_special='none' must encode special strings as plain bytes, and the default "
                   "must refuse them.")
    ctx.progress(0.75)

    # save -> load as JSON gives the same tokenizer
    probe = sample + "".join(docs[:3])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tok.save(Path(tmp) / "tokenizer.json")
            loaded = T.Tokenizer.load(path, merge=merge_pair)
        same_vocab = loaded.vocab == tok.vocab and loaded.special_tokens == tok.special_tokens
        same_ids = loaded.encode(probe, allowed_special="all") == tok.encode(probe, allowed_special="all")
        measured = f"vocab {'equal' if same_vocab else 'differs'}, ids {'equal' if same_ids else 'differ'}"
    except (ValueError, KeyError) as exc:  # a file that does not load is a failed round trip
        same_vocab = same_ids = False
        measured = f"load failed: {type(exc).__name__} {exc}"
    ctx.check("json_save_load_preserves_encoding", same_vocab and same_ids, measured,
              "identical vocab, specials and ids",
              "The merges are saved in rank order (their ids are implied by the order) together with the "
              "special tokens, so a reloaded tokenizer encodes identically.",
              hint="a merge list saved in any order but rank order reassigns ids on load.")

    # compression: bytes per token on held-out text rises with the vocabulary size
    ks = sorted({round(n_merges * (f / (cfg.curve_points - 1)) ** 2) for f in range(cfg.curve_points)})
    sizes, bpt = [256 + k + n_special for k in ks], []
    for k in ks:
        t_k = tok.truncated(k)  # a fresh tokenizer: its chunk cache is cold
        b, encode_s = T.time_call(T.bytes_per_token, t_k, heldout)
        bpt.append(b)
    ctx.series("tokenizer/bytes_per_token", bpt, sizes, x_label="vocab size", smooth=False)
    rising = all(b > a for a, b in zip(bpt, bpt[1:]))
    ctx.check("bytes_per_token_rises_with_vocab_size", rising and bpt[-1] >= cfg.min_bytes_per_token,
              f"{bpt[0]:.2f} -> {bpt[-1]:.2f} bytes/token (V {sizes[0]} -> {sizes[-1]})"
              + ("" if rising else ", not rising"),
              f"rising at every size, >= {cfg.min_bytes_per_token:g} at V={cfg.vocab_size}",
              "Each merge turns a frequent pair into one token, so held-out text from the same distribution "
              "needs fewer tokens as the vocabulary grows: shorter sequences, cheaper attention.",
              kind="outcome", hint="merging rare pairs (wrong argmax) buys no compression.")
    ctx.progress(0.95)

    ctx.scalar("corpus_MB", round(len(text.encode("utf-8")) / 1e6, 3))
    ctx.scalar("train_cpu_s", round(train_s, 3), timed=True)
    ctx.scalar("encode_MB_per_s", round(len(heldout.encode("utf-8")) / 1e6 / max(encode_s, 1e-9), 3), timed=True)
    ctx.scalar("naive_train_cpu_s", round(slow_s, 3), timed=True)
    ctx.scalar("incremental_train_cpu_s", round(fast_s, 4), timed=True)
    ctx.scalar("bytes_per_token_heldout", round(bpt[-1], 4))
    ctx.scalar("vocab_size", tok.vocab_size)
    ctx.progress(1.0)


def _chat_documents(strings: list[str], heldout: str, ctx: Context) -> tuple[list[str], list[list]]:
    """ChatML documents built from known pieces, with near-miss special strings inside the text."""
    g = ctx.generator(4)
    near_misses = ("<|im_", "im_end|>", "<|", "|>", "<|im_start", "< |im_end| >", "<|IM_END|>", "<||>")
    docs, pieces = [], []
    for k in range(0, len(strings) - 3, 4):
        parts: list[tuple[str, str]] = []
        for role, s in (("system", strings[k]), ("user", strings[k + 1]), ("assistant", strings[k + 2])):
            start = int(torch.randint(0, max(len(heldout) - 80, 1), (), generator=g))
            miss = near_misses[int(torch.randint(0, len(near_misses), (), generator=g))]
            content = s + miss + heldout[start:start + 60] + strings[k + 3][:5]
            parts += [("special", T.IM_START), ("text", f"{role}\n{content}"),
                      ("special", T.IM_END), ("text", "\n")]
        doc = "".join(s for _, s in parts)
        if sum(doc.count(s) for s in T.SPECIAL_TOKENS) == sum(kind == "special" for kind, _ in parts):
            docs.append(doc)  # skip the rare document where pieces happen to spell a special
            pieces.append(parts)
    return docs, pieces
