"""Interview briefs: a page or two per module from its card and its latest run record.

One context feeds three renderers: Markdown (GitHub-renderable, ``$$...$$`` formulas, plot PNGs in an
``assets/`` folder beside it), self-contained HTML (inline SVG formulas, base64 PNG plot, print CSS) and
PDF (WeasyPrint, from that same HTML). The caller (``llmaudit brief``) checks the environment: WeasyPrint
for PDF, a CJK font whenever the page holds Chinese.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from llmaudit import __version__
from llmaudit.learn.load import Content
from llmaudit.learn.schema import Card, RoadmapDay
from llmaudit.record import RunRecord, atomic_write
from llmaudit.registry import UnknownName

FORMATS = ("md", "html", "pdf")
LANGS = ("zh", "en")

# Every stack that can meet Chinese names CJK families, code and page-margin boxes included: fallback
# outside the listed families depends on the machine's fontconfig setup (ux-anchors §5.2).
CJK_STACK = ('"Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", '
             '"PingFang SC", "Microsoft YaHei"')
SANS = f'"Noto Sans", "Helvetica Neue", Arial, "Liberation Sans", {CJK_STACK}, sans-serif'
MONO = ('"DejaVu Sans Mono", "Liberation Mono", "Noto Sans Mono CJK SC", "WenQuanYi Micro Hei Mono", '
        f'{CJK_STACK}, monospace')

CJK_CHAR = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")

LABELS = {
    "zh": {
        "brief": "面试速查", "booklet": "LLM / RLHF 面试速查手册", "toc": "目录", "day": "第 {n} 天", "bonus": "加餐",
        "subtitle": "公式 · 必须说清楚 · 要点 · 面试问答 · 易错点 · 审计结果",
        "cover_meta": "{days} 天 · {modules} 个模块 · {audited} 个有审计结果（{passed} 个全部通过）",
        "generated": "生成于 {date} · llmaudit {version}", "goal": "目标", "colon": "：",
        "must": "必须说清楚", "formulas": "核心公式", "points": "要点", "qa": "面试问答", "pitfalls": "易错点",
        "followups": "可能的追问", "kernels": "手撕", "refs": "参考", "pro-tip": "面试 Pro Tip", "metric-guide": "指标解读",
        "planned": "规划中：本版本尚无代码", "no_run": "尚无审计记录：运行",
        "audit": "最新审计结果", "checks_pass": "{k}/{n} 项通过", "mode": "模式", "seeds": "种子", "check": "检查项",
        "measured": "实测", "expected": "期望", "result": "结果", "pass": "通过", "fail": "未通过", "plot_note": "关键曲线",
    },
    "en": {
        "brief": "Interview brief", "booklet": "LLM / RLHF interview brief", "toc": "Contents", "day": "Day {n}",
        "bonus": "bonus", "subtitle": "formulas · must-explain · key points · Q&A · pitfalls · audit results",
        "cover_meta": "{days} days · {modules} modules · {audited} with an audit result ({passed} all passing)",
        "generated": "generated {date} · llmaudit {version}", "goal": "Goal", "colon": ": ",
        "must": "Must explain", "formulas": "Key formulas", "points": "Key points", "qa": "Interview Q&A",
        "pitfalls": "Pitfalls", "followups": "Follow-ups", "kernels": "Hand-write", "refs": "References",
        "pro-tip": "Pro tip", "metric-guide": "metric guide",
        "planned": "Planned: no code in this release yet", "no_run": "No run record yet: run",
        "audit": "Latest audit", "checks_pass": "{k}/{n} checks pass", "mode": "mode", "seeds": "seeds", "check": "check",
        "measured": "measured", "expected": "expected", "result": "result", "pass": "pass", "fail": "fail",
        "plot_note": "key curve",
    },
}
assert LABELS["zh"].keys() == LABELS["en"].keys()


class BriefError(ValueError):
    """A selection that names nothing (a day outside the roadmap)."""


@dataclass
class Selection:
    """What one brief covers: its file key (``gae``, ``day04``, ``all``), the cards in order, the days."""

    key: str
    cards: list[Card]
    days: list[RoadmapDay]
    kind: str  # "module" | "day" | "all"


def select(content: Content, module: str | None = None, day: int | None = None) -> Selection:
    """One module, one roadmap day's modules, or (neither given) every card in roadmap day order.

    A module named by two days (reward_model) appears once, under its first day.
    """
    by_day = {d.day: d for d in content.roadmap.days}
    if module is not None:
        if module not in content.cards:
            raise UnknownName("module", module, sorted(content.cards))
        card = content.cards[module]
        return Selection(module, [card], [by_day[card.day]] if card.day in by_day else [], "module")
    if day is not None:
        if day not in by_day:
            raise BriefError(f"day {day} is not in the roadmap (days {min(by_day)}-{max(by_day)})")
        return Selection(f"day{day:02d}", [content.cards[m] for m in by_day[day].modules], [by_day[day]], "day")
    seen: dict[str, Card] = {}
    for d in content.roadmap.days:
        for m in d.modules:
            seen.setdefault(m, content.cards[m])
    for m in sorted(content.cards, key=lambda m: (content.cards[m].day, m)):  # cards that no roadmap day names, if any
        seen.setdefault(m, content.cards[m])
    return Selection("all", list(seen.values()), list(content.roadmap.days), "all")


def default_path(reports: Path, selection: Selection, lang: str, fmt: str) -> Path:
    return Path(reports) / "briefs" / f"{selection.key}-{lang}.{fmt}"


def has_cjk(text: str) -> bool:
    return CJK_CHAR.search(text) is not None


# ---------------------------------------------------------------------------------------------- context

def _formula_markup(tex: str, prefix: str, scale: float = 0.82) -> str:
    """Inline SVG of a formula, scaled to sit beside ~9.5 pt text, on a transparent background, with
    its ids prefixed (every mathtext SVG defines the same glyph ids, and ids must be unique in a page)."""
    from llmaudit.report.formulas import formula_svg

    svg = formula_svg(tex)
    svg = re.sub(r'<g id="patch_1">.*?</g>', "", svg, count=1, flags=re.S)  # the figure's white rectangle
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)

    def scaled(m: re.Match) -> str:
        return f'{m.group(1)}="{float(m.group(2)) * scale:.2f}pt"'

    head, rest = svg.split(">", 1)
    head = re.sub(r'\b(width|height)="([\d.]+)pt"', scaled, head)
    return f'{head} class="math" role="img" aria-label="{_attr(tex)}">{rest}'


def _svg_width_pt(svg: str) -> float:
    m = re.search(r'width="([\d.]+)pt"', svg)
    return float(m.group(1)) if m else float("inf")


def _formula_rows(formulas: list[dict[str, Any]], narrow_pt: float = 235.0) -> list[list[dict[str, Any]]]:
    """Pair consecutive short formulas two to a row (in order); a long one gets a row to itself."""
    rows: list[list[dict[str, Any]]] = []
    for f in formulas:
        short = _svg_width_pt(f["svg"]) <= narrow_pt
        if short and rows and len(rows[-1]) == 1 and rows[-1][0]["short"]:
            rows[-1].append(f)
        else:
            rows.append([f])
        f["short"] = short
    return rows


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def key_plot(record: RunRecord) -> tuple[str, bytes] | None:
    """The one curve a brief shows, over every seed: the plot holding the series the audit marked as
    its key curve (``key=True``), else a closed-loop learning curve (``charts/...``), else the first."""
    from llmaudit.report.plots import group_runs, plot_png, plot_title

    if not record.results or not record.results[0].series:
        return None
    groups = group_runs(record.results)
    marked = [k for k, runs in groups.items() if any(s.key for s in runs[0][1])]
    key = (marked or [k for k in groups if k.startswith("charts/")] or list(groups))[0]
    return plot_title(key, groups[key][0][1]), plot_png(key, groups[key], dpi=150)


def audit_summary(record: RunRecord) -> dict[str, Any]:
    plot = key_plot(record)
    return {
        "passed": record.passed, "n_passed": record.n_passed, "n": len(record.checks), "mode": record.mode,
        "seeds": record.seeds, "created": record.created[:10] or "undated",
        "overrides": [f"{k}={v}" for k, v in record.overrides.items()],
        "user_kernels": [f"{k} ({v})" for k, v in record.kernels.items() if v != "reference"],
        "checks": [{"name": c.name, "measured": c.measured_text, "expected": c.expected, "passed": c.passed}
                   for c in record.checks],
        "plot": None if plot is None else {"title": plot[0], "png": plot[1],
                                           "data_uri": "data:image/png;base64," + base64.b64encode(plot[1]).decode()},
    }


def _card_context(card: Card, lang: str, day: RoadmapDay | None, record: RunRecord | None) -> dict[str, Any]:
    t = lambda text: text.get(lang)  # noqa: E731
    formulas = [{"label": t(f.label), "tex": f.tex, "tex_md": f.tex.strip("$"),
                 "svg": _formula_markup(f.tex, prefix=f"f-{card.module}-{i}")} for i, f in enumerate(card.formulas, 1)]
    return {
        "module": card.module, "status": card.status, "day": card.day,
        "day_title": t(day.title) if day else "", "title": t(card.title), "short_title": short_title(t(card.title)),
        "one_liner": t(card.one_liner),
        "must_explain": t(card.must_explain),
        "formulas": formulas, "formula_rows": _formula_rows(formulas),
        "key_points": [t(p) for p in card.key_points], "pitfalls": [t(p) for p in card.pitfalls],
        "qa": [{"id": q.id, "q": t(q.q), "a": t(q.a), "source": q.source} for q in card.qa],
        "followups": [t(f) for f in card.followups], "kernels": card.kernels,
        "refs": [{"text": r, "href": _ref_href(r)} for r in card.refs],
        "audit": audit_summary(record) if record is not None else None,
    }


def short_title(title: str) -> str:
    """The part of a card title before its colon ("GAE：λ 在偏差…" -> "GAE"), for running headers."""
    head = re.split(r"：|: ", title, maxsplit=1)[0].strip()
    return head if len(head) <= 40 else head[:39] + "…"


def _ref_href(ref: str) -> str | None:
    m = re.fullmatch(r"arXiv:(\d{4}\.\d{4,5})(v\d+)?", ref.strip())
    return f"https://arxiv.org/abs/{m.group(1)}" if m else None


def build_context(content: Content, selection: Selection, lang: str,
                  records: dict[str, RunRecord] | None = None, *, now: datetime | None = None,
                  on_card: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Everything the templates need, already in ``lang``; ``records`` maps module -> latest run.
    ``on_card(done, total, module)`` is called as each card is ready (formulas and plot drawn)."""
    if lang not in LANGS:
        raise BriefError(f"language must be one of {', '.join(LANGS)}, got {lang!r}")
    records = records or {}
    L = LABELS[lang]
    by_day = {d.day: d for d in content.roadmap.days}
    cards = []
    for c in selection.cards:
        cards.append(_card_context(c, lang, by_day.get(c.day), records.get(c.module)))
        if on_card is not None:
            on_card(len(cards), len(selection.cards), c.module)
    toc = [{"day": d.day, "title": d.title.get(lang), "must_explain": d.must_explain.get(lang), "bonus": d.bonus,
            "modules": [{"module": m, "title": content.cards[m].title.get(lang)} for m in d.modules]}
           for d in selection.days]
    audited = [c for c in cards if c["audit"]]
    now = now or datetime.now(timezone.utc)
    if selection.kind == "module":
        doc_title = f"{cards[0]['short_title']} · {L['brief']}"
    elif selection.kind == "day":
        d = selection.days[0]
        doc_title = f"{L['day'].format(n=d.day)} · {d.title.get(lang)} · {L['brief']}"
    else:
        doc_title = L["booklet"]
    return {
        "lang": lang, "html_lang": "zh-CN" if lang == "zh" else "en", "L": L, "kind": selection.kind,
        "key": selection.key, "cards": cards, "toc": toc, "doc_title": doc_title,
        "intro_day": {"day": selection.days[0].day, "title": selection.days[0].title.get(lang),
                      "goal": selection.days[0].goal.get(lang),
                      "must_explain": selection.days[0].must_explain.get(lang)} if selection.kind == "day" else None,
        "cover_meta": L["cover_meta"].format(days=len(selection.days), modules=len(cards), audited=len(audited),
                                             passed=sum(c["audit"]["passed"] for c in audited)),
        "generated": L["generated"].format(date=now.strftime("%Y-%m-%d"), version=__version__),
        "sans": SANS, "mono": MONO,
    }


# ---------------------------------------------------------------------------------------------- renderers

def _env():
    from llmaudit.report.render import _env as report_env

    env = report_env()
    env.filters["daylabel"] = lambda n, L: L["day"].format(n=n)
    env.filters["mdtext"] = _md_text
    return env


def _md_text(text: str) -> str:
    """Card text made literal for GitHub Markdown: escape what would start emphasis, code, maths or HTML
    (intraword underscores are left alone: GFM never reads them as emphasis)."""
    text = re.sub(r"([\\*`$])", r"\\\1", str(text))
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def render_html(ctx: dict[str, Any]) -> str:
    return _env().get_template("brief.html.j2").render(**ctx)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "plot"


def render_markdown(ctx: dict[str, Any], assets: str = "assets") -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the files it links to, as ``{relative path: bytes}``."""
    files: dict[str, bytes] = {}
    for card in ctx["cards"]:
        plot = card["audit"] and card["audit"]["plot"]
        if plot:
            plot["file"] = f"{assets}/{card['module']}-{_slug(plot['title'])}.png"
            files[plot["file"]] = plot["png"]
    return _env().get_template("brief.md.j2").render(**ctx), files


@dataclass
class PdfResult:
    data: bytes
    pages: int
    missing_glyphs: list[str] = field(default_factory=list)  # weasyprint's .notdef messages


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _subset_with_fonttools_when_harfbuzz_fails() -> Iterator[None]:
    """HarfBuzz 6 (Debian 12's libharfbuzz-subset0) fails to subset WenQuanYi Micro Hei once a document
    uses about 900 of its glyphs, and WeasyPrint then embeds the whole 5 MB font (the zh booklet doubles
    in size). Retry such a font with fontTools, which is what WeasyPrint does without HarfBuzz-Subset.
    A no-op if WeasyPrint's internals differ from version 70's."""
    try:
        from weasyprint.pdf.fonts import Font

        harfbuzz_subset, fonttools_subset = Font._harfbuzz_subset, Font._fonttools_subset
    except (ImportError, AttributeError):
        yield
        return

    def subset(self, to_unicode, hinting):
        before = self.file_content
        harfbuzz_subset(self, to_unicode, hinting)
        if self.file_content is before:
            fonttools_subset(self, to_unicode, hinting)

    Font._harfbuzz_subset = subset
    try:
        yield
    finally:
        Font._harfbuzz_subset = harfbuzz_subset


def render_pdf(html: str, base_url: str | None = None, on_stage: Callable[[str], None] | None = None) -> PdfResult:
    """Lay the HTML out with WeasyPrint (print CSS: A4, page numbers) and return the PDF bytes;
    ``on_stage`` hears "layout" and then "write" (each a large part of the time)."""
    import weasyprint

    handler = _Collect()
    logger = logging.getLogger("weasyprint")
    logger.addHandler(handler)
    stage = on_stage or (lambda name: None)
    try:
        stage("layout")
        document = weasyprint.HTML(string=html, base_url=base_url).render()
        stage("write")
        with _subset_with_fonttools_when_harfbuzz_fails():
            data = document.write_pdf()
    finally:
        logger.removeHandler(handler)
    return PdfResult(data, len(document.pages), [m for m in handler.messages if ".notdef" in m])


@dataclass
class Written:
    path: Path
    assets: list[Path]
    pages: int | None
    missing_glyphs: list[str]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def write(ctx: dict[str, Any], fmt: str, path: Path, on_stage: Callable[[str], None] | None = None) -> Written:
    """Render ``ctx`` as ``fmt`` and write it (and any assets) atomically to ``path`` (``on_stage``:
    see ``render_pdf``)."""
    path = Path(path)
    if fmt == "md":
        text, files = render_markdown(ctx)
        assets = [atomic_write(path.parent / rel, data) for rel, data in files.items()]
        atomic_write(path, text)
        return Written(path, assets, None, [])
    html = render_html(ctx)
    if fmt == "html":
        atomic_write(path, html)
        return Written(path, [], None, [])
    if fmt == "pdf":
        pdf = render_pdf(html, base_url=str(path.parent), on_stage=on_stage)
        atomic_write(path, pdf.data)
        return Written(path, [], pdf.pages, pdf.missing_glyphs)
    raise BriefError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
