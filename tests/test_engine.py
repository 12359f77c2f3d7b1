"""The engine: config overrides, the audit contract, run records, seeds and determinism."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmaudit.audit import AuditResult, Check, format_measured, plain
from llmaudit.config import ConfigError, apply_overrides, parse_assignments
from llmaudit.record import RecordError, RunRecord, latest_records
from llmaudit.registry import UnknownName, all_audits, get_audit, get_kernel
from llmaudit.runner import resolve_seeds, run_audit


@dataclass(frozen=True)
class Cfg:
    lr: float = 0.1
    steps: int = 10
    clip: bool = True
    name: Literal["a", "b"] = "a"

    @classmethod
    def toy(cls):
        return cls()

    @classmethod
    def full(cls):
        return cls(steps=100)


def test_overrides_are_typed():
    cfg = apply_overrides(Cfg(), parse_assignments(["lr=3e-4", "steps=7", "clip=false", "name=b"]))
    assert cfg == Cfg(lr=3e-4, steps=7, clip=False, name="b")


@pytest.mark.parametrize("item, message", [
    ("lr=fast", "expected a number"), ("steps=1.5", "integer"), ("clip=maybe", "true"),
    ("name=c", "one of a, b"), ("lrr=1", "Did you mean lr?"), ("noequals", "key=value"),
])
def test_bad_overrides_are_rejected_with_choices(item, message):
    with pytest.raises(ConfigError, match=None) as info:
        apply_overrides(Cfg(), parse_assignments([item]))
    assert message in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Cfg(), {"zzz": "1"})
    for key in ("lr", "steps", "clip", "name"):
        assert key in str(info.value)


def test_config_validation_errors_surface_as_config_errors():
    with pytest.raises(ConfigError, match="gamma"):
        run_audit("mdp", overrides={"gamma": "1.5"})


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans() | st.text(max_size=20))
def test_plain_values_are_json_safe(value):
    json.dumps(plain(value), allow_nan=False)
    assert isinstance(format_measured(plain(value)), str)


def test_a_run_without_checks_or_with_an_error_does_not_pass():
    assert not AuditResult("m", 0, "toy").passed
    r = AuditResult("m", 0, "toy", checks=[Check("a", True, 1.0, "", "")])
    assert r.passed
    r.error = "ValueError: boom"
    assert not r.passed


def test_registry_lookups_suggest_names():
    assert [s.name for s in all_audits()][0] == "mdp"
    with pytest.raises(UnknownName, match="Did you mean: mdp"):
        get_audit("mpd")
    with pytest.raises(UnknownName, match="bellman_optimality_backup"):
        get_kernel("bellman_optimality")


def test_seeds():
    assert resolve_seeds("toy") == [0]
    assert resolve_seeds("full", 5) == [5, 6, 7]
    assert resolve_seeds("full", 2, 2) == [2, 3]
    with pytest.raises(ValueError):
        resolve_seeds("toy", 0, 0)


def test_overrides_reach_the_code():
    # a flag that silently does nothing was the seed repos' worst bug: --set must change what runs
    base = run_audit("mdp", mode="toy")
    changed = run_audit("mdp", mode="toy", overrides={"gamma": "0.9"})
    assert base.config["gamma"] == 0.99 and changed.config["gamma"] == 0.9
    assert base.scalars()["V*(s0) FrozenLake"] != changed.scalars()["V*(s0) FrozenLake"]


def test_record_round_trip_and_determinism(tmp_path):
    a = run_audit("mdp", mode="toy", seeds=[4])
    b = run_audit("mdp", mode="toy", seeds=[4])
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k not in ("timing",)}  # noqa: E731
    assert strip(a) == strip(b)
    path = a.save(tmp_path / "runs")
    loaded = RunRecord.load(path)
    assert loaded.to_dict() == a.to_dict()
    assert json.loads(path.read_text())["schema"] == "llmaudit.run/v2"
    assert a.save(tmp_path / "runs") != path  # never overwrites


def test_seeds_in_worker_processes_give_what_one_process_gives():
    seen = []
    serial = run_audit("gae", mode="toy", seeds=[3, 4, 5])
    parallel = run_audit("gae", mode="toy", seeds=[3, 4, 5], jobs=2, progress=seen.append)
    same = lambda r: [x.deterministic_dict() for x in r.results]  # noqa: E731
    assert same(parallel) == same(serial) and parallel.seeds == [3, 4, 5]
    assert len(parallel.timing["per_seed_cpu_s"]) == 3 and all(t > 0 for t in parallel.timing["per_seed_cpu_s"])
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)  # the bar only moves forward, and ends full


def test_user_kernels_never_leave_the_process():
    calls = []

    def spy(*args, **kwargs):  # a closure: it could not even be sent to a worker
        calls.append(1)
        return get_kernel("compute_gae").fn(*args, **kwargs)

    rec = run_audit("gae", mode="toy", seeds=[0, 1], kernels={"compute_gae": spy}, jobs=2)
    assert calls and rec.passed


def test_broken_records_are_reported_not_fatal(tmp_path):
    good = run_audit("mdp", mode="toy").save(tmp_path / "runs")
    (good.parent / "zz-corrupt.json").write_text("{not json")
    (good.parent / "zz-other.json").write_text(json.dumps({"schema": "something/v9"}))
    latest, warnings = latest_records(tmp_path / "runs")
    assert list(latest) == ["mdp"] and len(warnings) == 2
    with pytest.raises(RecordError, match="not a valid JSON"):
        RunRecord.load(good.parent / "zz-corrupt.json")


def test_an_exception_in_an_audit_is_a_failed_run_not_a_crash():
    def explode(rewards, values, next_values, terminated, truncated, gamma, lam):
        raise RuntimeError("boom")

    rec = run_audit("gae", mode="toy", kernels={"compute_gae": explode})
    assert not rec.passed and all("RuntimeError: boom" in c.errors[0] for c in rec.checks)
    assert rec.kernels["compute_gae"] == "user"


def test_every_kernel_has_a_docstring_and_a_valid_example():
    import inspect

    from llmaudit.registry import all_kernels

    for k in all_kernels().values():
        assert k.doc, f"{k.name} has no docstring"
        k.fn(**k.example())
        namespace: dict = {}
        exec(compile(k.stub("x.py"), "x.py", "exec"), namespace)  # the stub is valid Python...
        stub_fn = namespace[k.name]
        assert list(inspect.signature(stub_fn).parameters) == list(k.signature.parameters)  # ...same signature
        assert inspect.getdoc(stub_fn) == k.doc  # ...the contract travels with it
        with pytest.raises(NotImplementedError):
            stub_fn(**k.example())


def test_formulas_render_with_mathtext():
    from llmaudit.report.formulas import formula_svg

    for spec in all_audits():
        for label, tex in spec.formulas:
            assert formula_svg(tex).startswith("<svg"), (spec.name, label)


def test_every_shipped_audit_imports():
    from llmaudit.registry import BROKEN, load_all

    load_all()
    assert BROKEN == {}


def test_a_broken_audit_is_reported_not_fatal(monkeypatch):
    from llmaudit import registry

    monkeypatch.setitem(registry.BROKEN, "halfbuilt", "SyntaxError: invalid syntax (halfbuilt.py, line 3)")
    with pytest.raises(registry.BrokenAudit, match="halfbuilt.py, line 3"):
        registry.get_audit("halfbuilt")
    from typer.testing import CliRunner

    from llmaudit.cli import app

    res = CliRunner().invoke(app, ["audit", "halfbuilt"])
    assert res.exit_code == 3 and "cannot be imported" in res.stderr


def test_smoke_counts_a_broken_audit_as_a_failure(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from llmaudit import registry
    from llmaudit.cli import app, run

    monkeypatch.setitem(registry.BROKEN, "halfbuilt", "ImportError: cannot import name 'x'")
    monkeypatch.setattr(run, "all_audits", lambda: [registry.get_audit("mdp")])
    res = CliRunner().invoke(app, ["smoke", "--out", str(tmp_path), "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == 1 and not data["ok"] and "halfbuilt" in data["broken"]
