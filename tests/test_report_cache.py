"""Rendering skips what has not changed: formula images drawn once, progress plots drawn once per
change, and `llmaudit report` re-renders only records whose pages are out of date."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmaudit.cli import app
from llmaudit.record import RunRecord
from llmaudit.report import formulas, render
from llmaudit.runner import run_audit

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


@pytest.fixture(scope="module")
def record():
    return run_audit("mdp", mode="toy", seeds=[0])


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_formula_images_are_drawn_once_then_read_back(record, tmp_path, monkeypatch):
    formulas._draw.cache_clear()
    draws = []
    real = formulas._draw.__wrapped__
    monkeypatch.setattr(formulas, "_draw", lambda tex, size: draws.append(tex) or real(tex, size))
    paths = render.save_and_render(record, tmp_path)
    cache = tmp_path / ".cache" / "formulas"
    assert len(draws) == len(record.formulas) == len(list(cache.glob("*.svg"))) > 0
    before = _mtimes(cache)
    first_html = paths["html"].read_text()

    draws.clear()
    render.render_run(record, tmp_path)  # as a later process would: nothing in memory, files on disk
    assert draws == [] and _mtimes(cache) == before
    assert paths["html"].read_text() == first_html  # the same images inlined


def test_a_changed_formula_is_drawn(record, tmp_path, monkeypatch):
    render.save_and_render(record, tmp_path)
    changed = RunRecord.from_dict(record.to_dict() | {"formulas": [["new", r"$x^2 + y^2$"]]})
    draws = []
    real = formulas._draw.__wrapped__
    monkeypatch.setattr(formulas, "_draw", lambda tex, size: draws.append(tex) or real(tex, size))
    render.render_run(changed, tmp_path)
    assert draws == [r"$x^2 + y^2$"]


def _report(out: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["report", "--json", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_report_renders_only_records_whose_pages_are_stale(record, tmp_path):
    first = render.save_and_render(record, tmp_path)["record"]
    data = json.loads(first.read_text())
    data["timing"]["created"] = "2026-01-02T03:04:05.000000+0000"  # a second, older record
    second = first.parent / "20260102T030405.000-toy-s0.json"
    second.write_text(json.dumps(data))

    report = _report(tmp_path)
    assert len(report["pages"]) == 2 and report["rendered"] == [str(second.with_suffix("") / "report.html")]
    assert _report(tmp_path)["rendered"] == []  # nothing changed: nothing rendered

    data["title"] = "a changed title"
    second.write_text(json.dumps(data))
    assert _report(tmp_path)["rendered"] == [str(second.with_suffix("") / "report.html")]
    assert "a changed title" in (second.with_suffix("") / "report.html").read_text()

    (first.with_suffix("") / "report.md").unlink()  # a page deleted by hand is rendered again
    assert _report(tmp_path)["rendered"] == [str(first.with_suffix("") / "report.html")]
    assert len(_report(tmp_path, "--force")["rendered"]) == 2


def test_a_renderer_change_makes_every_page_stale(record, tmp_path, monkeypatch):
    render.save_and_render(record, tmp_path)
    assert _report(tmp_path)["rendered"] == []
    from llmaudit.report import cache

    monkeypatch.setattr(cache, "renderer_digest", lambda: "another renderer")
    assert len(_report(tmp_path)["rendered"]) == 1


def test_progress_plots_are_drawn_only_when_their_data_changes(tmp_path, monkeypatch):
    from llmaudit.learn.progress import DayProgress, Progress

    def progress(per_date: dict[str, int]) -> Progress:
        days = [DayProgress(day=d, title=f"day {d}", items=10, seen=d, mastered=d // 2, due=0) for d in (1, 2, 3)]
        return Progress(streak=1, reviews=sum(per_date.values()), reviews_today=1, retention=0.9, days=days,
                        per_date=per_date)

    from llmaudit.report import plots

    draws = []
    real = plots.bar_png
    monkeypatch.setattr(plots, "bar_png", lambda title, *a, **kw: draws.append(title) or real(title, *a, **kw))
    two_days = {"2026-01-01": 3, "2026-01-02": 1}
    render.render_progress(progress(two_days), tmp_path)
    assert sorted(draws) == ["Mastery per roadmap day", "Reviews per day"]
    page = (tmp_path / "progress.html").read_text()

    draws.clear()
    render.render_progress(progress(two_days), tmp_path)
    assert draws == [] and (tmp_path / "progress.html").read_text() == page

    render.render_progress(progress({**two_days, "2026-01-03": 5}), tmp_path)
    assert draws == ["Reviews per day"]
    assert len(list((tmp_path / ".cache" / "plots").glob("plot-reviews-*.png"))) == 1  # old one pruned
