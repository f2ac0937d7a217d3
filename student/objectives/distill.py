"""Objectives without an order: ``fd`` (feature distillation on the encoder's output, Wei et al. 2022)
and ``masked`` (MAE/EVA-style masked prediction of teacher tokens: BEiT-style mask tokens, the loss on
masked positions only). Both use D-iGPT's ``2 - 2 cos`` loss so the paper's Table 7/9 comparisons hold
the loss fixed and vary only the paradigm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from student.blind import BlindStats
from student.digpt_model import loss_cos
from student.vit import VisionTransformer

from .base import Objective, StudentConfig, TargetSpec, register_objective


def to_grid(tokens: torch.Tensor, grid: int, target: tuple[int, int]) -> torch.Tensor:
    """``[B, g*g, D]`` raster tokens -> ``[B, h_t*w_t, D]`` bilinearly resampled onto the teacher grid."""
    if (grid, grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class _DenseObjective(Objective):
    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None):
        super().__init__()
        if target.kind == "codes":
            pass  # codebook vectors are continuous targets; the cos loss applies unchanged
        self.target = target
        self.encoder = VisionTransformer(student.encoder_config(), student.attn_impl)
        d = self.encoder.cfg.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, target.dim))
        self.cls_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, target.dim)) if target.has_cls else None

    def _loss(self, feats: torch.Tensor, batch: dict[str, torch.Tensor], weight: torch.Tensor | None):
        pred = to_grid(self.head(feats[:, 1:]), self.encoder.cfg.grid_size, self.target.grid)
        cls = self.cls_head(feats[:, 0]) if self.cls_head is not None else None
        return self._score(pred, cls, batch, weight)

    def _score(
        self,
        pred: torch.Tensor,
        cls_pred: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        weight: torch.Tensor | None,
    ):
        """``pred [B, T, D]`` on the teacher grid (and the class prediction) -> (loss, metrics)."""
        per_token = loss_cos(pred, batch["tokens"])
        tok = per_token.mean() if weight is None else (per_token * weight).sum() / weight.sum().clamp_min(1)
        metrics = {"tokens": tok.detach()}
        loss = tok
        if cls_pred is not None and "cls" in batch:
            cls = loss_cos(cls_pred, batch["cls"]).mean()
            metrics["cls"] = cls.detach()
            loss = loss + cls
        metrics["loss"] = loss.detach()
        return loss, metrics

    def _blind(self, batch: dict[str, torch.Tensor], stats: BlindStats, weight: torch.Tensor | None) -> torch.Tensor:
        b = batch["tokens"].shape[0]
        pred = stats.token_unit_mean.expand(b, -1, -1)
        cls = (
            stats.cls_unit_mean.expand(b, -1) if self.cls_head is not None and stats.cls_unit_mean is not None else None
        )
        return self._score(pred, cls, batch, weight)[0]

    def blind_loss(self, batch: dict[str, torch.Tensor], stats: BlindStats) -> torch.Tensor:
        return self._blind(batch, stats, None)


@register_objective("fd")
class FeatureDistillation(_DenseObjective):
    """Predict every teacher token from the encoder's output on the full image (the paper's FD row)."""

    def forward(self, batch):
        feats, _ = self.encoder.forward_features(batch["images"])
        return self._loss(feats, batch, None)


@dataclass(frozen=True)
class MaskedConfig:
    """The knobs of the ``masked`` objective."""

    mask_ratio: float = 0.5
    """Fraction of patches replaced by the mask token (the loss counts those positions only)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@register_objective("masked", config=MaskedConfig)
class MaskedPrediction(_DenseObjective):
    """Replace a random ``mask_ratio`` of patches with a learned mask token; predict the teacher's
    tokens at the masked positions (EVA / BEiT with feature targets; MAE with ``pixel`` targets)."""

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None, knobs: MaskedConfig):
        super().__init__(student, target, order)
        self.knobs = knobs
        self.mask_ratio = knobs.mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def random_mask(self, seeds: torch.Tensor, n: int, device) -> torch.Tensor:
        """``[B, n]`` bool, exactly ``round(ratio * n)`` True per sample, from the per-sample seeds."""
        k = max(1, round(self.mask_ratio * n))
        rows = []
        for s in seeds.tolist():
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k]
            rows.append(torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True))
        return torch.stack(rows).to(device)

    def forward(self, batch):
        enc, x = self.encoder, batch["images"]
        patches = enc.patch_embed(x)  # [B, N, D], before positions: the mask token gets the position too
        mask = self.random_mask(batch["order_seed"], patches.shape[1], x.device)
        patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
        t = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + enc.pos_embed
        for blk in enc.blocks:
            t = blk(t)
        return self._loss(enc.norm(t), batch, self._weight(mask))

    def _weight(self, mask: torch.Tensor) -> torch.Tensor:
        """The masked share of each teacher token (the loss counts masked positions only)."""
        return to_grid(mask.float()[..., None], self.encoder.cfg.grid_size, self.target.grid)[..., 0]

    def blind_loss(self, batch: dict[str, torch.Tensor], stats: BlindStats) -> torch.Tensor:
        mask = self.random_mask(batch["order_seed"], self.encoder.cfg.num_patches, batch["tokens"].device)
        return self._blind(batch, stats, self._weight(mask))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
