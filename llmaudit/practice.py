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
from dataclasses import dataclass, field
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


def _exit_text(exc: BaseException) -> str:
    """'called sys.exit(0)' or 'raised KeyboardInterrupt': how user code tried to end the program."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    return f"raised {type(exc).__name__}"


class UserCodeExited(RuntimeError):
    """The user's function called sys.exit or raised KeyboardInterrupt; a failure of their file."""


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
    except (SystemExit, KeyboardInterrupt) as exc:
        raise KernelFileError(f"{path} {_exit_text(exc)} while being imported{_user_frame(exc, path)}: code at "
                              "module level must not end the program. This counts as a failure of your file.") from None
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


def preflight(fn: Callable, kernel: Kernel, path: Path) -> tuple[float, float]:
    """Call the user's function on the kernel's small example; compare the output's structure and shapes.
    Returns the seconds one call took: (the user's, the reference's)."""
    import time

    kernel.fn(**kernel.example())  # warm-up: the first call of anything pays for lazy initialisation
    start = time.perf_counter()
    ref = kernel.fn(**kernel.example())
    ref_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        mine = fn(**kernel.example())
    except (SystemExit, KeyboardInterrupt) as exc:
        raise KernelFileError(f"`{kernel.name}` in {path} {_exit_text(exc)}{_user_frame(exc, path)} when called "
                              "with the example input. A kernel returns its result and never ends the program; "
                              "this counts as a failure of your file.") from None
    except NotImplementedError:
        raise KernelFileError(f"`{kernel.name}` in {path} still raises NotImplementedError: replace the "
                              "`raise NotImplementedError` line of the stub with your implementation.") from None
    except Exception as exc:  # noqa: BLE001 - the user's function failing on a valid input
        args = ", ".join(f"{k}={describe_structure(v)}" for k, v in kernel.example().items())
        raise KernelFileError(f"`{kernel.name}` in {path} raised {_exc_text(exc)}{_user_frame(exc, path)} when "
                              f"called with {args}. Check the shapes in the docstring.") from None
    mine_s = time.perf_counter() - start
    if not _same_structure(mine, ref):
        raise KernelFileError(f"`{kernel.name}` in {path} returned {describe_structure(mine)}, but the audit "
                              f"expects {describe_structure(ref)} for the example input. Check the shapes and "
                              "what the docstring says to return.")
    return mine_s, ref_s


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
    kernels whose outputs should be finite), and the time spent inside it. On the first TIMED_CALLS
    calls it also times the reference on a copy of the same inputs, so "slow" compares like with like
    (a loaded machine slows both)."""

    TIMED_CALLS = 5

    def __init__(self, fn: Callable, kernel: Kernel):
        self.fn, self.kernel = fn, kernel
        self.calls = self.nan_calls = self.inf_calls = self.exits = 0
        self.seconds = 0.0
        self.timed_calls, self.timed_mine_s, self.timed_ref_s = 0, 0.0, 0.0  # same inputs, both functions
        self.__name__ = kernel.name
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import copy
        import time

        if self.timed_calls < self.TIMED_CALLS:  # time the reference on a copy of the same inputs first
            import torch

            try:
                ref_args, ref_kwargs = copy.deepcopy((args, kwargs))
                with torch.random.fork_rng(devices=[]):  # the audit's random stream stays as it was
                    start = time.perf_counter()
                    self.kernel.fn(*ref_args, **ref_kwargs)
                    ref_s = time.perf_counter() - start
            except Exception:  # noqa: BLE001 - an input that cannot be copied: no comparison for this call
                ref_s = None
        start = time.perf_counter()
        try:
            out = self.fn(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt) as exc:  # the user's code, not Ctrl-C: the child ignores SIGINT
            self.exits += 1
            raise UserCodeExited(f"your {self.kernel.name} {_exit_text(exc)}: a kernel returns its result and "
                                 "never ends the program") from None
        finally:
            took = time.perf_counter() - start
            self.seconds += took
            self.calls += 1
        if self.timed_calls < self.TIMED_CALLS and ref_s is not None:
            self.timed_calls += 1
            self.timed_mine_s += took
            self.timed_ref_s += ref_s
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
        if self.exits:
            said.append(f"your {self.kernel.name} tried to end the program (sys.exit or KeyboardInterrupt) on "
                        f"{self.exits} of {self.calls} calls; each such call failed its check")
        if self.inf_calls:
            said.append(f"your {self.kernel.name} returned inf on {self.inf_calls} of {self.calls} calls whose "
                        "inputs were finite (division by zero, exp overflow?)")
        return said

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "nan_calls": self.nan_calls, "inf_calls": self.inf_calls,
                "exits": self.exits, "seconds": round(self.seconds, 4)}


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


# ------------------------------------------------------------------------------------------------
# Running the user's code in a child process, under a time limit

DEFAULT_TIMEOUT_S = 120.0  # a toy `check` takes seconds with a correct kernel, a full one well under a minute
STARTUP_TIMEOUT_S = 300.0  # importing torch and the audits in the child, before the time limit starts
SLOW_MS, SLOW_FACTOR = 10.0, 10.0  # "slow": at least 10 ms per call and 10x the reference on the same input


def slow_note(kernel_name: str, per_call_s: float, ref_s: float | None, where: str) -> str | None:
    """'your function is slow: N ms per call ...' when it is, else None."""
    ms = 1000 * per_call_s
    if ms < SLOW_MS or (ref_s and per_call_s < SLOW_FACTOR * ref_s):
        return None
    ref = f" (the reference: {1000 * ref_s:.2f} ms)" if ref_s else ""
    return (f"your function is slow: {ms:.0f} ms per call {where}{ref}; the checks call {kernel_name} many "
            "times, so they take longer (a Python loop over elements? tensor operations are much faster)")


@dataclass
class CheckOutcome:
    """How a check run in the child process ended: "done" (record, findings, calls), "file_error",
    "timeout", "crashed", "usage" or "environment" (message). ``info`` names the module and the checks
    that call the kernel (``mine``) or not (``other_kernels``, ``module_only``)."""

    status: str
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    record: Any = None
    findings: list[str] = field(default_factory=list)
    calls: dict[str, Any] = field(default_factory=dict)


def _check_in_child(conn, kernel_name: str, path: str, mode: str, seeds: list[int]) -> None:
    """The child: load and pre-flight the user's file, run the checks, send events and the outcome."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent; a KeyboardInterrupt here is user code
    os.dup2(2, 1)  # what the user's code prints goes to stderr: stdout carries only the parent's results
    try:
        _check_steps(conn, kernel_name, path, mode, seeds)
    except BaseException as exc:  # noqa: BLE001 - reported by the parent in one paragraph
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _check_steps(conn, kernel_name: str, path: str, mode: str, seeds: list[int]) -> None:
    from llmaudit.registry import BrokenAudit, UnknownName, get_audit, get_kernel
    from llmaudit.runner import configure_torch, run_audit

    try:
        k = get_kernel(kernel_name)
        spec = get_audit(k.module)
    except UnknownName as exc:
        conn.send(("usage", str(exc)))
        return
    except BrokenAudit as exc:
        conn.send(("environment", str(exc)))
        return
    configure_torch()
    mine = [c.name for c in spec.checks_of_kernel(k.name, mode)]
    conn.send(("started", {"module": k.module, "mine": mine,
                           "other_kernels": [c.name for c in spec.checks_for(mode) if c.name not in mine and c.kernels],
                           "module_only": [c.name for c in spec.checks_for(mode) if not c.kernels]}))
    try:
        fn = load_user_function(Path(path), k)
        mine_s, ref_s = preflight(fn, k, Path(path))
    except KernelFileError as exc:
        conn.send(("file_error", str(exc)))
        return
    note = slow_note(k.name, mine_s, ref_s, "on the small example")
    if note:
        conn.send(("slow", note))
    spy = KernelSpy(fn, k)
    rec = run_audit(k.module, mode=mode, seeds=seeds, kernels={k.name: spy}, kernel_sources={k.name: path},
                    only=mine, progress=lambda f: conn.send(("progress", f)))
    note = None
    if spy.timed_calls:  # slow against the reference on the audit's own inputs, not on an absolute clock
        note = slow_note(k.name, spy.timed_mine_s / spy.timed_calls, spy.timed_ref_s / spy.timed_calls,
                         f"on the audit's inputs ({spy.timed_calls} calls timed beside the reference)")
    conn.send(("done", rec, spy.findings() + ([note] if note else []), spy.to_dict()))


def check_in_child(kernel_name: str, path: Path, mode: str, seeds: list[int], *,
                   timeout_s: float = DEFAULT_TIMEOUT_S, on_event: Callable[[tuple], None] | None = None,
                   startup_timeout_s: float = STARTUP_TIMEOUT_S) -> CheckOutcome:
    """Run the user's kernel through the checks that call it in a child process, stopping it after
    ``timeout_s`` seconds (counted once the child has loaded the engine and the audit). ``on_event``
    receives ("started", info), ("progress", fraction) and ("slow", note) as they happen. Ctrl-C stops
    the child and propagates."""
    import multiprocessing
    import time

    # fork is cheap and safe while this process has not loaded torch (the CLI); once it has (tests, the
    # quiz), a fresh interpreter avoids forking torch's thread pools
    method = "fork" if "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_check_in_child, args=(sender, kernel_name, str(path), mode, list(seeds)),
                        daemon=True, name="llmaudit-check")
    child.start()
    sender.close()
    deadline, progress, info = time.monotonic() + startup_timeout_s, 0.0, {}
    try:
        while True:
            if receiver.poll(0.05):
                try:
                    event = receiver.recv()
                except EOFError:  # the child ended without a result
                    break
                kind = event[0]
                if kind == "started":
                    deadline, info = time.monotonic() + timeout_s, event[1]
                if kind == "progress":
                    progress = event[1]
                if kind in ("started", "progress", "slow") and on_event is not None:
                    on_event(event)
                elif kind in ("file_error", "usage", "environment"):
                    return CheckOutcome(kind, event[1], info)
                elif kind == "error":
                    return CheckOutcome("crashed", f"checking your {kernel_name} stopped: {event[1]}", info)
                elif kind == "done":
                    return CheckOutcome("done", info=info, record=event[1], findings=event[2], calls=event[3])
            elif not child.is_alive() and not receiver.poll():
                break
            if time.monotonic() > deadline:
                if not info:
                    return CheckOutcome("crashed", f"loading the {kernel_name} audit took over {startup_timeout_s:g} s;"
                                                   " the machine is overloaded or the install is broken (llmaudit doctor)")
                where = "on its first call (the small example input)" if progress == 0 else \
                    f"with {progress:.0%} of the checks done"
                return CheckOutcome("timeout", f"your {kernel_name} timed out after {timeout_s:g} s {where}: the "
                                               "process running it was stopped. An endless loop? Try it on the "
                                               "docstring's example first, or allow more time with --timeout.", info)
        child.join(5)
        return CheckOutcome("crashed", f"the process running your {kernel_name} from {path} ended without a result "
                                       f"(exit code {child.exitcode}): your code ended it (os._exit, a signal) or "
                                       "crashed Python. This counts as a failure of your file.", info)
    finally:
        receiver.close()
        if child.is_alive():
            child.terminate()
            child.join(2)
            if child.is_alive():
                child.kill()
                child.join(2)
