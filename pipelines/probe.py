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

Modules. This one holds the config, the result and the run; ``probe_features.py`` the encoder and
its per-layer features, ``probe_heads.py`` the splits and the linear/k-NN protocol, ``finetune.py`` the
fine-tune.

Memory. Features of every layer are kept for every sample (``[N, depth+1, D]`` float32); fine for
the CPU demo and ImageNet-100-sized sets, too much for full ImageNet at ViT-B (~50 GB): pass
``layers`` there. The fine-tune holds the eval views as uint8 ``[N, 3, S, S]``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch

from student.vit import VisionTransformer
from teacher_cache.dataset import PreparedDataset, load_dataset
from teacher_cache.io import atomic_write_text
from teacher_cache.runtime import resolve_device

# The pieces, one module each; their public names are re-exported here (callers import them from probe).
from .config import KINDS, POOLS, ProbeConfig
from .finetune import Classifier, augment, finetune_scores, layer_decay_groups
from .probe_features import (
    build_encoder,
    encode_layers,
    eval_view,
    extract_features,
    iter_labeled_views,
    layer_names,
    load_views,
    pool_tokens,
)
from .probe_heads import (
    LayerRow,
    Splits,
    choose,
    knn_scores,
    layer_scores,
    linear_scores,
    make_splits,
    probe_features,
    stratified_split,
    topk_accuracy,
)

__all__ = [
    "KINDS",
    "POOLS",
    "Classifier",
    "LayerRow",
    "ProbeConfig",
    "ProbeResult",
    "Splits",
    "augment",
    "build_encoder",
    "choose",
    "encode_layers",
    "eval_view",
    "extract_features",
    "finetune_scores",
    "iter_labeled_views",
    "knn_scores",
    "layer_decay_groups",
    "layer_names",
    "layer_scores",
    "linear_scores",
    "load_views",
    "make_splits",
    "pool_tokens",
    "probe_features",
    "run_probe",
    "run_probes",
    "stratified_split",
    "topk_accuracy",
]


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
    report_correct: list[int] | None = None
    """The chosen row's per-report-sample correctness (1 right, 0 wrong), in report-split order: what a
    paired comparison of two encoders on the same split needs (``pipelines/report.py``)."""

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
    return run_probes([cfg], progress)[0]


def run_probes(cfgs: list[ProbeConfig], progress: bool = True) -> list[ProbeResult]:
    """Several probes of one encoder on the same data that differ only in ``kind`` and ``out`` (linear and
    k-NN, as ablations run them): the encoder's features are extracted once and shared, so the pair costs
    one pass over the images instead of two. Each result is written to its config's ``out_path()``."""
    base = cfgs[0]
    for c in cfgs[1:]:
        if replace(c, kind=base.kind, out=base.out) != base:
            raise ValueError("run_probes: the configs may differ only in kind and out")
    if len(cfgs) > 1 and any(c.kind == "finetune" for c in cfgs):
        raise ValueError("run_probes: a fine-tune changes the encoder; run it alone (run_probe)")
    t0 = time.perf_counter()
    datasets = _open_inputs(base)
    for c in cfgs[1:]:
        if os.path.isdir(c.out_path()):
            raise ValueError(f"ProbeConfig.out {c.out_path()} is a directory; give a .json file path")
    enc, source = build_encoder(base)
    skipped: Counter = Counter()
    table, labels, n_val = _load_all(base, enc, datasets, skipped, progress)
    shared = time.perf_counter() - t0  # counted in full in each probe's seconds
    return [_score(c, enc, source, table, labels, n_val, skipped, datasets, shared, progress) for c in cfgs]


def _score(
    cfg: ProbeConfig,
    enc: VisionTransformer,
    source: dict,
    table: torch.Tensor,
    labels: torch.Tensor,
    n_val: int,
    skipped: Counter,
    datasets: list[PreparedDataset],
    load_seconds: float,
    progress: bool,
) -> ProbeResult:
    """One probe scored on loaded features (or views, for a fine-tune); written to ``cfg.out_path()``."""
    t0 = time.perf_counter() - load_seconds
    num_classes = _num_classes(labels, *datasets)
    splits = make_splits(labels.numpy(), n_val, cfg.holdout, cfg.select_fraction, cfg.seed)
    if cfg.kind == "finetune":
        tr, rp = splits.train, splits.report
        scores = finetune_scores(cfg, enc, table[tr], labels[tr], table[rp], num_classes, progress)
        top5 = topk_accuracy(scores, labels[rp], 5) if num_classes >= 5 else None
        # No choice is made, so the select split is not held out: the whole training part is fit.
        correct = (scores.argmax(1) == labels[rp]).int().tolist()
        rows = [
            LayerRow(enc.cfg.depth, "norm", None, topk_accuracy(scores, labels[rp], 1), top5, cfg.finetune_lr, correct)
        ]
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
        time.perf_counter() - t0,
        asdict(cfg),
        best.correct,
    )
    for r in rows:  # one vector (the chosen row's) is kept: the JSON stays a table
        r.correct = None
    _write_json(cfg.out_path(), result)
    return result


def _write_json(path: str, result: ProbeResult) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_json(), indent=2))
