"""Chores every stage shares: which device to run on, and progress bars that suit a terminal and a log.

Cheap to import (no torch at import time), so the command line can use it.
"""

from __future__ import annotations

import os
import sys
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
