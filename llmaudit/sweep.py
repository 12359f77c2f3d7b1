"""The seed sweep: run audits over many seeds and summarise, per check, how robust it is.

A bar is only as good as the worst seed it has met. ``llmaudit sweep`` runs every (module, seed) pair,
in worker processes when ``jobs > 1``, and reports per check the pass rate, the worst margin to its
bound and the range of what it measured; per module the range of every headline number. Saved as
JSON, it is what ``docs/robustness.md`` and the numbers in the READMEs are generated from.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable

from llmaudit.audit import AuditResult, format_margin, format_measured

SCHEMA = "llmaudit.sweep/v1"
MARGIN_GOAL = 0.10  # outcome checks: the worst seed keeps at least 10 % of the bound's scale


def _run_one(module: str, mode: str, seed: int, overrides: dict[str, str] | None) -> dict[str, Any]:
    from llmaudit.runner import run_audit

    rec = run_audit(module, mode=mode, seeds=[seed], overrides=overrides)
    return {"result": rec.results[0].to_dict(), "seconds": rec.timing["per_seed_s"][0],
            "cpu_s": rec.timing["per_seed_cpu_s"][0]}


def _init_worker() -> None:
    from llmaudit.runner import configure_torch

    configure_torch()


def run_sweep(modules: list[str], mode: str, seeds: list[int], *, jobs: int = 1,
              overrides: dict[str, str] | None = None,
              progress: Callable[[str, int], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run every (module, seed); returns module -> per-seed outputs (in seed order)."""
    tasks = [(m, s) for m in modules for s in seeds]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if jobs <= 1:
        _init_worker()
        for m, s in tasks:
            out[(m, s)] = _run_one(m, mode, s, overrides)
            if progress:
                progress(m, s)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_run_one, m, mode, s, overrides): (m, s) for m, s in tasks}
            for fut in as_completed(futures):
                out[futures[fut]] = fut.result()
                if progress:
                    progress(*futures[fut])
    return {m: [out[(m, s)] for s in seeds] for m in modules}


@dataclass
class CheckStats:
    """One check over the seeds of a sweep."""

    name: str
    kind: str
    expected: str
    kernels: list[str]
    seeds: list[int] = field(default_factory=list)
    failed_seeds: list[int] = field(default_factory=list)
    margins: list[float | None] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)  # per seed: number, {part: number} or None
    errors: list[str] = field(default_factory=list)
    timed: bool = False

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def n_passed(self) -> int:
        return self.n - len(self.failed_seeds)

    @property
    def worst_margin(self) -> float | None:
        known = [m for m in self.margins if m is not None]
        return min(known) if known else None

    def ranges(self) -> dict[str, tuple[float, float]]:
        """part ("" for a single number) -> (min, max) over the seeds; non-finite values included."""
        parts: dict[str, list[float]] = {}
        for v in self.values:
            items = v.items() if isinstance(v, dict) else [("", v)]
            for part, x in items:
                if x is not None:
                    parts.setdefault(part, []).append(float(x))
        return {p: (_lo(xs), _hi(xs)) for p, xs in parts.items()}

    @property
    def meets_goal(self) -> bool:
        """Every seed passes; an outcome check also keeps MARGIN_GOAL of its bound's scale."""
        if self.failed_seeds or self.errors:
            return False
        if self.kind == "outcome" and not self.timed:
            m = self.worst_margin
            return m is not None and m >= MARGIN_GOAL
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "expected": self.expected, "kernels": self.kernels,
                "seeds": self.seeds, "failed_seeds": self.failed_seeds, "n": self.n, "passed": self.n_passed,
                "worst_margin": _num(self.worst_margin), "margins": [_num(m) for m in self.margins],
                "ranges": {p: [_num(lo), _num(hi)] for p, (lo, hi) in self.ranges().items()},
                "errors": self.errors, "timed": self.timed, "meets_goal": self.meets_goal}


def _lo(xs: list[float]) -> float:
    return math.nan if any(math.isnan(x) for x in xs) else min(xs)


def _hi(xs: list[float]) -> float:
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


def _num(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else format_measured(x)


def summarise(module: str, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-check statistics and per-scalar ranges of one module's sweep."""
    checks: dict[str, CheckStats] = {}
    scalars: dict[str, list[float]] = {}
    timed_scalars: set[str] = set()
    results = [AuditResult.from_dict(o["result"]) for o in outputs]
    for r in results:
        for c in r.checks:
            st = checks.setdefault(c.name, CheckStats(c.name, c.kind, c.expected, list(c.kernels),
                                                      timed=c.name in r.timed))
            st.seeds.append(r.seed)
            if not c.passed:
                st.failed_seeds.append(r.seed)
            st.margins.append(c.margin)
            st.values.append(c.measured)
            if c.error:
                st.errors.append(f"seed {r.seed}: {c.error}")
        for k, v in r.scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars.setdefault(k, []).append(float(v))
                if k in r.timed:
                    timed_scalars.add(k)
    seconds = [o["seconds"] for o in outputs]
    cpu = [o["cpu_s"] for o in outputs]
    return {"module": module, "seeds": [r.seed for r in results],
            "run_errors": [f"seed {r.seed}: {r.error}" for r in results if r.error],
            "checks": [c.to_dict() for c in checks.values()],
            "scalars": {k: {"min": min(v), "max": max(v), "n": len(v), "timed": k in timed_scalars}
                        for k, v in scalars.items()},
            "seconds": {"mean": sum(seconds) / len(seconds), "max": max(seconds),
                        "cpu_mean": sum(cpu) / len(cpu), "cpu_max": max(cpu)}}


def sweep_document(mode: str, seeds: list[int], summaries: list[dict[str, Any]], command: str,
                   versions: dict[str, str]) -> dict[str, Any]:
    checks = [c for s in summaries for c in s["checks"]]
    return {"schema": SCHEMA, "mode": mode, "seeds": seeds, "command": command, "versions": versions,
            "ok": all(c["passed"] == c["n"] for c in checks) and not any(s["run_errors"] for s in summaries),
            "goal_met": all(c["meets_goal"] for c in checks), "margin_goal": MARGIN_GOAL,
            "modules": summaries}


def range_text(lo: Any, hi: Any) -> str:
    a, b = format_measured(_float(lo)), format_measured(_float(hi))
    return a if a == b else f"{a} … {b}"


def _float(x: Any) -> float:
    if isinstance(x, str):
        return {"NaN": math.nan, "inf": math.inf, "-inf": -math.inf}[x]
    return float(x)


def margin_text(m: Any) -> str:
    return format_margin(m)


def measured_range_text(check: dict[str, Any]) -> str:
    parts = []
    for part, (lo, hi) in check["ranges"].items():
        parts.append(f"{part} {range_text(lo, hi)}".strip())
    return "; ".join(parts) or "—"


def to_markdown(doc: dict[str, Any], heading_level: int = 2) -> str:
    """The sweep as Markdown: one table per module."""
    h = "#" * heading_level
    n_checks = sum(len(s["checks"]) for s in doc["modules"])
    short = [c for s in doc["modules"] for c in s["checks"] if not c["meets_goal"]]
    lines = [f"{h} {doc['mode']} mode, seeds {doc['seeds'][0]}–{doc['seeds'][-1]}", "",
             f"`{doc['command']}` · {n_checks} checks in {len(doc['modules'])} modules · "
             + ("every check passes on every seed" if doc["ok"] else "**some checks fail on some seeds**")
             + " · " + (f"every outcome check keeps ≥ {100 * doc['margin_goal']:.0f}% margin" if doc["goal_met"]
                        else f"**{len(short)} checks miss the goal**: " + ", ".join(f"`{c['name']}`" for c in short)),
             ""]
    for s in doc["modules"]:
        sec = s["seconds"]
        lines += [f"{h}# {s['module']}", "",
                  f"{len(s['seeds'])} seeds · {sec['cpu_mean']:.1f} s CPU per seed on average (max "
                  f"{sec['cpu_max']:.1f} s; wall {sec['mean']:.1f} s)", ""]
        lines += ["| check | kind | kernels | pass | worst margin | measured (min … max) | bound |",
                  "|---|---|---|---|---|---|---|"]
        for c in s["checks"]:
            flag = "" if c["meets_goal"] else " ⚠"
            timed = " (clock)" if c["timed"] else ""
            lines.append(f"| `{c['name']}`{flag} | {c['kind']}{timed} | {', '.join(c['kernels']) or '—'} | "
                         f"{c['passed']}/{c['n']} | {margin_text(c['worst_margin'])} | "
                         f"{measured_range_text(c).replace('|', '/')} | {c['expected'].replace('|', '/')} |")
        for e in s["run_errors"] + [e for c in s["checks"] for e in c["errors"]]:
            lines.append(f"\n- error: `{e}`")
        if s["scalars"]:
            lines += ["", "<details><summary>headline numbers (min … max over seeds)</summary>", "",
                      "| scalar | range |", "|---|---|"]
            lines += [f"| {k}{' (clock)' if v.get('timed') else ''} | {range_text(v['min'], v['max'])} |"
                      for k, v in s["scalars"].items()]
            lines += ["", "</details>"]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Published numbers: README spans rewritten from saved sweeps
#
#   <!-- sweep full ppo scalar "gold reward end" -->3.43 … 5.78<!-- /sweep -->
#   <!-- sweep toy gae check variance_grows_with_lambda.ratio .1f -->7.5 … 8.7<!-- /sweep -->
#   <!-- sweep toy gae seconds cpu -->0.3<!-- /sweep -->
#
# fields (shell-style words, quote a name with spaces): mode, module, what (scalar | check | seconds),
# name (a scalar; a check with an optional .part; for seconds, wall or cpu: the mean per seed), and an
# optional format spec for both ends of the range (".3f", ".0%", "g"). No "|" in a span: GitHub splits
# table cells at every "|", even inside an HTML comment. Clock scalars (timed) are published like the
# others: say so beside them.

import re  # noqa: E402
import shlex  # noqa: E402

SPAN = re.compile(r"(<!--\s*sweep\s(?P<spec>[^>]*?)-->)(?P<body>.*?)(<!--\s*/sweep\s*-->)", re.S)


def span_fields(spec: str) -> list[str]:
    """The words of a span's spec."""
    return shlex.split(spec)


class SpanError(ValueError):
    """A README span that names a mode, module, scalar or check the saved sweep does not have."""


def _fmt(x: float, spec: str) -> str:
    return format_measured(x) if not spec else format(x, spec)


def span_text(spec: str, docs: dict[str, dict[str, Any]]) -> str:
    """What a span with ``spec`` ('full ppo scalar "gold reward end"') says, from the sweeps."""
    fields = span_fields(spec)
    if len(fields) < 3:
        raise SpanError(f"span {spec!r}: expected 'mode module scalar|check|seconds name [format]'")
    mode, module, what = fields[:3]
    if mode not in docs:
        raise SpanError(f"span {spec!r}: no saved {mode} sweep")
    mods = {m["module"]: m for m in docs[mode]["modules"]}
    if module not in mods:
        raise SpanError(f"span {spec!r}: the {mode} sweep has no module {module!r}")
    m = mods[module]
    if what == "seconds":
        clock = fields[3] if len(fields) > 3 else "wall"
        if clock not in ("wall", "cpu"):
            raise SpanError(f"span {spec!r}: seconds are 'wall' or 'cpu', not {clock!r}")
        fmt = fields[4] if len(fields) > 4 else ".1f"
        return _fmt(m["seconds"]["mean" if clock == "wall" else "cpu_mean"], fmt)
    if len(fields) < 4:
        raise SpanError(f"span {spec!r}: name the {what}")
    name, fmt = fields[3], fields[4] if len(fields) > 4 else ""
    if what == "scalar":
        if name not in m["scalars"]:
            raise SpanError(f"span {spec!r}: {module} ({mode}) has no scalar {name!r}; it has {sorted(m['scalars'])}")
        lo, hi = m["scalars"][name]["min"], m["scalars"][name]["max"]
    elif what == "check":
        check, _, part = name.partition(".")
        found = [c for c in m["checks"] if c["name"] == check]
        if not found or part not in found[0]["ranges"]:
            raise SpanError(f"span {spec!r}: {module} ({mode}) has no measured check {name!r}")
        lo, hi = found[0]["ranges"][part]
    else:
        raise SpanError(f"span {spec!r}: what must be scalar, check or seconds, not {what!r}")
    a, b = _fmt(_float(lo), fmt), _fmt(_float(hi), fmt)
    return a if a == b else f"{a} … {b}"


def sync_spans(text: str, docs: dict[str, dict[str, Any]]) -> str:
    """``text`` with every sweep span's body rewritten from ``docs`` (mode -> sweep document)."""
    return SPAN.sub(lambda m: m.group(1) + span_text(m.group("spec"), docs) + m.group(4), text)


def stale_spans(text: str, docs: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(spec, written, what the sweep says) for every span whose body is out of date."""
    out = []
    for m in SPAN.finditer(text):
        want = span_text(m.group("spec"), docs)
        if m.group("body") != want:
            out.append((m.group("spec").strip(), m.group("body"), want))
    return out
