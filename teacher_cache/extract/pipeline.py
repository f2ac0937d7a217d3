"""One shard's rows through overlapped stages, joined by bounded queues::

    reader thread ──▶ decode/crop pool ──────────────────▶ forward (calling thread) ──▶ writer thread
    tar + hash check    decode, size check, replay K views    teacher, in batches          Zarr chunks

The decode/crop pool is ``decode_threads`` threads of this process, or a :class:`DecodePool` of
``decode_processes`` spawned processes that the worker keeps for its whole life. Threads cost nothing to
start but share this process's GIL with the reader, the forward and the writer; with a fast teacher
(a GPU's) that contention, not any one stage, bounds the pipeline (BENCHMARKS.md, #12.1). Processes take
rows a few at a time (one round trip per ``rows_per_task`` rows) and send back float32 arrays.

Determinism does not depend on the overlap: rows are consumed in index order whatever order the decode
threads finish in, and the teacher sees exactly the batches the serial loop formed — per chunk of
``chunk_rows`` rows, the decoded rows' views in order, ``batch_size`` at a time, the remainder last — so
a cache's bytes are the same for any number of threads. Only the writer thread writes, one whole chunk at
a time (DESIGN invariant 3); :func:`run_rows` returns only once it has stopped, even on an error, so no
write of a failed shard can land after its retry has begun.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..images import BadImage, decode_image, to_uint8_chw
from ..runtime import spawn_pool
from ..shards import pick_image
from ..teachers import Teacher
from ..views import replay_view

_END = object()  # end of a stream
_POLL_S = 0.05  # how often a blocked put/get looks whether the other side has failed


class _Stop(Exception):
    """The consuming side failed or finished early; a producer stops quietly."""


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    """``q.put`` that gives up when ``stop`` is set (the consumer is gone: never block forever)."""
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, alive: Callable[[], bool]) -> Any:
    """``q.get`` that raises when the producer died without ending its stream."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if not alive():
                try:  # it may have put its last item just before ending
                    return q.get_nowait()
                except queue.Empty:
                    raise RuntimeError("an extraction stage ended without finishing its stream") from None


def decode_row(
    row: dict[str, Any], raw: Any, boxes: np.ndarray, flips: np.ndarray, size: int
) -> tuple[torch.Tensor | None, str]:
    """``(views [K, 3, size, size], "")`` of one manifest row, or ``(None, reason)`` when it is unusable.

    The reason is the manifest's own error, ``no image member``, or the decoder's :class:`BadImage`."""
    if row["error"]:
        return None, row["error"]
    picked = pick_image(raw) if raw is not None else None
    if picked is None:
        return None, "no image member"
    try:
        img = torch.from_numpy(to_uint8_chw(decode_image(picked[1])))
        if tuple(img.shape[1:]) != (row["height"], row["width"]):
            raise BadImage(f"decoded size {tuple(img.shape[1:])} differs from manifest")
    except BadImage as e:
        return None, str(e)
    return torch.stack([replay_view(img, boxes[v], flips[v], size) for v in range(len(boxes))]), ""


Task = tuple[dict[str, Any], Any, np.ndarray, np.ndarray]
"""One row to decode: ``(manifest row, raw sample or None, its views' boxes, their flips)``."""


def decode_rows(tasks: list[Task], size: int) -> list[tuple[np.ndarray | None, str]]:
    """:func:`decode_row` over several rows, views as float32 numpy arrays (views of the tensors, no copy):
    the unit of work of a decode thread or process (arrays pickle as plain bytes; tensors would travel
    as shared-memory handles, one file descriptor each)."""
    out = []
    for row, raw, boxes, flips in tasks:
        views, reason = decode_row(row, raw, boxes, flips, size)
        out.append((views.numpy() if views is not None else None, reason))
    return out


def _init_decode_process() -> None:
    """A decode process: one torch thread (the pool is the parallelism)."""
    torch.set_num_threads(1)


class DecodePool:
    """``processes`` spawned decode/crop processes (:func:`~teacher_cache.runtime.spawn_pool`), started
    once per extraction worker and shared by the shards it runs (``shards_in_flight``)."""

    def __init__(self, processes: int, rows_per_task: int = 8):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes, self.rows_per_task = processes, rows_per_task
        # No process is spawned after this: one that dies breaks the pool, and the worker replaces the pool.
        self.executor = spawn_pool(processes, _init_decode_process)

    @property
    def broken(self) -> bool:
        """A process of the pool died (killed, out of memory): the pool takes no more work."""
        try:
            self.executor.submit(int).result(timeout=60)
        except Exception:  # noqa: BLE001 - BrokenProcessPool, or a pool that no longer answers
            return True
        return False

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class Forward:
    """The teacher on its device: ``views [n, 3, S, S] -> (tokens, cls or None)`` on the host.

    On CUDA the batch is pinned and copied without blocking, the forward may run under autocast
    (``bf16``/``fp16``), and the outputs come back through pinned memory. ``store_dtype`` is the cache's
    storage dtype: for ``fp16``/``bf16`` float outputs are narrowed to it on the device before they travel
    (half of float32's bytes; the same bits the store's own rounding gives, so the cache is unchanged);
    otherwise they come back in the dtype the teacher produced (the store encodes them)."""

    def __init__(self, teacher: Teacher, device: torch.device, autocast: str = "none", store_dtype: str | None = None):
        self.teacher, self.device = teacher, device
        self.cuda = device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast) if self.cuda else None
        self.narrow = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(store_dtype or "")

    def _host(self, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        if self.narrow is not None and x.is_floating_point():
            x = x.to(self.narrow)
        if not self.cuda:
            return x
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return out.copy_(x, non_blocking=True)

    def __call__(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cuda:
            views = views.pin_memory().to(self.device, non_blocking=True)
        else:
            views = views.to(self.device)
        ctx = torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        with ctx:
            out = self.teacher(views)
        tokens, cls = self._host(out.tokens), self._host(out.cls)
        if self.cuda:  # the copies above are queued: wait for them before the host reads the buffers
            torch.cuda.current_stream(self.device).synchronize()
        return tokens, cls


class Writer:
    """The one thread that writes a shard group: ``start(first)`` runs ``first()`` (create the group and
    its metadata) on it, then each :meth:`put` ``(lo, hi, idx, tokens, cls)`` block in order."""

    def __init__(self, write: Callable[..., None], after_first: Callable[[], None], depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._write, self._after_first = write, after_first
        self._thread: threading.Thread | None = None

    def start(self, first: Callable[[], None]) -> Writer:
        self._thread = threading.Thread(target=self._run, args=(first,), name="extract-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self, first: Callable[[], None]) -> None:
        try:
            first()
            n = 0
            while (item := self.q.get()) is not _END:
                self._write(*item)
                n += 1
                if n == 1:
                    self._after_first()
        except BaseException as e:  # noqa: BLE001 - handed to the forward thread, which raises it
            self.error = e
            self.stop.set()

    def put(self, *block: Any) -> None:
        try:
            _put(self.q, block, self.stop)
        except _Stop:
            self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, ok: bool) -> None:
        """Finish (``ok``: every block was put) or abandon the stream; returns once the thread is gone."""
        if self._thread is None:
            return
        if not ok:
            self.stop.set()
        while self._thread.is_alive():  # (a writer that failed is gone already: nothing to tell it)
            if self.stop.is_set():  # abandoning: the queued blocks are dropped, so the end marker fits
                with contextlib.suppress(queue.Empty):
                    while True:
                        self.q.get_nowait()
            try:
                self.q.put(_END, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        if ok:
            self.raise_error()


def _reader(
    samples: Iterator[tuple[dict[str, Any], Any]],
    boxes: np.ndarray,
    flips: np.ndarray,
    size: int,
    pool: Executor,
    per_task: int,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Read rows in index order and queue ``(first index, future)`` per ``per_task`` rows (the queue's
    bound holds the reader back)."""
    try:
        tasks: list[Task] = []
        for row, raw in samples:
            i = row["index"]
            tasks.append((row, raw, boxes[i], flips[i]))
            if len(tasks) == per_task:
                _put(out, (tasks[0][0]["index"], pool.submit(decode_rows, tasks, size)), stop)
                tasks = []
        if tasks:
            _put(out, (tasks[0][0]["index"], pool.submit(decode_rows, tasks, size)), stop)
        _put(out, _END, stop)
    except _Stop:
        return
    except BaseException as e:  # noqa: BLE001 - a shard that no longer matches its manifest, a broken tar
        with contextlib.suppress(_Stop):
            _put(out, e, stop)


class Batches:
    """Views to a teacher forward in batches of exactly ``batch_size``, in the order they were added, the
    remainder last (at :meth:`finish`); the outputs concatenated. The one batching of every extraction
    path, so the teacher sees the same batches (and the cache gets the same bytes) wherever it runs."""

    def __init__(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], batch_size: int):
        self.forward, self.batch_size = forward, batch_size
        self._pending: list[torch.Tensor] = []
        self._toks: list[torch.Tensor] = []
        self._clss: list[torch.Tensor] = []

    def add(self, views: torch.Tensor) -> None:
        """Queue ``views [k, 3, S, S]``; every full batch runs now."""
        self._pending.extend(views.unbind(0))
        while len(self._pending) >= self.batch_size:
            self._flush(self.batch_size)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the remainder; ``(tokens, cls or None)`` of every view added since the last call, in order."""
        if self._pending:
            self._flush(len(self._pending))
        toks, clss = self._toks, self._clss
        self._toks, self._clss = [], []
        return torch.cat(toks), (torch.cat(clss) if clss else None)

    def _flush(self, count: int) -> None:
        t, cl = self.forward(torch.stack(self._pending[:count]))
        del self._pending[:count]
        self._toks.append(t)
        if cl is not None:
            self._clss.append(cl)


class _DecodedRows:
    """The decode side of one shard: a reader thread queues the rows (index order) to the decode pool; the
    forward thread takes them back with :meth:`next` in the same order. Row ``i`` is the manifest's row
    ``i`` or the stream is refused (a tar that lost or gained samples)."""

    def __init__(
        self,
        n: int,
        samples: Iterator[tuple[dict[str, Any], Any]],
        boxes: np.ndarray,
        flips: np.ndarray,
        size: int,
        batch_size: int,
        decode_threads: int,
        decode_pool: DecodePool | None,
    ):
        self.n = n
        self.stop = threading.Event()
        self._owned = decode_pool is None  # threads started for this shard, stopped with it
        if decode_pool is not None:
            self.pool: Executor = decode_pool.executor
            per_task, width = decode_pool.rows_per_task, decode_pool.processes
        else:
            self.pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="extract-decode")
            per_task, width = 1, decode_threads
        # Enough decoded rows queued to fill two teacher batches, and every decoder busy meanwhile.
        self.decoded: queue.Queue = queue.Queue(maxsize=max(4 * width, -(-2 * batch_size // per_task)))
        self.reader = threading.Thread(
            target=_reader,
            args=(samples, boxes, flips, size, self.pool, per_task, self.decoded, self.stop),
            name="extract-reader",
            daemon=True,
        )
        self._ready: list[tuple[np.ndarray | None, str]] = []  # the current task's decoded rows; the next is row `_at`
        self._at = 0

    def start(self) -> None:
        self.reader.start()

    def next(self, i: int) -> tuple[torch.Tensor | None, str]:
        """Row ``i``'s ``(views, "")`` or ``(None, reason)``; rows are asked for in index order."""
        if not self._ready:
            item = self._get()
            if item is _END or item[0] != i:  # the reader yields every manifest row, in order
                raise RuntimeError(f"row {i} of {self.n} missing from the shard's sample stream")
            self._ready, self._at = item[1].result(), i
        views, reason = self._ready.pop(0)
        if self._at != i:
            raise RuntimeError(f"row {i} of {self.n} missing from the shard's sample stream")
        self._at += 1
        return (None if views is None else torch.from_numpy(views)), reason

    def check_end(self) -> None:
        """After row ``n - 1``: the stream's end is read too, so a tar with more samples than its manifest fails."""
        tail = self._get() if not self._ready else None
        if tail is not _END:
            raise RuntimeError(f"the shard's sample stream holds more than its manifest's {self.n} rows")

    def _get(self) -> Any:
        item = _get(self.decoded, self.reader.is_alive)
        if isinstance(item, BaseException):  # the reader's failure, raised on this thread
            raise item
        return item

    def close(self) -> None:
        """Stop the reader (and the decode threads this shard started); returns once it is gone."""
        self.stop.set()
        if self._owned:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.join()
        # A shared pool outlives this shard: cancel what this shard queued and never used.
        with contextlib.suppress(queue.Empty):
            while True:
                item = self.decoded.get_nowait()
                if isinstance(item, tuple) and isinstance(item[1], Future):
                    item[1].cancel()


def run_rows(
    n: int,
    samples: Iterator[tuple[dict[str, Any], Any]],
    boxes: np.ndarray,
    flips: np.ndarray,
    size: int,
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    writer: Writer,
    chunk_rows: int,
    batch_size: int,
    decode_threads: int,
    decode_pool: DecodePool | None = None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode, forward and hand to ``writer`` every chunk of rows ``[0, n)``.

    ``samples`` yields ``(row, raw)`` for every manifest row in index order (``raw`` is ``None`` for a row
    whose sample is gone); row ``i``'s views are ``boxes[i]``, ``flips[i]`` at ``size`` px. Rows decode on
    ``decode_pool`` when given, else on ``decode_threads`` threads started for this call. Returns the
    ``valid`` mask and ``(index, reason)`` of every unusable row, in index order."""
    valid = np.zeros(n, dtype=bool)
    skipped: list[tuple[int, str]] = []
    rows = _DecodedRows(n, samples, boxes, flips, size, batch_size, decode_threads, decode_pool)
    batches = Batches(forward, batch_size)
    ok = False
    try:
        rows.start()
        c = max(1, min(chunk_rows, n))
        for lo in range(0, n, c):  # one chunk at a time: the writer gets whole chunks
            rows_ok = _run_chunk(rows, lo, min(lo + c, n), batches, writer, skipped)
            if rows_ok:
                valid[rows_ok] = True
        rows.check_end()
        ok = True
    finally:
        rows.close()
        writer.close(ok)
    return valid, skipped


def _run_chunk(
    rows: _DecodedRows, lo: int, hi: int, batches: Batches, writer: Writer, skipped: list[tuple[int, str]]
) -> list[int]:
    """Rows ``[lo, hi)`` through the teacher and to ``writer`` as one block; returns the usable rows and
    appends ``(index, reason)`` of the others to ``skipped``."""
    rows_ok: list[int] = []
    for i in range(lo, hi):
        views, reason = rows.next(i)
        if views is None:
            skipped.append((i, reason))
            continue
        rows_ok.append(i)
        batches.add(views)
        writer.raise_error()
    if not rows_ok:  # no row of this chunk decoded: its target chunks are written as fill values
        writer.put(lo, hi, np.zeros(0, dtype=np.int64), None, None)
        return rows_ok
    tokens, cls = batches.finish()
    writer.put(lo, hi, np.asarray(rows_ok) - lo, tokens, cls)
    return rows_ok
