"""The teacher interface every tokenizer implements.

A teacher turns a batch of *already replayed* views into per-patch tokens. It owns its own input
normalisation, so callers hand it plain ``[0, 1]`` RGB pixels at ``spec.input_size`` — the exact
pixels the student later sees (at the student's own resolution).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher produces; recorded verbatim in the cache's provenance attributes."""

    name: str
    """Registry name the teacher was created from, e.g. ``openclip:ViT-B-16@openai``."""
    input_size: int
    """Square input resolution the teacher runs at (its own, not the student's)."""
    grid: tuple[int, int]
    """Token grid ``(h, w)``; ``tokens`` has ``h * w`` rows in raster order."""
    dim: int
    """Token width ``D`` (``1`` for code teachers, whose ``tokens`` hold integer codes)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean applied inside the teacher."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation std applied inside the teacher."""
    has_cls: bool = False
    """Whether the teacher also returns a global (class) token."""
    kind: str = "continuous"
    """``continuous`` (float features) or ``codes`` (integer codes into ``num_codes`` entries)."""
    num_codes: int = 0
    """Codebook size for ``kind == 'codes'``; 0 otherwise."""
    layer: int | None = None
    """Which block the tokens come from (``None``: the teacher's default, usually the last)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Teacher-specific facts worth recording (arch, pretrained tag, weights path, ...)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


@dataclass
class TeacherOutput:
    """Per-view teacher targets.

    ``tokens``: ``[B, h*w, D]`` float (continuous teachers) or ``[B, h*w]`` int64 (code teachers).
    ``cls``: ``[B, D]`` global token or ``None``.
    """

    tokens: torch.Tensor
    cls: torch.Tensor | None = None


class Teacher(nn.Module):
    """Base class: subclasses set ``self.spec`` and implement :meth:`encode`."""

    spec: TeacherSpec

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.spec.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        """``x``: normalised images ``[B, 3, S, S]`` with ``S == spec.input_size``."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> TeacherOutput:
        """``pixels``: ``[B, 3, S, S]`` in ``[0, 1]``. Returns tokens in raster order of ``spec.grid``."""
        s = self.spec.input_size
        if pixels.shape[-2:] != (s, s):
            raise ValueError(f"teacher {self.spec.name!r} expects {s}x{s} inputs, got {tuple(pixels.shape[-2:])}")
        out = self.encode(self.normalize(pixels.float()))
        h, w = self.spec.grid
        if out.tokens.shape[1] != h * w:
            raise RuntimeError(f"teacher {self.spec.name!r} produced {out.tokens.shape[1]} tokens, spec says {h}x{w}")
        return out

    def fingerprint(self) -> str:
        """SHA-256 over every parameter and buffer (name, shape, dtype, bytes) plus the spec.

        This is what catches a swapped or stale teacher: two caches agree only if they were made
        by bit-identical weights configured identically.
        """
        return fingerprint_module(self, self.spec.to_json())


def fingerprint_module(module: nn.Module, extra: dict[str, Any] | None = None) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_error_reason(e: BaseException) -> str:
    """One line saying why a weights file did not load. torch's ``weights_only`` refusals span
    paragraphs (and suggest ``weights_only=False``, which we never do): keep the line that names the
    blocked global when there is one, else the first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    blocked = [
        line
        for line in lines
        if "global" in line.lower() and ("unsupported" in line.lower() or "blocked" in line.lower())
    ]
    line = (blocked or lines or [""])[0]
    line = ". ".join(s for s in line.split(". ") if "weights_only=False" not in s and "trusted" not in s)
    return f"{type(e).__name__}: {line}"
