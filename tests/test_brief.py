"""Interview briefs: Markdown, HTML and PDF in both languages, the checks table from a run record, the
day and booklet selections, and the environment errors (no WeasyPrint, no CJK font)."""
from __future__ import annotations

import json
import logging
import re
import sys
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmaudit.cli import app
from llmaudit.learn.load import content
from llmaudit.runner import run_audit

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"})


def invoke(*args):
    return runner.invoke(app, ["brief", *map(str, args)])


def as_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def gae_record():
    return run_audit("gae", mode="toy")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, gae_record):
    """A reports folder holding one run record (gae, toy mode)."""
    folder = tmp_path_factory.mktemp("reports")
    gae_record.save(folder / "runs")
    return folder


def pdf_page_count(data: bytes) -> int:
    """Count /Type /Page objects, looking inside compressed object streams too."""
    chunks = [data]
    for m in re.finditer(rb"<<(.*?)>>\s*stream\r?\n", data, re.S):
        if b"/ObjStm" in m.group(1):
            length = int(re.search(rb"/Length (\d+)", m.group(1)).group(1))
            chunks.append(zlib.decompress(data[m.end():m.end() + length]))
    return sum(len(re.findall(rb"/Type\s*/Page(?![s\w])", c)) for c in chunks)


class GlyphLog(logging.Handler):
    """WeasyPrint logs one `.notdef glyph rendered ...` warning per character no font covers."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.missing: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if ".notdef" in message:
            self.missing.append(message)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_markdown_has_formulas_checks_and_plot_beside_it(reports, gae_record, lang):
    out = reports / f"gae-{lang}.md"
    data = as_json(invoke("gae", "--format", "md", "--lang", lang, "--reports", reports, "--out", out, "--json"))
    assert data["schema"] == "llmaudit.brief/v1" and data["modules"] == ["gae"] and data["audits"]["gae"]["passed"]
    md = out.read_text(encoding="utf-8")
    card = content().cards["gae"]
    assert card.title.get(lang) in md and card.must_explain.get(lang).split("—")[0][:20] in md
    for f in card.formulas:
        assert f"$$\n{f.tex.strip('$')}\n$$" in md
        assert f.label.get(lang) in md
    for c in gae_record.checks:
        assert f"| `{c.name}` |" in md
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 1 and (out.parent / images[0]).is_file()
    assert ("面试问答" in md) == (lang == "zh")


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_html_is_self_contained_with_checks_table_and_inline_formulas(reports, gae_record, lang):
    data = as_json(invoke("gae", "--lang", lang, "--reports", reports, "--json"))
    path = Path(data["path"])
    assert path == reports / "briefs" / f"gae-{lang}.html"  # the default path
    html = path.read_text(encoding="utf-8")
    assert f'<html lang="{"zh-CN" if lang == "zh" else "en"}">' in html
    assert '<table class="checks">' in html
    for c in gae_record.checks:
        assert c.name.replace("_", "_<wbr>") in html
    assert html.count('<svg') >= len(content().cards["gae"].formulas)
    assert html.count('src="data:image/png;base64,') == 1
    assert "http://" not in html.replace("http://www.w3.org", "")  # no network: only arXiv links (https)
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files behind


def test_every_font_stack_names_a_cjk_family(tmp_path):
    """Pango falls back only within the listed families: body, code and the page-margin boxes all need one."""
    assert invoke("gae", "--lang", "zh", "--out", tmp_path / "b.html", "--reports", tmp_path).exit_code == 0
    html = (tmp_path / "b.html").read_text(encoding="utf-8")
    css = html[html.index("<style>"):html.index("</style>")]
    stacks = re.findall(r"font-family:([^;]+);", css)
    assert len(stacks) >= 5
    for box in ("@top-left", "@top-right", "@bottom-right"):
        assert re.search(box + r" \{[^}]*font-family:", css), box
    for stack in stacks:
        assert "Noto Sans CJK SC" in stack and "WenQuanYi Micro Hei" in stack, stack


def test_without_a_run_record_the_brief_says_how_to_get_one(tmp_path):
    data = as_json(invoke("gae", "--lang", "en", "--reports", tmp_path, "--json"))
    html = Path(data["path"]).read_text(encoding="utf-8")
    assert data["audits"] == {"gae": None}
    assert '<table class="checks">' not in html and "llmaudit audit gae" in html


def test_pro_tips_carry_a_visible_tag(tmp_path):
    card = content().cards["attention"]
    assert any(q.source == "pro-tip" for q in card.qa)
    out = tmp_path / "attention.html"
    assert invoke("attention", "--lang", "zh", "--out", out, "--reports", tmp_path).exit_code == 0
    assert '<span class="tag pro">面试 Pro Tip</span>' in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_pdf_renders_every_glyph(reports, tmp_path, lang):
    glyphs = GlyphLog()
    logger = logging.getLogger("weasyprint")
    logger.addHandler(glyphs)
    try:
        out = tmp_path / f"gae-{lang}.pdf"
        data = as_json(invoke("gae", "--format", "pdf", "--lang", lang, "--reports", reports, "--out", out, "--json"))
    finally:
        logger.removeHandler(glyphs)
    assert glyphs.missing == [], glyphs.missing[:3]
    assert data["missing_glyphs"] == 0
    pdf = out.read_bytes()
    assert pdf.startswith(b"%PDF")
    assert pdf_page_count(pdf) == data["pages"] >= 1
    assert len(pdf) < 1_000_000  # fonts are subset, not embedded whole


def test_day_picks_the_modules_of_that_roadmap_day(tmp_path):
    days = {d.day: d.modules for d in content().roadmap.days}
    assert as_json(invoke("--day", 4, "-f", "md", "--reports", tmp_path, "--json"))["modules"] == days[4] == ["gae"]
    data = as_json(invoke("--day", 5, "-f", "md", "--lang", "en", "--reports", tmp_path, "--json"))
    assert data["modules"] == days[5] and len(days[5]) > 1
    md = Path(data["path"]).read_text(encoding="utf-8")
    assert Path(data["path"]).name == "day05-en.md"
    assert [f"m-{m}" for m in days[5]] == re.findall(r'<a id="(m-[a-z_]+)"></a>', md)


def test_booklet_has_a_cover_contents_and_every_card_once(reports):
    data = as_json(invoke("--all", "--lang", "zh", "--reports", reports, "--json"))
    html = Path(data["path"]).read_text(encoding="utf-8")
    c = content()
    assert sorted(data["modules"]) == sorted(c.cards)
    first_day = {}
    for d in c.roadmap.days:
        for m in d.modules:
            first_day.setdefault(m, d.day)
    days_in_order = [first_day[m] for m in data["modules"]]
    assert days_in_order == sorted(days_in_order)  # roadmap day order
    assert 'class="sheet cover"' in html and 'class="sheet toc"' in html
    articles = re.findall(r'<article class="sheet card" id="m-([a-z_]+)"', html)
    assert articles == data["modules"] and len(set(articles)) == len(articles)
    for m in c.cards:  # the contents links every card (reward_model under two days)
        assert f'href="#m-{m}"' in html
    assert html.count('<table class="checks">') == 1  # only gae has a run record here


def test_unknown_module_is_a_usage_error_with_suggestions(tmp_path):
    res = invoke("gea", "--reports", tmp_path)
    assert res.exit_code == 2
    assert "Did you mean: gae" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args", [(), ("gae", "--day", "4"), ("--day", "4", "--all"), ("--day", "99")])
def test_exactly_one_existing_target(tmp_path, args):
    assert invoke(*args, "--reports", tmp_path).exit_code == 2


def test_missing_cjk_font_is_an_environment_problem_for_chinese_pdf(tmp_path, monkeypatch):
    import llmaudit.cli.brief as cli_brief

    monkeypatch.setattr(cli_brief, "cjk_fonts", lambda: [])
    res = invoke("gae", "-f", "pdf", "--lang", "zh", "--reports", tmp_path)
    assert res.exit_code == 3
    assert "apt-get install -y fonts-wqy-microhei" in res.output
    assert not (tmp_path / "briefs" / "gae-zh.pdf").exists()
    assert invoke("gae", "-f", "html", "--lang", "zh", "--reports", tmp_path).exit_code == 0  # a browser's fonts
    assert invoke("gae", "-f", "pdf", "--lang", "en", "--reports", tmp_path).exit_code == 0  # no Chinese in it


def test_missing_weasyprint_is_an_environment_problem(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "weasyprint", None)  # makes `import weasyprint` raise ImportError
    res = invoke("gae", "-f", "pdf", "--lang", "en", "--reports", tmp_path, "--json")
    assert res.exit_code == 3
    doc = json.loads(res.stdout)
    assert doc["schema"] == "llmaudit.error/v1" and "pip install 'llmaudit[pdf]'" in doc["error"]


def test_help_shows_an_example():
    res = runner.invoke(app, ["brief", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
