"""A quiz session: pick the items (due reviews first, then new ones), ask them, grade or self-rate,
schedule with fsrs, and store every answer as soon as it is given.

The session talks to the user only through two callables, ``show(text)`` (rich markup) and
``ask(prompt) -> str`` (raises EOFError at end of input), so the CLI and the tests drive the same code.
"""
from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from fsrs import Card, Rating, State
from rich.markup import escape

from llmaudit.learn.load import Content
from llmaudit.learn.numeric import NotBuilt, close_enough, make
from llmaudit.learn.schema import QuizItem
from llmaudit.learn.store import LEARN_AHEAD, Store, human_interval, new_card, preview, scheduler, utc_now

RATING_KEYS = {"1": Rating.Again, "2": Rating.Hard, "3": Rating.Good, "4": Rating.Easy, "": Rating.Good}
MAX_SHOWINGS = 4  # a learning card comes back within the session at most this many times


class Quit(Exception):
    """The user typed q."""


@dataclass
class Outcome:
    item_id: str
    rating: Rating
    correct: bool | None
    next_due: datetime | None


@dataclass
class Summary:
    answered: list[Outcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, why)
    ended_by: str = "done"  # done | quit | eof | interrupt

    @property
    def counts(self) -> dict[str, int]:
        out = {r.name: 0 for r in Rating}
        for o in self.answered:
            out[o.rating.name] += 1
        return out

    def to_dict(self) -> dict:
        return {"answered": len(self.answered), "ratings": self.counts, "ended_by": self.ended_by,
                "correct": sum(o.correct is True for o in self.answered),
                "graded": sum(o.correct is not None for o in self.answered),
                "skipped": [{"id": i, "why": w} for i, w in self.skipped],
                "items": [{"id": o.item_id, "rating": o.rating.name, "correct": o.correct,
                           "next_due": o.next_due.isoformat() if o.next_due else None} for o in self.answered]}


def is_due(card: Card | None, now: datetime) -> bool:
    if card is None:
        return False
    if card.state in (State.Learning, State.Relearning):
        return card.due <= now + LEARN_AHEAD  # learn ahead within a session, as Anki does
    return card.due <= now


def select(content: Content, store: Store, now: datetime, *, day: int | None = None, module: str | None = None,
           count: int = 10, due_only: bool = False) -> list[QuizItem]:
    """The queue: reviews due (earliest first) from days <= ``day``, then the day's new items, then
    unseen items of earlier days (catch-up). ``module`` restricts to one module; ``due_only`` is review."""
    cards = store.cards()
    items = [i for i in content.items() if module is None or i.module == module]
    day_of = {i.id: d for d, qd in content.days.items() for i in qd.items}
    if day is not None:
        items = [i for i in items if day_of[i.id] <= day]
    due = sorted((i for i in items if is_due(cards.get(i.id), now)), key=lambda i: cards[i.id].due)
    if due_only:
        return due[:count]
    unseen = [i for i in items if i.id not in cards]
    today = [i for i in unseen if day is None or day_of[i.id] == day]
    earlier = [i for i in unseen if day is not None and day_of[i.id] < day]
    return (due + today + earlier)[:count]


def _fill(text: str, params: dict[str, str]) -> str:
    return string.Formatter().vformat(text, (), params) if params else text


class Session:
    def __init__(self, content: Content, store: Store, *, lang: str = "zh", show: Callable[[str], None],
                 ask: Callable[[str], str], cram: bool = False, max_interval_days: int | None = None,
                 seed: int | None = None, clock: Callable[[], datetime] = utc_now):
        self.content, self.store, self.lang, self.show, self._ask = content, store, lang, show, ask
        self.cram = cram
        self.sched = scheduler(max_interval_days)
        self.rng = random.Random(seed)
        self.clock = clock
        self.summary = Summary()

    def t(self, text) -> str:
        return escape(text.get(self.lang))

    def ask(self, prompt: str) -> str:
        answer = self._ask(prompt).strip()
        if answer.lower() in ("q", "quit", "exit"):
            raise Quit
        return answer

    def run(self, queue: list[QuizItem]) -> Summary:
        pending = list(queue)
        shown: dict[str, int] = {}
        try:
            while pending:
                item = pending.pop(0)
                outcome = self.ask_item(item, len(self.summary.answered) + 1, len(self.summary.answered) + 1 + len(pending))
                if outcome is None:
                    continue
                self.summary.answered.append(outcome)
                shown[item.id] = shown.get(item.id, 0) + 1
                if (not self.cram and outcome.next_due is not None and shown[item.id] < MAX_SHOWINGS
                        and outcome.next_due <= self.clock() + LEARN_AHEAD):
                    pending.append(item)  # a learning step: comes back later in this session
        except Quit:
            self.summary.ended_by = "quit"
        except EOFError:
            self.summary.ended_by = "eof"
        except KeyboardInterrupt:
            self.summary.ended_by = "interrupt"
        return self.summary

    # --- one item ------------------------------------------------------------------------------

    def ask_item(self, item: QuizItem, n: int, total: int) -> Outcome | None:
        params: dict[str, str] = {}
        answer_value = None
        if item.type == "numeric":
            try:
                problem = make(item.numeric.generator, self.rng)
            except NotBuilt as exc:
                self.summary.skipped.append((item.id, str(exc)))
                self.show(f"[dim]skipped {item.id}: {exc}[/]")
                return None
            params, answer_value = problem.params, problem.answer
        if item.type == "code" and self.content.cards[item.module].status == "planned":
            self.summary.skipped.append((item.id, f"module {item.module!r} is not built yet"))
            self.show(f"[dim]skipped {item.id}: module {item.module!r} is not built yet[/]")
            return None
        card = self.store.card(item.id) or new_card(item.id, self.clock())
        self.show(f"\n[bold cyan]{n}/{total}[/] [dim]{item.module} · {item.type} · {item.id}[/]")
        self.show(f"[bold]{escape(_fill(item.q.get(self.lang), params))}[/]")
        start = time.monotonic()
        correct: bool | None = None
        if item.type == "recall":
            self.ask("(think, or say it aloud; Enter to reveal) ")
            self.show(self.t(item.a))
            for kp in item.keypoints:
                self.show(f"  • {self.t(kp)}")
            rating = self.rate(card)
        elif item.type == "choice":
            order = list(range(len(item.choices)))
            self.rng.shuffle(order)
            letters = string.ascii_uppercase[:len(order)]
            for letter, idx in zip(letters, order):
                self.show(f"  {letter}. {self.t(item.choices[idx])}")
            while True:
                got = self.ask(f"answer ({'/'.join(letters)}): ").upper()
                if got.isdigit() and 1 <= int(got) <= len(letters):  # "2" for B: the ratings just asked for digits
                    got = letters[int(got) - 1]
                if len(got) == 1 and got in letters:
                    break
                self.show(f"[yellow]type one of {', '.join(letters)}[/]")
            correct = order[letters.index(got)] == item.answer
            right = letters[order.index(item.answer)]
            self.show("[green]✓ correct[/]" if correct else f"[red]✗ the answer is {right}[/]")
            self.show(self.t(item.a))
            rating = Rating.Good if correct else Rating.Again
        elif item.type == "numeric":
            while True:
                got = self.ask("your answer (a number): ")
                try:
                    value = float(got)
                    break
                except ValueError:
                    self.show("[yellow]type a number, e.g. 0.285[/]")
            correct = close_enough(value, answer_value, item.numeric.tolerance)
            verdict = "[green]✓ correct[/]" if correct else "[red]✗ not quite[/]"
            self.show(f"{verdict}: the module's code gives {answer_value:.6g} (tolerance ±{item.numeric.tolerance:g})")
            self.show(self.t(item.a))
            rating = Rating.Good if correct else Rating.Again
        else:  # code
            self.show(f"write it:  [bold]llmaudit practice {item.kernel}[/]   then   "
                      f"[bold]llmaudit check {item.kernel} my_{item.kernel}.py[/]")
            path = self.ask("path to your file to check now (Enter to self-rate instead): ")
            if path:
                correct = self.check_file(item.kernel, path)
                rating = Rating.Good if correct else Rating.Again
            else:
                self.show(self.t(item.a))
                rating = self.rate(card)
        now = self.clock()
        duration = int((time.monotonic() - start) * 1000)
        new, _ = self.sched.review_card(card, rating, now)
        self.store.record(item.id, rating, card=new, at=now, mode=item.type, lang=self.lang, correct=correct,
                          duration_ms=duration, cram=self.cram)
        nxt = None if self.cram else new.due
        if nxt is not None:
            self.show(f"[dim]{rating.name} · next in {human_interval(nxt - now)}[/]")
        else:
            self.show(f"[dim]{rating.name} · cram: schedule unchanged[/]")
        return Outcome(item.id, rating, correct, nxt)

    def rate(self, card: Card) -> Rating:
        previews = preview(self.sched, card, self.clock())
        options = "  ".join(f"{int(r)} {r.name} ({human_interval(d)})" for r, d in previews.items())
        while True:
            got = self.ask(f"{options}   [Enter = Good]: ")
            if got in RATING_KEYS:
                return RATING_KEYS[got]
            self.show("[yellow]type 1, 2, 3 or 4 (Hard still counts as remembered; use 1 Again if you forgot)[/]")

    def check_file(self, kernel_name: str, path: str) -> bool:
        """`llmaudit check` on the user's file, in a child process under the default time limit."""
        from pathlib import Path

        from llmaudit.practice import check_in_child

        outcome = check_in_child(kernel_name, Path(path), "toy", [0])
        if outcome.status != "done":
            self.show(f"[red]{escape(outcome.message)}[/]")
            return False
        rec = outcome.record
        for c in rec.checks:
            if not c.passed:
                self.show(f"[red]✗ {c.name}[/]: measured {escape(c.measured_text)}, expected {escape(c.expected)}")
        self.show(f"{rec.headline}" + (" ✓" if rec.passed else ""))
        return rec.passed
