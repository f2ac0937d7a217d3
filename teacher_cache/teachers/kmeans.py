"""``kmeans:<teacher>``: DiGIT-style discrete tokens — k-means codes of another teacher's tokens.

The codebook is fit once (``fit_kmeans``, called by ``extract`` on a deterministic sample of views)
and saved as safetensors together with the base teacher's fingerprint; the teacher then maps every
token to its nearest centroid. Tokens are L2-normalised before fitting and assignment, so distance is
cosine distance and the codebook is independent of the base teacher's feature scale.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import progress_bar
from .base import Teacher, TeacherOutput
from .registry import Fit, create_teacher, register_teacher

if TYPE_CHECKING:
    from ..config import TeacherConfig


def fit_kmeans(x: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with k-means++ seeding. ``x``: ``[M, D]``. Returns unit centroids ``[k, D]``."""
    x = F.normalize(x.float(), dim=-1)
    m = x.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least codebook_size={k} vectors, got {m}; sample more views")
    g = torch.Generator().manual_seed(seed)
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
        assign = (x @ centers.T).argmax(1)
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


def save_codebook(path: str, codebook: torch.Tensor, base_name: str, base_fingerprint: str) -> None:
    from safetensors.torch import save_file

    save_file(
        {"codebook": codebook.contiguous().float()},
        path,
        metadata={"base": base_name, "base_fingerprint": base_fingerprint},
    )


def load_codebook(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor("codebook"), dict(f.metadata() or {})


class KMeansTeacher(Teacher):
    def __init__(self, base: Teacher, codebook: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("codebook", F.normalize(codebook.float(), dim=-1))
        self.spec = replace(
            base.spec,
            name=f"kmeans:{base.spec.name}",
            kind="codes",
            num_codes=codebook.shape[0],
            has_cls=False,
            extra={**base.spec.extra, "base": base.spec.name},
        )

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> ``[...]`` int64 codes (nearest centroid by cosine)."""
        return (F.normalize(tokens.float(), dim=-1) @ self.codebook.T).argmax(-1)

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
    return fit_kmeans(x, tc.codebook_size, seed=0).numpy()


KMEANS_FIT = Fit(
    array="codebook",
    keyword="codebook",
    fit=_fit,
    describe=lambda tc: f"fit k-means ({tc.codebook_size} codes)",
    check=_check,
    options=lambda tc: {"codebook": tc.codebook},  # a user's file, used when nothing is stored yet
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
    **options,
) -> Teacher:
    """k-means codes of another teacher (DiGIT): ``kmeans:<teacher>``; ``weights`` are the base's."""
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
    return KMeansTeacher(base, cb)
