"""Render run records to ``report.md`` (PNG plots beside it) and self-contained ``report.html``,
plus the index over the latest run of every module and the smoke summary page.

Layout under a reports folder (default ``reports/``)::

    runs/<module>/<stem>.json            the run record (written by the runner's caller)
    runs/<module>/<stem>/report.md       + plot-*.png, formula-*.svg beside it
    runs/<module>/<stem>/report.html     images inline (base64 PNG, inline SVG): no network
    runs/<module>/<stem>/.rendered       stamp: the record and renderer the pages were made from
    index.html                           latest run per module, with pass/fail badges
    smoke/index.{md,html}                the latest run of every module, marking the last smoke's
    .cache/formulas/, .cache/plots/      images by content hash, drawn once (see report/cache.py)
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import jinja2
import markupsafe

from llmaudit.audit import format_measured
from llmaudit.record import RecordError, RunRecord, atomic_write, latest_records
from llmaudit.report import cache
from llmaudit.report.formulas import formula_svg
from llmaudit.report.plots import progress_plots, run_plots, slug, table_png


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("llmaudit", "report/templates"),
                             autoescape=jinja2.select_autoescape(["html", "html.j2"]), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["mdcell"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    env.filters["fmt"] = format_measured
    env.filters["zip"] = lambda a, b: list(zip(a, b))
    env.filters["wbr"] = lambda name: markupsafe.Markup("_<wbr>".join(markupsafe.escape(p) for p in str(name).split("_")))
    return env


@dataclass
class Plot:
    title: str
    file: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def run_dir(reports: Path, record: RunRecord) -> Path:
    return Path(reports) / "runs" / record.module / record.stem


def _scalars(record: RunRecord) -> list[tuple[str, str]]:
    rows = []
    for name, values in record.scalars().items():
        texts = [format_measured(v) for v in values]
        rows.append((name, texts[0] if len(set(texts)) == 1 else " / ".join(texts)))
    return rows


def _plots(record: RunRecord) -> list[Plot]:
    """One plot per plot key, each over every seed of the run."""
    return [Plot(title, file, png) for title, file, png in run_plots(record.results)]


def _picture(name: str, table: dict[str, Any]) -> Plot | None:
    """The table drawn as a picture (a pipeline timeline, an attention map), when it asks to be."""
    if not table.get("draw"):
        return None
    return Plot(name, f"table-{slug(name)}.png", table_png(name, table))


def _context(record: RunRecord) -> dict[str, Any]:
    created = record.created[:16].replace("T", " ") + " UTC" if record.created else "undated"
    seeds = []
    per_seed = record.timing.get("per_seed_s", [])
    for i, r in enumerate(record.results):
        seeds.append({"seed": r.seed, "passed": r.passed, "error": r.error,
                      "n_passed": sum(c.passed for c in r.checks), "n": len(r.checks),
                      "seconds": per_seed[i] if i < len(per_seed) else None})
    config = [(k, format_measured(v) if isinstance(v, (int, float, bool)) else str(v), k in record.overrides)
              for k, v in record.config.items()]
    user_kernels = {k: v for k, v in record.kernels.items() if v != "reference"}
    first = record.results[0] if record.results else None
    tables = [(name, t["columns"], [[format_measured(v) for v in row] for row in t["rows"]], _picture(name, t))
              for name, t in (first.tables.items() if first else [])]
    return {"tables": tables, "tables_seed": first.seed if first else None, "r": record, "created": created, "checks": record.checks, "scalars": _scalars(record),
            "seeds": seeds, "config": config, "user_kernels": user_kernels,
            "n_checks": len(record.checks), "n_passed": record.n_passed}


def render_run(record: RunRecord, reports: Path, source: bytes | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ PNG/SVG files beside it) and ``report.html`` for one run record.

    ``source``: the bytes of the record file, stamped beside the pages so that ``render_stale``
    can tell later that they are up to date."""
    out = run_dir(reports, record)
    plots = _plots(record)
    ctx = _context(record)
    formulas = []
    for i, (label, tex) in enumerate(record.formulas, 1):
        svg = formula_svg(tex, cache=cache.cache_dir(reports, "formulas"))
        formulas.append({"label": label, "tex": tex, "svg": svg, "file": f"formula-{i}.svg"})
        atomic_write(out / f"formula-{i}.svg", svg)
    ctx |= {"plots": plots, "formulas": formulas}
    for p in plots + [t[3] for t in ctx["tables"] if t[3] is not None]:
        atomic_write(out / p.file, p.png)
    env = _env()
    md = atomic_write(out / "report.md", env.get_template("run.md.j2").render(**ctx))
    html = atomic_write(out / "report.html", env.get_template("run.html.j2").render(**ctx))
    if source is not None:
        cache.write_stamp(out, source)
    return md, html


def save_and_render(record: RunRecord, reports: Path) -> dict[str, Path]:
    """Save the run record under ``reports/runs`` and render its pages; the paths written."""
    json_path = record.save(Path(reports) / "runs")
    md, html = render_run(record, reports, source=json_path.read_bytes())
    return {"record": json_path, "markdown": md, "html": html}


def render_stale(record_path: Path, reports: Path, force: bool = False) -> tuple[Path, bool]:
    """Render the pages of the record at ``record_path`` unless they are current (rendered from these
    exact bytes by this renderer); the HTML page and whether it was rendered now.

    Raises RecordError for an unreadable record."""
    try:
        data = Path(record_path).read_bytes()
    except OSError as exc:
        raise RecordError(f"{record_path}: cannot read ({exc.strerror or exc})") from None
    guess = Path(record_path).with_suffix("")  # runs/<module>/<stem>/ unless two records share a stem
    if not force and cache.pages_current(guess, data):
        return guess / "report.html", False
    rec = RunRecord.load(record_path)
    return render_run(rec, reports, source=data)[1], True


@dataclass
class IndexRow:
    name: str
    day: int | None
    title: str
    record: RunRecord | None
    href: str | None


def render_index(reports: Path, modules: Iterable[tuple[str, int | None, str]] = ()) -> tuple[Path, list[str]]:
    """``reports/index.html`` over the latest run of every module (modules never run are listed too).

    Returns the path and one warning per unreadable record. Missing per-run pages are rendered.
    """
    reports = Path(reports)
    latest, warnings = latest_records(reports / "runs")
    known = {name: (day, title) for name, day, title in modules}
    for name, (_, rec) in latest.items():
        known.setdefault(name, (rec.day, rec.title))
    rows = []
    for name, (day, title) in sorted(known.items(), key=lambda kv: (kv[1][0] if kv[1][0] is not None else 99, kv[0])):
        rec = latest.get(name, (None, None))[1]
        href = None
        if rec is not None:
            page = run_dir(reports, rec) / "report.html"
            if not page.exists():
                render_run(rec, reports)
            href = os.path.relpath(page, reports)
        rows.append(IndexRow(name, day, title, rec, href))
    html = _env().get_template("index.html.j2").render(rows=rows, warnings=warnings,
                                                       progress=(reports / "progress.html").exists(),
                                                       n_run=sum(r.record is not None for r in rows),
                                                       n_pass=sum(bool(r.record and r.record.passed) for r in rows))
    return atomic_write(reports / "index.html", html), warnings


def _cached_png(reports: Path, name: str, data: Any, make: Callable[[], bytes]) -> bytes:
    """A progress plot kept under a hash of its data and of the plotting code: an unchanged plot is
    read back, so ``llmaudit progress`` need not import matplotlib (0.7 s) to redraw it. Only the
    newest image of each plot is kept."""
    import json

    folder = cache.cache_dir(reports, "plots")
    stem = f"plot-{name}-"
    key = stem + cache.content_hash(json.dumps(data, sort_keys=True), cache.code_digest("plots.py"))[:24]
    png = cache.cached_file(folder, key, ".png", make)
    for old in folder.glob(f"{stem}*.png"):
        if old.stem != key:
            old.unlink(missing_ok=True)
    return png


def render_progress(progress, reports: Path) -> Path:
    """``reports/progress.html``: reviews per day and mastery per roadmap day (from ``llmaudit progress``)."""
    plots = [Plot(title, file, png) for title, file, png in progress_plots(
        progress, draw=lambda name, data, make: _cached_png(reports, name, data, make))]
    html = _env().get_template("progress.html.j2").render(p=progress, plots=plots)
    return atomic_write(Path(reports) / "progress.html", html)


def render_smoke(records: list[RunRecord], reports: Path, wall_s: float, *,
                 planned: int | None = None) -> tuple[Path, Path]:
    """``reports/smoke/index.md`` and ``index.html``: the latest run of every module in the reports
    folder, the ones from this smoke (``records``) marked, so ``smoke -m gae`` updates one row of
    the page instead of replacing it. ``planned``: how many modules this smoke meant to run (more
    than ``len(records)`` when it was interrupted)."""
    out = Path(reports) / "smoke"
    latest, warnings = latest_records(Path(reports) / "runs")
    this_run = {rec.module: rec for rec in records}
    shown = {name: rec for name, (_, rec) in latest.items()} | this_run
    rows = []
    for rec in sorted(shown.values(), key=lambda r: (r.day if r.day is not None else 99, r.module)):
        page = run_dir(reports, rec) / "report"
        rows.append({"r": rec, "md": os.path.relpath(str(page) + ".md", out),
                     "html": os.path.relpath(str(page) + ".html", out), "this_run": rec.module in this_run,
                     "when": rec.created[:16].replace("T", " "),
                     "failed": [c for c in rec.checks if not c.passed], "errors": rec.errors})
    ctx = {"rows": rows, "wall_s": wall_s, "ok": all(r.passed for r in records),
           "n_pass": sum(r.passed for r in records), "n": len(records),
           "planned": len(records) if planned is None else planned,
           "n_all": len(rows), "n_all_pass": sum(row["r"].passed for row in rows), "warnings": warnings,
           "created": records[0].created[:16].replace("T", " ") + " UTC" if records else ""}
    env = _env()
    md = atomic_write(out / "index.md", env.get_template("smoke.md.j2").render(**ctx))
    html = atomic_write(out / "index.html", env.get_template("smoke.html.j2").render(**ctx))
    return md, html
