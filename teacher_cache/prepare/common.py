"""What every source shares: the manifest builder, the output protocol and shard patterns.

The protocol, in this order: :func:`begin_output` removes ``dataset.json`` (so a half-rewritten
directory never loads); the shards are written while :class:`ManifestBuilder` indexes each sample as it
goes by (:func:`write_indexed`); shards of an earlier run that this one did not write are removed; then
:func:`finish` writes ``manifest.parquet`` and, last, ``dataset.json``. :func:`write_dataset` is that
whole protocol for a source that writes shards; ``wds`` indexes shards in place and calls the steps itself.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import braceexpand
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from teacher_cache.dataset import (
    INFO_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    PreparedDataset,
    _is_url,
    content_hash,
    manifest_fingerprint,
)
from teacher_cache.images import BadImage, decode_image
from teacher_cache.io import atomic_write, atomic_write_text
from teacher_cache.runtime import progress_bar
from teacher_cache.shards import (
    RawSample,
    ShardError,
    key_problem,
    pick_image,
    printable_key,
    shard_name,
    write_tar_shards,
)

SHARD_PREFIX = "shard"

ERR_NO_IMAGE = "no image member"
ERR_DUPLICATE = "duplicate key"


# ---------------------------------------------------------------------------------------- configs


def require(ok: bool, message: str) -> None:
    """A config check: ``ValueError(message)`` unless ``ok`` (the message starts with the field's name)."""
    if not ok:
        raise ValueError(message)


def check_pattern(pattern: str) -> None:
    """Refuse a glob in a URL pattern now, not after the output is begun: only local paths are globbed."""
    require(
        not (_is_url(pattern) and any(c in pattern for c in "*?[")),
        f"pattern: globs are only supported for local paths, got {pattern!r}",
    )


def expand_shard_pattern(pattern: str) -> list[str]:
    """Shard locations of a brace/glob pattern, in brace order then sorted glob order.

    Local paths come back absolute, URLs as written. A pattern that names a missing file or
    matches nothing is an error here, before any work starts.
    """
    found: list[str] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if _is_url(item):
            fs, fs_path = fsspec.core.url_to_fs(item)
            (found if fs.exists(fs_path) else missing).append(item)
        elif glob.has_magic(item):
            found.extend(os.path.abspath(p) for p in sorted(glob.glob(item)) if os.path.isfile(p))
        elif os.path.isfile(item):
            found.append(os.path.abspath(item))
        else:
            missing.append(item)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"pattern {pattern!r}: no such shard: {shown}")
    found = list(dict.fromkeys(found))  # a file matched twice is still one shard
    if not found:
        raise FileNotFoundError(f"pattern {pattern!r} matched no shards")
    return found


# ---------------------------------------------------------------------------------------- indexing


def _describe_image(sample: RawSample) -> tuple[str, bytes, int, int, str]:
    """``(ext, bytes, width, height, error)`` of the sample's image, decoded as every stage will."""
    picked = pick_image(sample)
    if picked is None:
        return "", b"", 0, 0, ERR_NO_IMAGE
    ext, data = picked
    try:
        width, height = decode_image(data).size
    except BadImage as e:  # its message is already free of run-specific object addresses
        return ext, data, 0, 0, str(e)
    return ext, data, width, height, ""


class ManifestBuilder:
    """Accumulates manifest rows; marks later occurrences of a key within a shard as duplicates.

    ``extra_columns`` are string columns after the schema's (``wds``: caption, url), filled from the
    keywords of :meth:`add`.
    """

    def __init__(self, extra_columns: tuple[str, ...] = ()) -> None:
        self.columns: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names + list(extra_columns)}
        self._extra = extra_columns
        self._seen: tuple[str, set[str]] = ("", set())

    def add(self, shard: str, index: int, sample: RawSample, label: int, label_error: str = "", **extra: str) -> None:
        """Append the row of ``sample``, the ``index``-th sample of ``shard``."""
        if self._seen[0] != shard:
            self._seen = (shard, set())
        duplicate = sample.key in self._seen[1]
        self._seen[1].add(sample.key)
        ext, data, width, height, image_error = _describe_image(sample)
        bad_key = key_problem(sample.key)  # a name webdataset would drop or the manifest cannot hold
        row = {
            "shard": shard, "key": printable_key(sample.key), "index": index, "label": label, "width": width,
            "height": height, "bytes": len(data), "hash": content_hash(data) if ext else "", "ext": ext,
            # One reason per row, the one that matters most downstream: a duplicate is skipped
            # whatever else is wrong with it.
            "error": bad_key or (ERR_DUPLICATE if duplicate else "") or image_error or label_error,
        }  # fmt: skip
        row.update({name: extra.get(name, "") for name in self._extra})
        for name, value in row.items():
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        schema = MANIFEST_SCHEMA
        for name in self._extra:
            schema = schema.append(pa.field(name, pa.string()))
        return pa.table(self.columns, schema=schema)


# ---------------------------------------------------------------------------------------- output


def begin_output(out: str) -> None:
    """Make ``out`` and remove its completion marker, so a half-rewritten directory never loads."""
    os.makedirs(out, exist_ok=True)
    info = os.path.join(out, INFO_FILE)
    if os.path.exists(info):
        os.remove(info)


def remove_stale_shards(out: str, keep: list[str]) -> None:
    """Remove shards of an earlier run that this run did not write (only our own file names)."""
    pattern = re.compile(rf"{re.escape(SHARD_PREFIX)}-\d{{6}}\.tar")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out, name))


def finish(
    out: str,
    kind: str,
    cfg: Any,
    builder: ManifestBuilder,
    shards: list[str],
    classes: list[str] | None,
    shard_errors: Iterable[ShardError] = (),
    skipped_files: list[dict[str, str]] | None = None,
) -> PreparedDataset:
    """Write manifest.parquet, then dataset.json (the completion marker), both atomically."""
    # Imported here: the store loads torch and zarr, which preparing images never needs.
    from teacher_cache.store import package_version

    table = builder.table()
    info: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "shards": shards,
        "num_samples": table.num_rows,
        "num_errors": sum(1 for e in table.column("error").to_pylist() if e),
        "classes": classes,
        "num_classes": len(classes) if classes is not None else None,
        "manifest_fingerprint": manifest_fingerprint(table),
        "config": asdict(cfg),
        "shard_errors": [e.as_dict() for e in shard_errors],
        "created_by": f"digpt {package_version()}",
    }
    if skipped_files is not None:
        info["skipped_files"] = skipped_files
    atomic_write(os.path.join(out, MANIFEST_FILE), lambda p: pq.write_table(table, p))
    text = json.dumps(info, indent=2) + "\n"
    atomic_write_text(os.path.join(out, INFO_FILE), text)
    return PreparedDataset(root=out, info=info, manifest=table)


def progress(total: int | None, kind: str) -> tqdm:
    return progress_bar(total=total, desc=f"prepare {kind}", unit="img")


def write_indexed(
    samples: Iterable[tuple[RawSample, int]], out: str, shard_size: int, builder: ManifestBuilder, bar: tqdm
) -> list[str]:
    """Write samples into shards while indexing each one into the manifest as it goes by.

    Row ``i`` lands in shard ``i // shard_size`` at index ``i % shard_size`` — the same
    arithmetic :func:`write_tar_shards` uses — so one pass both writes and indexes.
    """

    def tapped() -> Iterator[RawSample]:
        for i, (sample, label) in enumerate(samples):
            builder.add(shard_name(SHARD_PREFIX, i // shard_size), i % shard_size, sample, label)
            bar.update(1)
            yield sample

    shards = write_tar_shards(tapped(), out, shard_size=shard_size, prefix=SHARD_PREFIX)
    if list(dict.fromkeys(builder.columns["shard"])) != shards:  # the shared arithmetic, checked
        raise RuntimeError(f"manifest shards disagree with the shards written to {out}")
    return shards


def write_dataset(
    kind: str,
    cfg: Any,
    samples: Iterable[tuple[RawSample, int]],
    total: int | None,
    classes: list[str] | None,
    skipped_files: list[dict[str, str]] | None = None,
) -> PreparedDataset:
    """The whole output protocol for a source that writes ``(sample, label)`` pairs into tar shards.

    ``cfg`` is the source's config: its ``out`` and ``shard_size`` say where and how, and all of it is
    recorded in dataset.json. ``total`` sizes the progress bar (None: unknown). ``skipped_files`` may
    still grow while ``samples`` is consumed (a file that became unreadable); it is written as it ends.
    """
    begin_output(cfg.out)
    builder = ManifestBuilder()
    with progress(total, kind) as bar:
        shards = write_indexed(samples, cfg.out, cfg.shard_size, builder, bar)
    remove_stale_shards(cfg.out, shards)
    return finish(cfg.out, kind, cfg, builder, shards, classes, skipped_files=skipped_files)
