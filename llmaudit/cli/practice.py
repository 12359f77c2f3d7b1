"""practice / check: hand-write a kernel ("手撕"), then audit your own code with the module's checks."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from llmaudit.cli.common import (FAILED, OK, EnvironmentProblem, JsonOpt, UsageError, emit_json, err, errors, out, progress_bar,
                                 writable_dir)
from llmaudit.cli.run import print_record, record_payload
from llmaudit.practice import DEFAULT_TIMEOUT_S
from llmaudit.record import atomic_write
from llmaudit.registry import all_kernels, get_kernel
from llmaudit.runner import resolve_seeds, run_audit

app = typer.Typer()


@app.command()
def practice(
    kernel: Annotated[Optional[str], typer.Argument(help="Kernel to write, e.g. compute_gae; omit to list them.")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the stub (default: my_<kernel>.py).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Write a stub for a kernel: its signature and docstring (contract, shapes), body left to you.

    Then fill it in and run `llmaudit check KERNEL FILE`. Without KERNEL, list the kernels.

    Examples: llmaudit practice  ·  llmaudit practice compute_gae  ·  llmaudit practice compute_gae -o gae.py
    """
    with errors(json_mode):
        if kernel is None:
            kernels = all_kernels()
            if json_mode:
                emit_json("llmaudit.kernels/v1", {"kernels": [{"name": k.name, "module": k.module,
                                                               "signature": k.call,
                                                               "summary": k.summary} for k in kernels.values()]})
                return
            table = Table(box=None, pad_edge=False, header_style="bold")
            for col in ("module", "kernel", "what it does"):
                table.add_column(col)
            for k in kernels.values():
                table.add_row(k.module, k.name, k.summary)
            out().print(table)
            err().print("[dim]write one with: llmaudit practice <kernel>[/]")
            return
        k = get_kernel(kernel)
        path = out_file or Path(f"my_{k.name}.py")
        if path.exists() and not force:
            raise UsageError(f"{path} already exists; pass --force to overwrite it or --out to choose another file.")
        writable_dir(path.parent)
        atomic_write(path, k.stub(filename=str(path)))
    if json_mode:
        emit_json("llmaudit.practice/v1", {"ok": True, "kernel": k.name, "module": k.module, "file": str(path)})
    else:
        out().print(f"wrote {path}: fill in `{k.name}`, then run [bold]llmaudit check {k.name} {path}[/]")


@app.command()
def check(
    kernel: Annotated[str, typer.Argument(help="Kernel name, e.g. compute_gae.")],
    file: Annotated[Path, typer.Argument(help="Your Python file defining a function with that name.")],
    full: Annotated[bool, typer.Option("--full/--toy", help="toy (default): one seed, fast; full: several seeds.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="First seed (0 to 2**32 - 1).")] = 0,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Stop your code after this many seconds.")]
        = DEFAULT_TIMEOUT_S,
    json_mode: JsonOpt = False,
) -> None:
    """Audit YOUR implementation of a kernel with the checks that call it, each failure explained.

    Only the module's checks that call your function run (with your function in place of the
    reference); the module's other checks are listed as not about your code. Every failing check is
    explained: measured vs expected, why it matters, a hint; NaN or inf outputs are called out.

    Your code runs in a separate process under a time limit (--timeout, default 120 s); a function
    that loops forever, calls sys.exit or raises KeyboardInterrupt is a failure of your file.

    Exits 1 if the file cannot be used, times out or any check fails.

    Example: llmaudit practice compute_gae && llmaudit check compute_gae my_compute_gae.py
    """
    from llmaudit.practice import check_in_child

    mode = "full" if full else "toy"
    with errors(json_mode):
        seeds = resolve_seeds(mode, seed)
        err().print(f"[dim]checking your {escape(kernel)} from {escape(str(file))} · {mode} · time limit {timeout:g} s[/]",
                    soft_wrap=True)
        with progress_bar(json_mode) as bar:
            task = bar.add_task(f"loading the audit of {kernel}", total=1.0)

            def on_event(event: tuple) -> None:
                if event[0] == "started":
                    bar.update(task, description=f"{len(event[1]['mine'])} checks of {event[1]['module']} with your {kernel}")
                elif event[0] == "progress":
                    bar.update(task, completed=event[1])
                else:
                    (bar.console if not bar.disable else err()).print(
                        f"[bold yellow]note:[/] {escape(event[1])}", soft_wrap=True)
            outcome = check_in_child(kernel, file, mode, seeds, timeout_s=timeout, on_event=on_event)
        if outcome.status == "usage":
            raise UsageError(outcome.message)
        if outcome.status == "environment":
            raise EnvironmentProblem(outcome.message)
    if outcome.status != "done":
        if json_mode:
            emit_json("llmaudit.check/v1", {"ok": False, "kernel": kernel, "file": str(file), "error": outcome.message,
                                            "status": outcome.status})
        err().print(f"[bold red]error:[/] {escape(outcome.message)}", soft_wrap=True)
        raise typer.Exit(FAILED)
    module, mine = outcome.info["module"], outcome.info["mine"]
    other_kernels, module_only = outcome.info["other_kernels"], outcome.info["module_only"]
    rec = outcome.record
    findings = outcome.findings
    if json_mode:
        emit_json("llmaudit.check/v1", record_payload(rec) | {"kernel": kernel, "file": str(file),
                                                               "other_kernels_checks_not_run": other_kernels,
                                                               "module_checks_not_run": module_only,
                                                               "calls": outcome.calls, "findings": findings})
    else:
        out().print(f"[bold]{module}[/]: the {len(mine)} checks that call [bold]{kernel}[/], with yours from "
                    f"{file} · {mode} · seeds {', '.join(map(str, rec.seeds))}")
        print_record(rec, explain=True)
        for line in findings:
            out().print(f"[bold yellow]note:[/] {escape(line)}", soft_wrap=True)
        if other_kernels:
            out().print(f"[dim]checks of the module's other kernels (not run): {', '.join(other_kernels)}[/]",
                        soft_wrap=True)
        if module_only:
            out().print(f"[dim]module checks, not about your code (not run): {', '.join(module_only)}[/]", soft_wrap=True)
        if any(r.stopped_after is not None for r in rec.results):
            out().print(f"\n[bold red]the audit {rec.headline}[/] that call your {kernel}; see the error above.")
        elif rec.passed:
            out().print(f"[bold green]your {kernel} passes all {len(rec.checks)} checks that call it[/]")
        else:
            n_fail = len(rec.checks) - rec.n_passed
            out().print(f"\n[bold red]{n_fail} of the {len(rec.checks)} checks that call your {kernel} fail[/]"
                        f"; compare with the contract: llmaudit practice {kernel}.")
    raise typer.Exit(OK if rec.passed else FAILED)
