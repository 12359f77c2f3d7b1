"""Anki export: the shipped cards and quizzes as an Anki package (``.apkg``) built with ``genanki``.

One note per item a learner can review in Anki:

- quiz ``recall`` items and the cards' Q&A: question on the front, answer (and key points) on the back;
- quiz ``choice`` items: question and lettered options on the front, the right option and the
  explanation on the back;
- quiz ``code`` items, as recall: the contract to hand-write on the front, what the solution does on
  the back, plus the ``llmaudit practice`` / ``check`` commands that audit a real attempt;
- each card formula: its name on the front, the formula on the back.

``numeric`` items are left out: their parameters are drawn at random and their answers computed live by
the module's code, which a static card cannot do.

Anki recognises a note on re-import by its guid, so every guid is a hash of the item's stable id (never
of its text): editing an item's wording and exporting again updates the note and keeps its review
history. Formulas have no id in the YAML; theirs is ``<module>.formula.<n>`` (1-based position in the
card), so rewording a formula keeps its note, and reordering a card's formulas swaps them. The deck and
note-type ids are constants for the same reason. Formulas are written in MathJax (``\\(...\\)`` inline,
``\\[...\\]`` display), which Anki renders on every platform; the YAML's mathtext ``$...$`` is converted.

Building the notes (``build_notes``) needs only the content; writing the package needs ``genanki``
(``pip install 'llmaudit[anki]'``). Nothing here imports torch.
"""
from __future__ import annotations

import html
import itertools
import json
import os
import re
import sqlite3
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmaudit.learn.load import Content
from llmaudit.learn.schema import Text

LANGS = ("zh", "en", "both")
INSTALL = "pip install 'llmaudit[anki]'   (or: pip install genanki)"

# Fixed forever: Anki keys decks and note types by these ids, so a re-import lands in the same places.
DECK_ID = 1_478_210_304  # day N's deck "llmaudit::dayNN" has id DECK_ID + N
RECALL_MODEL_ID = 1_478_210_401
CHOICE_MODEL_ID = 1_478_210_402
GUID_NAMESPACE = "llmaudit"  # guid = genanki.guid_for(GUID_NAMESPACE, item id)

RECALL_FIELDS = ("Question", "Answer", "Keypoints", "Source")
CHOICE_FIELDS = ("Question", "Options", "Answer", "Explanation", "Source")

CSS = """.card { font-family: -apple-system, "PingFang SC", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif;
  font-size: 19px; line-height: 1.5; text-align: left; color: #1a1a1a; background: #fff; max-width: 46em; margin: auto; }
.nightMode.card, .night_mode .card { color: #e6e6e6; background: #1e1e1e; }
.lang-en { color: #555; margin-top: .4em; } .nightMode .lang-en, .night_mode .lang-en { color: #aaa; }
ol.options { padding-left: 1.6em; } ol.options li { margin: .25em 0; }
.correct { font-weight: 600; color: #1b7f3b; }
.keypoints { margin-top: .8em; } .keypoints ul { margin: .2em 0; }
.source { margin-top: 1.2em; font-size: 13px; color: #888; }
"""

RECALL_TEMPLATE = {
    "name": "Recall",
    "qfmt": '<div class="question">{{Question}}</div>',
    "afmt": '{{FrontSide}}<hr id="answer"><div class="answer">{{Answer}}</div>'
            '{{#Keypoints}}<div class="keypoints">{{Keypoints}}</div>{{/Keypoints}}'
            '<div class="source">{{Source}}</div>',
}
CHOICE_TEMPLATE = {
    "name": "Choice",
    "qfmt": '<div class="question">{{Question}}</div><div class="options">{{Options}}</div>',
    "afmt": '{{FrontSide}}<hr id="answer"><div class="correct">{{Answer}}</div>'
            '<div class="explanation">{{Explanation}}</div><div class="source">{{Source}}</div>',
}

LABELS = {  # fixed words on the notes, per language
    "keypoints": Text(zh="要点", en="Key points"),
    "formula": Text(zh="写出公式", en="Write the formula"),
    "handwrite": Text(zh="手撕并审计", en="hand-write it and audit it"),
}


class AnkiUnavailable(RuntimeError):
    """genanki is not installed; the message carries the install command."""


# --- text -> Anki HTML ---------------------------------------------------------------------------

_MATH = re.compile(r"\\\$|\$\$(.+?)\$\$|\$(.+?)\$", re.DOTALL)


def tex_to_mathjax(text: str, display: bool = False) -> str:
    """Rewrite mathtext/LaTeX dollars as MathJax delimiters Anki renders.

    ``$$x$$`` -> ``\\[x\\]``; ``$x$`` -> ``\\(x\\)``, or ``\\[x\\]`` when ``display`` and ``$x$`` is the whole
    text (a card formula); ``\\$`` is a literal dollar; a lone ``$`` with no partner stays as it is.
    """
    whole = display and _MATH.fullmatch(text.strip()) is not None

    def swap(m: re.Match) -> str:
        if m.group(0) == "\\$":
            return "$"
        if m.group(1) is not None:
            return f"\\[{m.group(1)}\\]"
        return f"\\[{m.group(2)}\\]" if whole else f"\\({m.group(2)}\\)"

    return _MATH.sub(swap, text)


def to_html(text: str, display: bool = False) -> str:
    """One plain-text field as Anki HTML: math converted, ``< > &`` escaped, line breaks kept.

    Escaping inside the math is right: Anki hands MathJax the text of the page, where ``&lt;`` is ``<``.
    """
    return html.escape(tex_to_mathjax(text, display), quote=False).replace("\n", "<br>")


def pick(text: Text, lang: str, display: bool = False) -> str:
    """``text`` in one language, or both stacked (zh first) for ``lang='both'``."""
    if lang != "both":
        return to_html(text.get(lang), display)
    return "".join(f'<div class="lang-{l}">{to_html(text.get(l), display)}</div>' for l in ("zh", "en"))


# --- notes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnkiNote:
    """One note, independent of genanki: its stable id, where it belongs, and its fields as HTML."""

    id: str  # the content's stable id; the guid is a hash of it
    kind: str  # recall | choice | code | qa | formula
    day: int
    module: str
    fields: tuple[str, ...]  # RECALL_FIELDS or CHOICE_FIELDS, in that order

    @property
    def model(self) -> str:
        return "choice" if self.kind == "choice" else "recall"

    @property
    def tags(self) -> tuple[str, ...]:
        return (f"day{self.day:02d}", self.module, self.kind)


def _source(day: int, module: str, item_id: str, extra: str = "") -> str:
    return html.escape(f"llmaudit · day {day} · {module} · {item_id}{extra}", quote=False)


def _keypoints(points, lang: str) -> str:
    if not points:
        return ""
    head = pick(LABELS["keypoints"], lang)
    return f"<b>{head}</b><ul>" + "".join(f"<li>{pick(p, lang)}</li>" for p in points) + "</ul>"


def _quiz_note(item, day: int, lang: str, built: bool) -> AnkiNote | None:
    if item.type == "numeric":
        return None
    if item.type == "choice":
        options = '<ol class="options" type="A">' + "".join(f"<li>{pick(c, lang)}</li>" for c in item.choices) + "</ol>"
        right = f"{chr(ord('A') + item.answer)}. {pick(item.choices[item.answer], lang)}"
        fields = (pick(item.q, lang), options, right, pick(item.a, lang), _source(day, item.module, item.id))
        return AnkiNote(item.id, "choice", day, item.module, fields)
    extra = ""
    if item.type == "code" and built:
        words = LABELS["handwrite"]
        how = f"{words.zh} / {words.en}" if lang == "both" else words.get(lang)
        extra = f" · {how}: llmaudit practice {item.kernel} → llmaudit check {item.kernel} FILE.py"
    fields = (pick(item.q, lang), pick(item.a, lang), _keypoints(item.keypoints, lang),
              _source(day, item.module, item.id, extra))
    return AnkiNote(item.id, item.type, day, item.module, fields)


def _card_notes(card, lang: str) -> list[AnkiNote]:
    notes = []
    for qa in card.qa:
        fields = (pick(qa.q, lang), pick(qa.a, lang), "", _source(card.day, card.module, qa.id))
        notes.append(AnkiNote(qa.id, "qa", card.day, card.module, fields))
    for n, formula in enumerate(card.formulas, start=1):
        item_id = f"{card.module}.formula.{n}"
        prompt = Text(zh=f"{LABELS['formula'].zh}：{formula.label.zh}（{card.title.zh}）",
                      en=f"{LABELS['formula'].en}: {formula.label.en} ({card.title.en})")
        fields = (pick(prompt, lang), to_html(formula.tex, display=True), "",
                  _source(card.day, card.module, item_id))
        notes.append(AnkiNote(item_id, "formula", card.day, card.module, fields))
    return notes


def build_notes(content: Content, *, day: int | None = None, lang: str = "en") -> list[AnkiNote]:
    """Every exportable note of ``day`` (all days when None), in study order: day by day, the quiz
    items in file order, then the cards of that day's modules (Q&A, then formulas)."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, got {lang!r}")
    days = sorted(set(content.days) | {c.day for c in content.cards.values()}) if day is None else [day]
    notes: list[AnkiNote] = []
    for d in days:
        quiz = content.days.get(d)
        for item in quiz.items if quiz else ():
            card = content.cards.get(item.module)
            note = _quiz_note(item, d, lang, built=card is not None and card.status == "built")
            if note is not None:
                notes.append(note)
        for module in sorted(content.cards):
            if content.cards[module].day == d:
                notes.extend(_card_notes(content.cards[module], lang))
    seen: set[str] = set()
    for note in notes:
        if note.id in seen:
            raise ValueError(f"two exported notes share the id {note.id!r}; ids must be unique across cards and quizzes")
        seen.add(note.id)
    return notes


# --- the package ---------------------------------------------------------------------------------

def _genanki():
    try:
        import genanki
    except ImportError:
        raise AnkiUnavailable(f"Anki export needs the genanki library, which is not installed. Install it with: {INSTALL}") from None
    return genanki


def note_guid(item_id: str) -> str:
    """The Anki guid of the note for ``item_id``: a hash of the id alone, so it survives text edits."""
    return _genanki().guid_for(GUID_NAMESPACE, item_id)


def write_package(notes: list[AnkiNote], path: Path, *, day_titles: dict[int, str] | None = None) -> Path:
    """Write ``notes`` to ``path`` (an .apkg), atomically: a temporary file in the same folder, then a rename.

    Each day's notes go to the deck ``llmaudit::dayNN``. New cards are ordered as ``notes`` is.
    """
    genanki = _genanki()
    models = {
        "recall": genanki.Model(RECALL_MODEL_ID, "llmaudit recall", fields=[{"name": f} for f in RECALL_FIELDS],
                                templates=[RECALL_TEMPLATE], css=CSS),
        "choice": genanki.Model(CHOICE_MODEL_ID, "llmaudit choice", fields=[{"name": f} for f in CHOICE_FIELDS],
                                templates=[CHOICE_TEMPLATE], css=CSS),
    }
    decks: dict[int, object] = {}
    for position, note in enumerate(notes):
        if note.day not in decks:
            title = (day_titles or {}).get(note.day, "")
            decks[note.day] = genanki.Deck(DECK_ID + note.day, f"llmaudit::day{note.day:02d}", description=html.escape(title))
        decks[note.day].add_note(genanki.Note(model=models[note.model], fields=list(note.fields),
                                              guid=note_guid(note.id), tags=list(note.tags), due=position))
    package = genanki.Package([decks[d] for d in sorted(decks)])

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".anki-") as tmp:
        collection = Path(tmp) / "collection.anki2"
        conn = sqlite3.connect(collection)
        # Notes carry the export time as their modification time: Anki updates an existing note on
        # import only when the incoming one is newer, so a fixed timestamp would block updates.
        now = time.time()
        package.write_to_db(conn.cursor(), now, itertools.count(int(now * 1000)))
        conn.commit()
        conn.close()
        staged = Path(tmp) / path.name
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(collection, "collection.anki2")
            z.writestr("media", json.dumps({}))
        os.replace(staged, path)
    return path
