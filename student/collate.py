"""The loader's last stages, after batching: replay each sample's crop from its image (checking that the
view re-derives from its seed, invariant 1) and collate a batch; then the stored targets' dtype handling
(:func:`stored_targets` on the loader, :func:`widen_targets` wherever the batch is).

A batch's samples are decoded here and not earlier, so a batch skipped on resume is never decoded.
"""

from __future__ import annotations

import numpy as np
import torch

from teacher_cache.images import BadImage, decode_image, to_uint8_chw
from teacher_cache.names import TARGETS
from teacher_cache.store import TokenizerInfo
from teacher_cache.views import AugConfig, replay_view, sample_crop


def replay_crop(sample: dict, aug: AugConfig, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """The sample's view replayed from its image at each of ``sizes`` (``uint8 [3,S,S]`` each, in order):
    the pixels the teacher saw for it. Refuses a view that does not re-derive from its seed."""
    # Invariant 1: re-derive the view from its seed and check it against the stored one.
    box, flip = sample_crop(sample["seed"], sample["size"][0], sample["size"][1], aug)
    if tuple(box) != tuple(int(x) for x in sample["box"]) or flip != sample["flip"]:
        raise RuntimeError(
            f"view of {sample['shard']}/{sample['key']} does not re-derive from its seed: stored "
            f"{tuple(sample['box'])}/{sample['flip']}, derived {box}/{flip} (cache and code disagree)"
        )
    try:
        img = torch.from_numpy(to_uint8_chw(decode_image(sample["image"])))
    except BadImage as e:  # decoded fine at extraction; failing now means the shard changed
        raise RuntimeError(f"{sample['shard']}/{sample['key']}: {e}") from None
    return [replay_view(img, sample["box"], sample["flip"], size) for size in sizes]


class Collate:
    """A list of samples (``student/samples.py``) to one batch: ``images [B,3,S,S]``, ``labels [B]``,
    ``order_seed [B]``, ``teacher_images`` when ``teacher_size`` is set, and the stored targets (widened to
    float32 when ``decode``, else as stored; none for fresh views, which the online teacher fills)."""

    def __init__(
        self,
        aug: AugConfig,
        info: TokenizerInfo,
        img_size: int,
        teacher_size: int | None = None,
        codebook: torch.Tensor | None = None,
        decode: bool = True,
    ):
        self.aug, self.info, self.codebook, self.decode = aug, info, codebook, decode
        self.sizes = (img_size, teacher_size) if teacher_size else (img_size,)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        views = [replay_crop(b, self.aug, self.sizes) for b in batch]
        out = {
            "images": torch.stack([v[0] for v in views]),
            "labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            "order_seed": torch.tensor([b["order_seed"] for b in batch], dtype=torch.long),
        }
        if len(self.sizes) > 1:
            out["teacher_images"] = torch.stack([v[1] for v in views])
        t = {n: [b["targets"][n] for b in batch] for n in batch[0]["targets"]}
        if not t:  # fresh views: the online teacher adds the targets
            return out
        out.update(stored_targets(t, self.info.dtype, self.info.codes))
        return widen_targets(out, self.codebook) if self.decode else out


def stored_targets(t: dict[str, list[np.ndarray]], dtype: str, codes: bool) -> dict[str, torch.Tensor]:
    """A batch's targets stacked in their stored dtype (bf16 bits viewed as bfloat16), scales kept apart;
    :class:`student.stages.DecodeTargets` turns them into float32."""
    if codes:
        return {"codes": torch.from_numpy(np.stack(t["tokens"]).astype(np.int64))}
    out = {}
    for name in TARGETS:
        if name in t:
            x = torch.from_numpy(np.stack(t[name]))
            out[name] = x.view(torch.bfloat16) if dtype == "bf16" and not name.endswith("scale") else x
    return out


def widen_targets(batch: dict[str, torch.Tensor], codebook: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Stored targets to float32 wherever the batch is: fp16/bf16 widened, int8 times its per-row scale,
    k-means ``codes`` looked up in ``codebook`` (on the batch's device). Exact: each value is one widening
    or one float32 product. A batch already decoded, or without stored targets, comes back unchanged."""
    out = dict(batch)
    if "codes" in out and "tokens" not in out:
        out["tokens"] = codebook[out["codes"]]
    for name, scale in (("tokens", "token_scale"), ("cls", "cls_scale")):
        if scale in out:
            out[name] = out[name].float() * out.pop(scale).unsqueeze(-1)
        elif name in out and out[name].dtype != torch.float32:
            out[name] = out[name].float()
    if "tokens" in out and "shard" in out and not bool(torch.isfinite(out["tokens"]).all()):
        # A damaged chunk past the rows checked before training: refused before the step reads it.
        bad = (~torch.isfinite(out["tokens"])).flatten(1).any(1).nonzero().flatten().tolist()
        where = ", ".join(f"{out['shard'][i]}/{out['key'][i]}" for i in bad[:3])
        raise ValueError(
            f"non-finite stored targets (NaN/Inf) in {where}; find them with `digpt verify` and re-extract"
        )
    return out
