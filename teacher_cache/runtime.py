"""Chores every stage shares: which device to run on, progress bars that suit a terminal and a log, and
pools of spawned processes that start without re-running the caller's script.

Cheap to import (no torch at import time), so the command line can use it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    import torch

PROGRESS_INTERVAL_S = 30.0
"""Seconds between two progress lines when stderr is not a terminal (a log file, CI)."""


def resolve_device(name: str, field: str = "device") -> torch.device:
    """``auto`` -> this rank's CUDA device if one is visible, else the CPU; ``cuda`` without a visible
    device is a configuration error that names ``field``. Under torchrun, ``cuda`` means this rank's
    device (``LOCAL_RANK``); a Ray worker sees only its own GPU, as device 0."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        # A configuration error like any other (the CLI reports it in one line, exit 2).
        raise ValueError(f"{field} 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


class _Lines:
    """A file for tqdm that turns its ``\\r``-redrawn frames into whole lines, for logs."""

    def __init__(self, out: TextIO):
        self.out, self.last = out, ""

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line and line != self.last:
            self.out.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.out.flush()


def progress_bar(
    iterable: Any = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    file: TextIO | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar. On a terminal, the usual redrawn bar. Anywhere else (stderr redirected to a log, CI)
    no ``\\r`` frames: one plain line at most every :data:`PROGRESS_INTERVAL_S` seconds, and a last one
    when the bar closes, so a log shows progress without thousands of overwritten frames.
    ``TQDM_DISABLE=1`` in the environment turns every bar off (tqdm reads it when ``disable`` is not given)."""
    out = file if file is not None else sys.stderr
    if disable:
        kwargs["disable"] = True
    if not (hasattr(out, "isatty") and out.isatty()):
        kwargs = {
            "mininterval": PROGRESS_INTERVAL_S,
            "maxinterval": PROGRESS_INTERVAL_S * 10,
            "bar_format": "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
            "dynamic_ncols": False,
            "ncols": None,
            **kwargs,
        }
        out = _Lines(out)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=out, **kwargs)


@contextlib.contextmanager
def main_hidden() -> Iterator[None]:
    """While processes spawn: ``multiprocessing``'s spawn re-imports the parent's ``__main__`` script in
    every child (as ``__mp_main__``). Pool children need nothing from it (their work lives in modules),
    and the script may not survive it: a script read from stdin, a Ray worker's entry point (imports Ray
    in every child), a user's script without a main guard (runs again). An empty stand-in module makes
    the children skip it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)``: a pool initializer (module-level, so spawned processes can run it)."""
    import torch

    torch.set_num_threads(n)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _init_pool_process(parent: int, init: Callable[..., None] | None, initargs: tuple) -> None:
    # Gone once the parent is: a SIGKILLed worker (a lost Ray actor, a test) leaves no orphan behind.
    threading.Thread(target=_watch_parent, args=(parent,), name="pool-parent-watch", daemon=True).start()
    if init is not None:
        init(*initargs)


def spawn_pool(processes: int, init: Callable[..., None] | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """``processes`` spawned processes (not forked: a fork of a process that has run torch's thread pools
    can deadlock), every one started before this returns, so later submits spawn nothing and the first
    task does not pay for the imports. Each runs ``init(*initargs)`` first (a module-level function) and
    exits when this process dies."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    executor = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_pool_process,
        initargs=(os.getpid(), init, initargs),
    )
    # The executor spawns processes on demand, one per submit: start them all now, under main_hidden.
    with main_hidden():
        started = [executor.submit(int) for _ in range(processes)]
    for f in started:
        f.result()
    return executor
