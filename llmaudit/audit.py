"""The audit contract: how a module declares its audit and what an audit records.

An audit is a list of **checks**, each a small named function declared on an ``Audit``::

    gae = Audit("gae", day=4, title="GAE: ...", config=M.GAEConfig, kernels=KERNELS)

    @gae.fixture(cost=20)
    def sweep(cfg, g, compute_gae):                  # shared by several checks, run once per seed
        return M.run(cfg, g, gae_fn=compute_gae)

    @gae.check("< 1e-6", hint="the last step is terminal: delta = r - V there")
    def matches_verl_test_vectors(compute_gae):
        '''rewards [0, 0, 1], values [.5, .6, .7]: (gamma, lam) = (1, 1) gives [.5, .4, .3].'''
        return [max_error(compute_gae(...)[0], want) for ...]   # the engine takes the worst

The parameters of a check or fixture name what it needs: a kernel (the reference, or the user's
function under ``llmaudit check``), a fixture, ``cfg`` (the module config), ``g`` (a torch.Generator
seeded from the seed and the function's name) or ``ctx``. So the engine knows, for every check,
which kernels it exercises -- directly or through its fixtures -- and can run one check alone
(``llmaudit audit ppo --check NAME``) with only the fixtures it needs.

A check returns what it measured: a number, a tensor or a list of numbers (the engine keeps the
worst one with respect to the bound, NaN included), a dict of those for a bound with several parts,
or ``measure(value, detail=...)`` to add words. The **bound** is declared (``"< 1e-6"``, ``">=
min_accuracy"`` naming a config field, ``"in [0.45, 0.55]"``); the engine decides pass/fail,
computes the relative **margin** to the bound, and fails every non-finite measurement. The
docstring is the *why*: one sentence a candidate could say in an interview.

Fixtures and checks may also record **series** (curves keyed by the metric names of TRL / verl),
**scalars** (headline numbers) and **tables** through ``ctx``; ``@audit.report`` functions record
the rest of the report when the whole audit runs.

Kernels are the functions an interviewer asks you to write by hand, declared with ``kernel(fn,
example=...)``.
"""
from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

Scalar = float | int | str | bool
Measured = float | dict | None  # a number, {part: number}, or None when nothing was measured

MODES = ("toy", "full")
CHECK_KINDS = ("invariant", "outcome")
OPS = ("<", "<=", ">", ">=", "==", "in")
RESERVED = ("ctx", "cfg", "g")  # parameter names the engine provides besides kernels and fixtures


# ------------------------------------------------------------------------------------------------
# Numbers: NaN-aware aggregation and display


def _floats(values: Any) -> list[float]:
    """Flatten numbers, 0-d or n-d tensors/arrays and nested lists into Python floats."""
    if hasattr(values, "detach"):
        values = values.detach()
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        out: list[float] = []
        for v in values:
            out.extend(_floats(v))
        return out
    if isinstance(values, (bool, int, float)):
        return [float(values)]
    raise TypeError(f"cannot measure a {type(values).__name__}: return numbers, tensors or lists of them")


def worst(*values: Any) -> float:
    """The largest of ``values`` (numbers, tensors, lists, flattened), and NaN if any is NaN.

    Python's ``max(0.0, nan)`` is 0.0 and ``max(nan, 0.0)`` is nan: an error aggregated with the
    builtin silently forgets a NaN kernel output depending on the order. This never does.
    """
    xs = _floats(list(values))
    if not xs:
        raise ValueError("worst() of nothing")
    return math.nan if any(math.isnan(x) for x in xs) else max(xs)


def least(*values: Any) -> float:
    """The smallest of ``values`` (flattened), and NaN if any is NaN (see ``worst``)."""
    xs = _floats(list(values))
    if not xs:
        raise ValueError("least() of nothing")
    return math.nan if any(math.isnan(x) for x in xs) else min(xs)


def max_error(a: Any, b: Any) -> float:
    """max |a - b| over all elements (NaN if either holds a NaN; 0 for empty tensors); tensors of
    different shapes are an infinite error, not a broadcast."""
    import torch

    a = torch.as_tensor(a).detach().double()
    b = torch.as_tensor(b).detach().double()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


def format_measured(value: Any) -> str:
    """How a measured value is printed in tables: 4 significant digits, small and large in e-notation."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.3g}".replace("e-0", "e-").replace("e+0", "e+")
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_measured(v)}" for k, v in value.items())
    if value is None:
        return "-"
    return str(value)


def format_margin(margin: Any) -> str:
    """A margin for tables: "+25%" (a quarter of the bound's scale to spare), "-40%" (failed by 40 %),
    "+15×" for a measurement far inside its bound, "< -100%" far outside, "-" where there is no margin."""
    if margin is None:
        return "-"
    m = float(margin) if not isinstance(margin, str) else {"NaN": math.nan, "inf": math.inf, "-inf": -math.inf}[margin]
    if math.isnan(m) or m < -1:
        return "< -100%"
    if m >= 10:
        return f"+{m:.0f}×"
    return f"{100 * m:+.0f}%"


def plain(value: Any) -> Scalar:
    """A JSON-friendly scalar: one-element tensors become Python numbers, non-finite floats and
    everything else short strings."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # more than one element
            value = value.tolist()
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else format_measured(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_measured(plain(v)) for v in value)
    return str(value)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else format_measured(x)


def _from_json_float(x: Any) -> float:
    return {"NaN": math.nan, "inf": math.inf, "-inf": -math.inf}.get(x, x) if isinstance(x, str) else float(x)


# ------------------------------------------------------------------------------------------------
# Bounds


_BOUND = re.compile(r"^\s*(<=|>=|==|<|>|in)\s*(.+?)\s*$")


@dataclass(frozen=True)
class Bound:
    """``measured <op> value``. ``value`` is a number, the name of a config field (resolved per run),
    or for ``in`` a (low, high) pair of those. ``scale`` is what the margin is relative to: by
    default |value| (half the width for ``in``); give it (a number or a config field) where the bound
    is 0 or where |value| is not the natural unit (a return capped at 500: the headroom). ``scale=0``
    marks a precondition whose margin means nothing (``each_ending >= 1``): it reports none."""

    op: str
    value: Any
    scale: float | str | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"bound operator must be one of {OPS}, got {self.op!r}")
        if self.op == "in" and not (isinstance(self.value, (tuple, list)) and len(self.value) == 2):
            raise ValueError(f"an 'in' bound needs (low, high), got {self.value!r}")

    def resolve(self, config: Any) -> Bound:
        """The same bound with config field names replaced by their values."""
        def one(v: Any) -> Any:
            if isinstance(v, str):
                if config is None or not hasattr(config, v):
                    raise AttributeError(f"bound refers to config field {v!r}, which "
                                         f"{type(config).__name__} does not have")
                return float(getattr(config, v))
            return float(v)
        value = tuple(one(v) for v in self.value) if self.op == "in" else one(self.value)
        return Bound(self.op, value, None if self.scale is None else one(self.scale))

    @property
    def fields(self) -> tuple[str, ...]:
        vals = (*self.value, self.scale) if self.op == "in" else (self.value, self.scale)
        return tuple(v for v in vals if isinstance(v, str))

    def text(self, config: Any = None) -> str:
        """``< 1e-06``, ``>= 0.8 (min_accuracy)``, ``in [0.45, 0.55]``."""
        def one(v: Any) -> str:
            if isinstance(v, str):
                if config is not None and hasattr(config, v):
                    return f"{format_measured(float(getattr(config, v)))} ({v})"
                return v
            return format_measured(float(v))
        if self.op == "in":
            return f"in [{one(self.value[0])}, {one(self.value[1])}]"
        return f"{self.op} {one(self.value)}"

    def holds(self, x: float) -> bool:
        """Whether a (resolved) bound holds; never for a non-finite measurement."""
        if not math.isfinite(x):
            return False
        v = self.value
        return {"<": lambda: x < v, "<=": lambda: x <= v, ">": lambda: x > v, ">=": lambda: x >= v,
                "==": lambda: x == v, "in": lambda: v[0] <= x <= v[1]}[self.op]()

    def margin(self, x: float) -> float | None:
        """How far ``x`` is inside the (resolved) bound, relative to its scale: 0.25 = 25 % of the
        scale to spare, negative when it fails. None for ``==`` and for a zero bound without a scale."""
        if self.op == "==":
            return None
        if not math.isfinite(x):
            return -math.inf
        if self.op == "in":
            lo, hi = self.value
            scale = self.scale if self.scale is not None else (hi - lo) / 2
            slack = min(x - lo, hi - x)
        else:
            scale = self.scale if self.scale is not None else abs(self.value)
            slack = (self.value - x) if self.op in ("<", "<=") else (x - self.value)
        return slack / scale if scale > 0 else None

    def worst_of(self, xs: list[float]) -> float:
        """The element that decides the verdict: NaN if any; else the largest for < / <=, the
        smallest for > / >=, the one with the least margin for ``in``, the first unequal for ==."""
        if not xs:
            raise ValueError("nothing was measured (an empty list)")
        if any(math.isnan(x) for x in xs):
            return math.nan
        if self.op in ("<", "<="):
            return max(xs)
        if self.op in (">", ">="):
            return min(xs)
        if self.op == "in":
            lo, hi = self.value
            return min(xs, key=lambda x: min(x - lo, hi - x))
        return next((x for x in xs if x != self.value), xs[0])

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if self.op == "in" else self.value
        return {"op": self.op, "value": value, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bound:
        value = tuple(d["value"]) if d["op"] == "in" else d["value"]
        return cls(d["op"], value, d.get("scale"))


def bound(spec: str | Bound | tuple, scale: float | str | None = None) -> Bound:
    """Parse ``"< 1e-6"``, ``">= min_accuracy"``, ``"in [0.45, 0.55]"`` (or a tuple ``(op, value)``)."""
    if isinstance(spec, Bound):
        return spec if scale is None else Bound(spec.op, spec.value, scale)
    if isinstance(spec, tuple):
        return Bound(spec[0], tuple(spec[1]) if spec[0] == "in" else spec[1], scale if scale is not None
                     else (spec[2] if len(spec) > 2 else None))
    m = _BOUND.match(spec)
    if not m:
        raise ValueError(f"cannot read the bound {spec!r}: write e.g. '< 1e-6', '>= min_accuracy' or 'in [0, 1]'")
    op, rest = m.group(1), m.group(2)

    def value(text: str) -> float | str:
        text = text.strip()
        try:
            return float(text)
        except ValueError:
            if re.fullmatch(r"[A-Za-z_]\w*", text):
                return text
            raise ValueError(f"bound {spec!r}: {text!r} is neither a number nor a config field name") from None

    if op == "in":
        inner = re.fullmatch(r"\[\s*(.+?)\s*,\s*(.+?)\s*\]", rest)
        if not inner:
            raise ValueError(f"bound {spec!r}: write 'in [low, high]'")
        return Bound("in", (value(inner.group(1)), value(inner.group(2))), scale)
    return Bound(op, value(rest), scale)


@dataclass(frozen=True)
class Measurement:
    """What a check returns when it has words to add: ``measure(err, detail="12 of 40 flags wrong")``."""

    value: Any
    detail: str = ""


def measure(value: Any, detail: str = "") -> Measurement:
    return Measurement(value, detail)


# ------------------------------------------------------------------------------------------------
# What a run records


@dataclass(frozen=True)
class Check:
    """One named property, checked on one run."""

    name: str  # the property in snake_case: kv_cache_matches_full_recompute
    passed: bool
    measured: Measured  # the deciding number, or {part: number}; NaN/inf kept as such
    expected: str  # the bound in words: "< 1e-06", ">= 0.8 (min_accuracy)"
    why: str  # one sentence a candidate could say in an interview
    kind: str = "invariant"  # invariant (exact math) | outcome (the closed loop learned)
    hint: str = ""  # what usually breaks this property, shown by `llmaudit check`
    detail: str = ""  # words beside the number: "12 of 40 clip flags wrong"
    margin: float | None = None  # relative distance to the bound (negative: failed); None for == bounds
    kernels: tuple[str, ...] = ()  # the kernels this check calls, directly or through fixtures
    error: str | None = None  # the exception that stopped this check, if any
    bounds: dict[str, Bound] = field(default_factory=dict)  # resolved bound per part ("" for one)

    @property
    def measured_text(self) -> str:
        if self.error:
            return f"raised {self.error}"
        text = format_measured(self.measured)
        if self.measured is not None and not _all_finite(self.measured):
            text = f"{text} (not finite)"
        return f"{text} · {self.detail}" if self.detail else text

    def to_dict(self) -> dict[str, Any]:
        measured = ({k: _json_float(v) for k, v in self.measured.items()} if isinstance(self.measured, dict)
                    else None if self.measured is None else _json_float(self.measured))
        return {"name": self.name, "passed": self.passed, "measured": measured, "expected": self.expected,
                "why": self.why, "kind": self.kind, "hint": self.hint, "detail": self.detail,
                "margin": None if self.margin is None else _json_float(self.margin),
                "kernels": list(self.kernels), "error": self.error,
                "bounds": {k: b.to_dict() for k, b in self.bounds.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        m = d.get("measured")
        if isinstance(m, dict):
            measured: Measured = {k: _from_json_float(v) for k, v in m.items()}
        elif m is None or isinstance(m, bool):
            measured = None if m is None else float(m)
        else:
            try:
                measured = _from_json_float(m)
            except (TypeError, ValueError):  # a record of schema v1: the measurement was words
                measured, d = None, {**d, "detail": d.get("detail") or str(m)}
        margin = d.get("margin")
        return cls(name=d["name"], passed=bool(d["passed"]), measured=measured, expected=d["expected"],
                   why=d["why"], kind=d.get("kind", "invariant"), hint=d.get("hint", ""),
                   detail=d.get("detail", ""), margin=None if margin is None else _from_json_float(margin),
                   kernels=tuple(d.get("kernels", ())), error=d.get("error"),
                   bounds={k: Bound.from_dict(b) for k, b in d.get("bounds", {}).items()})


def _all_finite(measured: Measured) -> bool:
    values = measured.values() if isinstance(measured, dict) else [measured]
    return all(v is not None and math.isfinite(v) for v in values)


@dataclass
class Series:
    """A curve: y against x. Series that share a ``group`` are drawn on one set of axes."""

    name: str  # the metric name, e.g. "objective/kl"
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    x_label: str = "step"  # the x axis in words, with its unit ("PPO iteration", "sequence length N (tokens)")
    group: str = ""  # plot key; defaults to the name
    smooth: bool = True  # draw an EMA over the raw points (off for sweeps over a parameter)
    label: str = ""  # the curve in words for legends ("KL to the SFT policy"); default: the name
    y_label: str = ""  # the y axis in words with its unit ("KL (nats)"); curves of one group with
    #                    different y labels are drawn on different axes (twin axes or panels)
    title: str = ""  # the plot's title in words (for a group, the first member's that has one)
    key: bool = False  # the curve a one-page brief shows for this module
    ticks: list[str] = field(default_factory=list)  # names of the x positions 0..n-1: drawn as bars

    @property
    def plot_key(self) -> str:
        return self.group or self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "x": self.x, "y": self.y, "x_label": self.x_label,
                "group": self.group, "smooth": self.smooth, "label": self.label, "y_label": self.y_label,
                "title": self.title, "key": self.key, "ticks": self.ticks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Series:
        return cls(name=d["name"], x=list(d["x"]), y=list(d["y"]), x_label=d.get("x_label", "step"),
                   group=d.get("group", ""), smooth=bool(d.get("smooth", True)), label=d.get("label", ""),
                   y_label=d.get("y_label", ""), title=d.get("title", ""), key=bool(d.get("key", False)),
                   ticks=list(d.get("ticks", [])))


@dataclass
class AuditResult:
    """Everything one audit run (one module, one seed, one mode) recorded."""

    module: str
    seed: int
    mode: str
    checks: list[Check] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)
    error: str | None = None  # an exception outside every check (a report hook), if any
    timed: list[str] = field(default_factory=list)  # scalars/checks/series/tables whose values are clock measurements
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"columns", "rows"[, "draw"]}
    selected: list[str] | None = None  # the checks asked for, when not the whole audit
    stopped_after: int | None = None  # checks that ran before an exception outside every check stopped the run

    @property
    def passed(self) -> bool:
        """A run passes only if every check passed and nothing raised; a run with no checks fails."""
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def n_errors(self) -> int:
        return sum(c.error is not None for c in self.checks)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; recorded: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "seed": self.seed, "mode": self.mode, "passed": self.passed,
                "error": self.error, "checks": [c.to_dict() for c in self.checks],
                "scalars": dict(self.scalars), "timed": list(self.timed), "selected": self.selected,
                "stopped_after": self.stopped_after,
                "series": {k: s.to_dict() for k, s in self.series.items()},
                "tables": {k: _table_copy(t) for k, t in self.tables.items()}}

    def deterministic_dict(self) -> dict[str, Any]:
        """``to_dict()`` without clock measurements: equal for two runs of the same seed and mode."""
        d = self.to_dict()
        for part in ("scalars", "series", "tables"):
            d[part] = {k: v for k, v in d[part].items() if k not in self.timed}
        for c in d["checks"]:
            if c["name"] in self.timed:
                c["measured"] = c["margin"] = c["detail"] = "(timed)"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditResult:
        return cls(module=d["module"], seed=int(d["seed"]), mode=d["mode"],
                   checks=[Check.from_dict(c) for c in d["checks"]],
                   series={k: Series.from_dict(s) for k, s in d.get("series", {}).items()},
                   scalars=dict(d.get("scalars", {})), error=d.get("error"), timed=list(d.get("timed", [])),
                   tables={k: _table_copy(t) for k, t in d.get("tables", {}).items()},
                   selected=d.get("selected"), stopped_after=d.get("stopped_after"))


TABLE_DRAWINGS = ("", "heatmap", "gantt")  # how a table may also be drawn in the report ("" = not drawn)


def _table_copy(t: dict[str, Any]) -> dict[str, Any]:
    """A table record's own copy: columns, rows and, when it is drawn, how ("draw")."""
    out = {"columns": list(t["columns"]), "rows": [list(r) for r in t["rows"]]}
    if t.get("draw"):
        out["draw"] = t["draw"]
    return out


def stable_seed(seed: int, name: str) -> int:
    """A seed for one named random stream of one run (the same on every machine and Python)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


class Context:
    """What checks, fixtures and report hooks receive: the seed, the mode, the module config, and
    the recording methods for series, scalars and tables."""

    def __init__(self, module: str, *, seed: int = 0, mode: str = "toy", config: Any = None,
                 progress: Callable[[float], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.module = module
        self.seed = seed
        self.mode = mode
        self.config = config
        self._progress = progress
        self._slice = (0.0, 1.0)  # the part of the run's progress bar the running step owns
        self.result = AuditResult(module=module, seed=seed, mode=mode)

    @property
    def toy(self) -> bool:
        return self.mode == "toy"

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def log(self, name: str, value: Any, step: float | None = None, **series_options: Any) -> None:
        """Append one point to a series (created on first use with ``series_options``)."""
        s = self.result.series.get(name)
        if s is None:
            s = self.result.series[name] = Series(name=name, **series_options)
        s.x.append(float(len(s.y) if step is None else step))
        s.y.append(_finite_or_nan(value))

    def series(self, name: str, y: Any, x: Any = None, *, x_label: str = "step", group: str = "",
               smooth: bool = True, label: str = "", y_label: str = "", title: str = "", key: bool = False,
               ticks: list[str] | None = None, timed: bool = False) -> None:
        """Record a whole curve at once (a tensor, array or list). ``label`` names it in words,
        ``y_label`` gives its axis with the unit; ``key=True`` marks the curve a brief shows; ``ticks``
        names categories (x = 0..n-1), drawn as bars; ``timed=True`` for clock measurements."""
        ys = [_finite_or_nan(v) for v in _as_list(y)]
        xs = [float(v) for v in _as_list(x)] if x is not None else [float(i) for i in range(len(ys))]
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values for {len(ys)} y values")
        self.result.series[name] = Series(name, xs, ys, x_label, group, smooth, label, y_label, title, key,
                                          list(ticks or []))
        self._mark_timed(name, timed)

    def _mark_timed(self, name: str, timed: bool) -> None:
        if timed and name not in self.result.timed:
            self.result.timed.append(name)

    def scalar(self, name: str, value: Any, *, timed: bool = False) -> None:
        """A headline number (or short string) shown at the top of the report; ``timed=True`` for a
        clock measurement (excluded from the determinism guarantee)."""
        self.result.scalars[name] = plain(value)
        self._mark_timed(name, timed)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], *, timed: bool = False,
              draw: str = "") -> None:
        """A small table shown in the report (e.g. which models are trainable in each stage). Cells are
        numbers or short strings; every row has one cell per column; ``timed=True`` when some are clock
        measurements. ``draw`` also shows it as a picture: "heatmap" (row label, then numbers: an
        attention map) or "gantt" (row label, then one cell per time slot: "F3" / "B3" for the forward /
        backward of micro-batch 3, anything else idle)."""
        if draw not in TABLE_DRAWINGS:
            raise ValueError(f"table {name!r}: draw must be one of {sorted(TABLE_DRAWINGS)}, got {draw!r}")
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {name!r}: a row has {len(row)} cells for {len(columns)} columns")
        self.result.tables[name] = _table_copy({"columns": [str(c) for c in columns],
                                                "rows": [[plain(v) for v in row] for row in rows], "draw": draw})
        self._mark_timed(name, timed)

    def progress(self, done: float, total: float = 1.0) -> None:
        """Report progress through the running check or fixture (drives the progress bar)."""
        if self._progress is not None and total > 0:
            lo, hi = self._slice
            self._progress(lo + (hi - lo) * min(max(done / total, 0.0), 1.0))

    def generator(self, stream: int | str = 0):
        """A torch.Generator seeded from (seed, stream): independent reproducible random streams."""
        import torch

        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, str(stream)) if isinstance(stream, str)
                      else self.seed * 1_000_003 + stream)
        return g


def _as_list(values: Any) -> list:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return list(values)


def _finite_or_nan(value: Any) -> float:
    v = float(value.item() if hasattr(value, "item") else value)
    return v if math.isfinite(v) else float("nan")


# ------------------------------------------------------------------------------------------------
# Kernels


STUB_HEADER = '''"""Your implementation of `{name}` (from llmaudit module `{module}`).

Fill in the body, then run:  llmaudit check {name} {filename}
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F


'''


@dataclass(frozen=True)
class Kernel:
    """A function the user can write by hand: the reference implementation plus a tiny valid input."""

    fn: Callable
    example: Callable[[], dict[str, Any]]  # keyword arguments for one small, valid call
    hint: str = ""  # the mistake people make most often with this kernel
    module: str = ""  # the audit it belongs to; set by Audit
    finite: bool = True  # finite inputs give finite outputs (False for e.g. -inf masking filters)

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def call(self) -> str:
        """``name(a: torch.Tensor, ...) -> torch.Tensor`` without the quotes postponed annotations add."""
        return f"{self.name}{self.signature}".replace("'", "")

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    @property
    def summary(self) -> str:
        return self.doc.splitlines()[0] if self.doc else ""

    def stub(self, filename: str = "my_kernel.py") -> str:
        """The reference's signature and docstring with the body replaced by NotImplementedError."""
        source = textwrap.dedent(inspect.getsource(self.fn))
        node = ast.parse(source).body[0]
        assert isinstance(node, ast.FunctionDef), f"kernel {self.name} is not a plain function"
        lines = source.splitlines()
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str)
        end = first.end_lineno if has_doc else node.body[0].lineno - 1
        header = "\n".join(lines[node.lineno - 1:end])
        return (STUB_HEADER.format(name=self.name, module=self.module, filename=filename)
                + header + "\n    raise NotImplementedError  # your code here\n")


def kernel(fn: Callable, *, example: Callable[[], dict[str, Any]], hint: str = "", finite: bool = True) -> Kernel:
    """Declare ``fn`` (a reference implementation in ``modules/``) as a kernel."""
    return Kernel(fn=fn, example=example, hint=hint, finite=finite)


# ------------------------------------------------------------------------------------------------
# Audits: checks, fixtures and report hooks


@dataclass(frozen=True)
class Step:
    """A check, fixture or report hook: a function whose parameters name what it needs."""

    name: str
    fn: Callable
    params: tuple[str, ...]
    cost: float = 1.0  # relative run time, for the progress bar
    modes: tuple[str, ...] = MODES


@dataclass(frozen=True)
class CheckSpec(Step):
    bound: Bound | dict[str, Bound] = None  # type: ignore[assignment]
    kind: str = "invariant"
    why: str = ""
    hint: str = ""
    timed: bool = False
    kernels: tuple[str, ...] = ()  # filled in by Audit.check from the parameters and fixtures

    def expected(self, config: Any = None) -> str:
        if isinstance(self.bound, dict):
            return "; ".join(f"{part} {b.text(config)}" for part, b in self.bound.items())
        return self.bound.text(config)


@dataclass(frozen=True)
class AuditSpec:
    """A registered audit: its name, day, title, config class, kernels, key formulas and steps."""

    name: str
    day: int | None
    title: str
    config: type
    kernels: tuple[Kernel, ...] = ()
    formulas: tuple[tuple[str, str], ...] = ()  # (label, mathtext) pairs shown in reports
    checks: tuple[CheckSpec, ...] = ()
    fixtures: dict[str, Step] = field(default_factory=dict)
    reports: tuple[Step, ...] = ()

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def check_spec(self, name: str) -> CheckSpec:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def checks_for(self, mode: str) -> list[CheckSpec]:
        return [c for c in self.checks if mode in c.modes]

    def checks_of_kernel(self, kernel_name: str, mode: str) -> list[CheckSpec]:
        """The checks that call ``kernel_name`` (directly or through a fixture) in ``mode``."""
        return [c for c in self.checks_for(mode) if kernel_name in c.kernels]

    def make_config(self, mode: str) -> Any:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return getattr(self.config, mode)()


REGISTRY: dict[str, AuditSpec] = {}


class Audit:
    """The audit of one module: declare it once, then its fixtures, checks and report hooks."""

    def __init__(self, name: str, *, day: int | None, title: str, config: type,
                 kernels: Iterable[Kernel] = (), formulas: Iterable[tuple[str, str]] = ()):
        for preset in MODES:
            if not callable(getattr(config, preset, None)):
                raise TypeError(f"audit {name!r}: config {config.__name__} needs a classmethod {preset}()")
        previous = REGISTRY.get(name)
        if previous is not None and previous.config is not config:
            raise ValueError(f"two audits named {name!r}")
        self.name = name
        self._spec = AuditSpec(name=name, day=day, title=title, config=config,
                               kernels=tuple(Kernel(k.fn, k.example, k.hint, name, k.finite) for k in kernels),
                               formulas=tuple(formulas))
        self._kernel_names = {k.name for k in self._spec.kernels}
        REGISTRY[name] = self._spec

    @property
    def spec(self) -> AuditSpec:
        return REGISTRY[self.name]

    def _update(self, **changes: Any) -> None:
        from dataclasses import replace

        REGISTRY[self.name] = replace(REGISTRY[self.name], **changes)

    def _params(self, fn: Callable, what: str) -> tuple[str, ...]:
        params = tuple(inspect.signature(fn).parameters)
        known = set(RESERVED) | self._kernel_names | set(self.spec.fixtures)
        unknown = [p for p in params if p not in known]
        if unknown:
            raise TypeError(f"audit {self.name!r}: {what} {fn.__name__} takes {unknown}, which is not a kernel "
                            f"({sorted(self._kernel_names)}), a fixture declared above it "
                            f"({sorted(self.spec.fixtures)}) or one of {RESERVED}")
        return params

    def _kernels_of(self, params: tuple[str, ...]) -> tuple[str, ...]:
        found: list[str] = []
        for p in params:
            if p in self._kernel_names:
                found.append(p)
            elif p in self.spec.fixtures:
                found.extend(self._kernels_of(self.spec.fixtures[p].params))
        return tuple(k.name for k in self.spec.kernels if k.name in found)  # declaration order

    def fixture(self, fn: Callable | None = None, *, cost: float = 1.0,
                modes: tuple[str, ...] = MODES) -> Callable:
        """Something several checks use (a trained model, a batch of cases): run at most once per
        seed, and only when a selected check needs it."""
        def register(f: Callable) -> Callable:
            if f.__name__ in self.spec.fixtures or f.__name__ in self._kernel_names or f.__name__ in RESERVED:
                raise ValueError(f"audit {self.name!r}: fixture name {f.__name__!r} is already taken")
            step = Step(f.__name__, f, self._params(f, "fixture"), cost, tuple(modes))
            self._update(fixtures={**self.spec.fixtures, f.__name__: step})
            return f
        return register(fn) if fn is not None else register

    def check(self, bound_spec: str | Bound | tuple | Mapping[str, str | Bound | tuple], *,
              kind: str = "invariant", hint: str = "", cost: float = 1.0, modes: tuple[str, ...] = MODES,
              timed: bool = False, name: str | None = None) -> Callable:
        """Declare the decorated function as a check. Its name is the property; its docstring is
        the why; it returns what it measured (see the module docstring)."""
        if kind not in CHECK_KINDS:
            raise ValueError(f"check kind must be one of {CHECK_KINDS}, got {kind!r}")
        parsed = ({part: bound(b) for part, b in bound_spec.items()} if isinstance(bound_spec, Mapping)
                  else bound(bound_spec))
        for b in (parsed.values() if isinstance(parsed, dict) else [parsed]):
            missing = [f for f in b.fields if f not in {x.name for x in _dataclass_fields(self.spec.config)}]
            if missing:
                raise ValueError(f"audit {self.name!r}: a bound names config field(s) {missing} that "
                                 f"{self.spec.config.__name__} does not have")

        def register(f: Callable) -> Callable:
            check_name = name or f.__name__
            why = inspect.getdoc(f) or ""
            if not why:
                raise ValueError(f"audit {self.name!r}: check {check_name} needs a docstring (its why)")
            if any(c.name == check_name for c in self.spec.checks):
                raise ValueError(f"audit {self.name!r}: two checks named {check_name!r}")
            params = self._params(f, "check")
            spec = CheckSpec(check_name, f, params, cost, tuple(modes), bound=parsed, kind=kind,
                             why=" ".join(why.split()), hint=hint, timed=timed, kernels=self._kernels_of(params))
            self._update(checks=self.spec.checks + (spec,))
            return f
        return register

    def report(self, fn: Callable) -> Callable:
        """Series, scalars and tables for the report, run after the checks when the whole audit runs."""
        step = Step(fn.__name__, fn, self._params(fn, "report hook"))
        self._update(reports=self.spec.reports + (step,))
        return fn


def _dataclass_fields(cls: type) -> tuple:
    import dataclasses

    return dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()


# ------------------------------------------------------------------------------------------------
# Evaluating what a check returned


def evaluate(spec: CheckSpec, returned: Any, config: Any) -> Check:
    """Turn a check function's return value into a recorded Check: the engine's verdict."""
    detail = ""
    if isinstance(returned, Measurement):
        returned, detail = returned.value, returned.detail
    if isinstance(spec.bound, dict):
        if not isinstance(returned, Mapping) or set(returned) != set(spec.bound):
            raise TypeError(f"check {spec.name} must return a dict with the parts {sorted(spec.bound)}, "
                            f"got {returned!r:.80}")
        bounds = {part: b.resolve(config) for part, b in spec.bound.items()}
        measured: Measured = {part: bounds[part].worst_of(_floats(returned[part])) for part in spec.bound}
        passed = all(bounds[p].holds(v) for p, v in measured.items())
        margins = [bounds[p].margin(v) for p, v in measured.items()]
        known = [m for m in margins if m is not None]
        margin = min(known) if known else None
    else:
        bounds = {"": spec.bound.resolve(config)}
        measured = bounds[""].worst_of(_floats(returned))
        passed = bounds[""].holds(measured)
        margin = bounds[""].margin(measured)
    if isinstance(margin, float) and math.isinf(margin):
        margin = -math.inf
    return Check(spec.name, passed, measured, spec.expected(config), spec.why, spec.kind, spec.hint, detail,
                 margin, spec.kernels, None, bounds)


def failed_check(spec: CheckSpec, config: Any, error: str) -> Check:
    """The record of a check that raised (or whose fixture raised): failed, nothing measured."""
    return Check(spec.name, False, None, spec.expected(config), spec.why, spec.kind, spec.hint, "", None,
                 spec.kernels, error)
