"""The objective interface and its registry. An objective owns its model and its loss:
``objective(batch) -> (loss, metrics)``; the training loop knows nothing else about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from student.blind import BlindStats
from student.config import StudentConfig as StudentConfig  # re-exported: objectives are built from it
from student.vit import VisionTransformer
from teacher_cache.registry import Registry, modules_of


@dataclass(frozen=True)
class TargetSpec:
    """What the cache provides, as the objective sees it (from the tokenizer's recorded spec)."""

    name: str
    dim: int
    grid: tuple[int, int]
    has_cls: bool
    kind: str = "continuous"
    num_codes: int = 0
    cls_in_token_space: bool = True
    """Whether the global token is comparable with the patch tokens (a cosine between them means
    something); SemAIM's order uses the mean patch token as the global token when it is not."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TargetSpec:
        return cls(
            name=spec["name"],
            dim=int(spec["dim"]),
            grid=tuple(spec["grid"]),
            has_cls=bool(spec["has_cls"]),
            kind=spec.get("kind", "continuous"),
            num_codes=int(spec.get("num_codes", 0)),
            cls_in_token_space=cls_in_token_space(spec),
        )

    @property
    def from_pixels(self) -> bool:
        """The targets are the image's own pixels (a ``pixel:`` teacher, or a ``kmeans:``/``pca:`` fit of
        one): there is no teacher network, so SemAIM's order reads its similarity from the student's own
        encoder (:meth:`Objective.cluster_order`), as SemAIM does for pixel targets."""
        name = self.name
        while name.startswith(("kmeans:", "pca:")):
            name = name.split(":", 1)[1]
        return name.split(":", 1)[0] == "pixel"


def cls_in_token_space(spec: dict[str, Any]) -> bool:
    """Whether the teacher's global token lives in its patch tokens' space, as its family declares
    (``register_teacher(..., cls_in_token_space=...)``: EfficientNet-Lite0's head pools another map than
    it tokenises; ViT teachers take both from one layer and projection)."""
    from teacher_cache.teachers import global_token_in_token_space

    return global_token_in_token_space(spec)


class Objective(nn.Module):
    """Base class. Subclasses set ``self.encoder`` (the network that is kept and exported)."""

    registry_name: ClassVar[str] = ""
    """Set by :func:`register_objective`."""
    default_order: ClassVar[str | None] = None
    """The order used when none is asked for; ``None``: the objective has no order."""
    encoder: VisionTransformer

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def blind_loss(self, batch: dict[str, torch.Tensor], stats: BlindStats) -> torch.Tensor | None:
        """This objective's loss on ``batch`` for a predictor that ignores the image and outputs, at each
        target position, the per-position statistic in ``stats`` (``student/blind.py``). Same rows, same
        weighting as :meth:`forward`. ``None``: not defined for this objective (no baseline is logged)."""
        return None

    def cluster_order(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, n_clusters]``: this batch's order (objectives with ``order``, ``target`` and a D-iGPT
        ``model``); the order reads the teacher's raw tokens (``student.orders.teacher_view``). An order
        that needs a similarity map (``semaim``) gets ``view["similarity"]`` from the teacher's tokens on
        the teacher grid, or, for pixel targets, from :meth:`encoder_similarity` on the student grid, and
        then the student grid's cluster index (``model.cluster_patches``) in place of the teacher's."""
        from student.orders import needs_similarity, similarity_map, teacher_view

        view = teacher_view(batch, self.target.cls_in_token_space)
        clusters = self.model.cluster_targets
        if needs_similarity(self.order):
            if self.target.from_pixels:
                view["similarity"] = self.encoder_similarity(batch["images"])
                clusters = self.model.cluster_patches
            else:
                view["similarity"] = similarity_map(view["tokens"], view.get("cls"), self.target.grid)
        return self.order(view, self.model.cfg.n_clusters, clusters)

    def encoder_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, g, g]``: SemAIM's similarity map for pixel targets, from the model's own encoder as SemAIM's
        ``engine_pretrain`` takes it: in eval mode (no drop path) and without gradient, one extra pass over
        all patches with full attention, final-normed; the cosine of each patch token to the class token.
        The encoder's train/eval mode is restored afterwards. (In D-iGPT pretraining the final norm is an
        untrained identity LayerNorm: the model as it is.)"""
        from student.orders import similarity_map

        enc, was_training = self.encoder, self.encoder.training
        enc.eval()
        try:
            with torch.no_grad():
                x = enc.forward_features(images)[0]  # [B, 1+N, D], class token first
        finally:
            enc.train(was_training)
        g = enc.cfg.grid_size
        return similarity_map(x[:, 1:], x[:, 0], (g, g))


RETIRED = {
    "igpt": "it ran next-patch pixel regression, not iGPT's next-pixel cross-entropy over a colour palette; "
    "the same model and loss are now objective 'next-patch'",
}
"""Names that once ran something other than the method they name: asked for, they say where it went."""
# Every module of this package registers what it defines: a new objective is one new file here.
OBJECTIVES: Registry[type[Objective]] = Registry("objective", discover=modules_of(__package__), retired=RETIRED)


def register_objective(name: str, config: type | None = None) -> Callable[[type[Objective]], type[Objective]]:
    """Register an objective class under ``name``. ``config``: the frozen dataclass of the knobs that
    only this objective has (each field with a docstring: ``digpt train`` turns it into a flag with that
    help); the class's ``__init__`` then takes an instance of it as a fourth argument."""

    def deco(cls: type[Objective]) -> type[Objective]:
        cls.registry_name = name
        return OBJECTIVES.register(name, config=config)(cls)

    return deco


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def objective_config(name: str, knobs: Any = None) -> Any:
    """The knobs of objective ``name``: ``knobs`` checked to be its config type, or that type's defaults
    when ``knobs`` is None. None for an objective without knobs."""
    kind = OBJECTIVES.meta(name)["config"]
    if kind is None:
        if knobs is not None:
            raise ValueError(f"objective {name!r} has no knobs of its own; got {type(knobs).__name__} {knobs}")
        return None
    if knobs is None:
        return kind()
    if not isinstance(knobs, kind):
        raise ValueError(f"objective {name!r} takes its knobs as a {kind.__name__}, got {type(knobs).__name__}")
    return knobs


def create_objective(
    name: str, student: StudentConfig, target: TargetSpec, order: str | None = None, knobs: Any = None
) -> Objective:
    """Build objective ``name`` for ``target`` (``knobs``: its own config, None for its defaults); raises
    ValueError with the reason when the combination (objective, order, target kind, grid) cannot train."""
    knobs = objective_config(name, knobs)
    cls = OBJECTIVES.get(name)
    if order is not None and cls.default_order is None:
        raise ValueError(
            f"objective {name!r} predicts every token at once from one input; it has no order (drop --order {order})"
        )
    order = order or cls.default_order
    return cls(student, target, order) if knobs is None else cls(student, target, order, knobs)
