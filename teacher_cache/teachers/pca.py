"""``pca:<teacher>``: another teacher's tokens projected on their top-``K`` principal directions.

The storage ablation's "PCA-reduced" form: a continuous tokenizer of width ``K`` (``pca_dim``) instead of
the base teacher's ``D``. The basis — the token mean ``[D]`` and ``K`` unit principal directions
``[K, D]`` — is fit once (``fit_pca``, called by ``extract`` on the same deterministic sample of views
the k-means codebook is fit on) and stored in the cache group as one ``pca_basis`` array ``[K + 1, D]``
(row 0 the mean, rows 1..K the directions, by decreasing explained variance). The teacher then maps
every token (and the base's class token, when it has one) to ``(x - mean) @ components.T``. The basis
is a buffer, so it is part of the teacher's fingerprint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .base import Teacher, TeacherOutput
from .registry import Fit, create_teacher, register_teacher

if TYPE_CHECKING:
    from ..config import TeacherConfig


def fit_pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Principal directions of ``x`` ``[M, D]``: returns ``[k + 1, D]`` float32 (mean, then ``k`` unit
    directions by decreasing variance).

    Exact and deterministic: an eigendecomposition of the float64 covariance (the right singular vectors
    of the centred data), no random projections; each direction's sign is fixed so that its largest-|.|
    entry is positive, so a refit on the same tokens gives the same bytes.
    """
    x = x.reshape(-1, x.shape[-1]).double()
    m, d = x.shape
    if not 1 <= k <= d:
        raise ValueError(f"pca_dim must be in [1, {d}] (the base teacher's token dim), got {k}")
    if m < 2:
        raise ValueError(f"PCA needs at least 2 token vectors, got {m}; sample more views")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / (m - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs.flip(-1)[:, :k].T.contiguous()  # [k, D], decreasing variance
    idx = comps.abs().argmax(1, keepdim=True)
    comps = comps * torch.where(comps.gather(1, idx) < 0, -1.0, 1.0).to(comps)
    return torch.cat([mean[None], comps]).float()


def explained_variance(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Variance of ``x`` ``[..., D]`` along each of ``basis``'s directions ``[K]``."""
    x = x.reshape(-1, x.shape[-1]).double()
    return ((x - basis[0].double()) @ basis[1:].double().T).var(0)


class PCATeacher(Teacher):
    def __init__(self, base: Teacher, basis: torch.Tensor):
        super().__init__()
        self.base = base
        basis = basis.float()
        self.register_buffer("pca_mean", basis[0].clone())
        self.register_buffer("pca_components", basis[1:].clone())
        k = basis.shape[0] - 1
        self.spec = replace(
            base.spec,
            name=f"pca:{base.spec.name}",
            dim=k,
            kind="continuous",
            num_codes=0,
            extra={**base.spec.extra, "base": base.spec.name, "base_dim": base.spec.dim, "pca_dim": k},
        )

    @property
    def basis(self) -> torch.Tensor:
        """``[K + 1, D]``: the array stored in the cache group (``pca_basis``)."""
        return torch.cat([self.pca_mean[None], self.pca_components])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` base tokens -> ``[..., K]``."""
        return (x.float() - self.pca_mean) @ self.pca_components.T

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        out = self.base.encode(x)
        return TeacherOutput(
            tokens=self.project(out.tokens), cls=self.project(out.cls) if out.cls is not None else None
        )


def _check(tc: TeacherConfig, base: Teacher) -> None:
    if tc.pca_dim > base.spec.dim:
        raise ValueError(
            f"pca_dim {tc.pca_dim} exceeds the token dim {base.spec.dim} of {base.spec.name}; "
            f"lower pca_dim to at most {base.spec.dim}"
        )


def _fit(x: torch.Tensor, tc: TeacherConfig) -> np.ndarray:
    return fit_pca(x, tc.pca_dim).numpy()


PCA_FIT = Fit(
    array="pca_basis",
    keyword="basis",
    fit=_fit,
    describe=lambda tc: f"fit PCA ({tc.pca_dim} dims)",
    check=_check,
    options=lambda tc: {"pca_dim": tc.pca_dim},
)


@register_teacher("pca", tiny="pca:random-vit:32/8", fit=PCA_FIT)
def pca(
    arg: str | None,
    *,
    weights: str | None = None,
    layer: int | None = None,
    basis: torch.Tensor | None = None,
    pca_dim: int | None = None,
    **options,
) -> Teacher:
    """PCA-reduced tokens of another teacher: ``pca:<teacher>``; ``weights`` are the base's."""
    if not arg:
        raise ValueError("name the base teacher: pca:<teacher>, e.g. pca:efficientnet_lite0")
    base = create_teacher(arg, weights=weights, layer=layer, **options)
    if basis is None:
        raise ValueError(f"pca:{arg} needs a fitted basis; `digpt extract` fits one (--pca-dim) and stores it")
    basis = torch.as_tensor(basis)
    if basis.ndim != 2 or basis.shape[0] < 2 or basis.shape[1] != base.spec.dim:
        raise ValueError(
            f"pca basis of shape {tuple(basis.shape)} does not fit {arg} tokens (want [pca_dim + 1, {base.spec.dim}])"
        )
    if pca_dim is not None and basis.shape[0] - 1 != pca_dim:
        raise ValueError(
            f"pca_dim {pca_dim} != the {basis.shape[0] - 1} directions of the stored basis; "
            "extract into another group (--group NAME) to fit a new one"
        )
    return PCATeacher(base, basis)
