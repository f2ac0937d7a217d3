"""The probe's protocol on a feature table: the fit/select/report splits, the linear and k-NN heads of every
layer at once, the choice of layer and lr on the select split, and the refit scored on the report set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from teacher_cache.runtime import resolve_device

if TYPE_CHECKING:
    from .config import ProbeConfig


@dataclass
class LayerRow:
    """One probed layer: its score on the select split (used to choose) and on the report set."""

    index: int
    """Position in the feature table (block ``i`` for ``i < depth``; the final norm last)."""
    layer: str
    """``block{i+1}`` (1-based, as ``digpt extract --layer``) or ``norm``."""
    select_top1: float | None
    """Top-1 on the select split, fit on the fit split: what the choice looks at (None: no choice)."""
    top1: float
    """Top-1 on the report set, refit on the whole training part."""
    top5: float | None
    """Top-5 on the report set (None with fewer than 5 classes)."""
    lr: float | None = None
    """Linear probe: the lr chosen for this layer on the select split."""
    correct: list[int] | None = None
    """Per report sample, 1 where this layer's top-1 prediction is right: two encoders probed on the same
    split are compared sample by sample (a paired standard error; ``pipelines/report.py``)."""


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held)`` sorted positions: ``round(fraction * n_c)`` of each class held out (at least
    one and at most ``n_c - 1`` when ``n_c >= 2``; none of a singleton class), chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        held.append(rng.permutation(idx)[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_idx), held_idx


@dataclass(frozen=True)
class Splits:
    """Positions into the probe's sample table (training shards first, then validation shards)."""

    fit: np.ndarray
    """Fit the candidates of the choice."""
    select: np.ndarray
    """Score the candidates; the choice is the best here."""
    report: np.ndarray
    """Scored once, after the choice, by the refit on ``train``."""

    @property
    def train(self) -> np.ndarray:
        """The training part: ``fit`` and ``select`` together."""
        return np.sort(np.concatenate([self.fit, self.select]))


def make_splits(labels: np.ndarray, n_val: int, holdout: float, select_fraction: float, seed: int) -> Splits:
    """``labels``: the training shards' labels then ``n_val`` validation labels. The report set is the
    validation rows, or a stratified ``holdout`` of the training shards when ``n_val == 0``."""
    n_pool = len(labels) - n_val
    if n_val:
        train, report = np.arange(n_pool), np.arange(n_pool, len(labels))
    else:
        train, report = stratified_split(labels[:n_pool], holdout, seed)
    fit, select = stratified_split(labels[train], select_fraction, seed + 1)
    splits = Splits(train[fit], train[select], report)
    for name in ("fit", "select", "report"):
        if len(getattr(splits, name)) == 0:
            raise ValueError(
                f"the {name} split is empty: {len(labels)} samples is too few to probe (need at least 2 per class)"
            )
    return splits


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest ``scores [N, C]``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def linear_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    lr: torch.Tensor,
    epochs: int,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """Fit a linear classifier per layer and per learning rate at once; logits ``[G, L, M, C]``.

    ``train_x [N, L, D]``, ``test_x [M, L, D]``; ``lr [G, L]``: the lr of candidate ``(g, l)``. Each
    layer's features are standardised with its training statistics (MAE's affine-free BatchNorm before
    the head). Every candidate starts at zero (softmax regression is convex) and takes ``epochs``
    full-batch ``torch.optim.AdamW`` steps under a cosine lr. Each candidate is its own parameter group
    (its own lr) and the loss is a sum of independent terms, so this equals ``G * L`` separate fits,
    done in one loop because tiny ops are dominated by per-op overhead.
    """
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-6
    x = (train_x - mean) / std
    (g, L), d = lr.shape, x.shape[2]
    peak = lr.reshape(-1).tolist()
    ws = [torch.zeros(d, num_classes, device=x.device, requires_grad=True) for _ in peak]
    bs = [torch.zeros(num_classes, device=x.device, requires_grad=True) for _ in peak]
    opt = torch.optim.AdamW(
        [{"params": [w, b], "lr": p} for w, b, p in zip(ws, bs, peak)],
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=weight_decay,
    )
    target = train_y.repeat(g * L)
    with torch.enable_grad():
        for t in range(epochs):
            for group, p in zip(opt.param_groups, peak):
                group["lr"] = p * 0.5 * (1 + math.cos(math.pi * t / epochs))
            w, b = torch.stack(ws).view(g, L, d, num_classes), torch.stack(bs).view(g, L, num_classes)
            logits = torch.einsum("nld,gldc->glnc", x, w) + b[:, :, None]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction="sum") / len(train_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        w, b = torch.stack(ws).view(g, L, d, num_classes), torch.stack(bs).view(g, L, num_classes)
        return torch.einsum("mld,gldc->glmc", (test_x - mean) / std, w) + b[:, :, None]


def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted k-NN on one layer (``train_x [N, D]``, ``test_x [M, D]``): class votes ``[M, C]``
    of the ``k`` most cosine-similar training rows, each weighing ``exp(sim / temperature)``."""
    bank = F.normalize(train_x, dim=1)
    k = min(k, len(bank))
    out = []
    for q in F.normalize(test_x, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()))
    return torch.cat(out)


def layer_scores(
    cfg: ProbeConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    lr: torch.Tensor,
) -> torch.Tensor:
    """Scores ``[G, L, M, C]`` of every layer's probe (``*_x: [N, L, D]``); k-NN ignores ``lr`` (G = 1)."""
    if cfg.kind == "knn":
        return torch.stack(
            [
                knn_scores(train_x[:, li], train_y, test_x[:, li], num_classes, cfg.k, cfg.temperature)
                for li in range(train_x.shape[1])
            ]
        )[None]
    return linear_scores(train_x, train_y, test_x, num_classes, lr, cfg.epochs, cfg.weight_decay)


def choose(
    cfg: ProbeConfig,
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
    sel_x: torch.Tensor,
    sel_y: torch.Tensor,
    num_classes: int,
) -> list[tuple[float, float | None]]:
    """Per layer, ``(select top-1, lr)`` of its best lr (linear; None for k-NN) fit on *fit*, scored on
    *select*. ``*_x: [N, L, D]``. Only the training part comes in: the report set cannot sway the choice.
    """
    lrs = torch.tensor(cfg.lrs)[:, None].expand(len(cfg.lrs), fit_x.shape[1])
    scores = layer_scores(cfg, fit_x, fit_y, sel_x, num_classes, lrs)
    acc = torch.tensor([[topk_accuracy(s, sel_y, 1) for s in per_lr] for per_lr in scores])  # [G, L]
    best = acc.argmax(0)  # first max: the earliest lr of cfg.lrs among ties
    return [(acc[g, li].item(), cfg.lrs[g] if cfg.kind == "linear" else None) for li, g in enumerate(best.tolist())]


def probe_features(
    cfg: ProbeConfig, feats: torch.Tensor, labels: torch.Tensor, splits: Splits, names: list[str], num_classes: int
) -> list[LayerRow]:
    """Choose per layer on fit/select, refit that choice on the training part, score on the report set."""
    device = resolve_device(cfg.device, "ProbeConfig.device")
    part = {
        n: (feats[getattr(splits, n)].to(device), labels[getattr(splits, n)].to(device))
        for n in ("fit", "select", "train", "report")
    }
    chosen = choose(cfg, *part["fit"], *part["select"], num_classes)
    lr = torch.tensor([[lr or 0.0 for _, lr in chosen]])
    scores = layer_scores(cfg, *part["train"], part["report"][0], num_classes, lr)[0]
    y = part["report"][1]
    return [
        LayerRow(
            li,
            names[li],
            sel,
            topk_accuracy(scores[li], y, 1),
            topk_accuracy(scores[li], y, 5) if num_classes >= 5 else None,
            lr,
            (scores[li].argmax(1) == y).int().tolist(),
        )
        for li, (sel, lr) in enumerate(chosen)
    ]
