"""The probe's short end-to-end fine-tune: encoder + head, layer-wise lr decay (MAE's recipe), random
resized crops and flips of the held-in-memory views."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from student.vit import VisionTransformer
from teacher_cache.runtime import progress_bar, resolve_device

from .probe_features import pool_tokens

if TYPE_CHECKING:
    from .config import ProbeConfig


class Classifier(nn.Module):
    """Encoder -> final norm -> pool -> linear head."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.cfg.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> logits ``[B, C]``."""
        return self.head(pool_tokens(self.encoder(x), self.pool))


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = decay ** (depth + 1 - layer_id)``: embeddings are layer 0, block
    ``i`` layer ``i + 1``, the final norm and head ``depth + 1`` (MAE's ``param_groups_lrd``)."""
    depth = model.encoder.cfg.depth
    skip = {f"encoder.{n}" for n in model.encoder.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            layer_id = 0
        elif name.startswith("encoder.blocks."):
            layer_id = int(name.split(".")[2]) + 1
        else:
            layer_id = depth + 1
        no_wd = p.ndim <= 1 or name in skip
        g = groups.setdefault(
            (layer_id, no_wd),
            {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": decay ** (depth + 1 - layer_id),
                "lr": lr,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def augment(views: torch.Tensor, size: int, min_scale: float = 0.35) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float [0, 1]: per-sample random resized crop (area fraction in
    ``[min_scale, 1]``) and horizontal flip."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True)
    tf = v2.Compose([crop, v2.RandomHorizontalFlip()])
    return torch.stack([tf(v) for v in views]).float().div_(255.0)  # v2 on a batch would share one crop


def finetune_model(cfg: ProbeConfig, enc: VisionTransformer, num_classes: int) -> Classifier:
    """A copy of ``enc`` (with the fine-tune's drop path) behind a new head, every parameter trainable."""
    ft_enc = VisionTransformer(dataclasses.replace(enc.cfg, drop_path=cfg.drop_path))
    ft_enc.load_state_dict(enc.state_dict())
    # The sin-cos position embedding is fixed in pretraining and trained here, as MAE's and D-iGPT's
    # fine-tuning load it into timm's (trainable) pos_embed; it sits in layer 0 with no weight decay.
    ft_enc.pos_embed.requires_grad_(True)
    return Classifier(ft_enc, num_classes, cfg.pool)


def finetune_scores(
    cfg: ProbeConfig,
    enc: VisionTransformer,
    train_views: torch.Tensor,
    train_y: torch.Tensor,
    test_views: torch.Tensor,
    num_classes: int,
    progress: bool = True,
) -> torch.Tensor:
    """Fine-tune ``enc`` + a head on the training views; logits ``[M, C]`` for ``test_views``."""
    from student.train import lr_schedule

    device = resolve_device(cfg.device, "ProbeConfig.device")
    model = finetune_model(cfg, enc, num_classes).to(device)
    groups = layer_decay_groups(model, cfg.finetune_lr, cfg.finetune_weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.finetune_lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    lrs = lr_schedule(cfg.finetune_epochs * steps_per_epoch, cfg.finetune_lr, cfg.warmup, 0.0)
    size, it = enc.cfg.img_size, 0
    bar = progress_bar(total=len(lrs), desc="finetune", unit="step", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.finetune_epochs):
            model.train()
            for idx in torch.randperm(len(train_y)).split(cfg.batch_size):
                for g in opt.param_groups:
                    g["lr"] = float(lrs[it]) * g["lr_scale"]
                x, y = augment(train_views[idx], size, cfg.crop_scale).to(device), train_y[idx].to(device)
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    with torch.inference_mode():
        return torch.cat(
            [model(v.float().div(255.0).to(device)).float().cpu() for v in test_views.split(cfg.batch_size)]
        )
