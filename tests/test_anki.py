"""export anki: the package is a real Anki collection, note guids survive re-exports and text edits, day
filtering and tags, MathJax formulas, and the command's errors."""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from conftest import read_only_folder
from llmaudit.cli import app
from llmaudit.learn import anki
from llmaudit.learn.anki import (CHOICE_FIELDS, CHOICE_MODEL_ID, DECK_ID, RECALL_FIELDS, RECALL_MODEL_ID, build_notes,
                                 tex_to_mathjax, to_html, write_package)
from llmaudit.learn.load import Content, content
from llmaudit.learn.schema import Text

genanki = pytest.importorskip("genanki")

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1", "LC_ALL": "en_US.UTF-8"})
EXPORTED = ("recall", "choice", "code")  # quiz item types that become notes; numeric items do not


def export(*args) -> object:
    return runner.invoke(app, ["export", "anki", *[str(a) for a in args]])


def expected_ids(c: Content, day: int | None = None) -> set[str]:
    """The ids a package must hold, counted straight from the YAML content."""
    ids = {i.id for d in c.days.values() if day in (None, d.day) for i in d.items if i.type in EXPORTED}
    for card in c.cards.values():
        if day in (None, card.day):
            ids |= {qa.id for qa in card.qa}
            ids |= {f"{card.module}.formula.{n}" for n in range(1, len(card.formulas) + 1)}
    return ids


def collection(apkg: Path, tmp_path: Path) -> sqlite3.Connection:
    with zipfile.ZipFile(apkg) as z:
        assert z.testzip() is None
        assert {"collection.anki2", "media"} <= set(z.namelist())
        assert json.loads(z.read("media")) == {}
        z.extract("collection.anki2", tmp_path / apkg.stem)
    db = sqlite3.connect(tmp_path / apkg.stem / "collection.anki2")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return db


def notes(db: sqlite3.Connection) -> list[dict]:
    """Each note: guid, model id, fields, tags and its stable id (the last word of the Source field)."""
    rows = []
    for guid, mid, flds, tags in db.execute("SELECT guid, mid, flds, tags FROM notes"):
        fields = flds.split("\x1f")
        source = fields[-1]
        rows.append({"guid": guid, "mid": mid, "fields": fields, "tags": tags.split(),
                     "id": source.split(" · ")[3]})
    return rows


@pytest.fixture(scope="module")
def shipped() -> Content:
    return content()


# --- the package is a real Anki collection --------------------------------------------------------

def test_package_is_a_zip_with_a_valid_collection(tmp_path, shipped):
    res = export("--all", "--lang", "en", "-o", tmp_path / "deck.apkg")
    assert res.exit_code == 0, res.output
    db = collection(tmp_path / "deck.apkg", tmp_path)
    rows = notes(db)
    want = expected_ids(shipped)
    assert len(rows) == len(want) == len({r["id"] for r in rows})
    assert {r["id"] for r in rows} == want
    assert f"{len(want)} notes" in res.stdout
    # one card per note, each in its day's deck
    cards = db.execute("SELECT nid, did, ord FROM cards").fetchall()
    assert len(cards) == len(rows) and {o for _, _, o in cards} == {0}
    assert len({nid for nid, _, _ in cards}) == len(rows)
    # Anki updates a note on import only if the incoming one is newer: notes carry the export time
    mods = [mod for (mod,) in db.execute("SELECT mod FROM notes")]
    assert all(abs(mod - time.time()) < 300 for mod in mods)
    tags_of = {nid: tags.split() for nid, tags in db.execute("SELECT id, tags FROM notes")}
    for nid, did, _ in cards:
        day = next(int(t[3:]) for t in tags_of[nid] if t.startswith("day"))
        assert did == DECK_ID + day
    # the note types and decks are in the collection, under their constant ids
    models = json.loads(db.execute("SELECT models FROM col").fetchone()[0])
    assert [f["name"] for f in models[str(RECALL_MODEL_ID)]["flds"]] == list(RECALL_FIELDS)
    assert [f["name"] for f in models[str(CHOICE_MODEL_ID)]["flds"]] == list(CHOICE_FIELDS)
    decks = json.loads(db.execute("SELECT decks FROM col").fetchone()[0])
    for day in sorted(shipped.days):
        assert decks[str(DECK_ID + day)]["name"] == f"llmaudit::day{day:02d}"
    for r in rows:
        assert r["mid"] in (RECALL_MODEL_ID, CHOICE_MODEL_ID)
        assert len(r["fields"]) == len(CHOICE_FIELDS if r["mid"] == CHOICE_MODEL_ID else RECALL_FIELDS)


def test_numeric_items_are_left_out_and_code_items_are_recall(tmp_path, shipped):
    assert export("--lang", "en", "-o", tmp_path / "deck.apkg").exit_code == 0  # no --day: every day
    rows = {r["id"]: r for r in notes(collection(tmp_path / "deck.apkg", tmp_path))}
    items = list(shipped.items())
    numeric = [i.id for i in items if i.type == "numeric"]
    assert numeric and not set(numeric) & set(rows)
    code = next(i for i in items if i.type == "code" and i.kernel == "compute_gae")
    note = rows[code.id]
    assert note["mid"] == RECALL_MODEL_ID and "code" in note["tags"]
    assert "llmaudit practice compute_gae" in note["fields"][-1]


def test_choice_note_asks_on_the_front_and_answers_on_the_back(tmp_path, shipped):
    assert export("--day", 4, "--lang", "en", "-o", tmp_path / "d4.apkg").exit_code == 0
    db = collection(tmp_path / "d4.apkg", tmp_path)
    item = next(i for i in shipped.days[4].items if i.id == "d04.gae.perfect-critic")
    question, options, answer, explanation, _ = next(r for r in notes(db) if r["id"] == item.id)["fields"]
    assert question == to_html(item.q.en)
    assert options.count("<li>") == len(item.choices)
    for choice in item.choices:
        assert f"<li>{to_html(choice.en)}</li>" in options
    assert answer == f"{'ABCD'[item.answer]}. {to_html(item.choices[item.answer].en)}"
    assert explanation == to_html(item.a.en)
    models = json.loads(db.execute("SELECT models FROM col").fetchone()[0])
    front = models[str(CHOICE_MODEL_ID)]["tmpls"][0]["qfmt"]
    assert "{{Question}}" in front and "{{Options}}" in front
    assert "{{Answer}}" not in front and "{{Explanation}}" not in front


# --- stable ids -----------------------------------------------------------------------------------

def test_reexport_gives_the_same_guids(tmp_path, shipped):
    for name in ("a", "b"):
        assert export("--lang", "en", "-o", tmp_path / f"{name}.apkg").exit_code == 0
    a = {r["guid"]: r["id"] for r in notes(collection(tmp_path / "a.apkg", tmp_path))}
    b = {r["guid"]: r["id"] for r in notes(collection(tmp_path / "b.apkg", tmp_path))}
    assert a == b and len(a) == len(expected_ids(shipped))
    for guid, item_id in a.items():  # a hash of the stable id, nothing else
        assert guid == genanki.guid_for("llmaudit", item_id)


def test_guid_does_not_depend_on_the_language(tmp_path):
    for lang in ("zh", "en", "both"):
        assert export("--day", 7, "--lang", lang, "-o", tmp_path / f"{lang}.apkg").exit_code == 0
    by_lang = [{r["id"]: r["guid"] for r in notes(collection(tmp_path / f"{lang}.apkg", tmp_path))}
               for lang in ("zh", "en", "both")]
    assert by_lang[0] == by_lang[1] == by_lang[2]


def test_changed_item_text_keeps_its_guid(tmp_path, shipped):
    item = next(i for i in shipped.days[7].items if i.type == "recall")
    card = shipped.cards["ppo"]
    edited_item = item.model_copy(update={"q": Text(zh=item.q.zh + "（改）", en="Reworded: " + item.q.en)})
    edited_card = card.model_copy(update={"formulas": [card.formulas[0].model_copy(update={"tex": "$r=e^{x}$"}),
                                                       *card.formulas[1:]]})
    day7 = shipped.days[7].model_copy(update={"items": [edited_item if i.id == item.id else i
                                                        for i in shipped.days[7].items]})
    edited = Content(shipped.roadmap, {**shipped.cards, "ppo": edited_card}, {**shipped.days, 7: day7})

    before = write_package(build_notes(shipped, day=7, lang="en"), tmp_path / "before.apkg")
    after = write_package(build_notes(edited, day=7, lang="en"), tmp_path / "after.apkg")
    old = {r["id"]: r for r in notes(collection(before, tmp_path))}
    new = {r["id"]: r for r in notes(collection(after, tmp_path))}
    assert old.keys() == new.keys()
    for item_id in (item.id, "ppo.formula.1"):
        assert new[item_id]["guid"] == old[item_id]["guid"]
        assert new[item_id]["fields"][:2] != old[item_id]["fields"][:2]
    assert new[item.id]["fields"][0].startswith("Reworded: ")
    assert new["ppo.formula.1"]["fields"][1] == r"\[r=e^{x}\]"


# --- days, tags, languages ------------------------------------------------------------------------

def test_day_filter_and_tags(tmp_path, shipped):
    res = export("--day", 7, "--lang", "en", "-o", tmp_path / "d7.apkg")
    assert res.exit_code == 0, res.output
    db = collection(tmp_path / "d7.apkg", tmp_path)
    rows = notes(db)
    assert {r["id"] for r in rows} == expected_ids(shipped, day=7)
    modules = {i.module for i in shipped.days[7].items} | {m for m, c in shipped.cards.items() if c.day == 7}
    kinds = {"recall", "choice", "code", "qa", "formula"}
    for r in rows:
        day_tags = [t for t in r["tags"] if t.startswith("day")]
        assert day_tags == ["day07"], r["tags"]
        assert len(set(r["tags"]) & modules) == 1 and len(set(r["tags"]) & kinds) == 1, r["tags"]
    assert {did for (did,) in db.execute("SELECT DISTINCT did FROM cards")} == {DECK_ID + 7}
    clip = next(r for r in rows if r["id"] == "d07.ppo.clip-stability")
    assert set(clip["tags"]) == {"day07", "ppo", "recall"}
    assert {r["id"] for r in rows if "formula" in r["tags"] and "ppo" in r["tags"]} == \
        {f"ppo.formula.{n}" for n in range(1, len(shipped.cards["ppo"].formulas) + 1)}


def test_lang_picks_one_language_or_both(tmp_path, shipped):
    item = shipped.days[1].items[0]
    got = {}
    for lang in ("zh", "en", "both"):
        assert export("--day", 1, "--lang", lang, "-o", tmp_path / f"{lang}.apkg").exit_code == 0
        got[lang] = next(r for r in notes(collection(tmp_path / f"{lang}.apkg", tmp_path)) if r["id"] == item.id)
    assert got["zh"]["fields"][0] == to_html(item.q.zh)
    assert got["en"]["fields"][0] == to_html(item.q.en)
    assert to_html(item.q.zh) in got["both"]["fields"][0] and to_html(item.q.en) in got["both"]["fields"][0]


def test_default_language_follows_the_locale_like_quiz(tmp_path, shipped):
    item = shipped.days[1].items[0]
    res = CliRunner(env={"LC_ALL": "zh_CN.UTF-8", "NO_COLOR": "1"}).invoke(
        app, ["export", "anki", "--day", "1", "-o", str(tmp_path / "d1.apkg")])
    assert res.exit_code == 0, res.output
    row = next(r for r in notes(collection(tmp_path / "d1.apkg", tmp_path)) if r["id"] == item.id)
    assert row["fields"][0] == to_html(item.q.zh)


def test_json_summary(tmp_path, shipped):
    res = export("--day", 4, "--lang", "zh", "--json", "-o", tmp_path / "d4.apkg")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["schema"] == "llmaudit.export-anki/v1" and data["ok"] and data["lang"] == "zh"
    assert data["notes"] == len(expected_ids(shipped, day=4)) == sum(data["kinds"].values())
    assert data["skipped_numeric"] == sum(i.type == "numeric" for i in shipped.days[4].items)


# --- MathJax and HTML -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, display, want", [
    (r"$\hat A_t=\delta_t$", True, r"\[\hat A_t=\delta_t\]"),  # a whole card formula: display math
    (r"$\hat A_t=\delta_t$", False, r"\(\hat A_t=\delta_t\)"),
    (r"with $x^2$ and $y$ inline", True, r"with \(x^2\) and \(y\) inline"),  # mixed text stays inline
    (r"$$\sum_i x_i$$ then $z$", False, r"\[\sum_i x_i\] then \(z\)"),
    (r"costs \$5, a lone $ stays", False, r"costs $5, a lone $ stays"),
    ("no math at all", True, "no math at all"),
])
def test_dollars_become_mathjax_delimiters(text, display, want):
    assert tex_to_mathjax(text, display) == want


def test_html_is_escaped_inside_and_outside_math():
    assert to_html("Â < 0 & r > 1\nnext") == "Â &lt; 0 &amp; r &gt; 1<br>next"
    assert to_html(r"$a<b$", display=True) == r"\[a&lt;b\]"


def test_every_card_formula_is_display_mathjax_and_no_dollar_is_left(tmp_path, shipped):
    notes_ = build_notes(shipped, lang="both")
    formulas = [n for n in notes_ if n.kind == "formula"]
    assert len(formulas) == sum(len(c.formulas) for c in shipped.cards.values())
    for n in formulas:
        answer = n.fields[1]
        assert answer.startswith(r"\[") and answer.endswith(r"\]") and "$" not in answer, n.id
    with warnings.catch_warnings():  # genanki warns about text that looks like a broken HTML tag
        warnings.simplefilter("error")
        write_package(notes_, tmp_path / "all.apkg")


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--day", "0"], "--day must be one of 1..16"),
    (["--day", "17"], "--day must be one of 1..16"),
    (["--day", "3", "--all"], "either --day N or --all"),
    (["--lang", "fr"], "--lang must be zh, en or both"),
])
def test_bad_arguments_exit_2(tmp_path, args, words):
    res = export(*args, "-o", tmp_path / "deck.apkg")
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output
    assert not (tmp_path / "deck.apkg").exists()


def test_bad_output_paths(tmp_path):
    res = export("-o", tmp_path / "deck.txt")
    assert res.exit_code == 2 and "ending in .apkg" in res.output
    (tmp_path / "folder.apkg").mkdir()
    res = export("-o", tmp_path / "folder.apkg")
    assert res.exit_code == 2 and "is a folder" in res.output
    assert export().exit_code == 2  # -o is required
    (tmp_path / "plainfile").write_text("x")
    res = export("-o", tmp_path / "plainfile" / "deck.apkg")  # a folder that cannot exist
    assert res.exit_code == 3, res.output
    assert "cannot write the Anki package" in res.output and "Traceback" not in res.output


def test_missing_output_folders_are_created(tmp_path):
    res = export("--day", 2, "-o", tmp_path / "a" / "b" / "deck.apkg")
    assert res.exit_code == 0, res.output
    assert zipfile.is_zipfile(tmp_path / "a" / "b" / "deck.apkg")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["deck.apkg"]  # no temporary files left


def test_read_only_output_folder_exits_3(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        res = export("--day", 1, "-o", ro / "deck.apkg")
        assert res.exit_code == 3 and "cannot write the Anki package" in res.output
        assert not any(ro.iterdir())  # no half-written package or temporary file left


def test_missing_genanki_exits_3_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "genanki", None)  # makes `import genanki` raise ImportError
    res = export("--day", 1, "-o", tmp_path / "deck.apkg")
    assert res.exit_code == 3, res.output
    assert "genanki" in res.output and "pip install 'llmaudit[anki]'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "deck.apkg").exists()


def test_export_does_not_need_torch(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from llmaudit.cli import main\n"
            f"sys.argv = ['llmaudit', 'export', 'anki', '--day', '5', '-o', {str(tmp_path / 'd5.apkg')!r}]\n"
            "main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert zipfile.is_zipfile(tmp_path / "d5.apkg")


# --- the real Anki importer (an oracle: the test extra installs Anki's own `anki` package) ----------------

def test_real_anki_imports_and_a_newer_export_updates_in_place(tmp_path, shipped):
    pytest.importorskip("anki")
    from anki.collection import Collection, ImportAnkiPackageOptions, ImportAnkiPackageRequest

    item = next(i for i in shipped.days[7].items if i.type == "choice")
    day7 = shipped.days[7].model_copy(update={"items": [
        i.model_copy(update={"a": Text(zh="新解释", en="A new explanation.")}) if i.id == item.id else i
        for i in shipped.days[7].items]})
    edited = Content(shipped.roadmap, shipped.cards, {**shipped.days, 7: day7})
    now = time.time()
    with mock.patch.object(anki.time, "time", lambda: now - 3600):  # an export made an hour ago
        first = write_package(build_notes(shipped, day=7, lang="en"), tmp_path / "first.apkg")
    second = write_package(build_notes(edited, day=7, lang="en"), tmp_path / "second.apkg")

    (tmp_path / "anki").mkdir()
    col = Collection(str(tmp_path / "anki" / "collection.anki2"))
    try:
        def load(path):
            col.import_anki_package(ImportAnkiPackageRequest(package_path=str(path), options=ImportAnkiPackageOptions()))

        load(first)
        n = len(expected_ids(shipped, day=7))
        assert col.note_count() == n and col.card_count() == n
        (nid,) = col.find_notes(f'"Source:*{item.id}"')
        (cid,) = col.card_ids_of_note(nid)
        card = col.get_card(cid)
        card.start_timer()
        col.sched.answerCard(card, 3)  # review it once: the history must survive the update
        load(second)
        assert col.note_count() == n  # updated in place, not duplicated
        assert col.get_note(nid)["Explanation"] == "A new explanation."
        assert col.card_ids_of_note(nid) == [cid] and col.get_card(cid).reps == 1
        assert set(col.tags.all()) == {t for note in build_notes(shipped, day=7) for t in note.tags}
    finally:
        col.close()


def test_readme_states_the_number_of_notes(shipped):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"(\d+) notes for all 16 days", readme)
    assert stated, "the README's Anki section says how many notes a full export has"
    assert int(stated.group(1)) == len(build_notes(shipped)) == len(expected_ids(shipped))
