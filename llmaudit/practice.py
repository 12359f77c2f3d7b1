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


# ------------------------------------------------------------------------------------------------
# Watching the user's function while the audit calls it


def _leaves(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    return [value]


def _has(value: Any, test: str) -> bool:
    """Whether any float tensor or float in ``value`` holds a NaN (test="nan") or +-inf ("inf")."""
    import math

    import torch

    for leaf in _leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            if bool((torch.isnan(leaf) if test == "nan" else torch.isinf(leaf)).any()):
                return True
        elif isinstance(leaf, float) and (math.isnan(leaf) if test == "nan" else math.isinf(leaf)):
            return True
    return False


class KernelSpy:
    """Wraps the user's function: counts calls, calls that turned finite inputs into NaN (or inf, for
    kernels whose outputs should be finite), and the time spent inside it."""

    def __init__(self, fn: Callable, kernel: Kernel):
        self.fn, self.kernel = fn, kernel
        self.calls = self.nan_calls = self.inf_calls = 0
        self.seconds = 0.0
        self.__name__ = kernel.name
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import time

        start = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        inputs = (args, kwargs)
        if _has(out, "nan") and not _has(inputs, "nan"):
            self.nan_calls += 1
        if self.kernel.finite and _has(out, "inf") and not _has(inputs, "inf") and not _has(inputs, "nan"):
            self.inf_calls += 1
        return out

    def findings(self) -> list[str]:
        """What the user should hear about their function's outputs, in words."""
        said = []
        if self.nan_calls:
            said.append(f"your {self.kernel.name} returned NaN on {self.nan_calls} of {self.calls} calls whose "
                        "inputs had no NaN (log of 0, 0/0, a std of one element, exp overflow?)")
        if self.inf_calls:
            said.append(f"your {self.kernel.name} returned inf on {self.inf_calls} of {self.calls} calls whose "
                        "inputs were finite (division by zero, exp overflow?)")
        return said

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "nan_calls": self.nan_calls, "inf_calls": self.inf_calls,
                "seconds": round(self.seconds, 4)}


# ------------------------------------------------------------------------------------------------
# Degenerate kernels: the four ways a function can be trivially wrong


DEGENERATE = ("nan", "zeros", "echo", "raises")


class DegenerateKernelCalled(RuntimeError):
    """Raised by the 'raises' degenerate kernel."""


def _spoil(value: Any, how: str) -> Any:
    import dataclasses

    import torch

    if isinstance(value, torch.Tensor):
        if how == "zeros":
            return torch.zeros_like(value)
        if value.dtype == torch.bool:
            return ~value
        return torch.full_like(value, float("nan")) if value.is_floating_point() else value + 1
    if isinstance(value, bool):
        return False if how == "zeros" else not value
    if isinstance(value, int):
        return 0 if how == "zeros" else value + 1
    if isinstance(value, float):
        return 0.0 if how == "zeros" else float("nan")
    if isinstance(value, str):
        return ""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_spoil(v, how) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_spoil(v, how) for v in value)
    if isinstance(value, dict):
        return {k: _spoil(v, how) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _spoil(getattr(value, f.name), how)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def degenerate(kernel: Kernel, how: str) -> Callable:
    """A broken stand-in for ``kernel``: returns NaN ("nan"), zeros ("zeros") where the reference
    returns numbers, its first input ("echo"), or raises ("raises")."""
    if how not in DEGENERATE:
        raise ValueError(f"how must be one of {DEGENERATE}")
    ref = kernel.fn
    params = list(kernel.signature.parameters)

    def broken(*args: Any, **kwargs: Any) -> Any:
        if how == "raises":
            raise DegenerateKernelCalled(f"degenerate {kernel.name} called")
        if how == "echo":
            return args[0] if args else kwargs[params[0]]
        return _spoil(ref(*args, **kwargs), how)

    broken.__name__ = kernel.name
    return broken
