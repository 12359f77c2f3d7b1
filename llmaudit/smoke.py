"""``llmaudit smoke``'s engine: run modules' toy audits one after another or in worker processes,
saving and rendering each record the moment its module finishes (an interrupted smoke keeps every
module that finished)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from llmaudit.audit import AuditSpec
from llmaudit.record import RunRecord


def _init_worker() -> None:
    """Worker processes ignore Ctrl-C: the parent catches it once and terminates them."""
    import signal

    from llmaudit.runner import configure_torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_torch()


def _run_and_save(module: str, out_dir: str) -> tuple[str, dict[str, str]]:
    """In a worker: one module's toy audit, saved and rendered; the paths written (as text)."""
    from llmaudit.report.render import save_and_render
    from llmaudit.runner import run_audit

    paths = save_and_render(run_audit(module, mode="toy"), Path(out_dir))
    return str(paths["record"]), {k: str(v) for k, v in paths.items()}


def run_modules(specs: list[AuditSpec], out_dir: Path, *, jobs: int = 1,
                progress: Callable[[str, float], None] | None = None
                ) -> Iterator[tuple[RunRecord, dict[str, Path]]]:
    """Yield ``(record, paths)`` per module as it finishes, already saved under ``out_dir/runs`` and
    rendered. ``jobs > 1`` runs modules in that many worker processes (records arrive in the order
    they finish); ``progress(module, fraction of all modules done)``."""
    if jobs <= 1 or len(specs) <= 1:
        yield from _sequential(specs, out_dir, progress)
    else:
        yield from _parallel(specs, out_dir, min(jobs, len(specs)), progress)


def _sequential(specs, out_dir, progress):
    from llmaudit.report.render import save_and_render
    from llmaudit.runner import run_audit

    n = len(specs)
    for i, spec in enumerate(specs):
        report = (lambda f, i=i, name=spec.name: progress(name, (i + f) / n)) if progress else None
        record = run_audit(spec, mode="toy", progress=report)
        yield record, save_and_render(record, out_dir)


def _parallel(specs, out_dir, jobs, progress):
    import functools
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(jobs, initializer=_init_worker)
    try:
        work = functools.partial(_run_and_save, out_dir=str(out_dir))
        for done, (record_path, paths) in enumerate(pool.imap_unordered(work, [s.name for s in specs]), 1):
            record = RunRecord.load(Path(record_path))
            if progress:
                progress(record.module, done / len(specs))
            yield record, {k: Path(v) for k, v in paths.items()}
        pool.close()
    finally:
        pool.terminate()  # no-op after close(); on Ctrl-C or an error it stops the workers at once
        pool.join()
