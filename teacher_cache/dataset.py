"""The dataset reader: a prepared dataset directory (``dataset.json`` + ``manifest.parquet`` + shards).

Everything after ``prepare`` reads images through here — extract, verify, the probe and the student
loader: :func:`load_dataset` opens and checks a directory, :class:`PreparedDataset` answers per-shard
rows, :func:`iter_dataset_samples` re-reads a shard and refuses one whose keys or image bytes differ from
the manifest (:func:`content_hash`). The writers live in :mod:`teacher_cache.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

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


def iter_dataset_samples(ds: PreparedDataset, shard: str) -> Iterator[tuple[dict[str, Any], RawSample | None]]:
    """Re-read ``shard`` and pair each manifest row with its raw sample, in index order.

    Rows whose sample is gone (the shard now ends early) come with ``None``. A shard whose keys or
    image bytes differ from the manifest raises :class:`ManifestMismatch`: its rows describe
    another file, and targets computed from it would be silently misaligned.
    """
    rows = ds.rows(shard)
    names = list(rows)
    n = len(rows["key"])
    index = 0
    for item in iter_tar_samples(ds.shard_url(shard)):
        if isinstance(item, ShardError):
            break
        if index >= n:
            raise ManifestMismatch(f"{shard}: has more samples than the manifest's {n}")
        row = {name: rows[name][index] for name in names}
        _check_same_sample(shard, row, item)
        yield row, item
        index += 1
    for rest in range(index, n):
        yield {name: rows[name][rest] for name in names}, None


def _check_same_sample(shard: str, row: dict[str, Any], sample: RawSample) -> None:
    if printable_key(sample.key) != row["key"]:
        raise ManifestMismatch(f"{shard}: index {row['index']} has key {sample.key!r}, manifest says {row['key']!r}")
    picked = pick_image(sample)
    digest = content_hash(picked[1]) if picked else ""
    if digest != row["hash"]:
        raise ManifestMismatch(f"{shard}: image of key {row['key']!r} changed since prepare (hash differs)")


def content_hash(data: bytes) -> str:
    """The manifest's ``hash`` of an image's bytes (blake2b-128, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
