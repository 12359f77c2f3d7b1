#!/usr/bin/env python3
"""Run every mutant of the test suite over many seeds: a mutant must break its check on every seed.

The mutants are the ``MUTANTS`` lists of ``tests/test_<module>.py`` (see ``tests/conftest.py``).
Toy mutants run on toy seeds 0..N-1 (default 20), full-mode mutants on full seeds 0..4.

    python scripts/mutant_sweep.py                      # every module, 2 worker processes
    python scripts/mutant_sweep.py gae ppo --seeds 5    # some modules, fewer seeds
    python scripts/mutant_sweep.py --save docs/sweep/mutants.json

Exits 1 if any mutant leaves its check passing on some seed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _load(module: str):
    sys.path[:0] = [str(TESTS), str(ROOT)]
    spec = importlib.util.spec_from_file_location(f"mutants_of_{module}", TESTS / f"test_{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, "MUTANTS", [])


def _init() -> None:
    sys.path[:0] = [str(TESTS), str(ROOT)]
    from llmaudit.runner import configure_torch

    configure_torch()


def _run(module: str, index: int, seed: int) -> dict:
    mutant = _load(module)[index]
    start = time.perf_counter()
    result = mutant.run(module, seed)
    check = result.check(mutant.check) if any(c.name == mutant.check for c in result.checks) else None
    return {"module": module, "index": index, "seed": seed, "seconds": time.perf_counter() - start,
            "broken": check is not None and not check.passed, "raised": bool(check and check.error),
            "measured": None if check is None else check.measured_text}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="modules (default: every tests/test_<module>.py with MUTANTS)")
    parser.add_argument("--seeds", type=int, default=20, help="toy seeds (full-mode mutants use min(5, this))")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    _init()
    from llmaudit.registry import all_audits

    names = args.modules or [s.name for s in all_audits() if (TESTS / f"test_{s.name}.py").exists()]
    mutants = {m: _load(m) for m in names}
    tasks = [(m, i, s) for m in names for i, mu in enumerate(mutants[m])
             for s in range(args.seeds if mu.mode == "toy" else min(5, args.seeds))]
    print(f"{len(tasks)} runs of {sum(map(len, mutants.values()))} mutants", file=sys.stderr)
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_init) as pool:
        futures = [pool.submit(_run, *t) for t in tasks]
        for i, fut in enumerate(as_completed(futures), 1):
            results.append(fut.result())
            if i % 50 == 0:
                print(f"  {i}/{len(tasks)}", file=sys.stderr)
    rows = []
    for m in names:
        for i, mu in enumerate(mutants[m]):
            runs = sorted((r for r in results if r["module"] == m and r["index"] == i), key=lambda r: r["seed"])
            survived = [r["seed"] for r in runs if not r["broken"] or (r["raised"] and not mu.raises)]
            rows.append({"module": m, "check": mu.check, "what": mu.what, "mode": mu.mode,
                         "seeds": [r["seed"] for r in runs], "survived_on": survived,
                         "raised_on": [r["seed"] for r in runs if r["raised"]],
                         "measured": [r["measured"] for r in runs],
                         "seconds": round(sum(r["seconds"] for r in runs), 2)})
    doc = {"schema": "llmaudit.mutants/v1", "command": "python scripts/mutant_sweep.py " + " ".join(sys.argv[1:]),
           "ok": all(not r["survived_on"] for r in rows), "mutants": rows}
    for r in rows:
        if r["survived_on"]:
            print(f"✗ {r['module']}: {r['check']} survives '{r['what']}' on seeds {r['survived_on']}")
    print(f"{sum(not r['survived_on'] for r in rows)}/{len(rows)} mutants break their check on every seed")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
