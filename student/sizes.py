"""The encoder's architecture (:class:`ViTConfig`) and its named sizes, each with the timm model that loads
its exported weights. No torch here: configs and ``--help`` read this table without building a model.

``timm.create_model(p.timm_name, pretrained=False, num_classes=0, **p.timm_kwargs)`` builds a model whose
state-dict keys equal ``VisionTransformer(p.config).state_dict()`` keys (``num_classes=0``: no head); a
``stem="conv"`` size also needs ``embed_layer=student.vit.timm_conv_stem_embed()``, a class that needs torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STEMS = ("patch", "conv")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of the encoder (named presets: :data:`VIT_SIZES` below)."""

    img_size: int
    """Square input resolution in pixels."""
    patch_size: int
    """Square patch side in pixels; the token grid is ``img_size // patch_size`` per side."""
    embed_dim: int
    """Token width ``D``."""
    depth: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block; must divide ``embed_dim``."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``embed_dim``."""
    qkv_bias: bool = True
    """Bias on the qkv projection (True in timm's and D-iGPT's ViTs)."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block, linearly from 0 (D-iGPT pretrains without it)."""
    sincos_pos_embed: bool = True
    """Fixed, frozen 2-D sin-cos position embedding as in MAE/D-iGPT pretraining; False: learned."""
    in_chans: int = 3
    """Input channels."""
    stem: str = "patch"
    """Patch embedding: ``patch``, one strided ``patch x patch`` convolution (the paper's ViTs); ``conv``,
    ``log2(patch)`` 3x3 stride-2 convolutions with BatchNorm and ReLU, then a 1x1 projection (Xiao et al.,
    "Early Convolutions Help Transformers See Better", 2021). The convolutional stem is the inductive bias
    that lets a small ViT learn shapes from a CPU-sized budget (LEARNING.md measures it); same token
    grid, same sequence, every objective and order unchanged."""

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"ViTConfig.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.sincos_pos_embed and self.embed_dim % 4:
            raise ValueError(f"ViTConfig.embed_dim {self.embed_dim} must be divisible by 4 for sincos_pos_embed")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"ViTConfig.drop_path must be in [0, 1), got {self.drop_path}")
        if self.stem not in STEMS:
            raise ValueError(f"ViTConfig.stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViTConfig.stem 'conv' needs a power-of-two patch_size >= 2, got {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


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
