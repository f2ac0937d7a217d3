"""A plain ViT encoder whose tokens can be run in any order under a block-causal mask.

State-dict names match timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``
with a class position, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so the
encoder's weights load into ``timm.create_model(<preset.timm_name>, num_classes=0, **preset.timm_kwargs)``
with no missing or unexpected keys (``student/sizes.py`` names the timm model for every size).

Ordering: ``embed`` adds position embeddings to every token *before* ``forward_features`` gathers the patch
tokens into the requested order, so gathering is a pure permutation (or selection) of rows and nothing
about where a patch came from is lost; the class token stays first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from student.attention import ATTN_IMPLS, Attention, AttnMask
from student.sizes import STEMS as STEMS  # re-exported: the encoder's stems, for callers that build one
from student.sizes import ViTConfig

LN_EPS = 1e-6  # timm's ViT (and D-iGPT's encoder/decoder blocks) use LayerNorm(eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[(1 +) grid*grid, dim]``, raster order; the class row is zeros.

    First half of the channels encodes the column, second half the row (as MAE's numpy version does).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> nn.Sequential:
    """``log2(patch_size)`` 3x3 stride-2 conv-BN-ReLU stages (widths doubling up to ``embed_dim``), then a
    1x1 conv to ``embed_dim``: the same ``img/patch`` token grid as a patch projection."""
    n = patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    c = in_chans
    for i in range(n):
        w = max(8, embed_dim >> (n - 1 - i))
        layers += [nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    layers.append(nn.Conv2d(c, embed_dim, 1))
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.stem == "conv":
            self.proj: nn.Module = conv_stem(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        else:
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, D]`` in raster order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block with timm's parameter names."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: AttnMask | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder: ``embed`` -> optional gather into an order -> masked blocks -> ``norm``."""

    def __init__(self, cfg: ViTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.embed_dim))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # timm's linear rule
        self.blocks = nn.ModuleList(Block(cfg, r, attn_impl) for r in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=LN_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE/D-iGPT init: frozen sin-cos positions, xavier linears and patch projection, zero cls token."""
        if self.cfg.sincos_pos_embed:
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.embed_dim, self.cfg.grid_size)[None])
            self.pos_embed.requires_grad_(False)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.patch_embed.modules():  # MAE: the patch projection initialised like a linear layer
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, p*p*C]`` raster patches, channels last within a patch (MAE)."""
        p, g = self.cfg.patch_size, self.cfg.grid_size
        x = imgs.reshape(imgs.shape[0], imgs.shape[1], g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(imgs.shape[0], g * g, -1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 1+N, D]``: class token first, position embedding added to every row."""
        return self.embed_patches(self.patch_embed(x))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` patch embeddings, all ``N`` in raster order -> ``[B, 1+N, D]``: class token first,
        position embedding added to every row. The second half of :meth:`embed`, for a caller that edits the
        patch embeddings first (the ``masked`` objective's mask token, which so gets its patch's position)."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    @staticmethod
    def gather(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Reorder patch rows: ``tokens [B, 1+N, D]``, ``order [B, M]`` patch indices -> ``[B, 1+M, D]``."""
        patches = tokens[:, 1:].gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        return torch.cat([tokens[:, :1], patches], dim=1)

    def forward_features(
        self,
        x: torch.Tensor,
        order: torch.Tensor | None = None,
        mask: AttnMask | None = None,
        return_layers: Sequence[int] = (),
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Encode images.

        ``x: [B, C, H, W]``; ``order: [B, M]`` raster indices of the patches to keep, in sequence order
        (``M <= N``; None: all patches in raster order); ``mask`` applies to the ``1+M`` sequence (class
        token first). Returns the final tokens ``[B, 1+M, D]`` (after ``norm`` unless ``final_norm`` is
        False) and ``{i: output of blocks[i]}`` for each ``i`` in ``return_layers`` (0-based, before norm).
        """
        x = self.embed(x)
        if order is not None:
            x = self.gather(x, order)
        return self.run_blocks(x, mask, return_layers, final_norm)

    def run_blocks(
        self,
        x: torch.Tensor,
        mask: AttnMask | None = None,
        return_layers: Sequence[int] = (),
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The blocks (and ``norm``) on tokens already embedded: ``x: [B, 1+M, D]``, class token first (from
        :meth:`embed` or :meth:`embed_patches`, gathered or not). Returns what :meth:`forward_features`
        returns, which is this after ``embed`` and ``gather``."""
        wanted = set(return_layers)
        if any(not 0 <= i < len(self.blocks) for i in wanted):
            raise ValueError(f"return_layers {sorted(wanted)} out of range for depth {len(self.blocks)}")
        layers = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask)
            if i in wanted:
                layers[i] = x
        return (self.norm(x) if final_norm else x), layers

    def forward_intermediates(
        self, x: torch.Tensor, order: torch.Tensor | None = None, mask: AttnMask | None = None
    ) -> list[torch.Tensor]:
        """Every block's output ``[B, 1+M, D]`` (un-normed), for per-layer probes.

        Unlike timm's method of the same name this returns token sequences, class token first.
        """
        _, layers = self.forward_features(x, order, mask, range(len(self.blocks)), final_norm=False)
        return [layers[i] for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 1+N, D]`` normed tokens (timm's ``forward_features``)."""
        return self.forward_features(x)[0]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


def timm_conv_stem_embed():
    """timm ``embed_layer`` for a ``stem='conv'`` encoder: timm's ``PatchEmbed`` with :func:`conv_stem` as its
    ``proj``, so an exported conv-stem student loads into ``timm``'s ``VisionTransformer`` key for key
    (``timm.create_model(..., embed_layer=timm_conv_stem_embed())``)."""
    from timm.layers import PatchEmbed as TimmPatchEmbed

    class ConvStemPatchEmbed(TimmPatchEmbed):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **kwargs):
            super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
            p = patch_size if isinstance(patch_size, int) else patch_size[0]
            self.proj = conv_stem(in_chans, embed_dim, p)

    return ConvStemPatchEmbed
