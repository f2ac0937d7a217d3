"""The student stage's configs, apart from the code that runs them (no torch, no timm: ``digpt --help``,
``train --config`` and the ablation recipes read them without importing a model).

``TrainConfig`` holds the others: ``data`` (:class:`DataConfig`), ``student`` (:class:`StudentConfig`, whose
encoder is a ``ViTConfig`` preset of ``student/sizes.py``), ``optim`` (:class:`OptimConfig``) and the
objective's own knobs. A run writes it to ``RUN/config.json``; ``student/rundir.py: train_config_from_dict``
reads it back.
Checks that need a registry (an objective's name and knobs) run when the run opens, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sizes import STEMS, ViTConfig, list_vit_sizes, vit_config

__all__ = [
    "ATTN_IMPLS",
    "NORMS",
    "ON_MISMATCH",
    "DataConfig",
    "OptimConfig",
    "StudentConfig",
    "TrainConfig",
]

ATTN_IMPLS = ("eager", "sdpa_dense", "sdpa", "flex")

NORMS = ("channel", "token", "none")


ON_MISMATCH = ("error", "skip")

"""What the loader does with an image whose bytes no longer match the manifest (``DataConfig.on_mismatch``)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the student's samples and targets come from."""

    shards: str
    """Prepared dataset directory (image shards + manifest)."""
    cache: str
    """Teacher cache made from those shards."""
    tokenizer: str | None = None
    """Tokenizer group in the cache; ``None`` when the cache holds exactly one."""
    img_size: int = 224
    """Student input resolution (the teacher may have run at another)."""
    batch_size: int = 64
    """Samples per batch *per rank*."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seeds shard order, the shuffle buffer, the per-epoch view choice and the per-sample orders."""
    shuffle_buffer: int = 256
    """Samples held for in-shard shuffling (0 disables)."""
    on_mismatch: str = "error"
    """An image whose bytes no longer match the manifest's content hash (so its cached targets were
    computed from other pixels): ``error`` refuses naming the key; ``skip`` counts it and skips it."""
    mismatch_log: str | None = None
    """File that each skipped sample is appended to (one JSON line; ``on_mismatch="skip"``)."""
    max_views: int | None = None
    """Train on only the first N of the cache's stored views (None: all of them): what a cache that
    stored N views would give, from one cache of more (the K-views study, LEARNING.md)."""
    fresh_views: bool = False
    """Draw a new crop of every sample each epoch instead of a stored view. The cache holds no targets
    for such a view, so this needs the teacher run online (``--online-teacher``); the loader refuses it
    otherwise. With it, a run sees as many views as it has epochs: the other end of the K-views curve."""

    def __post_init__(self) -> None:
        if self.max_views is not None and self.max_views < 1:
            raise ValueError(f"max_views must be >= 1 (or None for all stored views), got {self.max_views}")
        if self.on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {self.on_mismatch!r}")
        for name in ("img_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"num_workers and shuffle_buffer must be >= 0, got {self.num_workers} and {self.shuffle_buffer}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class StudentConfig:
    """The student network and the knobs objectives share (a knob of one objective lives in that
    objective's own config: :func:`register_objective`'s ``config``)."""

    size: str = "tiny-test"
    """Encoder preset (the table in ``student/sizes.py``)."""
    cluster_size: int | None = None
    """Cluster side in patches; default half the patch grid (2x2 clusters, as the official 7 on 14x14)."""
    decoder_depth: int = 2
    """Blocks per decoder (paper Table 8: 2)."""
    decoder_dim: int | None = None
    """Decoder width; default 1024 for ViT-B and larger (official), else the encoder width."""
    decoder_heads: int | None = None
    """Decoder heads; default width / 32 (official head dim 32)."""
    drop_path: float = 0.0
    """Stochastic depth of the encoder."""
    attn_impl: str = "sdpa"
    """Attention kernel: sdpa (CPU and GPU), flex (GPU), sdpa_dense / eager (references)."""
    stem: str | None = None
    """Patch embedding, ``patch`` or ``conv`` (``student/vit.py``); None: the size preset's."""

    def __post_init__(self) -> None:
        if self.size not in list_vit_sizes():
            raise ValueError(f"student size must be one of {list_vit_sizes()}, got {self.size!r}")
        if self.cluster_size is not None and self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        if self.decoder_depth < 1:
            raise ValueError(f"decoder_depth must be >= 1, got {self.decoder_depth}")
        for name in ("decoder_dim", "decoder_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None (default), got {getattr(self, name)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.stem is not None and self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS} or None (the preset's), got {self.stem!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    def encoder_config(self) -> ViTConfig:
        return vit_config(self.size, drop_path=self.drop_path, **({"stem": self.stem} if self.stem else {}))

    def decoder_width(self) -> tuple[int, int]:
        enc = self.encoder_config().embed_dim
        dim = self.decoder_dim or (1024 if enc >= 768 else enc)
        return dim, self.decoder_heads or max(1, dim // 32)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warmup and a cosine decay (MAE / D-iGPT recipe)."""

    base_lr: float = 1.5e-4
    """Learning rate per 256 samples: the peak is ``base_lr * global_batch / 256``."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to biases, norms, position/class/query tokens)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup: float = 0.05
    """Warmup length: a fraction of all steps when < 1, else a number of steps."""
    clip_grad: float | None = 3.0
    """Clip the global gradient norm to this (None: no clipping)."""
    accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""

    def __post_init__(self) -> None:
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        for name in ("min_lr", "weight_decay", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.accum < 1:
            raise ValueError(f"accum must be >= 1, got {self.accum}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad}")


@dataclass(frozen=True)
class TrainConfig:
    """``digpt train``."""

    data: DataConfig
    """Shards, cache, batch size, workers, seed."""
    out: str
    """Run directory: config.json, metrics.csv, checkpoints/, summary.json."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """Encoder size and decoder shape."""
    objective: str = "digpt"
    """Pretraining objective (one module per family in ``student/objectives/``)."""
    order: str | None = None
    """Patch order of the autoregressive objectives (``student/orders.py``); None: the objective's default."""
    objective_knobs: Any = None
    """The objective's own knobs: an instance of the config it registers (``MaskedConfig`` for ``masked``);
    None: its defaults. A run records them resolved in config.json, and ``--resume`` compares them."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    steps: int | None = None
    """Optimizer steps to train for (exclusive with ``epochs``)."""
    epochs: int | None = None
    """Epochs to train for (exclusive with ``steps``)."""
    log_every: int = 10
    """Steps between log lines / CSV rows."""
    ckpt_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    amp: str = "auto"
    """Autocast: auto (bf16 on CUDA, off on CPU), bf16, off."""
    device: str = "auto"
    """auto, cpu or cuda."""
    resume: bool = False
    """Continue from RUN's latest checkpoint (same batches, same RNG)."""
    online_teacher: bool = False
    """Run the cache's teacher inside the step instead of reading targets (baseline and oracle)."""
    target_norm: str = "none"
    """Continuous targets: ``none`` uses them as stored (D-iGPT as published: its cosine loss L2-normalises
    raw teacher tokens; pixel teachers store MAE's norm-pix patches), ``channel`` standardises each channel
    with the cache's statistics (``student/targets.py`` says when that helps), ``token`` standardises each
    token over its own channels. Code targets are never changed."""
    seed: int = 0
    """Seeds model initialisation; `--seed` also sets the loader's (``data.seed``)."""
    blind_batches: int = 12
    """Batches read before training to score the input-blind baseline (``student/blind.py``): two thirds
    fit the per-position target statistics, one third scores them. 0: no baseline."""

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.out:
            raise ValueError("out must be a non-empty run directory path")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        size = self.student.encoder_config().img_size
        if self.data.img_size != size:
            raise ValueError(
                f"data.img_size {self.data.img_size} differs from student {self.student.size}'s input size {size}"
            )
        # The objective's name and knobs are checked against its registry when the run opens
        # (``student/rundir.py: open_run``), before any work: the registry imports torch and the models.  # an unknown objective, or another's knobs
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.target_norm not in NORMS:
            raise ValueError(f"target_norm must be one of {', '.join(NORMS)}, got {self.target_norm!r}")
        if self.blind_batches < 0 or self.blind_batches == 1:
            raise ValueError(f"blind_batches must be 0 (off) or >= 2, got {self.blind_batches}")
        if self.log_every < 1 or self.ckpt_every < 0:
            raise ValueError(f"log_every must be >= 1 and ckpt_every >= 0, got {self.log_every} and {self.ckpt_every}")
