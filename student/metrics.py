"""What a training run reports: metrics.csv and TensorBoard per logged step, the input-blind baseline
column beside the loss (``student/blind.py`` says why), the progress bar, and summary.json at the end.

The loop hands :class:`RunLogger` one row per optimizer step; everything about files, ranks, resume
truncation and the blind baseline's verdict lives here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from teacher_cache.io import atomic_write_text
from teacher_cache.runtime import progress_bar

from .blind import blind_baseline, image_share
from .data import make_loader
from .rundir import write_json

if TYPE_CHECKING:
    from .checkpoint import TrainState
    from .config import TrainConfig
    from .data import CachedViews
    from .objectives import Objective
    from .stages import Stages

BLIND_FILE = "blind.json"
BLIND_NEAR = 0.03
"""A final loss within this fraction of the blind baseline is reported as "learned little from the image"."""


@dataclass
class TrainResult:
    run: str
    steps: int
    final_loss: float
    seconds: float
    steps_per_s: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)


def measure_blind(cfg: TrainConfig, objective: Objective, ds: CachedViews, stages: Stages) -> float | None:
    """The run's input-blind baseline (``student/blind.py``), from the first ``cfg.blind_batches``
    batches of epoch 0 through the run's own stages — the same batches on every resume, so the number is
    a property of the run. A resumed run reads it back from ``blind.json``; a new one writes it there."""
    path = os.path.join(cfg.out, BLIND_FILE)
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)["blind_loss"]
    if cfg.blind_batches == 0:
        return None
    ds.set_epoch(0, 0)
    batches = []
    with torch.no_grad():
        for batch in make_loader(ds):
            batches.append(stages(batch))
            if len(batches) == cfg.blind_batches:
                break
    if len(batches) < 2:
        return None
    blind = blind_baseline(objective, batches, est_batches=max(1, (2 * len(batches)) // 3))
    if blind is not None:
        write_json(path, {"blind_loss": blind, "batches": cfg.blind_batches})
    return blind


def blind_summary(run: str, final: float, blind: float | None) -> dict:
    """The run's loss against its input-blind baseline: the loss of step 1 (always logged; read from
    metrics.csv, so a resumed run counts from its true start), the share of the drop that needed the
    image, a verdict."""
    if blind is None or not math.isfinite(final):
        return {}
    first = None
    path = os.path.join(run, "metrics.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            row = next(csv.DictReader(f), None)
        first = float(row["loss"]) if row and row.get("loss") else None
    out: dict = {"blind_loss": blind, "first_loss": first}
    share = image_share(first, final, blind) if first is not None else None
    out["image_share_of_drop"] = share
    gap = (blind - final) / abs(blind) if blind else 0.0
    out["below_blind"] = gap
    if gap < BLIND_NEAR:
        out["blind_verdict"] = (
            f"note: the final loss {final:.4f} is within {BLIND_NEAR:.0%} of the input-blind baseline "
            f"{blind:.4f} (per-position mean target): this run has learned little that needs the "
            "image; a probe will tell, the loss cannot"
        )
    elif share is not None:
        out["blind_verdict"] = (
            f"input-blind baseline {blind:.4f}: {share:.0%} of the loss drop "
            f"({first:.4f} -> {final:.4f}) needed the image"
        )
    return out


class MetricsLog:
    """metrics.csv (and TensorBoard when the package is installed)."""

    def __init__(self, run: str, resume_step: int | None = None):
        os.makedirs(run, exist_ok=True)
        self.path = os.path.join(run, "metrics.csv")
        self.rows: list[dict] = []
        if resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        elif os.path.exists(self.path):
            self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, TensorBoard hides the events a killed run logged after its checkpoint.
            self.tb = SummaryWriter(
                os.path.join(run, "tb"), purge_step=None if resume_step is None else resume_step + 1
            )
        except ImportError:  # tensorboard is optional
            self.tb = None

    def _truncate(self, step: int) -> None:
        """Keep the rows up to the checkpoint being resumed from. A run killed between checkpoints has
        logged steps past it (the last line maybe half-written); the resumed run logs those steps
        again, so without this they would appear twice in metrics.csv."""
        with open(self.path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if not lines or not lines[0].endswith("\n"):  # killed while writing the header: start afresh
            os.remove(self.path)
            return
        header = next(csv.reader(lines[:1]))
        at = header.index("step") if "step" in header else 0
        keep = lines[:1]
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            if not line.endswith("\n") or len(fields) != len(header) or int(fields[at]) > step:
                break
            keep.append(line)
        atomic_write_text(self.path, "".join(keep))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, row["step"])


class RunLogger:
    """One row per optimizer step: kept as the last row on every rank (the result's final loss), written
    to metrics.csv/TensorBoard every ``log_every`` steps (and at steps 1 and ``total``) on rank 0."""

    def __init__(
        self,
        cfg: TrainConfig,
        total: int,
        global_batch: int,
        start: int,
        resumed: bool,
        blind: float | None,
        rank: int = 0,
        progress: bool = True,
    ):
        self.cfg, self.total, self.global_batch, self.start, self.blind = cfg, total, global_batch, start, blind
        self.log = MetricsLog(cfg.out, resume_step=start if resumed else None) if rank == 0 else None
        self.bar = progress_bar(
            total=total, initial=start, desc=f"train {cfg.objective}", unit="step", disable=not progress or rank != 0
        )
        self.progress, self.rank = progress, rank
        self.t0 = time.perf_counter()
        self.last: dict = {}

    def step(self, step: int, epoch: int, lr: float, grad_norm: torch.Tensor, metrics: dict) -> None:
        self.bar.update(1)
        row = {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "grad_norm": float(grad_norm),
            **{k: float(v) for k, v in metrics.items()},
        }
        if self.blind is not None:
            row["blind_loss"] = self.blind
        self.last = row
        if self.log is not None and (step % self.cfg.log_every == 0 or step in (1, self.total)):
            row["samples_per_s"] = (step - self.start) * self.global_batch / (time.perf_counter() - self.t0)
            self.log.write(row)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    def result(self, state: TrainState) -> TrainResult:
        """Close the bar; the run's figures (timed up to now: the final checkpoint is not counted)."""
        self.bar.close()
        seconds = time.perf_counter() - self.t0
        done = state.step - self.start
        return TrainResult(
            self.cfg.out,
            state.step,
            self.last.get("loss", float("nan")),
            seconds,
            done / seconds if seconds else 0.0,
            done * self.global_batch / seconds if seconds else 0.0,
            self.log.rows if self.log else [],
        )

    def summarise(self, result: TrainResult) -> None:
        """summary.json (the objective and its knobs, the blind baseline's verdict), and a line that says it
        (rank 0 only)."""
        if self.rank != 0:
            return
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        knobs = self.cfg.objective_knobs
        summary.update(objective=self.cfg.objective, objective_knobs=asdict(knobs) if knobs is not None else None)
        summary.update(blind_summary(self.cfg.out, result.final_loss, self.blind))
        write_json(os.path.join(self.cfg.out, "summary.json"), summary)
        if self.progress:
            print(
                f"trained {result.steps - self.start} steps in {result.seconds:.1f}s ({result.steps_per_s:.2f} "
                f"steps/s, {result.samples_per_s:.1f} samples/s); final loss {result.final_loss:.4f}; "
                f"run: {self.cfg.out}"
            )
            if summary.get("blind_verdict"):
                print(summary["blind_verdict"])
