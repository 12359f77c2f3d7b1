"""Load and validate the shipped YAML content; every error names the file, the line, the id and the field."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from llmaudit.learn.schema import Card, QuizDay, Roadmap

CONTENT = Path(__file__).resolve().parent.parent / "content"  # cards/ and quizzes/ (symlinks in a checkout)

M = TypeVar("M", bound=BaseModel)


class ContentError(ValueError):
    """Malformed content: the message lists every problem as ``file:line: [id] field: message``."""


def _locate(node: yaml.Node | None, loc: tuple) -> tuple[int | None, str | None]:
    """The 1-based line of the YAML node at pydantic location ``loc``, and the nearest enclosing id."""
    line, item_id = (node.start_mark.line + 1 if node is not None else None), None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == "id" and isinstance(v, yaml.ScalarNode):
                    item_id = v.value
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "id" and isinstance(v, yaml.ScalarNode):
                item_id = v.value
    return line, item_id


# libyaml's loader where pyyaml was built with it (10-20x faster than the pure-Python one)
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=128)
def _read_yaml(path: Path, stamp: tuple[int, int]) -> tuple[str, object]:
    """The text and data of one YAML file, parsed once per process while the file is unchanged
    (``stamp`` is its mtime and size); ContentError with file:line when it is not valid YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentError(f"{path}: cannot read ({exc})") from None
    try:
        return text, yaml.load(text, Loader=LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ContentError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None


def parse(path: Path, model: type[M]) -> M:
    """Parse one YAML file into ``model``; ContentError with file:line for every problem."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ContentError(f"{path}: cannot read ({exc})") from None
    text, data = _read_yaml(path, (st.st_mtime_ns, st.st_size))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        node = yaml.compose(text, Loader=LOADER)  # the node tree (with line numbers) only to locate errors
        lines = []
        for e in exc.errors():
            loc = tuple(e["loc"])
            line, item_id = _locate(node, loc)
            field = ".".join(str(p) for p in loc) or "(top level)"
            tag = f" [{item_id}]" if item_id else ""
            lines.append(f"{path}:{line or '?'}:{tag} {field}: {e['msg']}")
        raise ContentError("\n".join(lines)) from None


@dataclass(frozen=True)
class Content:
    roadmap: Roadmap
    cards: dict[str, Card]  # module -> card
    days: dict[int, QuizDay]  # day -> quiz items

    def items(self):
        for day in sorted(self.days):
            yield from self.days[day].items


def load_content(root: Path | None = None, *, strict: bool = True) -> Content:
    """Everything under ``root`` (cards/, quizzes/), validated, with cross-file checks.

    ``strict`` also checks that card statuses and kernel names agree with the audits installed (an
    authoring check run by the tests and ``doctor``; at quiz time a mismatch must not lock users out).
    """
    root = Path(root) if root is not None else CONTENT
    problems: list[str] = []

    def attempt(path: Path, model: type[M]) -> M | None:
        try:
            return parse(path, model)
        except ContentError as exc:
            problems.append(str(exc))
            return None

    roadmap = attempt(root / "quizzes" / "roadmap.yaml", Roadmap)
    cards: dict[str, Card] = {}
    for path in sorted((root / "cards").glob("*.yaml")):
        card = attempt(path, Card)
        if card is not None:
            if card.module != path.stem:
                problems.append(f"{path}:1: module: {card.module!r} must match the file name {path.stem!r}")
            cards[card.module] = card
    days: dict[int, QuizDay] = {}
    for path in sorted((root / "quizzes").glob("day*.yaml")):
        qd = attempt(path, QuizDay)
        if qd is not None:
            if path.stem != f"day{qd.day:02d}":
                problems.append(f"{path}:1: day: {qd.day} must match the file name (day{qd.day:02d}.yaml)")
            days[qd.day] = qd
    if problems:
        raise ContentError("\n".join(problems))
    assert roadmap is not None
    content = Content(roadmap, cards, days)
    cross_check(content, strict=strict)
    return content


def cross_check(content: Content, *, strict: bool = True) -> None:
    """Ids unique across files; modules named by the roadmap and quizzes have cards; kernels exist."""
    from llmaudit.learn.numeric import GENERATORS
    from llmaudit.registry import all_kernels, load_all

    problems = []
    seen: dict[str, str] = {}
    for card in content.cards.values():
        for qa in card.qa:
            key = f"card:{card.module}:{qa.id}"
            if qa.id in seen:
                problems.append(f"cards/{card.module}.yaml: [{qa.id}] duplicate id (also in {seen[qa.id]})")
            seen[qa.id] = key
    for item in content.items():
        if item.id in seen:
            problems.append(f"quizzes: [{item.id}] duplicate id (also in {seen[item.id]})")
        seen[item.id] = "quizzes"
        if item.module not in content.cards:
            problems.append(f"quizzes: [{item.id}] module: no card for module {item.module!r}")
        if item.numeric and item.numeric.generator not in GENERATORS:
            problems.append(f"quizzes: [{item.id}] numeric.generator: unknown generator {item.numeric.generator!r}")
    for day in content.roadmap.days:
        for m in day.modules:
            if m not in content.cards:
                problems.append(f"quizzes/roadmap.yaml: day {day.day}: module {m!r} has no card")
    if problems or not strict:
        if problems:
            raise ContentError("\n".join(problems))
        return
    audits, kernels = load_all(), all_kernels()
    for card in content.cards.values():
        if card.status == "built" and card.module not in audits:
            problems.append(f"cards/{card.module}.yaml: status: 'built' but there is no audit named {card.module!r}")
        if card.status == "planned" and card.module in audits:
            problems.append(f"cards/{card.module}.yaml: status: 'planned' but the module is built; say 'built'")
        for k in card.kernels:
            if card.status == "built" and k not in kernels:
                problems.append(f"cards/{card.module}.yaml: kernels: {k!r} is not a kernel of any audit")
    for item in content.items():
        if item.kernel and content.cards.get(item.module) and content.cards[item.module].status == "built" \
                and item.kernel not in kernels:
            problems.append(f"quizzes: [{item.id}] kernel: {item.kernel!r} is not a kernel of any audit")
    if problems:
        raise ContentError("\n".join(problems))


@functools.lru_cache(maxsize=1)
def content() -> Content:
    """The shipped content as quiz time needs it (not strict), parsed once and then kept, pickled, in
    the user data folder until a content file or the code that reads it changes: unpickling takes
    0.03 s where parsing and validating the 44 files takes 0.15 s, a third of a `quiz` start."""
    key = _content_key(CONTENT)
    cached = _read_pickle(key)
    if cached is not None:
        return cached
    loaded = load_content(strict=False)
    _write_pickle(key, loaded)
    return loaded


def _content_key(root: Path) -> str | None:
    """A hash of everything the parsed content depends on: each file's name, size and mtime, the
    reading code, and the versions of llmaudit, Python and pydantic; None if a file cannot be read."""
    import hashlib
    import sys

    import pydantic

    from llmaudit import __version__

    h = hashlib.sha256(f"{__version__}|{sys.version}|{pydantic.VERSION}|{root}".encode())
    here = Path(__file__).resolve().parent
    try:
        for name in ("load.py", "schema.py", "numeric.py"):
            h.update((here / name).read_bytes())
        for path in sorted((root / "cards").glob("*.yaml")) + sorted((root / "quizzes").glob("*.yaml")):
            st = path.stat()
            h.update(f"|{path.parent.name}/{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    except OSError:
        return None
    return h.hexdigest()[:24]


def _pickle_dir() -> Path:
    from llmaudit.learn.store import home

    return home() / "cache"


def _read_pickle(key: str | None) -> Content | None:
    import pickle

    if key is None:
        return None
    try:
        with open(_pickle_dir() / f"content-{key}.pickle", "rb") as f:
            found = pickle.load(f)
    except Exception:  # noqa: BLE001 - missing, unreadable or from an incompatible version: parse instead
        return None
    return found if isinstance(found, Content) else None


def _write_pickle(key: str | None, loaded: Content) -> None:
    import pickle

    from llmaudit.record import atomic_write

    if key is None:
        return
    folder = _pickle_dir()
    try:
        atomic_write(folder / f"content-{key}.pickle", pickle.dumps(loaded, protocol=pickle.HIGHEST_PROTOCOL))
        for old in folder.glob("content-*.pickle"):
            if old.name != f"content-{key}.pickle":
                old.unlink(missing_ok=True)
    except OSError:  # a read-only or missing data folder only costs speed
        pass



def check_file(path: Path) -> list[str]:
    """Validate one content file on its own (schema, formulas render, numeric placeholders fill).

    Returns the problems found (empty when the file is fine). Used by authors and by ``doctor``.
    """
    import random
    import string

    from llmaudit.learn.numeric import GENERATORS, NotBuilt, make
    from llmaudit.report.formulas import formula_svg

    path = Path(path)
    model = Roadmap if path.name == "roadmap.yaml" else QuizDay if path.parent.name == "quizzes" else Card
    try:
        doc = parse(path, model)
    except ContentError as exc:
        return str(exc).splitlines()
    problems = []
    if isinstance(doc, Card):
        for f in doc.formulas:
            try:
                formula_svg(f.tex)
            except ValueError as exc:
                problems.append(f"{path}: formula {f.label.en!r} does not render with mathtext: "
                                f"{str(exc).strip().splitlines()[-1]}")
    if isinstance(doc, QuizDay):
        for item in doc.items:
            fields = {name for lang in ("zh", "en") for _, name, _, _ in string.Formatter().parse(item.q.get(lang)) if name}
            if item.numeric:
                if item.numeric.generator not in GENERATORS:
                    problems.append(f"{path}: [{item.id}] numeric.generator: unknown {item.numeric.generator!r}; "
                                    f"known: {', '.join(sorted(GENERATORS))}")
                    continue
                try:
                    params = make(item.numeric.generator, random.Random(0)).params
                except NotBuilt:
                    continue
                missing = fields - set(params)
                if missing:
                    problems.append(f"{path}: [{item.id}] q: placeholders {sorted(missing)} are not parameters of "
                                    f"{item.numeric.generator} (it has {sorted(params)})")
            elif fields:
                problems.append(f"{path}: [{item.id}] q: {{placeholders}} only make sense in numeric items "
                                "(write literal braces as {{ and }})")
    return problems


if __name__ == "__main__":  # python -m llmaudit.learn.load FILE...
    import sys

    bad = 0
    for arg in sys.argv[1:]:
        found = check_file(Path(arg))
        bad += bool(found)
        print("\n".join(found) if found else f"ok  {arg}")
    sys.exit(1 if bad else 0)
