"""D-iGPT (Ren et al., ICML 2024): a ViT run autoregressively over clusters of patches, with a generative
and a discriminative decoder that predict a teacher's per-patch tokens.

What the official code (OliverRensu/D-iGPT, ``DiGPT_torch/models_digpt.py`` and ``vit.py``) does, and
what this file keeps:

- **Clusters.** The 14x14 patch grid (224/16) is cut into a 2x2 arrangement of 7x7-patch clusters
  (49 patches each), raster order inside a cluster. Each sample gets its own random permutation of the 4
  clusters; the encoder sees the first 3 (147 patches) plus the class token = 148 tokens; the last
  cluster is never encoded. Here ``cluster_size`` (patches per side) makes this a config;
  ``cluster_size=1`` gives per-patch order.
- **Position before order.** Patch embedding + (fixed, frozen sin-cos) position embedding, then the
  gather into cluster order, so one mask serves every sample.
- **One mask for everything.** The official sequence is ``[cluster_1 .. cluster_3, cls]`` with a
  block-causal mask whose last row/column is a reflect-pad copy of the last cluster's: a token of
  cluster t attends to clusters <= t; the class token attends to all visible clusters and only the last
  visible cluster (and itself) attends to it. The *same* 148x148 mask is used for encoder
  self-attention, decoder self-attention and decoder cross-attention. We keep the class token first
  (timm layout) with ``AttnMask(prefix="last")``, which is that rule.
- **Decoders.** Two decoders of identical shape, separate weights (official ViT-B: 2 blocks, width
  1024, 32 heads, MLP ratio 4). Queries: a learned ``[Gen]``/``[Dis]`` token plus the fixed sin-cos
  decoder position of the *target* patch; a class query (token + class position) sits at the class
  slot. Generative slot t holds the queries for cluster t+1 and, through the shared mask, reads encoder
  clusters <= t; discriminative slot t predicts cluster t itself from clusters <= t. Each decoder block:
  masked self-attention over the queries, masked cross-attention (query norm and memory norm), MLP.
- **Memory.** Outputs of encoder blocks 6, 8, 10, 12 (1-based; there is no final encoder norm in
  pretraining), each layer-normed, concatenated along channels (4*D) and projected by one Linear to
  ``decoder_depth * decoder_dim``; decoder block l reads its own slice. Each decoder has its own norm and
  projection. Official quirk, kept by default (``share_memory_norm``): ``ModuleList([LayerNorm(D)] * 4)``
  repeats *one* LayerNorm (eps 1e-5), so the four layers share it. The official reshape hands block l
  the channels ``l::depth``; we hand it a contiguous slice (same function class, permuted rows).
- **Teacher grid.** The official teacher is OpenCLIP ViT-H/14 at 224 (16x16 tokens, ``ln_post`` and
  ``proj`` applied to every token, D=1024). Each cluster's 7x7 predictions are bilinearly resized
  (``align_corners=False``) to the cluster's 8x8 share of the teacher grid; targets are cut into the same
  2x2 clusters and permuted with the same order. Generative targets: clusters 2..4 in order;
  discriminative: clusters 1..3.
- **Loss.** ``2 - 2 cos`` per token. The class predictions of both decoders target the teacher's class
  token, counted as one more token in each decoder's mean (3*64 + 1 rows); total = gen + dis.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from student.attention import ATTN_IMPLS, Attention, AttnMask, CrossAttention
from student.sizes import vit_config
from student.vit import LN_EPS, VisionTransformer, ViTConfig, sincos_pos_embed_2d


@dataclass(frozen=True)
class DiGPTConfig:
    """D-iGPT architecture; the defaults are the official ViT-B/16 recipe."""

    encoder: ViTConfig = field(default_factory=lambda: vit_config("vit_base"))
    """The ViT encoder (``student/sizes.py`` has named presets)."""
    cluster_size: int = 7
    """Cluster side in patches; must divide the patch grid (7 on 14x14 -> 2x2 clusters; 1 -> per patch)."""
    decoder_depth: int = 2
    """Blocks per decoder (the paper's Table 8: 2 beats 1 and 4)."""
    decoder_dim: int = 1024
    """Decoder width (Table 8: 1024 beats 512 and 768)."""
    decoder_heads: int = 32
    """Decoder attention heads (official: 32, i.e. head dim 32)."""
    decoder_mlp_ratio: float = 4.0
    """Decoder MLP hidden width as a multiple of ``decoder_dim``."""
    memory_layers: tuple[float, ...] = (6 / 12, 8 / 12, 10 / 12, 12 / 12)
    """Encoder blocks feeding the memory, as fractions of depth (official: blocks 6/8/10/12 of 12)."""
    share_memory_norm: bool = True
    """One LayerNorm shared by all memory layers, as the official ``[LayerNorm] * 4`` does."""
    target_dim: int = 1024
    """Teacher token width (official OpenCLIP ViT-H/14: 1024)."""
    target_grid: tuple[int, int] = (16, 16)
    """Teacher token grid ``(h, w)``; each side must be divisible by the number of clusters per side."""
    predict_cls: bool = True
    """Both decoders also predict the teacher's class token from a class query."""
    decoders: tuple[str, ...] = ("gen", "dis")
    """Which decoders to build: both (D-iGPT), ``("gen",)`` (generative only, the paper's Table 9 row)."""
    cls_mode: Literal["last_cluster", "prefix"] = "last_cluster"
    """``last_cluster``: official, the class token joins the last visible cluster. ``prefix``: it is
    cluster -1 (seen by all, sees only itself) and so carries no image content."""

    def __post_init__(self) -> None:
        grid = self.encoder.grid_size
        if self.cluster_size < 1 or grid % self.cluster_size:
            raise ValueError(f"DiGPTConfig.cluster_size {self.cluster_size} must divide the patch grid {grid}")
        if self.n_clusters < 2:
            raise ValueError(f"DiGPTConfig.cluster_size {self.cluster_size} leaves one cluster; need >= 2")
        if len(self.target_grid) != 2 or any(t < 1 or t % self.clusters_per_side for t in self.target_grid):
            raise ValueError(
                f"DiGPTConfig.target_grid {self.target_grid}: each side must be a positive "
                f"multiple of the {self.clusters_per_side} clusters per side"
            )
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(
                f"DiGPTConfig.decoder_dim {self.decoder_dim} must be divisible by decoder_heads "
                f"{self.decoder_heads} and by 4 (sin-cos positions)"
            )
        if self.decoder_depth < 1 or self.target_dim < 1:
            raise ValueError("DiGPTConfig.decoder_depth and target_dim must be >= 1")
        if not self.memory_layers or any(not 0 < f <= 1 for f in self.memory_layers):
            raise ValueError(f"DiGPTConfig.memory_layers {self.memory_layers}: need fractions in (0, 1]")
        if not self.decoders or any(d not in ("gen", "dis") for d in self.decoders):
            raise ValueError(f"DiGPTConfig.decoders must be a non-empty subset of ('gen', 'dis'), got {self.decoders}")
        if self.cls_mode not in ("last_cluster", "prefix"):
            raise ValueError(f"DiGPTConfig.cls_mode must be 'last_cluster' or 'prefix', got {self.cls_mode!r}")
        if self.predict_cls and self.cls_mode == "prefix":
            raise ValueError(
                "DiGPTConfig.predict_cls needs cls_mode='last_cluster': a prefix class token "
                "attends only to itself and carries no image content"
            )

    @property
    def clusters_per_side(self) -> int:
        return self.encoder.grid_size // self.cluster_size

    @property
    def n_clusters(self) -> int:
        return self.clusters_per_side**2

    @property
    def target_share(self) -> tuple[int, int]:
        """Teacher tokens per cluster ``(h, w)`` (official: 8x8)."""
        return self.target_grid[0] // self.clusters_per_side, self.target_grid[1] // self.clusters_per_side

    @property
    def memory_blocks(self) -> tuple[int, ...]:
        """0-based encoder block indices of ``memory_layers`` (official ViT-B: 5, 7, 9, 11)."""
        depth = self.encoder.depth
        return tuple(max(1, round(f * depth)) - 1 for f in self.memory_layers)


@dataclass(frozen=True)
class DecoderOutput:
    """What one decoder predicts for a batch, and for which teacher tokens (``R = (n-1)*sh*sw`` rows)."""

    pred: torch.Tensor
    """``[B, R, target_dim]`` predictions on the teacher grid, cluster by cluster in the decoder's order."""
    index: torch.Tensor
    """``[B, R]`` raster index into the teacher tokens ``[B, h_t*w_t, D]`` of each row's target
    (:func:`gather_targets`)."""
    cls: torch.Tensor | None = None
    """``[B, target_dim]`` the class-token prediction; None when the model does not predict it."""


@dataclass(frozen=True)
class DiGPTOutput:
    """:meth:`DiGPT.forward`'s result: one :class:`DecoderOutput` per decoder, None for a decoder the model
    was built without (``DiGPTConfig.decoders``)."""

    gen: DecoderOutput | None = None
    """Generative decoder: slot t predicts cluster t+1 (clusters 2..n of the order)."""
    dis: DecoderOutput | None = None
    """Discriminative decoder: slot t predicts cluster t itself (clusters 1..n-1)."""

    def decoders(self) -> Iterator[tuple[str, DecoderOutput]]:
        """``(name, output)`` for each decoder present, ``gen`` first; the name is what losses log it as."""
        for name, out in (("gen", self.gen), ("dis", self.dis)):
            if out is not None:
                yield name, out


def cluster_index(h: int, w: int, per_side: int) -> torch.Tensor:
    """``[per_side**2, (h/per_side) * (w/per_side)]``: raster indices into an ``h x w`` grid of the cells of
    each cluster; clusters in raster order over the ``per_side x per_side`` arrangement, raster inside."""
    idx = torch.arange(h * w).view(per_side, h // per_side, per_side, w // per_side)
    return idx.permute(0, 2, 1, 3).reshape(per_side * per_side, -1)


def random_cluster_order(
    batch: int, n_clusters: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uniformly random permutation of the clusters per sample, ``[batch, n_clusters]`` int64."""
    return torch.rand(batch, n_clusters, generator=generator).argsort(dim=1).to(device)


class DecoderBlock(nn.Module):
    """Masked self-attention over the queries, masked cross-attention into the memory, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_impl: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn = Attention(dim, heads, impl=attn_impl)
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_mem = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_attn = CrossAttention(dim, heads, impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, memory, self_mask: AttnMask, cross_mask: AttnMask) -> torch.Tensor:
        """``x: [B, L, D]`` queries, ``memory: [B, S, D]`` -> ``[B, L, D]``."""
        x = x + self.self_attn(self.norm1(x), self_mask)
        x = x + self.cross_attn(self.norm_q(x), self.norm_mem(memory), cross_mask)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """One D-iGPT decoder (``[Gen]`` or ``[Dis]``): position-tagged learned queries read a memory built
    from several encoder layers and predict teacher tokens."""

    def __init__(self, cfg: DiGPTConfig, attn_impl: str):
        super().__init__()
        enc_dim, n_mem = cfg.encoder.embed_dim, len(cfg.memory_layers)
        # default eps (1e-5), as the official memory norms
        self.memory_norms = nn.ModuleList(nn.LayerNorm(enc_dim) for _ in range(1 if cfg.share_memory_norm else n_mem))
        self.memory_proj = nn.Linear(n_mem * enc_dim, cfg.decoder_depth * cfg.decoder_dim)
        self.query = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        pos = sincos_pos_embed_2d(cfg.decoder_dim, cfg.encoder.grid_size, cls_token=True)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp_ratio, attn_impl)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=LN_EPS)
        self.head = nn.Linear(cfg.decoder_dim, cfg.target_dim)

    def memory(self, layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder layer outputs, each ``[B, S, D_enc]`` -> one memory ``[B, S, D_dec]`` per decoder block."""
        normed = [self.memory_norms[i % len(self.memory_norms)](x) for i, x in enumerate(layers)]
        return list(self.memory_proj(torch.cat(normed, dim=-1)).chunk(len(self.blocks), dim=-1))

    def queries(self, targets: torch.Tensor, with_cls: bool) -> torch.Tensor:
        """``targets: [B, M]`` raster patch indices -> ``[B, (1+)M, D_dec]`` learned token + target position."""
        pos = self.pos_embed[1:][targets]
        if with_cls:
            pos = torch.cat([self.pos_embed[:1].expand(targets.shape[0], 1, -1), pos], dim=1)
        return self.query + pos

    def features(self, layers, targets, self_mask: AttnMask, cross_mask: AttnMask, with_cls: bool) -> torch.Tensor:
        """-> ``[B, (1+)M, D_dec]`` normed decoder outputs (what :attr:`head` reads), class row first."""
        x = self.queries(targets, with_cls)
        for block, memory in zip(self.blocks, self.memory(layers), strict=True):
            x = block(x, memory, self_mask, cross_mask)
        return self.norm(x)

    def forward(self, layers, targets, self_mask: AttnMask, cross_mask: AttnMask, with_cls: bool) -> torch.Tensor:
        """-> ``[B, (1+)M, target_dim]`` predictions on the student grid, class row first if ``with_cls``."""
        return self.head(self.features(layers, targets, self_mask, cross_mask, with_cls))


class DiGPT(nn.Module):
    """Encoder + generative and discriminative decoders; see the module docstring."""

    def __init__(self, cfg: DiGPTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.encoder, attn_impl)
        # Pretraining reads intermediate blocks; the final norm stays an untrained identity LN, frozen so
        # DDP sees no parameter without a gradient.
        self.encoder.norm.requires_grad_(False)
        self.gen = Decoder(cfg, attn_impl) if "gen" in cfg.decoders else None
        self.dis = Decoder(cfg, attn_impl) if "dis" in cfg.decoders else None
        g, k = cfg.encoder.grid_size, cfg.clusters_per_side
        self.register_buffer("cluster_patches", cluster_index(g, g, k), persistent=False)
        self.register_buffer("cluster_targets", cluster_index(*cfg.target_grid, k), persistent=False)
        c2, prefix = cfg.cluster_size**2, ("last" if cfg.cls_mode == "last_cluster" else "own")
        self.enc_mask = AttnMask(c2, n_prefix=1, prefix=prefix)
        q_prefix = 1 if cfg.predict_cls else 0
        self.dec_self_mask = AttnMask(c2, n_prefix=q_prefix, prefix=prefix)
        self.dec_cross_mask = AttnMask(c2, n_prefix=1, prefix=prefix, n_query_prefix=q_prefix)
        self.init_decoders()

    def init_decoders(self) -> None:
        """Official init: xavier-uniform linears with zero bias; queries ~ N(0, 0.02) truncated."""
        for dec in (d for d in (self.gen, self.dis) if d is not None):
            for m in dec.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(dec.query, std=0.02)

    def forward_encoder(self, images: torch.Tensor, seen: torch.Tensor) -> list[torch.Tensor]:
        """``images: [B, C, H, W]``, ``seen: [B, M]`` patch indices in order -> memory layers ``[B, 1+M, D]``."""
        blocks = self.cfg.memory_blocks
        _, layers = self.encoder.forward_features(images, seen, self.enc_mask, blocks, final_norm=False)
        return [layers[i] for i in blocks]

    def to_target_grid(self, pred: torch.Tensor) -> torch.Tensor:
        """``[B, V*c*c, D]`` cluster-major student-grid predictions -> ``[B, V*sh*sw, D]`` on each cluster's
        share of the teacher grid, bilinear per cluster (official 7x7 -> 8x8), raster inside a cluster."""
        c, (sh, sw) = self.cfg.cluster_size, self.cfg.target_share
        if (sh, sw) == (c, c):
            return pred
        b, n, d = pred.shape
        v = n // (c * c)
        x = pred.reshape(b * v, c, c, d).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1).reshape(b, v * sh * sw, d)

    def predict_on_target_grid(self, head: nn.Linear, feats: torch.Tensor) -> torch.Tensor:
        """``head`` applied and the result resampled to the teacher grid (:meth:`to_target_grid`), in the cheaper
        order. Both are linear and each resampled token is a convex combination (bilinear weights sum to 1),
        so ``head(resample(x)) == resample(head(x))`` up to rounding: where the teacher's share of a cluster
        has fewer tokens than the student's (the demo: 2x2 of 4x4), resampling first runs the head — and its
        gradient, and the ``[B, M, target_dim]`` buffers — on 4x fewer rows; where it has more (official:
        8x8 of 7x7), the head goes first."""
        c, (sh, sw) = self.cfg.cluster_size, self.cfg.target_share
        if sh * sw < c * c:
            return head(self.to_target_grid(feats))
        return self.to_target_grid(head(feats))

    def target_index(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``order: [B, n_clusters]`` -> ``(gen, dis)``, each ``[B, (n-1)*sh*sw]``: the raster index into the
        teacher tokens of each row the generative decoder (clusters 2..n) and the discriminative decoder
        (clusters 1..n-1) predicts. The one place that says which clusters each decoder targets: the
        objectives' blind baselines read it too, so they score exactly the rows :meth:`forward` predicts."""
        return self.cluster_targets[order[:, 1:]].flatten(1), self.cluster_targets[order[:, :-1]].flatten(1)

    def forward(self, images: torch.Tensor, order: torch.Tensor) -> DiGPTOutput:
        """``images: [B, C, H, W]``; ``order: [B, n_clusters]`` a permutation of cluster ids (raster over the
        cluster arrangement) per sample, e.g. from :func:`random_cluster_order`.

        Returns a :class:`DiGPTOutput`: per decoder, ``[B, (n-1)*sh*sw, target_dim]`` predictions on the
        teacher grid for clusters 2..n (generative) and 1..n-1 (discriminative) in order, the raster index of
        each row's target (:meth:`target_index`) and, with ``predict_cls``, the class prediction.
        """
        if order.shape != (images.shape[0], self.cfg.n_clusters):
            raise ValueError(f"order must be [B, {self.cfg.n_clusters}], got {tuple(order.shape)}")
        patches = self.cluster_patches[order]  # [B, n, c*c]
        seen = patches[:, :-1].flatten(1)
        layers = self.forward_encoder(images, seen)
        gen_index, dis_index = self.target_index(order)
        return DiGPTOutput(
            gen=self.run_decoder(self.gen, layers, patches[:, 1:].flatten(1), gen_index),
            dis=self.run_decoder(self.dis, layers, seen, dis_index),
        )

    def run_decoder(
        self, decoder: Decoder | None, layers: list[torch.Tensor], targets: torch.Tensor, index: torch.Tensor
    ) -> DecoderOutput | None:
        """One decoder on the memory ``layers``: ``targets: [B, M]`` the student-grid patches its queries
        stand for, ``index`` their teacher-grid rows. None when the model has no such decoder.

        Reads ``decoder.features`` then ``decoder.head`` (not ``decoder.forward``), so that the class row
        and the patch rows share one decoder pass and the head can run after the resampling."""
        if decoder is None:
            return None
        feats = decoder.features(layers, targets, self.dec_self_mask, self.dec_cross_mask, self.cfg.predict_cls)
        cls = None
        if self.cfg.predict_cls:
            cls, feats = decoder.head(feats[:, 0]), feats[:, 1:]
        return DecoderOutput(pred=self.predict_on_target_grid(decoder.head, feats), index=index, cls=cls)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {f"{d}.query" for d in self.cfg.decoders}


def loss_cos(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``2 - 2 cos(pred, target)`` over the last dim (the official D-iGPT loss), in fp32."""
    return 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1)


def gather_targets(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens: [B, T, D]`` raster teacher tokens, ``index: [B, R]`` -> ``[B, R, D]``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def digpt_loss(out: DiGPTOutput, tokens: torch.Tensor, cls: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Official weighting: each decoder's loss is the mean of ``loss_cos`` over its rows plus, when the
    model predicted it and ``cls: [B, D]`` is given, its class row as one more token; ``loss = gen + dis``.
    Returns the scalars by the name they are logged as: ``gen``/``dis`` (those present) and ``loss``."""
    losses = {}
    for name, dec in out.decoders():
        per_token = loss_cos(dec.pred, gather_targets(tokens, dec.index))
        if cls is not None and dec.cls is not None:
            per_token = torch.cat([per_token, loss_cos(dec.cls, cls)[:, None]], dim=1)
        losses[name] = per_token.mean()
    losses["loss"] = sum(losses.values())
    return losses
