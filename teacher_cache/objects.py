"""Target arrays as a few objects per dataset shard: Zarr v3 sharding, written as a stream, read by range.

A target array ``tokens [n, K, T, D]`` (likewise ``token_scale``, ``cls``, ``cls_scale``) has shards
``(n, 1, T, D)`` and inner chunks ``(1, 1, T, D)``: **one object per view** (key ``tokens/c/0/v/0/0``),
holding one inner chunk per sample, in row order, followed by the shard index (``n`` x (offset, nbytes)
uint64 + crc32c, Zarr's default ``index_location="end"``). Every inner chunk is ``[compressor,] crc32c``.
So a dataset shard maps to ``K`` objects per target array, whatever its row count, and the loader's read
of one sample's view is one byte range of exactly that view's bytes (plus the index, read once per shard).

Why not let zarr write these: a partial write into a zarr shard is a read-modify-write of the whole
object, and the extractor produces a shard's rows a block at a time, so zarr would rewrite an object of
``n`` rows ``n / block`` times (quadratic bytes), or the whole shard would have to sit in memory until its
last row (``n x K x`` ~400 KB for CLIP-L fp16). :class:`ShardWriter` instead appends each block's
encoded inner chunks to a spool file per object and writes the index when the shard ends: linear, with
memory bounded by one block. A local object is renamed into place when complete (an interrupted shard
leaves only ``*.partial`` files in a group without ``complete``, which the next run deletes); on an
object store the spool (a local temporary file) is uploaded once at the end, by the filesystem's
``put_file`` (multipart on S3/GCS, so memory stays bounded there too). The bytes are the Zarr v3 sharding format, so zarr
itself reads them (``g["tokens"][...]``) and tests compare both readers.

Why not read through zarr in the loader: zarr fetches the inner chunks of a partial shard read one
``await`` after another and decodes each through its async codec pipeline; :class:`ViewReader` reads the
index once, coalesces the rows of a block that use the same view into one byte range, and fetches all
ranges of a block in one ``get_partial_values`` call (concurrent on object stores), or, for a local cache,
slices them out of a memory map of each object (no read call, no copy). Raw float inner chunks are
returned as views, never copied before the batch is formed.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .names import TARGETS

_EMPTY = np.uint64(2**64 - 1)


class ObjectDamaged(ValueError):
    """An object of a sharded array is missing, truncated or fails a checksum: which object, row, view."""

    def __init__(self, key: str, what: str, row: int | None = None, view: int | None = None):
        where = "" if row is None else f"inner chunk of row {row}, view {view}: "
        super().__init__(f"object {key}: {where}{what}")
        self.key, self.what, self.row, self.view = key, what, row, view


def crc_bytes(data: Any) -> bytes:
    return np.uint32(google_crc32c.value(data)).tobytes()


def is_view_sharded(arr: Any) -> bool:
    """Whether ``arr`` has this module's layout (shards of all rows x one view, one inner chunk per sample view)."""
    return arr.shards is not None and arr.shards[1:2] == (1,) and arr.chunks[:2] == (1, 1)


@dataclass(frozen=True)
class _Codec:
    """The inner-chunk codec chain of a sharded array: ``bytes`` (little endian), optional Blosc, crc32c."""

    dtype: np.dtype
    shape: tuple[int, ...]  # inner chunk shape without the (1, 1) leading dims
    blosc: Blosc | None

    @classmethod
    def of(cls, arr: Any) -> _Codec:
        sharding = arr.metadata.codecs[0]
        assert isinstance(sharding, ShardingCodec), arr.metadata.codecs
        blosc = None
        for c in sharding.codecs:
            if isinstance(c, BloscCodec):
                blosc = Blosc(cname=c.cname.value, clevel=c.clevel, shuffle=Blosc.BITSHUFFLE, blocksize=c.blocksize)
            elif not isinstance(c, (BytesCodec, Crc32cCodec)):
                raise ValueError(f"array {arr.path!r}: unsupported inner codec {c!r}")
        return cls(np.dtype(arr.dtype).newbyteorder("<"), tuple(arr.chunks[2:]), blosc)

    def encode(self, chunk: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(chunk, dtype=self.dtype)
        body = self.blosc.encode(raw) if self.blosc is not None else raw.tobytes()
        return bytes(body) + crc_bytes(body)

    def decode(self, data: np.ndarray) -> np.ndarray:
        """Check the crc of one inner chunk's bytes (uint8) and decode them (raw: a view, no copy);
        raises ``ValueError``."""
        body, crc = data[:-4], data[-4:].tobytes()
        if len(data) < 4 or crc_bytes(body) != crc:
            raise ValueError("checksum mismatch")
        if self.blosc is not None:
            body = np.frombuffer(self.blosc.decode(body), dtype=np.uint8)
        return body.view(self.dtype).reshape(self.shape)


def object_key(arr: Any, view: int) -> str:
    coords = (0, view) + (0,) * (len(arr.shape) - 2)
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _index_bytes(offsets: np.ndarray) -> bytes:
    body = offsets.astype("<u8").tobytes()
    return body + crc_bytes(body)


class _ObjectWriter:
    """Appends encoded inner chunks of one object to a spool file; ``close`` adds the index and publishes."""

    def __init__(self, store: Any, key: str, rows: int):
        self.store, self.key, self.rows = store, key, rows
        self.entries = np.full((rows, 2), _EMPTY, dtype=np.uint64)
        self.pos, self.done = 0, 0
        if isinstance(store, LocalStore):
            self.final = os.path.join(str(store.root), key)
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            self.spool_path = self.final + ".partial"
            self.f = open(self.spool_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        else:
            self.final = None
            self.f = tempfile.NamedTemporaryFile(prefix="digpt-", suffix=".partial", delete=False)  # noqa: SIM115
            self.spool_path = self.f.name
        # A shard that fails midway drops its writer: the spool goes with it (a local one would also go
        # with its group, which the next run deletes; a temporary one would not). Detached once closed or
        # aborted: a retry of the shard in this process spools to the same path, and a late finalizer
        # (the failed attempt's traceback keeps this writer alive) must not delete the retry's file.
        self._finalizer = weakref.finalize(self, _unlink, self.f, self.spool_path)

    def append(self, row: int, data: bytes) -> None:
        self.f.write(data)
        self.entries[row] = (self.pos, len(data))
        self.pos += len(data)

    def close(self) -> None:
        missing = np.flatnonzero(self.entries[:, 0] == _EMPTY)
        if len(missing):  # every row is written (fill values too): a gap is a bug, never silent fill
            raise RuntimeError(f"{self.key}: rows {missing[:4].tolist()} were never written")
        self._finalizer.detach()
        self.f.write(_index_bytes(self.entries))
        self.f.close()
        if self.final is not None:
            os.replace(self.spool_path, self.final)
            return
        try:
            fs = getattr(self.store, "fs", None)
            if fs is not None and hasattr(fs, "_put_file"):  # fsspec (s3fs, gcsfs): multipart, streamed from disk
                sync(_upload(fs, self.spool_path, f"{self.store.path.rstrip('/')}/{self.key}"))
            else:
                with open(self.spool_path, "rb") as f:
                    data = f.read()
                sync(self.store.set(self.key, default_buffer_prototype().buffer.from_bytes(data)))
        finally:
            os.unlink(self.spool_path)

    def abort(self) -> None:
        self._finalizer.detach()
        _unlink(self.f, self.spool_path)


def _unlink(f: Any, path: str) -> None:
    if not f.closed:
        f.close()
    if os.path.exists(path):
        os.unlink(path)


class ShardWriter:
    """Writes the sharded target arrays of one shard group, row block by row block, each row once.

    ``write(name, lo, block)`` takes ``block [m, K, ...]`` for rows ``lo .. lo + m``; blocks may come in
    any order but each row exactly once. ``close()`` finalises every object (call it before marking the
    shard complete); ``abort()`` drops the spools."""

    def __init__(self, g: Any):
        self.g = g
        self.arrays = {n: g[n] for n in TARGETS if n in g}
        self.codecs = {n: _Codec.of(a) for n, a in self.arrays.items()}
        self.objects = {
            (n, v): _ObjectWriter(g.store, object_key(a, v), a.shape[0])
            for n, a in self.arrays.items()
            for v in range(a.shape[1])
        }

    def write(self, name: str, lo: int, block: np.ndarray) -> None:
        codec = self.codecs[name]
        for v in range(block.shape[1]):
            obj = self.objects[(name, v)]
            for i in range(block.shape[0]):
                obj.append(lo + i, codec.encode(block[i, v]))
            obj.f.flush()  # a block is on disk once written (memory stays bounded by one block)

    def close(self) -> None:
        try:
            for obj in self.objects.values():
                obj.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for obj in self.objects.values():
            obj.abort()


async def _upload(fs: Any, src: str, dst: str) -> None:
    _quiet_orphaned_connection_errors(asyncio.get_running_loop())
    await fs._put_file(src, dst)


def _quiet_orphaned_connection_errors(loop: asyncio.AbstractEventLoop) -> None:
    """When the object store goes away mid-upload, ``_put_file`` raises (the shard fails, by name) but
    aiohttp leaves a body-writing task whose connection error nobody retrieves, and asyncio prints its
    traceback when it is collected. That error is the one already reported; drop only that case."""
    if getattr(loop, "_digpt_quiet_orphans", False):
        return
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message", "").startswith("Task exception was never retrieved") and isinstance(
            context.get("exception"), OSError
        ):
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    loop._digpt_quiet_orphans = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# reading


def _get_ranges(store: Any, key_ranges: list[tuple[str, Any]]) -> list[Any]:
    return sync(store.get_partial_values(default_buffer_prototype(), key_ranges))


def read_index(store: Any, key: str, rows: int) -> np.ndarray:
    """``[rows, 2]`` (offset, nbytes) of one object's inner chunks; :class:`ObjectDamaged` names what is wrong."""
    size = 16 * rows + 4
    (buf,) = _get_ranges(store, [(key, SuffixByteRequest(size))])
    if buf is None:
        raise ObjectDamaged(key, "missing")
    data = buf.to_bytes()
    if len(data) < size or crc_bytes(data[:-4]) != data[-4:]:
        raise ObjectDamaged(key, "shard index fails its checksum (truncated or overwritten object)")
    entries = np.frombuffer(data[:-4], dtype="<u8").reshape(rows, 2)
    empty = np.flatnonzero(entries[:, 0] == _EMPTY)
    if len(empty):
        raise ObjectDamaged(key, f"inner chunk missing ({len(empty)} row(s))", int(empty[0]))
    return entries


class _LocalMaps:
    """Local objects mapped into memory, one map per object, kept while the reader lives: a range is then a
    view of the page cache (no read call, no copy, no fresh buffer to fault in). Through zarr's store each
    range would cost a hop to zarr's event loop and a worker thread: ~100 µs per sample's view here.
    Complete objects are never rewritten in place (a re-extraction replaces a whole shard group)."""

    def __init__(self, root: str):
        self.root = root
        self.maps: dict[str, np.ndarray | None] = {}

    def _map(self, key: str) -> np.ndarray | None:
        if key not in self.maps:
            try:
                with open(os.path.join(self.root, key), "rb") as f:
                    self.maps[key] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
            except (FileNotFoundError, ValueError):  # ValueError: an empty file cannot be mapped
                self.maps[key] = None
        return self.maps[key]

    def ranges(self, key_ranges: list[tuple[str, RangeByteRequest]]) -> list[np.ndarray | None]:
        out = []
        for key, r in key_ranges:
            m = self._map(key)
            out.append(None if m is None else m[r.start : r.end])
        return out


class ViewReader:
    """Targets of chosen (row, view) pairs of one shard group, in stored dtype, by ranged reads.

    Reads every object's index when opened (a damaged or incomplete one fails here, before any target is
    paired with an image); ``read(rows, views)`` then fetches exactly the inner chunks asked for, rows of
    a view that are adjacent in the object coalesced into one range. ``bytes_read`` counts target bytes
    fetched (index reads included)."""

    def __init__(self, g: Any, names: tuple[str, ...] = TARGETS):
        self.g, self.store = g, g.store
        self.arrays = {n: g[n] for n in names if n in g}
        self.codecs = {n: _Codec.of(a) for n, a in self.arrays.items()}
        self.keys = {(n, v): object_key(a, v) for n, a in self.arrays.items() for v in range(a.shape[1])}
        self.bytes_read = 0
        self.local = _LocalMaps(str(self.store.root)) if isinstance(self.store, LocalStore) else None
        self.index: dict[tuple[str, int], np.ndarray] = {}
        for (n, v), key in self.keys.items():
            self.index[(n, v)] = read_index(self.store, key, self.arrays[n].shape[0])
            self.bytes_read += 16 * self.arrays[n].shape[0] + 4

    def read(self, rows: np.ndarray, views: np.ndarray) -> dict[str, list[np.ndarray]]:
        """Per target array, the stored values of each ``(rows[j], views[j])`` (read-only arrays)."""
        rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
        plan: list[tuple[str, int, np.ndarray, int, int]] = []  # (name, view, positions in rows, start, end)
        for n in self.arrays:
            for v in np.unique(views):
                pos = np.flatnonzero(views == v)
                ent = self.index[(n, int(v))][rows[pos]]
                starts, ends = ent[:, 0].astype(np.int64), (ent[:, 0] + ent[:, 1]).astype(np.int64)
                # runs: inner chunks back to back in the object become one range
                cut = np.flatnonzero(starts[1:] != ends[:-1]) + 1
                for a, b in zip(np.r_[0, cut], np.r_[cut, len(pos)]):
                    plan.append((n, int(v), pos[a:b], int(starts[a]), int(ends[b - 1])))
        ranges = [(self.keys[(n, v)], RangeByteRequest(s, e)) for n, v, _, s, e in plan]
        if self.local is not None:
            bufs = self.local.ranges(ranges)
        else:
            bufs = [b if b is None else b.as_numpy_array() for b in _get_ranges(self.store, ranges)]
        out: dict[str, list] = {n: [None] * len(rows) for n in self.codecs}
        for (n, v, pos, s, e), buf in zip(plan, bufs):
            if buf is None or len(buf) != e - s:
                raise ObjectDamaged(self.keys[(n, v)], f"bytes {s}..{e} unreadable (truncated object)")
            self.bytes_read += e - s
            mv = buf
            ent = self.index[(n, v)][rows[pos]]
            for j, p in enumerate(pos):
                a = int(ent[j, 0]) - s
                try:
                    out[n][p] = self.codecs[n].decode(mv[a : a + int(ent[j, 1])])
                except Exception as exc:
                    raise ObjectDamaged(self.keys[(n, v)], str(exc), int(rows[p]), v) from None
        return out


def scan(g: Any, name: str) -> int:
    """Decode every inner chunk of every object of ``g[name]`` (checksums verified); the chunk count.

    Raises :class:`ObjectDamaged` naming the object and the row of the first bad inner chunk."""
    arr = g[name]
    n, k = arr.shape[0], arr.shape[1]
    codec = _Codec.of(arr)
    for v in range(k):
        key = object_key(arr, v)
        ent = read_index(g.store, key, n)
        (buf,) = _get_ranges(g.store, [(key, RangeByteRequest(0, int((ent[:, 0] + ent[:, 1]).max())))])
        if buf is None:
            raise ObjectDamaged(key, "missing")
        mv = buf.as_numpy_array()
        for r in range(n):
            a, b = int(ent[r, 0]), int(ent[r, 0] + ent[r, 1])
            try:
                if b > len(mv):
                    raise ValueError("truncated")
                codec.decode(mv[a:b])
            except Exception as exc:
                raise ObjectDamaged(key, str(exc), r, v) from None
    return n * k
