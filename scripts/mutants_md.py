"""The mutant sweep (docs/sweep/mutants.json) as a Markdown section of docs/robustness.md."""
from __future__ import annotations


def mutants_markdown(doc: dict) -> str:
    rows = doc["mutants"]
    n_ok = sum(not r["survived_on"] for r in rows)
    lines = ["## Mutants over seeds", "",
             f"`{doc['command'].strip()}` · {n_ok}/{len(rows)} mutants break their check on every seed they ran on.",
             "A mutant is a deliberate bug (a kernel, a config value or a line of module code) from the test suite;",
             "it must make its check fail by a measurement, not by a crash, unless it is marked as raising.", "",
             "| module | check | mutant | mode | seeds | survived on |", "|---|---|---|---|---|---|"]
    for r in rows:
        seeds = f"{r['seeds'][0]}–{r['seeds'][-1]}" if r["seeds"] else "—"
        lines.append(f"| {r['module']} | `{r['check']}` | {r['what']} | {r['mode']} | {seeds} | "
                     f"{', '.join(map(str, r['survived_on'])) or 'none'} |")
    return "\n".join(lines)
