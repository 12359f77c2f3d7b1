"""The ``llmaudit`` command line: one typer app composed from one file per command group."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from llmaudit import __version__
from llmaudit.cli import brief, calc, doctor, export, learn, practice, run

HELP = """llmaudit: an interview-prep lab for LLM / RLHF engineers. Every topic is a small PyTorch module
that really learns a toy task, plus an audit of named invariants that fail when the code is wrong.

Run and audit: llmaudit list · llmaudit smoke · llmaudit audit gae · llmaudit audit gae --check linear_in_rewards · llmaudit report

Robustness: llmaudit sweep gae --seeds 20 (every check over many seeds: pass rate, worst margin, range)

Hand-write (手撕): llmaudit practice compute_gae · llmaudit check compute_gae my_compute_gae.py

Size a model: llmaudit calc params --preset llama-2-7b · llmaudit calc memory --preset llama-3-8b --dp 8 --zero 3

Study: llmaudit roadmap · llmaudit quiz --day 1 --lang zh · llmaudit review · llmaudit progress · llmaudit brief gae

Exit codes: 0 ok · 1 a check failed · 2 usage error · 3 environment problem · 130 interrupted.
"""

app = typer.Typer(name="llmaudit", help=HELP, no_args_is_help=True, rich_markup_mode="rich",
                  add_completion=False, context_settings={"help_option_names": ["-h", "--help"]},
                  pretty_exceptions_enable=False)
for group in (run, practice, learn, brief, calc, doctor):
    for command in group.app.registered_commands:
        app.registered_commands.append(command)
app.add_typer(export.app, name="export")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"llmaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback,
                                                          is_eager=True, help="Show the version.")] = None) -> None:
    pass


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
