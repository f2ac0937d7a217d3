"""``parquet``: Parquet files with an image-bytes column (the Hugging Face datasets layout: an ``image``
struct with ``bytes``, plus ``label``), copied into tar shards with the image bytes unchanged.

Tar, not the Parquet files themselves: the loader and extract stream tars, and one more form of shard
would mean one more reader in each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq

from teacher_cache.dataset import PreparedDataset
from teacher_cache.shards import IMAGE_EXTS, RawSample

from .common import check_pattern, expand_shard_pattern, require, write_dataset
from .registry import register_source


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
        require(bool(self.pattern), "pattern must be a non-empty parquet pattern")
        require(bool(self.out), "out must be a non-empty path")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(bool(self.image_column), "image_column must be a non-empty column name")
        require(bool(self.label_column), "label_column must be a non-empty column name")
        check_pattern(self.pattern)


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


@register_source("parquet", config=ParquetConfig)
def prepare_parquet(cfg: ParquetConfig) -> PreparedDataset:
    """Copy every row of the parquet files (in pattern order, then row order) into tar shards in
    ``cfg.out``; rows with no image bytes or an undecodable image stay in the manifest, named."""
    files = expand_shard_pattern(cfg.pattern)
    samples = (item for f in files for item in _parquet_rows(f, cfg))
    return write_dataset("parquet", cfg, samples, None, None)
