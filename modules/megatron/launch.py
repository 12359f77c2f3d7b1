"""Start a world of processes on torch.distributed (gloo on CPU), run one function on every rank,
collect what each rank returned, and never hang.

    results = run_world(world_size, fn, *args, timeout_s=20)   # fn(rank, world_size, *args) -> picklable

Why ``os.fork`` and not ``torch.multiprocessing.spawn``:
- spawn starts fresh interpreters that each import torch again (about a second of CPU apiece on a
  small machine); a fork of a parent that has already imported torch starts in milliseconds;
- a fork inherits everything the parent holds -- the function to run and the kernels it calls,
  the user's own function under ``llmaudit check`` included -- so nothing has to be pickled;
- ``llmaudit check`` runs audits in a daemonic child, and multiprocessing refuses to start children
  from a daemonic process; a plain fork has no such rule.
The children never return into the parent's code: each ends with ``os._exit`` after it has written
its result (or its exception, as text) to a file of a private temporary folder.

No hang: the process group's own timeout makes a collective whose partner never comes raise, and
the parent kills every rank that is still alive at its deadline, or as soon as one rank has failed
(its partners would otherwise wait in a collective that never completes). Every child is reaped
before ``run_world`` returns or raises.
"""
from __future__ import annotations

import datetime
import os
import pickle
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

COLLECTIVE_TIMEOUT_S = 10.0  # a collective waiting this long for its partner raises in the rank


class WorldFailed(RuntimeError):
    """A rank raised, died or the world ran past its deadline; the message says which and why."""


def _child(rank: int, world_size: int, folder: str, fn: Callable, args: tuple, collective_timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(1)  # tiny tensors, shared cores; also keeps OpenMP out of the forked child
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout_s))
        out = ("ok", fn(rank, world_size, *args))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - sent to the parent as words
        first_line = (str(exc).strip().splitlines() or [""])[0]
        out, code = ("error", f"{type(exc).__name__}: {first_line}", traceback.format_exc(limit=6)), 1
    try:
        tmp = Path(folder) / f"rank{rank}.tmp"
        tmp.write_bytes(pickle.dumps(out))
        tmp.rename(Path(folder) / f"rank{rank}.pkl")
    finally:
        os._exit(code)


def run_world(world_size: int, fn: Callable, *args: Any, timeout_s: float = 30.0,
              collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked ranks of one gloo process group
    and return the ranks' results in rank order. Raises WorldFailed if a rank raises (with its
    message), dies, or the world is not done after ``timeout_s`` seconds; no child outlives the call."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="llmaudit-world-") as folder:
        pids: dict[int, int] = {}
        status: dict[int, int] = {}
        killed: set[int] = set()
        try:
            for rank in range(world_size):
                pid = os.fork()
                if pid == 0:  # the child: never returns
                    _child(rank, world_size, folder, fn, args, collective_timeout_s)
                pids[rank] = pid
            deadline = time.monotonic() + timeout_s
            failed = None
            while len(status) < world_size:
                for rank, pid in pids.items():
                    if rank not in status:
                        done, code = os.waitpid(pid, os.WNOHANG)
                        if done:
                            status[rank] = code
                            if code != 0 and failed is None:
                                failed = rank
                if failed is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        finally:
            for rank, pid in pids.items():  # kill and reap whatever is still running
                if rank not in status:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    status[rank] = os.waitpid(pid, 0)[1]
                    killed.add(rank)
        results = []
        errors = []
        for rank in range(world_size):
            path = Path(folder) / f"rank{rank}.pkl"
            if not path.exists():
                if rank not in killed:
                    errors.append(f"rank {rank} died (wait status {status[rank]})")
                elif not errors and len(killed) == len(pids) - len(results) and time.monotonic() > deadline:
                    errors.append(f"rank {rank} was still running at the deadline of {timeout_s:g} s (a hung "
                                  "collective?) and was stopped")
                else:
                    errors.append(f"rank {rank} was stopped after a partner failed")
                continue
            out = pickle.loads(path.read_bytes())
            if out[0] == "error":
                errors.insert(0, f"rank {rank} raised {out[1]}")
            else:
                results.append(out[1])
        if errors:
            raise WorldFailed("; ".join(errors))
        return results
