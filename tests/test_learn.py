"""The learning layer: shipped content, schema errors, numeric answers, quiz sessions, progress store."""
from __future__ import annotations

import builtins
import json
import random
import sqlite3
from datetime import date, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmaudit.cli import app
from llmaudit.learn.load import CONTENT, ContentError, check_file, content, load_content, parse
from llmaudit.learn.numeric import GENERATORS, NotBuilt, make
from llmaudit.learn.quiz import Session
from llmaudit.learn.schema import QuizDay
from llmaudit.learn.store import Store

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMAUDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def quiz(*args: str, input: str = ""):
    return runner.invoke(app, ["quiz", *args], input=input)


# --- content -------------------------------------------------------------------------------------

def test_shipped_content_is_valid_and_complete():
    c = load_content()
    assert [d.day for d in c.roadmap.days] == list(range(1, 17))
    assert c.roadmap.days[0].must_explain.zh == "MDP五元组 (S, A, R, P, γ) 的物理含义"
    assert c.roadmap.days[14].bonus and c.roadmap.days[15].bonus
    for day in range(1, 17):
        assert len(c.days[day].items) >= 15, day
    for module in ("mdp", "td", "advantage", "gae", "sft", "dpo", "ppo", "grpo", "rlhf", "cql", "bcq", "lora",
                   "qlora", "qformer", "flamingo", "megatron", "inference", "agent", "tokenizer", "transformer",
                   "attention", "reward_model", "rlvf", "vlm_projection", "policy_gradient", "actor_critic"):
        assert module in c.cards, module
    types = {i.type for i in c.items()}
    assert types == {"recall", "choice", "numeric", "code"}


def test_every_content_file_passes_the_author_check():
    files = sorted((CONTENT / "cards").glob("*.yaml")) + sorted((CONTENT / "quizzes").glob("*.yaml"))
    problems = [p for f in files for p in check_file(f)]
    assert problems == []


def test_schema_errors_name_file_line_id_and_field(tmp_path):
    bad = tmp_path / "quizzes" / "day01.yaml"
    bad.parent.mkdir()
    bad.write_text("day: 1\nitems:\n  - id: d01.x\n    type: recall\n    module: mdp\n"
                   "    q: {zh: 问题, en: ''}\n    a: {zh: 答, en: a}\n    keypoints: [{zh: 点, en: p}]\n")
    with pytest.raises(ContentError) as info:
        parse(bad, QuizDay)
    assert f"{bad}:6: [d01.x] items.0.q.en" in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "day02.yaml"
    bad.write_text("day: 2\nitems:\n  - id: [unclosed\n")
    with pytest.raises(ContentError, match=r"day02.yaml:\d+: not valid YAML"):
        parse(bad, QuizDay)


def test_cross_file_checks_catch_unknown_modules(tmp_path):
    import shutil

    shutil.copytree(CONTENT / "cards", tmp_path / "cards")
    shutil.copytree(CONTENT / "quizzes", tmp_path / "quizzes")
    (tmp_path / "cards" / "gae.yaml").unlink()
    with pytest.raises(ContentError, match="no card for module 'gae'"):
        load_content(tmp_path)


# --- numeric items: the module's code gives the textbook answer -----------------------------------

ORACLES = {
    "mdp.optimality_backup": lambda p: max(p["r0"] + p["gamma"] * p["v1"], p["r1"] + p["gamma"] * p["v2"]),
    "mdp.self_loop_value": lambda p: p["r"] / (1 - p["gamma"]),
    "td.q_learning_update": lambda p: p["q"] + p["alpha"] * (p["r"] + p["gamma"] * max(p["q_next"]) - p["q"]),
    "td.sarsa_target": lambda p: p["r"] + p["gamma"] * p["q_next"][int(p["a_next"])],
    "td.expected_sarsa_target": lambda p: p["r"] + p["gamma"] * sum(
        q * (p["epsilon"] / 2 + (1 - p["epsilon"]) * (i == p["q_next"].index(max(p["q_next"]))))
        for i, q in enumerate(p["q_next"])),
    "advantage.discounted_return": lambda p: sum(r * p["gamma"] ** t for t, r in enumerate(p["rewards"])),
    "advantage.from_q": lambda p: p["q"][0] - sum(a * b for a, b in zip(p["q"], p["pi"])),
    "gae.first_advantage": lambda p: sum(
        (p["gamma"] * p["lam"]) ** t * (p["rewards"][t] + p["gamma"] * (p["values"][t + 1] if t < 2 else 0.0) - p["values"][t])
        for t in range(3)),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_numeric_answers_equal_the_textbook_formula(name):
    for seed in range(25):
        problem = make(name, random.Random(seed))
        params = {k: json.loads(v) for k, v in problem.params.items()}
        if name == "td.expected_sarsa_target" and params["q_next"][0] == params["q_next"][1]:
            continue  # a tie splits the greedy mass; the oracle above assumes one argmax
        assert problem.answer == pytest.approx(ORACLES[name](params), abs=1e-9), (name, params)


def test_generators_of_unbuilt_modules_say_so():
    for name in GENERATORS:
        try:
            make(name, random.Random(0))
        except NotBuilt as exc:
            assert "not built yet" in str(exc)


def test_numeric_item_graded_against_the_live_answer(home):
    c = content()
    item = next(i for i in c.items() if i.type == "numeric" and i.numeric.generator == "gae.first_advantage")
    expected = make("gae.first_advantage", random.Random(7)).answer
    for given, ok in ((f"{expected:.6f}", True), (f"{expected + 1:.6f}", False)):
        store = Store(home / f"{ok}.sqlite3")
        shown: list[str] = []
        s = Session(c, store, lang="en", show=shown.append, ask=lambda prompt, g=given: g, seed=7)
        summary = s.run([item])
        assert summary.answered[0].correct is ok
        assert summary.answered[0].rating.name == ("Good" if ok else "Again")
        store.close()


def test_a_choice_takes_the_option_number_as_well_as_its_letter(home):
    """The rating prompt just before asks for digits 1-4, so "2" for B is a natural answer: it counts."""
    c = content()
    item = next(i for i in c.items() if i.type == "choice" and len(i.choices) == 4)
    for answer in ("B", "b", "2"):
        shown: list[str] = []
        store = Store(home / f"choice-{answer}.sqlite3")
        Session(c, store, lang="en", show=shown.append, ask=lambda prompt, a=answer: a, seed=3, cram=True).run([item])
        assert not any("type one of" in line for line in shown), shown
        assert store.n_reviews() == 1
        store.close()
    shown = []
    store = Store(home / "choice-5.sqlite3")
    answers = iter(["5", "B"])
    Session(c, store, lang="en", show=shown.append, ask=lambda prompt: next(answers), seed=3, cram=True).run([item])
    assert any("type one of A, B, C, D" in line for line in shown)  # 5 of 4 options is refused
    store.close()


# --- sessions through the CLI ---------------------------------------------------------------------

def test_scripted_session_records_answers_and_resumes(home):
    first = quiz("--day", "1", "-n", "2", "--lang", "en", "--seed", "0", "--json", input="\n4\n\n4\n")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["schema"] == "llmaudit.quiz/v1" and data["answered"] == 2
    asked = [i["id"] for i in data["items"]]
    assert all(i["rating"] == "Easy" for i in data["items"])
    db = sqlite3.connect(home / "progress.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 2
    assert db.execute("SELECT COUNT(*) FROM cards").fetchone()[0] == 2
    # Easy on a new card: review state, due in days -> the next session moves on to new items
    second = quiz("--day", "1", "-n", "1", "--lang", "en", "--seed", "0", "--json", input="A\n\n4\n")
    data2 = json.loads(second.stdout)
    assert data2["answered"] == 1 and data2["items"][0]["id"] not in asked


def test_eof_ends_the_session_cleanly_and_keeps_answers(home):
    res = quiz("--day", "1", "-n", "3", "--lang", "zh", "--seed", "0", input="\n3\n")
    assert res.exit_code == 0, res.output
    assert "stopped (eof), answers saved" in res.stdout
    assert Store(home / "progress.sqlite3").n_reviews() == 1


def test_ctrl_c_mid_session_keeps_what_was_answered(home, monkeypatch):
    answers = iter(["", "4"])

    def fake_input(*_):
        try:
            return next(answers)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(builtins, "input", fake_input)
    res = quiz("--day", "1", "-n", "3", "--lang", "en", "--seed", "0")
    assert res.exit_code == 130
    assert Store(home / "progress.sqlite3").n_reviews() == 1


def test_cram_does_not_reschedule(home):
    res = quiz("--day", "1", "-n", "1", "--lang", "en", "--cram", "--json", input="\n1\n")
    assert json.loads(res.stdout)["answered"] == 1
    db = sqlite3.connect(home / "progress.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM cards").fetchone()[0] == 0
    assert db.execute("SELECT cram FROM reviews").fetchone()[0] == 1


def test_interview_date_caps_intervals(home):
    soon = (date.today() + timedelta(days=3)).isoformat()
    res = quiz("--day", "1", "-n", "1", "--lang", "en", "--interview-date", soon, "--json", input="\n4\n")
    due = json.loads(res.stdout)["items"][0]["next_due"]
    from datetime import datetime, timezone

    assert datetime.fromisoformat(due) - datetime.now(timezone.utc) <= timedelta(days=3, minutes=1)
    res = quiz("--interview-date", "next week")
    assert res.exit_code == 2 and "YYYY-MM-DD" in res.stderr


def test_corrupt_database_is_reported_and_left_alone(home):
    home.mkdir(parents=True)
    db = home / "progress.sqlite3"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    res = quiz("--day", "1", input="\n")
    assert res.exit_code == 3 and str(db) in res.stderr and "untouched" in res.stderr
    assert db.read_bytes() == before


def test_foreign_sqlite_database_is_refused(home):
    home.mkdir(parents=True)
    con = sqlite3.connect(home / "progress.sqlite3")
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    res = runner.invoke(app, ["progress"])
    assert res.exit_code == 3 and "not an llmaudit progress database" in res.stderr


def test_unknown_module_and_bad_lang(home):
    res = quiz("-m", "gea")
    assert res.exit_code == 2 and "Did you mean: gae" in res.stderr
    res = quiz("--lang", "fr")
    assert res.exit_code == 2


def test_language_comes_from_the_locale(home, monkeypatch):
    from llmaudit.cli.learn import resolve_lang

    monkeypatch.setenv("LC_ALL", "zh_CN.UTF-8")
    assert resolve_lang(None) == "zh"
    monkeypatch.setenv("LC_ALL", "en_US.UTF-8")
    assert resolve_lang(None) == "en"


def test_progress_and_roadmap_json(home, tmp_path):
    quiz("--day", "1", "-n", "2", "--lang", "en", "--json", input="\n4\n\n4\n")
    res = runner.invoke(app, ["progress", "--json", "--out", str(tmp_path / "reports")])
    data = json.loads(res.stdout)
    assert data["reviews"] == 2 and data["streak"] == 1 and data["days"][0]["seen"] == 2
    page = Path(data["page"]).read_text()  # one study day: mastery bars, and a sentence instead of reviews per day
    assert page.count("data:image/png;base64,") == 1 and "two different days" in page
    res = runner.invoke(app, ["roadmap", "--json", "--lang", "zh", "--out", str(tmp_path / "reports")])
    days = json.loads(res.stdout)["days"]
    assert len(days) == 16 and days[3]["must_explain"].startswith("GAE")
    # every module of the roadmap ships in this release (none "planned"), and this reports folder holds no run
    assert {m["status"] for d in days for m in d["modules"]} == {"not run"}


def test_roadmap_marks_a_module_without_code_planned(home, tmp_path, monkeypatch):
    import llmaudit.catalog as catalog
    shipped = catalog.modules()
    monkeypatch.setattr(catalog, "modules", lambda: tuple(m for m in shipped if m.name != "cql"))
    res = runner.invoke(app, ["roadmap", "--json", "--out", str(tmp_path / "reports")])
    status = {m["module"]: m["status"] for d in json.loads(res.stdout)["days"] for m in d["modules"]}
    assert status["cql"] == "planned" and status["bcq"] == "not run"


def test_review_with_nothing_due(home):
    res = runner.invoke(app, ["review", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["answered"] == 0
