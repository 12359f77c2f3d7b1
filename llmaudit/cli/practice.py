"""practice / check: hand-write a kernel ("手撕"), then audit your own code with the module's checks."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from llmaudit.cli.common import (FAILED, OK, JsonOpt, UsageError, emit_json, err, errors, out, progress_bar,
                                 writable_dir)
from llmaudit.cli.run import print_record, record_payload
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
    json_mode: JsonOpt = False,
) -> None:
    """Audit YOUR implementation of a kernel with the checks that call it, each failure explained.

    Only the module's checks that call your function run (with your function in place of the
    reference); the module's other checks are listed as not about your code. Every failing check is
    explained: measured vs expected, why it matters, a hint; NaN or inf outputs are called out.

    Exits 1 if the file cannot be used or any check fails.

    Example: llmaudit practice compute_gae && llmaudit check compute_gae my_compute_gae.py
    """
    from llmaudit.practice import KernelFileError, KernelSpy, load_user_function, preflight
    from llmaudit.registry import get_audit

    mode = "full" if full else "toy"
    with errors(json_mode):
        k = get_kernel(kernel)
        spec = get_audit(k.module)
        seeds = resolve_seeds(mode, seed)
        try:
            fn = load_user_function(file, k)
            preflight(fn, k, file)
        except KernelFileError as exc:
            if json_mode:
                emit_json("llmaudit.check/v1", {"ok": False, "kernel": k.name, "file": str(file), "error": str(exc)})
            err().print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(FAILED)
        mine = [c.name for c in spec.checks_of_kernel(k.name, mode)]
        other_kernels = [c.name for c in spec.checks_for(mode) if c.name not in mine and c.kernels]
        module_only = [c.name for c in spec.checks_for(mode) if not c.kernels]
        spy = KernelSpy(fn, k)
        with progress_bar(json_mode) as bar:
            task = bar.add_task(f"{len(mine)} checks of {k.module} with your {k.name}", total=1.0)
            rec = run_audit(k.module, mode=mode, seeds=seeds, kernels={k.name: spy},
                            kernel_sources={k.name: str(file)}, only=mine,
                            progress=lambda f: bar.update(task, completed=f))
    findings = spy.findings()
    if json_mode:
        emit_json("llmaudit.check/v1", record_payload(rec) | {"kernel": k.name, "file": str(file),
                                                               "other_kernels_checks_not_run": other_kernels,
                                                               "module_checks_not_run": module_only,
                                                               "calls": spy.to_dict(), "findings": findings})
    else:
        out().print(f"[bold]{k.module}[/]: the {len(mine)} checks that call [bold]{k.name}[/], with yours from "
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
            out().print(f"\n[bold red]the audit {rec.headline}[/] that call your {k.name}; see the error above.")
        elif rec.passed:
            out().print(f"[bold green]your {k.name} passes all {len(rec.checks)} checks that call it[/]")
        else:
            n_fail = len(rec.checks) - rec.n_passed
            out().print(f"\n[bold red]{n_fail} of the {len(rec.checks)} checks that call your {k.name} fail[/]"
                        f"; compare with the contract: llmaudit practice {k.name}.")
    raise typer.Exit(OK if rec.passed else FAILED)
