"""Faults and bad input: each is one paragraph on stderr, the documented exit code, no traceback, and
nothing the user already had is lost (issue 11)."""
from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llmaudit.runner
from llmaudit.cli import app
from conftest import read_only_folder

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def assert_clean_error(result, code: int, *texts: str) -> None:
    """Exit ``code``, each text in the message, and no Python traceback anywhere."""
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, (result.exit_code, output, result.exception)
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for text in texts:
        assert text in " ".join(output.split()), (text, output)


def no_work(monkeypatch):
    """Fail the test if an audit starts: bad input must be refused before any work."""
    def refuse(*a, **k):
        raise AssertionError("an audit ran although its input or output folder is unusable")
    monkeypatch.setattr(llmaudit.runner, "run_audit", refuse)
    monkeypatch.setattr("llmaudit.cli.run.run_audit", refuse)


# --------------------------------------------------------------------------- 1. unusable output folders

def test_writable_dir_creates_a_missing_folder_and_leaves_no_probe(tmp_path):
    from llmaudit.cli.common import writable_dir

    target = tmp_path / "a" / "b"
    assert writable_dir(target) == target
    assert target.is_dir() and list(target.iterdir()) == []


def test_writable_dir_probe_reports_a_read_only_file_system(tmp_path, monkeypatch):
    from llmaudit.cli.common import EnvironmentProblem, writable_dir

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(EnvironmentProblem, match="Read-only file system"):
        writable_dir(tmp_path)


def under_a_file(tmp_path: Path) -> Path:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    return blocker / "reports"


@pytest.mark.parametrize("command", [
    ["audit", "gae", "--toy"], ["smoke", "-m", "gae"], ["report"], ["progress"],
])
def test_output_folder_under_a_file_is_exit_3_before_any_work(command, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    no_work(monkeypatch)
    target = under_a_file(tmp_path)
    assert_clean_error(invoke(*command, "--out", target), 3, f"cannot write to the output folder {target}",
                       "a part of its path is a file", "nothing was done")
    assert (tmp_path / "blocker").read_text() == "a regular file\n"


def test_output_folder_that_is_a_file_is_exit_3(tmp_path, monkeypatch):
    no_work(monkeypatch)
    target = tmp_path / "reports"
    target.write_text("x")
    assert_clean_error(invoke("audit", "gae", "--toy", "--out", target), 3, "it is a file, not a folder")


def test_read_only_output_folder_is_exit_3_before_the_audit_runs(tmp_path, monkeypatch):
    no_work(monkeypatch)
    with read_only_folder(tmp_path / "ro") as ro:
        result = invoke("audit", "gae", "--toy", "--out", ro)
        assert list(ro.iterdir()) == []
    assert_clean_error(result, 3, f"cannot write to the output folder {ro}")


def test_read_only_smoke_and_report_folders_are_exit_3(tmp_path, monkeypatch):
    no_work(monkeypatch)
    with read_only_folder(tmp_path / "ro") as ro:
        smoke = invoke("smoke", "-m", "gae", "--out", ro)
        report = invoke("report", "--out", ro, "--json")
    assert_clean_error(smoke, 3, "cannot write to the output folder")
    assert_clean_error(report, 3, "cannot write to the output folder")
    assert '"exit_code": 3' in report.stdout


def test_brief_into_a_read_only_folder_is_exit_3(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        result = invoke("brief", "gae", "-f", "md", "--reports", ro)
    assert_clean_error(result, 3, f"cannot write to the output folder {ro / 'briefs'}", "--reports")


def test_practice_stub_into_a_read_only_folder_is_exit_3(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        result = invoke("practice", "compute_gae", "-o", ro / "my_gae.py")
        assert not (ro / "my_gae.py").exists()
    assert_clean_error(result, 3, "cannot write to the output folder")


# --------------------------------------------------------------------------- 2. the progress database's home

def test_llmaudit_home_that_is_a_file_is_exit_3(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    monkeypatch.setenv("LLMAUDIT_HOME", str(home))
    result = invoke("progress", "--out", tmp_path / "reports")
    assert_clean_error(result, 3, f"the progress folder {home} (set by LLMAUDIT_HOME)", "it is a file, not a folder",
                       "Set LLMAUDIT_HOME to a folder you can write")
    assert home.read_text() == "not a folder\n"


def test_llmaudit_home_under_a_file_is_exit_3(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAUDIT_HOME", str(under_a_file(tmp_path)))
    assert_clean_error(invoke("quiz", "--day", "1", input="q\n"), 3, "a part of its path is a file")


def test_healthy_database_in_a_read_only_folder_is_called_read_only_not_unreadable(tmp_path, monkeypatch):
    import hashlib

    from llmaudit.learn.store import Store

    home = tmp_path / "home"
    monkeypatch.setenv("LLMAUDIT_HOME", str(home))
    Store().close()
    db = home / "progress.sqlite3"
    before = hashlib.md5(db.read_bytes()).hexdigest()
    with read_only_folder(home):
        quiz = invoke("quiz", "--day", "1", input="q\n")  # must write: refused, the file untouched
        shown = [invoke(cmd, "--out", tmp_path / "reports") for cmd in ("progress", "roadmap")]  # only read: shown
        assert sorted(p.name for p in home.iterdir()) == ["progress.sqlite3"]  # no journal, -wal or -shm
    assert_clean_error(quiz, 3, f"{db} is read-only", "Your progress in it is intact and was not touched",
                       f"Make {home} writable")
    assert "move it away" not in quiz.output + quiz.stderr
    for result in shown:
        assert result.exit_code == 0, result.output + result.stderr
        assert f"{db} is read-only: showing your progress" in " ".join(result.stderr.split())
    assert hashlib.md5(db.read_bytes()).hexdigest() == before


def test_empty_read_only_home_cannot_hold_the_database(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLMAUDIT_HOME", str(home))
    with read_only_folder(home):
        result = invoke("progress", "--out", tmp_path / "reports")
        assert list(home.iterdir()) == []
    assert_clean_error(result, 3, "cannot hold the progress database")
    assert "not a readable" not in result.output + result.stderr


# --------------------------------------------------------------------------- 6. the interview date

def quiz_one_easy(*extra):
    """Answer one recall item Easy; returns (result, days until it is due again)."""
    import json
    from datetime import datetime, timezone

    result = invoke("quiz", "--day", "1", "-n", "1", "--lang", "en", "--json", *extra, input="\n4\n")
    assert result.exit_code == 0, (result.output, result.stderr)
    due = datetime.fromisoformat(json.loads(result.stdout)["items"][0]["next_due"])
    return result, (due - datetime.now(timezone.utc)).total_seconds() / 86400


def test_past_interview_date_is_refused_with_todays_date(tmp_path, monkeypatch):
    from datetime import date

    from llmaudit.learn.store import Store

    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    result = invoke("quiz", "--day", "1", "--interview-date", "2020-01-01", input="q\n")
    assert_clean_error(result, 2, "--interview-date 2020-01-01 is in the past", "today is",
                       "--interview-date none to clear it")
    assert f"today is {date.today().isoformat()}" in result.stderr
    assert Store().get("interview_date") is None  # nothing was saved


def test_saved_past_interview_date_warns_and_caps_nothing(tmp_path, monkeypatch):
    from llmaudit.learn.store import Store

    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    store = Store()
    store.set("interview_date", "2020-01-01")  # saved long ago, when it was in the future
    store.close()
    result, days = quiz_one_easy()
    assert "the saved interview date 2020-01-01 has passed" in " ".join(result.stderr.split())
    assert "--interview-date none" in result.stderr
    assert days > 1.5  # an Easy first answer is several days out; the passed date used to cap it at 1 d


def test_interview_date_none_clears_the_saved_date(tmp_path, monkeypatch):
    from datetime import date, timedelta

    from llmaudit.learn.store import Store

    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    soon = (date.today() + timedelta(days=1)).isoformat()
    _, capped = quiz_one_easy("--interview-date", soon)
    assert Store().get("interview_date") == soon and capped <= 1.01
    result = invoke("quiz", "--day", "2", "-n", "1", "--interview-date", "none", input="q\n")
    assert result.exit_code == 0 and "interview date cleared" in result.stderr
    assert Store().get("interview_date") is None


# --------------------------------------------------------------------------- 3. seeds and config values

def numeric_fields(config_cls) -> list[str]:
    import typing

    from llmaudit.config import field_types

    def numeric(tp) -> bool:
        if tp is bool:
            return False
        if tp in (int, float):
            return True
        return any(numeric(a) for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis)
    return [k for k, tp in field_types(config_cls).items() if numeric(tp)]


def test_every_numeric_config_field_of_every_audit_declares_its_range():
    from llmaudit.config import check_config, declared_ranges, in_range
    from llmaudit.registry import all_audits

    specs = all_audits()
    assert len(specs) >= 17
    for spec in specs:
        cls = type(spec.make_config("toy"))
        ranges = declared_ranges(cls)
        missing = [k for k in numeric_fields(cls) if k not in ranges]
        assert not missing, f"{spec.name}: {cls.__name__} declares no range for {missing}"
        assert set(ranges) <= set(numeric_fields(cls)), f"{cls.__name__}: ranges of unknown fields"
        for text in ranges.values():
            in_range(1.0, text)  # well-formed (a malformed range raises)
        for mode in ("toy", "full"):
            check_config(spec.make_config(mode))  # the presets lie inside their own ranges


@pytest.mark.parametrize("module, assignment, text", [
    ("mdp", "max_iters=0", "max_iters=0 is out of range: MDPConfig.max_iters must be >= 1"),
    ("ppo", "rollout_batch=0", "rollout_batch=0 is out of range: PPOConfig.rollout_batch must be >= 1"),
    ("ppo", "lam=2", "lam=2.0 is out of range: PPOConfig.lam must be in [0, 1]"),
    ("rlhf", "lam=-0.1", "lam=-0.1 is out of range: RLHFConfig.lam must be in [0, 1]"),
    ("gae", "gamma=nan", "gamma=nan is out of range: GAEConfig.gamma must be in [0, 1)"),
    ("dpo", "lr=inf", "lr=inf is out of range: DPOConfig.lr must be >= 0"),
    ("dpo", "beta=0", "beta=0.0 is out of range: DPOConfig.beta must be > 0"),
    ("gae", "critic_offset=inf", "GAEConfig.critic_offset must be a finite number"),
])
def test_out_of_range_config_values_are_exit_2_before_any_work(module, assignment, text, tmp_path, monkeypatch):
    no_work(monkeypatch)
    result = invoke("audit", module, "--toy", "--set", assignment, "--out", tmp_path)
    assert_clean_error(result, 2, text)
    assert not (tmp_path / "runs").exists()


def test_in_range_edge_values_are_accepted():
    from llmaudit.config import apply_overrides
    from llmaudit.registry import get_audit

    cfg = apply_overrides(get_audit("ppo").make_config("toy"), {"lam": "1", "gamma": "0", "ent_coef": "0"})
    assert (cfg.lam, cfg.gamma, cfg.ent_coef) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("args, text", [
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 4294967295, got 99999999999999999999"),
    (["--seed", "4294967295", "--seeds", "2"], "seeds 4294967295..4294967296 run past 4294967295"),
])
def test_bad_seeds_are_exit_2_before_any_work(args, text, tmp_path, monkeypatch):
    no_work(monkeypatch)
    assert_clean_error(invoke("audit", "mdp", "--toy", *args, "--out", tmp_path), 2, text)
    assert_clean_error(invoke("sweep", "mdp", *args), 2, text)


def test_bad_seed_of_check_is_exit_2(tmp_path):
    stub = tmp_path / "my_gae.py"
    assert invoke("practice", "compute_gae", "-o", stub).exit_code == 0
    assert_clean_error(invoke("check", "compute_gae", stub, "--seed", "-1"), 2, "--seed must be between 0 and")


def test_largest_seed_runs():
    from llmaudit.runner import MAX_SEED, run_audit

    rec = run_audit("gae", mode="toy", seeds=[MAX_SEED], only=["lambda_zero_is_td_error"])
    assert rec.results[0].checks and rec.passed, rec.errors


# --------------------------------------------------------------------------- 4. a run that stopped early

CHEAP = ["matches_verl_test_vectors", "matches_cleanrl_dones_vector", "lambda_zero_is_td_error",
         "returns_equal_advantages_plus_values"]


def fail_at_check(monkeypatch, n: int, exc: BaseException) -> None:
    """The runner itself raises ``exc`` when it reaches the ``n``-th check (an engine fault or Ctrl-C)."""
    real, calls = llmaudit.runner._run_check, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*a, **k)
    monkeypatch.setattr(llmaudit.runner, "_run_check", flaky)


def cheap_checks() -> list[str]:
    return [a for name in CHEAP for a in ("--check", name)]


def test_a_run_the_engine_stopped_says_stopped_after_k_of_n(tmp_path, monkeypatch):
    import json

    fail_at_check(monkeypatch, 3, RuntimeError("engine fault"))
    result = invoke("audit", "gae", "--toy", *cheap_checks(), "--out", tmp_path)
    text = " ".join(result.stdout.split())
    assert result.exit_code == 1, result.output
    assert "stopped after 2 of 4 checks" in text and "checks pass" not in text
    assert "RuntimeError: engine fault" in text
    record = json.loads(next((tmp_path / "runs" / "gae").glob("*.json")).read_text())
    checks = record["results"][0]["checks"]
    assert [c["name"] for c in checks] == CHEAP  # the unreached checks are in the record ...
    assert [c["passed"] for c in checks] == [True, True, False, False]  # ... as failed, never a pass
    assert checks[2]["error"].startswith("not run: stopped after 2 of 4 checks")
    assert record["results"][0]["stopped_after"] == 2


def test_json_of_a_stopped_run_carries_the_headline(tmp_path, monkeypatch):
    import json

    fail_at_check(monkeypatch, 2, RuntimeError("engine fault"))
    result = invoke("audit", "gae", "--toy", *cheap_checks(), "--out", tmp_path, "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["ok"] is False and doc["headline"] == "stopped after 1 of 4 checks"


def test_an_interrupted_run_says_how_far_it_got(tmp_path, monkeypatch):
    fail_at_check(monkeypatch, 2, KeyboardInterrupt())
    result = invoke("audit", "gae", "--toy", *cheap_checks(), "--out", tmp_path)
    assert_clean_error(result, 130, "interrupted: gae (seed 0) stopped after 1 of 4 checks")
    assert "checks pass" not in result.stdout


def test_a_complete_run_still_says_k_of_n_pass(tmp_path):
    result = invoke("audit", "gae", "--toy", *cheap_checks(), "--out", tmp_path)
    assert result.exit_code == 0 and "4/4 checks pass" in result.stdout


# --------------------------------------------------------------------------- 5. check: time limit, exits, slowness

GAE_HEAD = "import torch\n\ndef compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam):\n"
GAE_REFERENCE_BODY = ("    from modules.gae.gae import compute_gae as reference\n"
                      "    return reference(rewards, values, next_values, terminated, truncated, gamma, lam)\n")


def kernel_file(tmp_path: Path, body: str, prefix: str = "") -> Path:
    path = tmp_path / "my_compute_gae.py"
    path.write_text(prefix + GAE_HEAD + body)
    return path


def run_cli(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real command in its own process (so a hang cannot hang the test run)."""
    import sys

    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "llmaudit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])


def test_a_kernel_that_loops_forever_times_out(tmp_path):
    import time

    path = kernel_file(tmp_path, "    while True:\n        pass\n")
    start = time.monotonic()
    result = run_cli("check", "compute_gae", path, "--timeout", "3")
    wall = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    text = " ".join(result.stderr.split())
    assert "time limit 3 s" in text  # said from the start
    assert "your compute_gae timed out after 3 s on its first call" in text and "--timeout" in text
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert wall < 60, wall  # 3 s of the user's code plus loading the engine, even on a loaded machine


def test_a_kernel_that_hangs_mid_audit_times_out_with_progress(tmp_path):
    # correct on the docstring's example, endless on the audit's larger batches
    body = "    if rewards.shape[0] > 5:\n        while True:\n            pass\n" + GAE_REFERENCE_BODY
    result = invoke("check", "compute_gae", kernel_file(tmp_path, body), "--timeout", "3", "--json")
    assert result.exit_code == 1
    import json

    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["status"] == "timeout" and "timed out after 3 s with" in doc["error"]


@pytest.mark.parametrize("call, said", [
    ("sys.exit(0)", "called sys.exit(0)"),
    ("sys.exit()", "called sys.exit()"),
    ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
])
def test_a_kernel_that_ends_the_program_fails_the_file(call, said, tmp_path):
    path = kernel_file(tmp_path, f"    {call}\n", prefix="import sys\n")
    result = invoke("check", "compute_gae", path)
    assert_clean_error(result, 1, f"`compute_gae` in {path} {said}", "counts as a failure of your file")


def test_a_kernel_that_exits_mid_audit_fails_its_checks(tmp_path):
    body = "    if rewards.shape[0] > 5:\n        sys.exit(0)\n" + GAE_REFERENCE_BODY
    result = invoke("check", "compute_gae", kernel_file(tmp_path, body, prefix="import sys\n"))
    assert result.exit_code == 1
    text = " ".join(result.stdout.split())
    assert "your compute_gae called sys.exit(0): a kernel returns its result" in text
    assert "tried to end the program (sys.exit or KeyboardInterrupt) on" in text


def test_a_file_that_exits_at_import_or_kills_its_process_fails(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(3)\n")
    assert_clean_error(invoke("check", "compute_gae", path), 1, "called sys.exit(3) while being imported")
    killed = kernel_file(tmp_path, "    import os\n    os._exit(0)\n")
    assert_clean_error(invoke("check", "compute_gae", killed), 1, "ended without a result (exit code 0)",
                       "counts as a failure of your file")


def test_a_slow_kernel_is_called_slow(tmp_path):
    body = "    import time\n    time.sleep(0.05)\n" + GAE_REFERENCE_BODY
    result = invoke("check", "compute_gae", kernel_file(tmp_path, body))
    assert result.exit_code == 0, result.output  # slow but correct: it passes
    notes = " ".join((result.stderr + result.stdout).split())
    assert "your function is slow:" in notes and "ms per call on the small example" in notes
    assert "ms per call on the audit's inputs (5 calls timed beside the reference)" in notes


def test_a_fast_kernel_is_not_called_slow(tmp_path):
    result = invoke("check", "compute_gae", kernel_file(tmp_path, GAE_REFERENCE_BODY))
    assert result.exit_code == 0 and "slow" not in result.stdout + result.stderr


def test_quiz_code_items_check_the_file_in_a_child_process_too(tmp_path):
    from llmaudit.learn.quiz import Session

    shown: list[str] = []

    class Quiet:
        def show(self, text):
            shown.append(text)
    exits = kernel_file(tmp_path, "    raise SystemExit(0)\n")
    assert Session.check_file(Quiet(), "compute_gae", str(exits)) is False
    assert "called sys.exit(0)" in " ".join(shown)
    shown.clear()
    good = kernel_file(tmp_path, GAE_REFERENCE_BODY)
    assert Session.check_file(Quiet(), "compute_gae", str(good)) is True
    assert "17/17 checks pass ✓" in shown[-1]
