"""``kmeans:<teacher>``: DiGIT-style discrete tokens — k-means codes of another teacher's tokens.

The codebook is fit once (``fit_kmeans``, called by ``extract`` on a deterministic sample of views)
and stored beside the codes (or read from a safetensors file saved with the base teacher's
fingerprint); the teacher then maps every token to its nearest centroid. ``metric`` (``TeacherConfig``,
``--metric``) picks the distance:

* ``euclidean`` (the default of a new extract) — DiGIT as published (DAMO-NLP-SG/DiGIT,
  ``preprocess/cluster_kmeans.py``: ``faiss.Kmeans(d, K, niter=20)``, faiss' defaults otherwise, so not
  spherical): plain Lloyd's k-means on the raw (final-LayerNorm'd) features, and a token's code is the
  argmin over centroids of ``||x||^2 - 2 x.c + ||c||^2`` (``model.py`` ``prepare_semantic``). The fit
  follows faiss where it matters: 20 iterations (DiGIT's ``niter``; faiss' own default is 25),
  initial centroids a seeded random sample of the training vectors (not k-means++), a sample larger
  than ``256 * K`` vectors subsampled to that (faiss' ``max_points_per_centroid``), and an empty cluster
  re-seeded by splitting a populous one (faiss' ``split_clusters``). It stops early only at a fixed
  point. Seeded, so a refit on the same tokens gives the same codebook — not faiss' bytes (another RNG).
  The spec records ``extra["metric"] = "euclidean"``.
* ``cosine`` — spherical k-means: tokens (and centroids) L2-normalised, k-means++ seeding, 30
  iterations, nearest centroid by cosine; the codebook is independent of the base's feature scale. What
  every cache made before the knob existed used: a spec without ``extra["metric"]`` (and a recorded
  ``teacher_config`` without ``metric``) reads back as cosine, and a cosine teacher's spec (hence its
  fingerprint) is the one those caches recorded.

Assignment and the fit's distances are computed in row blocks of about 4M entries (16 MiB of float32),
never an ``N x K`` matrix, so ``K`` in the thousands fits in a CPU's memory; the fit keeps only the
``[N, D]`` sample, ``[N]`` codes and ``[K, D]`` sums.

DiGIT's tokenizer (DINOv2 ViT-B/14 with 4 registers, output of block ``depth - 3`` — 0-based block 9
of 12, i.e. ``--layer 10`` here, which is 1-based — with the model's final norm applied, patch tokens
only, 8192 centroids)::

    digpt extract --shards DATA --out CACHE \\
        --teacher kmeans:timm:vit_base_patch14_reg4_dinov2.lvd142m --weights dinov2_vitb14_reg4_pretrain.pth \\
        --layer 10 --metric euclidean --codebook-size 8192 --fit-samples 8192

(``timm:`` applies the final norm to an intermediate ``--layer`` and drops the class and register
tokens, as DINOv2's ``get_intermediate_layers`` does; ``--fit-samples 8192`` views of 16x16 tokens give
faiss' ``256 * K`` training vectors.)
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..config import KMEANS_METRICS
from ..runtime import progress_bar
from .base import Teacher, TeacherOutput
from .registry import Fit, create_teacher, register_teacher

if TYPE_CHECKING:
    from ..config import TeacherConfig


DIGIT_NITER = 20
"""Lloyd iterations of the euclidean fit: DiGIT's ``faiss.Kmeans(..., niter=20)``."""
COSINE_ITERS = 30
"""Lloyd iterations (at most) of the cosine fit (its behaviour before ``metric`` existed)."""
MAX_POINTS_PER_CENTROID = 256
"""faiss' default ``max_points_per_centroid``: the euclidean fit subsamples more than ``256 * k`` vectors."""
BLOCK_ENTRIES = 1 << 22
"""Distance entries per row block of :func:`assign_codes` and the fit (16 MiB of float32)."""
_SPLIT_EPS = 1 / 1024  # faiss' relative perturbation when it splits a cluster for an empty one


def _block_rows(k: int) -> int:
    return max(1, BLOCK_ENTRIES // max(k, 1))


def _check_metric(metric: str) -> None:
    if metric not in KMEANS_METRICS:
        raise ValueError(f"metric must be one of {', '.join(KMEANS_METRICS)}, got {metric!r}")


def assign_codes(x: torch.Tensor, centers: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Nearest centroid of every row of ``x`` ``[N, D]``: ``[N]`` int64, in row blocks (never ``N x K``).

    ``euclidean``: argmin of ``||c||^2 - 2 x.c`` (DiGIT's squared distance less the per-row constant
    ``||x||^2``, which cannot change the argmin). ``cosine``: argmax of ``x/||x|| . c`` (``centers``
    unit-norm, as the cosine fit and teacher keep them)."""
    _check_metric(metric)
    centers = centers.float()
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    c2 = centers.pow(2).sum(1) if metric == "euclidean" else None
    step = _block_rows(centers.shape[0])
    for lo in range(0, x.shape[0], step):
        xb = x[lo : lo + step].float()
        if c2 is not None:
            out[lo : lo + step] = torch.addmm(c2, xb, centers.T, alpha=-2).argmin(1)
        else:
            out[lo : lo + step] = (F.normalize(xb, dim=-1) @ centers.T).argmax(1)
    return out


def fit_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    iters: int | None = None,
    seed: int = 0,
    max_points_per_centroid: int | None = MAX_POINTS_PER_CENTROID,
) -> torch.Tensor:
    """k-means of ``x`` ``[M, D]`` into ``k`` centroids ``[k, D]`` float32, deterministic for a ``seed``.

    ``metric="euclidean"``: Lloyd's k-means on the raw vectors, faiss' way (see the module docstring):
    ``iters`` defaults to DiGIT's 20, more than ``max_points_per_centroid * k`` vectors are subsampled
    (``None``: never), initial centroids are ``k`` distinct sample vectors, empty clusters are split.
    ``metric="cosine"`` (the default here, for callers from before the knob; ``extract`` passes the
    config's): spherical k-means with k-means++ seeding, at most 30 ``iters``, unit centroids.
    ``iters=0`` returns the initial centroids."""
    _check_metric(metric)
    m = x.shape[0]
    if m < k:
        raise ValueError(
            f"k-means needs at least codebook_size={k} vectors, got {m}; lower codebook_size or sample more views"
        )
    g = torch.Generator().manual_seed(seed)
    if metric == "euclidean":
        return _fit_euclidean(x, k, DIGIT_NITER if iters is None else iters, g, max_points_per_centroid)
    iters = COSINE_ITERS if iters is None else iters
    x = F.normalize(x.float(), dim=-1)
    # k-means++ seeding takes k steps, then up to `iters` Lloyd steps: one bar for both.
    bar = progress_bar(total=k + iters, desc=f"k-means k={k}", unit="step", leave=False)
    centers = x[torch.randint(m, (1,), generator=g)]
    d2 = (2 - 2 * x @ centers.T).clamp_min_(0).squeeze(1)
    bar.update(1)
    for _ in range(1, k):  # k-means++: next centre drawn proportionally to squared distance
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / m)
        c = x[torch.multinomial(probs, 1, generator=g)]
        centers = torch.cat([centers, c])
        d2 = torch.minimum(d2, (2 - 2 * x @ c.T).clamp_min_(0).squeeze(1))
        bar.update(1)
    for _ in range(iters):
        assign = assign_codes(x, centers, "cosine")
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        # An empty cluster keeps its old centre rather than collapsing to zero.
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        new = F.normalize(new, dim=-1)
        bar.update(1)
        if torch.allclose(new, centers, atol=1e-6):
            break
        centers = new
    bar.close()
    return centers


def _fit_euclidean(
    x: torch.Tensor, k: int, iters: int, g: torch.Generator, max_points_per_centroid: int | None
) -> torch.Tensor:
    m = x.shape[0]
    if max_points_per_centroid is not None and m > k * max_points_per_centroid:
        x = x[torch.randperm(m, generator=g)[: k * max_points_per_centroid].sort().values]
        m = x.shape[0]
    x = x.float()
    centers = x[torch.randperm(m, generator=g)[:k]].clone()
    step = _block_rows(k)
    bar = progress_bar(total=iters, desc=f"k-means k={k}", unit="step", leave=False)
    prev: torch.Tensor | None = None
    for _ in range(iters):
        # One pass over the sample in row blocks: codes, and the float64 sums of each cluster's vectors.
        c2 = centers.pow(2).sum(1)
        assign = torch.empty(m, dtype=torch.int64, device=x.device)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        for lo in range(0, m, step):
            xb = x[lo : lo + step]
            a = torch.addmm(c2, xb, centers.T, alpha=-2).argmin(1)
            assign[lo : lo + step] = a
            sums.index_add_(0, a, xb.double())
        counts = torch.bincount(assign, minlength=k)
        bar.update(1)
        if prev is not None and bool((counts > 0).all()) and torch.equal(assign, prev):
            break  # a fixed point: the centroids are already these clusters' means
        centers = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        if not bool((counts > 0).all()):
            centers = _split_empty(centers, counts, g)
        prev = assign
    bar.close()
    return centers


def _split_empty(centers: torch.Tensor, counts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """faiss' ``split_clusters``: each empty cluster takes a copy of a cluster drawn with probability
    proportional to its size - 1, and the two copies are pushed apart by a relative ``1/1024`` of
    alternating sign per dimension."""
    counts = counts.clone()
    sign = torch.ones(centers.shape[1], device=centers.device)
    sign[1::2] = -1
    for ci in torch.nonzero(counts == 0).flatten().tolist():
        weights = (counts - 1).clamp_min(0).double().cpu()
        if weights.sum() == 0:
            break
        cj = int(torch.multinomial(weights, 1, generator=g))
        centers[ci] = centers[cj] * (1 + _SPLIT_EPS * sign)
        centers[cj] = centers[cj] * (1 - _SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return centers


def save_codebook(
    path: str, codebook: torch.Tensor, base_name: str, base_fingerprint: str, metric: str | None = None
) -> None:
    """Write a codebook file; ``metric`` (recorded when given) is the distance it was fit with. A file
    this function wrote without one was fit by the cosine k-means of the time."""
    from safetensors.torch import save_file

    meta = {"base": base_name, "base_fingerprint": base_fingerprint}
    if metric is not None:
        _check_metric(metric)
        meta["metric"] = metric
    save_file({"codebook": codebook.contiguous().float()}, path, metadata=meta)


def load_codebook(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("codebook"), dict(f.metadata() or {})


def spec_metric(spec: dict) -> str:
    """The metric a recorded ``kmeans:`` spec (``TeacherSpec.to_json()``) assigns by: a spec without
    ``extra["metric"]`` (every cache from before the knob, and any cosine one) is ``cosine``."""
    return (spec.get("extra") or {}).get("metric", "cosine")


class KMeansTeacher(Teacher):
    def __init__(self, base: Teacher, codebook: torch.Tensor, metric: str = "cosine"):
        super().__init__()
        _check_metric(metric)
        self.base = base
        self.metric = metric
        cb = codebook.float()
        self.register_buffer("codebook", F.normalize(cb, dim=-1) if metric == "cosine" else cb.clone())
        # Cosine records no metric: its spec, and so its fingerprint, stay those of the caches made before
        # the knob existed (spec_metric reads the absence as cosine).
        self.spec = replace(
            base.spec,
            name=f"kmeans:{base.spec.name}",
            kind="codes",
            num_codes=codebook.shape[0],
            has_cls=False,
            extra={**base.spec.extra, "base": base.spec.name, **({"metric": metric} if metric != "cosine" else {})},
        )

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> ``[...]`` int64 codes (nearest centroid by ``metric``; in row blocks)."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        return assign_codes(flat, self.codebook, self.metric).reshape(tokens.shape[:-1])

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        return TeacherOutput(tokens=self.assign(self.base.encode(x).tokens))


def _check(tc: TeacherConfig, base: Teacher) -> None:
    """A missing codebook file, or more codes than the fit sample has token vectors, fails before work."""
    if tc.codebook is not None:
        if not os.path.isfile(tc.codebook):
            raise FileNotFoundError(f"codebook file not found: {tc.codebook}")
        return
    per_view = base.spec.grid[0] * base.spec.grid[1]
    if tc.codebook_size > tc.fit_samples * per_view:
        raise ValueError(
            f"codebook_size {tc.codebook_size} exceeds the {tc.fit_samples * per_view} token vectors "
            f"fit_samples={tc.fit_samples} views give ({per_view} tokens each); lower codebook_size or "
            "raise fit_samples"
        )


def _fit(x: torch.Tensor, tc: TeacherConfig) -> np.ndarray:
    # ExtractConfig resolves an unset metric to euclidean; a bare TeacherConfig's None means cosine, as
    # everywhere else (what kmeans() builds from it).
    return fit_kmeans(x, tc.codebook_size, metric=tc.metric or "cosine", seed=0).numpy()


KMEANS_FIT = Fit(
    array="codebook",
    keyword="codebook",
    fit=_fit,
    describe=lambda tc: f"fit k-means ({tc.codebook_size} codes, {tc.metric or 'cosine'})",
    check=_check,
    # codebook: a user's file, used when nothing is stored yet
    options=lambda tc: {"codebook": tc.codebook, "metric": tc.metric},
    given=lambda tc: tc.codebook is not None,
    stored=lambda t: t.codebook,  # the file's codebook, kept beside the codes
)


@register_teacher("kmeans", tiny="kmeans:random-vit:32/8", fit=KMEANS_FIT)
def kmeans(
    arg: str | None,
    *,
    weights: str | None = None,
    layer: int | None = None,
    codebook: str | torch.Tensor | None = None,
    metric: str | None = None,
    **options,
) -> Teacher:
    """k-means codes of another teacher (DiGIT): ``kmeans:<teacher>``; ``weights`` are the base's.

    ``metric``: ``euclidean`` or ``cosine``; ``None`` (a config recorded before the knob): the one a
    codebook file records, else ``cosine``."""
    if metric is not None:
        _check_metric(metric)
    if not arg:
        raise ValueError("name the base teacher: kmeans:<teacher>, e.g. kmeans:efficientnet_lite0")
    base = create_teacher(arg, weights=weights, layer=layer, **options)
    if codebook is None:
        raise ValueError(
            f"kmeans:{arg} needs a codebook file; `digpt extract` fits one (--codebook-size) or pass --codebook FILE"
        )
    # A tensor comes from the cache itself (fit by extract, stored beside the codes); a path from the user.
    cb, meta = (codebook, {}) if isinstance(codebook, torch.Tensor) else load_codebook(codebook)
    if meta.get("base_fingerprint") not in (None, base.fingerprint()):
        raise ValueError(
            f"codebook {codebook} was fit on a different {arg} (weights fingerprint "
            f"{meta.get('base_fingerprint', '')[:12]}, this one {base.fingerprint()[:12]})"
        )
    if cb.shape[1] != base.spec.dim:
        raise ValueError(f"codebook dim {cb.shape[1]} != {arg} token dim {base.spec.dim}")
    # A file save_codebook wrote records its metric, or predates it (cosine); a foreign file (e.g.
    # DiGIT's faiss centroids) says nothing and is read with the metric asked for.
    file_metric = meta.get("metric") or ("cosine" if "base_fingerprint" in meta else None)
    if metric is not None and file_metric not in (None, metric):
        raise ValueError(
            f"codebook {codebook} was fit with metric {file_metric}, not {metric}; pass --metric {file_metric} "
            "to use it, or fit a new codebook"
        )
    return KMeansTeacher(base, cb, metric or file_metric or "cosine")
