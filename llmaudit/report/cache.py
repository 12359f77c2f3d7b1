"""Skip work whose inputs have not changed: content-addressed images and up-to-date run pages.

- Formula images and the progress page's plots are stored under ``<reports>/.cache/`` in files named
  by a hash of everything that decides their pixels: the input (LaTeX, the series) and the code
  that draws them (the source of ``formulas.py`` / ``plots.py`` and matplotlib's version). An image
  whose file exists is read back instead of drawn; a change to the drawing code changes every name.
- A run's pages carry a stamp (``.rendered`` beside ``report.html``): the hash of the run record's
  bytes and of the renderer (templates, render/plots/formulas code). ``llmaudit report`` re-renders a
  record only when its stamp differs, so a report over 68 records touches only the new ones.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable

from llmaudit import __version__
from llmaudit.record import atomic_write

HERE = Path(__file__).resolve().parent
STAMP = ".rendered"


def content_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _matplotlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matplotlib")
    except PackageNotFoundError:
        return "?"


@functools.lru_cache(maxsize=None)
def code_digest(*files: str) -> str:
    """A hash of the named source files under ``llmaudit/report`` (globs allowed), the package version
    and matplotlib's version: it changes whenever the way an image or page is drawn can change."""
    parts: list[bytes | str] = [__version__, _matplotlib_version()]
    for pattern in files:
        for path in sorted(HERE.glob(pattern)):
            parts += [path.name, path.read_bytes()]
    return content_hash(*parts)[:16]


def renderer_digest() -> str:
    return code_digest("render.py", "plots.py", "formulas.py", "templates/*")


def cached_file(folder: Path, key: str, suffix: str, make: Callable[[], bytes]) -> bytes:
    """The bytes stored under ``folder/<key><suffix>``, made (and stored atomically) when missing."""
    path = Path(folder) / f"{key}{suffix}"
    try:
        return path.read_bytes()
    except OSError:
        data = make()
        try:
            atomic_write(path, data)
        except OSError:  # an unwritable cache only costs speed
            pass
        return data


def cache_dir(reports: Path, kind: str) -> Path:
    return Path(reports) / ".cache" / kind


def record_stamp(record_bytes: bytes) -> str:
    """What a run's pages were rendered from: the record's bytes and the renderer's code."""
    return content_hash(record_bytes, renderer_digest())


def pages_current(page_dir: Path, record_bytes: bytes) -> bool:
    """True when ``page_dir`` holds report.md and report.html rendered from exactly these bytes by
    this renderer."""
    page_dir = Path(page_dir)
    try:
        stamp = (page_dir / STAMP).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return False
    return (stamp == record_stamp(record_bytes) and (page_dir / "report.md").is_file()
            and (page_dir / "report.html").is_file())


def write_stamp(page_dir: Path, record_bytes: bytes) -> None:
    atomic_write(Path(page_dir) / STAMP, record_stamp(record_bytes))
