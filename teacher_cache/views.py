"""The view plan: K augmented views per sample, each a pure function of its identity.

A view is ``(seed, box=(top, left, height, width), flip)``. The seed is a hash of
``(base seed, shard, key, view index, augmentation config)`` and the box/flip are drawn from a
generator seeded by it, using the image size recorded in the manifest — so the plan never depends
on worker count, shard order, batch size or retries (DESIGN invariant 2), and the student can
re-derive any view from its seed and check it against the stored parameters.

:func:`replay_view` is the single function that turns a decoded image and a view into pixels; the
teacher (at its resolution) and the student (at its own) both call it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the view plan is pure Python/NumPy: configs and planning import no torch
    import torch

PLAN_ALGORITHM = "rrc-v1"  # bump when the sampling below changes: it is part of every fingerprint


@dataclass(frozen=True)
class AugConfig:
    """RandomResizedCrop + horizontal flip, as in D-iGPT / MAE pretraining."""

    views: int = 2
    """K: augmented views stored per sample; the student picks one per epoch."""
    scale: tuple[float, float] = (0.2, 1.0)
    """Crop area as a fraction of the image area (the paper's setting)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Crop aspect-ratio range (width / height)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    seed: int = 0
    """Base seed of the whole plan."""

    def __post_init__(self) -> None:
        if not 1 <= self.views <= 1024:
            raise ValueError(f"views must be in [1, 1024], got {self.views}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], got {self.hflip}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        return d

    @classmethod
    def from_json(cls, d: dict) -> AugConfig:
        """The inverse of :meth:`to_json`: the config a cache's ``aug`` attribute records."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"the cache's augmentation record has fields this version does not know: {unknown}; "
                "read it with the digpt version that wrote it"
            )
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"])})

    def fingerprint(self) -> str:
        payload = json.dumps({"algorithm": PLAN_ALGORITHM, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def plan_fingerprint(aug: AugConfig, manifest_fingerprint: str) -> str:
    """The plan is a pure function of these two, so their hash identifies it."""
    return hashlib.sha256(f"{aug.fingerprint()}:{manifest_fingerprint}".encode()).hexdigest()


def view_seed(aug_fp: str, base_seed: int, shard: str, key: str, view: int | str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{base_seed}\0{aug_fp}\0{shard}\0{key}\0{view}".encode())
    return int.from_bytes(h.digest(), "little")


def sample_crop(seed: int, width: int, height: int, aug: AugConfig) -> tuple[tuple[int, int, int, int], bool]:
    """RandomResizedCrop's parameter search (10 tries, then a centre crop clamped to the ratio range),
    driven by a generator seeded with ``seed``. Returns ``((top, left, h, w), flip)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    area = width * height
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    box = None
    for _ in range(10):
        target = area * rng.uniform(aug.scale[0], aug.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < aug.ratio[0]:
            w, h = width, int(round(width / aug.ratio[0]))
        elif in_ratio > aug.ratio[1]:
            h, w = height, int(round(height * aug.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < aug.hflip)
    return box, flip


@dataclass
class ShardPlan:
    """Views of one shard's samples: ``seeds [n, K] uint64``, ``boxes [n, K, 4] int32``
    (top, left, height, width; -1 for rows without a usable image), ``flips [n, K] bool``."""

    seeds: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray


def plan_shard(shard: str, keys: list[str], widths: list[int], heights: list[int], aug: AugConfig) -> ShardPlan:
    """Plan every view of one shard. Rows whose size is unknown (0) get boxes of -1."""
    n, k = len(keys), aug.views
    aug_fp = aug.fingerprint()
    seeds = np.zeros((n, k), dtype=np.uint64)
    boxes = np.full((n, k, 4), -1, dtype=np.int32)
    flips = np.zeros((n, k), dtype=bool)
    for i, (key, w, h) in enumerate(zip(keys, widths, heights)):
        for v in range(k):
            s = view_seed(aug_fp, aug.seed, shard, key, v)
            seeds[i, v] = s
            if w > 0 and h > 0:
                boxes[i, v], flips[i, v] = sample_crop(s, w, h, aug)
    return ShardPlan(seeds, boxes, flips)


def replay_view(
    image: torch.Tensor, box: tuple[int, int, int, int] | np.ndarray, flip: bool, size: int
) -> torch.Tensor:
    """Crop ``box`` out of ``image`` (``[3, H, W]`` uint8), resize to ``size x size`` (bilinear,
    antialiased) and flip. Returns ``[3, size, size]`` float32 in ``[0, 1]``.

    Teacher and student both call this with the same box and flip; only ``size`` differs.
    """
    import torch.nn.functional as F  # here, not at the top: the plan above needs no torch

    top, left, h, w = (int(b) for b in box)
    if h <= 0 or w <= 0 or top < 0 or left < 0 or top + h > image.shape[1] or left + w > image.shape[2]:
        raise ValueError(f"crop box {tuple(box)} does not fit an image of size {tuple(image.shape[1:])}")
    crop = image[:, top : top + h, left : left + w].unsqueeze(0).float().div_(255.0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.squeeze(0).clamp_(0.0, 1.0)
    return out.flip(-1) if flip else out
