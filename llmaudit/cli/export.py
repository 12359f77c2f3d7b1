"""export anki: the cards and quizzes as an Anki package, for users who keep their reviews in Anki."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from llmaudit.cli.common import EnvironmentProblem, JsonOpt, UsageError, emit_json, err, errors, out

app = typer.Typer(help="Export the study material to other tools (Anki).", no_args_is_help=True)


def _writable_target(path: Path) -> Path:
    """Check ``-o`` before any work: an .apkg file name (exit 2) in a folder we can create and write (exit 3)."""
    if path.suffix.lower() != ".apkg":
        raise UsageError(f"-o must name an Anki package ending in .apkg, got {str(path)!r} (e.g. -o llmaudit.apkg)")
    if path.is_dir():
        raise UsageError(f"-o {str(path)!r} is a folder; give a file name inside it, e.g. -o {path / 'llmaudit.apkg'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write the Anki package to {str(folder)!r}: {exc.strerror or exc}. "
                                 "Choose a folder you can write to with -o.") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise EnvironmentProblem(f"{str(path)!r} exists and is read-only; remove it or choose another -o")
    return path


@app.command("anki")
def anki(
    output: Annotated[Path, typer.Option("--output", "-o", help="The .apkg file to write.")],
    day: Annotated[Optional[int], typer.Option("--day", help="Only this roadmap day (default: every day).")] = None,
    all_days: Annotated[bool, typer.Option("--all", help="Every day (the default when --day is not given).")] = False,
    lang: Annotated[Optional[str], typer.Option("--lang", help="zh, en or both (default: as quiz, from the locale: zh_* -> zh, else en).")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Write an Anki package (.apkg): one note per recall, choice and code item, card Q&A and formula.

    Each day goes to the deck llmaudit::dayNN; tags: the day (day07), the module (ppo), the kind.

    Formulas are MathJax. Numeric items are left out: their answers are computed live (llmaudit quiz).

    Note ids come from the items' stable ids: importing a newer export updates your notes in place.

    Needs genanki: pip install 'llmaudit\\[anki]'.

    Examples: llmaudit export anki -o llmaudit.apkg  ·  llmaudit export anki --day 7 --lang zh -o day07.apkg
    """
    from llmaudit.cli.learn import resolve_lang

    with errors(json_mode):
        if day is not None and all_days:
            raise UsageError("give either --day N or --all, not both")
        if lang not in (None, "zh", "en", "both"):
            raise UsageError(f"--lang must be zh, en or both, got {lang!r}")
        l = "both" if lang == "both" else resolve_lang(lang)
        from llmaudit.learn.load import ContentError, content

        try:
            c = content()
        except ContentError as exc:
            raise EnvironmentProblem(f"the shipped quiz content is invalid (please report this):\n{exc}") from None
        days = sorted(d.day for d in c.roadmap.days)
        if day is not None and day not in days:
            raise UsageError(f"--day must be one of {days[0]}..{days[-1]}, got {day}")
        target = _writable_target(output)

        from llmaudit.learn.anki import AnkiUnavailable, build_notes, write_package

        try:
            notes = build_notes(c, day=day, lang=l)
            title_lang = "zh" if l == "zh" else "en"
            titles = {d.day: d.title.get(title_lang) for d in c.roadmap.days}
            write_package(notes, target, day_titles=titles)
        except AnkiUnavailable as exc:
            raise EnvironmentProblem(str(exc)) from None
        except OSError as exc:
            raise EnvironmentProblem(f"could not write {str(target)!r}: {exc.strerror or exc}") from None
    kinds: dict[str, int] = {}
    for n in notes:
        kinds[n.kind] = kinds.get(n.kind, 0) + 1
    numeric = sum(1 for d in c.days.values() if day in (None, d.day) for i in d.items if i.type == "numeric")
    if json_mode:
        emit_json("llmaudit.export-anki/v1", {"ok": True, "path": str(target), "lang": l, "day": day,
                                              "notes": len(notes), "kinds": kinds, "skipped_numeric": numeric})
        return
    scope = f"day {day}" if day is not None else "every day"
    out().print(f"wrote {escape(str(target))} · {len(notes)} notes ({scope}, {l}): "
                + ", ".join(f"{v} {k}" for k, v in kinds.items()), soft_wrap=True)
    err().print(f"[dim]{numeric} numeric items left out (their answers are computed live: llmaudit quiz). "
                "In Anki: File → Import; importing a newer export updates the same notes.[/]", soft_wrap=True)
