"""quiz, review, progress, roadmap: spaced repetition over the bilingual cards of the 16-day plan."""
from __future__ import annotations

import os
import sys
from datetime import date, datetime
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from llmaudit.cli.common import (DEFAULT_OUT, INTERRUPTED, EnvironmentProblem, JsonOpt, OutOpt, UsageError, emit_json,
                                 err, errors, out, print_wrapped, writable_dir)

app = typer.Typer()

LangOpt = Annotated[Optional[str], typer.Option("--lang", help="zh or en (default: from the locale, zh_* -> zh, else en).")]


def resolve_lang(lang: str | None) -> str:
    if lang is not None:
        if lang not in ("zh", "en"):
            raise UsageError(f"--lang must be zh or en, got {lang!r}")
        return lang
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(var, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def _open(read_only: bool = False):
    """Content and progress store. ``read_only``: a command that only shows progress also opens a
    database it cannot write (read-only folder or file), and says so on stderr."""
    from llmaudit.learn.load import ContentError, content
    from llmaudit.learn.store import Store, StoreError

    try:
        c = content()
    except ContentError as exc:
        raise EnvironmentProblem(f"the shipped quiz content is invalid (please report this):\n{exc}") from None
    try:
        store = Store(read_only=read_only)
    except StoreError as exc:
        raise EnvironmentProblem(str(exc)) from None
    if store.read_only:
        err().print(f"note: {store.path} is read-only: showing your progress from it; quiz and review need to "
                    "write to it.", soft_wrap=True)
    return c, store


def _days_left(interview_date: str | None, store) -> int | None:
    """Days until the interview (caps fsrs intervals); remembered in the progress store. ``none``
    clears it; a date in the past is refused, and a saved one that has passed caps nothing (warned)."""
    today = datetime.now().astimezone().date()
    if interview_date is not None and interview_date.strip().lower() in ("none", "clear", ""):
        store.unset("interview_date")
        err().print("interview date cleared: intervals are no longer capped")
    elif interview_date is not None:
        try:
            when = date.fromisoformat(interview_date)
        except ValueError:
            raise UsageError(f"--interview-date must be YYYY-MM-DD (or none to clear it), got {interview_date!r}") from None
        if when < today:
            raise UsageError(f"--interview-date {when.isoformat()} is in the past (today is {today.isoformat()}). "
                             "Give the date of your next interview, or --interview-date none to clear it.")
        store.set("interview_date", when.isoformat())
    saved = store.get("interview_date")
    if saved is None:
        return None
    left = (date.fromisoformat(saved) - today).days
    if left < 0:
        err().print(f"[yellow]warning:[/] the saved interview date {saved} has passed (today is {today.isoformat()}), "
                    "so intervals are not capped. Set the next one with --interview-date YYYY-MM-DD, or clear it "
                    "with --interview-date none.", soft_wrap=True)
        return None
    return max(1, left)


def _run_session(queue, c, store, *, lang: str, cram: bool, days_left: int | None, seed: int | None,
                 json_mode: bool, title: str) -> None:
    from llmaudit.learn.quiz import Session

    console = out()
    if not queue:
        msg = "nothing due right now" if "review" in title else "no items to ask"
        if json_mode:
            emit_json("llmaudit.quiz/v1", {"ok": True, "answered": 0, "message": msg})
        else:
            console.print(f"[green]{msg}[/] · see [bold]llmaudit progress[/]")
        return
    # lines break at spaces and between Chinese characters, at the terminal's width (print_wrapped);
    # soft_wrap would leave the wrapping to the terminal, which cuts words in half
    show = (lambda text: print_wrapped(err(), text)) if json_mode else (lambda text: print_wrapped(console, text))

    def ask(prompt: str) -> str:
        (err() if json_mode else console).print(prompt, end="", markup=False, highlight=False)
        line = input()
        if not sys.stdin.isatty():  # piped answers: echo them so a transcript reads like a session
            (err() if json_mode else console).print(line, markup=False, highlight=False)
        return line

    if not json_mode:
        cap = f" · intervals capped at {days_left} d (interview date)" if days_left else ""
        console.print(f"[bold]{title}[/] · {len(queue)} items · {lang}{' · cram (no rescheduling)' if cram else ''}{cap}"
                      "  [dim](q to stop; every answer is saved as you go)[/]")
    session = Session(c, store, lang=lang, show=show, ask=ask, cram=cram, max_interval_days=days_left, seed=seed)
    summary = session.run(queue)
    counts = summary.counts
    if json_mode:
        emit_json("llmaudit.quiz/v1", {"ok": True, **summary.to_dict(), "db": str(store.path)})
    else:
        graded = [o for o in summary.answered if o.correct is not None]
        right = sum(o.correct for o in graded)
        console.print(f"\n[bold]session:[/] {len(summary.answered)} answered"
                      + (f" · {right}/{len(graded)} graded correct" if graded else "")
                      + " · " + " ".join(f"{k} {v}" for k, v in counts.items())
                      + (f" · {len(summary.skipped)} skipped (module not built yet)" if summary.skipped else "")
                      + ("" if summary.ended_by == "done" else f" · stopped ({summary.ended_by}), answers saved"))
    if summary.ended_by == "interrupt":
        raise typer.Exit(INTERRUPTED)


@app.command()
def quiz(
    day: Annotated[Optional[int], typer.Option("--day", min=1, max=16, help="Roadmap day: its new items plus reviews due from earlier days.")] = None,
    module: Annotated[Optional[str], typer.Option("--module", "-m", help="Only this module's items.")] = None,
    lang: LangOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many items at most.")] = 10,
    cram: Annotated[bool, typer.Option("--cram", help="Review without rescheduling (the night before).")] = False,
    interview_date: Annotated[Optional[str], typer.Option("--interview-date", help="YYYY-MM-DD: caps intervals at the days left (remembered); none clears it.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for numeric parameters and choice order.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Quiz yourself with spaced repetition: recall, choice, numeric and code items.

    recall: self-rated Again/Hard/Good/Easy with the next interval shown on each choice; choice and
    numeric: auto-graded (numeric answers computed live by the module's own code); code: hand-write a
    kernel and check it.

    Scheduling is FSRS (the `fsrs` package); progress lives in SQLite under the user data folder
    (LLMAUDIT_HOME overrides). Type q to stop; every answer is saved as you go.

    Examples: llmaudit quiz --day 1 --lang zh  ·  llmaudit quiz -m gae -n 5  ·  llmaudit quiz --day 4 --cram
    """
    with errors(json_mode):
        l = resolve_lang(lang)
        c, store = _open()
        try:
            if module is not None and module not in c.cards:
                from llmaudit.registry import UnknownName

                raise UnknownName("module", module, sorted(c.cards))
            from llmaudit.learn.quiz import select
            from llmaudit.learn.store import utc_now

            days_left = _days_left(interview_date, store)
            queue = select(c, store, utc_now(), day=day, module=module, count=count)
            title = f"day {day}" if day else f"module {module}" if module else "all days"
            _run_session(queue, c, store, lang=l, cram=cram, days_left=days_left, seed=seed, json_mode=json_mode,
                         title=f"quiz · {title}")
        finally:
            store.close()


@app.command()
def review(
    lang: LangOpt = None,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many items at most.")] = 50,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for numeric parameters and choice order.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Everything due now, across all days, earliest first.

    Example: llmaudit review --lang zh
    """
    with errors(json_mode):
        l = resolve_lang(lang)
        c, store = _open()
        try:
            from llmaudit.learn.quiz import select
            from llmaudit.learn.store import utc_now

            days_left = _days_left(None, store)
            queue = select(c, store, utc_now(), count=count, due_only=True)
            _run_session(queue, c, store, lang=l, cram=False, days_left=days_left, seed=seed, json_mode=json_mode,
                         title="review")
        finally:
            store.close()


@app.command()
def progress(lang: LangOpt = None, out_dir: OutOpt = DEFAULT_OUT, json_mode: JsonOpt = False) -> None:
    """Streak, reviews, retention and per-day mastery; also writes reports/progress.html with a plot.

    Example: llmaudit progress --json
    """
    from llmaudit.learn.progress import compute
    from llmaudit.learn.store import utc_now

    with errors(json_mode):
        l = resolve_lang(lang)
        writable_dir(out_dir)
        c, store = _open(read_only=True)
        try:
            p = compute(c, store, utc_now(), l)
        finally:
            store.close()
        from llmaudit.report.render import render_progress

        page = render_progress(p, out_dir)
    if json_mode:
        emit_json("llmaudit.progress/v1", {"ok": True, **p.to_dict(), "db": str(store.path), "page": str(page)})
        return
    console = out()
    ret = "—" if p.retention is None else f"{p.retention:.0%}"
    console.print(f"[bold]streak[/] {p.streak} d · [bold]reviews[/] {p.reviews} ({p.reviews_today} today) · "
                  f"[bold]retention[/] {ret}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("day", "title", "seen", "mastered", "due", "mastery"):
        table.add_column(col)
    for d in p.days:
        bar = "█" * round(d.mastery * 10) + "·" * (10 - round(d.mastery * 10))
        table.add_row(str(d.day), escape(d.title), f"{d.seen}/{d.items}", str(d.mastered), str(d.due),
                      f"{bar} {d.mastery:.0%}")
    console.print(table)
    console.print(f"[dim]page: {page} · database: {store.path}[/]", soft_wrap=True)


@app.command()
def roadmap(lang: LangOpt = None, out_dir: OutOpt = DEFAULT_OUT, json_mode: JsonOpt = False) -> None:
    """The 16-day plan with audit status and your mastery per day.

    Each day: its title, what you must be able to explain (必须说清楚逻辑), its modules' latest audit
    result and the share of its quiz items you have mastered.

    Example: llmaudit roadmap --lang zh
    """
    from llmaudit.learn.progress import compute
    from llmaudit.learn.store import utc_now
    from llmaudit.catalog import modules
    from llmaudit.record import latest_records

    with errors(json_mode):
        l = resolve_lang(lang)
        c, store = _open(read_only=True)
        try:
            p = {d.day: d for d in compute(c, store, utc_now(), l).days}
        finally:
            store.close()
        latest, _ = latest_records(out_dir / "runs")
        audits = {m.name for m in modules()}
    rows = []
    for d in c.roadmap.days:
        mods = []
        for m in d.modules:
            status = "planned" if m not in audits else "not run" if m not in latest else \
                ("pass" if latest[m][1].passed else "fail")
            mods.append({"module": m, "status": status})
        rows.append({"day": d.day, "title": d.title.get(l), "goal": d.goal.get(l), "must_explain": d.must_explain.get(l),
                     "bonus": d.bonus, "modules": mods, "mastery": round(p[d.day].mastery, 4)})
    if json_mode:
        emit_json("llmaudit.roadmap/v1", {"ok": True, "lang": l, "days": rows})
        return
    style = {"pass": "[green]✓[/]", "fail": "[bold red]✗[/]", "not run": "[yellow]·[/]", "planned": "[dim]○[/]"}
    table = Table(box=None, pad_edge=False, header_style="bold", show_lines=False)
    for col, kw in (("day", {}), ("title", {}), ("must explain", {"ratio": 1}), ("modules", {}), ("mastery", {})):
        table.add_column(col, **kw)
    for r in rows:
        mods = " ".join(f"{style[m['status']]} {m['module']}" for m in r["modules"])
        table.add_row(f"{r['day']}{'*' if r['bonus'] else ''}", escape(r["title"]), escape(r["must_explain"]), mods,
                      f"{r['mastery']:.0%}")
    out().print(table)
    err().print("[dim]✓ audit passes · ✗ fails · · not run yet (llmaudit audit M) · ○ planned · * bonus day[/]")
