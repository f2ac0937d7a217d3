"""Typed, frozen configs of the teacher-cache stage. The CLI builds these; nothing below sees argparse.

Every field is validated in ``__post_init__`` with an error that names it, so bad configuration fails
before any work starts (DESIGN invariant 5).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .names import CODECS, DTYPES, slug
from .views import AugConfig

AUTOCAST = ("none", "bf16", "fp16")
KMEANS_METRICS = ("euclidean", "cosine")
"""``kmeans:`` distance: ``euclidean`` (DiGIT's faiss k-means on the raw features; the default of a new
extract) or ``cosine`` (spherical k-means on L2-normalised features; what a cache recorded before the
knob existed used)."""
_RAY_ADDRESS = re.compile(r"auto|local|(ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


@dataclass(frozen=True)
class TeacherConfig:
    """One tokenizer to extract."""

    name: str
    """Registry name or preset: ``efficientnet_lite0``, ``pixel:224/16``, ``openclip:ViT-B-16@openai``,
    ``kmeans:<teacher>``, ``pca:<teacher>``."""
    weights: str | None = None
    """Local weights file (no network). For ``kmeans:<t>`` / ``pca:<t>`` these are the base teacher's weights."""
    layer: int | None = None
    """Block whose output is stored (1-based); ``None``: the teacher's default (last)."""
    group: str | None = None
    """Name of the tokenizer group in the cache; default derived from name and layer."""
    codebook: str | None = None
    """``kmeans`` only: a codebook file (safetensors) to use instead of fitting one."""
    codebook_size: int = 512
    """``kmeans`` only: number of centroids to fit."""
    metric: str | None = None
    """``kmeans`` only: ``euclidean`` (DiGIT's: plain k-means on the raw features, nearest centroid by
    squared distance) or ``cosine`` (spherical k-means on L2-normalised features). Unset: ``euclidean``
    for a new extract (``ExtractConfig`` records the resolved value); a cache recorded before this knob
    existed has none and reads back as ``cosine``, what made it."""
    fit_samples: int = 512
    """``kmeans`` / ``pca``: samples (first view each) whose tokens the codebook / PCA basis is fit on."""
    pca_dim: int = 64
    """``pca`` only: principal directions kept (the stored token width; at most the base's token dim)."""
    allow_hub: bool = False
    """Let hub-backed teachers download weights when no ``weights`` file is given."""
    knobs: dict[str, Any] | None = None
    """Settings only this teacher's family has, by name (the family registers their config:
    ``register_teacher(..., knobs=Config)``); checked against it before any work."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("teacher name must not be empty")
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"layer must be >= 1 (1-based block index), got {self.layer}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.fit_samples < 1:
            raise ValueError(f"fit_samples must be >= 1, got {self.fit_samples}")
        if self.pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1, got {self.pca_dim}")
        if self.metric is not None and self.metric not in KMEANS_METRICS:
            raise ValueError(f"metric must be one of {', '.join(KMEANS_METRICS)}, got {self.metric!r}")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TeacherConfig:
        """The config a tokenizer group's recorded ``teacher_config`` stands for, reading a knob the
        record predates as the value that made it (a ``kmeans:`` record without ``metric``: ``cosine``).
        ``TeacherConfig(**record)`` builds the same teacher (an unset ``metric`` assigns by cosine)."""
        known = {f.name for f in fields(cls)}
        tc = cls(**{k: v for k, v in record.items() if k in known})
        return replace(tc, metric="cosine") if tc.metric is None and tc.is_kmeans else tc

    @property
    def is_kmeans(self) -> bool:
        return self.name.startswith("kmeans:")

    @property
    def group_name(self) -> str:
        return self.group or slug(self.name + (f"_l{self.layer}" if self.layer else ""))

    def options(self) -> dict:
        """Keyword options for :func:`create_teacher` beyond name/weights/layer."""
        return {"allow_hub": True} if self.allow_hub else {}


@dataclass(frozen=True)
class StorageConfig:
    """How tokens are stored."""

    dtype: str = "fp16"
    """``fp32``, ``fp16``, ``bf16`` or ``int8`` (per-token absmax scale)."""
    chunk_rows: int = 64
    """Rows per write block: the extractor holds this many rows' targets in memory (schema 1: rows per chunk)."""
    clevel: int = 3
    """Blosc compression level (0 = store raw)."""
    codec: str = "auto"
    """Codec of the target arrays: ``auto`` (float features raw: they barely compress and the loader decodes
    every sample; Blosc zstd for integer codes), ``none``, ``zstd`` or ``lz4``."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if not 0 <= self.clevel <= 9:
            raise ValueError(f"clevel must be in [0, 9], got {self.clevel}")


@dataclass(frozen=True)
class ExtractConfig:
    """``digpt extract``: run teachers once over prepared shards and write the cache."""

    shards: str
    """Prepared dataset directory (has ``manifest.parquet`` and ``dataset.json``)."""
    out: str
    """Cache location: a local directory or an fsspec URL."""
    teachers: tuple[TeacherConfig, ...]
    """Tokenizers to extract; each becomes a group in the cache."""
    aug: AugConfig = field(default_factory=AugConfig)
    """The view plan's augmentation (shared by every teacher)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Storage form of the tokens."""
    batch_size: int = 64
    """Views per teacher forward."""
    executor: str = "ray"
    """``ray`` (default; embedded local cluster unless ``ray_address``) or ``local`` (in-process, serial)."""
    ray_address: str | None = None
    """Address of an existing Ray cluster (``auto`` or ``ray://host:port``)."""
    workers: int | None = None
    """Ray workers (each loads every teacher once); default: one per GPU, else cores / threads."""
    threads: int | None = None
    """Torch threads per worker on CPU; default: cores / workers."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    decode_threads: int = 2
    """Threads per worker that decode and crop images while the teacher runs on the previous batch (PIL and
    torch release the GIL); a writer thread stores the previous chunk meanwhile. The cache's bytes never
    depend on it."""
    decode_processes: int = 0
    """Processes per worker that decode and crop instead of threads (0: use ``decode_threads``). Threads
    share the worker's GIL with the reader, the teacher's Python and the writer: with a fast teacher (a
    GPU's) that contention bounds extraction, and a GPU host has the cores for processes. They start once
    per worker (spawned, ~1-2 s each) and take rows a few at a time. They are CPUs beyond the worker's
    ``threads`` (which is what Ray reserves for it): leave cores for them. The cache's bytes never depend
    on it."""
    shards_in_flight: int = 1
    """Shards one worker extracts at once (each with its own decode threads and writer), so that one shard's
    group creation and bookkeeping overlap another's decoding and forward — worth it for many small shards.
    The cache's bytes never depend on it; with the ``local`` executor, 1 keeps shards strictly in order."""
    autocast: str = "none"
    """CUDA only: run the teacher under ``torch.autocast`` in ``bf16`` or ``fp16`` (faster on tensor cores;
    recorded in the tokenizer's provenance, so a cache never mixes precisions); ``none``: float32."""

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ValueError("teachers must name at least one teacher")
        groups = [t.group_name for t in self.teachers]
        if len(set(groups)) != len(groups):
            raise ValueError(f"teachers map to duplicate cache groups {groups}; set distinct group names")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.executor not in ("ray", "local"):
            raise ValueError(f"executor must be 'ray' or 'local', got {self.executor!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {self.decode_threads}")
        if self.decode_processes < 0:
            raise ValueError(f"decode_processes must be >= 0 (0: decode in threads), got {self.decode_processes}")
        if self.shards_in_flight < 1:
            raise ValueError(f"shards_in_flight must be >= 1, got {self.shards_in_flight}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        if any(t.metric is None and t.is_kmeans for t in self.teachers):
            # A new extract fits DiGIT's euclidean k-means unless told otherwise; the resolved metric is
            # what the workers build and what the cache records (teacher_config.metric).
            resolved = tuple(
                replace(t, metric=KMEANS_METRICS[0]) if t.metric is None and t.is_kmeans else t for t in self.teachers
            )
            object.__setattr__(self, "teachers", resolved)
        if self.autocast != "none" and self.device == "cpu":
            raise ValueError(f"autocast {self.autocast!r} needs a CUDA device; use autocast 'none' on the CPU")
        if self.ray_address is not None and not _RAY_ADDRESS.fullmatch(self.ray_address):
            # Checked here because Ray only parses it after the cache has been created.
            raise ValueError(
                f"ray_address must be 'auto', 'local', HOST:PORT or ray://HOST:PORT, got {self.ray_address!r}"
            )

    def to_json(self) -> dict:
        return asdict(self)
