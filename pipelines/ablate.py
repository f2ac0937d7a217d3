"""``digpt ablate RECIPE``: train several students against several caches and write one report.

A recipe (``pipelines/recipes.py``) is a small function returning variants, each a ``replace`` of one base
extract config and one base train config (teacher, storage form, objective, order, decoder shape). This
module runs them; ``pipelines/report.py`` writes what they measured. Each distinct (teacher, storage) is extracted once into one cache and
reused by every variant that needs it — the point of the cache. Every variant is trained for each
seed, probed (linear, best layer; plus k-NN), and compared with a random-init floor of the same
student. Output: ``report.md`` (one table), ``results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

from student.sizes import list_vit_sizes, vit_config
from student.train import TrainConfig, train
from student.vit import STEMS
from teacher_cache.config import ExtractConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import run_extract
from teacher_cache.prepare import MAX_CLASSES, MIN_CLASSES, SyntheticConfig, prepare_synthetic
from teacher_cache.store import slug
from teacher_cache.views import AugConfig

# The names below are looked up here at call time (bench/e2e.py times the stages by patching them).
from .probe import ProbeConfig, run_probes
from .recipes import COMPARISONS, RECIPES, SEMANTIC, Variant, cache_dir, dataset_dir
from .report import RunRecord, findings, format_table, noise_margin, results_table
from .report import write_report as _write_report

__all__ = [
    "RECIPES",
    "AblateConfig",
    "RunRecord",
    "Variant",
    "findings",
    "format_table",
    "noise_margin",
    "run_ablation",
    "teacher_ceiling",
]


@dataclass(frozen=True)
class AblateConfig:
    """``digpt ablate``."""

    recipe: str
    """all, tokenizers, decoders, orders, storage, views, learning or demo (see :data:`RECIPES`)."""
    out: str
    """Output directory: data/, cache/, runs/, report.md, results.json, *.png."""
    shards: str | None = None
    """A prepared dataset to use; default: generate a synthetic one under ``out/data``."""
    num_samples: int = 2048
    """Synthetic set size (when ``shards`` is not given): 2048 gives 512 report samples."""
    num_classes: int = 8
    """Synthetic classes."""
    image_size: int | None = None
    """Student input size (and the synthetic images' size); default: the student's. Given, it must match."""
    student: str = "demo-cpu"
    """Student encoder preset (``demo-cpu``: the convolutional stem without which a small ViT learns nothing
    in a CPU budget, LEARNING.md §1)."""
    steps: int = 1200
    """Optimizer steps per student (D-iGPT needs about 1200 on a CPU to pass the floor clearly, LEARNING.md §2)."""
    batch_size: int = 64
    """Samples per step."""
    base_lr: float = 8e-3
    """Learning rate per 256 samples (peak 2e-3 at batch 64: what the study found a 4-block student needs,
    LEARNING.md §2; ImageNet recipes use far less)."""
    seeds: int = 1
    """Seeds per variant (mean +- std when > 1)."""
    views: int = 2
    """Augmented views per sample in the cache."""
    executor: str = "ray"
    """Extraction executor."""
    workers: int = 1
    """Loader workers per training run."""
    jobs: int = 1
    """Training runs (each with its probes) at once, each in a process of its own with cores / jobs torch
    threads; 0: as many as there are runs, up to the cores (1 on a GPU). For a many-core machine: on the
    project's 2 cores two demo students side by side took as long as one after the other (BENCHMARKS.md,
    issue #21). A run's numbers depend on its thread count in the last bits only."""
    weights: tuple[tuple[str, str], ...] = ()
    """(teacher name, local weights file) pairs: headline teachers join the ``tokenizers`` recipe."""
    knn: bool = True
    """Also report k-NN accuracy."""
    semantic_teacher: str = SEMANTIC
    """The semantic tokenizer the recipes vary around (needs a grid that splits into the clusters;
    EfficientNet-Lite0 at 128 px: 4x4 tokens, one per 2x2 cluster of a 64 px / patch-8 student)."""
    cache: str | None = None
    """Cache location; default ``out/cache`` (point several ablations at one cache to share extraction)."""
    stem: str | None = None
    """Student patch embedding, ``patch`` or ``conv``; None: the preset's (``student/vit.py``)."""
    decoder_dim: int | None = None
    """Width of the students' decoders; None: the encoder's (``StudentConfig.decoder_dim``)."""
    probe_shards: str | None = None
    """A labelled dataset the probes fit and report on; None: a generated one (``probe_samples``) when the
    pretraining data is generated, else a held-out quarter of ``shards``."""
    probe_samples: int = 8192
    """Size of the generated probe set: other images of the same generator, never seen in pretraining
    (a quarter is reported on: 8192 gives 2048 report samples). A probe fit on 6144 images and scored on
    2048 separates the pixel student from the floor (+0.030 +- 0.012 over 3 seeds) where one fit on 1536
    and scored on 512 could not (+0.023 +- 0.023; LEARNING.md §10). 0: probe on a held-out quarter of the
    pretraining set, as before."""

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
        if self.stem is not None and self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS} or None (the preset's), got {self.stem!r}")
        if self.decoder_dim is not None and self.decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1 or None (the encoder's width), got {self.decoder_dim}")
        if self.jobs < 0:
            raise ValueError(f"jobs must be >= 0 (0: as many as the cores allow), got {self.jobs}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.probe_samples < 0:
            raise ValueError(
                f"probe_samples must be >= 0 (0: a holdout of the pretraining set), got {self.probe_samples}"
            )
        if self.probe_samples and self.probe_samples < 4 * self.num_classes:
            raise ValueError(
                f"probe_samples must be 0 or >= 4 * num_classes ({4 * self.num_classes}), got {self.probe_samples}"
            )
        if self.weights and self.recipe != "tokenizers":
            raise ValueError(
                f"weights add teachers to the tokenizers recipe only; recipe {self.recipe!r} would ignore them"
            )


def _dataset(cfg: AblateConfig) -> str:
    if cfg.shards:
        return cfg.shards
    return _synthetic(cfg, dataset_dir(cfg), cfg.num_samples, seed=0)


def _probe_dataset(cfg: AblateConfig, data: str) -> str:
    """Where the probes fit and report: ``probe_shards``; else a generated set of ``probe_samples`` other
    images (seed 1: sample i of seed 0 and of seed 1 are different images) when the pretraining set is
    generated; else ``data`` itself (its held-out quarter)."""
    if cfg.probe_shards:
        return cfg.probe_shards
    if cfg.shards or not cfg.probe_samples:
        return data
    return _synthetic(cfg, os.path.join(cfg.out, "probe"), cfg.probe_samples, seed=1)


def _synthetic(cfg: AblateConfig, data: str, num_samples: int, seed: int) -> str:
    want = SyntheticConfig(
        out=data,
        num_samples=num_samples,
        num_classes=cfg.num_classes,
        image_size=cfg.image_size,
        shard_size=max(16, num_samples // 4),
        seed=seed,
    )
    if os.path.exists(os.path.join(data, "dataset.json")):
        ds = load_dataset(data)
        if ds.info.get("config") == asdict(want):
            return data  # an earlier run of the same recipe: reuse its data (and cache)
    prepare_synthetic(want)
    return data


def _extract(cfg: AblateConfig, variants: list[Variant]) -> tuple[str, dict[str, float]]:
    """Extract each distinct (teacher, storage) once, each teacher under its variant's cache group: one
    extraction per distinct config besides the teachers. Returns the cache and bytes/view per tokenizer."""
    runs: dict[str, tuple[ExtractConfig, dict[str, TeacherConfig]]] = {}
    for v in variants:
        rest = json.dumps({k: x for k, x in asdict(v.extract).items() if k != "teachers"}, sort_keys=True, default=str)
        runs.setdefault(rest, (v.extract, {}))[1][v.tokenizer] = replace(v.teacher, group=v.tokenizer)
    bytes_per_view: dict[str, float] = {}
    for ex, teachers in runs.values():
        summary = run_extract(replace(ex, teachers=tuple(teachers.values())))
        print(summary.table())
        bytes_per_view.update({t.group: t.bytes_per_view for t in summary.tokenizers})
    return (variants[0].extract.out if variants else cache_dir(cfg)), bytes_per_view


def _probe(cfg: AblateConfig, data: str, run: str | None, seed: int, floor: bool = False) -> tuple[dict, dict | None]:
    """Probe ``run``'s encoder (linear, and k-NN on the same features); ``floor``: a seeded random encoder
    of ``run``'s architecture (of the ``student`` preset when there is no run), so the floor is the same
    network, untrained."""
    out = os.path.join(cfg.out, "runs", f"random-init_s{seed}") if floor else None
    if out:
        os.makedirs(out, exist_ok=True)
    kinds = ("linear", "knn") if cfg.knn else ("linear",)
    results = run_probes(
        [
            ProbeConfig(
                shards=data,
                run=run,
                kind=kind,
                random_init=floor,
                out=os.path.join(out, f"probe_{kind}.json") if out else None,
                seed=seed,
                student=None if run else cfg.student,
            )
            for kind in kinds
        ]
    )
    return _summary(results[0]), (_summary(results[1]) if cfg.knn else None)


PROBE_VIEW = AugConfig(views=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
"""The one view the teachers take of each probe image: the whole image, unflipped (what a probe sees)."""


def fitted(t: TeacherConfig) -> bool:
    """Whether the teacher is fitted on the data it extracts (k-means codes, PCA): run on the probe images it
    would be fitted to them, not the tokenizer the students were trained on."""
    return t.name.split(":", 1)[0] in ("kmeans", "pca")


def _extract_probe_set(cfg: AblateConfig, variants: list[Variant], probe_data: str, cache: str) -> str | None:
    """Each distinct continuous, unfitted (teacher, storage) once more, on the probe images (one whole-image
    view each), into ``<cache>-probe``: the teachers' own features are then probed on the students' probe
    set, split and protocol. Returns that cache (None when no variant has such a teacher)."""
    out = f"{cache.rstrip('/')}-probe"
    runs: dict[str, tuple[ExtractConfig, dict[str, TeacherConfig]]] = {}
    for v in variants:
        if fitted(v.teacher):
            continue
        ex = replace(v.extract, shards=probe_data, out=out, aug=PROBE_VIEW)
        rest = json.dumps({k: x for k, x in asdict(ex).items() if k != "teachers"}, sort_keys=True, default=str)
        runs.setdefault(rest, (ex, {}))[1][v.tokenizer] = replace(v.teacher, group=v.tokenizer)
    for ex, teachers in runs.values():
        print(run_extract(replace(ex, teachers=tuple(teachers.values()))).table())
    return out if runs else None


def teacher_ceiling(data: str, cache: str, tokenizer: str, seed: int = 0) -> dict | None:
    """The linear probe of the teacher's own pooled features read from ``cache`` over the images of ``data``
    (view 0 of every valid sample: the class token, else the mean of the patch tokens), with the students'
    protocol (same splits, lr grid, refit, report split): what the targets carry about the label.

    Returns ``{"linear_top1", "report_correct", "n_report"}`` (per report sample, 1 where right: paired with
    the students' and the floor's rows when the probe set is the same); ``None`` for code targets."""
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
    # keyed by the probe seed, as the students' rows are (``report._per_sample``): pairs with seed ``seed``
    return {"linear_top1": row.top1, "report_correct": {str(seed): row.correct}, "n_report": len(row.correct or [])}


def _ceilings(cfg: AblateConfig, variants: list[Variant], data: str, probe_data: str, cache: str) -> dict:
    """The teachers' own features, probed on the students' probe set (extracted there for the purpose); a
    teacher fitted on the pretraining images (k-means, PCA) is read from the pretraining cache instead, on a
    held-out quarter of those images, and says so (``same_probe_set`` False)."""
    probe_cache = _extract_probe_set(cfg, variants, probe_data, cache)
    out: dict[str, dict] = {}
    for v in variants:
        if v.tokenizer in out:
            continue
        same = probe_cache is not None and not fitted(v.teacher)
        row = (
            teacher_ceiling(probe_data, probe_cache, v.tokenizer) if same else teacher_ceiling(data, cache, v.tokenizer)
        )
        if row is not None:
            out[v.tokenizer] = {"teacher": v.teacher.name, "storage": v.storage.dtype, "same_probe_set": same, **row}
    return out


@dataclass(frozen=True)
class Job:
    """One training run of an ablation and its probes."""

    variant: str
    seed: int
    label: str
    train: TrainConfig


def train_and_probe(cfg: AblateConfig, probe_data: str, job: Job) -> RunRecord:
    """Train ``job`` and probe its encoder (linear, and k-NN on the same features): one row of the report.
    Module-level, so that a spawned process can run it."""
    print(f"== {job.label}", flush=True)
    t0 = time.perf_counter()
    result = train(job.train)
    lin, knn = _probe(cfg, probe_data, job.train.out, job.seed)
    return RunRecord(
        job.variant,
        job.seed,
        job.train.out,
        time.perf_counter() - t0,
        result.final_loss,
        [h["loss"] for h in result.history],
        lin["top1"],
        lin["top5"],
        lin["best_layer"],
        knn["top1"] if knn else None,
        blind_loss=next((h["blind_loss"] for h in result.history if "blind_loss" in h), None),
        loss_steps=[int(h["step"]) for h in result.history],
        report_correct=lin["correct"],
        knn_correct=knn["correct"] if knn else None,
    )


def plan_jobs(requested: int, runs: int, cores: int, cuda: bool) -> tuple[int, int]:
    """(runs at once, torch threads per run) for ``requested`` jobs (0: auto) on ``cores`` CPU cores: auto
    is one at a time on a GPU (the runs would share it), else as many as the runs, up to the cores."""
    n = requested or (1 if cuda else min(runs, cores))
    n = max(1, min(n, runs))
    return n, max(1, cores // n)


def _run_jobs(cfg: AblateConfig, probe_data: str, jobs: list[Job]) -> tuple[list[RunRecord], dict]:
    """Every job, in order of ``jobs``: here when one at a time, else in spawned processes."""
    import torch

    from teacher_cache.runtime import resolve_device, set_torch_threads, spawn_pool

    cuda = any(resolve_device(j.train.device).type == "cuda" for j in jobs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n, threads = plan_jobs(cfg.jobs, len(jobs), cores, cuda)
    info = {"jobs": n, "threads_per_run": threads if n > 1 else torch.get_num_threads()}
    if n == 1:
        return [train_and_probe(cfg, probe_data, j) for j in jobs], info
    print(f"== {len(jobs)} training runs, {n} at a time with {threads} torch thread(s) each", flush=True)
    # OpenMP sizes its pool when a process starts: set_num_threads alone left the runs 2x slower side by side.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({k: str(threads) for k in saved})
    try:
        pool = spawn_pool(n, set_torch_threads, (threads,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        futures = [pool.submit(train_and_probe, cfg, probe_data, j) for j in jobs]
        return [f.result() for f in futures], info
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _summary(result) -> dict:
    return {
        "top1": result.top1,
        "top5": result.top5,
        "best_layer": result.best_layer,
        "n_report": result.n_report,
        "correct": result.report_correct,
    }


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
    for name in ("shards", "probe_shards"):
        if getattr(cfg, name):
            try:
                load_dataset(getattr(cfg, name))
            except (FileNotFoundError, ValueError) as e:
                kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
                raise kind(f"{name}: {e}") from None
    if cfg.cache and os.path.exists(cfg.cache) and not os.path.isdir(cfg.cache):
        raise ValueError(f"cache {cfg.cache} exists and is not a directory; give a cache directory")
    if split_name(cfg.semantic_teacher)[0] not in list_teachers():
        raise ValueError(
            f"semantic_teacher: unknown teacher {cfg.semantic_teacher!r}: families are {list_teachers()}, "
            f"presets are {sorted(PRESETS)}"
        )
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
    probe_data = _probe_dataset(cfg, data)
    cache, bytes_per_view = _extract(cfg, variants)
    jobs = []
    for v in variants:
        for seed in range(cfg.seeds):
            run = os.path.join(cfg.out, "runs", f"{slug(v.name)}_s{seed}")
            tcfg = replace(v.train, data=replace(v.train.data, tokenizer=v.tokenizer, seed=seed), out=run, seed=seed)
            label = f"{v.name} (seed {seed}): {tcfg.objective} on {v.teacher.name} [{v.storage.dtype}]"
            jobs.append(Job(v.name, seed, label, tcfg))
    records, parallel = _run_jobs(cfg, probe_data, jobs)
    floors = []
    for seed in range(cfg.seeds):
        lin, knn = _probe(cfg, probe_data, records[0].run if records else None, seed, floor=True)
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
                report_correct=lin["correct"],
                knn_correct=knn["correct"] if knn else None,
            )
        )
    ceilings = _ceilings(cfg, variants, data, probe_data, cache)
    classes = load_dataset(data).info.get("num_classes") or cfg.num_classes
    results = results_table(cfg, variants, records, floors, bytes_per_view, time.perf_counter() - t_start, classes)
    results["ceilings"] = ceilings
    if cfg.recipe == "all":  # which rows each of the paper's comparisons reads, and the paper's direction
        results["comparisons"] = {t: {"rows": list(rows), "paper": paper} for t, (rows, paper) in COMPARISONS.items()}
    results["parallel"] = parallel  # runs at once and torch threads per run
    results["n_report"] = lin["n_report"]  # samples every linear probe above was scored on (same split)
    results["probe_data"] = {
        "shards": probe_data,
        "held_out": probe_data != data,  # images the students never saw in pretraining
        "samples": load_dataset(probe_data).num_samples,
    }
    _write_report(cfg, results)
    return results
