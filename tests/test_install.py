"""A non-editable install (a built wheel, not this checkout) works: templates and lessons are package data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs(tmp_path):
    # build from a copy of the source, so stale build/ artifacts of this checkout cannot leak in
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "reports", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, cwd=tmp_path, capture_output=True)
    assert (target / "llmaudit" / "report" / "templates" / "run.html.j2").is_file()
    assert (target / "modules" / "mdp" / "README.md").is_file()
    assert (target / "llmaudit" / "content" / "cards" / "gae.yaml").is_file()
    assert (target / "llmaudit" / "content" / "quizzes" / "roadmap.yaml").is_file()
    # run from an empty folder with only the installed copy importable (not this checkout)
    env = {**os.environ, "PYTHONPATH": str(target), "NO_COLOR": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    cli = [sys.executable, "-P", "-m", "llmaudit"]
    res = subprocess.run(cli + ["audit", "mdp", "--toy", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] and Path(work, data["files"]["html"]).is_file()
    env["LLMAUDIT_HOME"] = str(tmp_path / "home")
    res = subprocess.run(cli + ["roadmap", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["days"]) == 16
    res = subprocess.run(cli + ["quiz", "--day", "1", "-n", "1", "--json"], cwd=work, env=env, input="\n3\n",
                         capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["answered"] == 1, res.stderr
    probe = subprocess.run([sys.executable, "-P", "-c", "import llmaudit; print(llmaudit.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True)
    assert probe.stdout.startswith(str(target))
