"""The probe's inputs: the encoder to probe (trained, DiGIT's code model, or a seeded random one), the
evaluation view of each labelled sample, and per-layer pooled features (``pipelines/probe.py`` says how
they are used)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from student.vit import VisionTransformer
from teacher_cache.dataset import PreparedDataset, iter_dataset_samples
from teacher_cache.images import BadImage, decode_image, to_uint8_chw
from teacher_cache.runtime import progress_bar, resolve_device
from teacher_cache.shards import pick_image
from teacher_cache.views import replay_view

if TYPE_CHECKING:
    from .config import ProbeConfig


def build_encoder(cfg: ProbeConfig) -> tuple[VisionTransformer, dict]:
    """The encoder to probe (eval mode) and a description of where it came from."""
    from student.code_gpt import load_code_probe_encoder
    from student.export import is_code_run, load_encoder, run_config, run_encoder_config
    from student.sizes import vit_config

    if cfg.run is not None and is_code_run(run_config(cfg.run)):
        if cfg.kind == "finetune":
            raise ValueError(
                f"ProbeConfig.kind 'finetune': run {cfg.run} is DiGIT's code model (it reads codes, "
                "not pixels); probe it with kind linear or knn"
            )
        code = load_code_probe_encoder(cfg.run, cfg.random_init, cfg.seed)
        return code, {
            "source": "random-init" if cfg.random_init else "trained",
            "run": cfg.run,
            "student": None,
            "config": {**asdict(code.cfg), "input": f"codes of tokenizer {code.tokenizer.spec.name}"},
        }
    if not cfg.random_init:
        enc = load_encoder(cfg.run)
        return enc, {"source": "trained", "run": cfg.run, "student": None, "config": asdict(enc.cfg)}
    vit = run_encoder_config(cfg.run) if cfg.run else vit_config(cfg.student)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG stream is untouched
        torch.manual_seed(cfg.seed)
        enc = VisionTransformer(vit)
    return enc.eval(), {"source": "random-init", "run": cfg.run, "student": cfg.student, "config": asdict(vit)}


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, 1+N, D]`` -> ``[B, D]``: the class token or the mean of the patch tokens."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


def layer_names(depth: int, layers: Sequence[int] | None) -> list[str]:
    return [f"block{i + 1}" for i in (layers if layers is not None else range(depth))] + ["norm"]


def encode_layers(
    enc: VisionTransformer, images: torch.Tensor, pool: str, layers: Sequence[int] | None
) -> torch.Tensor:
    """``[B, 3, S, S]`` in [0, 1] -> ``[B, L, D]``: pooled block outputs (one pass), final norm last."""
    outs = enc.forward_intermediates(images)
    picked = [outs[i] for i in layers] if layers is not None else outs
    return torch.stack([pool_tokens(t, pool) for t in picked] + [pool_tokens(enc.norm(outs[-1]), pool)], dim=1)


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> ``[3, size, size]`` float in [0, 1]: the centred square of the shorter
    side, resized with the student's own ``replay_view`` (same interpolation as training)."""
    h, w = image.shape[1:]
    side = min(h, w)
    return replay_view(image, ((h - side) // 2, (w - side) // 2, side, side), False, size)


def iter_labeled_views(ds: PreparedDataset, size: int, skipped: Counter) -> Iterator[tuple[torch.Tensor, int]]:
    """``(view [3, S, S], label)`` for every usable row, in manifest order; the rest are counted in
    ``skipped`` by reason (manifest error, no label, missing or undecodable image)."""
    for shard in ds.shards:
        for row, raw in iter_dataset_samples(ds, shard):
            picked = pick_image(raw) if raw is not None else None
            reason = (
                "manifest error"
                if row["error"]
                else "no label"
                if row["label"] is None or row["label"] < 0
                else "missing sample"
                if picked is None
                else None
            )
            if reason is None:
                try:
                    img = decode_image(picked[1])
                except BadImage:
                    reason = "undecodable"
            if reason is not None:
                skipped[reason] += 1
                continue
            yield eval_view(torch.from_numpy(to_uint8_chw(img)), size), int(row["label"])


def _batches(it: Iterator[tuple[torch.Tensor, int]], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    buf: list[tuple[torch.Tensor, int]] = []
    for item in it:
        buf.append(item)
        if len(buf) == size:
            yield torch.stack([b[0] for b in buf]), torch.tensor([b[1] for b in buf])
            buf = []
    if buf:
        yield torch.stack([b[0] for b in buf]), torch.tensor([b[1] for b in buf])


def extract_features(
    enc: VisionTransformer, ds: PreparedDataset, cfg: ProbeConfig, skipped: Counter, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, L, D] float32 on CPU, labels [N])`` of every usable sample of ``ds``."""
    device = resolve_device(cfg.device, "ProbeConfig.device")
    enc = enc.to(device).eval()
    feats, labels = [], []
    bar = progress_bar(
        total=ds.num_samples,
        desc=f"features {os.path.basename(os.path.normpath(ds.root))}",
        unit="img",
        disable=not progress,
    )
    with torch.inference_mode():
        for x, y in _batches(iter_labeled_views(ds, enc.cfg.img_size, skipped), cfg.batch_size):
            feats.append(encode_layers(enc, x.to(device), cfg.pool, cfg.layers).float().cpu())
            labels.append(y)
            bar.update(len(y))
    bar.close()
    if not feats:
        raise ValueError(f"{ds.root} has no usable labelled samples (skipped: {dict(skipped)})")
    return torch.cat(feats), torch.cat(labels)


def load_views(ds: PreparedDataset, size: int, skipped: Counter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(views [N, 3, S, S] uint8, labels [N])``: the fine-tune's images, held in memory."""
    views, labels = [], []
    for x, y in iter_labeled_views(ds, size, skipped):
        views.append(x.mul(255).round_().to(torch.uint8))
        labels.append(y)
    if not views:
        raise ValueError(f"{ds.root} has no usable labelled samples (skipped: {dict(skipped)})")
    return torch.stack(views), torch.tensor(labels)
