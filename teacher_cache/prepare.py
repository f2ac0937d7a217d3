"""The ``prepare`` stage: turn images into webdataset shards plus a Parquet manifest.

Four sources, one output layout (the *dataset directory*):

* ``synthetic``   — generate the class-structured set of :mod:`teacher_cache.synthetic` into shards;
* ``imagefolder`` — copy an ImageNet-style tree (``root/<class>/<image>``) into shards, bytes unchanged;
* ``wds``         — index existing webdataset shards in place (LAION/img2dataset style), never rewriting;
* ``parquet``     — Parquet shards with an image-bytes column (the Hugging Face datasets layout: ``image``
  struct with ``bytes``, plus ``label``), copied into tar shards with the image bytes unchanged (the
  loader and extract stream tars; one more form of shard would mean one more reader in each).

The directory holds the shards (not for ``wds``), ``manifest.parquet`` (one row per sample, in shard
then stream order, bad samples included and named) and ``dataset.json`` (what was made, from what,
and the manifest's fingerprint). ``dataset.json`` is written last and removed first on a re-run, so
its presence means the directory is complete.

Sizes and decodability come from :func:`teacher_cache.images.decode_image`, the decoder every later
stage uses, so a row marked fine here decodes to the same pixels everywhere.

Reading a prepared directory back is :mod:`teacher_cache.dataset`'s job. This module is ~650 lines
because it holds the four writers, which share one manifest builder and one output protocol (write the
shards, then the manifest, then ``dataset.json``); each writer is a config, a sample iterator and a
call to that protocol.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
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
    IMAGE_EXTS,
    RawSample,
    ShardError,
    iter_tar_samples,
    key_problem,
    pick_image,
    printable_key,
    shard_name,
    write_tar_shards,
)
from teacher_cache.synthetic import (
    MAX_CLASSES,
    MIN_CLASSES,
    class_names,
    iter_synthetic_jpegs,
)

SHARD_PREFIX = "shard"
JPEG_QUALITY = 90
WDS_EXTRA_COLUMNS = ("caption", "url")

ERR_NO_IMAGE = "no image member"
ERR_DUPLICATE = "duplicate key"
ERR_UNKNOWN_LABEL = "unknown label"


# ---------------------------------------------------------------------------------------- configs


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SyntheticConfig:
    """Generate the synthetic shape dataset."""

    out: str
    """Dataset directory to write (shards, manifest.parquet, dataset.json)."""
    num_samples: int = 512
    """How many images; labels cycle ``index % num_classes`` so classes stay balanced."""
    num_classes: int = 8
    """Number of classes (shapes, then shape x texture past 16), 2..64."""
    image_size: int = 64
    """Side of the square images in pixels."""
    shard_size: int = 128
    """Samples per tar shard."""
    seed: int = 0
    """Base seed; sample ``i`` depends only on ``(seed, i)``."""

    def __post_init__(self) -> None:
        _require(bool(self.out), "out must be a non-empty path")
        _require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        _require(
            MIN_CLASSES <= self.num_classes <= MAX_CLASSES,
            f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.num_classes}",
        )
        _require(16 <= self.image_size <= 1024, f"image_size must be in [16, 1024], got {self.image_size}")
        _require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class ImageFolderConfig:
    """Copy an ImageNet-style folder tree into shards."""

    root: str
    """Tree root: ``root/<class>/<image>`` (images may sit in sub-folders of a class)."""
    out: str
    """Dataset directory to write; must not lie inside ``root``."""
    shard_size: int = 1000
    """Samples per tar shard."""

    def __post_init__(self) -> None:
        _require(bool(self.root), "root must be a non-empty path")
        _require(bool(self.out), "out must be a non-empty path")
        _require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        root, out = os.path.realpath(self.root), os.path.realpath(self.out)
        # An out inside root would be scanned as a class on the next run.
        _require(
            os.path.commonpath([root, out]) != root,
            f"out must not be inside root, got out={self.out!r} root={self.root!r}",
        )


@dataclass(frozen=True)
class WdsConfig:
    """Index existing webdataset shards in place."""

    pattern: str
    """Shards as a brace/glob pattern, e.g. ``/data/{00000..00009}.tar`` or ``/data/*.tar``;
    fsspec URLs may use braces but not globs."""
    out: str
    """Dataset directory for manifest.parquet and dataset.json (the shards stay where they are)."""

    def __post_init__(self) -> None:
        _require(bool(self.pattern), "pattern must be a non-empty shard pattern")
        _require(bool(self.out), "out must be a non-empty path")
        _require(
            not (_is_url(self.pattern) and any(c in self.pattern for c in "*?[")),
            f"pattern: globs are only supported for local paths, got {self.pattern!r}",
        )


# ---------------------------------------------------------------------------------------- dataset


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


class _ManifestBuilder:
    """Accumulates manifest rows; marks later occurrences of a key within a shard as duplicates."""

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digpt")
    except PackageNotFoundError:
        return "0+unknown"


def _begin_output(out: str) -> None:
    """Make ``out`` and remove its completion marker, so a half-rewritten directory never loads."""
    os.makedirs(out, exist_ok=True)
    info = os.path.join(out, INFO_FILE)
    if os.path.exists(info):
        os.remove(info)


def _remove_stale_shards(out: str, keep: list[str]) -> None:
    """Remove shards of an earlier run that this run did not write (only our own file names)."""
    pattern = re.compile(rf"{re.escape(SHARD_PREFIX)}-\d{{6}}\.tar")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out, name))


def _finish(
    out: str,
    kind: str,
    cfg: Any,
    builder: _ManifestBuilder,
    shards: list[str],
    classes: list[str] | None,
    shard_errors: Iterable[ShardError] = (),
    skipped_files: list[dict[str, str]] | None = None,
) -> PreparedDataset:
    """Write manifest.parquet, then dataset.json (the completion marker), both atomically."""
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
        "created_by": f"digpt {_version()}",
    }
    if skipped_files is not None:
        info["skipped_files"] = skipped_files
    atomic_write(os.path.join(out, MANIFEST_FILE), lambda p: pq.write_table(table, p))
    text = json.dumps(info, indent=2) + "\n"
    atomic_write_text(os.path.join(out, INFO_FILE), text)
    return PreparedDataset(root=out, info=info, manifest=table)


def _progress(total: int | None, kind: str) -> tqdm:
    return progress_bar(total=total, desc=f"prepare {kind}", unit="img")


def _write_indexed(
    samples: Iterable[tuple[RawSample, int]], out: str, shard_size: int, builder: _ManifestBuilder, bar: tqdm
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


# ---------------------------------------------------------------------------------------- synthetic


def prepare_synthetic(cfg: SyntheticConfig, processes: int | None = None) -> PreparedDataset:
    """Generate the synthetic set into ``cfg.out`` (JPEG quality 90, a ``cls`` member per sample), drawn by
    ``processes`` spawned processes (None: one per core for sets worth it). The bytes never depend on it."""
    _begin_output(cfg.out)
    builder = _ManifestBuilder()
    jpegs = iter_synthetic_jpegs(cfg.num_samples, cfg.num_classes, cfg.image_size, cfg.seed, JPEG_QUALITY, processes)
    samples = ((RawSample(key, {"jpg": data, "cls": str(label).encode()}), label) for key, label, data in jpegs)
    with _progress(cfg.num_samples, "synthetic") as bar:
        shards = _write_indexed(samples, cfg.out, cfg.shard_size, builder, bar)
    _remove_stale_shards(cfg.out, shards)
    return _finish(cfg.out, "synthetic", cfg, builder, shards, class_names(cfg.num_classes))


# ---------------------------------------------------------------------------------------- imagefolder


@dataclass(frozen=True)
class _FolderFile:
    path: str
    label: int
    key: str
    ext: str


@dataclass
class _FolderListing:
    classes: list[str]
    files: list[_FolderFile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _folder_key(label: int, rel_path: str, used: set[str]) -> str:
    """``{label:04d}_{path without extension, [A-Za-z0-9_-] only}``, made unique with ``-N``."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel_path)[0])
    key = f"{label:04d}_{stem}"
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}-{n}", n + 1
    used.add(candidate)
    return candidate


def _scan_imagefolder(root: str) -> _FolderListing:
    """Classes (sorted non-hidden sub-directories) and their image files, in sorted order."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    listing = _FolderListing(classes=[e.name for e in entries if e.is_dir() and not e.name.startswith(".")])
    for e in entries:
        if not e.is_dir():
            listing.skipped.append({"path": e.name, "reason": "not in a class directory"})
        elif e.name.startswith("."):
            listing.skipped.append({"path": e.name, "reason": "hidden directory"})
    used: set[str] = set()
    # The root and every class directory: a link back to one of them inside a class is a loop (or
    # would file another class's images under this one).
    tree = {os.path.realpath(root)} | {os.path.realpath(os.path.join(root, c)) for c in listing.classes}
    for label, name in enumerate(listing.classes):
        class_dir = os.path.join(root, name)
        rel_paths = _walk_class_dir(class_dir, name, listing.skipped, tree)
        for rel in rel_paths:
            ext = os.path.splitext(rel)[1][1:].lower()
            if ext not in IMAGE_EXTS:
                listing.skipped.append({"path": f"{name}/{rel}", "reason": f"not an image extension: {ext!r}"})
                continue
            key = _folder_key(label, rel, used)
            listing.files.append(_FolderFile(os.path.join(class_dir, rel), label, key, ext))
    return listing


def _walk_class_dir(class_dir: str, name: str, skipped: list[dict[str, str]], tree: set[str]) -> list[str]:
    """Relative paths of the regular files under ``class_dir``, following links to directories once.

    A directory reached twice (a symlink loop, or two links to one folder) is walked once; a FIFO (it
    would block ``open`` forever), a device (``/dev/zero`` never ends), a socket or a dangling link is
    skipped with its reason instead of being read."""
    rel_paths: list[str] = []
    seen = set(tree)
    for d, dirs, files in os.walk(class_dir, followlinks=True):
        for sub in sorted(dirs):
            real = os.path.realpath(os.path.join(d, sub))
            if real in seen or any(t.startswith(real.rstrip(os.sep) + os.sep) for t in tree):  # also ancestors
                dirs.remove(sub)
                rel = os.path.relpath(os.path.join(d, sub), class_dir).replace(os.sep, "/")
                skipped.append(
                    {"path": f"{name}/{rel}", "reason": "directory already listed (symlink loop or second link to it)"}
                )
            else:
                seen.add(real)
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, class_dir).replace(os.sep, "/")
            try:
                mode = os.stat(path).st_mode  # follows links: what open() would read
            except OSError as e:
                skipped.append({"path": f"{name}/{rel}", "reason": f"unreadable: {e.strerror or e}"})
                continue
            if not stat.S_ISREG(mode):
                kind = (
                    "fifo"
                    if stat.S_ISFIFO(mode)
                    else "device"
                    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "socket"
                    if stat.S_ISSOCK(mode)
                    else "special file"
                )
                skipped.append({"path": f"{name}/{rel}", "reason": f"not a regular file ({kind})"})
                continue
            rel_paths.append(rel)
    return sorted(rel_paths)


def _read_folder_samples(listing: _FolderListing, root: str) -> Iterator[tuple[RawSample, int]]:
    for f in listing.files:
        try:
            with open(f.path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            rel = os.path.relpath(f.path, root).replace(os.sep, "/")
            listing.skipped.append({"path": rel, "reason": f"unreadable: {e.strerror or e}"})
            continue
        yield RawSample(f.key, {f.ext: data, "cls": str(f.label).encode()}), f.label


def prepare_imagefolder(cfg: ImageFolderConfig) -> PreparedDataset:
    """Copy ``root/<class>/<image>`` into shards; labels are class indices in sorted name order.

    Image bytes are copied unchanged with their extension (lower-cased); files with other
    extensions, hidden class directories and files outside class directories are skipped and
    listed under ``skipped_files`` in dataset.json.
    """
    if not os.path.isdir(cfg.root):
        raise FileNotFoundError(f"root {cfg.root!r} is not a directory")
    listing = _scan_imagefolder(cfg.root)
    if not listing.classes:
        raise ValueError(f"root {cfg.root!r} has no class directories (expected root/<class>/<image>)")
    if not listing.files:
        raise ValueError(f"root {cfg.root!r} has no image files ({', '.join(IMAGE_EXTS)})")
    _begin_output(cfg.out)
    builder = _ManifestBuilder()
    with _progress(len(listing.files), "imagefolder") as bar:
        shards = _write_indexed(_read_folder_samples(listing, cfg.root), cfg.out, cfg.shard_size, builder, bar)
    _remove_stale_shards(cfg.out, shards)
    return _finish(cfg.out, "imagefolder", cfg, builder, shards, listing.classes, skipped_files=listing.skipped)


# ---------------------------------------------------------------------------------------- wds


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


def _sidecar_path(shard: str) -> str | None:
    """img2dataset writes ``NNNNN.parquet`` beside ``NNNNN.tar``."""
    return shard[: -len(".tar")] + ".parquet" if shard.endswith(".tar") else None


def _read_sidecar(shard: str) -> tuple[dict[str, tuple[str, str]] | None, str | None]:
    """``({key: (caption, url)}, problem)`` from the shard's img2dataset parquet, if there is one."""
    path = _sidecar_path(shard)
    if path is None:
        return None, None
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return None, None
    try:
        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - a damaged sidecar costs captions, not the shard
        return None, f"metadata {path} unreadable ({type(e).__name__}: {e}); captions from txt members"
    if "key" not in table.column_names:
        return None, f"metadata {path} has no 'key' column; captions from txt members"
    keys = [str(k) for k in table.column("key").to_pylist()]
    empty = [None] * len(keys)
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else empty
    urls = table.column("url").to_pylist() if "url" in table.column_names else empty
    return {k: (c or "", u or "") for k, c, u in zip(keys, captions, urls)}, None


def _parse_json(files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    if "json" not in files:
        return {}, ""
    try:
        value = json.loads(files["json"])
    except ValueError as e:
        return {}, f"bad json: {e}"
    return (value, "") if isinstance(value, dict) else ({}, "bad json: not an object")


def _wds_label(files: dict[str, bytes], meta: dict[str, Any]) -> tuple[int, str]:
    """``(label, error)``: from ``cls`` (int text), else the ``json`` ``label`` field, else ``-1``."""
    if "cls" in files:
        text = files["cls"].decode("utf-8", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            return -1, f"{ERR_UNKNOWN_LABEL}: cls {text[:40]!r}"
    elif "label" in meta:
        label = meta["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            return -1, f"{ERR_UNKNOWN_LABEL}: json label {str(label)[:40]!r}"
    else:
        return -1, ""
    return (label, "") if label >= -1 else (-1, f"{ERR_UNKNOWN_LABEL}: {label}")


def _index_wds_shard(shard: str, builder: _ManifestBuilder, bar: tqdm, shard_errors: list[ShardError]) -> None:
    sidecar, problem = _read_sidecar(shard)
    if problem:
        shard_errors.append(ShardError(shard, None, problem))
    for index, item in enumerate(iter_tar_samples(shard)):
        if isinstance(item, ShardError):
            shard_errors.append(item)
            return
        meta, json_error = _parse_json(item.files)
        label, label_error = _wds_label(item.files, meta)
        if sidecar is not None and item.key in sidecar:
            caption, url = sidecar[item.key]
        else:
            caption = item.files.get("txt", b"").decode("utf-8", errors="replace")
            url = str(meta.get("url") or "")
        builder.add(shard, index, item, label, label_error or json_error, caption=caption, url=url)
        bar.update(1)


def prepare_wds(cfg: WdsConfig) -> PreparedDataset:
    """Index existing shards in place: the manifest names them by absolute path or URL."""
    shards = expand_shard_pattern(cfg.pattern)
    _begin_output(cfg.out)
    builder = _ManifestBuilder(WDS_EXTRA_COLUMNS)
    shard_errors: list[ShardError] = []
    with _progress(None, "wds") as bar:
        for shard in shards:
            _index_wds_shard(shard, builder, bar, shard_errors)
    return _finish(cfg.out, "wds", cfg, builder, shards, None, shard_errors)


# ---------------------------------------------------------------------------------------- parquet


@dataclass(frozen=True)
class ParquetConfig:
    """Copy Parquet shards with an image-bytes column into tar shards (image bytes unchanged)."""

    pattern: str
    """Parquet files as a brace/glob pattern (``/data/train-{00000..00009}.parquet``, ``s3://b/*.parquet``
    is refused: fsspec URLs may use braces but not globs)."""
    out: str
    """Dataset directory to write (tar shards, manifest.parquet, dataset.json)."""
    shard_size: int = 1000
    """Samples per tar shard."""
    image_column: str = "image"
    """A struct column with a ``bytes`` field (Hugging Face ``Image`` feature) or a binary column."""
    label_column: str = "label"
    """An integer column; absent or null labels become -1."""

    def __post_init__(self) -> None:
        _require(bool(self.pattern), "pattern must be a non-empty parquet pattern")
        _require(bool(self.out), "out must be a non-empty path")
        _require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        _require(bool(self.image_column), "image_column must be a non-empty column name")
        _require(bool(self.label_column), "label_column must be a non-empty column name")
        _require(
            not (_is_url(self.pattern) and any(c in self.pattern for c in "*?[")),
            f"pattern: globs are only supported for local paths, got {self.pattern!r}",
        )


def _sniff_ext(data: bytes, path: str | None) -> str:
    """The image's extension: from the row's ``path`` when it names one, else from the magic bytes."""
    ext = os.path.splitext(path or "")[1][1:].lower()
    if ext in IMAGE_EXTS:
        return ext
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # JPEG or undecodable: the decoder, not the name, decides (a bad image is named in the manifest)


def _parquet_rows(path: str, cfg: ParquetConfig) -> Iterator[tuple[RawSample, int]]:
    """``(sample, label)`` for every row of one parquet file, keyed ``<file stem>_<row:06d>``."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(path).removesuffix(".parquet"))
    with fsspec.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        if cfg.image_column not in names:
            raise ValueError(
                f"{path}: no image column {cfg.image_column!r} (columns: {names}); name it with --image-column"
            )
        columns = [cfg.image_column] + ([cfg.label_column] if cfg.label_column in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            images = batch.column(cfg.image_column).to_pylist()
            labels = batch.column(cfg.label_column).to_pylist() if len(columns) > 1 else [None] * len(images)
            for image, label in zip(images, labels):
                data, where = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                label = label if isinstance(label, int) and not isinstance(label, bool) and label >= 0 else -1
                files = {"cls": str(label).encode()}  # always one member, so a row without an image still
                if data:  # has its place in the tar and the manifest
                    files[_sniff_ext(data, where)] = bytes(data)
                yield RawSample(f"{stem}_{row:06d}", files), label
                row += 1


def prepare_parquet(cfg: ParquetConfig) -> PreparedDataset:
    """Copy every row of the parquet files (in pattern order, then row order) into tar shards in
    ``cfg.out``; rows with no image bytes or an undecodable image stay in the manifest, named."""
    files = expand_shard_pattern(cfg.pattern)
    _begin_output(cfg.out)
    builder = _ManifestBuilder()
    samples = (item for f in files for item in _parquet_rows(f, cfg))
    with _progress(None, "parquet") as bar:
        shards = _write_indexed(samples, cfg.out, cfg.shard_size, builder, bar)
    _remove_stale_shards(cfg.out, shards)
    return _finish(cfg.out, "parquet", cfg, builder, shards, None)
