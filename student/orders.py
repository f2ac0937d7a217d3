"""Autoregressive orders over clusters: ``raster`` (iGPT), ``random`` (D-iGPT), ``semantic`` (SemAIM).

An order is ``fn(batch, n_clusters, cluster_targets) -> LongTensor [B, n_clusters]``, a permutation of
cluster ids per sample. Objectives hand it :func:`teacher_view` of their batch: the teacher's tokens as
stored, not the run's standardised targets. Randomness comes from the batch's ``order_seed`` (one per
sample, derived by the loader from (seed, epoch, shard, key)), never from global RNG: the same sample in
the same epoch gets the same order on any rank, worker count, or after a resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

OrderFn = Callable[[dict, int, torch.Tensor], torch.Tensor]
_ORDERS: dict[str, OrderFn] = {}


def register_order(name: str) -> Callable[[OrderFn], OrderFn]:
    def deco(fn: OrderFn) -> OrderFn:
        _ORDERS[name] = fn
        return fn

    return deco


def list_orders() -> list[str]:
    return sorted(_ORDERS)


def get_order(name: str) -> OrderFn:
    if name not in _ORDERS:
        raise ValueError(f"unknown order {name!r}; choose from {list_orders()}")
    return _ORDERS[name]


def teacher_view(batch: dict, cls_in_token_space: bool = True) -> dict:
    """The batch as an order reads it: ``tokens``/``cls`` are the teacher's raw outputs (``raw_*``, kept by
    :class:`student.targets.TargetNorm`, when the run standardises its targets), and ``cls`` is dropped
    when the teacher's global token does not live in its patch tokens' space (then the order falls back
    to the mean patch token; ``TargetSpec.cls_in_token_space`` says why EfficientNet's does not).

    Why raw: standardising divides each channel by its spread over the whole cache, which re-weights the
    channels of every cosine the order takes; the order would then depend on which images the statistics
    were estimated from, not on what the teacher said about this view."""
    out = dict(batch)
    out["tokens"] = batch.get("raw_tokens", batch["tokens"])
    cls = batch.get("raw_cls", batch.get("cls"))
    out.pop("cls", None)
    if cls is not None and cls_in_token_space:
        out["cls"] = cls
    return out


@register_order("raster")
def raster(batch: dict, n: int, cluster_targets: torch.Tensor) -> torch.Tensor:
    """Top-left to bottom-right (iGPT)."""
    b = batch["images"].shape[0]
    return torch.arange(n, device=batch["images"].device).expand(b, n).clone()


@register_order("random")
def random(batch: dict, n: int, cluster_targets: torch.Tensor) -> torch.Tensor:
    """A uniformly random permutation per sample (D-iGPT, RandSAC, SAIM)."""
    rows = []
    for seed in batch["order_seed"].tolist():
        g = torch.Generator().manual_seed(seed)
        rows.append(torch.randperm(n, generator=g))
    return torch.stack(rows).to(batch["images"].device)


@register_order("semantic")
def semantic(batch: dict, n: int, cluster_targets: torch.Tensor) -> torch.Tensor:
    """Most to least semantic cluster (SemAIM): a cluster's score is the mean cosine similarity of its
    teacher tokens to the teacher's global token — its class token when that is in the tokens' space,
    else the mean patch token — read from :func:`teacher_view` (raw tokens)."""
    tokens = batch["tokens"].float()  # [B, T, D]
    ref = batch["cls"].float() if "cls" in batch else tokens.mean(1)
    sim = F.cosine_similarity(tokens, ref[:, None], dim=-1)  # [B, T]
    score = sim[:, cluster_targets.to(sim.device)].mean(-1)  # [B, n]
    return score.argsort(dim=1, descending=True, stable=True)
