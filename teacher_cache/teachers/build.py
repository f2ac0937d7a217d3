"""From a :class:`~teacher_cache.config.TeacherConfig` to a model: the one place every stage builds a teacher.

``extract`` (driver and workers), ``verify``, the trainer's online teacher and the code-GPT encoder all
call :func:`build_teacher`. A family fit on the data declares its :class:`~.registry.Fit` at registration;
nothing here names a family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .base import Teacher
from .registry import create_teacher, family_fit, family_knobs, fitted_arrays, resolve_name, split_name

if TYPE_CHECKING:
    from ..config import TeacherConfig


def build_teacher(tc: TeacherConfig, fitted: Any = None, **stored: Any) -> Teacher:
    """Build ``tc``'s teacher.

    ``fitted``: the family's fitted array (codebook, PCA basis; tensor or numpy); ``stored``: arrays by
    the name they are stored under in the cache group (as :func:`load_fitted` returns them) — the one
    this family stores wins over ``fitted``. Families that fit nothing ignore both."""
    opts = tc.options()
    knobs = family_knobs(tc.name, tc.knobs)
    if knobs is not None:
        opts["knobs"] = knobs
    fit = family_fit(tc.name)
    if fit is not None:
        opts.update(fit.options(tc) if fit.options else {})
        arr = stored.get(fit.array)
        arr = fitted if arr is None else arr
        if arr is not None:
            opts[fit.keyword] = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr))
    return create_teacher(tc.name, weights=tc.weights, layer=tc.layer, **opts)


def is_fitted(tc: TeacherConfig) -> bool:
    """Whether ``tc``'s family fits something on the data (a codebook, a basis)."""
    return family_fit(tc.name) is not None


def base_teacher(tc: TeacherConfig) -> Teacher:
    """The base teacher of a fitted ``family:<base>`` tokenizer, built so that a bad base name, weights
    file or layer, and whatever the family's :attr:`~.registry.Fit.check` refuses (a missing codebook
    file, an impossible ``codebook_size``, a ``pca_dim`` wider than the base's tokens) fail before any work."""
    fit = family_fit(tc.name)
    if fit is None:
        raise ValueError(f"teacher {tc.name!r} is not fit on the data; it has no base teacher")
    family, _ = split_name(tc.name)
    try:
        base = create_teacher(
            resolve_name(tc.name).removeprefix(f"{family}:"), weights=tc.weights, layer=tc.layer, **tc.options()
        )
    except ValueError as e:
        raise ValueError(f"teacher {tc.name!r}: {e}") from e
    if fit.check is not None:
        fit.check(tc, base)
    return base


def load_fitted(tok: Any) -> dict[str, torch.Tensor]:
    """A tokenizer group's fitted arrays as :func:`build_teacher` keywords (``codebook=``, ``pca_basis=``)."""
    return {n: torch.from_numpy(np.array(tok[n][:])) for n in fitted_arrays() if n in tok}
