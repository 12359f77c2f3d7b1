"""`llmaudit smoke`: records saved as modules finish (an interrupted smoke keeps them), a summary page
over every module's latest run, and worker processes that give the same results."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import llmaudit.runner
from llmaudit.cli import app
from llmaudit.record import RunRecord, find_records

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


def smoke(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["smoke", *map(str, args)])
    return res.exit_code, res.stdout


def test_an_interrupted_smoke_keeps_the_modules_that_finished(tmp_path, monkeypatch):
    real, started = llmaudit.runner.run_audit, []

    def interrupted_after_two(spec, **kw):
        started.append(spec.name)
        if len(started) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third module runs
        return real(spec, **kw)

    monkeypatch.setattr(llmaudit.runner, "run_audit", interrupted_after_two)
    code, out = smoke("-m", "mdp", "-m", "gae", "-m", "advantage", "-m", "td", "--out", tmp_path)
    assert code == 130
    assert "interrupted after 2 of 4" in out
    saved = sorted(RunRecord.load(p).module for p in find_records(tmp_path / "runs"))
    assert saved == ["gae", "mdp"]
    for module in saved:  # each finished module also has its pages
        assert len(list((tmp_path / "runs" / module).glob("*/report.html"))) == 1
    summary = (tmp_path / "smoke" / "index.md").read_text()
    assert "interrupted after 2 of 4" in summary and "`gae`" in summary and "`advantage`" not in summary


def test_the_summary_keeps_other_modules_and_marks_this_run(tmp_path):
    assert smoke("-m", "mdp", "--out", tmp_path)[0] == 0
    assert smoke("-m", "gae", "--out", tmp_path)[0] == 0
    rows = {line.split("|")[2].strip(" `"): line for line in (tmp_path / "smoke" / "index.md").read_text().splitlines()
            if line.startswith("| ") and "`" in line}
    assert set(rows) == {"mdp", "gae"}
    assert "● this run" in rows["gae"] and "this run" not in rows["mdp"]
    assert "toy" in rows["mdp"]  # the older run says when and in which mode it ran
    html = (tmp_path / "smoke" / "index.html").read_text()
    assert html.count("● this run") == 1 and ">mdp<" in html


def _verdicts(data: dict) -> dict[str, dict[str, tuple[bool, object]]]:
    """module -> check -> (passed, measured), measured left out for clock measurements."""
    out = {}
    for m in data["modules"]:
        result = json.loads(Path(m["record"]).read_text())["results"][0]
        timed = set(result.get("timed", []))
        out[m["module"]] = {c["name"]: (c["passed"], None if c["name"] in timed else c["measured"])
                            for c in result["checks"]}
    return out


def test_two_workers_give_the_same_records_as_one(tmp_path):
    one = runner.invoke(app, ["smoke", "-m", "mdp", "-m", "gae", "-j", "1", "--json", "--out", str(tmp_path / "one")])
    two = runner.invoke(app, ["smoke", "-m", "mdp", "-m", "gae", "-j", "2", "--json", "--out", str(tmp_path / "two")])
    assert one.exit_code == two.exit_code == 0, two.output
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["jobs"] == 1 and b["jobs"] == 2
    assert [m["module"] for m in b["modules"]] == ["mdp", "gae"]  # roadmap order, whatever finished first
    assert _verdicts(a) == _verdicts(b) and all(len(v) > 10 for v in _verdicts(a).values())


def test_a_worker_reports_an_audit_it_cannot_import(monkeypatch, tmp_path):
    from llmaudit import registry, smoke as engine

    monkeypatch.setitem(registry.BROKEN, "halfbuilt", "ImportError: cannot import name 'x'")
    assert engine._run_and_save("halfbuilt", str(tmp_path)) == ("halfbuilt", "ImportError: cannot import name 'x'")
    assert find_records(tmp_path / "runs") == []
