"""``digpt train``: pretrain a student against a teacher cache.

The loop is deliberately short: schedule, step, log, checkpoint. Everything about *what* is learned
lives in the objective (``objective(batch) -> (loss, metrics)``); everything about *which* samples in
which order lives in the loader (deterministic per (seed, epoch), so ``--resume`` replays exactly).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from teacher_cache.config import TeacherConfig
from teacher_cache.io import atomic_write_text
from teacher_cache.runtime import progress_bar, resolve_device
from teacher_cache.teachers import Teacher, build_teacher

from .blind import blind_baseline, image_share
from .checkpoint import TrainState, load_latest, save_checkpoint
from .data import CachedViews, CacheJoin, DataConfig, make_loader
from .objectives import Objective, StudentConfig, TargetSpec, create_objective
from .targets import FILE as TARGET_NORM_FILE
from .targets import NORMS, TargetNorm, estimate_target_norm

BLIND_FILE = "blind.json"


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
    target_norm: str = "channel"
    """Continuous targets: ``channel`` standardises each channel with the cache's statistics
    (``student/targets.py`` says why), ``none`` uses them as stored. Code targets are never changed."""
    seed: int = 0
    """Seeds model initialisation."""
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


@dataclass
class TrainResult:
    run: str
    steps: int
    final_loss: float
    seconds: float
    steps_per_s: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)


def lr_schedule(total: int, peak: float, warmup: float, min_lr: float) -> np.ndarray:
    """``lr[step]`` for every optimizer step, precomputed (dinov2 style)."""
    w = int(warmup * total) if warmup < 1 else int(warmup)
    w = min(w, max(total - 1, 0))
    steps = np.arange(total)
    cos = min_lr + 0.5 * (peak - min_lr) * (1 + np.cos(np.pi * (steps - w) / max(1, total - w)))
    return np.where(steps < w, peak * (steps + 1) / max(1, w), cos)


def param_groups(model: Objective, weight_decay: float) -> list[dict]:
    """No decay on biases, norms and the objective's named tokens (timm convention)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def online_targets(teacher: Teacher, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The targets a cache would hold for this batch, computed now by the teacher."""
    out = teacher(batch["teacher_images"])
    if teacher.spec.kind == "codes":
        return {"codes": out.tokens, "tokens": teacher.codebook[out.tokens]}
    targets = {"tokens": out.tokens.float()}
    if out.cls is not None:
        targets["cls"] = out.cls.float()
    return targets


def build_run(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
    """Objective, loader dataset and (online mode) teacher for ``cfg`` — shared by train and tests."""
    join = CacheJoin(cfg.data)
    target = TargetSpec.from_spec(join.spec)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = create_objective(cfg.objective, cfg.student, target, cfg.order).to(device)
    teacher = None
    if cfg.online_teacher:
        a = join.info.attrs
        teacher = build_teacher(TeacherConfig(**a["teacher_config"]), join.codebook, pca_basis=join.pca_basis)
        if teacher.fingerprint() != a["fingerprint"]:
            raise ValueError(
                f"--online-teacher: the teacher rebuilt from the cache's config has weights "
                f"{teacher.fingerprint()[:12]}, the cache was made by {a['fingerprint'][:12]}"
            )
        teacher = teacher.to(device)
    ds = CachedViews(cfg.data, rank, world, join, teacher_size=teacher.spec.input_size if teacher else None)
    return objective, ds, teacher, join


def target_norm_for(cfg: TrainConfig, join: CacheJoin) -> TargetNorm | None:
    """The run's target standardisation: the copy in the run directory when resuming (what the run
    started with), else estimated from the cache (deterministic: every rank gets the same)."""
    if cfg.target_norm == "none" or join.info.codes:
        return None
    if cfg.resume and os.path.exists(os.path.join(cfg.out, TARGET_NORM_FILE)):
        return TargetNorm.load(cfg.out)
    return estimate_target_norm(join)


def prepare_batch(
    batch: dict[str, torch.Tensor], device: torch.device, teacher: Teacher | None, norm: TargetNorm | None
) -> dict[str, torch.Tensor]:
    """A loader batch as the objective sees it: on the device, with online targets, standardised."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if teacher is not None:
        batch.update(online_targets(teacher, batch))
    return norm(batch) if norm is not None else batch


def measure_blind(
    cfg: TrainConfig,
    objective: Objective,
    ds: CachedViews,
    device: torch.device,
    teacher: Teacher | None,
    norm: TargetNorm | None,
) -> float | None:
    """The run's input-blind baseline (``student/blind.py``), from the first ``cfg.blind_batches``
    batches of epoch 0 — the same batches on every resume, so the number is a property of the run.
    A resumed run reads it back from ``blind.json``."""
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
            batches.append(prepare_batch(batch, device, teacher, norm))
            if len(batches) == cfg.blind_batches:
                break
    if len(batches) < 2:
        return None
    return blind_baseline(objective, batches, est_batches=max(1, (2 * len(batches)) // 3))


def check_out(out: str) -> None:
    """Refuse a run directory that would mix a run with other files: a file, or a non-empty directory
    that is not a run (every run directory holds config.json from its first write on)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out} exists and is not a directory; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "config.json")):
        raise ValueError(
            f"out {out} exists and is not a digpt run directory (no config.json, not empty); choose another --out"
        )


# Fields of a run's config.json ``train`` section that ``--resume`` may change: how long, how often it
# logs, where it runs, where the (fingerprint-checked) inputs now live. Any other difference is refused.
RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "epochs",
        "log_every",
        "ckpt_every",
        "amp",
        "device",
        "resume",
        "out",
        "data.shards",
        "data.cache",
        "data.num_workers",
        "data.on_mismatch",
        "data.mismatch_log",
    }
)


def guard_run_dir(cfg: TrainConfig) -> None:
    """A run directory is never overwritten: an existing run needs ``--resume`` (today's metrics.csv,
    checkpoints and ``latest`` would otherwise mix two runs)."""
    if os.path.exists(os.path.join(cfg.out, "config.json")) and not cfg.resume:
        raise ValueError(f"out {cfg.out} already holds a run; pass --resume to continue it, or choose another --out")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg: TrainConfig, join: CacheJoin) -> None:
    """``--resume`` continues the same run: refuse another cache (teacher fingerprint, shards, view plan,
    tokenizer), student, objective, optimizer or data config, naming every differing field."""
    path = os.path.join(cfg.out, "config.json")
    if not cfg.resume or not os.path.exists(path):
        return
    with open(path) as f:
        have = json.load(f)
    now = _flat(json.loads(json.dumps(asdict(cfg), default=str)))
    before = _flat(have.get("train", {}))
    diff = {
        k: (before.get(k), now.get(k))
        for k in sorted(set(now) | set(before))
        if k not in RESUME_MAY_CHANGE and before.get(k) != now.get(k)
    }
    cache = {
        "tokenizer": join.info.name,
        "fingerprint": join.info.attrs["fingerprint"],
        "manifest_fingerprint": join.ds.fingerprint,
        "plan_fingerprint": join.info.attrs["plan_fingerprint"],
    }
    diff.update(
        {f"cache.{k}": (have.get("cache", {}).get(k), v) for k, v in cache.items() if have.get("cache", {}).get(k) != v}
    )
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise ValueError(
            f"--resume: {cfg.out} was trained with another configuration ({len(diff)} field(s) differ: "
            f"{shown}); resume with the run's settings, or start a new run with another --out"
        )


MISMATCH_LOG = "skipped-mismatch.jsonl"


def with_mismatch_log(cfg: TrainConfig) -> TrainConfig:
    """``--on-mismatch skip``: samples skipped by the loader are appended to ``RUN/skipped-mismatch.jsonl``."""
    if cfg.data.on_mismatch != "skip" or cfg.data.mismatch_log:
        return cfg
    os.makedirs(cfg.out, exist_ok=True)
    log = os.path.join(cfg.out, MISMATCH_LOG)
    if not cfg.resume and os.path.exists(log):
        os.remove(log)
    return replace(cfg, data=replace(cfg.data, mismatch_log=log))


def report_mismatches(cfg: TrainConfig) -> int:
    """Count (and say) the samples skipped for a changed image; 0 when none or not skipping."""
    log = cfg.data.mismatch_log
    n = 0
    if log and os.path.exists(log):
        with open(log) as f:
            n = sum(1 for _ in f)
    if n:
        print(f"skipped {n} sample read(s) whose image differs from the manifest (--on-mismatch skip); see {log}")
    return n


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    rank, world = _dist_env()
    check_out(cfg.out)
    guard_run_dir(cfg)
    cfg = with_mismatch_log(cfg)
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    objective, ds, teacher, join = build_run(cfg, rank, world, device)
    check_resume_config(cfg, join)
    norm = target_norm_for(cfg, join)
    norm = norm.to(device) if norm is not None else None
    accum = cfg.optim.accum
    total = cfg.steps or cfg.epochs * max(1, ds.steps_per_epoch(0) // accum)
    global_batch = cfg.data.batch_size * accum * world
    peak = cfg.optim.base_lr * global_batch / 256
    lrs = lr_schedule(total, peak, cfg.optim.warmup, cfg.optim.min_lr)
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=peak, betas=cfg.optim.betas)
    state = TrainState()
    loaded = load_latest(cfg.out, objective, opt) if cfg.resume else None
    ckpt = loaded[0] if loaded else None
    if cfg.resume and ckpt is None and rank == 0:
        print(f"--resume: no checkpoint in {cfg.out}; starting from scratch")
    if loaded:
        state = loaded[1]
    model = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    if rank == 0:
        _write_config(cfg, join, objective, total, peak, norm)
        if norm is not None:
            norm.save(cfg.out)
    blind = measure_blind(cfg, objective, ds, device, teacher, norm) if rank == 0 else None
    if rank == 0 and blind is not None:
        _write_json(os.path.join(cfg.out, BLIND_FILE), {"blind_loss": blind, "batches": cfg.blind_batches})
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    log = _MetricsLog(cfg.out, resume_step=state.step if ckpt else None) if rank == 0 else None
    bar = progress_bar(
        total=total, initial=state.step, desc=f"train {cfg.objective}", unit="step", disable=not progress or rank != 0
    )
    t0, start_step, micro, last = time.perf_counter(), state.step, 0, {}
    while state.step < total:
        n_batches = ds.steps_per_epoch(state.epoch)
        if n_batches == 0:  # another epoch would not take a step either
            raise ValueError(
                f"epoch {state.epoch} has no full batch of {cfg.data.batch_size} for every rank; "
                "use a smaller --batch-size or fewer --workers"
            )
        ds.set_epoch(state.epoch, state.batch_in_epoch)
        for batch in make_loader(ds):
            if state.batch_in_epoch >= n_batches or state.step >= total:
                break
            batch = prepare_batch(batch, device, teacher, norm)
            for g in opt.param_groups:
                g["lr"] = float(lrs[state.step])
            with autocast:
                loss, metrics = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {state.step} (epoch {state.epoch}); "
                    "lower --base-lr or check the cache with `digpt verify`"
                )
            (loss / accum).backward()
            state.batch_in_epoch += 1
            micro += 1
            if micro % accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.clip_grad or math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            bar.update(1)
            last = {
                "step": state.step,
                "epoch": state.epoch,
                "lr": float(lrs[state.step - 1]),
                "grad_norm": float(grad_norm),
                **{k: float(v) for k, v in metrics.items()},
            }
            if blind is not None:
                last["blind_loss"] = blind
            if log is not None and (state.step % cfg.log_every == 0 or state.step in (1, total)):
                last["samples_per_s"] = (state.step - start_step) * global_batch / (time.perf_counter() - t0)
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.step < total and rank == 0:
                save_checkpoint(cfg.out, objective, opt, state)
        # A loader that ran dry early (samples skipped by --on-mismatch skip) ends the epoch too: never
        # replay the same epoch forever.
        if state.batch_in_epoch >= n_batches or state.step < total:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - t0
    done = state.step - start_step
    result = TrainResult(
        cfg.out,
        state.step,
        last.get("loss", float("nan")),
        seconds,
        done / seconds if seconds else 0.0,
        done * global_batch / seconds if seconds else 0.0,
        log.rows if log else [],
    )
    if rank == 0:
        save_checkpoint(cfg.out, objective, opt, state)
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        summary.update(blind_summary(cfg.out, result.final_loss, blind))
        _write_json(os.path.join(cfg.out, "summary.json"), summary)
        if progress:
            print(
                f"trained {done} steps in {seconds:.1f}s ({result.steps_per_s:.2f} steps/s, "
                f"{result.samples_per_s:.1f} samples/s); final loss {result.final_loss:.4f}; run: {cfg.out}"
            )
            if summary.get("blind_verdict"):
                print(summary["blind_verdict"])
        report_mismatches(cfg)
    if world > 1:
        dist.barrier()
    return result


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


BLIND_NEAR = 0.03
"""A final loss within this fraction of the blind baseline is reported as "learned little from the image"."""


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


def _write_config(
    cfg: TrainConfig, join: CacheJoin, objective: Objective, total: int, peak: float, norm: TargetNorm | None = None
) -> None:
    """The resolved config, plus what the run was trained against: enough to rebuild and check it."""
    os.makedirs(cfg.out, exist_ok=True)
    resolved = {
        "train": asdict(cfg),
        "resolved": {"total_steps": total, "peak_lr": peak, "order": getattr(objective, "order_name", None)},
        "target": asdict(TargetSpec.from_spec(join.spec)),
        "cache": {
            "tokenizer": join.info.name,
            "fingerprint": join.info.attrs["fingerprint"],
            "manifest_fingerprint": join.ds.fingerprint,
            "plan_fingerprint": join.info.attrs["plan_fingerprint"],
        },
        "encoder": asdict(objective.encoder.cfg),
        "target_norm": {
            "kind": cfg.target_norm if norm is not None else "none",
            **(norm.summary() if norm is not None else {}),
        },
    }
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2, default=str)


class _MetricsLog:
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
