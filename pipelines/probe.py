"""``digpt probe``: how good is a trained encoder? Linear probe, k-NN and a short fine-tune.

    shards --decode, center view, [0,1]--> encoder --every block + final norm, pooled--> features
    features --fit/select split--> choose (layer, lr) --refit on the training part--> report set

Splits. With ``val_shards`` the training part is all of ``shards`` and the report set is the
validation shards; without, a deterministic stratified ``holdout`` of ``shards`` is the report set.
The training part is split again (stratified, deterministic) into *fit* and *select*: every choice
(which layer, which learning rate) is made by fitting on *fit* and scoring on *select*. The chosen
setting is then refit on the whole training part and scored once on the report set, which no
choice ever sees (the selection functions are not even given it).

Attention. The encoder runs bidirectionally (no mask), whatever mask it was pretrained under; see
``ProbeConfig.pool`` for what that means for the class token.

DiGIT runs (objective ``digit``) hold a code model, not a pixel encoder: its features are those of the
codes that the run's tokenizer makes of the probe view (``student/code_gpt.py`` says why the cache's
stored codes cannot stand in); the view is taken at the tokenizer's input size. Linear and k-NN only.

Pixels. The student trained on ``replay_view`` output: ``[0, 1]`` pixels, no mean/std normalisation,
so the eval view is the same function applied to the centred square of the shorter side (= resize
the shorter side to ``img_size`` and center-crop).

Memory. Features of every layer are kept for every sample (``[N, depth+1, D]`` float32); fine for
the CPU demo and ImageNet-100-sized sets, too much for full ImageNet at ViT-B (~50 GB): pass
``layers`` there. The fine-tune holds the eval views as uint8 ``[N, 3, S, S]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from student.sizes import list_vit_sizes
from student.vit import VisionTransformer
from teacher_cache.dataset import PreparedDataset, iter_dataset_samples, load_dataset
from teacher_cache.images import BadImage, decode_image, to_uint8_chw
from teacher_cache.io import atomic_write_text
from teacher_cache.runtime import progress_bar, resolve_device
from teacher_cache.shards import pick_image
from teacher_cache.views import replay_view

KINDS = ("linear", "knn", "finetune")
POOLS = ("mean", "cls")


@dataclass(frozen=True)
class ProbeConfig:
    """``digpt probe``: which encoder, on which shards, with which protocol."""

    shards: str
    """Prepared dataset directory the probe trains on."""
    kind: str = "linear"
    """``linear`` (standardised features + linear classifier), ``knn`` (DINO weighted k-NN) or
    ``finetune`` (short end-to-end fine-tune with layer-wise lr decay)."""
    run: str | None = None
    """Trained run directory whose encoder is probed (None: ``random_init`` with ``student``)."""
    val_shards: str | None = None
    """Dataset to report on; None: a stratified ``holdout`` of ``shards``."""
    out: str | None = None
    """Result JSON; default ``RUN/probe_<kind>[_random].json`` (required without ``run``)."""
    random_init: bool = False
    """Probe a seeded random encoder (the run's architecture, or the ``student`` preset): the floor."""
    student: str | None = None
    """Encoder preset for ``random_init`` without a run (``tiny-test``, ``small-cpu``, ...)."""
    pool: str = "mean"
    """Token pooling: ``mean`` of patch tokens or the ``cls`` token. Mean by default: iGPT found
    mean-pooled (middle-layer) features best for autoregressive models. In D-iGPT pretraining (the
    official cls rule, ``AttnMask(prefix="last")``) the class token attends to every visible cluster,
    while of the patch tokens only the last visible cluster's attend to it; it is read by that cluster
    and the decoders' class queries, so it is trained as a summary for one prediction, where the mean
    carries what every patch learned. The probe itself runs the encoder with no mask (every token
    attends to every token), as D-iGPT's fine-tuning and MAE-style probes do: a probe image has no
    order, and a causal mask would leave the first patches almost no context."""
    layers: tuple[int, ...] | None = None
    """0-based blocks to probe (linear/knn); None: every block. The final norm is always added."""
    batch_size: int = 64
    """Images per encoder forward (and per fine-tune step)."""
    holdout: float = 0.25
    """Fraction of each class held out as the report set when there is no ``val_shards``."""
    select_fraction: float = 0.25
    """Fraction of each class of the training part used to choose layer and lr."""
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    """Linear probe: AdamW learning rates tried (chosen on the select split)."""
    epochs: int = 200
    """Linear probe: full-batch AdamW steps (cosine-decayed)."""
    weight_decay: float = 1e-4
    """Linear probe: AdamW weight decay."""
    k: int = 20
    """k-NN: neighbours that vote (capped at the bank size)."""
    temperature: float = 0.07
    """k-NN: votes weigh ``exp(cosine / temperature)`` (DINO)."""
    finetune_epochs: int = 10
    """Fine-tune: epochs over the training part."""
    finetune_lr: float = 1e-3
    """Fine-tune: peak AdamW lr of the head; block ``i`` gets ``layer_decay ** (depth + 1 - i)`` of it."""
    layer_decay: float = 0.75
    """Fine-tune: per-block lr decay from the head down (MAE / D-iGPT)."""
    finetune_weight_decay: float = 0.05
    """Fine-tune: AdamW weight decay (not on biases, norms, class/position tokens)."""
    drop_path: float = 0.1
    """Fine-tune: stochastic depth of the last block (MAE fine-tunes with 0.1)."""
    warmup: float = 0.1
    """Fine-tune: warmup as a fraction of all steps."""
    seed: int = 0
    """Seeds the splits, the random encoder, the fine-tune's augmentation and batch order."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ProbeConfig.{name} {msg}, got {getattr(self, name)!r}")

        need(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        need(self.pool in POOLS, "pool", f"must be one of {', '.join(POOLS)}")
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(bool(self.shards), "shards", "must be a dataset directory")
        need(self.run is not None or self.random_init, "run", "is required unless random_init is set")
        need(
            self.run is None or self.student is None,
            "student",
            "only applies to random_init without a run (a run knows its encoder)",
        )
        need(
            self.run is not None or self.student is not None,
            "student",
            "names the preset of a random_init encoder when there is no run",
        )
        need(
            self.student is None or self.student in list_vit_sizes(),
            "student",
            f"must be one of {', '.join(list_vit_sizes())}",
        )
        need(self.run is not None or self.out is not None, "out", "is required when there is no run")
        need(self.out is None or bool(self.out), "out", "must be a non-empty file path")
        for name in ("batch_size", "epochs", "k", "finetune_epochs"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("holdout", "select_fraction"):
            need(0.0 < getattr(self, name) < 1.0, name, "must be in (0, 1)")
        need(len(self.lrs) > 0 and all(lr > 0 for lr in self.lrs), "lrs", "must be non-empty and > 0")
        need(
            self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
            "layers",
            "must be None or non-empty 0-based block indices",
        )
        for name in ("temperature", "finetune_lr"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(0.0 < self.layer_decay <= 1.0, "layer_decay", "must be in (0, 1]")
        for name in ("weight_decay", "finetune_weight_decay"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0.0 <= self.drop_path < 1.0, "drop_path", "must be in [0, 1)")
        need(0.0 <= self.warmup < 1.0, "warmup", "must be in [0, 1)")
        need(self.seed >= 0, "seed", "must be >= 0")

    def out_path(self) -> str:
        if self.out is not None:
            return self.out
        return os.path.join(self.run, f"probe_{self.kind}{'_random' if self.random_init else ''}.json")


@dataclass
class LayerRow:
    """One probed layer: its score on the select split (used to choose) and on the report set."""

    index: int
    """Position in the feature table (block ``i`` for ``i < depth``; the final norm last)."""
    layer: str
    """``block{i+1}`` (1-based, as ``digpt extract --layer``) or ``norm``."""
    select_top1: float | None
    """Top-1 on the select split, fit on the fit split: what the choice looks at (None: no choice)."""
    top1: float
    """Top-1 on the report set, refit on the whole training part."""
    top5: float | None
    """Top-5 on the report set (None with fewer than 5 classes)."""
    lr: float | None = None
    """Linear probe: the lr chosen for this layer on the select split."""


@dataclass
class ProbeResult:
    kind: str
    encoder: dict
    """How the encoder was made: ``{"source": "trained"|"random-init", "run", "student", "config"}``."""
    rows: list[LayerRow]
    best_layer: str
    """The row chosen on the select split (never on the report set)."""
    top1: float
    top5: float | None
    n_train: int
    n_report: int
    n_skipped: int
    skipped: dict[str, int]
    """Skipped samples by reason (manifest errors, missing labels, undecodable)."""
    num_classes: int
    seconds: float
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """``layer | select | top-1 | top-5`` with the chosen row marked ``*``."""
        src = self.encoder["source"] + (f" {self.encoder['run']}" if self.encoder.get("run") else "")
        head = (
            f"probe {self.kind} ({src}, pool={self.config.get('pool')}): train {self.n_train}, "
            f"report {self.n_report}, skipped {self.n_skipped}, {self.num_classes} classes, {self.seconds:.1f}s"
        )
        lines = [head, f"  {'layer':10s} {'select':>7s} {'top-1':>7s} {'top-5':>7s}"]
        for r in self.rows:
            mark = "*" if r.layer == self.best_layer else " "
            top5 = "-" if r.top5 is None else f"{r.top5:.3f}"
            sel = "-" if r.select_top1 is None else f"{r.select_top1:.3f}"
            lines.append(f"{mark} {r.layer:10s} {sel:>7s} {r.top1:7.3f} {top5:>7s}")
        lines.append(
            f"best (chosen on the select split): {self.best_layer}, top-1 {self.top1:.3f}"
            + ("" if self.top5 is None else f", top-5 {self.top5:.3f}")
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ encoder


def build_encoder(cfg: ProbeConfig) -> tuple[VisionTransformer, dict]:
    """The encoder to probe (eval mode) and a description of where it came from."""
    from student.code_gpt import is_code_run, load_code_probe_encoder
    from student.export import load_encoder, run_config, run_encoder_config
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


# --------------------------------------------------------------------------------------------- data


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


# ------------------------------------------------------------------------------------------- splits


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held)`` sorted positions: ``round(fraction * n_c)`` of each class held out (at least
    one and at most ``n_c - 1`` when ``n_c >= 2``; none of a singleton class), chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        held.append(rng.permutation(idx)[:n])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_idx), held_idx


@dataclass(frozen=True)
class Splits:
    """Positions into the probe's sample table (training shards first, then validation shards)."""

    fit: np.ndarray
    """Fit the candidates of the choice."""
    select: np.ndarray
    """Score the candidates; the choice is the best here."""
    report: np.ndarray
    """Scored once, after the choice, by the refit on ``train``."""

    @property
    def train(self) -> np.ndarray:
        """The training part: ``fit`` and ``select`` together."""
        return np.sort(np.concatenate([self.fit, self.select]))


def make_splits(labels: np.ndarray, n_val: int, holdout: float, select_fraction: float, seed: int) -> Splits:
    """``labels``: the training shards' labels then ``n_val`` validation labels. The report set is the
    validation rows, or a stratified ``holdout`` of the training shards when ``n_val == 0``."""
    n_pool = len(labels) - n_val
    if n_val:
        train, report = np.arange(n_pool), np.arange(n_pool, len(labels))
    else:
        train, report = stratified_split(labels[:n_pool], holdout, seed)
    fit, select = stratified_split(labels[train], select_fraction, seed + 1)
    splits = Splits(train[fit], train[select], report)
    for name in ("fit", "select", "report"):
        if len(getattr(splits, name)) == 0:
            raise ValueError(
                f"the {name} split is empty: {len(labels)} samples is too few to probe (need at least 2 per class)"
            )
    return splits


# -------------------------------------------------------------------------------------------- heads


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest ``scores [N, C]``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def linear_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    lr: torch.Tensor,
    epochs: int,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """Fit a linear classifier per layer and per learning rate at once; logits ``[G, L, M, C]``.

    ``train_x [N, L, D]``, ``test_x [M, L, D]``; ``lr [G, L]``: the lr of candidate ``(g, l)``. Each
    layer's features are standardised with its training statistics (MAE's affine-free BatchNorm before
    the head). Every candidate starts at zero (softmax regression is convex) and takes ``epochs``
    full-batch ``torch.optim.AdamW`` steps under a cosine lr. Each candidate is its own parameter group
    (its own lr) and the loss is a sum of independent terms, so this equals ``G * L`` separate fits,
    done in one loop because tiny ops are dominated by per-op overhead.
    """
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-6
    x = (train_x - mean) / std
    (g, L), d = lr.shape, x.shape[2]
    peak = lr.reshape(-1).tolist()
    ws = [torch.zeros(d, num_classes, device=x.device, requires_grad=True) for _ in peak]
    bs = [torch.zeros(num_classes, device=x.device, requires_grad=True) for _ in peak]
    opt = torch.optim.AdamW(
        [{"params": [w, b], "lr": p} for w, b, p in zip(ws, bs, peak)],
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=weight_decay,
    )
    target = train_y.repeat(g * L)
    with torch.enable_grad():
        for t in range(epochs):
            for group, p in zip(opt.param_groups, peak):
                group["lr"] = p * 0.5 * (1 + math.cos(math.pi * t / epochs))
            w, b = torch.stack(ws).view(g, L, d, num_classes), torch.stack(bs).view(g, L, num_classes)
            logits = torch.einsum("nld,gldc->glnc", x, w) + b[:, :, None]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction="sum") / len(train_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        w, b = torch.stack(ws).view(g, L, d, num_classes), torch.stack(bs).view(g, L, num_classes)
        return torch.einsum("mld,gldc->glmc", (test_x - mean) / std, w) + b[:, :, None]


def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted k-NN on one layer (``train_x [N, D]``, ``test_x [M, D]``): class votes ``[M, C]``
    of the ``k`` most cosine-similar training rows, each weighing ``exp(sim / temperature)``."""
    bank = F.normalize(train_x, dim=1)
    k = min(k, len(bank))
    out = []
    for q in F.normalize(test_x, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()))
    return torch.cat(out)


def layer_scores(
    cfg: ProbeConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    lr: torch.Tensor,
) -> torch.Tensor:
    """Scores ``[G, L, M, C]`` of every layer's probe (``*_x: [N, L, D]``); k-NN ignores ``lr`` (G = 1)."""
    if cfg.kind == "knn":
        return torch.stack(
            [
                knn_scores(train_x[:, li], train_y, test_x[:, li], num_classes, cfg.k, cfg.temperature)
                for li in range(train_x.shape[1])
            ]
        )[None]
    return linear_scores(train_x, train_y, test_x, num_classes, lr, cfg.epochs, cfg.weight_decay)


def choose(
    cfg: ProbeConfig,
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
    sel_x: torch.Tensor,
    sel_y: torch.Tensor,
    num_classes: int,
) -> list[tuple[float, float | None]]:
    """Per layer, ``(select top-1, lr)`` of its best lr (linear; None for k-NN) fit on *fit*, scored on
    *select*. ``*_x: [N, L, D]``. Only the training part comes in: the report set cannot sway the choice.
    """
    lrs = torch.tensor(cfg.lrs)[:, None].expand(len(cfg.lrs), fit_x.shape[1])
    scores = layer_scores(cfg, fit_x, fit_y, sel_x, num_classes, lrs)
    acc = torch.tensor([[topk_accuracy(s, sel_y, 1) for s in per_lr] for per_lr in scores])  # [G, L]
    best = acc.argmax(0)  # first max: the earliest lr of cfg.lrs among ties
    return [(acc[g, li].item(), cfg.lrs[g] if cfg.kind == "linear" else None) for li, g in enumerate(best.tolist())]


def probe_features(
    cfg: ProbeConfig, feats: torch.Tensor, labels: torch.Tensor, splits: Splits, names: list[str], num_classes: int
) -> list[LayerRow]:
    """Choose per layer on fit/select, refit that choice on the training part, score on the report set."""
    device = resolve_device(cfg.device, "ProbeConfig.device")
    part = {
        n: (feats[getattr(splits, n)].to(device), labels[getattr(splits, n)].to(device))
        for n in ("fit", "select", "train", "report")
    }
    chosen = choose(cfg, *part["fit"], *part["select"], num_classes)
    lr = torch.tensor([[lr or 0.0 for _, lr in chosen]])
    scores = layer_scores(cfg, *part["train"], part["report"][0], num_classes, lr)[0]
    y = part["report"][1]
    return [
        LayerRow(
            li,
            names[li],
            sel,
            topk_accuracy(scores[li], y, 1),
            topk_accuracy(scores[li], y, 5) if num_classes >= 5 else None,
            lr,
        )
        for li, (sel, lr) in enumerate(chosen)
    ]


# ----------------------------------------------------------------------------------------- finetune


class Classifier(nn.Module):
    """Encoder -> final norm -> pool -> linear head."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, pool: str):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.cfg.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] -> logits ``[B, C]``."""
        return self.head(pool_tokens(self.encoder(x), self.pool))


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = decay ** (depth + 1 - layer_id)``: embeddings are layer 0, block
    ``i`` layer ``i + 1``, the final norm and head ``depth + 1`` (MAE's ``param_groups_lrd``)."""
    depth = model.encoder.cfg.depth
    skip = {f"encoder.{n}" for n in model.encoder.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            layer_id = 0
        elif name.startswith("encoder.blocks."):
            layer_id = int(name.split(".")[2]) + 1
        else:
            layer_id = depth + 1
        no_wd = p.ndim <= 1 or name in skip
        g = groups.setdefault(
            (layer_id, no_wd),
            {
                "params": [],
                "weight_decay": 0.0 if no_wd else weight_decay,
                "lr_scale": decay ** (depth + 1 - layer_id),
                "lr": lr,
            },
        )
        g["params"].append(p)
    return list(groups.values())


def augment(views: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float [0, 1]: per-sample random resized crop and horizontal flip."""
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    return torch.stack([tf(v) for v in views]).float().div_(255.0)  # v2 on a batch would share one crop


def finetune_scores(
    cfg: ProbeConfig,
    enc: VisionTransformer,
    train_views: torch.Tensor,
    train_y: torch.Tensor,
    test_views: torch.Tensor,
    num_classes: int,
    progress: bool = True,
) -> torch.Tensor:
    """Fine-tune ``enc`` + a head on the training views; logits ``[M, C]`` for ``test_views``."""
    from student.train import lr_schedule

    device = resolve_device(cfg.device, "ProbeConfig.device")
    ft_enc = VisionTransformer(dataclasses.replace(enc.cfg, drop_path=cfg.drop_path))
    ft_enc.load_state_dict(enc.state_dict())
    model = Classifier(ft_enc, num_classes, cfg.pool).to(device)
    groups = layer_decay_groups(model, cfg.finetune_lr, cfg.finetune_weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.finetune_lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)
    lrs = lr_schedule(cfg.finetune_epochs * steps_per_epoch, cfg.finetune_lr, cfg.warmup, 0.0)
    size, it = enc.cfg.img_size, 0
    bar = progress_bar(total=len(lrs), desc="finetune", unit="step", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.finetune_epochs):
            model.train()
            for idx in torch.randperm(len(train_y)).split(cfg.batch_size):
                for g in opt.param_groups:
                    g["lr"] = float(lrs[it]) * g["lr_scale"]
                x, y = augment(train_views[idx], size).to(device), train_y[idx].to(device)
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    with torch.inference_mode():
        return torch.cat(
            [model(v.float().div(255.0).to(device)).float().cpu() for v in test_views.split(cfg.batch_size)]
        )


# ------------------------------------------------------------------------------------------ the run


def _num_classes(labels: torch.Tensor, *datasets: PreparedDataset) -> int:
    declared = [d.info.get("num_classes") for d in datasets if d.info.get("num_classes")]
    n = max([int(labels.max()) + 1, *declared])
    if len(labels.unique()) < 2:
        raise ValueError(f"probing needs at least 2 classes, the samples have {len(labels.unique())}")
    return n


def _open_inputs(cfg: ProbeConfig) -> list[PreparedDataset]:
    """Check everything the run reads or writes before any work: the device, the datasets (training
    shards, then validation shards) and the result path."""
    resolve_device(cfg.device, "ProbeConfig.device")
    datasets = []
    for name in ("shards", "val_shards"):
        if getattr(cfg, name):
            try:
                datasets.append(load_dataset(getattr(cfg, name)))
            except (FileNotFoundError, ValueError) as e:
                kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
                raise kind(f"ProbeConfig.{name}: {e}") from None
    if os.path.isdir(cfg.out_path()):
        raise ValueError(f"ProbeConfig.out {cfg.out_path()} is a directory; give a .json file path")
    return datasets


def _load_all(
    cfg: ProbeConfig, enc: VisionTransformer, datasets: list[PreparedDataset], skipped: Counter, progress: bool
):
    """``(table, labels, n_val)``: features (linear/knn) or uint8 views (finetune) of the training
    shards, then of the validation shards."""
    if cfg.layers is not None and max(cfg.layers) >= enc.cfg.depth:
        raise ValueError(f"ProbeConfig.layers {cfg.layers} out of range for an encoder of depth {enc.cfg.depth}")
    parts = [
        load_views(ds, enc.cfg.img_size, skipped)
        if cfg.kind == "finetune"
        else extract_features(enc, ds, cfg, skipped, progress)
        for ds in datasets
    ]
    n_val = len(parts[1][1]) if cfg.val_shards else 0
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), n_val


def run_probe(cfg: ProbeConfig, progress: bool = True) -> ProbeResult:
    """Probe the encoder, write ``cfg.out_path()`` and return the result."""
    start = time.perf_counter()
    datasets = _open_inputs(cfg)
    enc, source = build_encoder(cfg)
    skipped: Counter = Counter()
    table, labels, n_val = _load_all(cfg, enc, datasets, skipped, progress)
    num_classes = _num_classes(labels, *datasets)
    splits = make_splits(labels.numpy(), n_val, cfg.holdout, cfg.select_fraction, cfg.seed)
    if cfg.kind == "finetune":
        tr, rp = splits.train, splits.report
        scores = finetune_scores(cfg, enc, table[tr], labels[tr], table[rp], num_classes, progress)
        top5 = topk_accuracy(scores, labels[rp], 5) if num_classes >= 5 else None
        # No choice is made, so the select split is not held out: the whole training part is fit.
        rows = [LayerRow(enc.cfg.depth, "norm", None, topk_accuracy(scores, labels[rp], 1), top5, cfg.finetune_lr)]
        best = rows[0]
    else:
        rows = probe_features(cfg, table, labels, splits, layer_names(enc.cfg.depth, cfg.layers), num_classes)
        best = max(rows, key=lambda r: r.select_top1)  # first max; never looks at the report set
    result = ProbeResult(
        cfg.kind,
        source,
        rows,
        best.layer,
        best.top1,
        best.top5,
        len(splits.train),
        len(splits.report),
        sum(skipped.values()),
        dict(skipped),
        num_classes,
        time.perf_counter() - start,
        asdict(cfg),
    )
    _write_json(cfg.out_path(), result)
    return result


def _write_json(path: str, result: ProbeResult) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_json(), indent=2))
