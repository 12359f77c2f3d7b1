"""The audit contract: how a module declares its audit and what an audit records.

An audit is a function ``fn(ctx, *, kernel_a=reference_a, ...)`` registered with ``@audit``. It runs
the module's code, and through the ``Context`` records

- checks   -- named properties with a measured value, the bound in words, and a one-sentence why;
- series   -- curves keyed by the metric names users know from TRL / verl (``objective/kl``);
- scalars  -- headline numbers.

Kernels are the functions an interviewer asks you to write by hand. Each is declared with
``kernel(fn, example=...)``; because the audit takes kernels as keyword arguments that default to the
reference implementations, the same audit checks a user's own function (``llmaudit check``).
"""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

Measured = float | int | str | bool

MODES = ("toy", "full")
CHECK_KINDS = ("invariant", "outcome")


def plain(value: Any) -> Measured:
    """A JSON-friendly measured value: Python scalars stay, tensors/arrays of one element become
    scalars, non-finite floats and everything else become short strings."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # more than one element
            value = value.tolist()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_measured(plain(v)) for v in value)
    return str(value)


def format_measured(value: Measured) -> str:
    """How a measured value is printed in tables: 4 significant digits, small and large in e-notation."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Check:
    """One named property, checked on one run."""

    name: str  # the property in snake_case: kv_cache_matches_full_recompute
    passed: bool
    measured: Measured
    expected: str  # the bound in words: "< 1e-6", ">= 0.9"
    why: str  # one sentence a candidate could say in an interview
    kind: str = "invariant"  # invariant (exact math) | outcome (the closed loop learned)
    hint: str = ""  # what usually breaks this property, shown by `llmaudit check`

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "measured": self.measured,
                "expected": self.expected, "why": self.why, "kind": self.kind, "hint": self.hint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Check:
        return cls(name=d["name"], passed=bool(d["passed"]), measured=d["measured"],
                   expected=d["expected"], why=d["why"], kind=d.get("kind", "invariant"),
                   hint=d.get("hint", ""))


@dataclass
class Series:
    """A curve: y against x. Series that share a ``group`` are drawn on one set of axes."""

    name: str  # the metric name, e.g. "objective/kl"
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    x_label: str = "step"
    group: str = ""  # plot key; defaults to the name
    smooth: bool = True  # draw an EMA over the raw points (off for sweeps over a parameter)

    @property
    def plot_key(self) -> str:
        return self.group or self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "x": self.x, "y": self.y, "x_label": self.x_label,
                "group": self.group, "smooth": self.smooth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Series:
        return cls(name=d["name"], x=list(d["x"]), y=list(d["y"]), x_label=d.get("x_label", "step"),
                   group=d.get("group", ""), smooth=bool(d.get("smooth", True)))


@dataclass
class AuditResult:
    """Everything one audit run (one module, one seed, one mode) recorded."""

    module: str
    seed: int
    mode: str
    checks: list[Check] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)
    scalars: dict[str, Measured] = field(default_factory=dict)
    error: str | None = None  # the exception that stopped the audit early, if any
    timed: list[str] = field(default_factory=list)  # scalars/checks whose values are clock measurements
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> {"columns": [...], "rows": [[...]]}

    @property
    def passed(self) -> bool:
        """A run passes only if it finished and every check passed; a run with no checks fails."""
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; recorded: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "seed": self.seed, "mode": self.mode, "passed": self.passed,
                "error": self.error, "checks": [c.to_dict() for c in self.checks],
                "scalars": dict(self.scalars), "timed": list(self.timed),
                "series": {k: s.to_dict() for k, s in self.series.items()},
                "tables": {k: {"columns": list(t["columns"]), "rows": [list(r) for r in t["rows"]]}
                           for k, t in self.tables.items()}}

    def deterministic_dict(self) -> dict[str, Any]:
        """``to_dict()`` without clock measurements: equal for two runs of the same seed and mode."""
        d = self.to_dict()
        d["scalars"] = {k: v for k, v in d["scalars"].items() if k not in self.timed}
        for c in d["checks"]:
            if c["name"] in self.timed:
                c["measured"] = "(timed)"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditResult:
        return cls(module=d["module"], seed=int(d["seed"]), mode=d["mode"],
                   checks=[Check.from_dict(c) for c in d["checks"]],
                   series={k: Series.from_dict(s) for k, s in d.get("series", {}).items()},
                   scalars=dict(d.get("scalars", {})), error=d.get("error"), timed=list(d.get("timed", [])),
                   tables={k: {"columns": list(t["columns"]), "rows": [list(r) for r in t["rows"]]}
                           for k, t in d.get("tables", {}).items()})


class Context:
    """What an audit receives: the seed, the mode, the module config, and the recording methods."""

    def __init__(self, module: str, *, seed: int = 0, mode: str = "toy", config: Any = None,
                 progress: Callable[[float], None] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.module = module
        self.seed = seed
        self.mode = mode
        self.config = config
        self._progress = progress
        self.result = AuditResult(module=module, seed=seed, mode=mode)

    @property
    def toy(self) -> bool:
        return self.mode == "toy"

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def check(self, name: str, passed: Any, measured: Any, expected: str, why: str, *,
              kind: str = "invariant", hint: str = "", timed: bool = False) -> bool:
        """Record one property. ``passed`` is coerced to bool (a NaN comparison is False).

        ``timed=True`` marks a measured value that comes from a clock (a speedup, a throughput): the
        only values allowed to differ between two runs of the same seed and mode.
        """
        if kind not in CHECK_KINDS:
            raise ValueError(f"check kind must be one of {CHECK_KINDS}, got {kind!r}")
        if any(c.name == name for c in self.result.checks):
            raise ValueError(f"check {name!r} recorded twice in audit {self.module!r}")
        ok = bool(passed.item() if hasattr(passed, "item") else passed)
        self.result.checks.append(Check(name, ok, plain(measured), expected, why, kind, hint))
        if timed:
            self.result.timed.append(name)
        return ok

    def log(self, name: str, value: Any, step: float | None = None, **series_options: Any) -> None:
        """Append one point to a series (created on first use with ``series_options``)."""
        s = self.result.series.get(name)
        if s is None:
            s = self.result.series[name] = Series(name=name, **series_options)
        s.x.append(float(len(s.y) if step is None else step))
        s.y.append(_finite_or_nan(value))

    def series(self, name: str, y: Any, x: Any = None, *, x_label: str = "step", group: str = "",
               smooth: bool = True) -> None:
        """Record a whole curve at once (a tensor, array or list)."""
        ys = [_finite_or_nan(v) for v in _as_list(y)]
        xs = [float(v) for v in _as_list(x)] if x is not None else [float(i) for i in range(len(ys))]
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values for {len(ys)} y values")
        self.result.series[name] = Series(name, xs, ys, x_label, group, smooth)

    def scalar(self, name: str, value: Any, *, timed: bool = False) -> None:
        """A headline number (or short string) shown at the top of the report; ``timed=True`` for a
        clock measurement (excluded from the determinism guarantee)."""
        self.result.scalars[name] = plain(value)
        if timed and name not in self.result.timed:
            self.result.timed.append(name)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table shown in the report (e.g. which models are trainable in each stage). Cells are
        numbers or short strings; every row has one cell per column."""
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"table {name!r}: a row has {len(row)} cells for {len(columns)} columns")
        self.result.tables[name] = {"columns": [str(c) for c in columns],
                                    "rows": [[plain(v) for v in row] for row in rows]}

    def progress(self, done: float, total: float = 1.0) -> None:
        """Report progress through this run (drives the progress bar); cheap to call often."""
        if self._progress is not None and total > 0:
            self._progress(min(max(done / total, 0.0), 1.0))

    def generator(self, stream: int = 0):
        """A torch.Generator seeded from (seed, stream): independent reproducible random streams."""
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + stream)
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
    module: str = ""  # the audit it belongs to; set by @audit

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


def kernel(fn: Callable, *, example: Callable[[], dict[str, Any]], hint: str = "") -> Kernel:
    """Declare ``fn`` (a reference implementation in ``modules/``) as a kernel."""
    return Kernel(fn=fn, example=example, hint=hint)


# ------------------------------------------------------------------------------------------------
# Audits


@dataclass(frozen=True)
class AuditSpec:
    """A registered audit: its name, day, title, config class, kernels and key formulas."""

    name: str
    day: int | None
    title: str
    fn: Callable[..., None]
    config: type
    kernels: tuple[Kernel, ...] = ()
    formulas: tuple[tuple[str, str], ...] = ()  # (label, mathtext) pairs shown in reports

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(name)

    def make_config(self, mode: str) -> Any:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return getattr(self.config, mode)()


REGISTRY: dict[str, AuditSpec] = {}


def audit(name: str, *, day: int | None, title: str, config: type,
          kernels: list[Kernel] | tuple[Kernel, ...] = (),
          formulas: list[tuple[str, str]] | tuple[tuple[str, str], ...] = ()):
    """Register ``fn(ctx, *, <kernel>=<reference>, ...)`` as the audit of module ``name``.

    The kernels' reference functions must be the defaults of keyword-only parameters of the same
    name, so that ``fn(ctx)`` audits the references and ``fn(ctx, compute_gae=mine)`` audits yours.
    """
    for preset in MODES:
        if not callable(getattr(config, preset, None)):
            raise TypeError(f"audit {name!r}: config {config.__name__} needs a classmethod {preset}()")

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        params = inspect.signature(fn).parameters
        bound = []
        for k in kernels:
            p = params.get(k.name)
            if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is not k.fn:
                raise TypeError(f"audit {name!r}: kernel {k.name} must be a keyword-only parameter "
                                f"of {fn.__name__} defaulting to the reference implementation")
            bound.append(Kernel(fn=k.fn, example=k.example, hint=k.hint, module=name))
        previous = REGISTRY.get(name)
        if previous is not None and previous.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"two audits named {name!r}: {previous.fn.__module__} and {fn.__module__}")
        spec = AuditSpec(name=name, day=day, title=title, fn=fn, config=config,
                         kernels=tuple(bound), formulas=tuple(formulas))
        REGISTRY[name] = spec
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return register
