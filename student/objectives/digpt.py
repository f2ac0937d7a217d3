"""``digpt`` (generative + discriminative decoders) and ``gen`` (generative only, the paper's Table 9)."""

from __future__ import annotations

import torch

from student.blind import BlindStats
from student.digpt_model import DecoderOutput, DiGPT, DiGPTConfig, DiGPTOutput, digpt_loss
from student.orders import get_order

from .base import Objective, StudentConfig, TargetSpec, register_objective


def build_digpt(
    student: StudentConfig,
    target: TargetSpec,
    decoders: tuple[str, ...],
    objective: str,
    cluster_size: int | None = None,
    predict_cls: bool | None = None,
    target_dim: int | None = None,
    memory_layers: tuple[float, ...] | None = None,
) -> DiGPT:
    enc = student.encoder_config()
    cs = cluster_size or student.cluster_size or max(1, enc.grid_size // 2)
    dim, heads = student.decoder_width()
    kw = {"memory_layers": memory_layers} if memory_layers else {}
    try:
        cfg = DiGPTConfig(
            encoder=enc,
            cluster_size=cs,
            decoder_depth=student.decoder_depth,
            decoder_dim=dim,
            decoder_heads=heads,
            target_dim=target_dim or target.dim,
            target_grid=target.grid,
            predict_cls=target.has_cls if predict_cls is None else predict_cls,
            decoders=decoders,
            **kw,
        )
    except ValueError as e:
        raise ValueError(
            f"objective {objective!r} with teacher {target.name} (grid {target.grid[0]}x{target.grid[1]}) "
            f"and student {student.size} (grid {enc.grid_size}x{enc.grid_size}, clusters of "
            f"{cs}x{cs} patches): {e}"
        ) from None
    return DiGPT(cfg, student.attn_impl)


@register_objective("digpt")
class DiGPTObjective(Objective):
    """D-iGPT: predict the next cluster's teacher tokens (generative) and the visible ones (discriminative)."""

    default_order = "random"
    decoders: tuple[str, ...] = ("gen", "dis")

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None):
        super().__init__()
        self.target = target
        self.model = build_digpt(student, target, self.decoders, self.registry_name)
        self.order_name, self.order = order, get_order(order or self.default_order)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        order = self.cluster_order(batch)
        out = self.model(batch["images"], order)
        losses = digpt_loss(out, batch["tokens"], batch.get("cls"))
        return losses["loss"], {k: v.detach() for k, v in losses.items()}

    def blind_loss(self, batch: dict[str, torch.Tensor], stats: BlindStats) -> torch.Tensor:
        """The official rows (clusters 2..n generative, 1..n-1 discriminative, plus the class rows), each
        predicted by the mean unit target of its position: the best image-free answer under ``2 - 2 cos``."""
        order = self.cluster_order(batch)
        gen_index, dis_index = self.model.target_index(order)
        cls = None
        if self.model.cfg.predict_cls and stats.cls_unit_mean is not None:
            cls = stats.cls_unit_mean.expand(order.shape[0], -1)

        def rows(decoder, index: torch.Tensor) -> DecoderOutput | None:
            return None if decoder is None else DecoderOutput(stats.token_unit_mean[index], index, cls)

        out = DiGPTOutput(gen=rows(self.model.gen, gen_index), dis=rows(self.model.dis, dis_index))
        return digpt_loss(out, batch["tokens"], batch.get("cls"))["loss"]

    @property
    def encoder(self):  # a view, not a second registration (checkpoints hold each tensor once)
        return self.model.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


@register_objective("gen")
class GenObjective(DiGPTObjective):
    """Generative decoder only (the paper's Table 9 ablation without the discriminative decoder)."""

    decoders = ("gen",)
