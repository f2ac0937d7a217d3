"""Teacher registry: ``@register_teacher`` on tiny factories, ``list_teachers()`` / ``create_teacher()``.

A teacher name is ``family`` or ``family:arg`` (``openclip:ViT-B-16@openai``,
``timm:vit_small_patch14_dinov2.lvd142m``, ``kmeans:efficientnet_lite0``, ``pca:efficientnet_lite0``). Presets give the
headline teachers short names (``clip-b16``); they expand to a family name.

A family that is *fit on the data* (``kmeans:<t>`` a codebook, ``pca:<t>`` a basis) declares it with a
:class:`Fit` at registration: what it fits on its base teacher's tokens, the array it stores in its cache
group, the factory keyword that array comes back through, and the checks that fail before any work.
``extract``, ``verify`` and the trainer handle every fitted family through that entry alone
(:mod:`teacher_cache.teachers.build`), so a new family touches only this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import modules_of
from .base import Teacher

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..config import TeacherConfig

TeacherFactory = Callable[..., Teacher]


@dataclass(frozen=True)
class Fit:
    """What a ``family:<base>`` tokenizer fits on the data and keeps in its cache group.

    ``extract`` samples the base teacher's tokens ``[M, D]`` of the first view of the first
    ``TeacherConfig.fit_samples`` usable samples (deterministic), calls :attr:`fit` once per cache group,
    stores the result as :attr:`array` beside the tokens, and on every later build (re-runs, workers,
    ``verify``, the trainer) passes it back to the factory as keyword :attr:`keyword`.
    """

    array: str
    """Name of the float32 array stored in the tokenizer group (``codebook``, ``pca_basis``)."""
    keyword: str
    """Factory keyword that receives that array as a tensor (``codebook``, ``basis``)."""
    fit: Callable[[torch.Tensor, TeacherConfig], np.ndarray]
    """``(base tokens [M, D], config) -> array`` to store."""
    describe: Callable[[TeacherConfig], str]
    """Progress-bar label of the fit, e.g. ``fit k-means (512 codes)``."""
    check: Callable[[TeacherConfig, Teacher], None] | None = None
    """Raise ``ValueError`` naming the field when the config cannot work with this base teacher;
    called before any work starts."""
    options: Callable[[TeacherConfig], dict[str, Any]] | None = None
    """Extra factory keywords taken from the config (``pca_dim``; a user's ``codebook`` file)."""
    given: Callable[[TeacherConfig], bool] | None = None
    """True when the config supplies the array itself (a codebook file): build with :attr:`options`, no
    fit, and store :attr:`stored` of the built teacher."""
    stored: Callable[[Teacher], torch.Tensor] | None = None
    """The array a built teacher holds (needed with :attr:`given`)."""


_FAMILIES: dict[str, TeacherFactory] = {}
_FITS: dict[str, Fit] = {}
_DOCS: dict[str, str] = {}
_TINY: dict[str, str] = {}

# Headline teachers. They need a hub or a local --weights file; nothing here downloads on import.
PRESETS: dict[str, str] = {
    "clip-b16": "openclip:ViT-B-16@openai",
    "clip-l14": "openclip:ViT-L-14@openai",
    "clip-l14-336": "openclip:ViT-L-14-336@openai",
    "openclip-l14": "openclip:ViT-L-14@laion2b_s32b_b82k",
    "openclip-h14": "openclip:ViT-H-14@laion2b_s32b_b79k",
    "dino-b16": "timm:vit_base_patch16_224.dino",
    "dinov2-s14": "timm:vit_small_patch14_dinov2.lvd142m",
    "dinov2-b14": "timm:vit_base_patch14_dinov2.lvd142m",
    "dinov2-b14-reg": "timm:vit_base_patch14_reg4_dinov2.lvd142m",
}


def register_teacher(
    family: str, *, tiny: str | None = None, fit: Fit | None = None
) -> Callable[[TeacherFactory], TeacherFactory]:
    """Register ``factory(arg, *, weights=None, layer=None, **options) -> Teacher`` under ``family``.

    ``tiny`` names a variant of this family that builds offline in well under a second on a CPU;
    tests parametrize over those. ``fit``: the family wraps a base teacher (``family:<base>``) and fits
    something on the data (see :class:`Fit`).
    """

    if fit is not None and fit.given is not None and fit.stored is None:
        raise ValueError(f"teacher family {family!r}: a Fit with `given` needs `stored` (the array to keep)")

    def deco(fn: TeacherFactory) -> TeacherFactory:
        if family in _FAMILIES:
            raise ValueError(f"teacher family {family!r} registered twice")
        _FAMILIES[family] = fn
        if fit is not None:
            _FITS[family] = fit
        _DOCS[family] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        if tiny is not None:
            _TINY[family] = tiny
        return fn

    return deco


# Every module of this package is imported (each family module registers itself): a new family is one new
# file. Found by listing the package rather than imported by name here, because the family modules import
# this one (`register_teacher`): naming them would make registry and families import each other.
_discover = modules_of(__package__)
_loaded = False


def _ensure_loaded() -> None:
    # Lazy, so `import teacher_cache` does not pull in open_clip / timm. Marked loaded only once every
    # module imported: a family that failed to import fails the next lookup again instead of vanishing.
    global _loaded
    if not _loaded:
        _discover()
        _loaded = True


def list_teachers(tiny: bool = False) -> list[str]:
    """Registered family names, or (``tiny=True``) one offline test-sized name per family."""
    _ensure_loaded()
    if tiny:
        return [_TINY[f] for f in sorted(_TINY)]
    return sorted(_FAMILIES)


def describe_teachers() -> dict[str, str]:
    _ensure_loaded()
    return dict(sorted(_DOCS.items()))


def split_name(name: str) -> tuple[str, str | None]:
    name = PRESETS.get(name, name)
    family, _, arg = name.partition(":")
    return family, (arg or None)


def resolve_name(name: str) -> str:
    return PRESETS.get(name, name)


def family_fit(name: str) -> Fit | None:
    """The :class:`Fit` of ``name``'s family (a teacher name or preset), or ``None``."""
    _ensure_loaded()
    return _FITS.get(split_name(name)[0])


def fitted_arrays() -> tuple[str, ...]:
    """Names of every array a registered family stores in its tokenizer group."""
    _ensure_loaded()
    return tuple(sorted({f.array for f in _FITS.values()}))


def create_teacher(name: str, *, weights: str | None = None, layer: int | None = None, **options: Any) -> Teacher:
    """Build a teacher by registry name. ``weights``: a local file (no network); ``layer``: block index."""
    _ensure_loaded()
    family, arg = split_name(name)
    if family not in _FAMILIES:
        raise ValueError(f"unknown teacher {name!r}: families are {sorted(_FAMILIES)}, presets are {sorted(PRESETS)}")
    try:
        teacher = _FAMILIES[family](arg, weights=weights, layer=layer, **options)
    except ValueError as e:  # name the teacher in configuration errors that do not already
        if name in str(e) or f"{family}:" in str(e) or str(e).startswith(f"{family} "):
            raise
        raise ValueError(f"teacher {name!r}: {e}") from e
    teacher.eval()
    return teacher
