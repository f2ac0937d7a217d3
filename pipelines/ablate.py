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

from student.train import TrainConfig, train
from teacher_cache.config import ExtractConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import run_extract
from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
from teacher_cache.store import slug
from teacher_cache.views import AugConfig

# The names below are looked up here at call time (bench/e2e.py times the stages by patching them).
from .config import AblateConfig
from .noise import noise_margin
from .probe import ProbeConfig, run_probes
from .recipes import COMPARISONS, RECIPES, Variant, cache_dir, dataset_dir
from .report import RunRecord, findings, format_table, results_table
from .report import write_report as _write_report
from .rerun import ablation_lock, check_earlier_runs, earlier_run, probe_record, read_history

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
    network, untrained. Probes an earlier ablation in this directory already wrote for this very config,
    encoder and probe set are read back instead (``pipelines/rerun.py``)."""
    out = os.path.join(cfg.out, "runs", f"random-init_s{seed}") if floor else None
    if out:
        os.makedirs(out, exist_ok=True)
    kinds = ("linear", "knn") if cfg.knn else ("linear",)
    cfgs = [
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
    after = [os.path.join(data, "dataset.json")] + ([os.path.join(run, "summary.json")] if run else [])
    earlier = [probe_record(c.out_path(), asdict(c), after) for c in cfgs]
    if all(earlier):
        print(f"   probes of {run or 'the random-init floor'}: read back (written by an earlier run)", flush=True)
        return _summary_of(earlier[0]), (_summary_of(earlier[1]) if cfg.knn else None)
    results = run_probes(cfgs)
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
    A run an earlier ablation finished with this very config and cache is not trained again, and one it
    left unfinished resumes from its last checkpoint (``pipelines/rerun.py``). Module-level, so that a
    spawned process can run it."""
    print(f"== {job.label}", flush=True)
    t0 = time.perf_counter()
    same, done = earlier_run(job.train)
    if done is not None:
        print(f"   {job.train.out}: finished earlier with this config and cache; not trained again", flush=True)
        final_loss, history = float(done["final_loss"]), read_history(job.train.out)
    else:
        if same:
            print(f"   {job.train.out}: unfinished with this config and cache; resuming", flush=True)
        result = train(replace(job.train, resume=True) if same else job.train)
        final_loss, history = result.final_loss, result.history
    lin, knn = _probe(cfg, probe_data, job.train.out, job.seed)
    return RunRecord(
        job.variant,
        job.seed,
        job.train.out,
        float(done["seconds"]) if done is not None else time.perf_counter() - t0,
        final_loss,
        [h["loss"] for h in history],
        lin["top1"],
        lin["top5"],
        lin["best_layer"],
        knn["top1"] if knn else None,
        blind_loss=next((h["blind_loss"] for h in history if "blind_loss" in h), None),
        loss_steps=[int(h["step"]) for h in history],
        report_correct=lin["correct"],
        knn_correct=knn["correct"] if knn else None,
        reused=done is not None,
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


def _summary_of(record: dict) -> dict:
    """:func:`_summary` of a probe result read back from its JSON."""
    return {k: record[k] for k in ("top1", "top5", "best_layer", "n_report")} | {"correct": record["report_correct"]}


def check_inputs(cfg: AblateConfig) -> None:
    """What the config alone cannot tell, checked before anything is written: the output location,
    the dataset and the weights files (and their teachers' names)."""
    from teacher_cache.teachers import PRESETS, list_teachers
    from teacher_cache.teachers.registry import split_name

    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {cfg.recipe!r}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"out {cfg.out} exists and is not a directory; choose another --out")
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
    """Extract every variant's cache, train and probe each variant for each seed, probe the random-init
    floor and the teachers, and write the report; see the module docstring."""
    check_inputs(cfg)
    with ablation_lock(cfg.out):
        return _run_ablation(cfg)


def _run_ablation(cfg: AblateConfig) -> dict:
    t_start = time.perf_counter()
    variants = RECIPES[cfg.recipe](cfg)
    jobs = []
    # seed-major: an ablation cut short has whole seeds of every row, not every seed of the first rows
    for seed in range(cfg.seeds):
        for v in variants:
            run = os.path.join(cfg.out, "runs", f"{slug(v.name)}_s{seed}")
            tcfg = replace(v.train, data=replace(v.train.data, tokenizer=v.tokenizer, seed=seed), out=run, seed=seed)
            label = f"{v.name} (seed {seed}): {tcfg.objective} on {v.teacher.name} [{v.storage.dtype}]"
            jobs.append(Job(v.name, seed, label, tcfg))
    check_earlier_runs([j.train for j in jobs])
    data = _dataset(cfg)
    probe_data = _probe_dataset(cfg, data)
    cache, bytes_per_view = _extract(cfg, variants)
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
