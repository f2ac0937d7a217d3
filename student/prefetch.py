"""The loader's join machinery: per-shard target blocks (each row's one view) and the background thread
that runs the join (tar stream, key lookup, content hash, target reads) ahead of decoding."""

from __future__ import annotations

import queue
import threading

import numpy as np


class TargetBlocks:
    """Targets of one shard for the loader: each row's chosen view, read a block of rows at a time.

    Only the valid rows of a block are read, each at its own view (schema 2: one byte range per run of
    adjacent rows that share a view; schema 1: whole chunks, every view)."""

    def __init__(self, reader, views: np.ndarray, valid: np.ndarray, step: int = 64):
        self.reader, self.views, self.valid, self.step = reader, views, valid, step
        self.block: dict = {}
        self.pos: dict[int, int] = {}
        self.b = -1

    def row(self, i: int) -> dict[str, np.ndarray]:
        """Stored targets of row ``i`` at its view."""
        b = i // self.step
        if b != self.b:
            rows = np.flatnonzero(self.valid[b * self.step : (b + 1) * self.step]) + b * self.step
            self.block = self.reader.read(rows, self.views[rows]) if len(rows) else {}
            self.pos = {int(r): j for j, r in enumerate(rows)}
            self.b = b
        j = self.pos[i]
        return {n: a[j] for n, a in self.block.items()}


_END = object()


class JoinThread:
    """Runs the join (tar stream, key lookup, content hash, target reads) in a background thread, a few
    dozen samples ahead of the consumer, which decodes and crops: hashing, file reads and JPEG decoding
    release the GIL, so with a free core the join's time hides behind decoding. Samples arrive in the
    same order as without the thread; an error in the join is raised in the consumer."""

    HANDOFF = 16  # samples per queue item: a queue hop costs ~10 µs

    def __init__(self, samples):
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(samples,), name="digpt-join", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, samples) -> None:
        try:
            chunk = []
            for s in samples:
                chunk.append(s)
                if len(chunk) == self.HANDOFF:
                    if not self._put(chunk):
                        return
                    chunk = []
            if chunk and not self._put(chunk):
                return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
        finally:
            samples.close()

    def wait(self):
        """The next handoff: a list of samples, ``_END``, or the join's exception."""
        return self.q.get()

    def __iter__(self):
        try:
            while True:
                item = self.wait()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            self.stop.set()
            self.thread.join(timeout=60)
