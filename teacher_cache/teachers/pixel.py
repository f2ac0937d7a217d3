"""``pixel``: normalised patch pixels — MAE's norm-pix targets and iGPT-style pixel targets."""

from __future__ import annotations

import torch

from .base import Teacher, TeacherOutput, TeacherSpec
from .registry import register_teacher


def parse_size(arg: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """``"S/P"`` -> ``(S, P)`` (input size, patch size)."""
    if not arg:
        return default
    try:
        size, patch = (int(p) for p in arg.split("/"))
    except ValueError:
        raise ValueError(f"expected SIZE/PATCH such as 224/16, got {arg!r}") from None
    if size <= 0 or patch <= 0 or size % patch:
        raise ValueError(f"input size {size} must be a positive multiple of patch size {patch}")
    return size, patch


class PixelTeacher(Teacher):
    def __init__(self, size: int, patch: int, norm: bool = True):
        super().__init__()
        self.patch, self.norm = patch, norm
        g = size // patch
        self.spec = TeacherSpec(
            name=f"pixel:{size}/{patch}",
            input_size=size,
            grid=(g, g),
            dim=3 * patch * patch,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            extra={"norm_pix": norm},
        )

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        b, c, s, _ = x.shape
        p, g = self.patch, s // self.patch
        # [B, 3, g, p, g, p] -> [B, g*g, p*p*3]: MAE's patchify layout (row-major patches, HWC inside)
        t = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)
        if self.norm:
            # Per-patch standardisation (MAE norm_pix_loss): removes the local brightness/contrast
            # that otherwise dominates a pixel loss.
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return TeacherOutput(tokens=t)


@register_teacher("pixel", tiny="pixel:32/8")
def pixel(arg: str | None, *, weights: str | None = None, layer: int | None = None, norm: bool = True, **_) -> Teacher:
    """Patch pixels, per-patch normalised: ``pixel:SIZE/PATCH`` (default 224/16)."""
    if weights is not None or layer is not None:
        raise ValueError("the pixel teacher has no weights and no layers")
    size, patch = parse_size(arg, (224, 16))
    return PixelTeacher(size, patch, norm)
