"""Fast start: list, roadmap, quiz and progress need neither torch nor the audits, and the YAML
content is parsed once per process with libyaml (scripts/bench.py times them; no timed tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from llmaudit import catalog
from llmaudit.learn import load


def test_catalog_equals_what_the_audits_declare():
    """If this fails, an audit's name, day, title or kernels changed: run `python -m llmaudit.catalog`."""
    assert catalog.MODULES == catalog.from_audits()


def test_catalog_names_every_audit_file():
    assert {m.name for m in catalog.MODULES} == catalog.audit_files()
    assert catalog.modules() is catalog.MODULES


def test_an_audit_file_the_catalog_does_not_know_falls_back_to_the_audits(monkeypatch):
    monkeypatch.setattr(catalog, "audit_files", lambda: {m.name for m in catalog.MODULES} | {"new_module"})
    stale = catalog.MODULES[1:]  # as if the catalog had not been regenerated after adding an audit
    monkeypatch.setattr(catalog, "MODULES", stale)
    assert catalog.modules() == catalog.from_audits() != stale


def test_rewrite_leaves_an_up_to_date_catalog_unchanged(tmp_path):
    copy = tmp_path / "catalog.py"
    copy.write_text(open(catalog.__file__, encoding="utf-8").read(), encoding="utf-8")
    assert catalog.rewrite(str(copy)) is False
    broken = copy.read_text(encoding="utf-8").replace("'Byte-level BPE tokenizer'", "'Old title'")
    copy.write_text(broken, encoding="utf-8")
    assert catalog.rewrite(str(copy)) is True
    assert "'Byte-level BPE tokenizer'" in copy.read_text(encoding="utf-8")


PROBE = """
import json, sys
from llmaudit.cli import app
try:
    app(sys.argv[1:], prog_name="llmaudit")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m == "torch" or m.split(".")[0] in ("audits", "modules"))
print("PROBE " + json.dumps({"exit": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["roadmap"], ["progress"],
                                  ["quiz", "--day", "1", "--lang", "en"]], ids=" ".join)
def test_light_commands_do_not_import_torch_or_the_audits(args, tmp_path):
    env = dict(os.environ, LLMAUDIT_HOME=str(tmp_path / "home"), NO_COLOR="1")
    out = [] if args[0] == "quiz" else ["--out", str(tmp_path / "reports")]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args, *out], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE "))
    probe = json.loads(line[len("PROBE "):])
    assert probe["exit"] in (0, None), proc.stderr
    assert probe["heavy"] == [], f"{' '.join(args)} imported {probe['heavy']}"


def test_content_uses_libyaml_and_parses_each_file_once():
    if yaml.__with_libyaml__:
        assert load.LOADER is yaml.CSafeLoader
    load._read_yaml.cache_clear()
    load.load_content(strict=False)
    files = len(list((load.CONTENT / "cards").glob("*.yaml"))) + len(list((load.CONTENT / "quizzes").glob("*.yaml")))
    assert load._read_yaml.cache_info().misses == files
    load.load_content(strict=False)
    load.check_file(load.CONTENT / "quizzes" / "roadmap.yaml")
    assert load._read_yaml.cache_info().misses == files  # the second load and check_file read nothing


class Day(BaseModel):
    day: int


def test_an_edited_file_is_parsed_again(tmp_path):
    path = tmp_path / "day01.yaml"
    path.write_text("day: 1\n", encoding="utf-8")
    assert load.parse(path, Day).day == 1
    path.write_text("day: 22\n", encoding="utf-8")  # another size, so another stamp
    assert load.parse(path, Day).day == 22
    path.write_text("day: [22\n", encoding="utf-8")
    with pytest.raises(load.ContentError, match=r"day01.yaml:\d+: not valid YAML"):
        load.parse(path, Day)


def test_content_is_kept_between_processes_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path))
    parses = []
    real = load.load_content
    monkeypatch.setattr(load, "load_content", lambda *a, **kw: parses.append(1) or real(*a, **kw))
    load.content.cache_clear()
    first = load.content()
    assert len(parses) == 1 and len(list((tmp_path / "cache").glob("content-*.pickle"))) == 1

    load.content.cache_clear()  # a new process: nothing in memory
    again = load.content()
    assert len(parses) == 1 and again == first and again is not first

    import shutil

    shutil.copytree(load.CONTENT, tmp_path / "content")
    monkeypatch.setattr(load, "CONTENT", tmp_path / "content")  # a card edited: parsed again
    card = tmp_path / "content" / "cards" / "gae.yaml"
    card.write_text(card.read_text(encoding="utf-8").replace("GAE", "GAE (edited)", 1), encoding="utf-8")
    load.content.cache_clear()
    edited = load.content()
    assert len(parses) == 2 and edited != first
    assert len(list((tmp_path / "cache").glob("content-*.pickle"))) == 1  # the stale one is gone

    (next((tmp_path / "cache").glob("content-*.pickle"))).write_bytes(b"not a pickle")
    load.content.cache_clear()
    assert load.content() == edited and len(parses) == 3  # a corrupt cache is parsed over
    load.content.cache_clear()
