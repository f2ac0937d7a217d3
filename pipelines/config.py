"""The pipelines' configs, apart from the code that runs them (no torch: ``digpt --help`` and a saved
``results.json`` read them without importing a model).

:class:`Budget` is what a demo and an ablation share (the data, the student, its schedule, the probe set);
:class:`AblateConfig` adds the recipe and where things go, :class:`DemoConfig` the demo's defaults.
:class:`ProbeConfig` is one probe of one encoder. Checks that need a registry (a recipe's name) import it
when a config is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from student.sizes import STEMS, list_vit_sizes, vit_config

__all__ = ["KINDS", "POOLS", "QUICK", "SEMANTIC", "AblateConfig", "Budget", "DemoConfig", "ProbeConfig"]

KINDS = ("linear", "knn", "finetune")
"""Probe kinds (``ProbeConfig.kind``)."""
POOLS = ("mean", "cls")
"""Token poolings (``ProbeConfig.pool``)."""
SEMANTIC = "efficientnet_lite0:128"
"""The semantic tokenizer of the demo and the recipes' default."""
QUICK = {"num_samples": 512, "steps": 150, "probe_samples": 1024}
"""``--quick``: a smoke run of every stage (under 6 minutes on 2 cores); too short for students to learn."""


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What ``digpt demo`` and ``digpt ablate`` share: the data, the students and their schedule, the
    probe set. Declared once; :class:`DemoConfig` changes only the defaults it must."""

    num_samples: int = 2048
    """Synthetic images the students pretrain on (when no ``shards`` are given), balanced over
    ``num_classes``; the probes use their own set (``probe_samples``)."""
    num_classes: int = 8
    """Shape classes of the synthetic sets."""
    student: str = "demo-cpu"
    """Student encoder preset (``demo-cpu``: 64 px, patch 8, an 8x8 grid split into 2x2 clusters, with the
    convolutional stem without which a small ViT learns nothing in a CPU budget, LEARNING.md §1)."""
    steps: int = 1200
    """Optimizer steps per student (D-iGPT on the semantic teacher probes 0.17-0.20 after 600 steps, 0.29
    after 1200, LEARNING.md §2)."""
    batch_size: int = 64
    """Samples per step."""
    base_lr: float = 8e-3
    """Learning rate per 256 samples (peak 2e-3 at batch 64: what the study found a 4-block student needs
    to learn in hundreds of steps, LEARNING.md §2; ImageNet recipes use far less)."""
    decoder_dim: int | None = None
    """Width of the students' decoders; None: the encoder's (``StudentConfig.decoder_dim``)."""
    semantic_teacher: str = SEMANTIC
    """The semantic tokenizer the recipes vary around (needs a grid that splits into the clusters;
    EfficientNet-Lite0 at 128 px: 4x4 tokens, one per 2x2 cluster of a 64 px / patch-8 student, 4x cheaper
    to extract than at 256 px)."""
    probe_samples: int = 8192
    """Size of the generated probe set: other images of the same generator, never seen in pretraining
    (a quarter is reported on: 8192 gives 2048 report samples). A probe fit on 6144 images and scored on
    2048 separates the pixel student from the floor (+0.030 +- 0.012 over 3 seeds) where one fit on 1536
    and scored on 512 could not (+0.023 +- 0.023; LEARNING.md §10). 0: probe on a held-out quarter of the
    pretraining set."""
    executor: str = "ray"
    """Extraction executor: ``ray`` or ``local``."""
    jobs: int = 1
    """Training runs (each with its probes) at once, each in a process of its own with cores / jobs torch
    threads; 0: as many as there are runs, up to the cores (1 on a GPU). For a many-core machine: on the
    project's 2 cores two demo students side by side took as long as one after the other (BENCHMARKS.md,
    issue #21). A run's numbers depend on its thread count in the last bits only."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_classes", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.student not in list_vit_sizes():
            raise ValueError(f"student must be one of {list_vit_sizes()}, got {self.student!r}")
        if self.decoder_dim is not None and self.decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1 or None (the encoder's width), got {self.decoder_dim}")
        if self.executor not in ("ray", "local"):
            raise ValueError(f"executor must be 'ray' or 'local', got {self.executor!r}")
        if self.jobs < 0:
            raise ValueError(f"jobs must be >= 0 (0: as many as the cores allow), got {self.jobs}")
        if self.probe_samples < 0 or 0 < self.probe_samples < 4 * self.num_classes:
            raise ValueError(
                f"probe_samples must be >= 0: 0 (a holdout of the pretraining set) or >= 4 * num_classes "
                f"({4 * self.num_classes}), got {self.probe_samples}"
            )

    def budget(self) -> dict:
        """The shared fields as keywords (what a demo hands its ablation)."""
        return {f.name: getattr(self, f.name) for f in fields(Budget)}


@dataclass(frozen=True, kw_only=True)
class AblateConfig(Budget):
    """``digpt ablate``."""

    recipe: str
    """all, tokenizers, decoders, orders, storage, views, learning or demo (see ``pipelines/recipes.py``)."""
    out: str
    """Output directory: data/, cache/, runs/, report.md, results.json, *.png. Run again with the same
    flags, an ablation reads back the runs it finished and resumes the one it left unfinished, so more
    ``--seeds`` train only the new seeds (``pipelines/rerun.py``); a run of another config there is refused."""
    shards: str | None = None
    """A prepared dataset to use; default: generate a synthetic one under ``out/data``."""
    image_size: int | None = None
    """Student input size (and the synthetic images' size); default: the student's. Given, it must match."""
    seeds: int = 1
    """Seeds per variant (mean +- std when > 1)."""
    views: int = 2
    """Augmented views per sample in the cache."""
    workers: int = 1
    """Loader workers per training run."""
    weights: tuple[tuple[str, str], ...] = ()
    """(teacher name, local weights file) pairs: headline teachers join the ``tokenizers`` recipe."""
    knn: bool = True
    """Also report k-NN accuracy."""
    cache: str | None = None
    """Cache location; default ``out/cache`` (point several ablations at one cache to share extraction)."""
    stem: str | None = None
    """Student patch embedding, ``patch`` or ``conv``; None: the preset's (``student/vit.py``)."""
    probe_shards: str | None = None
    """A labelled dataset the probes fit and report on; None: a generated one (``probe_samples``) when the
    pretraining data is generated, else a held-out quarter of ``shards``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from teacher_cache.synthetic import MAX_CLASSES, MIN_CLASSES

        # The recipe's name is checked against the registry when the ablation starts (``check_inputs``):
        # the registry imports the recipes, which import this module.
        if self.image_size is None:
            object.__setattr__(self, "image_size", vit_config(self.student).img_size)  # frozen: resolved once
        for name in ("image_size", "seeds", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.out:
            raise ValueError("out must be a non-empty directory path")
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.num_classes}")
        if self.shards is None and self.num_samples < 4 * self.num_classes:
            # The probes split every class three ways (fit, select, report).
            raise ValueError(f"num_samples must be >= 4 * num_classes ({4 * self.num_classes}), got {self.num_samples}")
        if vit_config(self.student).img_size != self.image_size:
            raise ValueError(
                f"student {self.student!r} takes {vit_config(self.student).img_size} px images, the "
                f"ablation's images are {self.image_size} px; choose a student of that size "
                f"(e.g. small-cpu or demo-cpu for 64 px)"
            )
        if self.stem is not None and self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS} or None (the preset's), got {self.stem!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.weights and self.recipe != "tokenizers":
            raise ValueError(
                f"weights add teachers to the tokenizers recipe only; recipe {self.recipe!r} would ignore them"
            )


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Budget):
    """``digpt demo``: the ``demo`` recipe of ``digpt ablate`` on generated data, then ``verify``. The
    defaults come from the learning study (LEARNING.md): the smallest budget in which, on 2 CPU cores, a
    student pretrained on semantic targets beats one on pixel targets, which beats the random-init floor,
    each gap beyond two standard errors in linear probe and k-NN, on a probe set of its own (§10)."""

    out: str = "demo_out"
    """Everything goes under this directory: data/, cache/, runs/, report.md, plots."""
    decoder_dim: int | None = 48
    """Width of the students' two decoders (half the encoder's 96): the decoders of a 4-block encoder cost
    more than it does; at 48 a step takes 0.28 s instead of 0.51 s and the semantic student probes the same
    within noise (LEARNING.md §7)."""
    quick: bool = False
    """Smoke run: 512 images, 150 steps per student, 1024 probe images (every stage runs; nothing is
    expected to learn)."""

    def __post_init__(self) -> None:
        if self.quick:  # frozen: resolved once, so the report shows what actually ran
            for k, v in QUICK.items():
                if getattr(self, k) == DemoConfig.__dataclass_fields__[k].default:
                    object.__setattr__(self, k, v)
        super().__post_init__()
        if self.num_samples < 4 * self.num_classes:
            raise ValueError(f"num_samples must be >= 4 * num_classes ({4 * self.num_classes}), got {self.num_samples}")

    def ablate_config(self) -> AblateConfig:
        """The ablation the demo runs: its ``demo`` recipe with this budget, at the demo student's 64 px."""
        return AblateConfig(recipe="demo", out=self.out, image_size=64, **self.budget())


@dataclass(frozen=True)
class ProbeConfig:
    """``digpt probe``: which encoder, on which shards, with which protocol."""

    shards: str
    """Prepared dataset directory the probe trains on."""
    kind: str = "linear"
    """``linear`` (standardised features + linear classifier), ``knn`` (DINO weighted k-NN) or
    ``finetune`` (short end-to-end fine-tune with layer-wise lr decay)."""
    run: str | None = None
    """Trained run directory whose encoder is probed (None: ``random_init`` with ``student``)."""
    val_shards: str | None = None
    """Dataset to report on; None: a stratified ``holdout`` of ``shards``."""
    out: str | None = None
    """Result JSON; default ``RUN/probe_<kind>[_random].json`` (required without ``run``)."""
    random_init: bool = False
    """Probe a seeded random encoder (the run's architecture, or the ``student`` preset): the floor."""
    student: str | None = None
    """Encoder preset for ``random_init`` without a run (``tiny-test``, ``small-cpu``, ...)."""
    pool: str = "mean"
    """Token pooling: ``mean`` of patch tokens or the ``cls`` token. Mean by default: iGPT found
    mean-pooled (middle-layer) features best for autoregressive models. In D-iGPT pretraining (the
    official cls rule, ``AttnMask(prefix="last")``) the class token attends to every visible cluster,
    while of the patch tokens only the last visible cluster's attend to it; it is read by that cluster
    and the decoders' class queries, so it is trained as a summary for one prediction, where the mean
    carries what every patch learned. The probe itself runs the encoder with no mask (every token
    attends to every token), as D-iGPT's fine-tuning and MAE-style probes do: a probe image has no
    order, and a causal mask would leave the first patches almost no context."""
    layers: tuple[int, ...] | None = None
    """0-based blocks to probe (linear/knn); None: every block. The final norm is always added."""
    batch_size: int = 64
    """Images per encoder forward (and per fine-tune step)."""
    holdout: float = 0.25
    """Fraction of each class held out as the report set when there is no ``val_shards``."""
    select_fraction: float = 0.25
    """Fraction of each class of the training part used to choose layer and lr."""
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    """Linear probe: AdamW learning rates tried (chosen on the select split)."""
    epochs: int = 200
    """Linear probe: full-batch AdamW steps (cosine-decayed)."""
    weight_decay: float = 1e-4
    """Linear probe: AdamW weight decay."""
    k: int = 20
    """k-NN: neighbours that vote (capped at the bank size)."""
    temperature: float = 0.07
    """k-NN: votes weigh ``exp(cosine / temperature)`` (DINO)."""
    finetune_epochs: int = 10
    """Fine-tune: epochs over the training part."""
    finetune_lr: float = 1e-3
    """Fine-tune: peak AdamW lr of the head; block ``i`` gets ``layer_decay ** (depth + 1 - i)`` of it."""
    layer_decay: float = 0.75
    """Fine-tune: per-block lr decay from the head down (MAE / D-iGPT). The same for ``random_init``, so
    the floor differs from a trained encoder only in its weights (LEARNING.md: no decay measured no better)."""
    crop_scale: float = 0.35
    """Fine-tune: smallest area fraction of the random resized crop (flips too); 1.0: flips only."""
    finetune_weight_decay: float = 0.05
    """Fine-tune: AdamW weight decay (not on biases, norms, class/position tokens)."""
    drop_path: float = 0.1
    """Fine-tune: stochastic depth of the last block (MAE fine-tunes with 0.1)."""
    warmup: float = 0.1
    """Fine-tune: warmup as a fraction of all steps."""
    seed: int = 0
    """Seeds the splits, the random encoder, the fine-tune's augmentation and batch order."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ProbeConfig.{name} {msg}, got {getattr(self, name)!r}")

        need(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        need(self.pool in POOLS, "pool", f"must be one of {', '.join(POOLS)}")
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(bool(self.shards), "shards", "must be a dataset directory")
        need(self.run is not None or self.random_init, "run", "is required unless random_init is set")
        need(
            self.run is None or self.student is None,
            "student",
            "only applies to random_init without a run (a run knows its encoder)",
        )
        need(
            self.run is not None or self.student is not None,
            "student",
            "names the preset of a random_init encoder when there is no run",
        )
        need(
            self.student is None or self.student in list_vit_sizes(),
            "student",
            f"must be one of {', '.join(list_vit_sizes())}",
        )
        need(self.run is not None or self.out is not None, "out", "is required when there is no run")
        need(self.out is None or bool(self.out), "out", "must be a non-empty file path")
        for name in ("batch_size", "epochs", "k", "finetune_epochs"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("holdout", "select_fraction"):
            need(0.0 < getattr(self, name) < 1.0, name, "must be in (0, 1)")
        need(len(self.lrs) > 0 and all(lr > 0 for lr in self.lrs), "lrs", "must be non-empty and > 0")
        need(
            self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
            "layers",
            "must be None or non-empty 0-based block indices",
        )
        for name in ("temperature", "finetune_lr"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(0.0 < self.layer_decay <= 1.0, "layer_decay", "must be in (0, 1]")
        need(0.0 < self.crop_scale <= 1.0, "crop_scale", "must be in (0, 1]")
        for name in ("weight_decay", "finetune_weight_decay"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0.0 <= self.drop_path < 1.0, "drop_path", "must be in [0, 1)")
        need(0.0 <= self.warmup < 1.0, "warmup", "must be in [0, 1)")
        need(self.seed >= 0, "seed", "must be >= 0")

    def out_path(self) -> str:
        if self.out is not None:
            return self.out
        return os.path.join(self.run, f"probe_{self.kind}{'_random' if self.random_init else ''}.json")
