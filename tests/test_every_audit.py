"""Rules every shipped audit keeps.

- Every kernel, four ways wrong: a function that returns NaN, zeros, its first input, or raises must
  fail at least one check that names it. The raising kernel also proves the attribution: every check
  that claims to call a kernel fails when that kernel raises, so `llmaudit check` never credits a user
  with a check their code did not face.
- Full-mode bars are at least as strict as toy bars; no check or fixture is longer than a screen.
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


def test_full_mode_bars_are_at_least_as_strict_as_toy_bars():
    """Full mode runs longer, so it may not ask for less: a >= bar is no lower, a <= bar no higher. A config
    whose presets differ in a field it declares in TASK_FIELDS poses a different task in full mode and is
    not compared (ppo and rlhf: full mode's prompt names the digit to count)."""
    from llmaudit.registry import all_audits

    looser = []
    for spec in all_audits():
        toy, full = spec.make_config("toy"), spec.make_config("full")
        if any(getattr(toy, f) != getattr(full, f) for f in getattr(type(toy), "TASK_FIELDS", ())):
            continue  # the presets pose different problems (declared in the config's TASK_FIELDS)
        for c in spec.checks:
            if c.kind != "outcome" or set(c.modes) != {"toy", "full"}:
                continue
            parts = c.bound.items() if isinstance(c.bound, dict) else [("", c.bound)]
            for part, b in parts:
                t, f = b.resolve(toy), b.resolve(full)
                if b.op in (">", ">=") and f.value < t.value or b.op in ("<", "<=") and f.value > t.value:
                    looser.append(f"{spec.name}.{c.name}{'.' + part if part else ''}: toy {t.text()}, full {f.text()}")
    assert not looser, looser


def test_no_audit_step_is_longer_than_a_screen():
    import inspect

    from llmaudit.registry import all_audits

    long = []
    for spec in all_audits():
        for step in [*spec.checks, *spec.fixtures.values(), *spec.reports]:
            n = len(inspect.getsource(step.fn).splitlines())
            if n > 60:
                long.append(f"{spec.name}.{step.name}: {n} lines")
    assert not long, long
