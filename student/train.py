"""``digpt train``: pretrain a student against a teacher cache.

The loop is deliberately short: schedule, step, log, checkpoint. Everything about *what* is learned
lives in the objective (``objective(batch) -> (loss, metrics)``); what happens to a batch before it
(device, online teacher, target standardisation) in its stages (``student/stages.py``); which samples in
which order in the loader (deterministic per (seed, epoch), so ``--resume`` replays exactly); what is
logged in ``student/metrics.py``; the run directory's records and checks in ``student/rundir.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from teacher_cache.runtime import resolve_device

from .checkpoint import TrainState, load_latest, save_checkpoint
from .config import OptimConfig, TrainConfig
from .data import CachedViews, CacheJoin, make_loader
from .metrics import RunLogger, TrainResult, measure_blind
from .objectives import Objective, TargetSpec, create_objective
from .rundir import check_resume_config, open_run, report_mismatches, write_config
from .stages import Stages, autocast, build_stages, online_teacher_for
from .stages import online_targets as online_targets  # re-exported: tests and bench/train.py use it from here
from .stages import target_norm_for as target_norm_for
from .targets import TargetNorm, TokenNorm

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "build_run", "lr_schedule", "param_groups", "train"]


def lr_schedule(total: int, peak: float, warmup: float, min_lr: float) -> np.ndarray:
    """``lr[step]`` for every optimizer step, precomputed (dinov2 style)."""
    w = int(warmup * total) if warmup < 1 else int(warmup)
    w = min(w, max(total - 1, 0))
    steps = np.arange(total)
    cos = min_lr + 0.5 * (peak - min_lr) * (1 + np.cos(np.pi * (steps - w) / max(1, total - w)))
    return np.where(steps < w, peak * (steps + 1) / max(1, w), cos)


def make_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, betas: tuple[float, float]):
    """AdamW over :func:`param_groups`, the fused implementation (one kernel over all parameters instead of
    a Python loop of small ops per parameter: 0.96x the demo student's step on the CPU, BENCHMARKS.md #21)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


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


def build_run(
    cfg: TrainConfig,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    decode_targets: bool = True,
):
    """Objective, loader dataset and (online mode) teacher for ``cfg`` — shared by train and tests.
    ``decode_targets=False``: the loader yields stored targets and the run's stages decode them on
    ``device`` (:class:`student.stages.DecodeTargets`), as ``train`` does."""
    join = CacheJoin(cfg.data)
    target = TargetSpec.from_spec(join.spec)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = create_objective(cfg.objective, cfg.student, target, cfg.order, cfg.objective_knobs).to(device)
    teacher = online_teacher_for(join, device) if cfg.online_teacher else None
    size = teacher.spec.input_size if teacher else None
    ds = CachedViews(cfg.data, rank, world, join, teacher_size=size, decode_targets=decode_targets)
    return objective, ds, teacher, join


def _epoch_batches(ds: CachedViews, state: TrainState, batch_size: int) -> int:
    n = ds.steps_per_epoch(state.epoch)
    if n == 0:  # another epoch would not take a step either
        raise ValueError(
            f"epoch {state.epoch} has no full batch of {batch_size} for every rank; "
            "use a smaller --batch-size or fewer --workers"
        )
    ds.set_epoch(state.epoch, state.batch_in_epoch)
    return n


def _check_finite(loss: torch.Tensor, state: TrainState) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {state.step} (epoch {state.epoch}); "
            "lower --base-lr or check the cache with `digpt verify`"
        )


@dataclass
class Setup:
    """What the loop needs, built once before it by :func:`setup`."""

    objective: Objective
    ds: CachedViews
    stages: Stages
    lrs: np.ndarray
    """``lr[step]`` for every optimizer step; ``len(lrs)`` is the run's total."""
    opt: torch.optim.Optimizer
    state: TrainState
    """Where training stands (restored from the latest checkpoint on ``--resume``)."""
    resumed: bool
    global_batch: int
    blind: float | None
    """The input-blind baseline (rank 0; None on other ranks or when off)."""


def setup(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Setup:
    """Objective, loader, stages, schedule, optimizer, resumed state, and (rank 0) the run directory's
    config.json, target statistics and blind baseline."""
    objective, ds, teacher, join = build_run(cfg, rank, world, device, decode_targets=False)
    check_resume_config(cfg, join)
    stages = build_stages(cfg, join, device, teacher)
    total = cfg.steps or cfg.epochs * max(1, ds.steps_per_epoch(0) // cfg.optim.accum)
    global_batch = cfg.data.batch_size * cfg.optim.accum * world
    peak = cfg.optim.base_lr * global_batch / 256
    lrs = lr_schedule(total, peak, cfg.optim.warmup, cfg.optim.min_lr)
    opt = make_optimizer(objective, cfg.optim.weight_decay, peak, cfg.optim.betas)
    loaded = load_latest(cfg.out, objective, opt) if cfg.resume else None
    if cfg.resume and loaded is None and rank == 0:
        print(f"--resume: no checkpoint in {cfg.out}; starting from scratch")
    state = loaded[1] if loaded else TrainState()
    norm = stages.find(TargetNorm)
    if rank == 0:
        write_config(cfg, join, objective, total, peak, norm or stages.find(TokenNorm))
        if norm is not None:
            norm.save(cfg.out)
    blind = measure_blind(cfg, objective, ds, stages) if rank == 0 else None
    return Setup(objective, ds, stages, lrs, opt, state, loaded is not None, global_batch, blind)


def micro_step(
    model: torch.nn.Module, batch: dict[str, Any], amp, accum: int, last: bool, state: TrainState
) -> dict[str, torch.Tensor]:
    """One micro-batch: forward under ``amp``, loss checked, ``loss / accum`` backpropagated. Under DDP the
    gradient all-reduce runs on the ``last`` micro-batch of an accumulation only (``no_sync`` on the
    others): the same summed gradients, ``accum`` times fewer all-reduces."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    with model.no_sync() if ddp and not last else contextlib.nullcontext():
        with amp:
            loss, metrics = model(batch)
        _check_finite(loss, state)
        (loss / accum).backward()
    return metrics


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train ``cfg.objective`` for ``cfg.steps`` optimizer steps (or ``cfg.epochs``) into ``cfg.out``."""
    rank, world = _dist_env()
    cfg = open_run(cfg)
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = setup(cfg, rank, world, device)
    objective, ds, stages, lrs, opt, state = run.objective, run.ds, run.stages, run.lrs, run.opt, run.state
    model = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    amp = autocast(cfg.amp, device)
    total, accum, micro = len(lrs), cfg.optim.accum, 0
    log = RunLogger(cfg, total, run.global_batch, state.step, run.resumed, run.blind, rank, progress)
    while state.step < total:
        n_batches = _epoch_batches(ds, state, cfg.data.batch_size)
        for batch in make_loader(ds):
            if state.batch_in_epoch >= n_batches or state.step >= total:
                break
            batch = stages(batch)
            for g in opt.param_groups:
                g["lr"] = float(lrs[state.step])
            metrics = micro_step(model, batch, amp, accum, last=(micro + 1) % accum == 0, state=state)
            state.batch_in_epoch += 1
            micro += 1
            if micro % accum:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.clip_grad or math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            log.step(state.step, state.epoch, float(lrs[state.step - 1]), grad_norm, metrics)
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.step < total and rank == 0:
                save_checkpoint(cfg.out, objective, opt, state)
        # A loader that ran dry early (samples skipped by --on-mismatch skip) ends the epoch too: never
        # replay the same epoch forever.
        if state.batch_in_epoch >= n_batches or state.step < total:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    result = log.result(state)
    if rank == 0:
        save_checkpoint(cfg.out, objective, opt, state)
        log.summarise(result)
        report_mismatches(cfg)
    if world > 1:
        dist.barrier()
    return result
