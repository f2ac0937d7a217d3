"""Named encoder sizes, each with the timm model that loads its exported weights.

``timm.create_model(p.timm_name, pretrained=False, num_classes=0, **p.timm_kwargs)`` builds a model whose
state-dict keys equal ``VisionTransformer(p.config).state_dict()`` keys (``num_classes=0``: no head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from student.vit import ViTConfig, timm_conv_stem_embed


@dataclass(frozen=True)
class ViTPreset:
    config: ViTConfig
    """The encoder architecture."""
    timm_name: str
    """timm model with the same architecture (standard sizes) or the closest one to override."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides that make ``timm_name`` match ``config`` exactly (empty for standard sizes)."""


def _nonstandard(cfg: ViTConfig, timm_name: str) -> ViTPreset:
    kwargs = {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
    }
    if cfg.stem == "conv":  # timm has no conv-stem ViT: the stem goes in as its patch-embedding layer
        kwargs["embed_layer"] = timm_conv_stem_embed()
    return ViTPreset(cfg, timm_name, kwargs)


VIT_SIZES: dict[str, ViTPreset] = {
    # A few seconds on a laptop CPU: 4x4 patch grid.
    "tiny-test": _nonstandard(ViTConfig(32, 8, 32, 4, 2), "vit_tiny_patch16_224"),
    # 8x8 grid, so 2x2 clusters of 4x4 patches mirror the official 2x2 of 7x7.
    "small-cpu": _nonstandard(ViTConfig(64, 8, 128, 6, 4), "vit_small_patch16_224"),
    # The demo's student: as small-cpu's grid, narrower and shallower, so two students train in minutes;
    # with the convolutional stem, without which it learns no shape in a CPU budget (LEARNING.md).
    "demo-cpu": _nonstandard(ViTConfig(64, 8, 96, 4, 3, stem="conv"), "vit_tiny_patch16_224"),
    "vit_tiny": ViTPreset(ViTConfig(224, 16, 192, 12, 3), "vit_tiny_patch16_224"),
    "vit_small": ViTPreset(ViTConfig(224, 16, 384, 12, 6), "vit_small_patch16_224"),
    "vit_base": ViTPreset(ViTConfig(224, 16, 768, 12, 12), "vit_base_patch16_224"),
    "vit_large": ViTPreset(ViTConfig(224, 16, 1024, 24, 16), "vit_large_patch16_224"),
}


def list_vit_sizes() -> list[str]:
    return list(VIT_SIZES)


def vit_preset(name: str) -> ViTPreset:
    if name not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {name!r}; known: {', '.join(VIT_SIZES)}")
    return VIT_SIZES[name]


def timm_kwargs_for(cfg: ViTConfig, num_classes: int = 0) -> dict[str, Any]:
    """Full architecture kwargs for ``timm.create_model`` of any ViT family name, for any ``cfg``
    (robust to overrides that a preset's own ``timm_kwargs`` would not know about). JSON-serialisable:
    a ``stem='conv'`` config also needs ``embed_layer=timm_conv_stem_embed()``, which the caller adds."""
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "in_chans": cfg.in_chans,
        "num_classes": num_classes,
    }


def vit_config(name: str, **overrides: Any) -> ViTConfig:
    """The preset's config with ``overrides`` (e.g. ``drop_path=0.1``) applied."""
    return dataclasses.replace(vit_preset(name).config, **overrides)
