"""Run records: one JSON document per ``audit`` invocation (one module, one mode, one or more seeds).

Reports, the index page and briefs are rendered from run records only, so they can be rebuilt
without re-running anything. Everything that varies between two runs of the same seed and mode
lives under ``timing``, or is a value an audit marked as a clock measurement (listed in each
result's ``timed``); the rest of a record is a deterministic function of (module, mode, seeds,
config, kernels).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmaudit import __version__
from llmaudit.audit import AuditResult, Measured, format_margin, format_measured

SCHEMA = "llmaudit.run/v2"
READABLE = ("llmaudit.run/v1", SCHEMA)  # v1 records (checks measured in words) still load


class RecordError(ValueError):
    """A run record that cannot be read (missing, not JSON, or another schema)."""


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass
class CheckSummary:
    """One check across the seeds of a run: it passes only if it passed on every seed."""

    name: str
    kind: str
    expected: str
    why: str
    hint: str
    passed: bool
    measured: list[Measured]  # per seed
    seeds: list[int]
    failed_seeds: list[int]
    texts: list[str] = field(default_factory=list)  # what each seed measured, in words
    margins: list[float | None] = field(default_factory=list)
    kernels: tuple[str, ...] = ()
    errors: list[str] = field(default_factory=list)  # "seed 1: ValueError: ..."

    @property
    def measured_text(self) -> str:
        if len(set(self.texts)) == 1:
            return self.texts[0]
        return " / ".join(self.texts)

    @property
    def margin(self) -> float | None:
        """The worst margin over the seeds (None when the bound has no scale, e.g. ==)."""
        known = [m for m in self.margins if m is not None]
        return min(known) if known else None

    @property
    def margin_text(self) -> str:
        return format_margin(self.margin)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "passed": self.passed,
                "measured": [_jsonable(m) for m in self.measured], "texts": self.texts,
                "expected": self.expected, "margin": _jsonable(self.margin), "why": self.why,
                "hint": self.hint, "kernels": list(self.kernels), "seeds": self.seeds,
                "failed_seeds": self.failed_seeds, "errors": self.errors}


def _jsonable(m: Any) -> Any:
    """A measurement for JSON (which has no NaN or inf): non-finite floats as their text."""
    if isinstance(m, dict):
        return {k: _jsonable(v) for k, v in m.items()}
    if isinstance(m, float) and not math.isfinite(m):
        return format_measured(m)
    return m


def versions() -> dict[str, str]:
    out = {"llmaudit": __version__, "python": platform.python_version(), "platform": sys.platform}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
    return out


@dataclass
class RunRecord:
    module: str
    title: str
    day: int | None
    mode: str
    seeds: list[int]
    config: dict[str, Any]
    overrides: dict[str, str]
    kernels: dict[str, str]  # kernel name -> "reference" or the path of the user's file
    results: list[AuditResult]
    formulas: list[tuple[str, str]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=versions)
    timing: dict[str, Any] = field(default_factory=dict)  # created (UTC ISO), elapsed_s, per_seed_s, per_seed_cpu_s

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def errors(self) -> list[tuple[int, str]]:
        return [(r.seed, r.error) for r in self.results if r.error]

    @property
    def checks(self) -> list[CheckSummary]:
        """Checks merged across seeds, in the order the audit first recorded them."""
        order: list[str] = []
        by_name: dict[str, list[tuple[int, Any]]] = {}
        for r in self.results:
            for c in r.checks:
                if c.name not in by_name:
                    order.append(c.name)
                    by_name[c.name] = []
                by_name[c.name].append((r.seed, c))
        out = []
        for name in order:
            pairs = by_name[name]
            first = pairs[0][1]
            failed = [seed for seed, c in pairs if not c.passed]
            # a check that a seed never reached (the audit raised first) did not pass on that seed
            missing = [r.seed for r in self.results if all(s != r.seed for s, _ in pairs)]
            out.append(CheckSummary(name=name, kind=first.kind, expected=first.expected, why=first.why,
                                    hint=first.hint, passed=not failed and not missing,
                                    measured=[c.measured for _, c in pairs],
                                    seeds=[s for s, _ in pairs], failed_seeds=failed + missing,
                                    texts=[c.measured_text for _, c in pairs],
                                    margins=[c.margin for _, c in pairs], kernels=first.kernels,
                                    errors=[f"seed {s}: {c.error}" for s, c in pairs if c.error]))
        return out

    @property
    def n_passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def headline(self) -> str:
        """"k/n checks pass", or "stopped after k of n checks" when a seed's run stopped early (its
        unreached checks are in the record as failed, so k/n never claims a complete pass)."""
        for r in self.results:
            if r.stopped_after is not None:
                seed = f" on seed {r.seed}" if len(self.results) > 1 else ""
                return f"stopped after {r.stopped_after} of {len(r.checks)} checks{seed}"
        return f"{self.n_passed}/{len(self.checks)} checks pass"

    @property
    def created(self) -> str:
        return self.timing.get("created", "")

    @property
    def elapsed_s(self) -> float:
        return float(self.timing.get("elapsed_s", 0.0))

    @property
    def stem(self) -> str:
        stamp = self.created.replace("-", "").replace(":", "").replace("+0000", "")[:19] or "undated"
        return f"{stamp}-{self.mode}-s{self.seeds[0] if self.seeds else 0}"

    def scalars(self) -> dict[str, list[Measured]]:
        out: dict[str, list[Measured]] = {}
        for r in self.results:
            for k, v in r.scalars.items():
                out.setdefault(k, []).append(v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "module": self.module, "title": self.title, "day": self.day,
                "mode": self.mode, "seeds": self.seeds, "passed": self.passed,
                "summary": {"checks": len(self.checks), "passed": self.n_passed},
                "checks": [c.to_dict() for c in self.checks], "config": self.config,
                "overrides": self.overrides, "kernels": self.kernels,
                "formulas": [list(f) for f in self.formulas], "results": [r.to_dict() for r in self.results],
                "versions": self.versions, "timing": self.timing}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        if d.get("schema") not in READABLE:
            raise RecordError(f"expected schema {SCHEMA!r}, found {d.get('schema')!r}")
        return cls(module=d["module"], title=d["title"], day=d.get("day"), mode=d["mode"],
                   seeds=list(d["seeds"]), config=d["config"], overrides=d.get("overrides", {}),
                   kernels=d.get("kernels", {}), results=[AuditResult.from_dict(r) for r in d["results"]],
                   formulas=[tuple(f) for f in d.get("formulas", [])], versions=d.get("versions", {}),
                   timing=d.get("timing", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False)

    def save(self, runs_dir: Path) -> Path:
        """Write ``<runs_dir>/<module>/<stem>.json`` atomically, never overwriting an older record."""
        folder = Path(runs_dir) / self.module
        path = folder / f"{self.stem}.json"
        n = 2
        while path.exists():
            path = folder / f"{self.stem}-{n}.json"
            n += 1
        return atomic_write(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecordError(f"{path}: no such run record") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"{path}: not a valid JSON run record ({exc})") from None
        try:
            return cls.from_dict(data)
        except RecordError as exc:
            raise RecordError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"{path}: malformed run record ({type(exc).__name__}: {exc})") from None


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def find_records(runs_dir: Path) -> list[Path]:
    return sorted(Path(runs_dir).glob("*/*.json"))


def latest_records(runs_dir: Path) -> tuple[dict[str, tuple[Path, RunRecord]], list[str]]:
    """The newest readable record per module, plus one warning per unreadable record file."""
    latest: dict[str, tuple[Path, RunRecord]] = {}
    warnings = []
    for path in find_records(runs_dir):
        try:
            rec = RunRecord.load(path)
        except RecordError as exc:
            warnings.append(str(exc))
            continue
        cur = latest.get(rec.module)
        if cur is None or rec.created > cur[1].created:
            latest[rec.module] = (path, rec)
    return latest, warnings
