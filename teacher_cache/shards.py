"""Reading and writing webdataset tar shards, safely and deterministically.

Reading streams a tar (local path or fsspec URL) and groups consecutive members into samples by the
webdataset key convention. Nothing is ever extracted to disk: a member called ``../x.jpg`` or
``/etc/x.jpg`` is just a key string. Damage (a truncated or corrupt tar) never raises out of
:func:`iter_tar_samples`; it ends the stream with a :class:`ShardError` the caller records, and every
complete sample read before it is kept.

Writing produces byte-identical tars for identical input (fixed headers, sorted members) and
replaces each shard atomically, so a crash never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec

from .io import atomic_write

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# tarfile's stream mode reads in records of this many bytes; the tail we keep must cover one record
# plus the header block that ended the stream, so we can tell a clean end from a cut one.
_TAIL_BYTES = 4 * tarfile.RECORDSIZE


@dataclass(frozen=True)
class RawSample:
    """One webdataset sample: its key and its members, ``{extension (lower-case, no dot): bytes}``."""

    key: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class ShardError:
    """Damage that ended the reading of a shard early.

    ``key`` names the sample being read when the damage was found (that sample is dropped, since
    its members may be incomplete), or ``None`` when the shard broke before any sample started.
    """

    shard: str
    key: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"shard": self.shard, "key": self.key, "reason": self.reason}


def pick_image(sample: RawSample) -> tuple[str, bytes] | None:
    """``(ext, bytes)`` of the sample's image: the first extension of :data:`IMAGE_EXTS` present."""
    for ext in IMAGE_EXTS:
        if ext in sample.files:
            return ext, sample.files[ext]
    return None


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name: the basename is cut at its FIRST dot.

    ``dir/a.b.c`` -> ``("dir/a", "b.c")``; a name without a dot in its basename has ``ext == ""``.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def key_problem(key: str) -> str:
    """Why a member key cannot name a sample ('' when it can): webdataset drops an empty key (a member
    named ``.jpg``) and names that are not UTF-8 cannot be stored in the manifest or matched later."""
    if not key or key.endswith("/"):
        return "bad key: empty (a member named like '.jpg')"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "bad key: member name is not UTF-8"
    return ""


def printable_key(key: str) -> str:
    """``key`` itself when it is valid UTF-8, else its bytes with the invalid ones as ``\\xNN``."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shard_name(prefix: str, number: int) -> str:
    """File name of shard ``number`` as :func:`write_tar_shards` writes it."""
    return f"{prefix}-{number:06d}.tar"


# ---------------------------------------------------------------------------------------- reading


class _TailRecorder(io.RawIOBase):
    """A read-only pass-through that counts bytes and keeps the last few KiB.

    tarfile's stream mode ends quietly on a missing end-of-archive marker or a cut header; with the
    tail we can check whether the block that ended the stream really was the all-zero marker.
    """

    def __init__(self, raw) -> None:
        self._raw = raw
        self.total = 0
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512-byte block at ``offset`` if it is still in the tail, else ``None``."""
        start = offset - (self.total - len(self.tail))
        if start < 0:
            return None
        return self.tail[start : start + tarfile.BLOCKSIZE]


def _end_problem(tf: tarfile.TarFile, rec: _TailRecorder) -> str | None:
    """Why the stream ended, if it did not end on an end-of-archive marker; ``None`` when clean."""
    block = rec.block_at(tf.offset)
    if block is None:
        return f"cannot verify end of archive at offset {tf.offset}"
    if len(block) == 0:
        return f"truncated: no end-of-archive marker (stream ends at offset {tf.offset})"
    if len(block) < tarfile.BLOCKSIZE:
        return f"truncated: partial header at offset {tf.offset}"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"corrupt: invalid tar header at offset {tf.offset}"
    return None


def iter_tar_samples(url: str) -> Iterator[RawSample | ShardError]:
    """Stream the samples of one tar shard, in order; a :class:`ShardError` ends a damaged shard.

    Members are grouped while their key stays the same; a key that comes back later (or a member
    extension repeated within a group) starts a new sample with the same key, so duplicates stay
    visible to the caller. Directories and non-regular members (links, devices) are skipped.
    Compression is inferred from the name (``.tar.gz``) by fsspec.
    """
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with fsspec.open(url, "rb", compression="infer") as raw:
            rec = _TailRecorder(raw)
            with tarfile.open(fileobj=rec, mode="r|") as tf:
                for member in tf:
                    tf.members = []  # stream mode keeps every TarInfo otherwise; memory must not grow
                    if not member.isreg():
                        continue
                    name_key, ext = split_member_name(member.name)
                    if files and (name_key != key or ext in files):
                        yield RawSample(key, files)  # type: ignore[arg-type]
                        files = {}
                    key = name_key
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    files[ext] = data
                problem = _end_problem(tf, rec)
    except Exception as e:  # noqa: BLE001 - tarfile, gzip, zlib and fsspec raise many types for damage
        yield ShardError(url, key, _damage_reason(e, key))
        return
    if problem is not None:
        yield ShardError(url, key, _with_dropped(problem, key))
        return
    if files:
        yield RawSample(key, files)  # type: ignore[arg-type]


def _damage_reason(e: Exception, key: str | None) -> str:
    if isinstance(e, FileNotFoundError):
        reason = f"missing: {e}"
    elif isinstance(e, EOFError) or "unexpected end" in str(e):
        reason = f"truncated: {type(e).__name__}: {e}"
    else:
        reason = f"corrupt: {type(e).__name__}: {e}"
    return _with_dropped(reason, key)


def _with_dropped(reason: str, key: str | None) -> str:
    # ``key`` is only ever set to a sample not yet yielded, so a set key means that sample is lost.
    return reason if key is None else f"{reason}; sample {key!r} dropped"


# ---------------------------------------------------------------------------------------- writing


def _check_member_name(key: str, ext: str) -> None:
    """Keys and extensions must survive a write/read round trip unchanged."""
    if not key or not ext or split_member_name(f"{key}.{ext}") != (key, ext):
        raise ValueError(
            f"cannot write member {key!r}.{ext!r}: the key must be non-empty with no dot in its "
            "basename, and the extension non-empty, lower-case and without '/'"
        )


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _write_one_shard(path: str, samples: list[RawSample]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for sample in samples:
                for ext in sorted(sample.files):
                    _check_member_name(sample.key, ext)
                    _add_member(tf, f"{sample.key}.{ext}", sample.files[ext])

    atomic_write(path, write)


def write_tar_shards(
    samples: Iterable[RawSample], out_dir: str, *, shard_size: int, prefix: str = "shard"
) -> list[str]:
    """Write ``samples`` into ``{prefix}-000000.tar``, ... (``shard_size`` samples each).

    Members are ``{key}.{ext}`` in sorted extension order with fixed headers, so the same input
    gives byte-identical tars. Each shard goes to a temporary name first and is moved into place
    with ``os.replace``. Only one shard's samples are held in memory at a time.
    Returns the shard file names (not paths), in order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    names: list[str] = []
    batch: list[RawSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size:
            names.append(shard_name(prefix, len(names)))
            _write_one_shard(os.path.join(out_dir, names[-1]), batch)
            batch = []
    if batch:
        names.append(shard_name(prefix, len(names)))
        _write_one_shard(os.path.join(out_dir, names[-1]), batch)
    return names
