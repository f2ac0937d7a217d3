"""Every ``digpt`` command's flags as a table of config paths (the machinery: :mod:`pipelines.cli_table`).

A flag's help and default are its field's; a field with no flag is listed in ``hidden`` with the reason;
``tests/test_cli_table.py`` checks every command both ways. Composite flags (``--teacher`` repeated with
its ``--weights``/``--group``, ``--lrs 1e-3,1e-2``, ``--weights NAME=FILE``) are a converter or a
``finish`` step beside their table.
"""

from __future__ import annotations

from typing import Any

from pipelines.cli_table import Command, Opt, registered, value

__all__ = ["ABLATE", "COMMAND_TABLES", "DEMO", "EXTRACT", "PROBE", "TRAIN", "VERIFY"]


def comma(kind: type):
    """argparse ``type`` of a comma-separated list: ``"1e-3,1e-2"`` -> ``(0.001, 0.01)``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def name_file(item: str) -> tuple[str, str]:
    """argparse ``type`` of ``NAME=FILE``."""
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected TEACHER=FILE, got {item!r}")
    return name, path


name_file.__name__ = "TEACHER=FILE"


def name_value(item: str) -> tuple[str, str]:
    """argparse ``type`` of ``NAME=VALUE`` (a teacher family's knob; its config reads the value's type)."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=VALUE, got {item!r}")
    return name.replace("-", "_"), value


name_value.__name__ = "NAME=VALUE"


def _teachers(tree: dict[str, Any]) -> dict[str, Any]:
    """``--teacher A --teacher B`` (with one ``--weights``/``--group`` per teacher, ``-`` for none) and the
    knobs every teacher shares -> ``teachers``: one TeacherConfig each."""
    shared = dict(tree.pop("teacher", {}))
    if "knobs" in shared:  # --knob NAME=VALUE pairs: the family's config reads each value as its field's type
        shared["knobs"] = dict(shared["knobs"])
    names = shared.pop("name", None) or []
    per = {k: shared.pop(k, None) for k in ("weights", "group")}
    for key, vals in per.items():
        flag = "--tokenizer (--group)" if key == "group" else f"--{key}"
        if vals is not None and len(vals) != len(names):
            raise ValueError(f"{flag} was given {len(vals)} times for {len(names)} --teacher(s); give one per teacher")
    tree["teachers"] = [
        {
            "name": name,
            **shared,
            **{k: (None if vals is None or vals[i] == "-" else vals[i]) for k, vals in per.items()},
        }
        for i, name in enumerate(names)
    ]
    return tree


TRAIN = Command(
    sections={
        "": ("student.config", "TrainConfig"),
        "data": ("student.config", "DataConfig"),
        "student": ("student.config", "StudentConfig"),
        "optim": ("student.config", "OptimConfig"),
    },
    opts=(
        Opt("--shards", "data.shards", required=True),
        Opt("--cache", "data.cache", required=True),
        Opt("--out", "out", required=True),
        Opt("--tokenizer", "data.tokenizer"),
        Opt("--student", "student.size", choices=value("student.sizes", "VIT_SIZES")),
        Opt("--objective", "objective", choices=registered("student.objectives", "register_objective")),
        Opt("--order", "order", choices=registered("student.orders", "register_order")),
        Opt("--steps", "steps", type=int, group="length", required=True),
        Opt("--epochs", "epochs", type=int, group="length", required=True),
        Opt("--batch-size", "data.batch_size", type=int),
        Opt("--accum", "optim.accum", type=int),
        Opt("--base-lr", "optim.base_lr", type=float),
        Opt("--min-lr", "optim.min_lr", type=float),
        Opt("--weight-decay", "optim.weight_decay", type=float),
        Opt("--warmup", "optim.warmup", type=float),
        Opt("--clip-grad", "optim.clip_grad", type=float),
        Opt("--betas", "optim.betas", type=float, nargs=2),
        Opt("--cluster-size", "student.cluster_size", type=int),
        Opt("--decoder-depth", "student.decoder_depth", type=int),
        Opt("--decoder-dim", "student.decoder_dim", type=int),
        Opt("--decoder-heads", "student.decoder_heads", type=int),
        Opt("--drop-path", "student.drop_path", type=float),
        Opt("--stem", "student.stem", choices=value("student.sizes", "STEMS")),
        Opt("--attn", "student.attn_impl", choices=value("student.config", "ATTN_IMPLS")),
        # The library's default is 0 workers (in-process, what tests and notebooks want); a run from the
        # command line decodes in 2 worker processes.
        Opt("--workers", "data.num_workers", type=int, default=2),
        Opt("--shuffle-buffer", "data.shuffle_buffer", type=int),
        Opt("--max-views", "data.max_views", type=int),
        Opt("--fresh-views", "data.fresh_views", switch=True),
        Opt("--seed", "seed", also=("data.seed",), type=int),
        Opt("--log-every", "log_every", type=int),
        Opt("--ckpt-every", "ckpt_every", type=int),
        Opt("--amp", "amp"),
        Opt("--device", "device"),
        Opt("--resume", "resume", switch=True),
        Opt("--online-teacher", "online_teacher", switch=True),
        Opt("--on-mismatch", "data.on_mismatch", choices=value("student.config", "ON_MISMATCH")),
        Opt("--blind-batches", "blind_batches", type=int),
        Opt("--target-norm", "target_norm", choices=value("student.config", "NORMS"), strict=True),
    ),
    from_file=True,
    hidden={
        "data.img_size": "derived: the student's input size",
        "data.mismatch_log": "derived: RUN/skipped-mismatch.jsonl when --on-mismatch skip",
        "objective_knobs": "one flag per knob of each objective (the 'objective knobs' group)",
    },
)
"""``digpt train``."""

EXTRACT = Command(
    sections={
        "": ("teacher_cache.config", "ExtractConfig"),
        "teacher": ("teacher_cache.config", "TeacherConfig"),
        "aug": ("teacher_cache.views", "AugConfig"),
        "storage": ("teacher_cache.config", "StorageConfig"),
    },
    opts=(
        Opt("--shards", "shards", required=True),
        Opt("--out", "out", required=True),
        Opt(
            "--teacher",
            "teacher.name",
            append=True,
            required=True,
            help="teacher to extract (repeatable); see `digpt teachers`",
        ),
        Opt(
            "--weights",
            "teacher.weights",
            append=True,
            help="local weights file, one per --teacher in order ('-' for none)",
        ),
        Opt(
            "--tokenizer",
            "teacher.group",
            append=True,
            aliases=("--group",),
            help="the tokenizer's name in the cache (what `train --tokenizer` reads), one per --teacher ('-': derived from the teacher's name)",
        ),
        Opt("--layer", "teacher.layer", type=int),
        Opt("--codebook-size", "teacher.codebook_size", type=int),
        Opt("--metric", "teacher.metric", choices=value("teacher_cache.config", "KMEANS_METRICS")),
        Opt("--pca-dim", "teacher.pca_dim", type=int),
        Opt("--fit-samples", "teacher.fit_samples", type=int),
        Opt("--codebook", "teacher.codebook"),
        Opt("--allow-hub", "teacher.allow_hub", switch=True),
        Opt("--knob", "teacher.knobs", append=True, type=name_value, metavar="NAME=VALUE"),
        Opt("--views", "aug.views", type=int),
        Opt("--seed", "aug.seed", type=int),
        Opt("--dtype", "storage.dtype", choices=value("teacher_cache.names", "DTYPES")),
        Opt("--chunk-rows", "storage.chunk_rows", type=int),
        Opt("--codec", "storage.codec", choices=value("teacher_cache.names", "CODECS")),
        Opt("--clevel", "storage.clevel", type=int),
        Opt("--batch-size", "batch_size", type=int),
        Opt("--executor", "executor"),
        Opt("--ray-address", "ray_address"),
        Opt("--workers", "workers", type=int),
        Opt("--threads", "threads", type=int),
        Opt("--device", "device"),
        Opt("--decode-threads", "decode_threads", type=int),
        Opt("--decode-processes", "decode_processes", type=int),
        Opt("--shards-in-flight", "shards_in_flight", type=int),
        Opt("--autocast", "autocast", choices=value("teacher_cache.config", "AUTOCAST")),
    ),
    hidden={
        "teachers": "built from --teacher (repeatable), each with its --weights/--group and the shared knobs",
        "aug.scale": "the crop's area range: RandomResizedCrop's (0.2, 1.0), as MAE and D-iGPT pretrain",
        "aug.ratio": "the crop's aspect range: RandomResizedCrop's (3/4, 4/3)",
        "aug.hflip": "flip probability 0.5, as every recipe in the family",
    },
    finish=_teachers,
)
"""``digpt extract``."""

VERIFY = Command(
    sections={"": ("teacher_cache.verify", "VerifyConfig")},
    opts=(
        Opt("--shards", "shards", required=True),
        Opt("--cache", "cache", required=True),
        Opt("--tokenizer", "tokenizers", append=True),
        Opt("--spot-checks", "spot_checks", type=int),
        Opt("--seed", "seed", type=int),
        Opt("--device", "device"),
        Opt("--full", "full", switch=True),
    ),
    hidden={},
)
"""``digpt verify``."""

_BUDGET = (
    Opt("--num-samples", "num_samples", type=int),
    Opt("--num-classes", "num_classes", type=int),
    Opt("--student", "student", choices=value("student.sizes", "VIT_SIZES")),
    Opt("--steps", "steps", type=int),
    Opt("--batch-size", "batch_size", type=int),
    Opt("--base-lr", "base_lr", type=float),
    Opt("--decoder-dim", "decoder_dim", type=int),
    Opt("--semantic-teacher", "semantic_teacher"),
    Opt("--probe-samples", "probe_samples", type=int),
    Opt("--executor", "executor"),
    Opt("--jobs", "jobs", type=int),
)
"""The flags of :class:`pipelines.config.Budget`: ``demo`` and ``ablate`` take the same ones."""

DEMO = Command(
    sections={"": ("pipelines.config", "DemoConfig")},
    opts=(Opt("--out", "out"), *_BUDGET, Opt("--quick", "quick", switch=True)),
    hidden={},
)
"""``digpt demo``."""

ABLATE = Command(
    sections={"": ("pipelines.config", "AblateConfig")},
    opts=(
        Opt("recipe", "recipe", positional=True, choices=registered("pipelines.recipes", "recipe")),
        Opt("--out", "out", required=True),
        Opt("--shards", "shards"),
        *_BUDGET,
        Opt("--image-size", "image_size", type=int),
        Opt("--seeds", "seeds", type=int),
        Opt("--views", "views", type=int),
        Opt("--stem", "stem", choices=value("student.sizes", "STEMS")),
        Opt("--cache", "cache"),
        Opt("--probe-shards", "probe_shards"),
        Opt("--workers", "workers", type=int),
        Opt("--weights", "weights", append=True, type=name_file, metavar="TEACHER=FILE"),
        Opt("--no-knn", "knn", switch=True, invert=True),
    ),
    hidden={},
)
"""``digpt ablate``."""

PROBE = Command(
    sections={"": ("pipelines.config", "ProbeConfig")},
    opts=(
        Opt("--run", "run"),
        Opt("--shards", "shards", required=True),
        Opt("--val-shards", "val_shards"),
        Opt("--kind", "kind", choices=value("pipelines.config", "KINDS")),
        Opt("--random-init", "random_init", switch=True),
        Opt("--student", "student", choices=value("student.sizes", "VIT_SIZES")),
        Opt("--pool", "pool", choices=value("pipelines.config", "POOLS")),
        Opt("--layers", "layers", type=comma(int), metavar="I,J,..."),
        Opt("--out", "out"),
        Opt("--batch-size", "batch_size", type=int),
        Opt("--holdout", "holdout", type=float),
        Opt("--select-fraction", "select_fraction", type=float),
        Opt("--lrs", "lrs", type=comma(float), metavar="LR,LR,..."),
        Opt("--epochs", "epochs", type=int),
        Opt("--weight-decay", "weight_decay", type=float),
        Opt("--k", "k", type=int),
        Opt("--temperature", "temperature", type=float),
        Opt("--finetune-epochs", "finetune_epochs", type=int),
        Opt("--finetune-lr", "finetune_lr", type=float),
        Opt("--layer-decay", "layer_decay", type=float),
        Opt("--crop-scale", "crop_scale", type=float),
        Opt("--finetune-weight-decay", "finetune_weight_decay", type=float),
        Opt("--drop-path", "drop_path", type=float),
        Opt("--warmup", "warmup", type=float),
        Opt("--seed", "seed", type=int),
        Opt("--device", "device"),
    ),
    hidden={},
)
"""``digpt probe``."""


def prepare_sources() -> dict[str, tuple[str, str]]:
    """``{source: (module, config class)}`` of ``teacher_cache/prepare``'s registry, read from source."""
    from pipelines import cli_docs

    return cli_docs.registered_configs("teacher_cache.prepare", "register_source")


def prepare_table(source: str) -> Command:
    """``digpt prepare SOURCE``: every field of the source's config is an option (a required one other than
    ``out`` is the positional argument: the folder or the shard pattern), typed by its default."""
    from pipelines import cli_docs

    module, cls = prepare_sources()[source]
    opts = []
    for name, fd in cli_docs.config_fields(module, cls).items():
        kind = type(fd.default) if fd.default not in (None, cli_docs.NO_DEFAULT) else str
        positional = fd.required and name != "out"
        flag = name if positional else "--" + name.replace("_", "-")
        opts.append(
            Opt(
                flag,
                name,
                positional=positional,
                required=fd.required,
                switch=kind is bool,
                type=None if kind is bool else kind,
            )
        )
    return Command(sections={"": (module, cls)}, opts=tuple(opts), hidden={})


COMMAND_TABLES: dict[str, Command] = {
    "extract": EXTRACT,
    "verify": VERIFY,
    "train": TRAIN,
    "ablate": ABLATE,
    "demo": DEMO,
    "probe": PROBE,
}
"""Commands whose flags are a table (``prepare``'s sources: ``teacher_cache/prepare``'s registry)."""
