"""brief: interview briefs (Markdown, HTML, PDF) from the cards and the latest run records."""
from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from llmaudit.cli.common import (DEFAULT_OUT, EnvironmentProblem, JsonOpt, UsageError, emit_json, err, errors, out,
                                 progress_bar, writable_dir)
from llmaudit.cli.doctor import APT_FONT, cjk_fonts
from llmaudit.cli.learn import LangOpt, resolve_lang

app = typer.Typer()

PIP_PDF = "pip install 'llmaudit[pdf]'"
APT_PANGO = "sudo apt-get install -y libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0"


PDF_CARDS_SHARE = 0.35
PDF_STAGES = {"layout": (PDF_CARDS_SHARE, "brief: laying out the PDF pages"),
              "write": (0.65, "brief: writing the PDF (fonts, images)")}


class Format(str, Enum):
    md = "md"
    html = "html"
    pdf = "pdf"


def _require_weasyprint() -> None:
    try:
        import weasyprint  # noqa: F401
    except ImportError:
        raise EnvironmentProblem(f"PDF briefs need WeasyPrint, which is not installed: {PIP_PDF}") from None
    except OSError as exc:  # the wheel is there but Pango/HarfBuzz are not
        raise EnvironmentProblem(f"WeasyPrint cannot load its system libraries ({exc}): {APT_PANGO}") from None


def _require_cjk_font() -> None:
    if not cjk_fonts():
        raise EnvironmentProblem("this brief holds Chinese text but fontconfig knows no font that covers Chinese "
                                 f"(`fc-list :lang=zh` is empty), so the PDF would show empty boxes. "
                                 f"Install one: {APT_FONT}")


@app.command()
def brief(
    module: Annotated[Optional[str], typer.Argument(help="One module, e.g. gae (see `llmaudit list`).",
                                                    show_default=False)] = None,
    day: Annotated[Optional[int], typer.Option("--day", help="Every module of this roadmap day.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="One booklet: cover, contents, every module by day.")] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="md (GitHub), html (self-contained) or pdf.")] = Format.html,
    lang: LangOpt = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default: "
                        "<reports>/briefs/<module|dayNN|all>-<lang>.<format>).", show_default=False)] = None,
    reports: Annotated[Path, typer.Option("--reports", help="Reports folder holding runs/ (latest audit results).")]
        = DEFAULT_OUT,
    json_mode: JsonOpt = False,
) -> None:
    """A page or two per module for the night before the interview: formulas, must-explain, key points,
    Q&A, pitfalls, follow-ups, references, and the latest audit (checks table and one curve) when a run
    record exists.

    PDF needs WeasyPrint (pip install 'llmaudit\\[pdf]') and, for Chinese, a CJK font (exit 3 otherwise).

    Example: llmaudit brief --day 4 --format pdf --lang zh  ·  llmaudit brief gae -f md  ·  llmaudit brief --all -f pdf
    """
    start = time.perf_counter()
    with errors(json_mode):
        chosen = sum([module is not None, day is not None, all_])
        if chosen != 1:
            raise UsageError("name exactly one of: a MODULE, --day N or --all "
                             "(e.g. `llmaudit brief gae`, `llmaudit brief --day 4`, `llmaudit brief --all`)")
        lang = resolve_lang(lang)
        if fmt is Format.pdf:
            _require_weasyprint()

        from llmaudit.learn import brief as briefs
        from llmaudit.learn.load import ContentError, content
        from llmaudit.record import latest_records

        # Cost-weighted shares of the bar: with 17 run records, the cards (formulas, plots) take about a
        # third of a PDF booklet, WeasyPrint's layout and writing the rest; md and html are the cards alone.
        cards_share = PDF_CARDS_SHARE if fmt is Format.pdf else 1.0
        with progress_bar(json_mode) as bar:
            task = bar.add_task("brief: reading the cards and run records", total=1.0)
            try:
                c = content()
            except ContentError as exc:
                raise EnvironmentProblem(f"the shipped card content is invalid (please report this):\n{exc}") from None
            try:
                selection = briefs.select(c, module=module, day=day)
            except briefs.BriefError as exc:
                raise UsageError(str(exc)) from None
            latest, warnings = latest_records(reports / "runs")
            records = {m: rec for m, (_, rec) in latest.items()}
            ctx = briefs.build_context(c, selection, lang, records, on_card=lambda done, n, name: bar.update(
                task, completed=cards_share * done / n, description=f"brief: {name} ({done}/{n} cards)"))
            path = out_path or briefs.default_path(reports, selection, lang, fmt.value)
            writable_dir(path.parent, "--out" if out_path else "--reports")
            if fmt is Format.pdf and (lang == "zh" or briefs.has_cjk(briefs.render_html(ctx))):
                _require_cjk_font()
            written = briefs.write(ctx, fmt.value, path, on_stage=lambda stage: bar.update(
                task, completed=PDF_STAGES[stage][0], description=PDF_STAGES[stage][1]))
    elapsed = time.perf_counter() - start
    for w in warnings:
        err().print(f"[yellow]warning:[/] skipped {escape(w)}", soft_wrap=True)
    if written.missing_glyphs:
        err().print(f"[yellow]warning:[/] {len(written.missing_glyphs)} characters have no glyph in the installed "
                    f"fonts, e.g. {escape(written.missing_glyphs[0])}; install: {APT_FONT}", soft_wrap=True)
    modules = [card["module"] for card in ctx["cards"]]
    audited = {card["module"]: None if card["audit"] is None else
               {"passed": card["audit"]["passed"], "checks": card["audit"]["n"],
                "checks_passed": card["audit"]["n_passed"], "mode": card["audit"]["mode"]}
               for card in ctx["cards"]}
    if json_mode:
        emit_json("llmaudit.brief/v1", {
            "ok": True, "path": str(written.path), "format": fmt.value, "lang": lang, "target": selection.key,
            "modules": modules, "audits": audited, "pages": written.pages, "bytes": written.size,
            "assets": [str(a) for a in written.assets], "missing_glyphs": len(written.missing_glyphs),
            "elapsed_s": round(elapsed, 3)})
        return
    pages = f" · {written.pages} page{'s' * (written.pages != 1)}" if written.pages is not None else ""
    n_audit = sum(a is not None for a in audited.values())
    out().print(f"brief: {escape(str(written.path))}{pages} · {written.size / 1024:.0f} KB · {len(modules)} "
                f"module{'s' * (len(modules) != 1)} ({n_audit} with an audit result) · {elapsed:.1f} s", soft_wrap=True)
    never_run = [card["module"] for card in ctx["cards"] if card["audit"] is None and card["status"] == "built"]
    if never_run:
        err().print(f"[dim]no run record under {reports / 'runs'} for {', '.join(never_run)}: "
                    f"`llmaudit audit {never_run[0]}` adds its checks table[/]", soft_wrap=True)
