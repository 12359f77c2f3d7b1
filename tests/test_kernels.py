"""Every kernel, four ways wrong: a function that returns NaN, zeros, its first input, or raises must
fail at least one check that names it -- and `check` must say so in words.

The raising kernel also proves the attribution: every check that claims to call a kernel fails when
that kernel raises, so `llmaudit check` never credits a user with a check their code did not face.
"""
from __future__ import annotations

import pytest
from conftest import audit_once

from llmaudit.practice import DEGENERATE, DegenerateKernelCalled, degenerate
from llmaudit.registry import all_kernels, get_audit

KERNELS = sorted(all_kernels())


def _checks_of(name: str) -> tuple[str, list[str]]:
    k = all_kernels()[name]
    return k.module, [c.name for c in get_audit(k.module).checks_of_kernel(name, "toy")]


@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_has_three_checks_that_call_it(name):
    module, checks = _checks_of(name)
    assert len(checks) >= 3, f"{name} ({module}) is called by only {checks}"


@pytest.mark.parametrize("how", DEGENERATE)
@pytest.mark.parametrize("name", KERNELS)
def test_a_degenerate_kernel_fails_a_check_that_names_it(name, how):
    module, checks = _checks_of(name)
    k = all_kernels()[name]
    result = audit_once(module, "toy", 0, only=checks, **{name: degenerate(k, how)})
    failed = [c for c in result.checks if not c.passed]
    assert failed, f"a {name} that {how} passes all of {checks}"
    if how == "raises":  # attribution: every check that names the kernel really calls it
        passed = [c.name for c in result.checks if c.passed]
        assert not passed, f"{passed} claim to call {name} but pass when it raises"
        assert all(DegenerateKernelCalled.__name__ in (c.error or "") for c in result.checks), \
            [(c.name, c.error) for c in result.checks if DegenerateKernelCalled.__name__ not in (c.error or "")]
