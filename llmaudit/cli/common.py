"""What every command shares: consoles (built per invocation), the JSON envelope, exit codes, errors.

stdout carries results (tables or exactly one JSON document with ``--json``); stderr carries progress,
hints, warnings and errors. Exit codes: 0 ok, 1 a check failed, 2 usage error, 3 environment problem,
130 interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
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
