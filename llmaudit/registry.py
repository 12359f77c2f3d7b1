"""Discover the audits in ``audits/*.py``; look modules and kernels up by name, with suggestions."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from llmaudit.audit import REGISTRY, AuditSpec, Kernel


class UnknownName(LookupError):
    """An unknown module or kernel name; the message carries a "did you mean" list."""

    def __init__(self, what: str, name: str, known: list[str], extra: str = ""):
        self.what, self.name, self.known = what, name, known
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        extra = f" ({extra})" if extra else ""
        super().__init__(f"unknown {what} {name!r}{extra}.{hint} Known {what}s: {', '.join(known)}")
        self.suggestions = close


class BrokenAudit(RuntimeError):
    """An audit file that failed to import (its message says why); the other audits still work."""


_loaded = False
BROKEN: dict[str, str] = {}  # audit file name -> "ExceptionType: message" of its failed import


def load_all() -> dict[str, AuditSpec]:
    """Import every module of the ``audits`` package once; each registers itself with ``@audit``.

    A file that fails to import is recorded in ``BROKEN`` instead of taking every other audit down;
    ``smoke`` reports it as a failure and ``get_audit`` raises ``BrokenAudit`` for it.
    """
    global _loaded
    if not _loaded:
        import audits

        for info in sorted(pkgutil.iter_modules(audits.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                try:
                    importlib.import_module(f"audits.{info.name}")
                except Exception as exc:  # noqa: BLE001 - one broken audit must not hide the others
                    BROKEN[info.name] = f"{type(exc).__name__}: {exc}"
        _loaded = True
    return REGISTRY


def all_audits() -> list[AuditSpec]:
    """Every audit, in roadmap order (day, then name)."""
    return sorted(load_all().values(), key=lambda s: (s.day if s.day is not None else 99, s.name))


def get_audit(name: str) -> AuditSpec:
    specs = load_all()
    if name not in specs and name in BROKEN:
        raise BrokenAudit(f"the audit of module {name!r} cannot be imported: {BROKEN[name]}")
    if name not in specs:
        raise UnknownName("module", name, [s.name for s in all_audits()])
    return specs[name]


def all_kernels() -> dict[str, Kernel]:
    out: dict[str, Kernel] = {}
    for spec in all_audits():
        for k in spec.kernels:
            if k.name in out:
                raise ValueError(f"kernel {k.name!r} is declared by both {out[k.name].module} and {spec.name}")
            out[k.name] = k
    return out


def get_kernel(name: str) -> Kernel:
    kernels = all_kernels()
    if name not in kernels:
        raise UnknownName("kernel", name, sorted(kernels))
    return kernels[name]
