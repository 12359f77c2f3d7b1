#!/usr/bin/env python3
"""Speed benchmarks (issue 11): each figure next to its goal. A benchmark, not a test.

    python scripts/bench.py                        # every row, median of 3 runs each
    python scripts/bench.py --only kv_cache_speedup_256_tokens --only cli_list_s
    python scripts/bench.py --load 1 --json        # with one busy process beside it (a shared core)

Wall-clock figures depend on the machine and on what else runs: compare numbers from one machine,
taken in one sitting. Command-line rows run .venv/bin/llmaudit (or the one on PATH) as a subprocess
with LLMAUDIT_HOME in a temporary folder, so nothing of yours is read or written. Exit code 0 when
every measured row meets its goal, 1 when one does not, 2 for a usage error.

Adding a row is one line in ROWS: a name, a unit, a function (Options -> (value, detail)) and a goal.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # modules/ importable when run as scripts/bench.py
PYTHON = sys.executable
SCHEMA = "llmaudit.bench/v1"


@dataclass(frozen=True)
class Options:
    repeats: int  # runs per measurement; the median is reported
    tmp: Path  # scratch folder for this invocation (LLMAUDIT_HOME, report folders, the corpus file)


@dataclass(frozen=True)
class Goal:
    op: str  # "<" or ">="
    value: float

    def met(self, measured: float) -> bool:
        return measured < self.value if self.op == "<" else measured >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class Row:
    name: str
    unit: str  # "s" (wall seconds) or "x" (a ratio)
    measure: Callable[[Options], tuple[float, str]]  # -> (value, a few words of detail)
    goal: Goal | None  # None: reported only


# ------------------------------------------------------------------------------------------------
# Helpers


def _env(opts: Options) -> dict[str, str]:
    home = opts.tmp / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "LLMAUDIT_HOME": str(home), "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "100"}


def _wall(cmd: list[str], opts: Options, *, stdin: str = "") -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=_env(opts), input=stdin, capture_output=True, text=True)
    return time.perf_counter() - start, done


def _median_wall(cmd: list[str], opts: Options, *, stdin: str = "", ok=(0,)) -> tuple[float, str]:
    seconds, detail, _ = _median_wall_and_output(cmd, opts, stdin=stdin, ok=ok)
    return seconds, detail


def _median_wall_and_output(cmd: list[str], opts: Options, *, stdin: str = "",
                            ok=(0,)) -> tuple[float, str, subprocess.CompletedProcess]:
    times = []
    for _ in range(opts.repeats):
        seconds, done = _wall(cmd, opts, stdin=stdin)
        if done.returncode not in ok:
            raise RuntimeError(f"{' '.join(cmd[-4:])} exited {done.returncode}: {done.stderr.strip()[-300:]}")
        times.append(seconds)
    return statistics.median(times), f"median of {len(times)}: " + ", ".join(f"{t:.2f}" for t in times), done


def _llmaudit() -> str:
    local = ROOT / ".venv" / "bin" / "llmaudit"
    found = str(local) if local.exists() else shutil.which("llmaudit")
    if not found:
        raise RuntimeError("llmaudit is not installed (make install)")
    return found


# ------------------------------------------------------------------------------------------------
# The KV cache: cached vs recomputed greedy decoding on the transformer module's own (full) model


def kv_cache_speedup_at(batch: int) -> Callable[[Options], tuple[float, str]]:
    """Greedy decoding of 256 tokens on the transformer module's own (full) model, with and without
    the KV cache, ``batch`` sequences at a time."""
    def measure(opts: Options) -> tuple[float, str]:
        import torch

        from modules import transformer as M

        torch.set_num_threads(1)  # as the audit runner does
        cfg = M.TransformerConfig.full()
        model = M.Transformer(M.task_model_config(cfg), generator=torch.Generator().manual_seed(0))
        prompt = torch.randint(0, cfg.n_symbols, (batch, cfg.n_items + 2), generator=torch.Generator().manual_seed(1))
        n_new = M.KV_CACHE_SPEEDUP_GOAL[0]
        r = M.kv_cache_speedup(model, prompt, n_new, repeats=max(opts.repeats, 3))
        if not r["same_tokens"]:
            raise RuntimeError("cached and recomputed greedy decoding gave different tokens")
        return r["speedup"], (f"{n_new} tokens, batch {batch}: cached {r['seconds_cached']:.3f} s, recomputed "
                              f"{r['seconds_full']:.3f} s (medians), same tokens, {r['flop_ratio']:.0f}x fewer "
                              f"FLOPs; {r['allocator']}")
    measure.__name__ = f"kv_cache_speedup_batch{batch}"
    return measure


# ------------------------------------------------------------------------------------------------
# Speculative decoding: plain vs speculative sampling, a trained 6-layer target and its 1-layer draft


def speculative_speedup(opts: Options) -> tuple[float, str]:
    import torch

    from modules import inference as M

    torch.set_num_threads(1)
    cfg = M.SpeedConfig(gammas=(SPECULATIVE_GAMMA,), repeats=max(opts.repeats, 3))
    g = torch.Generator().manual_seed(0)
    (row,) = M.time_speculation(M.train_speed_pair(cfg, g), cfg, g)
    return row.speedup, (f"gamma {row.gamma}: alpha {row.alpha:.2f}, {row.tokens_per_call:.2f} tokens per target "
                         f"call, draft/target call {row.c:.2f}, predicted {row.predicted:.2f}x")


SPECULATIVE_GAMMA = 4


# ------------------------------------------------------------------------------------------------
# The tokenizer: training as a whole process, ours vs a minbpe-style pure-Python trainer

TOKENIZER_VOCAB = 512
TOKENIZER_TEXT_BYTES = 186_000  # the ~186 KB of the issue: the module's generated zh/en corpus, seed 0

# A straightforward minbpe-style trainer (written for this benchmark): split the text into chunks,
# then for every merge count all adjacent pairs with a dict, take the most frequent, and rebuild
# every chunk by a left-to-right list scan. Only the standard library, as minbpe's basic trainer.
BASELINE_BPE = r'''
import re, sys
SPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

def count_pairs(ids, counts):
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1

def replace_pair(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

text = open(sys.argv[1], encoding="utf-8").read()
chunks = [list(piece.encode("utf-8")) for piece in SPLIT.findall(text)]
merges = {}
for k in range(int(sys.argv[2])):
    counts = {}
    for ids in chunks:
        count_pairs(ids, counts)
    if not counts:
        break
    pair = max(counts, key=counts.get)
    merges[pair] = 256 + k
    chunks = [replace_pair(ids, pair, 256 + k) for ids in chunks]
print(len(merges))
'''

OURS_BPE = ("import sys\nfrom modules.tokenizer import train_bpe\n"
            "tok = train_bpe(open(sys.argv[1], encoding='utf-8').read(), int(sys.argv[2]))\nprint(len(tok.merges))\n")


def _corpus_file(opts: Options) -> Path:
    path = opts.tmp / "corpus.txt"
    if not path.exists():
        import torch

        from modules.tokenizer import mixed_corpus

        path.write_text(mixed_corpus(TOKENIZER_TEXT_BYTES, torch.Generator().manual_seed(0)), encoding="utf-8")
    return path


def tokenizer_vs_baseline(opts: Options) -> tuple[float, str]:
    from modules.tokenizer import SPECIAL_TOKENS

    corpus = _corpus_file(opts)
    n_merges = TOKENIZER_VOCAB - 256 - len(SPECIAL_TOKENS)
    ours, ours_detail = _median_wall([PYTHON, "-c", OURS_BPE, str(corpus), str(TOKENIZER_VOCAB)], opts)
    base, base_detail = _median_wall([PYTHON, "-c", BASELINE_BPE, str(corpus), str(n_merges)], opts)
    kb = corpus.stat().st_size / 1000
    return base / ours, (f"vocab {TOKENIZER_VOCAB} on {kb:.0f} KB, whole processes: ours {ours:.2f} s "
                         f"({ours_detail}), minbpe-style {base:.2f} s ({base_detail})")


def tokenizer_train_s(opts: Options) -> tuple[float, str]:
    corpus = _corpus_file(opts)
    return _median_wall([PYTHON, "-c", OURS_BPE, str(corpus), str(TOKENIZER_VOCAB)], opts)


# ------------------------------------------------------------------------------------------------
# Audits and commands


def audit_sft_full_s(opts: Options) -> tuple[float, str]:
    """`llmaudit audit sft` in full mode (3 seeds, run side by side as `audit` does by default), report
    pages included."""
    seconds, detail, done = _median_wall_and_output(
        [_llmaudit(), "audit", "sft", "--out", str(opts.tmp / "reports"), "--json"], opts, ok=(0, 1))
    verdict = "passes" if done.returncode == 0 else "FAILS a check"
    return seconds, f"{detail}; the audit {verdict}"


def cli(*args: str, stdin: str = "") -> Callable[[Options], tuple[float, str]]:
    """A row measuring `llmaudit ARGS` as a whole process (the empty stdin ends a quiz at once)."""
    def measure(opts: Options) -> tuple[float, str]:
        return _median_wall([_llmaudit(), *args], opts, stdin=stdin)
    measure.__name__ = "cli_" + "_".join(args)
    return measure


def report_render_s(opts: Options) -> tuple[float, str]:
    """`llmaudit report` over one toy gae run record (made first, not timed)."""
    out = opts.tmp / "report-bench"
    if not out.exists():
        _wall([_llmaudit(), "audit", "gae", "--toy", "--out", str(out), "--json"], opts)
    return _median_wall([_llmaudit(), "report", "--out", str(out), "--json"], opts)


ROWS: list[Row] = [
    Row("kv_cache_speedup_256_tokens", "x", kv_cache_speedup_at(1), Goal(">=", 5.0)),
    Row("kv_cache_speedup_256_tokens_batch4", "x", kv_cache_speedup_at(4), None),
    Row("speculative_speedup_gamma4", "x", speculative_speedup, Goal(">=", 1.3)),
    Row("tokenizer_train_vs_minbpe_style", "x", tokenizer_vs_baseline, Goal(">=", 10.0)),
    Row("tokenizer_train_process_s", "s", tokenizer_train_s, None),
    Row("audit_sft_full_s", "s", audit_sft_full_s, Goal("<", 30.0)),
    Row("cli_list_s", "s", cli("list"), Goal("<", 0.5)),
    Row("cli_roadmap_s", "s", cli("roadmap"), Goal("<", 0.5)),
    Row("cli_quiz_start_s", "s", cli("quiz", "--day", "1", "-n", "1", "--json"), Goal("<", 0.5)),
    Row("cli_progress_s", "s", cli("progress", "--json"), Goal("<", 0.5)),
    Row("report_render_one_record_s", "s", report_render_s, None),
]


# ------------------------------------------------------------------------------------------------
# Running


def _busy_processes(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a core each: what another user's job does to ours."""
    return [subprocess.Popen([PYTHON, "-c", "while True: pass"]) for _ in range(n)]


def run_rows(rows: list[Row], opts: Options) -> list[dict]:
    results = []
    for row in rows:
        try:
            value, detail = row.measure(opts)
            error = None
        except Exception as exc:  # one broken row must not hide the others
            value, detail, error = float("nan"), "", f"{type(exc).__name__}: {exc}"
        met = None if row.goal is None or error else row.goal.met(value)
        results.append({"name": row.name, "value": value, "unit": row.unit,
                        "goal": None if row.goal is None else {"op": row.goal.op, "value": row.goal.value},
                        "met": met, "detail": detail, "error": error})
    return results


def _line(r: dict) -> str:
    value = "failed" if r["error"] else (f"{r['value']:.2f}{r['unit']}" if r["unit"] == "x" else f"{r['value']:.2f} s")
    goal = "" if r["goal"] is None else f"{r['goal']['op']} {r['goal']['value']:g}{'x' if r['unit'] == 'x' else ' s'}"
    verdict = "" if r["met"] is None else ("ok" if r["met"] else "MISSED")
    return f"{r['name']:34s} {value:>9s}   goal {goal or '-':9s} {verdict:6s} {r['error'] or r['detail']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="ROW", help="run only this row (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median; default 3)")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="N busy processes run beside the rows")
    parser.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    parser.add_argument("--list", action="store_true", help="list the rows and their goals")
    args = parser.parse_args(argv)
    names = [r.name for r in ROWS]
    if args.list:
        for r in ROWS:
            print(f"{r.name:34s} {r.goal or '-'}")
        return 0
    unknown = [n for n in args.only or [] if n not in names]
    if unknown or args.repeats < 1 or args.load < 0:
        parser.print_usage(sys.stderr)
        print(f"bench.py: unknown row(s) {unknown}; rows: {', '.join(names)}" if unknown
              else "bench.py: --repeats must be >= 1 and --load >= 0", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if not args.only or r.name in args.only]
    busy = _busy_processes(args.load)
    try:
        with tempfile.TemporaryDirectory(prefix="llmaudit-bench-") as tmp:
            results = run_rows(rows, Options(args.repeats, Path(tmp)))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if args.json:
        doc = {"schema": SCHEMA, "repeats": args.repeats, "load": args.load, "cpus": os.cpu_count(),
               "rows": [{**r, "value": None if r["value"] != r["value"] else r["value"]} for r in results]}
        print(json.dumps(doc, ensure_ascii=False))
    else:
        for r in results:
            print(_line(r))
    return 0 if all(r["met"] is not False and not r["error"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
