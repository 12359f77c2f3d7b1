"""list, smoke, audit, report: run audits and render what they recorded."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from llmaudit.cli.common import (DEFAULT_OUT, FAILED, INTERRUPTED, OK, JsonOpt, OutOpt, emit_json, err, errors, mark,
                                 out, progress_bar, say, writable_dir)
from llmaudit.config import apply_overrides, parse_assignments
from llmaudit.record import RunRecord, find_records, latest_records
from llmaudit.registry import all_audits, get_audit
from llmaudit.runner import check_seeds, resolve_seeds, run_audit

app = typer.Typer()


def _module_rows() -> list[tuple[str, int | None, str]]:
    from llmaudit.catalog import modules

    return [(m.name, m.day, m.title) for m in modules()]


@app.command("list")
def list_modules(out_dir: OutOpt = DEFAULT_OUT, json_mode: JsonOpt = False) -> None:
    """Every module in roadmap order: day, name, title, kernels you can hand-write, latest result.

    Example: llmaudit list
    """
    from llmaudit.catalog import modules

    with errors(json_mode):
        specs = modules()  # names, days, titles, kernels without importing torch or the audits
        latest, warnings = latest_records(out_dir / "runs")
    for w in warnings:
        err().print(f"[yellow]warning:[/] skipped {w}")
    rows = []
    for s in specs:
        rec = latest.get(s.name, (None, None))[1]
        rows.append({"name": s.name, "day": s.day, "title": s.title, "kernels": list(s.kernels),
                     "latest": None if rec is None else {"passed": rec.passed, "checks": len(rec.checks),
                                                         "checks_passed": rec.n_passed, "mode": rec.mode,
                                                         "created": rec.created}})
    if json_mode:
        emit_json("llmaudit.list/v1", {"modules": rows})
        return
    console = out()
    latest_txt = {r["name"]: "[dim]not run[/]" if not r["latest"] else
                  f"{mark(r['latest']['passed'])} {r['latest']['checks_passed']}/{r['latest']['checks']} "
                  f"{r['latest']['mode']} {r['latest']['created'][:10]}" for r in rows}
    if console.width >= 150:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("day")
        table.add_column("module", no_wrap=True)
        table.add_column("title", overflow="fold", ratio=1)
        longest = max((len(k) for r in rows for k in r["kernels"]), default=8)
        table.add_column("kernels", min_width=longest + 1, ratio=1)  # wraps between names, never inside one
        table.add_column("latest", no_wrap=True)
        for r in rows:
            table.add_row(str(r["day"] or ""), r["name"], escape(r["title"]), ", ".join(r["kernels"]),
                          latest_txt[r["name"]])
        console.print(table)
        return
    # narrower terminals: one block per module; the kernel list wraps only between names
    for r in rows:
        console.print(f"[bold]{r['day'] or '':>2}  {r['name']}[/]  {latest_txt[r['name']]}")
        body = escape(r["title"]) + (f"\n[dim]kernels:[/] {', '.join(r['kernels'])}" if r["kernels"] else "")
        console.print(Padding(body, (0, 0, 0, 4), expand=False))


def _render_all(records: list[RunRecord], out_dir: Path) -> dict[str, dict[str, Path]]:
    from llmaudit.report.render import render_index, save_and_render

    paths = {rec.module: save_and_render(rec, out_dir) for rec in records}
    render_index(out_dir, _module_rows())
    return paths


def _smoke_line(rec: RunRecord, title: str, width: int) -> str:
    raised = sum(bool(c.errors) for c in rec.checks)
    line = (f"{mark(rec.passed)} [bold]{rec.module:<{width}}[/] {rec.n_passed:>2}/{len(rec.checks):<2} checks"
            f"  {rec.elapsed_s:5.2f} s  " + (f"[red]{raised} raised[/]  " if raised else "")
            + ("[red]a report hook raised[/]" if rec.errors else f"[dim]{title}[/]"))
    for c in rec.checks:
        if not c.passed:
            line += f"\n    [red]✗ {c.name}[/]: measured {escape(c.measured_text)}, expected {escape(c.expected)}"
    for seed, e in rec.errors:
        line += f"\n    [red]error (seed {seed}):[/] {escape(e)}"
    return line


@app.command()
def smoke(
    module: Annotated[Optional[list[str]], typer.Option("--module", "-m", help="Only these modules (repeatable).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=0, help="Worker processes: 1 runs modules one after another; "
                                      "0 means one per CPU core.")] = 1,
    out_dir: OutOpt = DEFAULT_OUT,
    json_mode: JsonOpt = False,
) -> None:
    """Run every module's audit in toy mode (one seed, seconds each) and write reports/smoke/index.{md,html}.

    Each module's run record and pages are saved as soon as it finishes, so an interrupted smoke
    (Ctrl-C, exit 130) keeps the modules that finished. -j 2 runs two modules at a time in worker
    processes (both cores of a laptop; the results are the same, lines print as modules finish).
    The summary page lists the latest run of every module in the reports folder and marks the ones
    from this run, so `smoke -m gae` updates one row.

    Exits 1 if any check fails.

    Examples: llmaudit smoke  ·  llmaudit smoke -j 2  ·  llmaudit smoke -m gae -m td --json
    """
    from llmaudit.record import now_utc
    from llmaudit.smoke import run_modules

    start, started = time.perf_counter(), now_utc()
    interrupted = False
    records: list[RunRecord] = []
    paths: dict[str, dict[str, Path]] = {}
    broken: dict[str, str] = {}
    with errors(json_mode):
        writable_dir(out_dir)
        workers = jobs or os.cpu_count() or 1
        if workers > 1:  # the workers import torch and the audits; this process needs only names and titles
            from llmaudit.catalog import modules

            known = {m.name: m for m in modules()}
            for m in module or []:
                if m not in known:
                    get_audit(m)  # raises the usual "unknown module, did you mean" error
            specs = [known[m] for m in module] if module else list(known.values())
        else:
            specs = [get_audit(m) for m in module] if module else all_audits()
        titles = {s.name: s.title for s in specs}
        width = max(len(s.name) for s in specs)
        try:
            with progress_bar(json_mode) as bar:
                task = bar.add_task("smoke", total=len(specs))
                done = run_modules([s.name for s in specs] if workers > 1 else specs, out_dir, jobs=workers,
                                   progress=lambda name, f: bar.update(task, completed=f * len(specs), description=name),
                                   broken=broken.__setitem__)
                try:
                    for rec, written in done:
                        records.append(rec)
                        paths[rec.module] = written
                        if not json_mode:
                            say(bar, _smoke_line(rec, titles[rec.module], width))
                finally:
                    done.close()  # stops worker processes at once on Ctrl-C or an error
        except KeyboardInterrupt:
            interrupted = True
            # a worker may have saved a module's record just before it was stopped: keep those too
            names = {s.name for s in specs} - {r.module for r in records}
            for name, (path, rec) in latest_records(out_dir / "runs")[0].items():
                if name in names and rec.created >= started:
                    records.append(rec)
                    paths[name] = {"record": path, "html": path.with_suffix("") / "report.html"}
                    if not json_mode:
                        out().print(_smoke_line(rec, titles[name], width), soft_wrap=True)
        from llmaudit.registry import BROKEN
        from llmaudit.report.render import render_index, render_smoke

        if not module:
            broken.update(BROKEN)  # audits that failed to import here (sequential) or in a worker (above)
        for name, why in broken.items():
            if not json_mode:
                out().print(f"{mark(False)} [bold]{name}[/]  [red]audit does not import:[/] {escape(why)}", soft_wrap=True)
        order = {s.name: i for i, s in enumerate(specs)}
        records.sort(key=lambda r: order[r.module])
        render_index(out_dir, _module_rows())
        wall = time.perf_counter() - start
        smoke_md, smoke_html = render_smoke(records, out_dir, wall, planned=len(specs))
    ok = all(r.passed for r in records) and not broken and not interrupted
    if json_mode:
        emit_json("llmaudit.smoke/v1", {
            "ok": ok, "wall_s": round(wall, 3), "jobs": workers, "interrupted": interrupted,
            "report": {"markdown": str(smoke_md), "html": str(smoke_html)}, "broken": broken,
            "modules": [{"module": r.module, "passed": r.passed, "checks": len(r.checks),
                         "checks_passed": r.n_passed, "elapsed_s": r.elapsed_s, "errors": [e for _, e in r.errors],
                         "failed": [c.name for c in r.checks if not c.passed],
                         "record": str(paths[r.module]["record"]), "html": str(paths[r.module]["html"])}
                        for r in records]})
    else:
        n_pass = sum(r.passed for r in records)
        colour = "green" if ok else "red"
        stopped = f" · interrupted after {len(records)} of {len(specs)} (their records are saved)" if interrupted else ""
        out().print(f"[bold {colour}]{n_pass}/{len(records) + len(broken)} modules pass[/] in {wall:.1f} s{stopped}"
                    f" · report: {smoke_md}  ({smoke_html})", soft_wrap=True)
    if interrupted:
        raise typer.Exit(INTERRUPTED)
    raise typer.Exit(OK if ok else FAILED)


def measured_by_seed(c) -> str:
    """What a check measured, labelled by seed when seeds differ ("seed 0: 0.12 · seed 2 ✗: 11.2"),
    followed by the seeds it failed on, so a multi-seed run says which seed broke it."""
    if len(c.seeds) <= 1 or len(set(c.texts)) <= 1:
        text = c.measured_text
    else:
        text = " · ".join(f"seed {s}{' ✗' if s in c.failed_seeds else ''}: {t}" for s, t in zip(c.seeds, c.texts))
    if c.failed_seeds and len(set(c.seeds) | set(c.failed_seeds)) > 1:
        text += f" (fails on seed{'s' * (len(c.failed_seeds) > 1)} {', '.join(map(str, c.failed_seeds))})"
    return text


def print_record(rec: RunRecord, explain: bool = False) -> None:
    """The checks table and headline scalars of a run (shared by ``audit`` and ``check``)."""
    console = out()
    if console.width >= 150:
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("")
        table.add_column("check", no_wrap=True)
        table.add_column("measured", overflow="fold", max_width=44)
        table.add_column("expected", overflow="fold", max_width=30)
        table.add_column("margin", justify="right")
        table.add_column("why", overflow="fold", ratio=1)
        for c in rec.checks:
            table.add_row(mark(c.passed), c.name, escape(measured_by_seed(c)), escape(c.expected), c.margin_text,
                          f"[dim]{escape(c.why)}[/]")
        console.print(table)
    else:  # narrow terminals: one block per check instead of a table squeezed into columns
        for c in rec.checks:
            console.print(f"{mark(c.passed)} [bold]{c.name}[/]  [dim]({c.kind})[/]")
            why = "" if explain else f"\n[dim]{escape(c.why)}[/]"  # `check` explains the failures below
            measured = measured_by_seed(c) if c.errors else f"measured {measured_by_seed(c)}"
            console.print(Padding(f"{escape(measured)}  ·  expected {escape(c.expected)}"
                                  f"  ·  margin {c.margin_text}{why}", (0, 0, 0, 4), expand=False))
    scalars = rec.scalars()
    if scalars:
        from llmaudit.audit import format_measured

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for k in scalars:
            per_seed = [(r.seed, format_measured(r.scalars[k])) for r in rec.results if k in r.scalars]
            texts = {t for _, t in per_seed}
            grid.add_row(escape(k), escape(per_seed[0][1] if len(texts) == 1 and len(per_seed) == len(rec.results)
                                           else " · ".join(f"seed {s}: {t}" for s, t in per_seed)))
        console.print("[bold]headline[/]" + (f" [dim](seeds {', '.join(map(str, rec.seeds))})[/]" if len(rec.seeds) > 1 else ""))
        console.print(Padding(grid, (0, 0, 0, 2)))
    for seed, e in rec.errors:
        console.print(f"[bold red]seed {seed}:[/] {escape(e)}")
    if explain:
        for c in rec.checks:
            if not c.passed:
                seeds = f" on seed {', '.join(map(str, c.failed_seeds))}" if len(rec.seeds) > 1 else ""
                console.print(f"\n[bold red]✗ {c.name}[/]{seeds}")
                measured = "" if c.errors else "measured "
                console.print(Padding(f"{measured}[bold]{escape(c.measured_text)}[/], expected {escape(c.expected)}.\n"
                                      f"why it matters: {escape(c.why)}"
                                      + (f"\n[yellow]hint:[/] {escape(c.hint)}" if c.hint else ""),
                                      (0, 0, 0, 2), expand=False))


def record_payload(rec: RunRecord) -> dict:
    return {"ok": rec.passed, "module": rec.module, "mode": rec.mode, "seeds": rec.seeds,
            "selected": rec.results[0].selected if rec.results else None,
            "checks": [c.to_dict() for c in rec.checks], "scalars": rec.scalars(),
            "errors": [{"seed": s, "error": e} for s, e in rec.errors], "elapsed_s": rec.elapsed_s,
            "headline": rec.headline}


@app.command()
def audit(
    module: Annotated[str, typer.Argument(help="Module name, e.g. gae (see `llmaudit list`).")],
    full: Annotated[bool, typer.Option("--full/--toy", help="full: more steps, several seeds; toy: one seed, seconds.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="First seed (0 to 2**32 - 1).")] = 0,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Number of seeds (default: 3 full, 1 toy).")] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: key=value (repeatable).")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--check", "-c", help="Run only this check and what it needs (repeatable).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=0, help="Seeds run at once, each in its own process "
                                      "(0, the default: all of them, up to two per CPU; 1: one after another).")] = 0,
    out_dir: OutOpt = DEFAULT_OUT,
    json_mode: JsonOpt = False,
) -> None:
    """Run one module's audit, print its checks and headline numbers, and write report.md / report.html.

    Exits 1 if any check fails on any seed.

    Seeds run side by side, each in its own process: 3 seeds on 2 cores take about 1.5 seeds' time.

    A seed gives the same numbers alone or beside others.

    Examples: llmaudit audit gae  ·  llmaudit audit td --toy --seed 3  ·  llmaudit audit mdp --set gamma=0.9 --json
    ·  llmaudit audit ppo --check kl_estimates_match_exact_kl  ·  llmaudit audit sft -j 1
    """
    mode = "full" if full else "toy"
    with errors(json_mode):
        spec = get_audit(module)
        overrides = parse_assignments(assignments or [])
        apply_overrides(spec.make_config(mode), overrides)  # a bad value fails before any work
        seed_list = resolve_seeds(mode, seed, seeds)
        writable_dir(out_dir)
        jobs = min(jobs or 2 * (os.cpu_count() or 1), len(seed_list))
        with progress_bar(json_mode) as bar:
            name = f"{spec.name} ({mode}, {len(seed_list)} seed{'s' * (len(seed_list) > 1)})"
            # worker processes spend their first seconds importing torch: say so while the bar is at 0
            task = bar.add_task(name + (f" · starting {jobs} processes" if jobs > 1 else ""), total=1.0)
            rec = run_audit(spec, mode=mode, seeds=seed_list, overrides=overrides, only=only or None,
                            progress=lambda f: bar.update(task, completed=f, description=name if f > 0 else None),
                            jobs=jobs)
        paths = _render_all([rec], out_dir)[spec.name]
    if json_mode:
        emit_json("llmaudit.audit/v1", record_payload(rec) | {"files": {k: str(v) for k, v in paths.items()}})
    else:
        out().print(f"[bold]{spec.title}[/] · {spec.name} · {mode} · seeds {', '.join(map(str, rec.seeds))}"
                    f" · {rec.elapsed_s:.1f} s")
        print_record(rec)
        colour = "green" if rec.passed else "red"
        failing = sorted({s for c in rec.checks for s in c.failed_seeds} | {s for s, _ in rec.errors})
        seeds_txt = (f" · [red]failed on seed{'s' * (len(failing) > 1)} {', '.join(map(str, failing))}[/]"
                     if failing and len(rec.seeds) > 1 else "")
        out().print(f"[bold {colour}]{rec.headline}[/]{seeds_txt} · report: {paths['markdown']}"
                    f"  ({paths['html']})", soft_wrap=True)
    raise typer.Exit(OK if rec.passed else FAILED)


@app.command()
def report(
    out_dir: OutOpt = DEFAULT_OUT,
    force: Annotated[bool, typer.Option("--force", help="Re-render every page, even those already up to date.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    """Rebuild the run pages (report.md / report.html) and reports/index.html from the saved run records.

    Nothing is re-run. A page is rendered again only when its record or the renderer changed since
    (a stamp beside it says what it was made from); --force renders them all. Unreadable records are
    skipped with a warning.

    Example: llmaudit report --out reports
    """
    from llmaudit.record import RecordError
    from llmaudit.report.render import render_index, render_stale

    with errors(json_mode):
        writable_dir(out_dir)
        paths = find_records(out_dir / "runs")
        pages, rendered, warnings = [], [], []
        with progress_bar(json_mode) as bar:
            for path in bar.track(paths, description="rendering"):
                try:
                    page, fresh = render_stale(path, out_dir, force=force)
                except RecordError as exc:
                    warnings.append(str(exc))
                    continue
                pages.append(str(page))
                if fresh:
                    rendered.append(str(page))
        index, _ = render_index(out_dir, _module_rows())
    for w in warnings:
        err().print(f"[yellow]warning:[/] skipped {w}")
    if json_mode:
        emit_json("llmaudit.report/v1", {"ok": True, "index": str(index), "pages": pages, "rendered": rendered,
                                         "warnings": warnings})
    else:
        current = len(pages) - len(rendered)
        out().print(f"rendered {len(rendered)} run page{'s' * (len(rendered) != 1)}"
                    + (f" ({current} already up to date)" if current else "") + f" · index: {index}")
        if not paths:
            err().print("[dim]no run records yet: run `llmaudit audit <module>` or `llmaudit smoke` first[/]")


@app.command()
def sweep(
    modules: Annotated[Optional[list[str]], typer.Argument(help="Modules to sweep (default: all).")] = None,
    full: Annotated[bool, typer.Option("--full/--toy", help="toy (default) or full mode.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Number of seeds (default: 20 toy, 5 full).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="First seed (0 to 2**32 - 1).")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=0, help="Worker processes (0, the default: the CPU count).")] = 0,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: key=value (repeatable).")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Also write the sweep as JSON to this file.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the sweep as Markdown to this file.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Run audits over many seeds: per check, the pass rate, the worst margin to its bound and the
    range measured; per module, the range of every headline number.

    A benchmark, not a test: bars are set from it (outcome checks keep >= 10 % margin on the worst
    seed). Exits 1 if any check fails on any seed.

    Examples: llmaudit sweep gae --seeds 20  ·  llmaudit sweep --full --seeds 5 -j 2 --save docs/sweep/full.json
    """
    import shlex
    import sys

    from llmaudit.record import atomic_write, versions
    from llmaudit.sweep import margin_text, measured_range_text, run_sweep, summarise, sweep_document, to_markdown

    mode = "full" if full else "toy"
    with errors(json_mode):
        specs = [get_audit(m) for m in modules] if modules else all_audits()
        overrides = parse_assignments(assignments or [])
        if overrides and len(specs) != 1:
            from llmaudit.cli.common import UsageError

            raise UsageError("--set applies to one module's config: name exactly one module with it.")
        if overrides:
            from llmaudit.config import apply_overrides

            apply_overrides(specs[0].make_config(mode), overrides)  # a bad value fails before any work
        for path in (save, markdown):
            if path is not None:
                writable_dir(path.parent, "--save/--markdown")
        n = seeds if seeds is not None else {"toy": 20, "full": 5}[mode]
        seed_list = check_seeds(seed, n)
        workers = jobs or os.cpu_count() or 1
        with progress_bar(json_mode) as bar:
            task = bar.add_task(f"sweep {mode} · {len(specs)} modules × {n} seeds", total=len(specs) * n)
            outputs = run_sweep([s.name for s in specs], mode, seed_list, jobs=workers, overrides=overrides or None,
                                progress=lambda m, s: bar.update(task, advance=1, description=f"{m} seed {s}"))
        summaries = [summarise(s.name, outputs[s.name]) for s in specs]
        command = "llmaudit sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else "llmaudit sweep"
        doc = sweep_document(mode, seed_list, summaries, command.strip(), versions())
        if save:
            import json

            atomic_write(save, json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        if markdown:
            atomic_write(markdown, to_markdown(doc, heading_level=1) + "\n")
    if json_mode:
        emit_json("llmaudit.sweep/v1", {k: v for k, v in doc.items() if k != "schema"})
    else:
        console = out()
        for s in summaries:
            console.print(f"[bold]{s['module']}[/] · {len(seed_list)} seeds · {s['seconds']['cpu_mean']:.1f} s CPU "
                          f"({s['seconds']['mean']:.1f} s wall) per seed")
            rows = [(mark(c["passed"] == c["n"]), c["name"] + ("" if c["meets_goal"] else " [yellow]⚠[/]"), c["kind"],
                     f"{c['passed']}/{c['n']}" + (f" [red](fails on seed{'s' * (len(c['failed_seeds']) > 1)} "
                                                  f"{', '.join(map(str, c['failed_seeds']))})[/]"
                                                  if c["failed_seeds"] else ""),
                     margin_text(c["worst_margin"]), escape(measured_range_text(c)),
                     escape(c["expected"])) for c in s["checks"]]
            if console.width >= 150:
                table = Table(box=None, pad_edge=False, header_style="bold")
                for col in ("", "check", "kind", "pass", "worst margin", "measured (min … max)", "bound"):
                    table.add_column(col, overflow="fold", no_wrap=col == "check")
                for row in rows:
                    table.add_row(*row)
                console.print(table)
            else:
                for ok, name, kind, rate, margin, measured, expected in rows:
                    console.print(f"{ok} [bold]{name}[/] [dim]({kind})[/] {rate} · margin {margin}", soft_wrap=True)
                    console.print(Padding(f"[dim]measured {measured} · bound {expected}[/]", (0, 0, 0, 4)))
            for e in s["run_errors"] + [e for c in s["checks"] for e in c["errors"]]:
                console.print(f"  [red]error[/] {escape(e)}", soft_wrap=True)
        colour = "green" if doc["ok"] else "red"
        out().print(f"[bold {colour}]{'every check passes on every seed' if doc['ok'] else 'some checks fail on some seeds'}[/]"
                    + ("" if doc["goal_met"] else " · [yellow]⚠ marks checks below the goal (outcome margin < 10 %)[/]"))
    raise typer.Exit(OK if doc["ok"] else FAILED)
