"""``synthetic``: generate the class-structured set of :mod:`teacher_cache.synthetic` into shards."""

from __future__ import annotations

from dataclasses import dataclass

from teacher_cache.dataset import PreparedDataset
from teacher_cache.shards import RawSample
from teacher_cache.synthetic import (
    MAX_CLASSES,
    MIN_CLASSES,
    class_names,
    iter_synthetic_jpegs,
)

from .common import require, write_dataset
from .registry import register_source

JPEG_QUALITY = 90


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
        require(bool(self.out), "out must be a non-empty path")
        require(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        require(
            MIN_CLASSES <= self.num_classes <= MAX_CLASSES,
            f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.num_classes}",
        )
        require(16 <= self.image_size <= 1024, f"image_size must be in [16, 1024], got {self.image_size}")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


@register_source("synthetic", config=SyntheticConfig)
def prepare_synthetic(cfg: SyntheticConfig, processes: int | None = None) -> PreparedDataset:
    """Generate the synthetic set into ``cfg.out`` (JPEG quality 90, a ``cls`` member per sample), drawn by
    ``processes`` spawned processes (None: one per core for sets worth it). The bytes never depend on it."""
    jpegs = iter_synthetic_jpegs(cfg.num_samples, cfg.num_classes, cfg.image_size, cfg.seed, JPEG_QUALITY, processes)
    samples = ((RawSample(key, {"jpg": data, "cls": str(label).encode()}), label) for key, label, data in jpegs)
    return write_dataset("synthetic", cfg, samples, cfg.num_samples, class_names(cfg.num_classes))
