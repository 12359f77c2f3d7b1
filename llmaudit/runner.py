"""Run audits: pick the config preset, apply overrides, seed everything, time, and build run records."""
from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from llmaudit.audit import (AuditResult, AuditSpec, Check, CheckSpec, Context, Step, evaluate, failed_check,
                            stable_seed)
from llmaudit.config import ConfigError, apply_overrides, config_to_dict
from llmaudit.record import RunRecord, now_utc
from llmaudit.registry import UnknownName, get_audit

DEFAULT_SEEDS = {"toy": 1, "full": 3}  # full mode: closed loops must hold on several seeds
MAX_SEED = 2**32 - 1  # numpy's legacy seed and gymnasium's reset need 0 <= seed < 2**32


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_torch() -> None:
    """Tiny models on a couple of cores: one intra-op thread is faster and keeps runs reproducible."""
    import torch

    torch.set_num_threads(1)


class StepFailed(Exception):
    """A fixture raised: every check that needs it fails with this message."""


def _call(step: Step, ctx: Context, kernels: dict[str, Callable], fixtures: dict[str, Any],
          spec: AuditSpec) -> Any:
    """Call a check, fixture or report hook with what its parameters name; fixtures are run (once)
    on first use, and each step starts from its own seed so it gives the same numbers alone."""
    args = {}
    for p in step.params:
        if p == "ctx":
            args[p] = ctx
        elif p == "cfg":
            args[p] = ctx.config
        elif p == "g":
            args[p] = ctx.generator(step.name)
        elif p in kernels:
            args[p] = kernels[p]
        else:
            args[p] = _fixture(p, ctx, kernels, fixtures, spec)
    seed_everything(stable_seed(ctx.seed, step.name))
    return step.fn(**args)


def _fixture(name: str, ctx: Context, kernels: dict[str, Callable], fixtures: dict[str, Any],
             spec: AuditSpec) -> Any:
    if name not in fixtures:
        try:
            fixtures[name] = _call(spec.fixtures[name], ctx, kernels, fixtures, spec)
        except StepFailed as exc:
            fixtures[name] = exc
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded on every check that needs it
            fixtures[name] = StepFailed(f"fixture {name} raised {describe_exception(exc)}")
    if isinstance(fixtures[name], StepFailed):
        raise fixtures[name]
    return fixtures[name]


def _fixture_closure(spec: AuditSpec, steps: list[Step]) -> list[str]:
    seen: list[str] = []

    def visit(params: tuple[str, ...]) -> None:
        for p in params:
            if p in spec.fixtures and p not in seen:
                visit(spec.fixtures[p].params)
                seen.append(p)
    for s in steps:
        visit(s.params)
    return seen


def select_checks(spec: AuditSpec, mode: str, only: list[str] | None = None) -> list[CheckSpec]:
    """The checks to run: all of ``mode``'s, or the named ones (an unknown name is an UnknownName)."""
    available = spec.checks_for(mode)
    if only is None:
        return available
    names = {c.name for c in available}
    for name in only:
        if name not in names:
            other = [c for c in spec.checks if c.name == name]
            if other:
                raise UnknownName("check", name, sorted(names),
                                  extra=f"{name} runs only in {' and '.join(other[0].modes)} mode")
            raise UnknownName("check", name, sorted(names))
    return [c for c in available if c.name in only]


def run_steps(spec: AuditSpec, ctx: Context, kernels: dict[str, Callable] | None = None,
              only: list[str] | None = None) -> None:
    """Run the selected checks of ``spec`` (and, for the whole audit, its report hooks) into ctx.result.

    A check that raises -- or whose fixture raised -- is recorded as failed with the error; the
    other checks still run. Ctrl-C propagates.
    """
    active = {k.name: k.fn for k in spec.kernels} | dict(kernels or {})
    checks = select_checks(spec, ctx.mode, only)
    steps: list[Step] = [*checks, *(spec.reports if only is None else ())]
    costs = {f: spec.fixtures[f].cost for f in _fixture_closure(spec, steps)}
    total = sum(costs.values()) + sum(s.cost for s in steps) or 1.0
    fixtures: dict[str, Any] = {}
    ctx.result.selected = None if only is None else [c.name for c in checks]
    try:
        _run_all(steps, spec, ctx, active, fixtures, costs, total)
    except BaseException as exc:  # noqa: BLE001 - the engine itself failed, or Ctrl-C: say where it stopped
        ran = len(ctx.result.checks)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else describe_exception(exc)
        ctx.result.stopped_after = ran
        ctx.result.error = f"stopped after {ran} of {len(checks)} checks: {reason}"
        for c in checks[ran:]:  # every check is in the record: the ones never reached fail as not run
            ctx.result.checks.append(failed_check(c, ctx.config, f"not run: {ctx.result.error}"))
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(f"{spec.name} (seed {ctx.seed}) stopped after {ran} of {len(checks)} checks") from None


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during an audit; the message says how far the run got."""


def _run_all(steps: list[Step], spec: AuditSpec, ctx: Context, active: dict[str, Callable],
             fixtures: dict[str, Any], costs: dict[str, float], total: float) -> None:
    done = 0.0
    for step in steps:
        # a fixture is charged to the progress bar inside the first step that needs it
        step_cost = step.cost + sum(costs[f] for f in _fixture_closure(spec, [step]) if f not in fixtures)
        ctx._slice = (done / total, (done + step_cost) / total)
        if isinstance(step, CheckSpec):
            ctx.result.checks.append(_run_check(step, ctx, active, fixtures, spec))
            if step.timed:
                ctx.result.timed.append(step.name)
        else:
            try:
                _call(step, ctx, active, fixtures, spec)
            except StepFailed:
                pass  # its fixture's failure is already on the checks that need it
            except Exception as exc:  # noqa: BLE001 - a broken report hook fails the run, visibly
                ctx.result.error = f"report {step.name} raised {describe_exception(exc)}"
        done += step_cost
        if ctx._progress is not None:
            ctx._progress(done / total)


def _run_check(c: CheckSpec, ctx: Context, kernels: dict[str, Callable], fixtures: dict[str, Any],
               spec: AuditSpec) -> Check:
    try:
        return evaluate(c, _call(c, ctx, kernels, fixtures, spec), ctx.config)
    except StepFailed as exc:
        return failed_check(c, ctx.config, str(exc))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a raising check is a failing check
        return failed_check(c, ctx.config, describe_exception(exc))


def run_seed(spec: AuditSpec, *, seed: int, mode: str, config: Any,
             kernels: dict[str, Callable] | None = None,
             progress: Callable[[float], None] | None = None,
             only: list[str] | None = None) -> tuple[AuditResult, float]:
    """Run ``spec`` once (all checks, or the ``only`` ones). Nothing a check raises escapes: it is
    recorded on that check, so a crash is a failure in the report, not a missing row; Ctrl-C still
    propagates."""
    seed_everything(seed)
    ctx = Context(spec.name, seed=seed, mode=mode, config=config, progress=progress)
    start, cpu = time.perf_counter(), cpu_seconds()
    run_steps(spec, ctx, kernels, only)
    ctx.result.cpu_s = cpu_seconds() - cpu  # type: ignore[attr-defined]  # steadier than wall time
    return ctx.result, time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process plus that of its finished children: the ranks a distributed audit
    forks (megatron) count towards its cost."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def describe_exception(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def check_seeds(seed: int, n: int) -> list[int]:
    """``[seed, seed + n)``, or a ConfigError (a usage error) when a seed falls outside 0..MAX_SEED."""
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    if seed + n - 1 > MAX_SEED:
        raise ConfigError(f"--seed {seed} with --seeds {n}: seeds {seed}..{seed + n - 1} run past {MAX_SEED}, "
                          "the largest seed numpy and gymnasium accept")
    return list(range(seed, seed + n))


def resolve_seeds(mode: str, seed: int = 0, n_seeds: int | None = None) -> list[int]:
    return check_seeds(seed, DEFAULT_SEEDS[mode] if n_seeds is None else n_seeds)


def run_audit(module: str | AuditSpec, *, mode: str = "toy", seeds: list[int] | None = None,
              overrides: dict[str, str] | None = None, kernels: dict[str, Callable] | None = None,
              kernel_sources: dict[str, str] | None = None,
              progress: Callable[[float], None] | None = None, only: list[str] | None = None,
              jobs: int = 1) -> RunRecord:
    """Run one module's audit over ``seeds`` and return its run record (not yet saved).

    ``overrides`` are raw ``--set`` strings, validated against the config (ConfigError on a bad one).
    ``kernels`` replaces reference kernels by name (``kernel_sources`` says where they came from).
    ``progress`` receives the overall fraction done, 0..1. ``only`` runs just the named checks (and
    the fixtures they need). ``jobs > 1`` runs the seeds in that many worker processes (each seed is
    seeded on its own, so its result is the one a single process gives); user kernels always run
    here, one seed after another.
    """
    spec = module if isinstance(module, AuditSpec) else get_audit(module)
    if only is not None:
        select_checks(spec, mode, only)  # unknown names fail before any work
    seeds = seeds if seeds is not None else resolve_seeds(mode)
    for seed in seeds:
        check_seeds(seed, 1)
    config = apply_overrides(spec.make_config(mode), overrides or {})
    configure_torch()
    created = now_utc()
    jobs = min(jobs, len(seeds))
    if jobs > 1 and not kernels and _registered(spec):
        runs = _seeds_in_workers(spec.name, mode, seeds, overrides or {}, only, jobs, progress)
    else:
        runs = []
        for i, seed in enumerate(seeds):
            def seed_progress(frac: float, i: int = i) -> None:
                if progress is not None:
                    progress((i + frac) / len(seeds))

            runs.append(run_seed(spec, seed=seed, mode=mode, config=config, kernels=kernels,
                                 progress=seed_progress, only=only))
            seed_progress(1.0)
    results, per_seed = [r for r, _ in runs], [round(elapsed, 3) for _, elapsed in runs]
    sources = {k.name: "reference" for k in spec.kernels}
    sources.update(kernel_sources or {name: "user" for name in (kernels or {})})
    return RunRecord(module=spec.name, title=spec.title, day=spec.day, mode=mode, seeds=list(seeds),
                     config=config_to_dict(config), overrides=dict(overrides or {}), kernels=sources,
                     results=results, formulas=list(spec.formulas),
                     timing={"created": created, "elapsed_s": round(sum(per_seed), 3),
                             "per_seed_s": per_seed,
                             "per_seed_cpu_s": [round(r.cpu_s, 3) for r in results]})


def _registered(spec: AuditSpec) -> bool:
    """Whether a worker process can look ``spec`` up by name and get the same audit."""
    try:
        return get_audit(spec.name) is spec
    except UnknownName:
        return False


# ---- seeds in worker processes ---------------------------------------------------------------------

_PROGRESS_QUEUE: Any = None  # in a worker: where it reports (seed index, fraction done)


def init_worker() -> None:
    """A worker process ignores Ctrl-C (the parent catches it once and stops the workers) and runs
    torch as the parent does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_torch()


def _init_seed_worker(queue: Any) -> None:
    """init_worker, and where this worker reports its progress."""
    global _PROGRESS_QUEUE
    init_worker()
    _PROGRESS_QUEUE = queue


def _seed_in_worker(module: str, mode: str, seed: int, index: int, overrides: dict[str, str],
                    only: list[str] | None) -> tuple[dict[str, Any], float, float]:
    spec = get_audit(module)
    config = apply_overrides(spec.make_config(mode), overrides)
    sent = [0.0]

    def report(frac: float) -> None:
        if frac - sent[0] >= 0.005:  # a few hundred messages per seed at most
            sent[0] = frac
            _PROGRESS_QUEUE.put((index, frac))

    result, elapsed = run_seed(spec, seed=seed, mode=mode, config=config, progress=report, only=only)
    return result.to_dict(), result.cpu_s, elapsed  # type: ignore[attr-defined]


def _seeds_in_workers(module: str, mode: str, seeds: list[int], overrides: dict[str, str],
                      only: list[str] | None, jobs: int,
                      progress: Callable[[float], None] | None) -> list[tuple[AuditResult, float]]:
    import multiprocessing as mp
    import queue as queue_module

    context = mp.get_context("spawn")
    messages = context.Queue()
    done = [0.0] * len(seeds)
    pool = context.Pool(jobs, initializer=_init_seed_worker, initargs=(messages,))
    try:
        pending = [pool.apply_async(_seed_in_worker, (module, mode, seed, i, overrides, only))
                   for i, seed in enumerate(seeds)]
        while not all(p.ready() for p in pending):
            try:
                index, frac = messages.get(timeout=0.1)
                done[index] = max(done[index], frac)
            except queue_module.Empty:
                pass
            for i, p in enumerate(pending):
                if p.ready():
                    done[i] = 1.0
            if progress is not None:
                progress(sum(done) / len(seeds))
        runs = []
        for p in pending:
            as_dict, cpu_s, elapsed = p.get()  # re-raises what a worker raised (a broken audit file, say)
            result = AuditResult.from_dict(as_dict)
            result.cpu_s = cpu_s  # type: ignore[attr-defined]
            runs.append((result, elapsed))
        pool.close()
        return runs
    finally:
        pool.terminate()  # no-op after close(); on Ctrl-C or an error it stops the workers at once
        pool.join()
