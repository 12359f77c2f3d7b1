"""scripts/bench.py is a benchmark, not a test: here only that it runs and reports a row against its goal."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_measures_one_row_against_its_goal_as_json():
    out = _bench("--only", "tokenizer_train_process_s", "--repeats", "1", "--json")
    assert out.returncode in (0, 1), out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == "llmaudit.bench/v1" and [r["name"] for r in doc["rows"]] == ["tokenizer_train_process_s"]
    row = doc["rows"][0]
    assert row["error"] is None and 0 < row["value"] < 120 and row["unit"] == "s" and "median of 1" in row["detail"]


def test_bench_lists_every_issue_figure_with_a_goal():
    out = _bench("--list")
    assert out.returncode == 0
    goals = dict(line.split(None, 1) for line in out.stdout.splitlines())
    assert goals["kv_cache_speedup_256_tokens"].strip() == ">= 5"
    assert goals["tokenizer_train_vs_minbpe_style"].strip() == ">= 10"
    assert goals["audit_sft_full_s"].strip() == "< 30"
    for name in ("cli_list_s", "cli_roadmap_s", "cli_quiz_start_s", "cli_progress_s"):
        assert goals[name].strip() == "< 0.5"


def test_bench_rejects_an_unknown_row_with_exit_2():
    out = _bench("--only", "no_such_row")
    assert out.returncode == 2 and "no_such_row" in out.stderr and out.stdout == ""
