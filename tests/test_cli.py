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
                    "roadmap", "brief"):
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
    res = invoke("audit", "mdp", "--toy", "--out", tmp_path)
    assert res.exit_code == 0
    assert "bellman_optimality_residual_below_1e-8" in res.stdout and "checks pass" in res.stdout


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
    import torch

    from modules import mdp as M

    monkeypatch.setattr(M, "monte_carlo_returns", lambda env, actions, episodes, gamma, seed: torch.ones(episodes, dtype=M.DTYPE))
    res = invoke("smoke", "-m", "mdp", "--out", tmp_path)
    assert res.exit_code == 1
    assert "✗ monte_carlo_return_matches_v_star" in res.stdout


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


def test_check_explains_failing_invariants(tmp_path):
    wrong = "def bellman_optimality_backup(P, R, gamma, V):\n    return (R + gamma * P @ V).mean(-1)\n"
    res = invoke("check", KERNEL, write(tmp_path, wrong))
    assert res.exit_code == 1
    assert "✗ bellman_optimality_residual_below_1e-8" in res.stdout
    assert "why it matters" in res.stdout and "hint:" in res.stdout
