"""What every command shares: consoles (built per invocation), the JSON envelope, exit codes, errors.

stdout carries results (tables or exactly one JSON document with ``--json``); stderr carries progress,
hints, warnings and errors. Exit codes: 0 ok, 1 a check failed, 2 usage error, 3 environment problem,
130 interrupted.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

from llmaudit.config import ConfigError
from llmaudit.paths import write_problem
from llmaudit.record import RecordError
from llmaudit.registry import BrokenAudit, UnknownName

OK, FAILED, USAGE, ENVIRONMENT, INTERRUPTED = 0, 1, 2, 3, 130

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document to stdout.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Reports folder (run records, pages, plots).",
                                      show_default=True)]
DEFAULT_OUT = Path("reports")


def out() -> Console:
    """The stdout console, built per call so it sees the current sys.stdout (CliRunner swaps it)."""
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def err() -> Console:
    return Console(file=sys.stderr, highlight=False)


# Line breaking for mixed Chinese and English prose. rich breaks only at spaces: a run of Chinese
# between two spaces is one "word", so it is pushed whole to the next line (leaving a short line behind)
# or cut at the width. Here a line may break between any two CJK characters too, but never before a
# closing mark (，。）) or after an opening one (（「), as Chinese typesetting does.
_CLOSING = set("，。、；：！？）」』”’》】〉…,.;:!?)]}%")
_OPENING = set("（「『“‘《【〈([{")


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF or 0xFE30 <= o <= 0xFE4F
            or 0xFF00 <= o <= 0xFFEF)


def break_tokens(line: str) -> list[tuple[int, int]]:
    """(start, end) of the pieces a line may not be broken inside, each with its trailing spaces: a
    word of Latin letters, digits and symbols, or one CJK character, with the opening marks before it
    and the closing marks after it."""
    tokens, i, n = [], 0, len(line)
    while i < n:
        j = i
        while j < n - 1 and line[j] in _OPENING:
            j += 1
        if _is_cjk(line[j]) or line[j].isspace():
            j += 1
        else:
            while j < n and not line[j].isspace() and not _is_cjk(line[j]):
                j += 1
        while j < n and line[j] in _CLOSING:
            j += 1
        while j < n and line[j].isspace():
            j += 1
        tokens.append((i, j))
        i = j
    return tokens


def wrap_offsets(line: str, width: int, hang: int = 0, fold: bool = True) -> list[int]:
    """Where to break ``line`` (no newlines) so that every piece fits ``width`` cells, the pieces after
    the first being indented by ``hang`` cells: greedy, at the break_tokens boundaries, a token wider
    than a line cut at the width (``fold``) or left whole on a line of its own for the caller to crop."""
    from rich.cells import cell_len, chop_cells

    hang = hang if hang <= width // 2 else 0
    breaks, used = [], 0
    for start, end in break_tokens(line):
        token = line[start:end]
        need = cell_len(token.rstrip())
        if used > (hang if breaks else 0) and used + need > width:
            breaks.append(start)
            used = hang
        if fold and need > width - used:  # a URL or a formula longer than the line: cut it where the line ends
            while cell_len(line[start:end].rstrip()) > width - used:
                start += len(chop_cells(line[start:end], width - used)[0]) or 1
                breaks.append(start)
                used = hang
            used += cell_len(line[start:end])
        else:
            used += cell_len(token)
    return breaks


_HANGING = re.compile(r"\s*(?:[A-Z]\.|\d+[.)]|[•·*-])\s+")  # "  B. ", "  • ": continuation lines align after it


def print_wrapped(console: Console, markup: str) -> None:
    """console.print(markup) with lines broken by wrap_offsets at the console's width (styles kept);
    a list item's continuation lines are indented under its text."""
    text = Text.from_markup(markup)
    for line in text.split("\n", allow_blank=True):
        marker = _HANGING.match(line.plain)
        hang = len(marker.group(0)) if marker else 0
        offsets = wrap_offsets(line.plain, console.width, hang)
        pieces = line.divide(offsets) if line.plain else [line]
        for i, piece in enumerate(pieces):
            piece.rstrip()
            if i and hang and hang <= console.width // 2:
                piece = Text(" " * hang) + piece
            console.print(piece, soft_wrap=True)


def _break_chinese_in_rich() -> None:
    """Make rich find its line breaks with wrap_offsets: tables, prompts and panels then break Chinese
    between characters too. rich breaks at spaces only (its author in Textualize/rich#2494: "Rich isn't
    aware of the rules regarding wrapping Chinese"); rich.text looks up divide_line at each wrap, so
    replacing that one name is enough. tests/test_terminal.py checks it still takes effect."""
    import rich.text

    plain = getattr(rich.text, "divide_line", None)
    if plain is None or getattr(plain, "breaks_chinese", False):
        return

    def divide_line(text: str, width: int, fold: bool = True) -> list[int]:
        return wrap_offsets(text, width, fold=fold)

    divide_line.breaks_chinese = True  # type: ignore[attr-defined]
    rich.text.divide_line = divide_line


_break_chinese_in_rich()


def emit_json(schema: str, payload: dict[str, Any]) -> None:
    """The one JSON document of a ``--json`` invocation, tagged with a versioned schema name."""
    sys.stdout.write(json.dumps({"schema": schema, **payload}, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()


class UsageError(Exception):
    """Bad input from the user (exit 2); the message says what was wrong and what would be right."""


class EnvironmentProblem(Exception):
    """Something missing from the machine (exit 3); the message carries the fix command."""


def writable_dir(path: Path, option: str = "--out") -> Path:
    """Create ``path`` if needed and prove that a file can be written in it (create and delete one),
    before any work is done, so an unusable output folder is exit 3 up front, not a lost result."""
    path = Path(path)
    reason = write_problem(path)
    if reason is not None:
        raise EnvironmentProblem(f"cannot write to the output folder {path} ({reason}), so nothing was done. Choose a "
                                 f"folder you can write with {option} DIR, or fix its permissions.") from None
    return path


@contextlib.contextmanager
def errors(json_mode: bool = False) -> Iterator[None]:
    """Turn the engine's known exceptions into one-paragraph messages and exit codes, never tracebacks."""
    code, message = None, ""
    try:
        yield
    except KeyboardInterrupt as exc:
        code, message = INTERRUPTED, f"interrupted: {exc}" if str(exc) else "interrupted"
    except (UnknownName, ConfigError, UsageError) as exc:
        code, message = USAGE, str(exc)
    except (EnvironmentProblem, RecordError, BrokenAudit) as exc:
        code, message = ENVIRONMENT, str(exc)
    if code is not None:
        if json_mode:
            emit_json("llmaudit.error/v1", {"ok": False, "exit_code": code, "error": message})
        err().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(code)


class AmountColumn(ProgressColumn):
    """How far the task is, in the units the bar moves in: "3/17" for a count of items (modules,
    seeds), "47%" for a task measured as a fraction of its work (total 1, cost-weighted)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        if task.total <= 1:
            return Text(f"{task.percentage:3.0f}%", style="progress.percentage")
        return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")


def progress_bar(json_mode: bool) -> Progress:
    """A transient progress bar on stderr, off for --json and when stderr is not a terminal."""
    console = err()
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), AmountColumn(),
                    TimeElapsedColumn(), console=console, transient=True, redirect_stdout=False,
                    redirect_stderr=False, disable=json_mode or not console.is_terminal)


def say(bar: Progress, text: str) -> None:
    """A result line on stdout; above the live bar when both streams are the same terminal."""
    console = out()
    (bar.console if not bar.disable and console.is_terminal else console).print(text, soft_wrap=True)


def mark(passed: bool) -> str:
    return "[green]✓[/]" if passed else "[bold red]✗[/]"
