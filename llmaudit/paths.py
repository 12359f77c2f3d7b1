"""Whether a folder can be written, asked before any work (a real probe, not a permission guess)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_problem(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (created if missing), or None when one can: a temporary
    file is created and deleted, which also tells a read-only mount or an immutable folder apart."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".llmaudit-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or (folder.exists() and not folder.is_dir()):
            return "it is a file, not a folder"
        if isinstance(exc, NotADirectoryError):
            return "a part of its path is a file, not a folder"
        return exc.strerror or type(exc).__name__
    return None
