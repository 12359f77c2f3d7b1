"""``llmaudit smoke``'s engine: run modules' toy audits one after another or in worker processes,
saving and rendering each record the moment its module finishes (an interrupted smoke keeps every
module that finished)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from llmaudit.audit import AuditSpec
from llmaudit.record import RunRecord


def _run_and_save(module: str, out_dir: str) -> tuple[str, str | dict[str, str]]:
    """In a worker: one module's toy audit, saved and rendered; ``(module, paths written)``, or
    ``(module, why)`` when its audit file does not import."""
    from llmaudit.registry import BROKEN, BrokenAudit, get_audit
    from llmaudit.report.render import save_and_render
    from llmaudit.runner import run_audit

    try:
        spec = get_audit(module)
    except BrokenAudit:
        return module, BROKEN[module]
    paths = save_and_render(run_audit(spec, mode="toy"), Path(out_dir))
    return module, {k: str(v) for k, v in paths.items()}


def run_modules(specs: list[AuditSpec] | list[str], out_dir: Path, *, jobs: int = 1,
                progress: Callable[[str, float], None] | None = None,
                broken: Callable[[str, str], None] | None = None,
                ) -> Iterator[tuple[RunRecord, dict[str, Path]]]:
    """Yield ``(record, paths)`` per module as it finishes, already saved under ``out_dir/runs`` and
    rendered. ``jobs > 1`` runs modules in that many worker processes (records arrive in the order
    they finish): then ``specs`` may be names, and the parent need not import torch or the audits
    (each worker does); ``broken(module, why)`` hears of an audit that a worker could not import.
    ``progress(module, fraction of all modules done)``."""
    if jobs <= 1 or len(specs) <= 1:
        from llmaudit.registry import get_audit

        yield from _sequential([get_audit(s) if isinstance(s, str) else s for s in specs], out_dir, progress)
    else:
        names = [s if isinstance(s, str) else s.name for s in specs]
        yield from _parallel(names, out_dir, min(jobs, len(names)), progress, broken)


def _sequential(specs, out_dir, progress):
    from llmaudit.report.render import save_and_render
    from llmaudit.runner import run_audit

    n = len(specs)
    for i, spec in enumerate(specs):
        report = (lambda f, i=i, name=spec.name: progress(name, (i + f) / n)) if progress else None
        record = run_audit(spec, mode="toy", progress=report)
        yield record, save_and_render(record, out_dir)


def _parallel(names, out_dir, jobs, progress, broken):
    import functools
    import multiprocessing as mp

    from llmaudit.runner import init_worker

    pool = mp.get_context("spawn").Pool(jobs, initializer=init_worker)
    try:
        work = functools.partial(_run_and_save, out_dir=str(out_dir))
        for done, (module, paths) in enumerate(pool.imap_unordered(work, names), 1):
            if progress:
                progress(module, done / len(names))
            if isinstance(paths, str):
                if broken:
                    broken(module, paths)
                continue
            yield RunRecord.load(Path(paths["record"])), {k: Path(v) for k, v in paths.items()}
        pool.close()
    finally:
        pool.terminate()  # no-op after close(); on Ctrl-C or an error it stops the workers at once
        pool.join()
