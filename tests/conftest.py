"""Shared test helpers: run one audit seed directly, and mutants -- broken kernels, configs or module
code -- that must make a named check fail.

A test file lists its mutants as ``MUTANTS = [Mutant(...), ...]``; ``scripts/mutant_sweep.py`` runs
the same lists over many seeds, so every mutant must keep breaking its check on every seed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager
from unittest import mock

import pytest

from llmaudit.audit import AuditResult
from llmaudit.registry import get_audit
from llmaudit.runner import configure_torch, run_audit

configure_torch()  # one intra-op thread, as in the runner: tiny tensors on shared cores

# keep CLI output stable and plain under CliRunner
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("_TYPER_FORCE_DISABLE_TERMINAL", "1")
# progress and the content cache go to a folder of the test run, never to the user's own data folder
os.environ.setdefault("LLMAUDIT_HOME", tempfile.mkdtemp(prefix="llmaudit-tests-"))


def audit_once(module: str, mode: str = "toy", seed: int = 0, overrides: dict[str, str] | None = None,
               only: list[str] | None = None, **kernels) -> AuditResult:
    """Run ``module``'s audit for one seed (optionally only some checks, with replaced kernels)."""
    record = run_audit(module, mode=mode, seeds=[seed], overrides=overrides, kernels=kernels or None, only=only)
    return record.results[0]


def assert_check_fails(result: AuditResult, name: str) -> None:
    """The mutant must make check ``name`` be recorded and fail."""
    names = [c.name for c in result.checks]
    assert name in names, f"check {name!r} was not recorded (error: {result.error}); recorded: {names}"
    assert not result.check(name).passed, f"mutant did not break {name!r}: {result.check(name)}"


@dataclass(frozen=True)
class Mutant:
    """A deliberate bug that must make ``check`` fail.

    ``kernels`` replaces kernels by name, ``overrides`` are ``--set`` values, ``patch`` returns a
    context manager that breaks module code while the audit runs (e.g. ``lambda:
    mock.patch.object(M, "bootstrap", wrong)``). ``raises=True`` accepts a check that fails because
    the broken code raised; by default the check must fail on a measurement.

    A function bound as a default argument (``def train(..., loss_fn=ppo_clip_loss)``) keeps the
    original whatever you patch afterwards: patch the function that passes it, or pass a kernel.
    """

    check: str
    what: str  # a few words: "lam ignored", "clip removed"
    kernels: dict[str, Callable] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    patch: Callable[[], ContextManager] | None = None
    mode: str = "toy"
    raises: bool = False

    def run(self, module: str, seed: int = 0) -> AuditResult:
        with (self.patch() if self.patch else contextlib.nullcontext()):
            return audit_once(module, self.mode, seed, overrides=self.overrides or None, only=[self.check],
                              **self.kernels)

    @property
    def id(self) -> str:
        return f"{self.check}-{self.what.replace(' ', '_')}"


def patched(module: Any, name: str, new: Any) -> Callable[[], ContextManager]:
    """A Mutant ``patch``: replace ``module.name`` by ``new`` in every ``modules.*`` module that binds
    the same object -- the defining module, whose globals its callers look up, and the package that
    re-exports it -- so no caller keeps the original by accident."""
    def enter() -> ContextManager:
        old = getattr(module, name)
        stack = contextlib.ExitStack()
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").split(".")[0] == "modules" and getattr(mod, name, None) is old:
                stack.enter_context(mock.patch.object(mod, name, new))
        return stack
    return enter


def assert_mutant_fails(module: str, mutant: Mutant, seed: int = 0) -> AuditResult:
    result = mutant.run(module, seed)
    assert_check_fails(result, mutant.check)
    c = result.check(mutant.check)
    if not mutant.raises:
        assert c.error is None, f"mutant {mutant.what!r} made {mutant.check} raise instead of fail: {c.error}"
    return result


def assert_every_check_has_a_mutant(module: str, mutants: list[Mutant]) -> None:
    """Every check of ``module`` (both modes) is broken by at least one mutant of the list."""
    names = {c.name for c in get_audit(module).checks}
    missing = names - {m.check for m in mutants}
    unknown = {m.check for m in mutants} - names
    assert not missing, f"checks of {module} with no mutant: {sorted(missing)}"
    assert not unknown, f"mutants of {module} name checks that do not exist: {sorted(unknown)}"


def mutant_params(mutants: list[Mutant]) -> Any:
    """Parametrize a test over mutants; full-mode mutants are marked slow."""
    return pytest.mark.parametrize("mutant", [pytest.param(m, id=m.id, marks=[pytest.mark.slow] if m.mode == "full" else [])
                                              for m in mutants])


@pytest.fixture
def run_module():
    return audit_once


# ------------------------------------------------------------------ folders nobody may write in

@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may create files in, root included: ``chattr +i`` for root (chmod does not stop
    root), chmod 0o555 otherwise. Skips where neither is possible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
