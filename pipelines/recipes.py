"""Ablation recipes: small functions, each a list of variants (the paper's tables, in shape).

Every recipe starts from the same two base configs — :func:`base_extract` (what the cache holds) and
:func:`base_train` (how a student trains) — and each variant is a ``dataclasses.replace`` of them, so a
variant reads as its diff against the base and no option is retyped here. The runner
(``pipelines/ablate.py``) fills in what only it knows: each run's directory, seed and cache group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING

from student.config import DataConfig
from student.objectives import StudentConfig
from student.sizes import vit_config
from student.train import OptimConfig, TrainConfig
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.registry import Registry
from teacher_cache.store import slug
from teacher_cache.views import AugConfig

from .config import SEMANTIC as SEMANTIC  # re-exported: the recipes vary around it

if TYPE_CHECKING:
    from .config import AblateConfig


# 4x4 tokens: one per 2x2 cluster of a 64 px / patch-8 student; 4x cheaper to extract than at 256 px
@dataclass(frozen=True)
class Variant:
    """One row of the report: what to extract (one teacher, one storage form) and how to train on it."""

    name: str
    extract: ExtractConfig
    """A ``replace`` of the recipe's :func:`base_extract` with this variant's one teacher."""
    train: TrainConfig
    """A ``replace`` of :func:`base_train`; the runner sets its tokenizer, run directory and seed."""
    varies: tuple[str, ...] = ()
    """Where this variant departs from its recipe's base, as dotted config paths (``extract.teachers``,
    ``train.objective``): what its name says is varied, and nothing else may be (``config_diff``; a test
    checks every recipe). Empty for the base row itself."""

    @property
    def teacher(self) -> TeacherConfig:
        return self.extract.teachers[0]

    @property
    def storage(self) -> StorageConfig:
        return self.extract.storage

    @property
    def tokenizer(self) -> str:
        """The cache group: teacher and storage form, so one cache holds every form side by side."""
        return f"{self.teacher.group_name}-{self.storage.dtype}"


def config_diff(a, b, prefix: str = "") -> set[str]:
    """Dotted paths of the fields where dataclass ``a`` and ``b`` differ, descending into nested dataclasses
    (a tuple of them, such as ``teachers``, is one field)."""
    out: set[str] = set()
    for f in fields(a):
        x, y, path = getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}"
        if is_dataclass(x) and is_dataclass(y) and type(x) is type(y):
            out |= config_diff(x, y, path + ".")
        elif x != y:
            out.add(path)
    return out


def variant_diff(v: Variant, base: tuple[ExtractConfig, TrainConfig]) -> set[str]:
    """Where ``v`` departs from ``base`` (its recipe's base extract and train configs)."""
    return config_diff(base[0], v.extract, "extract.") | config_diff(base[1], v.train, "train.")


def dataset_dir(cfg: AblateConfig) -> str:
    return cfg.shards or os.path.join(cfg.out, "data")


def cache_dir(cfg: AblateConfig) -> str:
    return cfg.cache or os.path.join(cfg.out, "cache")


def base_extract(cfg: AblateConfig) -> ExtractConfig:
    """The extraction every variant is a ``replace`` of: the semantic teacher, fp16, ``cfg.views`` views."""
    return ExtractConfig(
        shards=dataset_dir(cfg),
        out=cache_dir(cfg),
        teachers=(_semantic(cfg),),
        aug=AugConfig(views=cfg.views),
        storage=StorageConfig(),
        batch_size=32,
        executor=cfg.executor,
    )


def base_train(cfg: AblateConfig) -> TrainConfig:
    """The training run every variant is a ``replace`` of: D-iGPT, its default order and decoders, the
    ablation's student, steps, batch and lr (10 % warmup: short schedules)."""
    student = StudentConfig(size=cfg.student, stem=cfg.stem, decoder_dim=cfg.decoder_dim)
    return TrainConfig(
        data=DataConfig(
            shards=dataset_dir(cfg),
            cache=cache_dir(cfg),
            tokenizer=None,
            img_size=student.encoder_config().img_size,
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
        ),
        out=os.path.join(cfg.out, "runs"),
        student=student,
        steps=cfg.steps,
        optim=OptimConfig(base_lr=cfg.base_lr, warmup=0.1),
        log_every=max(1, cfg.steps // 40),
    )


def teacher(base: ExtractConfig, t: TeacherConfig, **storage) -> ExtractConfig:
    """``base`` extracting teacher ``t`` alone (and a storage form that differs by ``storage``)."""
    return replace(base, teachers=(t,), storage=replace(base.storage, **storage))


def student(base: TrainConfig, **changes) -> TrainConfig:
    """``base`` with a student that differs by ``changes`` (``decoder_depth=1``)."""
    return replace(base, student=replace(base.student, **changes))


RECIPES: Registry[Callable[[AblateConfig], list[Variant]]] = Registry("recipe")
"""Each recipe: ``fn(cfg) -> variants``; its ``meta["base"]``: the configs its variants' ``varies`` are
relative to."""


def recipe_base(name: str) -> Callable[[AblateConfig], tuple[ExtractConfig, TrainConfig]]:
    """Recipe ``name``'s base configs (the ones its variants are diffs of)."""
    return RECIPES.meta(name)["base"]


def default_base(cfg: AblateConfig) -> tuple[ExtractConfig, TrainConfig]:
    return base_extract(cfg), base_train(cfg)


def recipe(name: str, base: Callable[[AblateConfig], tuple[ExtractConfig, TrainConfig]] = default_base):
    """Register a recipe; ``base``: the configs its variants are diffs of (default :func:`default_base`)."""

    return RECIPES.register(name, base=base)


def _pixel(cfg: AblateConfig) -> TeacherConfig:
    # the student's own patches, normalised per patch as the teacher stores them (MAE norm-pix): one target
    # token per student patch; trained with the same target normalisation as every other tokenizer
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


T, OBJ, ORD, DEPTH = "extract.teachers", "train.objective", "train.order", "train.student.decoder_depth"


@recipe("demo")
def demo_recipe(cfg: AblateConfig) -> list[Variant]:
    """Pixel targets vs the shipped semantic teacher, both with D-iGPT, the tokenizer the only difference."""
    ex, tr = base_extract(cfg), base_train(cfg)
    return [Variant("digpt/pixel", teacher(ex, _pixel(cfg)), tr, (T,)), Variant("digpt/semantic", ex, tr)]


@recipe("learning")
def learning_recipe(cfg: AblateConfig) -> list[Variant]:
    """Does pretraining teach anything here? Feature distillation and D-iGPT on the semantic teacher, D-iGPT
    on pixel targets, against the random-init floor (the study in LEARNING.md)."""
    ex, tr = base_extract(cfg), base_train(cfg)
    return [
        Variant("fd/semantic", ex, replace(tr, objective="fd"), (OBJ,)),
        Variant("digpt/semantic", ex, tr),
        Variant("digpt/pixel", teacher(ex, _pixel(cfg)), tr, (T,)),
    ]


@recipe("tokenizers")
def tokenizers_recipe(cfg: AblateConfig) -> list[Variant]:
    """Paper Tables 5/6: one objective (D-iGPT), one target normalisation, several tokenizers; headline
    teachers when weights are given. ``kmeans-centroids`` regresses the centroid vectors of k-means codes of
    the semantic teacher (codes as a storage form); DiGIT's own model over the codes is objective ``digit``."""
    ex, tr = base_extract(cfg), base_train(cfg)
    kmeans = TeacherConfig(
        f"kmeans:{cfg.semantic_teacher}", group="kmeans", codebook_size=64, fit_samples=min(256, cfg.num_samples)
    )
    out = [
        Variant("digpt/pixel", teacher(ex, _pixel(cfg)), tr, (T,)),
        Variant("digpt/kmeans-centroids", teacher(ex, kmeans), tr, (T,)),
        Variant("digpt/semantic", ex, tr),
    ]
    for name, path in cfg.weights:
        t = TeacherConfig(name, weights=path, group=slug(name))
        out.append(Variant(f"digpt/{name}", teacher(ex, t), tr, (T,)))
    return out


@recipe("decoders")
def decoders_recipe(cfg: AblateConfig) -> list[Variant]:
    """Paper Tables 8/9: D-iGPT vs generative-only vs feature distillation; decoder depth 1/2/4."""
    ex, tr = base_extract(cfg), base_train(cfg)
    return [
        Variant("digpt", ex, tr),
        Variant("gen", ex, replace(tr, objective="gen"), (OBJ,)),
        Variant("fd", ex, replace(tr, objective="fd"), (OBJ,)),
        Variant("digpt/depth1", ex, student(tr, decoder_depth=1), (DEPTH,)),
        Variant("digpt/depth4", ex, student(tr, decoder_depth=4), (DEPTH,)),
    ]


@recipe("orders")
def orders_recipe(cfg: AblateConfig) -> list[Variant]:
    """iGPT's raster vs D-iGPT's random vs SemAIM's published order (``semaim``), with D-iGPT."""
    ex, tr = base_extract(cfg), base_train(cfg)
    return [Variant(f"digpt/{o}", ex, replace(tr, order=o), (ORD,)) for o in ("raster", "random", "semaim")]


@recipe("storage")
def storage_recipe(cfg: AblateConfig) -> list[Variant]:
    """Bytes per view against probe accuracy: fp16, int8, PCA-reduced and k-means codes of the same teacher."""
    ex, tr = base_extract(cfg), base_train(cfg)
    fit, name = min(512, cfg.num_samples), cfg.semantic_teacher
    pca = TeacherConfig(f"pca:{name}", group="pca64", pca_dim=min(64, _token_dim(name)), fit_samples=fit)
    codes = TeacherConfig(f"kmeans:{name}", group="kmeans256", codebook_size=256, fit_samples=fit)
    dtype = "extract.storage.dtype"
    return [
        Variant("fp16", ex, tr),
        Variant("int8", teacher(ex, _semantic(cfg), dtype="int8"), tr, (dtype,)),
        Variant("bf16", teacher(ex, _semantic(cfg), dtype="bf16"), tr, (dtype,)),
        Variant("pca-64", teacher(ex, pca), tr, (T,)),
        Variant("codes-256", teacher(ex, codes), tr, (T,)),
    ]


STORED_VIEWS = 8
"""The ``views`` recipe's cache: 8 views per sample, of which each variant trains on the first K."""


def views_base(cfg: AblateConfig) -> tuple[ExtractConfig, TrainConfig]:
    """One cache of 8 views per sample (its own, unless the ablation's caches already store 8), feature
    distillation, every stored view."""
    cache = cache_dir(cfg) if cfg.views == STORED_VIEWS else f"{cache_dir(cfg).rstrip('/')}-{STORED_VIEWS}views"
    ex = replace(base_extract(cfg), aug=AugConfig(views=STORED_VIEWS), out=cache)
    tr = replace(base_train(cfg), objective="fd")
    return ex, replace(tr, data=replace(tr.data, cache=cache))


@recipe("views", base=views_base)
def views_recipe(cfg: AblateConfig) -> list[Variant]:
    """How many views should a cache store? One cache of 8 views per sample; students trained on the first
    K = 1, 2, 4, 8 of them (``max_views``), against the online teacher on a new crop every epoch
    (``fresh_views``: as many views as epochs), all for the same steps. Feature distillation: its targets are
    the cached tokens themselves (the distillation literature's question, where precomputed targets are
    reported to overfit), and it is the objective that learns fastest on a CPU (LEARNING.md §2)."""
    ex, tr = views_base(cfg)
    k_views = [
        Variant(f"fd/K={k}", ex, replace(tr, data=replace(tr.data, max_views=k)), ("train.data.max_views",))
        for k in (1, 2, 4, 8)
    ]
    fresh = replace(tr, online_teacher=True, data=replace(tr.data, fresh_views=True))
    return [*k_views, Variant("fd/online, fresh views", ex, fresh, ("train.online_teacher", "train.data.fresh_views"))]


COMPARISONS: dict[str, tuple[tuple[str, ...], str]] = {
    "objectives (paper Tables 7, 9)": (
        ("digpt", "gen", "fd", "masked"),
        "D-iGPT 86.2 > generative decoder only > feature distillation 84.9; masked prediction (EVA-style, CLIP "
        "targets) 85.0 at best",
    ),
    "decoder depth (Table 8)": (("digpt/depth1", "digpt"), "2 blocks 86.2 > 1 block 85.6"),
    "orders": (
        ("digpt/raster", "digpt", "digpt/semaim"),
        "SemAIM: its semantic-aware order > random > raster (with pixel targets and its own model)",
    ),
    "tokenizers (Table 5)": (
        ("digpt/pixel", "digpt/kmeans-centroids", "digpt"),
        "semantic teacher (CLIP 86.2, DINO 84.7) > VQVAE codes 82.3 > pixels (iGPT 82.0)",
    ),
    "storage forms": (("digpt", "int8", "pca-64"), "— (not in the paper: the cache's own question)"),
}
"""The ``all`` recipe's comparisons: ``{title: (its rows, the paper's direction)}``. Each row is a variant
of the one base (D-iGPT on the semantic teacher, fp16, random order, 2-block decoders), named ``digpt``;
every other row varies one thing from it, so one run of the base serves every comparison."""


@recipe("all")
def all_recipe(cfg: AblateConfig) -> list[Variant]:
    """The paper's comparisons in one run: one base and every row that varies one thing from it (the
    objectives, decoder depth, orders, tokenizers and storage forms of :data:`COMPARISONS`); each row is
    trained once however many comparisons read it. 11 students at the demo's defaults: ~380-400 s of
    training each on 2 quiet CPU cores (BENCHMARKS.md #21.3), measured end to end: 8726 s for two
    seeds at ``--decoder-dim 48`` (~73 min a seed; LEARNING.md §14)."""
    ex, tr = base_extract(cfg), base_train(cfg)
    pool: dict[str, Variant] = {"digpt": Variant("digpt", ex, tr)}
    for v in decoders_recipe(cfg) + orders_recipe(cfg) + tokenizers_recipe(cfg)[:2] + storage_recipe(cfg):
        pool.setdefault(v.name, v)
    pool["masked"] = Variant("masked", ex, replace(tr, objective="masked"), (OBJ,))
    wanted = list(dict.fromkeys(n for rows, _ in COMPARISONS.values() for n in rows))
    return [pool[n] for n in wanted]
