"""Per-patch autoregression in raster order: ``igpt`` (iGPT on ViT patches: normalised-pixel or code
targets) and ``digit`` (DiGIT: next-token cross-entropy over k-means codes of an SSL teacher).

Both reuse D-iGPT's generative decoder with clusters of one patch, so the encoder is causal over
patches and the decoder's query for position t+1 reads the encoder's outputs up to t."""

from __future__ import annotations

import torch.nn.functional as F

from student.digpt_model import gather_targets
from student.orders import get_order

from .base import Objective, StudentConfig, TargetSpec, register_objective
from .digpt import build_digpt


class _NextToken(Objective):
    default_order = "raster"
    needs_codes = False

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None):
        super().__init__()
        name = self.registry_name
        if self.needs_codes and target.kind != "codes":
            raise ValueError(f"objective {name!r} predicts discrete tokens; teacher {target.name} stores features "
                             "(extract a kmeans:<teacher> cache)")
        grid = student.encoder_config().grid_size
        if target.kind == "codes" and tuple(target.grid) != (grid, grid):
            raise ValueError(f"objective {name!r}: code targets need the teacher grid {target.grid} to equal the "
                             f"student grid ({grid}, {grid}) — logits cannot be resampled")
        self.codes = target.kind == "codes"
        self.model = build_digpt(student, target, ("gen",), name, cluster_size=1, predict_cls=False,
                                 target_dim=target.num_codes if self.codes else None, memory_layers=(1.0,))
        self.order = get_order(order or self.default_order)

    def forward(self, batch):
        order = self.order(batch, self.model.cfg.n_clusters, self.model.cluster_targets)
        out = self.model(batch["images"], order)
        pred, index = out["gen"], out["gen_index"]
        if self.codes:
            target = batch["codes"].gather(1, index)
            loss = F.cross_entropy(pred.float().flatten(0, 1), target.flatten())
            acc = (pred.argmax(-1) == target).float().mean()
            return loss, {"loss": loss.detach(), "acc": acc.detach()}
        loss = F.mse_loss(pred.float(), gather_targets(batch["tokens"], index).float())
        return loss, {"loss": loss.detach()}

    @property
    def encoder(self):  # a view, not a second registration (checkpoints hold each tensor once)
        return self.model.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


@register_objective("igpt")
class IGPT(_NextToken):
    """iGPT with ViT patches: regress the next patch's normalised pixels (or classify its code)."""


@register_objective("digit")
class DiGIT(_NextToken):
    """DiGIT: next-token cross-entropy over k-means codes of a teacher's features."""

    needs_codes = True
