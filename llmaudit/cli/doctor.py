"""doctor: is this machine ready? Python, torch, optional dependencies, a CJK font."""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import shutil
import subprocess
import sys

import typer
from rich.table import Table

from llmaudit.cli.common import ENVIRONMENT, OK, JsonOpt, emit_json, out

app = typer.Typer()

APT_FONT = "sudo apt-get install -y fonts-wqy-microhei   (or fonts-noto-cjk)"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cjk_fonts() -> list[str]:
    """Font families fontconfig knows that cover Chinese."""
    if shutil.which("fc-list") is None:
        return []
    try:
        res = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.split(",")[0].strip() for line in res.stdout.splitlines() if line.strip()})


def diagnose() -> list[dict]:
    """One row per item: name, ok, found, needed for, fix command."""
    rows = []
    py_ok = sys.version_info >= (3, 10)
    rows.append({"item": "python", "ok": py_ok, "found": platform.python_version(), "for": "everything",
                 "fix": "" if py_ok else "install Python >= 3.10"})
    try:
        import torch

        rows.append({"item": "torch", "ok": True, "for": "every module",
                     "found": f"{torch.__version__}, {torch.get_num_threads()} threads, "
                              f"cuda {'yes' if torch.cuda.is_available() else 'no'}", "fix": ""})
    except ImportError:
        rows.append({"item": "torch", "ok": False, "found": "missing", "for": "every module",
                     "fix": "pip install torch  (CPU build is enough)"})
    for dist, module, need in [("gymnasium", "gymnasium", "mdp, td"), ("matplotlib", "matplotlib", "reports"),
                               ("Jinja2", "jinja2", "reports"), ("PyYAML", "yaml", "cards, quizzes"),
                               ("fsrs", "fsrs", "quiz scheduling"), ("pydantic", "pydantic", "cards, quizzes"),
                               ("weasyprint", "weasyprint", "PDF briefs (optional)")]:
        try:
            importlib.import_module(module)
            rows.append({"item": dist, "ok": True, "found": _version(dist) or "installed", "for": need, "fix": ""})
        except Exception as exc:  # noqa: BLE001 - e.g. weasyprint raises OSError without pango
            fix = "pip install 'llmaudit[pdf]'" if dist == "weasyprint" else f"pip install {dist}"
            if dist == "weasyprint" and not isinstance(exc, ImportError):
                fix = "sudo apt-get install -y libpango-1.0-0 libpangoft2-1.0-0"
            rows.append({"item": dist, "ok": False, "found": f"missing ({type(exc).__name__})", "for": need, "fix": fix})
    try:
        from llmaudit.learn.load import load_content

        c = load_content()
        rows.append({"item": "quiz content", "ok": True, "for": "quiz, brief, roadmap",
                     "found": f"{len(c.cards)} cards, {sum(len(d.items) for d in c.days.values())} items, "
                              f"{len(c.roadmap.days)} days", "fix": ""})
    except Exception as exc:  # noqa: BLE001 - report any content problem, never crash the doctor
        rows.append({"item": "quiz content", "ok": False, "for": "quiz, brief, roadmap",
                     "found": str(exc).splitlines()[0][:120], "fix": "reinstall llmaudit (the shipped YAML is damaged)"})
    fonts = cjk_fonts()
    rows.append({"item": "CJK font", "ok": bool(fonts), "found": ", ".join(fonts[:3]) or "none",
                 "for": "Chinese in PDFs and plots", "fix": "" if fonts else APT_FONT})
    return rows


@app.command()
def doctor(json_mode: JsonOpt = False) -> None:
    """Check this machine: Python, torch (version, threads), optional dependencies, a CJK font.

    Exits 3 and prints the exact fix command for anything missing.

    Example: llmaudit doctor
    """
    rows = diagnose()
    ok = all(r["ok"] for r in rows)
    if json_mode:
        emit_json("llmaudit.doctor/v1", {"ok": ok, "items": rows})
    else:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("", "item", "found", "needed for"):
            table.add_column(col)
        for r in rows:
            table.add_row("[green]✓[/]" if r["ok"] else "[bold red]✗[/]", r["item"], r["found"], r["for"])
        out().print(table)
        for r in rows:
            if not r["ok"]:
                out().print(f"[bold red]fix {r['item']}:[/] {r['fix']}")
        if ok:
            out().print("[green]all good[/]")
    raise typer.Exit(OK if ok else ENVIRONMENT)
