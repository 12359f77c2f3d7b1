"""Shared test helpers: run one audit seed directly, and assert that a mutant breaks a named check."""
from __future__ import annotations

import os

import pytest

from llmaudit.audit import AuditResult
from llmaudit.runner import configure_torch, run_audit

configure_torch()  # one intra-op thread, as in the runner: tiny tensors on shared cores

# keep CLI output stable and plain under CliRunner
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
os.environ.setdefault("_TYPER_FORCE_DISABLE_TERMINAL", "1")


def audit_once(module: str, mode: str = "toy", seed: int = 0, overrides: dict[str, str] | None = None,
               **kernels) -> AuditResult:
    """Run ``module``'s audit for one seed (optionally with replaced kernels) and return its result."""
    record = run_audit(module, mode=mode, seeds=[seed], overrides=overrides, kernels=kernels or None)
    return record.results[0]


def assert_check_fails(result: AuditResult, name: str) -> None:
    """The mutant must make check ``name`` be recorded and fail (a crash before it is not enough)."""
    names = [c.name for c in result.checks]
    assert name in names, f"check {name!r} was not recorded (error: {result.error}); recorded: {names}"
    assert not result.check(name).passed, f"mutant did not break {name!r}: {result.check(name)}"


@pytest.fixture
def run_module():
    return audit_once
