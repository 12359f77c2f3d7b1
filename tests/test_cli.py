"""The CLI through typer's CliRunner: JSON documents, exit codes, errors without tracebacks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmaudit.cli import app

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def as_json(res) -> dict:
    return json.loads(res.stdout)  # exactly one document, or this raises


def test_help_of_every_command_shows_an_example():
    res = invoke("--help")
    assert res.exit_code == 0
    for command in ("list", "smoke", "audit", "report", "practice", "check", "doctor", "quiz", "review", "progress",
                    "roadmap", "brief", "sweep"):
        sub = invoke(command, "--help")
        assert sub.exit_code == 0, command
        assert "Example" in sub.stdout, command


def test_no_arguments_prints_help_with_usage_exit_code():
    assert invoke().exit_code == 2


def test_list_json(tmp_path):
    data = as_json(invoke("list", "--json", "--out", tmp_path))
    assert data["schema"] == "llmaudit.list/v1"
    mdp = next(m for m in data["modules"] if m["name"] == "mdp")
    assert mdp["day"] == 1 and "bellman_optimality_backup" in mdp["kernels"] and mdp["latest"] is None


def test_audit_json_writes_record_and_reports(tmp_path):
    res = invoke("audit", "mdp", "--toy", "--seed", "2", "--json", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    data = as_json(res)
    assert data["schema"] == "llmaudit.audit/v1" and data["ok"] and data["seeds"] == [2]
    for key in ("record", "markdown", "html"):
        assert Path(data["files"][key]).exists()
    assert (tmp_path / "index.html").exists()
    listed = as_json(invoke("list", "--json", "--out", tmp_path))
    assert next(m for m in listed["modules"] if m["name"] == "mdp")["latest"]["passed"] is True


def test_audit_seeds_and_set_reach_the_record(tmp_path):
    data = as_json(invoke("audit", "mdp", "--toy", "--seeds", "2", "--set", "gamma=0.9", "--json", "--out", tmp_path))
    assert data["seeds"] == [0, 1]
    record = json.loads(Path(data["files"]["record"]).read_text())
    assert record["config"]["gamma"] == 0.9 and record["overrides"] == {"gamma": "0.9"}


def test_audit_human_output_has_the_checks_table(tmp_path):
    res = invoke("audit", "gae", "--toy", "--out", tmp_path)
    assert res.exit_code == 0
    assert "matches_verl_test_vectors" in res.stdout and "checks pass" in res.stdout and "margin" in res.stdout


def test_audit_runs_one_check_alone(tmp_path):
    res = invoke("audit", "gae", "--toy", "--check", "lambda_zero_is_td_error", "--json", "--out", tmp_path)
    data = as_json(res)
    assert res.exit_code == 0 and [c["name"] for c in data["checks"]] == ["lambda_zero_is_td_error"]
    assert data["selected"] == ["lambda_zero_is_td_error"] and data["checks"][0]["kernels"] == ["compute_gae"]
    res = invoke("audit", "gae", "--toy", "--check", "lambda_zero_is_td_eror", "--out", tmp_path)
    assert res.exit_code == 2 and "Did you mean: lambda_zero_is_td_error" in res.stderr


@pytest.mark.parametrize("args, text", [
    (["audit", "mdpp"], "Did you mean: mdp"),
    (["audit", "mdp", "--set", "gama=0.9"], "Did you mean gamma"),
    (["audit", "mdp", "--set", "gamma=abc"], "expected a number"),
    (["audit", "mdp", "--set", "gamma"], "key=value"),
    (["practice", "bellman_optimality"], "bellman_optimality_backup"),
    (["smoke", "-m", "nope"], "unknown module"),
])
def test_usage_errors_exit_2_with_a_message(args, text, tmp_path):
    res = invoke(*args, "--out", tmp_path) if args[0] != "practice" else invoke(*args)
    assert res.exit_code == 2, res.output
    assert text in res.stderr and "Traceback" not in res.output


def test_usage_error_in_json_mode_is_still_one_document(tmp_path):
    res = invoke("audit", "nope", "--json", "--out", tmp_path)
    assert res.exit_code == 2
    assert as_json(res)["schema"] == "llmaudit.error/v1"


def test_smoke_json_and_pages(tmp_path):
    res = invoke("smoke", "-m", "mdp", "--json", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    data = as_json(res)
    assert data["schema"] == "llmaudit.smoke/v1" and data["ok"]
    assert [m["module"] for m in data["modules"]] == ["mdp"]
    assert (tmp_path / "smoke" / "index.md").exists() and (tmp_path / "smoke" / "index.html").exists()


def test_smoke_fails_with_exit_1_when_a_check_fails(tmp_path, monkeypatch):
    from modules import gae as G

    monkeypatch.setattr(G, "td_errors", lambda rewards, values, next_values, terminated, gamma: rewards)
    res = invoke("smoke", "-m", "gae", "--out", tmp_path)
    assert res.exit_code == 1
    assert "✗ lambda_zero_is_td_error" in res.stdout


def test_report_rebuilds_from_records(tmp_path):
    invoke("audit", "mdp", "--toy", "--out", tmp_path)
    for page in tmp_path.glob("runs/mdp/*/report.*"):
        page.unlink()
    (tmp_path / "runs" / "mdp" / "broken.json").write_text("{")
    res = invoke("report", "--json", "--out", tmp_path)
    assert res.exit_code == 0
    data = as_json(res)
    assert len(data["pages"]) == 1 and Path(data["pages"][0]).exists() and len(data["warnings"]) == 1


def test_doctor_json_lists_items():
    res = invoke("doctor", "--json")
    data = as_json(res)
    assert res.exit_code in (0, 3) and {i["item"] for i in data["items"]} >= {"python", "torch", "CJK font"}
    assert res.exit_code == (0 if data["ok"] else 3)


# --- practice and check ------------------------------------------------------------------------

KERNEL = "bellman_optimality_backup"


def test_practice_lists_kernels():
    res = invoke("practice", "--json")
    assert KERNEL in {k["name"] for k in as_json(res)["kernels"]}


def test_practice_writes_a_stub_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mine.py"
    assert invoke("practice", KERNEL, "--out", target).exit_code == 0
    assert "raise NotImplementedError" in target.read_text()
    res = invoke("practice", KERNEL, "--out", target)
    assert res.exit_code == 2 and "--force" in res.stderr
    # the untouched stub is a clear "still a stub" error, not a traceback
    res = invoke("check", KERNEL, target)
    assert res.exit_code == 1 and "NotImplementedError" in res.stderr and "Traceback" not in res.output


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "user.py"
    path.write_text("import torch\n\n" + body)
    return path


CORRECT = "def bellman_optimality_backup(P, R, gamma, V):\n    return (R + gamma * P @ V).max(-1).values\n"


@pytest.mark.parametrize("body, text", [
    (None, "no such file"),
    ("def bellman_optimality_backup(P, R, gamma, V)\n    return V\n", "does not parse"),
    ("def other(P, R, gamma, V):\n    return V\n", "no function named `bellman_optimality_backup`"),
    ("def bellman_optimality_backup(P, R, V):\n    return V\n", "wrong signature"),
    ("def bellman_optimality_backup(P, R, gamma, V):\n    return P[0, 0, 10]\n", "raised IndexError"),
    ("def bellman_optimality_backup(P, R, gamma, V):\n    return R + gamma * P @ V\n", "returned tensor of shape (4, 2)"),
    ("raise RuntimeError('at import')\n", "raised while being imported"),
])
def test_check_rejects_unusable_files_in_one_paragraph(tmp_path, body, text):
    path = tmp_path / "missing.py" if body is None else write(tmp_path, body)
    res = invoke("check", KERNEL, path)
    assert res.exit_code == 1, res.output
    assert text in res.stderr, res.stderr
    assert "Traceback" not in res.output


def test_check_passes_a_correct_implementation(tmp_path):
    res = invoke("check", KERNEL, write(tmp_path, CORRECT), "--json")
    data = as_json(res)
    assert res.exit_code == 0 and data["ok"] and data["schema"] == "llmaudit.check/v1"


GAE_NO_TRUNCATION = """def compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    adv = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        end = terminated[t].to(rewards.dtype)
        delta = rewards[t] + gamma * (1 - end) * next_values[t] - values[t]
        carry = delta + gamma * lam * (1 - end) * carry
        adv[t] = carry
    return adv, adv + values
"""


def test_check_explains_failing_invariants(tmp_path):
    res = invoke("check", "compute_gae", write(tmp_path, GAE_NO_TRUNCATION))
    assert res.exit_code == 1
    assert "✗ no_leak_across_episode_boundary" in res.stdout and "why it matters" in res.stdout
    assert "hint:" in res.stdout and "5 of the 17 checks that call your compute_gae fail" in res.stdout
    data = as_json(invoke("check", "compute_gae", write(tmp_path, GAE_NO_TRUNCATION), "--json"))
    verdicts = {c["name"]: c["passed"] for c in data["checks"]}
    assert verdicts["matches_verl_test_vectors"] and not verdicts["truncation_bootstraps_from_next_value"]


def test_check_runs_only_the_checks_that_call_the_kernel(tmp_path):
    from llmaudit.registry import get_audit

    mine = {c.name for c in get_audit("mdp").checks_of_kernel(KERNEL, "toy")}
    data = as_json(invoke("check", KERNEL, write(tmp_path, CORRECT), "--json"))
    assert {c["name"] for c in data["checks"]} == mine and all(KERNEL in c["kernels"] for c in data["checks"])
    assert set(data["module_checks_not_run"]).isdisjoint(mine) and set(data["other_kernels_checks_not_run"]).isdisjoint(mine)
    assert "transition_rows_sum_to_one" in data["module_checks_not_run"]
    assert data["calls"]["calls"] > 0


def test_check_says_in_words_when_the_function_returns_nan(tmp_path):
    nan = "def compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam):\n" \
          "    A = torch.full_like(rewards, float('nan'))\n    return A, A + values\n"
    res = invoke("check", "compute_gae", write(tmp_path, nan))
    assert res.exit_code == 1 and "returned NaN on" in res.stdout and "NaN (not finite)" in res.stdout
    assert "measured 0 " not in res.stdout


def test_check_treats_sys_exit_in_user_code_as_a_failure(tmp_path):
    body = "import sys\n\ndef compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam):\n" \
           "    if rewards.shape[0] > 5:\n        sys.exit(0)\n    return rewards, rewards + values\n"
    res = invoke("check", "compute_gae", write(tmp_path, body), "--json")
    assert res.exit_code == 1 and not as_json(res)["ok"]


def test_sweep_reports_pass_rates_and_margins(tmp_path):
    out = tmp_path / "sweep.json"
    res = invoke("sweep", "gae", "--seeds", "2", "-j", "1", "--json", "--save", out, "--markdown", tmp_path / "s.md")
    data = as_json(res)
    assert res.exit_code == 0 and data["ok"] and data["seeds"] == [0, 1]
    check = next(c for c in data["modules"][0]["checks"] if c["name"] == "variance_grows_with_lambda")
    assert check["passed"] == check["n"] == 2 and check["worst_margin"] > 0 and "ratio" in check["ranges"]
    assert json.loads(out.read_text())["schema"] == "llmaudit.sweep/v1"
    assert "| `variance_grows_with_lambda` | outcome |" in (tmp_path / "s.md").read_text()
