"""``digpt ablate RECIPE``: train several students against several caches and write one report.

A recipe is a small function returning variants, each a diff against a base (teacher, storage form,
objective, order, decoder shape). Each distinct (teacher, storage) is extracted once into one cache and
reused by every variant that needs it — the point of the cache. Every variant is trained for each
seed, probed (linear, best layer; plus k-NN), and compared with a random-init floor of the same
student. Output: ``report.md`` (one table), ``results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from student.data import DataConfig
from student.objectives import StudentConfig
from student.sizes import list_vit_sizes, vit_config
from student.train import OptimConfig, TrainConfig, train
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import run_extract
from teacher_cache.prepare import MAX_CLASSES, MIN_CLASSES, SyntheticConfig, prepare_synthetic
from teacher_cache.store import slug
from teacher_cache.views import AugConfig

from .probe import ProbeConfig, run_probe

SEMANTIC = "efficientnet_lite0:256"  # 8x8 tokens: splits into the 2x2 clusters of a 64 px / patch-8 student


@dataclass(frozen=True)
class Variant:
    """One row of the report: what to extract and how to train on it."""

    name: str
    teacher: TeacherConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    objective: str = "digpt"
    order: str | None = None
    decoder_depth: int = 2

    @property
    def tokenizer(self) -> str:
        return f"{self.teacher.group_name}-{self.storage.dtype}"


@dataclass(frozen=True)
class AblateConfig:
    """``digpt ablate``."""

    recipe: str
    """tokenizers, decoders, orders, storage or demo (see :data:`RECIPES`)."""
    out: str
    """Output directory: data/, cache/, runs/, report.md, results.json, *.png."""
    shards: str | None = None
    """A prepared dataset to use; default: generate a synthetic one under ``out/data``."""
    num_samples: int = 512
    """Synthetic set size (when ``shards`` is not given)."""
    num_classes: int = 8
    """Synthetic classes."""
    image_size: int | None = None
    """Student input size (and the synthetic images' size); default: the student's. Given, it must match."""
    student: str = "small-cpu"
    """Student encoder preset."""
    steps: int = 200
    """Optimizer steps per student."""
    batch_size: int = 64
    """Samples per step."""
    base_lr: float = 1.5e-3
    """Learning rate per 256 samples (higher than ImageNet's: tiny models, short schedules)."""
    seeds: int = 1
    """Seeds per variant (mean +- std when > 1)."""
    views: int = 2
    """Augmented views per sample in the cache."""
    executor: str = "ray"
    """Extraction executor."""
    workers: int = 1
    """Loader workers per training run."""
    weights: tuple[tuple[str, str], ...] = ()
    """(teacher name, local weights file) pairs: headline teachers join the ``tokenizers`` recipe."""
    knn: bool = True
    """Also report k-NN accuracy."""
    semantic_teacher: str = SEMANTIC
    """The semantic tokenizer the recipes vary around (needs a grid that splits into the clusters)."""
    cache: str | None = None
    """Cache location; default ``out/cache`` (point several ablations at one cache to share extraction)."""
    stem: str | None = None
    """Student patch embedding, ``patch`` or ``conv``; None: the preset's (``student/vit.py``)."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        if self.student not in list_vit_sizes():
            raise ValueError(f"student must be one of {list_vit_sizes()}, got {self.student!r}")
        if self.image_size is None:
            object.__setattr__(self, "image_size", vit_config(self.student).img_size)  # frozen: resolved once
        for name in ("num_samples", "num_classes", "image_size", "steps", "batch_size", "seeds", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if not self.out:
            raise ValueError("out must be a non-empty directory path")
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.num_classes}")
        if self.shards is None and self.num_samples < 4 * self.num_classes:
            # The probes split every class three ways (fit, select, report).
            raise ValueError(f"num_samples must be >= 4 * num_classes ({4 * self.num_classes}), got {self.num_samples}")
        if self.student not in list_vit_sizes():
            raise ValueError(f"student must be one of {list_vit_sizes()}, got {self.student!r}")
        if vit_config(self.student).img_size != self.image_size:
            raise ValueError(
                f"student {self.student!r} takes {vit_config(self.student).img_size} px images, the "
                f"ablation's images are {self.image_size} px; choose a student of that size "
                f"(e.g. small-cpu or demo-cpu for 64 px)"
            )
        if self.executor not in ("ray", "local"):
            raise ValueError(f"executor must be 'ray' or 'local', got {self.executor!r}")
        if self.weights and self.recipe != "tokenizers":
            raise ValueError(
                f"weights add teachers to the tokenizers recipe only; recipe {self.recipe!r} would ignore them"
            )


# ---------------------------------------------------------------------------------------------
# recipes: small functions, each a list of variants (the paper's tables, in shape)

RECIPES: dict[str, Callable[[AblateConfig], list[Variant]]] = {}


def recipe(name: str):
    def deco(fn):
        RECIPES[name] = fn
        return fn

    return deco


def _pixel(cfg: AblateConfig) -> TeacherConfig:
    # the student's own patches, normalised (MAE norm-pix): one target token per student patch
    return TeacherConfig(f"pixel:{cfg.image_size}/{vit_config(cfg.student).patch_size}", group="pixel")


def _semantic(cfg: AblateConfig) -> TeacherConfig:
    return TeacherConfig(cfg.semantic_teacher, group="semantic")


def _token_dim(name: str) -> int:
    """The token width of teacher ``name`` (built once here: the PCA variant keeps at most that many dims)."""
    from teacher_cache.teachers import create_teacher

    try:
        return create_teacher(name).spec.dim
    except Exception:  # e.g. a hub teacher without weights: extracting the semantic variant reports it
        return 64


@recipe("demo")
def demo_recipe(cfg: AblateConfig) -> list[Variant]:
    """Pixel targets (iGPT-like) vs the shipped semantic teacher, both with D-iGPT."""
    return [Variant("digpt/pixel", _pixel(cfg)), Variant("digpt/semantic", _semantic(cfg))]


@recipe("learning")
def learning_recipe(cfg: AblateConfig) -> list[Variant]:
    """Does pretraining teach anything here? Feature distillation and D-iGPT on the semantic teacher, D-iGPT
    on pixel targets, against the random-init floor (the study in LEARNING.md)."""
    t = _semantic(cfg)
    return [
        Variant("fd/semantic", t, objective="fd"),
        Variant("digpt/semantic", t),
        Variant("digpt/pixel", _pixel(cfg)),
    ]


@recipe("tokenizers")
def tokenizers_recipe(cfg: AblateConfig) -> list[Variant]:
    """Paper Tables 5/6: one objective, several tokenizers; headline teachers when weights are given."""
    out = [
        Variant("digpt/pixel", _pixel(cfg)),
        Variant(
            "digpt/kmeans-codes",
            TeacherConfig(
                f"kmeans:{cfg.semantic_teacher}",
                group="kmeans",
                codebook_size=64,
                fit_samples=min(256, cfg.num_samples),
            ),
        ),
        Variant("digpt/semantic", _semantic(cfg)),
    ]
    for name, path in cfg.weights:
        out.append(Variant(f"digpt/{name}", TeacherConfig(name, weights=path, group=slug(name))))
    return out


@recipe("decoders")
def decoders_recipe(cfg: AblateConfig) -> list[Variant]:
    """Paper Tables 8/9: D-iGPT vs generative-only vs feature distillation; decoder depth 1/2/4."""
    t = _semantic(cfg)
    return [
        Variant("digpt", t),
        Variant("gen", t, objective="gen"),
        Variant("fd", t, objective="fd"),
        Variant("digpt/depth1", t, decoder_depth=1),
        Variant("digpt/depth4", t, decoder_depth=4),
    ]


@recipe("orders")
def orders_recipe(cfg: AblateConfig) -> list[Variant]:
    """iGPT's raster vs D-iGPT's random vs SemAIM's semantic order."""
    t = _semantic(cfg)
    return [Variant(f"digpt/{o}", t, order=o) for o in ("raster", "random", "semantic")]


@recipe("storage")
def storage_recipe(cfg: AblateConfig) -> list[Variant]:
    """Bytes per view against probe accuracy: fp16, int8, PCA-reduced and k-means codes of the same teacher."""
    t = _semantic(cfg)
    return [
        Variant("fp16", t),
        Variant("int8", t, storage=StorageConfig(dtype="int8")),
        Variant("bf16", t, storage=StorageConfig(dtype="bf16")),
        Variant(
            "pca-64",
            TeacherConfig(
                f"pca:{cfg.semantic_teacher}",
                group="pca64",
                pca_dim=min(64, _token_dim(cfg.semantic_teacher)),
                fit_samples=min(512, cfg.num_samples),
            ),
        ),
        Variant(
            "codes-256",
            TeacherConfig(
                f"kmeans:{cfg.semantic_teacher}",
                group="kmeans256",
                codebook_size=256,
                fit_samples=min(512, cfg.num_samples),
            ),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# the runner


@dataclass
class RunRecord:
    variant: str
    seed: int
    run: str
    train_seconds: float
    final_loss: float
    losses: list[float]
    linear_top1: float
    linear_top5: float | None
    best_layer: int | str
    knn_top1: float | None
    blind_loss: float | None = None
    """The run's input-blind baseline (per-position mean target), on the loss's scale."""
    loss_steps: list[int] = field(default_factory=list)
    """The optimizer step of each entry of ``losses``."""


def _dataset(cfg: AblateConfig) -> str:
    if cfg.shards:
        return cfg.shards
    data = os.path.join(cfg.out, "data")
    want = SyntheticConfig(
        out=data,
        num_samples=cfg.num_samples,
        num_classes=cfg.num_classes,
        image_size=cfg.image_size,
        shard_size=max(16, cfg.num_samples // 4),
        seed=0,
    )
    if os.path.exists(os.path.join(data, "dataset.json")):
        ds = load_dataset(data)
        if ds.info.get("config") == asdict(want):
            return data  # an earlier run of the same recipe: reuse its data (and cache)
    prepare_synthetic(want)
    return data


def _extract(cfg: AblateConfig, data: str, variants: list[Variant]) -> tuple[str, dict[str, float]]:
    """Extract each distinct (teacher, storage) once; returns the cache and bytes/view per tokenizer."""
    cache = cfg.cache or os.path.join(cfg.out, "cache")
    by_storage: dict[StorageConfig, dict[str, TeacherConfig]] = {}
    for v in variants:
        by_storage.setdefault(v.storage, {})[v.tokenizer] = replace(v.teacher, group=v.tokenizer)
    bytes_per_view: dict[str, float] = {}
    for storage, teachers in by_storage.items():
        summary = run_extract(
            ExtractConfig(
                shards=data,
                out=cache,
                teachers=tuple(teachers.values()),
                aug=AugConfig(views=cfg.views),
                storage=storage,
                batch_size=32,
                executor=cfg.executor,
            )
        )
        print(summary.table())
        bytes_per_view.update({t.group: t.bytes_per_view for t in summary.tokenizers})
    return cache, bytes_per_view


def _probe(cfg: AblateConfig, data: str, run: str | None, seed: int, floor: bool = False) -> tuple[dict, dict | None]:
    """Probe ``run``'s encoder; ``floor``: a seeded random encoder of ``run``'s architecture (of the
    ``student`` preset when there is no run), so the floor is the same network, untrained."""
    common = dict(shards=data, seed=seed, student=None if run else cfg.student)
    out = os.path.join(cfg.out, "runs", f"random-init_s{seed}") if floor else None
    if out:
        os.makedirs(out, exist_ok=True)
    lin = run_probe(
        ProbeConfig(
            run=run,
            kind="linear",
            random_init=floor,
            out=os.path.join(out, "probe_linear.json") if out else None,
            **common,
        )
    )
    knn = (
        run_probe(
            ProbeConfig(
                run=run,
                kind="knn",
                random_init=floor,
                out=os.path.join(out, "probe_knn.json") if out else None,
                **common,
            )
        )
        if cfg.knn
        else None
    )
    return _summary(lin), (_summary(knn) if knn else None)


def teacher_ceiling(data: str, cache: str, tokenizer: str, seed: int = 0) -> float | None:
    """Linear-probe top-1 of the teacher's own pooled features, read from the cache (view 0 of every
    valid sample: the class token, else the mean of the patch tokens), with the students' protocol
    (same splits, lr grid, refit, report split). What the targets carry about the label: an upper
    reference for students trained on them. ``None`` for code targets."""
    import numpy as np
    import torch

    from teacher_cache.store import open_root, open_shard, shard_ids, tokenizer_info

    from .probe import ProbeConfig, make_splits, probe_features

    ds = load_dataset(data)
    root = open_root(cache)
    info = tokenizer_info(root, tokenizer)
    if info.codes:
        return None
    sids = shard_ids(ds.shards)
    feats, labels = [], []
    for shard in ds.shards:
        targets = open_shard(root, tokenizer, sids[shard])
        valid = np.asarray(targets.g["valid"][:]).astype(bool)
        lab = np.asarray([-1 if x is None else x for x in ds.rows(shard)["label"]])
        keep = valid & (lab >= 0)
        x = targets.cls(slice(None), 0)  # view 0; no class token: the mean of the patch tokens
        x = targets.tokens(slice(None), 0).mean(1) if x is None else x
        feats.append(x[torch.from_numpy(keep)])
        labels.append(torch.from_numpy(lab[keep]))
    x, y = torch.cat(feats), torch.cat(labels).long()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # the probe's lr grid assumes unit-scale features
    pcfg = ProbeConfig(shards=data, kind="linear", random_init=True, student="tiny-test", out="-", seed=seed)
    splits = make_splits(y.numpy(), 0, pcfg.holdout, pcfg.select_fraction, seed)
    num_classes = max(int(y.max()) + 1, ds.info.get("num_classes") or 0)
    row = probe_features(pcfg, x[:, None], y, splits, ["teacher"], num_classes)[0]
    return row.top1


def _summary(result) -> dict:
    return {"top1": result.top1, "top5": result.top5, "best_layer": result.best_layer, "n_report": result.n_report}


def check_inputs(cfg: AblateConfig) -> None:
    """What the config alone cannot tell, checked before anything is written: the output location,
    the dataset and the weights files (and their teachers' names)."""
    from teacher_cache.teachers import PRESETS, list_teachers
    from teacher_cache.teachers.registry import split_name

    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"out {cfg.out} exists and is not a directory; choose another --out")
    runs = os.path.join(cfg.out, "runs")
    if os.path.isdir(runs) and any(os.path.exists(os.path.join(runs, d, "config.json")) for d in os.listdir(runs)):
        # Runs are never overwritten (train refuses too, but only after the extraction): say so up front.
        raise ValueError(f"out {cfg.out} already holds the runs of an ablation; choose another --out")
    if cfg.shards:
        try:
            load_dataset(cfg.shards)
        except (FileNotFoundError, ValueError) as e:
            raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(f"shards: {e}") from None
    for name, path in cfg.weights:
        if split_name(name)[0] not in list_teachers():
            raise ValueError(
                f"weights: unknown teacher {name!r}: families are {list_teachers()}, presets are {sorted(PRESETS)}"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights: {path} not found (weights of teacher {name!r})")


def run_ablation(cfg: AblateConfig) -> dict:
    t_start = time.perf_counter()
    check_inputs(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    variants = RECIPES[cfg.recipe](cfg)
    data = _dataset(cfg)
    cache, bytes_per_view = _extract(cfg, data, variants)
    records: list[RunRecord] = []
    for v in variants:
        for seed in range(cfg.seeds):
            run = os.path.join(cfg.out, "runs", f"{slug(v.name)}_s{seed}")
            student = StudentConfig(size=cfg.student, decoder_depth=v.decoder_depth, stem=cfg.stem)
            tcfg = TrainConfig(
                data=DataConfig(
                    shards=data,
                    cache=cache,
                    tokenizer=v.tokenizer,
                    img_size=student.encoder_config().img_size,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.workers,
                    seed=seed,
                ),
                out=run,
                student=student,
                objective=v.objective,
                order=v.order,
                steps=cfg.steps,
                seed=seed,
                optim=OptimConfig(base_lr=cfg.base_lr, warmup=0.1),
                log_every=max(1, cfg.steps // 40),
            )
            print(f"== {v.name} (seed {seed}): {v.objective} on {v.teacher.name} [{v.storage.dtype}]")
            t0 = time.perf_counter()
            result = train(tcfg)
            lin, knn = _probe(cfg, data, run, seed)
            records.append(
                RunRecord(
                    v.name,
                    seed,
                    run,
                    time.perf_counter() - t0,
                    result.final_loss,
                    [h["loss"] for h in result.history],
                    lin["top1"],
                    lin["top5"],
                    lin["best_layer"],
                    knn["top1"] if knn else None,
                    blind_loss=next((h["blind_loss"] for h in result.history if "blind_loss" in h), None),
                    loss_steps=[int(h["step"]) for h in result.history],
                )
            )
    floors = []
    for seed in range(cfg.seeds):
        lin, knn = _probe(cfg, data, records[0].run if records else None, seed, floor=True)
        floors.append(
            RunRecord(
                "random-init",
                seed,
                "",
                0.0,
                float("nan"),
                [],
                lin["top1"],
                lin["top5"],
                lin["best_layer"],
                knn["top1"] if knn else None,
            )
        )
    ceilings = {}
    for v in variants:
        if v.tokenizer not in ceilings:
            top1 = teacher_ceiling(data, cache, v.tokenizer)
            if top1 is not None:
                ceilings[v.tokenizer] = {"teacher": v.teacher.name, "storage": v.storage.dtype, "linear_top1": top1}
    classes = load_dataset(data).info.get("num_classes") or cfg.num_classes
    results = _results(cfg, variants, records, floors, bytes_per_view, time.perf_counter() - t_start, classes)
    results["ceilings"] = ceilings
    results["n_report"] = lin["n_report"]  # samples every linear probe above was scored on (same split)
    _write_report(cfg, results)
    return results


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def _results(
    cfg: AblateConfig,
    variants: list[Variant],
    records: list[RunRecord],
    floors: list[RunRecord],
    bytes_per_view: dict[str, float],
    seconds: float,
    num_classes: int,
) -> dict:
    rows = []
    for v in variants:
        mine = [r for r in records if r.variant == v.name]
        top1, std = _mean_std([r.linear_top1 for r in mine])
        knn, knn_std = _mean_std([r.knn_top1 for r in mine if r.knn_top1 is not None])
        rows.append(
            {
                "variant": v.name,
                "teacher": v.teacher.name,
                "objective": v.objective,
                "order": v.order or "default",
                "storage": v.storage.dtype,
                "decoder_depth": v.decoder_depth,
                "bytes_per_view": bytes_per_view.get(v.tokenizer, float("nan")),
                "train_seconds": statistics.fmean(r.train_seconds for r in mine),
                "linear_top1": top1,
                "linear_top1_std": std,
                "knn_top1": knn,
                "knn_top1_std": knn_std,
                "best_layer": [r.best_layer for r in mine],
                "seeds": len(mine),
                "loss_vs_blind": _mean_std([r.final_loss / r.blind_loss for r in mine if r.blind_loss])[0],
            }
        )
    f1, fstd = _mean_std([r.linear_top1 for r in floors])
    fk, fkstd = _mean_std([r.knn_top1 for r in floors if r.knn_top1 is not None])
    rows.append(
        {
            "variant": "random-init (floor)",
            "teacher": "-",
            "objective": "-",
            "order": "-",
            "storage": "-",
            "decoder_depth": "-",
            "bytes_per_view": 0.0,
            "train_seconds": 0.0,
            "linear_top1": f1,
            "linear_top1_std": fstd,
            "knn_top1": fk,
            "knn_top1_std": fkstd,
            "best_layer": [r.best_layer for r in floors],
            "seeds": len(floors),
            "loss_vs_blind": float("nan"),
        }
    )
    return {
        "config": asdict(cfg),
        "rows": rows,
        "runs": [asdict(r) for r in records + floors],
        "chance": 1.0 / num_classes,
        "seconds": seconds,
    }


def format_table(results: dict) -> str:
    head = (
        "| variant | teacher | objective | order | storage | bytes/view | train s | loss / blind | linear top-1 "
        "| k-NN top-1 |\n|---|---|---|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in results["rows"]:
        pm = f" ± {r['linear_top1_std']:.3f}" if r["seeds"] > 1 else ""
        kpm = f" ± {r['knn_top1_std']:.3f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['variant']} | {r['teacher']} | {r['objective']} | {r['order']} | {r['storage']} | "
            f"{r['bytes_per_view']:.0f} | {r['train_seconds']:.0f} | {_fmt(r.get('loss_vs_blind'))} | "
            f"{r['linear_top1']:.3f}{pm} | "
            f"{r['knn_top1']:.3f}{kpm} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def noise_margin(a: float, b: float, n: int | None) -> float | None:
    """Two standard errors of the difference of two accuracies, each on ``n`` samples (binomial,
    at their mean): a gap smaller than this is not evidence of a difference. None without ``n``."""
    if not n:
        return None
    p = min(max((a + b) / 2, 1.0 / n), 1 - 1.0 / n)
    return 2 * (2 * p * (1 - p) / n) ** 0.5


def findings(results: dict) -> list[str]:
    """Plain statements the numbers support (or contradict), for the report."""
    rows = {r["variant"]: r for r in results["rows"]}
    floor = rows["random-init (floor)"]["linear_top1"]
    out = [f"Chance is {results['chance']:.3f}; the random-init floor reaches {floor:.3f}."]
    best = max((r for r in results["rows"] if r["variant"] != "random-init (floor)"), key=lambda r: r["linear_top1"])
    out.append(f"Best variant: {best['variant']} at {best['linear_top1']:.3f} linear top-1.")
    pixel = [r for r in results["rows"] if r["teacher"].startswith("pixel")]
    semantic = [r for r in results["rows"] if r["teacher"] not in ("-",) and not r["teacher"].startswith("pixel")]
    if pixel and semantic:
        p, s = max(x["linear_top1"] for x in pixel), max(x["linear_top1"] for x in semantic)
        margin = noise_margin(s, p, results.get("n_report"))
        if margin is not None and abs(s - p) <= margin:
            out.append(
                f"Semantic vs pixel targets: {s:.3f} vs {p:.3f}, a difference within noise (±{margin:.3f}: two "
                f"standard errors on {results['n_report']} report samples); this run does not separate them."
            )
        else:
            verdict = "beat" if s > p else "did NOT beat"
            beyond = f"; beyond noise, two standard errors ±{margin:.3f}" if margin is not None else ""
            out.append(f"Semantic teacher targets {verdict} pixel targets ({s:.3f} vs {p:.3f}{beyond}).")
    ceil = results.get("ceilings", {})
    if ceil:
        best_t = max(ceil.values(), key=lambda c: c["linear_top1"])
        out.append(
            f"The targets themselves carry the label up to {best_t['linear_top1']:.3f} linear top-1 "
            f"({best_t['teacher']}'s pooled features); a student probe far below that has not yet learned "
            "what its targets know (a longer schedule, more data or a larger student closes the gap)."
        )
    trained = [r for r in results["rows"] if r["variant"] != "random-init (floor)"]
    blindish = [r["variant"] for r in trained if (x := r.get("loss_vs_blind")) is not None and x == x and x > 0.97]
    if blindish:
        out.append(
            f"Final loss within 3% of the input-blind baseline (per-position mean target): "
            f"{', '.join(blindish)} — the loss fell, but almost nothing of that needed the image."
        )
    n = results.get("n_report")
    near = [
        r["variant"]
        for r in trained
        if r["linear_top1"] > floor
        and (m := noise_margin(r["linear_top1"], floor, n)) is not None
        and r["linear_top1"] - floor <= m
    ]
    if near:
        out.append(f"Above the floor only within noise: {', '.join(near)}.")
    clear = [
        f"{r['variant']} (+{r['linear_top1'] - floor:.3f}, ±{m:.3f})"
        for r in trained
        if (m := noise_margin(r["linear_top1"], floor, n)) is not None and r["linear_top1"] - floor > m
    ]
    if clear:
        out.append(f"Above the floor beyond noise (gap, two standard errors): {', '.join(clear)}.")
    below = [r["variant"] for r in trained if r["linear_top1"] <= floor]
    if below:
        out.append(
            f"At or below the random-init floor: {', '.join(below)} — too short a schedule, or a target "
            "that carries little class information."
        )
    return out


def _ceiling_table(results: dict) -> list[str]:
    ceil = results.get("ceilings", {})
    if not ceil:
        return []
    lines = [
        "Teacher features (the targets' own pooled features from the cache, same linear protocol):",
        "",
        "| tokenizer | teacher | storage | linear top-1 |",
        "|---|---|---|---:|",
    ]
    lines += [f"| {k} | {c['teacher']} | {c['storage']} | {c['linear_top1']:.3f} |" for k, c in ceil.items()]
    return lines + [""]


def _write_report(cfg: AblateConfig, results: dict) -> None:
    from . import plots

    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    figs = plots.write_plots(results, cfg.out)
    c = results["config"]
    md = [
        f"# Ablation `{cfg.recipe}`",
        "",
        f"Student `{c['student']}`, {c['steps']} steps x batch {c['batch_size']}, {c['seeds']} seed(s); "
        f"linear probe (best layer, selected without the report split) and k-NN; total {results['seconds']:.0f}s.",
        "",
        format_table(results),
        "",
        *_ceiling_table(results),
        "## Findings",
        "",
        *[f"- {x}" for x in findings(results)],
        "",
        "## Plots",
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figs],
        "",
    ]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(format_table(results))
    print("\n".join(_ceiling_table(results)))
    print("\n".join(findings(results)))
    print(f"report: {os.path.join(cfg.out, 'report.md')}")
