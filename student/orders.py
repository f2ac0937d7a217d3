"""Autoregressive orders over clusters: ``raster`` (iGPT), ``random`` (D-iGPT), ``semaim`` (SemAIM as
published) and ``similarity`` (a cheaper neighbour of SemAIM's ``attention`` variant).

An order is ``fn(batch, n_clusters, cluster_targets) -> LongTensor [B, n_clusters]``, a permutation of
cluster ids per sample. Objectives hand it :func:`teacher_view` of their batch: the teacher's tokens as
stored, not the run's standardised targets. An order registered with ``needs_similarity=True`` also
finds ``batch["similarity"]``, a ``[B, h, w]`` map of each patch's cosine to the global token on the
grid that ``cluster_targets`` indexes: ``Objective.cluster_order`` takes it from the teacher's tokens
(:func:`similarity_map`), or, for pixel targets, from the model's own encoder, and then hands the
student grid's cluster index instead. Randomness comes from the batch's ``order_seed`` (one per sample,
derived by the loader from (seed, epoch, shard, key)), never from global RNG: the same sample in the
same epoch gets the same order on any rank, worker count, or after a resume.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from teacher_cache.registry import Registry

OrderFn = Callable[[dict, int, torch.Tensor], torch.Tensor]
RETIRED = {
    "semantic": "it ranked clusters by their tokens' mean cosine to the global token, which is not SemAIM's "
    "order; use 'semaim' (SemAIM's published order: outward from the patch most like the global token) or "
    "'similarity' (the former cluster ranking)",
}
"""Order names that once ran something other than what they name: asked for, they say where it went."""


ORDERS: Registry[OrderFn] = Registry("order", retired=RETIRED)


def register_order(name: str, needs_similarity: bool = False) -> Callable[[OrderFn], OrderFn]:
    """Register ``fn`` as order ``name``. ``needs_similarity``: the order reads ``batch["similarity"]``
    (module docstring), which ``Objective.cluster_order`` then computes for it."""

    def deco(fn: OrderFn) -> OrderFn:
        fn.needs_similarity = needs_similarity  # type: ignore[attr-defined]
        return ORDERS.register(name, needs_similarity=needs_similarity)(fn)

    return deco


def needs_similarity(fn: OrderFn) -> bool:
    """Whether order ``fn`` reads ``batch["similarity"]``."""
    return bool(getattr(fn, "needs_similarity", False))


def list_orders() -> list[str]:
    return ORDERS.names()


def get_order(name: str) -> OrderFn:
    return ORDERS.get(name)


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


def similarity_map(tokens: torch.Tensor, cls: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """SemAIM's similarity map ``[B, h, w]``: the cosine of each patch token ``tokens [B, h*w, D]`` (raster
    order of ``grid``) to the global token ``cls [B, D]``; ``None``: the mean patch token stands in (a
    teacher whose global token is not in its tokens' space, :func:`teacher_view`). SemAIM then takes a
    softmax over the patches, which is monotone and so changes no order; it is left out."""
    tokens = tokens.float()
    ref = cls.float() if cls is not None else tokens.mean(1)
    sim = F.cosine_similarity(tokens, ref[:, None], dim=-1)  # [B, h*w]
    return sim.view(sim.shape[0], *grid)


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


@register_order("similarity")
def similarity(batch: dict, n: int, cluster_targets: torch.Tensor) -> torch.Tensor:
    """Most to least similar cluster: a cluster's score is the mean cosine of its teacher tokens to the
    teacher's global token (its class token when that is in the tokens' space, else the mean patch
    token), read from :func:`teacher_view` (raw tokens). This is SemAIM's ``attention`` variant
    (patches in descending similarity to the class token) taken at cluster granularity: a cheaper
    neighbour under its own name, not SemAIM's published order (``semaim``). Called ``semantic`` until
    it was retired for not being that."""
    tokens = batch["tokens"].float()  # [B, T, D]
    ref = batch["cls"].float() if "cls" in batch else tokens.mean(1)
    sim = F.cosine_similarity(tokens, ref[:, None], dim=-1)  # [B, T]
    score = sim[:, cluster_targets.to(sim.device)].mean(-1)  # [B, n]
    return score.argsort(dim=1, descending=True, stable=True)


@register_order("semaim", needs_similarity=True)
def semaim(batch: dict, n: int, cluster_targets: torch.Tensor) -> torch.Tensor:
    """SemAIM's published order (skyoux/SemAIM, ``--permutation_type attention_center --attention_type
    cls``: ``generate_attention_distance_center_permutation``), taken at cluster granularity.

    SemAIM, per patch: start at the patch most similar to the global token (argmax of
    ``batch["similarity"]``, see :func:`similarity_map`), then predict every patch in ascending Euclidean
    grid distance ``sqrt((row - r0)^2 + (col - c0)^2)`` from it, uniform noise * 1e-3 breaking ties between
    equal distances. Here, per cluster (``cluster_targets [n, cells]``: each cluster's raster indices into
    the ``h x w`` grid of the map): the cluster holding the start patch comes first, then the others in
    ascending distance from the start patch to the cluster's centre (the mean row and column of its
    cells, in patch units of that grid), ties broken by noise * 1e-3 drawn from the sample's
    ``order_seed``. With clusters of one patch this is SemAIM's per-patch order.

    Where the similarity comes from: the teacher's class token against its patch tokens (SemAIM's CLIP /
    DINO targets); for pixel targets the model's own encoder, run on all patches in eval mode without
    gradient (SemAIM's pixel default); ``Objective.cluster_order`` computes it. Deviation: a teacher
    whose global token is not in its tokens' space (EfficientNet-Lite0's head,
    ``TargetSpec.cls_in_token_space``) gets the similarity to its mean patch token instead."""
    sim = batch["similarity"]  # [B, h, w]
    w = sim.shape[-1]
    cells = cluster_targets.cpu()
    start = sim.flatten(1).float().argmax(1).cpu()  # [B]
    # On the CPU in float64: at grid distances ~10, float32's spacing (~1e-6) would swallow the 1e-3 * noise
    # tie-break (and not every accelerator has float64). The arithmetic is [B, n]: nothing to speed up.
    r0, c0 = (start // w).double(), (start % w).double()
    rows, cols = (cells // w).double().mean(1), (cells % w).double().mean(1)  # cluster centres, [n]
    dist = ((rows[None] - r0[:, None]) ** 2 + (cols[None] - c0[:, None]) ** 2).sqrt()  # [B, n]
    noise = torch.stack(
        [torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in batch["order_seed"].tolist()]
    )
    score = dist + noise.double() * 1e-3
    first = (cells[None] == start[:, None, None]).any(-1)  # [B, n]: the cluster holding the start patch
    score = score.masked_fill(first, -1.0)
    return score.argsort(dim=1).to(sim.device)
