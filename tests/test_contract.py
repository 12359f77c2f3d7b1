"""The audit contract: bounds, NaN-proof verdicts, margins, fixtures, kernel attribution, one check alone."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmaudit.audit import REGISTRY, Audit, Bound, bound, kernel, least, max_error, measure, worst
from llmaudit.registry import UnknownName
from llmaudit.runner import run_audit

NAN, INF = math.nan, math.inf


@dataclass(frozen=True)
class Cfg:
    tol: float = 1e-6
    min_gain: float = 2.0

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def full(cls):
        return cls(min_gain=3.5)


def double(x: torch.Tensor) -> torch.Tensor:
    """Twice x."""
    return 2 * x


CALLS: list[str] = []


@pytest.fixture(autouse=True)
def clean_registry():
    """The audits made here live only for their test (the registry is global)."""
    from llmaudit.registry import load_all

    load_all()
    before = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(before)


def make_audit(name: str) -> Audit:
    """A small audit over one kernel, with a fixture, an outcome and a module check."""
    REGISTRY.pop(name, None)
    a = Audit(name, day=None, title="t", config=Cfg, kernels=[kernel(double, example=lambda: {"x": torch.ones(2)})])

    @a.fixture(cost=5)
    def data(g):
        CALLS.append("data")
        return torch.randn(8, generator=g, dtype=torch.float64)

    @a.check("< tol", hint="multiply, do not add")
    def doubles_a_vector(double, data):
        """Twice x is x + x."""
        return max_error(double(data), data + data)

    @a.check(">= min_gain", kind="outcome")
    def gain_is_large(double):
        """Doubling three gains three."""
        return double(torch.tensor(3.0)) - 3.0

    @a.check("== 0")
    def module_fact(data):
        """Eight numbers were drawn."""
        return len(data) - 8

    @a.report
    def headline(ctx, data):
        ctx.scalar("mean", data.mean())
    return a


def test_bounds_parse_and_decide():
    assert bound("< 1e-6") == Bound("<", 1e-6)
    assert bound(">= min_gain").resolve(Cfg()) == Bound(">=", 2.0)
    assert bound("in [0.4, 0.6]").holds(0.5) and not bound("in [0.4, 0.6]").holds(0.7)
    assert bound("<= 1").holds(1.0) and not bound("< 1").holds(1.0)
    for b in ("< 1", "> -1", "in [0, 1]", "== 0", ">= 0"):
        assert not bound(b).resolve(None).holds(NAN) and not bound(b).resolve(None).holds(INF)
    with pytest.raises(ValueError):
        bound("about 3")
    with pytest.raises(ValueError):
        bound("in 3")


def test_margins_are_relative_to_the_bound():
    assert bound("< 10").margin(7.5) == pytest.approx(0.25)
    assert bound(">= 2").margin(2.2) == pytest.approx(0.1)
    assert bound(">= 2").margin(1.0) == pytest.approx(-0.5)
    assert bound("in [0, 1]").margin(0.25) == pytest.approx(0.5)
    assert bound("> 0").margin(1.0) is None and bound("> 0", scale=2.0).margin(1.0) == pytest.approx(0.5)
    assert bound("== 0").margin(0.0) is None
    assert bound(">= 1", scale=0).margin(1.0) is None  # a precondition: no margin to report
    assert bound(">= 475", scale="headroom").resolve(type("C", (), {"headroom": 100.0})()).margin(500.0) == 0.25
    assert bound("< 1").margin(NAN) == -INF


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=20))
def test_worst_and_least_propagate_nan(xs):
    if any(math.isnan(x) for x in xs):
        assert math.isnan(worst(xs)) and math.isnan(least(*xs))
    else:
        assert worst(xs) == max(xs) and least(torch.tensor(xs, dtype=torch.float64)) == min(xs)


def test_max_error_is_nan_aware_and_shape_strict():
    assert max_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert math.isnan(max_error(torch.tensor([0.0, NAN]), torch.zeros(2)))
    assert max_error(torch.zeros(3), torch.zeros(4)) == INF
    assert max_error(torch.zeros(0), torch.zeros(0)) == 0.0


def test_the_engine_decides_and_keeps_the_worst_element():
    a = make_audit("contract_worst")

    @a.check("< 1")
    def errors_list():
        """A list: the largest decides."""
        return [0.1, 0.5, 0.2]

    @a.check("< 1")
    def errors_with_nan():
        """Python's max(0.0, nan) is 0.0; the engine's verdict is NaN."""
        return [0.0, NAN, 0.1]

    @a.check({"ratio": ">= 2", "step": "<= 0.1"})
    def two_parts():
        """Two parts, both must hold."""
        return measure({"ratio": torch.tensor([3.0, 2.5]), "step": 0.2}, "words")

    rec = run_audit("contract_worst", only=["errors_list", "errors_with_nan", "two_parts"])
    c = {x.name: x for x in rec.results[0].checks}
    assert c["errors_list"].passed and c["errors_list"].measured == 0.5
    assert not c["errors_with_nan"].passed and math.isnan(c["errors_with_nan"].measured)
    assert "NaN (not finite)" in c["errors_with_nan"].measured_text
    assert not c["two_parts"].passed and c["two_parts"].measured == {"ratio": 2.5, "step": 0.2}
    assert c["two_parts"].detail == "words" and c["two_parts"].margin == pytest.approx(-1.0)


def test_kernels_are_attributed_through_fixtures_and_parameters():
    spec = make_audit("contract_kernels").spec
    assert spec.check_spec("doubles_a_vector").kernels == ("double",)
    assert spec.check_spec("gain_is_large").kernels == ("double",)
    assert spec.check_spec("module_fact").kernels == ()
    assert [c.name for c in spec.checks_of_kernel("double", "toy")] == ["doubles_a_vector", "gain_is_large"]


def test_declaration_errors_are_caught_early():
    a = make_audit("contract_decl")
    with pytest.raises(TypeError, match="not a kernel"):
        @a.check("< 1")
        def needs_unknown(nonesuch):
            """x"""
    with pytest.raises(ValueError, match="docstring"):
        @a.check("< 1")
        def no_why():
            return 0.0
    with pytest.raises(ValueError, match="config field"):
        @a.check(">= no_such_field")
        def bad_field():
            """x"""
    with pytest.raises(ValueError, match="two checks"):
        @a.check("< 1", name="module_fact")
        def dup():
            """x"""

    class NoPresets:
        pass

    with pytest.raises(TypeError, match="toy"):
        Audit("contract_nopresets", day=None, title="t", config=NoPresets)


def test_one_check_runs_alone_with_only_its_fixtures_and_the_same_numbers():
    make_audit("contract_alone")
    CALLS.clear()
    alone = run_audit("contract_alone", only=["gain_is_large"]).results[0]
    assert CALLS == [] and [c.name for c in alone.checks] == ["gain_is_large"] and not alone.scalars
    whole = run_audit("contract_alone").results[0]
    assert CALLS == ["data"]  # once per seed, shared by two checks and the report hook
    assert whole.check("gain_is_large") == alone.check("gain_is_large")
    assert whole.scalars["mean"] == run_audit("contract_alone").results[0].scalars["mean"]
    with pytest.raises(UnknownName, match="Did you mean: gain_is_large"):
        run_audit("contract_alone", only=["gain_is_larg"])


def test_full_mode_uses_its_own_bars():
    make_audit("contract_modes")
    toy = run_audit("contract_modes", mode="toy", only=["gain_is_large"]).results[0].check("gain_is_large")
    full = run_audit("contract_modes", mode="full", seeds=[0], only=["gain_is_large"]).results[0].check("gain_is_large")
    assert toy.passed and toy.expected == ">= 2 (min_gain)" and not full.passed and full.expected == ">= 3.5 (min_gain)"


def test_a_raising_kernel_or_fixture_fails_the_checks_that_need_it_and_only_those():
    make_audit("contract_raise")

    def boom(x):
        raise ZeroDivisionError("mine")

    result = run_audit("contract_raise", kernels={"double": boom}).results[0]
    assert not result.check("doubles_a_vector").passed and "ZeroDivisionError: mine" in result.check("doubles_a_vector").error
    assert result.check("module_fact").passed
    assert result.check("doubles_a_vector").measured_text.startswith("raised ZeroDivisionError")

    def exits(x):
        raise SystemExit(0)  # a user's sys.exit is a failure of their code, not a way out

    result = run_audit("contract_raise", kernels={"double": exits}).results[0]
    assert not result.check("gain_is_large").passed and "SystemExit" in result.check("gain_is_large").error


def test_records_keep_margins_kernels_and_nan(tmp_path):
    from llmaudit.record import RunRecord

    a = make_audit("contract_record")

    @a.check("< 1")
    def nan_check():
        """x"""
        return NAN

    rec = run_audit("contract_record")
    loaded = RunRecord.load(rec.save(tmp_path))
    c = {x.name: x for x in loaded.checks}
    assert c["doubles_a_vector"].kernels == ("double",) and c["doubles_a_vector"].margin > 0.99
    assert math.isnan(c["nan_check"].measured[0]) and not c["nan_check"].passed
    assert loaded.to_dict() == rec.to_dict()
