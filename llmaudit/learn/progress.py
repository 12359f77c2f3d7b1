"""Progress statistics from the review log and card states: streak, retention, per-day mastery."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from fsrs import State

from llmaudit.learn.load import Content
from llmaudit.learn.quiz import is_due
from llmaudit.learn.store import Store, scheduler

MASTERED_R = 0.9  # a card counts as mastered when it is in review and recall probability is >= 90 %


@dataclass
class DayProgress:
    day: int
    title: str
    items: int
    seen: int
    mastered: int
    due: int

    @property
    def mastery(self) -> float:
        return self.mastered / self.items if self.items else 0.0

    def to_dict(self) -> dict:
        return {"day": self.day, "title": self.title, "items": self.items, "seen": self.seen,
                "mastered": self.mastered, "due": self.due, "mastery": round(self.mastery, 4)}


@dataclass
class Progress:
    streak: int
    reviews: int
    reviews_today: int
    retention: float | None  # share of first-of-the-day repeat reviews not rated Again
    days: list[DayProgress]
    per_date: dict[str, int]  # local date -> reviews

    def to_dict(self) -> dict:
        return {"streak": self.streak, "reviews": self.reviews, "reviews_today": self.reviews_today,
                "retention": None if self.retention is None else round(self.retention, 4),
                "days": [d.to_dict() for d in self.days], "reviews_per_date": self.per_date}


def local_date(t: datetime) -> date:
    return t.astimezone().date()


def streak(dates: set[date], today: date) -> int:
    """Consecutive days with a review, ending today (or yesterday, if today has none yet)."""
    day = today if today in dates else today - timedelta(days=1)
    n = 0
    while day in dates:
        n += 1
        day -= timedelta(days=1)
    return n


def compute(content: Content, store: Store, now: datetime, lang: str = "en") -> Progress:
    reviews = store.reviews()
    cards = store.cards()
    sched = scheduler()
    per_date = Counter(local_date(r.reviewed_at).isoformat() for r in reviews)
    today = local_date(now)
    # true retention: the first review of an item on a day, when the item had been reviewed before
    seen_before: set[str] = set()
    firsts: dict[tuple[str, date], int] = {}
    for r in reviews:
        key = (r.item_id, local_date(r.reviewed_at))
        if r.item_id in seen_before and key not in firsts and not r.cram:
            firsts[key] = r.rating
        seen_before.add(r.item_id)
    retention = (sum(v > 1 for v in firsts.values()) / len(firsts)) if firsts else None
    days = []
    for rd in content.roadmap.days:
        items = content.days[rd.day].items if rd.day in content.days else []
        seen = [i for i in items if i.id in cards]
        mastered = [i for i in seen if cards[i.id].state == State.Review
                    and sched.get_card_retrievability(cards[i.id], now) >= MASTERED_R]
        due = [i for i in seen if is_due(cards[i.id], now)]
        days.append(DayProgress(rd.day, rd.title.get(lang), len(items), len(seen), len(mastered), len(due)))
    return Progress(streak=streak({date.fromisoformat(d) for d in per_date}, today), reviews=len(reviews),
                    reviews_today=per_date.get(today.isoformat(), 0), retention=retention, days=days,
                    per_date=dict(sorted(per_date.items())))
