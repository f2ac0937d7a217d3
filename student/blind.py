"""The input-blind baseline: what a predictor that never looks at the image scores on a run's loss.

A falling loss proves little. Teacher tokens vary far more between positions than between images at
one position (a sky patch is a sky patch), so a student can drive D-iGPT's loss down by learning the
average target of each position and ignoring the pixels. The baseline makes that visible: the
per-position statistics of the targets the objective is trained on (after target normalisation),
turned into the best prediction that knows only *where* a token is, scored by the objective's own
loss (:meth:`student.objectives.Objective.blind_loss`):

- cosine losses (``2 - 2 cos``): the mean of the unit-normalised targets at each position — the
  constant direction that maximises the summed cosine at that position;
- squared-error losses: the mean target at each position;
- code targets (cross-entropy): each position's code frequencies (add-one smoothed), whose
  cross-entropy is the per-position entropy — the "unigram" baseline.

The statistics are estimated on the run's first ``est_batches`` batches and the baseline is scored on
the ``eval_batches`` after them, so it is an out-of-sample number like the student's running loss on
fresh views. The training log shows ``blind_loss`` beside ``loss``; the run summary reports the share
of the loss drop that needed the image: ``(blind - final) / (first - final)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BlindStats:
    """Per-position target statistics; ``T`` teacher positions, ``D`` channels, ``K`` codes."""

    token_mean: torch.Tensor | None = None
    """``[T, D]`` mean target per position."""
    token_unit_mean: torch.Tensor | None = None
    """``[T, D]`` mean of the unit-normalised targets per position."""
    cls_mean: torch.Tensor | None = None
    """``[D]`` mean class target."""
    cls_unit_mean: torch.Tensor | None = None
    """``[D]`` mean of the unit-normalised class targets."""
    code_logp: torch.Tensor | None = None
    """``[T, K]`` log frequency of each code per position (add-one smoothed)."""

    def to(self, device: torch.device | str) -> BlindStats:
        return BlindStats(**{k: (v.to(device) if v is not None else None) for k, v in vars(self).items()})


def estimate_blind_stats(batches: Iterable[dict[str, torch.Tensor]], num_codes: int = 0) -> BlindStats:
    """Accumulate per-position statistics over ``batches`` (the objective's inputs: ``tokens [B, T, D]``,
    optional ``cls [B, D]`` and ``codes [B, T]``)."""
    n = 0
    s = su = cs = csu = counts = None
    for b in batches:
        if "codes" in b and num_codes:
            one_hot = F.one_hot(b["codes"].long(), num_codes).sum(0).double()  # [T, K]
            counts = one_hot if counts is None else counts + one_hot
        t = b["tokens"].double()
        s = t.sum(0) if s is None else s + t.sum(0)
        u = F.normalize(t, dim=-1).sum(0)
        su = u if su is None else su + u
        if "cls" in b:
            c = b["cls"].double()
            cs = c.sum(0) if cs is None else cs + c.sum(0)
            cu = F.normalize(c, dim=-1).sum(0)
            csu = cu if csu is None else csu + cu
        n += t.shape[0]
    if n == 0:
        raise ValueError("no batches to estimate the blind baseline from")
    stats = BlindStats((s / n).float(), (su / n).float())
    if cs is not None:
        stats.cls_mean, stats.cls_unit_mean = (cs / n).float(), (csu / n).float()
    if counts is not None:
        stats.code_logp = torch.log((counts + 1) / (counts + 1).sum(-1, keepdim=True)).float()
    return stats


def blind_baseline(objective, batches: list[dict[str, torch.Tensor]], est_batches: int) -> float | None:
    """Fit the statistics on ``batches[:est_batches]`` and return the objective's mean blind loss on the
    rest (all of them when there is no rest). ``None`` when the objective defines no blind loss."""
    if not hasattr(objective, "blind_loss"):
        return None
    num_codes = getattr(objective, "num_codes", 0)
    stats = estimate_blind_stats(batches[:est_batches], num_codes)
    held = batches[est_batches:] or batches
    with torch.no_grad():
        losses = [objective.blind_loss(b, stats.to(b["tokens"].device)) for b in held]
    if any(v is None for v in losses):
        return None
    return float(torch.stack([v.float() for v in losses]).mean())


def image_share(first: float, final: float, blind: float) -> float | None:
    """Share of the loss drop ``first -> final`` that an input-blind predictor cannot reach (that needed
    the image). ``None`` when the loss did not drop."""
    drop = first - final
    if not drop > 0:
        return None
    return (blind - final) / drop
