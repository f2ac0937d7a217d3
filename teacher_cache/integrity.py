"""Integrity of a stored cache: chunk checksums, chunks missing from complete shards, and the cheap
per-shard checks every reader makes before trusting a shard's targets (DESIGN invariant 7).

Every array of a shard group is written with Zarr v3's ``crc32c`` codec last in its codec chain and
with ``write_empty_chunks`` on, so *every* chunk exists on disk and carries a checksum. Two hazards
this closes:

* a flipped or truncated chunk decodes to other numbers (or a Blosc traceback): the checksum fails
  and :func:`checked` turns that into a :class:`CacheIntegrityError` naming array, shard and chunk;
* zarr answers a read of a missing chunk with the fill value (zeros, ``False``) — silently. A shard
  written with every chunk present (attribute ``integrity``) lets :func:`missing_chunks` find the
  absent ones with one listing per shard.

Caches written before this (no ``integrity`` attribute) are still read; :func:`warn_unchecked`
says so once, in one line. A shard's completion record also holds its tar's size and mtime
(:func:`source_stamp`), so a re-run of ``extract`` notices images changed after extraction.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .dataset import ManifestMismatch, PreparedDataset, iter_dataset_samples
from .objects import ObjectDamaged, is_view_sharded, scan

INTEGRITY = "crc32c+all-chunks"
"""Value of a shard group's ``attrs["shard"]["integrity"]``: every chunk present, each with a crc32c."""

T = TypeVar("T")


class CacheIntegrityError(ValueError):
    """A stored cache is damaged or does not match what was recorded; the message names where.

    A ``ValueError`` so that the CLI reports it in one line (exit 2), like any other bad input."""


def chunk_config() -> dict[str, Any]:
    """``create_array(config=...)``: write all-fill chunks too, so a missing chunk means damage."""
    return {"write_empty_chunks": True}


def with_checksum(compressors: Any) -> list:
    """The compressor chain followed by ``crc32c`` (the checksum covers the compressed bytes)."""
    chain = list(compressors) if isinstance(compressors, (list, tuple)) else [compressors]
    return [*chain, Crc32cCodec()]


def has_integrity(g: zarr.Group) -> bool:
    return dict(g.attrs.get("shard", {})).get("integrity") == INTEGRITY


def _where(g: zarr.Group) -> str:
    shard = dict(g.attrs.get("shard", {})).get("name", "?")
    return f"group {g.path!r} (shard {shard})"


def _object_shape(arr: zarr.Array) -> tuple[int, ...]:
    """Shape of one stored object: the shard shape of a sharded array, else the chunk shape."""
    return tuple(arr.shards or arr.chunks)


def _chunk_keys(arr: zarr.Array) -> list[tuple[tuple[int, ...], str]]:
    """(grid coordinates, key) of every stored object of ``arr`` (a shard of a sharded array)."""
    grid = [range(-(-n // s)) for n, s in zip(arr.shape, _object_shape(arr))]
    return [(c, arr.metadata.encode_chunk_key(c)) for c in itertools.product(*grid)]


def _rows_of(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    if not arr.shape:
        return ""
    step = arr.chunks[0]
    return f", rows {coords[0] * step}..{min(arr.shape[0], (coords[0] + 1) * step) - 1}"


def damaged_object(g: zarr.Group, name: str, e: ObjectDamaged) -> CacheIntegrityError:
    """The error for a damaged object of sharded array ``g[name]``, naming object key, row and view."""
    key = e.key.removeprefix(f"{g[name].path}/")
    where = "" if e.row is None else f", row {e.row}" + ("" if e.view is None else f", view {e.view}")
    return CacheIntegrityError(
        f"corrupt chunk {key} of array {name!r} in {_where(g)}{where}: {e.what}; the cache is damaged: "
        "re-extract this shard (delete its group and re-run `digpt extract`)"
    )


def locate_bad_chunk(g: zarr.Group, name: str, cause: Exception) -> CacheIntegrityError:
    """Read ``g[name]`` chunk by chunk to name the one that fails (only called after a read failed)."""
    arr = g[name]
    if is_view_sharded(arr):  # one object per view: name the object, the row and the view
        try:
            scan(g, name)
        except ObjectDamaged as e:
            return damaged_object(g, name, e)
        return CacheIntegrityError(f"array {name!r} in {_where(g)} could not be read: {type(cause).__name__}: {cause}")
    for coords, key in _chunk_keys(arr):
        sel = tuple(slice(c * s, min(n, (c + 1) * s)) for c, s, n in zip(coords, arr.chunks, arr.shape))
        try:
            arr[sel]
        except Exception as e:  # crc mismatch (ValueError), Blosc error on truncated bytes, ...
            return CacheIntegrityError(
                f"corrupt chunk {key} of array {name!r} in {_where(g)}{_rows_of(arr, coords)}: "
                f"{type(e).__name__}: {e}; the cache is damaged: re-extract this shard (delete its group "
                "and re-run `digpt extract`)"
            )
    return CacheIntegrityError(f"array {name!r} in {_where(g)} could not be read: {type(cause).__name__}: {cause}")


def checked(g: zarr.Group, name: str, read: Callable[[], T]) -> T:
    """``read()`` (a read of ``g[name]``); any decode failure becomes an error naming the chunk."""
    try:
        return read()
    except CacheIntegrityError:
        raise
    except Exception as e:
        raise locate_bad_chunk(g, name, e) from None


def missing_chunks(g: zarr.Group) -> list[str]:
    """Chunk keys (``array/c/...``) absent from a shard group written with :data:`INTEGRITY`.

    One store listing per shard group; ``[]`` for groups written without it (nothing can be said)."""
    if not has_integrity(g):
        return []
    prefix = g.path.rstrip("/") + "/" if g.path else ""

    async def listing() -> set[str]:
        return {k[len(prefix) :] async for k in g.store.list_prefix(prefix)}

    present = sync(listing())
    missing = []
    for name, arr in sorted(g.arrays()):
        missing += [f"{name}/{key}" for _, key in _chunk_keys(arr) if f"{name}/{key}" not in present]
    return missing


def read_every_chunk(g: zarr.Group) -> int:
    """Decode every chunk of every array of a shard group (checksums verified); the chunk count.

    Raises :class:`CacheIntegrityError` naming the first bad chunk."""
    n = 0
    for name, arr in sorted(g.arrays()):
        if is_view_sharded(arr):
            try:
                n += scan(g, name)
            except ObjectDamaged as e:
                raise damaged_object(g, name, e) from None
            continue
        step = arr.chunks[0] if arr.shape else 1
        for lo in range(0, max(1, arr.shape[0] if arr.shape else 1), step):
            checked(g, name, lambda a=arr, lo=lo, step=step: a[lo : lo + step] if a.shape else a[()])
        n += arr.nchunks
    return n


def check_shard_group(g: zarr.Group, shard: str, manifest_keys: list[str]) -> list[str]:
    """Problems that make a complete shard group's targets untrustworthy for ``shard`` ([] if none).

    Cheap: one listing, the keys chunk and the valid chunk(s). Checks the group belongs to this shard
    (groups swapped on disk), its keys equal the manifest's in order, its ``valid`` count equals the
    completion record's, and (new caches) that no chunk is missing."""
    rec = dict(g.attrs.get("shard", {}))
    done = dict(g.attrs.get("complete", {}))
    problems = []
    if rec.get("name") != shard:
        problems.append(
            f"group {g.path!r} was written for shard {rec.get('name')!r}, not {shard!r} "
            "(shard groups moved or swapped on disk)"
        )
    keys = [str(k) for k in checked(g, "keys", lambda: g["keys"][:])]
    if keys != list(manifest_keys):
        first = next(
            (i for i, (a, b) in enumerate(zip(keys, manifest_keys)) if a != b), min(len(keys), len(manifest_keys))
        )
        problems.append(
            f"stored keys differ from the manifest's at row {first} "
            f"({keys[first] if first < len(keys) else '<end>'!r} vs "
            f"{manifest_keys[first] if first < len(manifest_keys) else '<end>'!r}; "
            f"{len(keys)} vs {len(manifest_keys)} rows)"
        )
    missing = missing_chunks(g)
    if missing:
        problems.append(f"{len(missing)} chunk(s) missing: {missing[:4]} (a read would give fill values)")
    valid = checked(g, "valid", lambda: np.asarray(g["valid"][:]))
    if "valid" in done and int(valid.sum()) != int(done["valid"]):
        problems.append(f"valid count {int(valid.sum())} differs from the completion record's {done['valid']}")
    return problems


_warned: set[str] = set()


def warn_unchecked(cache: str, groups: list[zarr.Group]) -> bool:
    """One stderr line (once per cache and process) when shard groups predate checksums."""
    old = [g.path for g in groups if not has_integrity(g)]
    if old and cache not in _warned:
        _warned.add(cache)
        print(
            f"digpt: warning: cache {cache} has {len(old)} shard group(s) written without chunk checksums "
            f"(e.g. {old[0]}); damaged or missing chunks cannot be detected there - re-extract into a new "
            "--out to add them",
            file=sys.stderr,
        )
    return bool(old)


def source_stamp(ds: PreparedDataset, shard: str) -> dict[str, Any]:
    """Size and modification time of a shard's tar, recorded with its completion: a re-run compares
    them to notice a shard whose images changed after its targets were extracted."""
    url = ds.shard_url(shard)
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return {}
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified", info.get("created"))))
    return {"size": int(info.get("size") or 0), "mtime": str(mtime)}


def changed_since_extraction(tok: zarr.Group, sid: str, ds: PreparedDataset, shard: str) -> str:
    """Why a complete shard's targets no longer belong to its images ('' when they do).

    Cheap unless the tar's size or mtime changed since extraction; then every image is hashed
    against the manifest (a shard only touched, or copied back unchanged, still passes)."""
    recorded = dict(tok[sid].attrs["complete"]).get("source")
    if not recorded or source_stamp(ds, shard) == recorded:
        return ""
    try:
        for _ in iter_dataset_samples(ds, shard):
            pass
    except ManifestMismatch as e:
        return (
            f"{e}; its cached targets were computed from the old images, and the manifest still describes "
            "those, so it is not redone: re-run `digpt prepare` on the changed shards, then extract into a "
            "new --out"
        )
    return ""
