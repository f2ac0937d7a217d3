"""DiGIT's autoregressive model (Zhu et al., NeurIPS 2024, "Stabilize the latent space for image
autoregressive modeling"): a causal transformer that reads an image's *discrete tokens* — k-means codes of
a self-supervised teacher's patch features (DINOv2 in the paper; any ``kmeans:<teacher>`` cache here) —
and predicts the next one, in raster order. No pixels go in: the code sequence is the model's input and
its target, as in a language model.

    codes [B, N] --shift right, BOS first--> embed + position --causal blocks--> norm --> head --> logits [B, N, K]

Representation. The paper probes this model's own features (iGPT's protocol: an intermediate layer,
average-pooled over positions). Its input at probe time is the code sequence of the probe image, made
by the same tokenizer (teacher + k-means codebook) from the image. That is what :class:`CodeFeatureEncoder`
does: the probe's evaluation view (the centred square, at the tokenizer's input size) goes through the
tokenizer rebuilt from the cache's recorded config (its weights fingerprint checked against the run's),
and the codes through the trained model. The cache's stored codes cannot serve: they belong to the
*training* views (random crops) of the *training* shards, while a probe reads centred views, of
validation shards too.

Sizes come from the student presets (width, depth, heads); the sequence is the tokenizer's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from student.attention import ATTN_IMPLS, AttnMask
from student.vit import LN_EPS, Block, ViTConfig


class CodeGPT(nn.Module):
    """Causal transformer over ``seq_len`` codes from a vocabulary of ``num_codes`` (+1 start token)."""

    def __init__(self, cfg: ViTConfig, num_codes: int, seq_len: int, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if num_codes < 2 or seq_len < 2:
            raise ValueError(f"CodeGPT needs >= 2 codes and a sequence of >= 2, got {num_codes} and {seq_len}")
        self.cfg, self.num_codes, self.seq_len = cfg, num_codes, seq_len
        d = cfg.embed_dim
        self.embed = nn.Embedding(num_codes + 1, d)  # id num_codes is the start token (BOS)
        # Learned positions over the raster sequence (iGPT, GPT-2): nothing here is 2-D but the order.
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, d))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r, attn_impl) for r in rates)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, num_codes)
        self.mask = AttnMask.causal()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` codes -> ``[B, N]`` inputs: the start token, then every code but the last, so
        position ``t`` has read codes ``< t`` and predicts code ``t``."""
        if codes.ndim != 2 or codes.shape[1] != self.seq_len:
            raise ValueError(f"CodeGPT expects codes [B, {self.seq_len}], got {tuple(codes.shape)}")
        bos = codes.new_full((codes.shape[0], 1), self.num_codes)
        return torch.cat([bos, codes[:, :-1]], dim=1)

    def forward_features(
        self, codes: torch.Tensor, return_layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``codes [B, N]`` -> final normed states ``[B, N, D]`` and ``{i: output of blocks[i]}``."""
        wanted = set(return_layers)
        x = self.embed(self.inputs(codes)) + self.pos_embed
        layers = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.mask)
            if i in wanted:
                layers[i] = x
        return self.norm(x), layers

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, N]`` -> next-code logits ``[B, N, num_codes]`` (row ``t`` predicts code ``t``)."""
        return self.head(self.forward_features(codes)[0])

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


@dataclass(frozen=True)
class CodeProbeShape:
    """What the probe reads from an encoder's ``cfg``."""

    img_size: int
    """Pixels per side the probe hands in: the tokenizer's own input size."""
    depth: int
    """Blocks of the code model (one probe row each, plus the final norm)."""
    embed_dim: int
    """Feature width."""


class CodeFeatureEncoder(nn.Module):
    """A trained :class:`CodeGPT` behind its tokenizer, with the probe's encoder interface:
    ``[B, 3, S, S]`` pixels in [0, 1] at the tokenizer's input size -> per-block token sequences.

    Each returned sequence is ``[B, N, D]``: row 0 is the last position (the one that has read the whole
    input, a causal model's summary: what ``pool=cls`` reads), rows 1.. are the positions that have read at
    least one code (``pool=mean`` averages them, iGPT's and DiGIT's probe). The start-token position is
    left out: it reads only itself and is the same for every image."""

    def __init__(self, gpt: CodeGPT, tokenizer: nn.Module):
        super().__init__()
        self.gpt, self.tokenizer = gpt.eval(), tokenizer.eval()
        self.cfg = CodeProbeShape(tokenizer.spec.input_size, gpt.cfg.depth, gpt.cfg.embed_dim)
        self.norm = gpt.norm

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(images).tokens.long()

    def forward_intermediates(self, images: torch.Tensor) -> list[torch.Tensor]:
        _, layers = self.gpt.forward_features(self.codes(images), range(self.cfg.depth))
        return [torch.cat([h[:, -1:], h[:, 1:]], dim=1) for h in (layers[i] for i in range(self.cfg.depth))]


def load_code_probe_encoder(run: str, random_init: bool = False, seed: int = 0) -> CodeFeatureEncoder:
    """RUN's code model (or, with ``random_init``, a seeded random one of its shape: the probe's floor)
    behind the tokenizer its cache records. The cache must still exist; the tokenizer rebuilt from its
    config must have the weights fingerprint the run was trained against."""
    from teacher_cache.config import TeacherConfig
    from teacher_cache.store import open_root, tokenizer_info
    from teacher_cache.teachers import build_teacher

    from .export import encoder_state_dict, run_config

    cfg = run_config(run)
    cache, name, want = cfg["train"]["data"]["cache"], cfg["cache"]["tokenizer"], cfg["cache"]["fingerprint"]
    try:
        root = open_root(cache)
        info = tokenizer_info(root, name)
        codebook = torch.from_numpy(np.asarray(root[name]["codebook"][:]))
    except Exception as e:  # gone, moved or rewritten: say which cache the run needs
        raise ValueError(
            f"run {run} (objective digit) reads codes made by tokenizer {name!r} of cache {cache}, "
            f"which could not be opened ({type(e).__name__}: {e}); the probe rebuilds that tokenizer "
            "to turn probe images into codes — restore the cache or re-extract it"
        ) from None
    tokenizer = build_teacher(TeacherConfig(**info.attrs["teacher_config"]), codebook)
    if tokenizer.fingerprint() != want:
        raise ValueError(
            f"run {run}: tokenizer {name!r} rebuilt from cache {cache} has weights "
            f"{tokenizer.fingerprint()[:12]}, the run was trained on {want[:12]}; re-extract the cache "
            "with the run's teacher"
        )
    target = cfg["target"]
    gpt_cfg = ViTConfig(**cfg["encoder"])
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG stream is untouched
        torch.manual_seed(seed)
        gpt = CodeGPT(gpt_cfg, int(target["num_codes"]), int(target["grid"][0]) * int(target["grid"][1]))
    if not random_init:
        gpt.load_state_dict(encoder_state_dict(run), strict=True)
    return CodeFeatureEncoder(gpt, tokenizer)
