"""Load a user's hand-written kernel from a file and pre-flight it against the reference.

Every way a file can be unusable (missing, does not import, lacks the function, wrong signature, raises,
returns the wrong structure or shape) becomes a ``KernelFileError`` whose message is one paragraph a
user can act on -- never a traceback.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from llmaudit.audit import Kernel


class KernelFileError(Exception):
    """The user's file cannot be audited; the message says why and what to do."""


def _user_frame(exc: BaseException, path: Path) -> str:
    """' (my_gae.py, line 12)' for the deepest frame inside the user's file, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" ({path.name}, line {frames[-1].lineno}: {frames[-1].line})" if frames else ""


def _exc_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def load_user_function(path: Path, kernel: Kernel) -> Callable:
    """Import ``path`` as a fresh module and return its function named like ``kernel``."""
    path = Path(path)
    if not path.is_file():
        raise KernelFileError(f"{path}: no such file. Write one with `llmaudit practice {kernel.name} --out {path}`.")
    name = f"llmaudit_user_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelFileError(f"{path}: cannot be imported as Python (is it a .py file?).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise KernelFileError(f"{path} does not parse: {exc.msg} at line {exc.lineno}"
                              + (f": {exc.text.strip()}" if exc.text else "") + ". Fix the syntax and run again.") from None
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises at import time
        raise KernelFileError(f"{path} raised while being imported: {_exc_text(exc)}{_user_frame(exc, path)}. "
                              "Code at module level runs on import; keep it inside the function.") from None
    finally:
        sys.modules.pop(name, None)
    fn = getattr(module, kernel.name, None)
    if fn is None or not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == name)
        found = f" It defines: {', '.join(defined)}." if defined else " It defines no functions."
        raise KernelFileError(f"{path} has no function named `{kernel.name}`.{found} "
                              f"The expected signature is `{kernel.call}`.")
    check_signature(fn, kernel, path)
    return fn


def check_signature(fn: Callable, kernel: Kernel, path: Path) -> None:
    """The user's parameters must have the reference's names, in order (defaults may differ)."""
    try:
        theirs = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    want = [p.name for p in kernel.signature.parameters.values()]
    got = [p.name for p in theirs.parameters.values()]
    if got != want:
        raise KernelFileError(f"`{kernel.name}` in {path} has the wrong signature: it takes ({', '.join(got)}) "
                              f"but the audit calls it as {kernel.name}({', '.join(want)}). Keep the parameter "
                              "names and order of the stub from `llmaudit practice`.")


def describe_structure(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor of shape {tuple(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}: (" + ", ".join(describe_structure(v) for v in value) + ")"
    return type(value).__name__


def _same_structure(mine: Any, ref: Any) -> bool:
    if hasattr(ref, "shape") and hasattr(ref, "dtype"):
        return hasattr(mine, "shape") and tuple(mine.shape) == tuple(ref.shape)
    if isinstance(ref, (tuple, list)):
        return isinstance(mine, (tuple, list)) and len(mine) == len(ref) and \
            all(_same_structure(m, r) for m, r in zip(mine, ref))
    if isinstance(ref, (int, float)):
        return isinstance(mine, (int, float)) or (hasattr(mine, "shape") and tuple(mine.shape) == ())
    return True


def preflight(fn: Callable, kernel: Kernel, path: Path) -> None:
    """Call the user's function on the kernel's small example; compare the output's structure and shapes."""
    ref = kernel.fn(**kernel.example())
    try:
        mine = fn(**kernel.example())
    except NotImplementedError:
        raise KernelFileError(f"`{kernel.name}` in {path} still raises NotImplementedError: replace the "
                              "`raise NotImplementedError` line of the stub with your implementation.") from None
    except Exception as exc:  # noqa: BLE001 - the user's function failing on a valid input
        args = ", ".join(f"{k}={describe_structure(v)}" for k, v in kernel.example().items())
        raise KernelFileError(f"`{kernel.name}` in {path} raised {_exc_text(exc)}{_user_frame(exc, path)} when "
                              f"called with {args}. Check the shapes in the docstring.") from None
    if not _same_structure(mine, ref):
        raise KernelFileError(f"`{kernel.name}` in {path} returned {describe_structure(mine)}, but the audit "
                              f"expects {describe_structure(ref)} for the example input. Check the shapes and "
                              "what the docstring says to return.")
