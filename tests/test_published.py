"""Published numbers come from a command: the committed seed sweeps (docs/sweep/*.json, made by
`llmaudit sweep`) cover every check with the bars in the code, meet the robustness goals, and every
number in the READMEs and docs/robustness.md is what `scripts/publish.py` generates from them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmaudit.registry import all_audits
from llmaudit.sweep import SPAN

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {"toy": (ROOT / "docs/sweep/toy.json", list(range(20))), "full": (ROOT / "docs/sweep/full.json", list(range(5)))}


def load(mode: str) -> dict:
    return json.loads(SWEEPS[mode][0].read_text(encoding="utf-8"))


@pytest.mark.parametrize("mode", list(SWEEPS))
def test_the_committed_sweep_covers_every_check_with_todays_bars(mode):
    doc = load(mode)
    assert doc["schema"] == "llmaudit.sweep/v1" and doc["mode"] == mode and doc["seeds"] == SWEEPS[mode][1]
    swept = {m["module"]: {c["name"]: c for c in m["checks"]} for m in doc["modules"]}
    for spec in all_audits():
        assert spec.name in swept, f"{spec.name} is not in docs/sweep/{mode}.json: rerun the sweep"
        cfg = spec.make_config(mode)
        want = {c.name: c.expected(cfg) for c in spec.checks_for(mode)}
        have = {name: c["expected"] for name, c in swept[spec.name].items()}
        assert have == want, f"{spec.name}: the committed {mode} sweep ran other checks or bars: rerun it"


@pytest.mark.parametrize("mode", list(SWEEPS))
def test_the_committed_sweep_meets_the_robustness_goals(mode):
    doc = load(mode)
    bad = [(m["module"], c["name"], c["failed_seeds"], c["worst_margin"])
           for m in doc["modules"] for c in m["checks"] if not c["meets_goal"]]
    assert doc["ok"] and doc["goal_met"] and not bad, bad


def test_readmes_and_robustness_page_are_generated_from_the_sweeps():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "publish.py"), "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_module_readmes_publish_their_results_through_sweep_spans():
    for readme in sorted((ROOT / "modules").glob("*/README.md")):
        assert SPAN.search(readme.read_text(encoding="utf-8")), f"{readme} quotes no sweep result"


def test_the_readme_smoke_example_lists_every_module_with_its_check_count():
    """The README shows `llmaudit smoke`'s output: one line per registered module, in the registry's
    order, with that module's number of toy checks (it once listed 17 of 27 modules)."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = re.findall(r"^✓ (\w+)\s+(\d+)/(\d+)\s+checks", text, flags=re.M)
    audits = all_audits()
    assert [name for name, _, _ in lines] == [a.name for a in audits]
    toy_checks = {a.name: sum(1 for c in a.checks if "toy" in c.modes) for a in audits}
    assert {name: int(n) for name, _, n in lines} == toy_checks
    n = len(audits)
    assert re.search(rf"^{n}/{n} modules pass in ", text, flags=re.M)


def test_every_set_override_a_readme_suggests_is_accepted():
    """`--set k=v` in a README (`llmaudit sweep reward_model --set lm_steps=0` once was) must be a key
    of that module's config with a value its declared range accepts, in toy and full mode. The module
    is the one named on the same line after `llmaudit audit|sweep`, else the README's own module(s)."""
    import re

    from llmaudit.config import ConfigError, apply_overrides

    audits = {a.name: a for a in all_audits()}
    problems, seen = [], 0
    for readme in [ROOT / "README.md", *sorted((ROOT / "modules").glob("*/README.md"))]:
        own = [n for n, a in audits.items() if a.config.__module__.split(".")[1:2] == [readme.parent.name]]
        for line in readme.read_text(encoding="utf-8").splitlines():
            named = re.findall(r"llmaudit (?:audit|sweep) (\w+)", line)
            for key, value in re.findall(r"--set (\w+)=([^\s`)]+)", line):
                if key == "key":  # the placeholder in the options list
                    continue
                seen += 1
                candidates = [n for n in named if n in audits] or own
                errors = []
                for name in candidates:
                    try:
                        for mode in ("toy", "full"):
                            apply_overrides(getattr(audits[name].config, mode)(), {key: value.rstrip(".,;")})
                        break
                    except ConfigError as exc:
                        errors.append(f"{name}: {exc}")
                else:
                    problems.append(f"{readme.relative_to(ROOT)}: --set {key}={value}: {errors or 'no module'}")
    assert seen >= 15 and problems == [], problems
