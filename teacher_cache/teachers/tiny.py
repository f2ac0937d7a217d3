"""``random-vit``: a ViT with seeded random weights — no files, no network.

It is the fastest teacher that still has a real transformer's shape, used by tests and as a
"random teacher" baseline (random-feature targets are a known, non-trivial control).
"""

from __future__ import annotations

import torch

from .base import Teacher, TeacherOutput, TeacherSpec
from .pixel import parse_size
from .registry import register_teacher

# Random-weight ViTs at the shapes of the headline teachers: (input size, patch, width, depth, heads).
# ``random-vit:vit_large_14`` costs what CLIP ViT-L/14 costs, with no weights to fetch: for sizing an
# extraction or a training step (bench/extract.py, bench/train.py), never for learning.
SHAPES = {
    "vit_base_16": (224, 16, 768, 12, 12),  # CLIP / DINO ViT-B/16: 14x14 tokens x 768
    "vit_large_14": (224, 14, 1024, 24, 16),  # CLIP / OpenCLIP ViT-L/14: 16x16 tokens x 1024
    "vit_huge_14": (224, 14, 1280, 32, 16),  # OpenCLIP ViT-H/14 trunk: 16x16 tokens x 1280
    "tiny_32_8": (32, 8, 32, 2, 2),  # the default random-vit:32/8
}


class RandomViTTeacher(Teacher):
    def __init__(
        self,
        size: int,
        patch: int,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        seed: int = 0,
        layer: int | None = None,
    ):
        super().__init__()
        import timm

        if layer is not None and not 1 <= layer <= depth:
            raise ValueError(f"layer must be in [1, {depth}], got {layer}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vit = timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=size,
                patch_size=patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                num_classes=0,
            )
        self.layer = layer or depth
        g = size // patch
        shape = next((k for k, v in SHAPES.items() if v == (size, patch, dim, depth, heads)), None)
        self.spec = TeacherSpec(
            name=f"random-vit:{shape}" if shape and shape != "tiny_32_8" else f"random-vit:{size}/{patch}",
            input_size=size,
            grid=(g, g),
            dim=dim,
            has_cls=True,
            layer=layer,
            extra={"seed": seed, "depth": depth, "heads": heads},
        )

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        v = self.vit
        t = v._pos_embed(v.patch_embed(x))
        for blk in v.blocks[: self.layer]:
            t = blk(t)
        t = v.norm(t)
        return TeacherOutput(tokens=t[:, v.num_prefix_tokens :], cls=t[:, 0])


@register_teacher("random-vit", tiny="random-vit:32/8")
def random_vit(
    arg: str | None, *, weights: str | None = None, layer: int | None = None, seed: int = 0, dim: int = 32, **_
) -> Teacher:
    """Seeded random-init ViT: ``random-vit:SIZE/PATCH`` (default 32/8, width 32, 2 blocks), or one of
    :data:`SHAPES` at a headline teacher's cost (``random-vit:vit_large_14``)."""
    if weights is not None:
        raise ValueError("random-vit is defined by its seed; it takes no weights file")
    if arg in SHAPES:
        size, patch, width, depth, heads = SHAPES[arg]
        return RandomViTTeacher(size, patch, dim=width, depth=depth, heads=heads, seed=seed, layer=layer)
    if arg and not arg[:1].isdigit():
        raise ValueError(f"random-vit:{arg}: expected SIZE/PATCH (e.g. 32/8) or one of {', '.join(SHAPES)}")
    size, patch = parse_size(arg, (32, 8))
    return RandomViTTeacher(size, patch, dim=dim, seed=seed, layer=layer)
