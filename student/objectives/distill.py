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


def pool_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], op: str = "mean") -> torch.Tensor:
    """``[B, h*w, C]`` raster tokens on grid ``src`` -> ``[B, h'*w', C]`` on grid ``dst``, each output cell
    reduced (``mean``, ``max`` or ``min``) over exactly the input cells its area overlaps: the cells
    ``floor(i * n_in / n_out)`` to ``ceil((i + 1) * n_in / n_out) - 1`` along each axis (adaptive pooling's
    bins, which are that overlap set whether ``dst`` is coarser or finer than ``src``)."""
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, *src)
    if op == "mean":
        x = F.adaptive_avg_pool2d(x, dst)
    elif op == "max":
        x = F.adaptive_max_pool2d(x, dst)
    elif op == "min":
        x = -F.adaptive_max_pool2d(-x, dst)
    else:
        raise ValueError(f"op must be mean, max or min, got {op!r}")
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

    def _to_target(self, pred: torch.Tensor) -> torch.Tensor:
        """Student-grid predictions ``[B, N, D]`` -> the teacher grid ``[B, T, D]``."""
        return to_grid(pred, self.encoder.cfg.grid_size, self.target.grid)

    def _loss(self, feats: torch.Tensor, batch: dict[str, torch.Tensor], weight: torch.Tensor | None):
        pred = self._to_target(self.head(feats[:, 1:]))
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
    """Fraction of patches replaced by the mask token (the loss counts those positions only); drawn in
    whole teacher tokens where the teacher grid is coarser than the student's."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")


@register_objective("masked", config=MaskedConfig)
class MaskedPrediction(_DenseObjective):
    """Replace a random ``mask_ratio`` of patches with a learned mask token; predict the teacher's
    tokens at the masked positions (EVA / BEiT with feature targets; MAE with ``pixel`` targets).

    Where the teacher grid differs from the student's, a teacher token is scored only when every student
    patch its area overlaps is masked, and its prediction is the mean of those patches' outputs
    (:func:`pool_grid`, the same overlap sets both ways). So the student sees no pixel under a scored
    target, and no scored prediction reads a visible patch's output. Resampling the mask and predictions
    bilinearly, as ``fd`` does (nothing is masked there) and this objective did until the leak probe in
    ``tests/test_student_model.py``, leaks: a teacher token on the mask's edge was scored, weighted by its
    masked share, with visible patches under it and from their outputs, which rewards copying the input.

    The mask is drawn in whole cells of the coarser of the two grids along each axis, each cell masking
    every patch it overlaps, as many cells as bring the masked patches closest to
    ``round(mask_ratio * N)``: where the teacher's grid is coarser, whole teacher tokens are drawn and each
    is scored; where it is finer, patches are drawn as on equal grids and the teacher tokens wholly inside
    the masked area are scored (all of it on an integer ratio; otherwise not the tokens straddling a masked
    and a visible patch: ~16% of the tokens are scored on 14x14 -> 16x16 at ratio 0.5). A sample left with
    no scored token also gets the patches under its most-masked teacher token masked. Equal grids: a
    patch is a teacher token, exactly as before."""

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None, knobs: MaskedConfig):
        super().__init__(student, target, order)
        self.knobs = knobs
        self.mask_ratio = knobs.mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        g, (h, w) = self.encoder.cfg.grid_size, self.target.grid
        self._student_grid, self._draw_grid = (g, g), (min(h, g), min(w, g))
        if max(1, round(self.mask_ratio * g * g)) >= g * g or self._draw_grid == (1, 1):
            raise ValueError(
                f"objective 'masked': mask_ratio {self.mask_ratio} on teacher grid {h}x{w} and student {g}x{g} "
                "masks every patch: nothing would stay visible"
            )

    def random_mask(self, seeds: torch.Tensor, n: int, device) -> torch.Tensor:
        """``[B, n]`` bool, exactly ``round(ratio * n)`` True per sample, from the per-sample seeds."""
        k = max(1, round(self.mask_ratio * n))
        rows = []
        for s in seeds.tolist():
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k]
            rows.append(torch.zeros(n, dtype=torch.bool).index_fill_(0, idx, True))
        return torch.stack(rows).to(device)

    def mask_and_weight(self, seeds: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """From the per-sample seeds: ``[B, N]`` bool, the student patches to mask, and ``[B, T]`` float,
        1 for the teacher tokens the loss scores (every patch under them masked), else 0."""
        sg, tg = self._student_grid, tuple(self.target.grid)
        if sg == tg:
            mask = self.random_mask(seeds, sg[0] * sg[1], device)
            return mask, mask.float()
        # Whole cells of the coarser grid per axis, in a seeded random order, each masking every patch it
        # overlaps; the shortest prefix of that order whose masked patches come closest to round(ratio * N).
        dg, n = self._draw_grid, self._draw_grid[0] * self._draw_grid[1]
        rank = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in seeds.tolist()])
        rank = rank.argsort(-1).float()  # [B, n]: each cell's place in its sample's order
        first = pool_grid(rank[..., None], dg, sg, "min")[..., 0]  # [B, N]: the step that masks each patch
        steps = torch.arange(n, dtype=first.dtype).expand(first.shape[0], -1).contiguous()
        count = torch.searchsorted(first.sort(-1).values, steps, right=True)  # [B, n] patches masked by step
        last = (count - round(self.mask_ratio * sg[0] * sg[1])).abs().argmin(-1, keepdim=True)
        mask = first <= last  # on the host, as the seeds: no device sync per step
        weight = pool_grid(mask.float()[..., None], sg, tg, "min")[..., 0]
        empty = weight.sum(-1) == 0
        if bool(empty.any()):  # no teacher token wholly masked: also mask the patches under the most-masked one
            share = pool_grid(mask.float()[..., None], sg, tg, "mean")[..., 0]
            pick = F.one_hot(share.argmax(-1), weight.shape[1]).float()
            extra = pool_grid(pick[..., None], tg, sg, "max")[..., 0] > 0
            mask = mask | (extra & empty[:, None])
            weight = pool_grid(mask.float()[..., None], sg, tg, "min")[..., 0]
        return mask.to(device), weight.to(device)

    def _to_target(self, pred: torch.Tensor) -> torch.Tensor:
        """The mean over the patches each teacher token overlaps (:func:`pool_grid`): a scored token's
        prediction reads masked patches' outputs only. Equal grids: unchanged."""
        if self._student_grid == tuple(self.target.grid):
            return pred
        return pool_grid(pred, self._student_grid, tuple(self.target.grid), "mean")

    def forward(self, batch):
        enc, x = self.encoder, batch["images"]
        patches = enc.patch_embed(x)  # [B, N, D], before positions: the mask token gets the position too
        mask, weight = self.mask_and_weight(batch["order_seed"], x.device)
        patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
        feats, _ = enc.run_blocks(enc.embed_patches(patches))  # full attention, final norm
        return self._loss(feats, batch, weight)

    def blind_loss(self, batch: dict[str, torch.Tensor], stats: BlindStats) -> torch.Tensor:
        """Scores the teacher tokens :meth:`forward` scores (:meth:`mask_and_weight`), with the same weights."""
        return self._blind(batch, stats, self.mask_and_weight(batch["order_seed"], batch["tokens"].device)[1])

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}
