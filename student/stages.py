"""Batch stages: what happens to a loader batch before the objective sees it.

A stage is a ``batch -> batch`` callable; :func:`build_stages` composes the run's stages once, before the
loop (webdataset's pipeline of small stages, applied to tensors): move to the device, decode the stored
targets there (fp16/bf16/int8/codes to float32), run the teacher
online (``--online-teacher``: the baseline and oracle of the cache), standardise continuous targets
(``student/targets.py`` says why). The loop, the blind baseline and the tests all call the same chain,
so what is trained on and what the baseline is scored on cannot drift apart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from teacher_cache.config import TeacherConfig
from teacher_cache.teachers import Teacher, build_teacher

from .data import widen_targets
from .targets import FILE as TARGET_NORM_FILE
from .targets import TargetNorm, TokenNorm, check_targets_finite, estimate_target_norm

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import CacheJoin

Batch = dict[str, torch.Tensor]
Stage = Callable[[Batch], Batch]
S = TypeVar("S")


class Stages:
    """Stages applied in order; built once per run."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = tuple(stages)

    def __call__(self, batch: Batch) -> Batch:
        for stage in self.stages:
            batch = stage(batch)
        return batch

    def find(self, kind: type[S]) -> S | None:
        """The first stage of type ``kind`` (e.g. the run's :class:`TargetNorm`), or None."""
        return next((s for s in self.stages if isinstance(s, kind)), None)


class ToDevice:
    """Every tensor of the batch onto ``device`` (non-blocking: the loader pins memory on CUDA)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __call__(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


class DecodeTargets:
    """Stored targets to float32 where the batch now is (after :class:`ToDevice`), by
    :func:`student.data.widen_targets`: the loader of ``digpt train`` leaves this to the device
    (``CachedViews(decode_targets=False)``), so half the bytes travel and the widening is a kernel. A batch
    that is already decoded, or has no stored targets (fresh views), passes unchanged."""

    def __init__(self, codebook: torch.Tensor | None, device: torch.device | str):
        self.codebook = None if codebook is None else codebook.to(device)

    def __call__(self, batch: Batch) -> Batch:
        return widen_targets(batch, self.codebook)


def online_targets(teacher: Teacher, batch: Batch) -> Batch:
    """The targets a cache would hold for this batch, computed now by the teacher."""
    out = teacher(batch["teacher_images"])
    if teacher.spec.kind == "codes":
        return {"codes": out.tokens, "tokens": teacher.codebook[out.tokens]}
    targets = {"tokens": out.tokens.float()}
    if out.cls is not None:
        targets["cls"] = out.cls.float()
    return targets


def amp_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``TrainConfig.amp`` on ``device``: ``auto`` is bf16 on CUDA, off on the CPU."""
    on = amp == "bf16" or (amp == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if on else None


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The run's autocast context (reusable: enter it once per step)."""
    dtype = amp_dtype(amp, device)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


class OnlineTeacher:
    """Replace the batch's cached targets with the teacher's, computed on the batch's ``teacher_images``
    under the run's autocast: the student's forward runs under it, and so would a cache extracted with
    ``--autocast bf16`` on the same GPU; a float32 teacher beside a bf16 student would make the online
    baseline look slower than it is (measured on an H200: BENCHMARKS.md, GPU acceptance)."""

    def __init__(self, teacher: Teacher, amp: contextlib.AbstractContextManager | None = None):
        self.teacher, self.amp = teacher, amp or contextlib.nullcontext()

    def __call__(self, batch: Batch) -> Batch:
        with self.amp:
            return {**batch, **online_targets(self.teacher, batch)}


def online_teacher_for(join: CacheJoin, device: torch.device | str) -> Teacher:
    """The cache's teacher, rebuilt from its recorded config and checked against its weights fingerprint."""
    a = join.info.attrs
    teacher = build_teacher(TeacherConfig(**a["teacher_config"]), join.codebook, pca_basis=join.pca_basis)
    if teacher.fingerprint() != a["fingerprint"]:
        raise ValueError(
            f"--online-teacher: the teacher rebuilt from the cache's config has weights "
            f"{teacher.fingerprint()[:12]}, the cache was made by {a['fingerprint'][:12]}"
        )
    return teacher.to(device)


def target_norm_for(cfg: TrainConfig, join: CacheJoin) -> TargetNorm | TokenNorm | None:
    """The run's target standardisation: the copy in the run directory when resuming (what the run
    started with), else estimated from the cache (deterministic: every rank gets the same); ``token``
    needs no statistics."""
    if join.info.codes:
        return None
    if cfg.target_norm != "channel":  # the channel estimate checks these rows itself
        check_targets_finite(join)
    if cfg.target_norm == "none":
        return None
    if cfg.target_norm == "token":
        return TokenNorm()
    if cfg.resume and os.path.exists(os.path.join(cfg.out, TARGET_NORM_FILE)):
        return TargetNorm.load(cfg.out)
    return estimate_target_norm(join)


def build_stages(
    cfg: TrainConfig, join: CacheJoin, device: torch.device | str, teacher: Teacher | None = None
) -> Stages:
    """The run's chain: to ``device``, stored targets to float32, then the online ``teacher`` (if any),
    then target standardisation."""
    norm = target_norm_for(cfg, join)
    chain: list[Stage] = [ToDevice(device), DecodeTargets(join.codebook, device)]
    if teacher is not None:
        chain.append(OnlineTeacher(teacher, autocast(cfg.amp, device)))
    if norm is not None:
        chain.append(norm.to(device))
    return Stages(chain)
