"""Run audits: pick the config preset, apply overrides, seed everything, time, and build run records."""
from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from llmaudit.audit import AuditResult, AuditSpec, Context
from llmaudit.config import apply_overrides, config_to_dict
from llmaudit.record import RunRecord, now_utc
from llmaudit.registry import get_audit

DEFAULT_SEEDS = {"toy": 1, "full": 3}  # full mode: closed loops must hold on several seeds


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


def run_seed(spec: AuditSpec, *, seed: int, mode: str, config: Any,
             kernels: dict[str, Callable] | None = None,
             progress: Callable[[float], None] | None = None) -> tuple[AuditResult, float]:
    """Run ``spec`` once. An exception is recorded on the result (never re-raised) so that a crash
    is a failure in the report, not a missing row; Ctrl-C still propagates."""
    seed_everything(seed)
    ctx = Context(spec.name, seed=seed, mode=mode, config=config, progress=progress)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        spec.fn(ctx, **(kernels or {}))
    except Exception as exc:  # noqa: BLE001 - any failure of the audited code is a result
        ctx.result.error = describe_exception(exc)
        ctx.result.exception = exc  # type: ignore[attr-defined]  # for `llmaudit check`; not saved
    ctx.result.cpu_s = time.process_time() - cpu  # type: ignore[attr-defined]  # steadier than wall time
    return ctx.result, time.perf_counter() - start


def describe_exception(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def resolve_seeds(mode: str, seed: int = 0, n_seeds: int | None = None) -> list[int]:
    n = DEFAULT_SEEDS[mode] if n_seeds is None else n_seeds
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    return list(range(seed, seed + n))


def run_audit(module: str | AuditSpec, *, mode: str = "toy", seeds: list[int] | None = None,
              overrides: dict[str, str] | None = None, kernels: dict[str, Callable] | None = None,
              kernel_sources: dict[str, str] | None = None,
              progress: Callable[[float], None] | None = None) -> RunRecord:
    """Run one module's audit over ``seeds`` and return its run record (not yet saved).

    ``overrides`` are raw ``--set`` strings, validated against the config (ConfigError on a bad one).
    ``kernels`` replaces reference kernels by name (``kernel_sources`` says where they came from).
    ``progress`` receives the overall fraction done, 0..1.
    """
    spec = module if isinstance(module, AuditSpec) else get_audit(module)
    seeds = seeds if seeds is not None else resolve_seeds(mode)
    config = apply_overrides(spec.make_config(mode), overrides or {})
    configure_torch()
    created = now_utc()
    results, per_seed = [], []
    for i, seed in enumerate(seeds):
        def seed_progress(frac: float, i: int = i) -> None:
            if progress is not None:
                progress((i + frac) / len(seeds))

        result, elapsed = run_seed(spec, seed=seed, mode=mode, config=config, kernels=kernels,
                                   progress=seed_progress)
        results.append(result)
        per_seed.append(round(elapsed, 3))
        seed_progress(1.0)
    sources = {k.name: "reference" for k in spec.kernels}
    sources.update(kernel_sources or {name: "user" for name in (kernels or {})})
    return RunRecord(module=spec.name, title=spec.title, day=spec.day, mode=mode, seeds=list(seeds),
                     config=config_to_dict(config), overrides=dict(overrides or {}), kernels=sources,
                     results=results, formulas=list(spec.formulas),
                     timing={"created": created, "elapsed_s": round(sum(per_seed), 3),
                             "per_seed_s": per_seed,
                             "per_seed_cpu_s": [round(r.cpu_s, 3) for r in results]})
