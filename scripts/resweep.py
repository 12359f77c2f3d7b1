#!/usr/bin/env python3
"""Re-run the saved sweeps for some modules only and put them into docs/sweep/{toy,full,mutants}.json.

Each (module, seed) run is deterministic, so a module re-swept alone gives what the whole-suite
command would give for it; use this after changing one module, then `python scripts/publish.py`.

    python scripts/resweep.py ppo actor_critic            # toy 0-19, full 0-4 and their mutants
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "docs" / "sweep"


def _write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="+")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    args = parser.parse_args()
    llmaudit = [sys.executable, "-m", "llmaudit"]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, seeds in (("toy", 20), ("full", 5)):
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([*llmaudit, "sweep", *args.modules, f"--{mode}", "--seeds", str(seeds), "-j",
                            str(args.jobs), "--save", str(out)], check=False, stdout=subprocess.DEVNULL)
            new = {m["module"]: m for m in json.loads(out.read_text())["modules"]}
            doc = json.loads((SWEEPS / f"{mode}.json").read_text())
            known = {m["module"] for m in doc["modules"]}
            doc["modules"] = [new.get(m["module"], m) for m in doc["modules"]] + \
                [m for name, m in new.items() if name not in known]  # a module swept for the first time
            checks = [c for m in doc["modules"] for c in m["checks"]]
            doc["ok"] = all(c["passed"] == c["n"] for c in checks) and not any(m["run_errors"] for m in doc["modules"])
            doc["goal_met"] = all(c["meets_goal"] for c in checks)
            _write(SWEEPS / f"{mode}.json", doc)
            print(f"{mode}: ok {doc['ok']}, goal met {doc['goal_met']}")
        out = Path(tmp) / "mutants.json"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "mutant_sweep.py"), *args.modules, "-j", str(args.jobs),
                        "--save", str(out)], check=False)
        new_rows = json.loads(out.read_text())["mutants"]
        doc = json.loads((SWEEPS / "mutants.json").read_text())
        rows, done = [], set()
        for r in doc["mutants"]:
            if r["module"] in args.modules:
                if r["module"] not in done:
                    rows += [n for n in new_rows if n["module"] == r["module"]]
                    done.add(r["module"])
            else:
                rows.append(r)
        rows += [n for n in new_rows if n["module"] not in done]  # a module swept for the first time
        doc["mutants"], doc["ok"] = rows, all(not r["survived_on"] for r in rows)
        _write(SWEEPS / "mutants.json", doc)
        print(f"mutants: ok {doc['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
