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

from ..registry import Registry, modules_of
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


# Every module of this package is imported the first time a name is asked for (each family module
# registers itself): a new family is one new file. Lazy, so `import teacher_cache` pulls in no open_clip/timm.
TEACHERS: Registry[TeacherFactory] = Registry("teacher family", discover=modules_of(__package__))

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
    family: str,
    *,
    tiny: str | None = None,
    fit: Fit | None = None,
    knobs: type | None = None,
    cls_in_token_space: bool | Callable[[dict[str, Any]], bool] = True,
) -> Callable[[TeacherFactory], TeacherFactory]:
    """Register ``factory(arg, *, weights=None, layer=None, **options) -> Teacher`` under ``family``.

    ``tiny`` names a variant of this family that builds offline in well under a second on a CPU;
    tests parametrize over those. ``fit``: the family wraps a base teacher (``family:<base>``) and fits
    something on the data (see :class:`Fit`). ``knobs``: the frozen dataclass of the settings only this
    family has (``TeacherConfig.knobs``, ``digpt extract --knob NAME=VALUE``); the factory then receives
    an instance as ``knobs=``, and the cache records the values. ``cls_in_token_space``: whether the
    family's global token lives in its patch tokens' space (or a rule on the recorded spec), which the
    similarity orders need to know (:func:`global_token_in_token_space`).
    """

    if fit is not None and fit.given is not None and fit.stored is None:
        raise ValueError(f"teacher family {family!r}: a Fit with `given` needs `stored` (the array to keep)")

    def deco(fn: TeacherFactory) -> TeacherFactory:
        if family in TEACHERS:
            raise ValueError(f"teacher family {family!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        TEACHERS.add(family, fn, fit=fit, doc=doc, tiny=tiny, knobs=knobs, cls_in_token_space=cls_in_token_space)
        return fn

    return deco


def list_teachers(tiny: bool = False) -> list[str]:
    """Registered family names, or (``tiny=True``) one offline test-sized name per family."""
    names = TEACHERS.names()
    if tiny:
        return [TEACHERS.meta(f)["tiny"] for f in names if TEACHERS.meta(f)["tiny"]]
    return names


def describe_teachers() -> dict[str, str]:
    return {f: TEACHERS.meta(f)["doc"] for f in TEACHERS.names()}


def split_name(name: str) -> tuple[str, str | None]:
    name = PRESETS.get(name, name)
    family, _, arg = name.partition(":")
    return family, (arg or None)


def resolve_name(name: str) -> str:
    return PRESETS.get(name, name)


def family_fit(name: str) -> Fit | None:
    """The :class:`Fit` of ``name``'s family (a teacher name or preset), or ``None``."""
    family = split_name(name)[0]
    return TEACHERS.meta(family)["fit"] if family in TEACHERS else None


def fitted_arrays() -> tuple[str, ...]:
    """Names of every array a registered family stores in its tokenizer group."""
    return tuple(sorted({TEACHERS.meta(f)["fit"].array for f in TEACHERS.names() if TEACHERS.meta(f)["fit"]}))


def family_knobs(name: str, values: dict[str, Any] | None) -> Any:
    """The knobs of ``name``'s family built from ``values`` (``TeacherConfig.knobs``; strings from the
    command line are read as each field's type): an instance of the config the family registered, or
    None for a family without knobs (which refuses any value, naming it)."""
    from ..config_io import from_strings

    family = split_name(name)[0]
    kind = TEACHERS.meta(family)["knobs"] if family in TEACHERS else None
    if kind is None:
        if values:
            raise ValueError(f"teacher {name!r} takes no knobs; got {', '.join(sorted(values))}")
        return None
    return from_strings(kind, dict(values or {}), where=f"teacher {name!r} knobs")


def global_token_in_token_space(spec: dict[str, Any]) -> bool:
    """Whether the global token a cache recorded (``spec``: a tokenizer's recorded spec) lives in its patch
    tokens' space, as its family declared at registration. A fitted family (``pca:<base>``) projects both
    with one transform, so its base decides; an unregistered name: True (a ViT's class token)."""
    family = split_name(str(spec.get("name", "")))[0]
    if family not in TEACHERS:
        return True
    base = (spec.get("extra") or {}).get("base")
    if TEACHERS.meta(family)["fit"] is not None and base:
        return global_token_in_token_space({**spec, "name": base})
    rule = TEACHERS.meta(family)["cls_in_token_space"]
    return bool(rule(spec)) if callable(rule) else bool(rule)


def create_teacher(name: str, *, weights: str | None = None, layer: int | None = None, **options: Any) -> Teacher:
    """Build a teacher by registry name. ``weights``: a local file (no network); ``layer``: block index."""
    family, arg = split_name(name)
    if family not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}: families are {TEACHERS.names()}, presets are {sorted(PRESETS)}")
    try:
        teacher = TEACHERS.get(family)(arg, weights=weights, layer=layer, **options)
    except ValueError as e:  # name the teacher in configuration errors that do not already
        if name in str(e) or f"{family}:" in str(e) or str(e).startswith(f"{family} "):
            raise
        raise ValueError(f"teacher {name!r}: {e}") from e
    teacher.eval()
    return teacher
