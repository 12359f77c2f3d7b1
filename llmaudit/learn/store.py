"""Progress in SQLite: one fsrs card state per quiz item and an append-only review log.

Each answer is committed in its own transaction, so Ctrl-C or a crash mid-quiz loses nothing that
was already answered. A file that is not an llmaudit progress database is reported with its path and
never touched.
"""
from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fsrs import Card, Rating, Scheduler

from llmaudit.paths import write_problem

APP, SCHEMA_VERSION = "llmaudit", 1
LEARN_AHEAD = timedelta(minutes=20)  # learning cards due within this window are shown again this session


class StoreError(Exception):
    """The progress database cannot be used (corrupt, foreign, or from a newer llmaudit)."""


def home() -> Path:
    """The user data folder: ``$LLMAUDIT_HOME`` if set, else the platform's (e.g. ~/.local/share/llmaudit)."""
    if os.environ.get("LLMAUDIT_HOME"):
        return Path(os.environ["LLMAUDIT_HOME"]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("llmaudit", appauthor=False))


def card_id(item_id: str) -> int:
    """A stable fsrs card id from the YAML id (below 2**53, so JSON/JS-safe)."""
    return int(hashlib.sha256(item_id.encode()).hexdigest()[:13], 16)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def scheduler(max_interval_days: int | None = None) -> Scheduler:
    """FSRS-6 with its defaults: 90 % desired retention, 1 min / 10 min learning steps; no fuzz, so an
    interval shown before answering is the interval you get. ``max_interval_days`` caps intervals at
    the days left before an interview."""
    return Scheduler(desired_retention=0.9, maximum_interval=max(1, max_interval_days or 36500),
                     enable_fuzzing=False)


@dataclass(frozen=True)
class Review:
    item_id: str
    rating: int
    reviewed_at: datetime
    mode: str
    correct: bool | None
    cram: bool


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (item_id TEXT PRIMARY KEY, card TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, rating INTEGER NOT NULL,
    reviewed_at TEXT NOT NULL, duration_ms INTEGER, mode TEXT NOT NULL, correct INTEGER,
    lang TEXT NOT NULL, cram INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS reviews_item ON reviews(item_id);
"""


def _where(folder: Path) -> str:
    set_by = " (set by LLMAUDIT_HOME)" if os.environ.get("LLMAUDIT_HOME") else ""
    return f"the progress folder {folder}{set_by}"


def _write_problem(folder: Path, db: Path) -> str | None:
    """Why nothing can be written in ``folder`` or to ``db`` (a real write probe: a temporary file is
    created and deleted), or None when both are writable."""
    problem = write_problem(folder)
    if problem is not None:
        return problem
    if db.exists() and not os.access(db, os.W_OK):
        return os.strerror(errno.EACCES)
    return None


class Store:
    """The progress database. ``read_only=True`` (commands that only show progress) opens a database
    that cannot be written as it is, read-only, instead of refusing it; ``self.read_only`` says which."""

    def __init__(self, path: Path | None = None, *, read_only: bool = False):
        self.path = Path(path) if path is not None else home() / "progress.sqlite3"
        problem = _write_problem(self.path.parent, self.path)
        self.read_only = bool(problem and read_only and self.path.is_file())
        if self.read_only:  # immutable: sqlite creates no journal, -wal or -shm file beside it
            try:
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
                self._check()
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path} is not a readable llmaudit progress database ({exc}). It was left "
                                 f"untouched.") from None
            return
        if problem and self.path.is_file():
            raise StoreError(f"{self.path} is read-only ({problem}): llmaudit must write to it to save your answers. "
                             f"Your progress in it is intact and was not touched. Make {self.path.parent} writable "
                             f"again, or copy the file to a folder you can write and set LLMAUDIT_HOME to that folder.")
        if problem:
            raise StoreError(f"{_where(self.path.parent)} cannot hold the progress database ({problem}). Set "
                             f"LLMAUDIT_HOME to a folder you can write (it is created if missing).")
        fresh = not self.path.exists()
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL") if fresh else None
            if fresh:
                with self.db:
                    self.db.executescript(SCHEMA)
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                        [("app", APP), ("schema_version", str(SCHEMA_VERSION))])
            self._check()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable llmaudit progress database ({exc}). It was left "
                             f"untouched: move it away to start fresh, or set LLMAUDIT_HOME to another folder.") from None

    def _check(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "cards", "reviews"} <= tables:
            raise StoreError(f"{self.path} is an SQLite file but not an llmaudit progress database (tables: "
                             f"{', '.join(sorted(tables)) or 'none'}). It was left untouched: move it away, or "
                             "set LLMAUDIT_HOME to another folder.")
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("app") != APP:
            raise StoreError(f"{self.path} belongs to another application ({meta.get('app')!r}); left untouched.")
        if int(meta.get("schema_version", "0")) > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer llmaudit (schema {meta['schema_version']}); "
                             "upgrade llmaudit to use it.")

    def close(self) -> None:
        self.db.close()

    # --- settings -------------------------------------------------------------------------------

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, key: str, value: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def unset(self, key: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))

    # --- cards and reviews ----------------------------------------------------------------------

    def card(self, item_id: str) -> Card | None:
        row = self.db.execute("SELECT card FROM cards WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        try:
            return Card.from_json(row[0])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path}: the saved state of {item_id!r} is unreadable ({exc}).") from None

    def cards(self) -> dict[str, Card]:
        return {item_id: Card.from_json(text) for item_id, text in self.db.execute("SELECT item_id, card FROM cards")}

    def record(self, item_id: str, rating: Rating, *, card: Card | None, at: datetime, mode: str, lang: str,
               correct: bool | None = None, duration_ms: int | None = None, cram: bool = False) -> None:
        """Store one answer (and the new card state unless cramming) in a single transaction."""
        with self.db:
            self.db.execute("INSERT INTO reviews (item_id, rating, reviewed_at, duration_ms, mode, correct, lang, cram) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (item_id, int(rating), at.isoformat(), duration_ms, mode,
                             None if correct is None else int(correct), lang, int(cram)))
            if card is not None and not cram:
                self.db.execute("INSERT OR REPLACE INTO cards VALUES (?, ?, ?)", (item_id, card.to_json(), at.isoformat()))

    def reviews(self) -> list[Review]:
        rows = self.db.execute("SELECT item_id, rating, reviewed_at, mode, correct, cram FROM reviews ORDER BY id")
        return [Review(i, r, datetime.fromisoformat(t), m, None if c is None else bool(c), bool(cr))
                for i, r, t, m, c, cr in rows]

    def n_reviews(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0]


def new_card(item_id: str, now: datetime) -> Card:
    return Card(card_id=card_id(item_id), due=now)


def preview(sched: Scheduler, card: Card, now: datetime) -> dict[Rating, timedelta]:
    """The interval each rating would give, computed before answering (review_card copies the card)."""
    return {r: sched.review_card(card, r, now)[0].due - now for r in Rating}


def human_interval(delta: timedelta) -> str:
    s = delta.total_seconds()
    if s < 3600:
        return f"{max(1, round(s / 60))}m"
    if s < 86400:
        return f"{round(s / 3600)}h"
    days = s / 86400
    return f"{round(days)}d" if days < 60 else f"{days / 30:.1f}mo" if days < 365 else f"{days / 365:.1f}y"
