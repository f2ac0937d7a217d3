"""Target standardisation (``--target-norm channel`` / ``token``; the default ``none`` trains on the targets as
stored, as D-iGPT's published loss does): per-channel statistics of a tokenizer, estimated from its cache.

When it helps: a teacher's tokens often share a large common direction. EfficientNet's head map (BN with
ImageNet running statistics, seen on other data) has a mean token whose cosine with any token is
~0.9, and CLIP's projected tokens have the same property to a lesser degree. Under D-iGPT's cosine
loss a student then scores well by predicting that mean and learns little else. Subtracting the
per-channel mean and dividing by the per-channel std (over images, views and positions) leaves the
part of each token that differs between images and positions — what a representation must carry.
MAE's norm-pix does the per-patch analogue for pixels.

The statistics are a pure function of the cache: the first ``max_rows`` valid samples (all their
views) of the dataset's shards in manifest order. Every rank, every resume and the online-teacher
baseline get the same numbers; the run directory keeps a copy (``target_norm.safetensors``).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from teacher_cache.io import atomic_write
from teacher_cache.store import ShardTargets

from .config import NORMS as NORMS  # re-exported: the names this module implements

FILE = "target_norm.safetensors"


class TargetNorm(nn.Module):
    """``tokens`` (and ``cls``) -> ``(x - mean) / std`` per channel; codes are left alone.

    The stored tensors stay in the batch as ``raw_tokens`` (and ``raw_cls``): the loss wants the
    standardised targets, but what reads the teacher's own geometry — the ``semaim`` and ``similarity`` orders, a
    cosine to the teacher's global token — must not move when only the statistics do."""

    def __init__(
        self,
        token_mean: torch.Tensor,
        token_std: torch.Tensor,
        cls_mean: torch.Tensor | None = None,
        cls_std: torch.Tensor | None = None,
    ):
        super().__init__()
        self.register_buffer("token_mean", token_mean.float())
        self.register_buffer("token_std", token_std.float())
        self.has_cls = cls_mean is not None
        if self.has_cls:
            self.register_buffer("cls_mean", cls_mean.float())
            self.register_buffer("cls_std", cls_std.float())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        out["raw_tokens"] = batch["tokens"]
        out["tokens"] = (batch["tokens"].float() - self.token_mean) / self.token_std
        if self.has_cls and "cls" in batch:
            out["raw_cls"] = batch["cls"]
            out["cls"] = (batch["cls"].float() - self.cls_mean) / self.cls_std
        return out

    def save(self, run: str) -> None:
        from safetensors.torch import save_file

        state = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(run, FILE), lambda tmp: save_file(state, tmp))  # a resume never reads half a file

    @classmethod
    def load(cls, run: str) -> TargetNorm:
        from safetensors.torch import load_file

        t = load_file(os.path.join(run, FILE))
        return cls(t["token_mean"], t["token_std"], t.get("cls_mean"), t.get("cls_std"))

    def summary(self) -> dict:
        s = {"token_mean_norm": float(self.token_mean.norm()), "token_std_mean": float(self.token_std.mean())}
        if self.has_cls:
            s["cls_mean_norm"] = float(self.cls_mean.norm())
        return s


class TokenNorm(nn.Module):
    """``tokens`` (and ``cls``) -> ``(x - mean) / std`` over each token's own channels (MAE's norm-pix
    for pixel targets: the loss sees a patch's structure, not its brightness and contrast). Stateless:
    nothing to estimate, save or resume. Raw tensors stay in the batch as for :class:`TargetNorm`."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        out["raw_tokens"] = batch["tokens"]
        out["tokens"] = self._norm(batch["tokens"])
        if "cls" in batch and batch["cls"] is not None:
            out["raw_cls"] = batch["cls"]
            out["cls"] = self._norm(batch["cls"])
        return out

    def summary(self) -> dict:
        return {"per": "token"}


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return x.sum(0), (x * x).sum(0), x.shape[0]


def _scan(join, max_rows: int) -> tuple[dict[str, list], int]:
    """Per-channel sums and sums of squares of the tokenizer's stored targets over the first ``max_rows``
    valid samples (all their views) in manifest order; raises, naming the check to run, on NaN/Inf."""
    acc: dict[str, list] = {}
    rows = 0
    for shard in join.ds.shards:
        if rows >= max_rows:
            break
        targets = ShardTargets(join.group(shard), join.info)
        valid = np.flatnonzero(join.valid[shard])[: max_rows - rows]
        if len(valid) == 0:
            continue
        block = slice(0, int(valid[-1]) + 1)
        for name, x in (("tokens", targets.tokens(block)), ("cls", targets.cls(block))):
            if x is None:
                continue
            s, ss, n = _moments(x[torch.from_numpy(valid)].numpy())
            a = acc.setdefault(name, [0.0, 0.0, 0])
            a[0], a[1], a[2] = a[0] + s, a[1] + ss, a[2] + n
        rows += len(valid)
    if "tokens" not in acc:
        raise ValueError(f"tokenizer {join.info.name!r} has no valid samples to estimate target statistics from")
    for name, (s, ss, _) in acc.items():
        if not (np.isfinite(s).all() and np.isfinite(ss).all()):
            raise ValueError(
                f"tokenizer {join.info.name!r} holds non-finite {name} (NaN/Inf) in its first "
                f"{rows} samples; find them with `digpt verify` and re-extract"
            )
    return acc, rows


def check_targets_finite(join, max_rows: int = 512) -> None:
    """Before any step, whatever the target normalisation: the first ``max_rows`` samples' targets are
    finite (the rest are checked batch by batch as they are read: :func:`student.data.widen_targets`)."""
    if not join.info.codes:
        _scan(join, max_rows)


def estimate_target_norm(join, max_rows: int = 512, eps: float = 1e-6) -> TargetNorm:
    """Per-channel mean/std of the tokenizer in ``join`` (a :class:`student.data.CacheJoin`)."""
    if join.info.codes:
        raise ValueError("code tokenizers have no continuous targets to standardise; use target_norm 'none'")
    acc, _ = _scan(join, max_rows)

    def stats(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        s, ss, n = acc[name]
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
        # A channel that never varies carries nothing; divide it by 1 rather than by ~0.
        std = np.where(std > eps * max(1.0, float(std.max())), std, 1.0)
        return torch.from_numpy(mean).float(), torch.from_numpy(std).float()

    tm, ts = stats("tokens")
    cm, cs = stats("cls") if "cls" in acc else (None, None)
    return TargetNorm(tm, ts, cm, cs)
