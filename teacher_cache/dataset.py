"""The dataset reader: a prepared dataset directory (``dataset.json`` + ``manifest.parquet`` + shards).

Everything after ``prepare`` reads images through here — extract, verify, the probe and the student
loader: :func:`load_dataset` opens and checks a directory, :class:`PreparedDataset` answers per-shard
rows, :func:`join_shard` is the one join of a shard's tar with its manifest rows and
:func:`checked_image` the one check of an image against the manifest's :func:`content_hash`;
:func:`iter_dataset_samples` is the strict reader over them (it refuses a shard whose keys or image bytes
differ from the manifest), the student loader its own lenient one (``student/samples.py``). The writers
live in :mod:`teacher_cache.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_cache.shards import RawSample, ShardError, iter_tar_samples, pick_image, printable_key

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.parquet"
INFO_FILE = "dataset.json"

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("index", pa.int32()),
        ("label", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("hash", pa.string()),
        ("ext", pa.string()),
        ("error", pa.string()),
    ]
)


def _is_url(path: str) -> bool:
    return "://" in path


def _join(root: str, name: str) -> str:
    if _is_url(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def _error_kind(reason: str) -> str:
    """The part of an error before its first ``:``, used to group errors in summaries."""
    return reason.split(":", 1)[0]


@dataclass
class PreparedDataset:
    """A prepared dataset directory: its ``dataset.json`` (``info``) and its manifest."""

    root: str
    info: dict[str, Any]
    manifest: pa.Table

    @property
    def shards(self) -> list[str]:
        return list(self.info["shards"])

    @property
    def fingerprint(self) -> str:
        return self.info["manifest_fingerprint"]

    @property
    def num_samples(self) -> int:
        return self.manifest.num_rows

    def shard_url(self, shard: str) -> str:
        """Where to read ``shard``: relative names resolve against the root; absolute stay."""
        if _is_url(shard) or os.path.isabs(shard):
            return shard
        return _join(self.root, shard)

    @cached_property
    def _shard_spans(self) -> dict[str, tuple[int, int]]:
        """``shard -> (first row, row count)``; rows are grouped by shard in manifest order."""
        spans: dict[str, tuple[int, int]] = {}
        names = self.manifest.column("shard").to_pylist()
        start = 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                if names[start] in spans:
                    raise ValueError(f"manifest rows of shard {names[start]!r} are not contiguous")
                spans[names[start]] = (start, i - start)
                start = i
        return spans

    def rows(self, shard: str) -> dict[str, list]:
        """That shard's manifest columns as python lists, in index order."""
        start, length = self._shard_spans.get(shard, (0, 0))
        return self.manifest.slice(start, length).to_pydict()

    def summary(self) -> str:
        """A few human lines: samples, shards, classes, errors by reason."""
        info = self.info
        classes = info.get("num_classes")
        lines = [
            f"dataset {self.root} ({info['kind']}): {self.num_samples} samples in "
            f"{len(info['shards'])} shards, " + (f"{classes} classes" if classes else "no class list")
        ]
        errors = Counter(_error_kind(e) for e in self.manifest.column("error").to_pylist() if e)
        detail = ", ".join(f"{kind}: {n}" for kind, n in sorted(errors.items()))
        lines.append(f"errors: {sum(errors.values())} samples" + (f" ({detail})" if detail else ""))
        for err in info.get("shard_errors", []):
            lines.append(f"shard error: {err['shard']}: {err['reason']}")
        skipped = Counter(_error_kind(s["reason"]) for s in info.get("skipped_files", []))
        if skipped:
            lines.append("skipped files: " + ", ".join(f"{k}: {n}" for k, n in sorted(skipped.items())))
        return "\n".join(lines)


def manifest_fingerprint(table: pa.Table) -> str:
    """sha256 over the ``(shard, key, hash)`` columns in row order (length-prefixed, unambiguous)."""
    h = hashlib.sha256()
    columns = [table.column(name).to_pylist() for name in ("shard", "key", "hash")]
    for row in zip(*columns):
        for value in row:
            data = value.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def load_dataset(root: str) -> PreparedDataset:
    """Open a prepared dataset directory (local path or fsspec URL) and check it is consistent."""
    info_path, manifest_path = _join(root, INFO_FILE), _join(root, MANIFEST_FILE)
    for path in (info_path, manifest_path):
        fs, fs_path = fsspec.core.url_to_fs(path)
        if not fs.exists(fs_path):
            raise FileNotFoundError(f"{path} not found: {root!r} is not a prepared dataset (run `digpt prepare` first)")
    with fsspec.open(info_path, "rt", encoding="utf-8") as f:
        info = json.load(f)
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{info_path}: schema_version {info.get('schema_version')!r} is not supported "
            f"(expected {SCHEMA_VERSION}); re-run `digpt prepare`"
        )
    with fsspec.open(manifest_path, "rb") as f:
        manifest = pq.read_table(f)
    _check_manifest_schema(manifest, manifest_path)
    found = manifest_fingerprint(manifest)
    if found != info["manifest_fingerprint"]:
        raise ValueError(
            f"{manifest_path} does not match {info_path}: manifest fingerprint {found} != "
            f"{info['manifest_fingerprint']}; re-run `digpt prepare`"
        )
    return PreparedDataset(root=root, info=info, manifest=manifest)


def _check_manifest_schema(table: pa.Table, where: str) -> None:
    for f in MANIFEST_SCHEMA:
        if f.name not in table.column_names:
            raise ValueError(f"{where}: missing column {f.name!r}")
        if table.schema.field(f.name).type != f.type:
            raise ValueError(
                f"{where}: column {f.name!r} has type {table.schema.field(f.name).type}, expected {f.type}"
            )


class ManifestMismatch(ValueError):
    """A shard no longer matches the manifest it was indexed into."""


def readable_index(rows: dict[str, list]) -> dict[str, int]:
    """Row of each readable key of a shard's manifest ``rows`` (rows without an error at prepare): the rows
    a tar sample that is not at its own position can still be joined to."""
    return {key: i for i, key in enumerate(rows["key"]) if not rows["error"][i]}


class Joined(NamedTuple):
    """One step of the join of a shard's tar with its manifest rows (:func:`join_shard`).

    A tar sample: ``sample`` and its ``position`` in the tar, with its manifest ``row`` (``None``: the
    manifest has no row for it). After the stream, each row that no sample was joined to, with
    ``sample=None`` and ``position=-1``. Where the tar is damaged, one step with its ``damage`` (which
    ends the stream: the rows it cut off follow as rows without a sample)."""

    position: int
    row: int | None
    sample: RawSample | None
    damage: ShardError | None = None


def join_shard(
    ds: PreparedDataset, shard: str, rows: dict[str, list] | None = None, index: dict[str, int] | None = None
) -> Iterator[Joined]:
    """The one manifest <-> tar join, in tar order: extraction, verify, the probe and the student loader
    all read a shard through it (each with its own policy for what does not match).

    A sample's row is the one at its position when the keys agree (an unchanged shard: ``prepare`` lists
    every sample, bad ones too, in tar order), else the readable row of its key (``index``, from
    :func:`readable_index`; a shard with samples added or removed since). ``rows``/``index`` may be
    passed in by a caller that keeps them across epochs. Image bytes are not checked here: see
    :func:`checked_image`."""
    rows = ds.rows(shard) if rows is None else rows
    index = readable_index(rows) if index is None else index
    keys = rows["key"]
    n = len(keys)
    joined = bytearray(n)
    for position, item in enumerate(iter_tar_samples(ds.shard_url(shard))):
        if isinstance(item, ShardError):
            yield Joined(position, None, None, item)
            break
        if position < n and keys[position] == printable_key(item.key):
            row = position
        else:
            row = index.get(item.key)
        if row is not None:
            joined[row] = 1
        yield Joined(position, row, item)
    for row in range(n):
        if not joined[row]:
            yield Joined(-1, row, None)


def checked_image(sample: RawSample, expected_hash: str) -> bytes | None:
    """The sample's image bytes (``b""`` when it has none) if their :func:`content_hash` is the manifest's
    ``expected_hash`` (``""`` for a sample without an image), else ``None``: the image changed since
    ``prepare``, so anything computed from the old bytes belongs to other pixels."""
    picked = pick_image(sample)
    digest = content_hash(picked[1]) if picked else ""
    if digest != expected_hash:
        return None
    return picked[1] if picked else b""


def iter_dataset_samples(ds: PreparedDataset, shard: str) -> Iterator[tuple[dict[str, Any], RawSample | None]]:
    """Re-read ``shard`` and pair each manifest row with its raw sample, in index order.

    Rows whose sample is gone (the shard now ends early) come with ``None``. A shard whose keys or
    image bytes differ from the manifest raises :class:`ManifestMismatch`: its rows describe
    another file, and targets computed from it would be silently misaligned. (The strict policy over
    :func:`join_shard`: every sample must sit at its own row.)
    """
    rows = ds.rows(shard)
    names = list(rows)
    n = len(rows["key"])
    for step in join_shard(ds, shard, rows):
        if step.damage is not None:
            continue  # the rows it cut off follow, without samples
        row = {name: rows[name][step.row] for name in names} if step.row is not None else None
        if step.sample is None:
            yield row, None
            continue
        p = step.position
        if p >= n:
            raise ManifestMismatch(f"{shard}: has more samples than the manifest's {n}")
        if step.row != p:
            raise ManifestMismatch(
                f"{shard}: index {rows['index'][p]} has key {step.sample.key!r}, manifest says {rows['key'][p]!r}"
            )
        if checked_image(step.sample, row["hash"]) is None:
            raise ManifestMismatch(f"{shard}: image of key {row['key']!r} changed since prepare (hash differs)")
        yield row, step.sample


def content_hash(data: bytes) -> str:
    """The manifest's ``hash`` of an image's bytes (blake2b-128, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
