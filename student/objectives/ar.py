"""Autoregression in raster order: ``next-patch`` (next-patch prediction on ViT patches) and ``digit``
(DiGIT as published).

- ``next-patch`` reads *pixels*: a ViT run causally over patches with D-iGPT's generative decoder (clusters
  of one patch), so the decoder's query for position t+1 reads the encoder's outputs up to t. It regresses
  the next patch's normalised pixels (``pixel`` cache) or classifies the next patch's code (``kmeans:``
  cache: "pixels in, codes out"). It was called ``igpt`` until 2026-12-04; iGPT as published is next-*pixel*
  cross-entropy over a 512-colour palette at 32x32 (openai/image-gpt), which this is not: patch regression
  through a decoder is closer to AIM/SAIM, so it carries a name of its own.
- ``digit`` reads *codes*: DiGIT's GPT over the k-means code sequence itself (code embeddings in, next
  code out, raster order, causal mask; ``student/code_gpt.py``). It never sees pixels; the probe feeds it
  the codes its tokenizer makes of the probe image.
"""

from __future__ import annotations

import torch.nn.functional as F

from student.code_gpt import CodeGPT
from student.digpt_model import gather_targets
from student.orders import get_order

from .base import Objective, StudentConfig, TargetSpec, register_objective
from .digpt import build_digpt


@register_objective("next-patch")
class NextPatch(Objective):
    """Next-patch prediction in raster order: regress the next patch's normalised pixels (or classify its code)."""

    default_order = "raster"

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None):
        super().__init__()
        name = self.registry_name
        grid = student.encoder_config().grid_size
        if target.kind == "codes" and tuple(target.grid) != (grid, grid):
            raise ValueError(
                f"objective {name!r}: code targets need the teacher grid {target.grid} to equal the "
                f"student grid ({grid}, {grid}) — logits cannot be resampled"
            )
        self.target, self.codes = target, target.kind == "codes"
        self.num_codes = target.num_codes if self.codes else 0
        self.model = build_digpt(
            student,
            target,
            ("gen",),
            name,
            cluster_size=1,
            predict_cls=False,
            target_dim=target.num_codes if self.codes else None,
            memory_layers=(1.0,),
        )
        self.order_name, self.order = order, get_order(order or self.default_order)

    def forward(self, batch):
        gen = self.model(batch["images"], self.cluster_order(batch)).gen
        pred, index = gen.pred, gen.index
        if self.codes:
            target = batch["codes"].gather(1, index)
            loss = F.cross_entropy(pred.float().flatten(0, 1), target.flatten())
            acc = (pred.argmax(-1) == target).float().mean()
            return loss, {"loss": loss.detach(), "acc": acc.detach()}
        loss = F.mse_loss(pred.float(), gather_targets(batch["tokens"], index).float())
        return loss, {"loss": loss.detach()}

    def blind_loss(self, batch, stats):
        """Each next token predicted from its position alone: the per-position code frequencies (the
        loss is then the per-position entropy) or the per-position mean target (squared error)."""
        index, _ = self.model.target_index(self.cluster_order(batch))  # the generative decoder's rows
        if self.codes:
            target = batch["codes"].gather(1, index)
            return F.cross_entropy(stats.code_logp[index].flatten(0, 1), target.flatten())
        return F.mse_loss(stats.token_mean[index], gather_targets(batch["tokens"], index).float())

    @property
    def encoder(self):  # a view, not a second registration (checkpoints hold each tensor once)
        return self.model.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


@register_objective("digit")
class DiGIT(Objective):
    """DiGIT (Zhu et al., NeurIPS 2024): a GPT over the image's k-means codes, next-code cross-entropy in
    raster order. ``encoder`` is the code model (``CodeGPT``), sized by the student preset."""

    default_order = "raster"

    def __init__(self, student: StudentConfig, target: TargetSpec, order: str | None):
        super().__init__()
        if target.kind != "codes":
            raise ValueError(
                f"objective 'digit' models a sequence of discrete tokens; teacher {target.name} stores "
                "features (extract a kmeans:<teacher> cache)"
            )
        if order not in (None, "raster"):
            raise ValueError(
                f"objective 'digit' reads its code sequence in raster order, as DiGIT's GPT does; drop "
                f"--order {order} (objective next-patch on a kmeans: cache takes other orders)"
            )
        self.target, self.order_name, self.num_codes = target, order, target.num_codes
        h, w = target.grid
        self.encoder = CodeGPT(student.encoder_config(), target.num_codes, h * w, student.attn_impl)

    def forward(self, batch):
        codes = batch["codes"]
        logits = self.encoder(codes)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        acc = (logits.argmax(-1) == codes).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    def blind_loss(self, batch, stats):
        """Each code predicted from its position alone: the per-position code frequencies, whose
        cross-entropy is the per-position entropy (DiGIT's "unigram" floor, position by position)."""
        codes = batch["codes"]
        logp = stats.code_logp.expand(codes.shape[0], -1, -1)
        return F.cross_entropy(logp.flatten(0, 1), codes.flatten())
