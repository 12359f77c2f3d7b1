#!/usr/bin/env python3
"""Start-up and re-render times of the CLI as whole processes (python, imports and all), against
the goals of issue 11. A benchmark, not a test: run it on a quiet machine.

    python scripts/bench_cli.py                     # list, roadmap, quiz start, progress, report
    python scripts/bench_cli.py --repeat 7
    python scripts/bench_cli.py --root /tmp/old     # the same, with another checkout's llmaudit
    python scripts/bench_cli.py --reports reports   # `report` over a copy of these run records

Each command runs ``--repeat`` times after one warm-up run (which fills the OS file cache and the
image caches under the output folder); the median wall and CPU (user + system) seconds are shown.
"quiz start" is ``quiz --day 1`` with no input: it prints the first question and stops at EOF.
"report (re-run)" is a second ``llmaudit report`` over records whose pages are already rendered.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"list": 0.5, "roadmap": 0.5, "quiz start": 0.5, "progress": 0.5}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall and CPU seconds of one child process, and its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=env["LLMAUDIT_HOME"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def bench(cmd: list[str], env: dict[str, str], repeat: int) -> tuple[float, float, int]:
    timed(cmd, env)  # warm-up
    runs = [timed(cmd, env) for _ in range(repeat)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--root", type=Path, help="run the llmaudit package of this checkout instead")
    ap.add_argument("--reports", type=Path, default=Path("reports"), help="run records to time `report` on")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llmaudit-bench-"))
    env = dict(os.environ, LLMAUDIT_HOME=str(work / "home"), NO_COLOR="1", COLUMNS="120",
               LANG="en_US.UTF-8")
    if args.root:
        env["PYTHONPATH"] = str(args.root.resolve())
    args.reports = args.reports.resolve()
    out = work / "reports"
    out.mkdir()
    (work / "home").mkdir()  # also the working directory, so `-m llmaudit` does not pick up ./llmaudit
    llmaudit = [sys.executable, "-m", "llmaudit"]
    commands = {"list": ["list"], "roadmap": ["roadmap"], "quiz start": ["quiz", "--day", "1", "--lang", "en"],
                "progress": ["progress"]}
    print(f"{'command':<18} {'wall s':>7} {'cpu s':>7}  goal")
    try:
        for name, argv in commands.items():
            wall, cpu, rc = bench(llmaudit + argv + (["--out", str(out)] if name != "quiz start" else []), env,
                                  args.repeat)
            goal = GOALS.get(name)
            verdict = "" if goal is None else f"< {goal} s  {'met' if wall < goal else 'NOT met'} (wall)"
            print(f"{name:<18} {wall:7.2f} {cpu:7.2f}  {verdict}" + (f"  [exit {rc}]" if rc not in (0, 1) else ""))
        runs = args.reports / "runs"
        n = len(list(runs.glob("*/*.json"))) if runs.is_dir() else 0
        if n:
            shutil.copytree(runs, out / "runs", ignore=shutil.ignore_patterns("report.*", "*.png", "*.svg", ".rendered"))
            for path in sorted((out / "runs").glob("*/*")):
                if path.is_dir():
                    shutil.rmtree(path)  # only the records: the first `report` renders every page
            first = timed(llmaudit + ["report", "--out", str(out)], env)
            again = timed(llmaudit + ["report", "--out", str(out)], env)
            print(f"{'report (first)':<18} {first[0]:7.2f} {first[1]:7.2f}  {n} records, every page rendered")
            print(f"{'report (re-run)':<18} {again[0]:7.2f} {again[1]:7.2f}  {n} records, pages up to date")
        else:
            print(f"report: no run records under {runs} (run `llmaudit smoke` first, or pass --reports)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
