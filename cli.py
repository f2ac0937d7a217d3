"""``digpt``: the command line. Thin on purpose: it parses, builds a config, and calls one function.

digpt prepare synthetic --out data/syn --num-samples 512
digpt extract --shards data/syn --teacher efficientnet_lite0 --views 2 --out cache/syn
digpt verify --shards data/syn --cache cache/syn
digpt train --shards data/syn --cache cache/syn --out runs/digpt --student small-cpu --steps 300
digpt export runs/digpt --out encoder.safetensors
digpt teachers
digpt demo --out demo_out
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

# Nothing heavy at import time: torch, timm, zarr and ray load inside the command that needs them, so
# `digpt --help` and `digpt train --help` answer at once. Defaults, help and accepted values are read
# from the config dataclasses and registries by `pipelines.cli_docs` (source, not import).
from pipelines import cli_docs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _parser(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=_Help)


def _field(
    p: argparse.ArgumentParser,
    flag: str,
    fd: cli_docs.FieldDoc,
    *,
    choices: Sequence[str] = (),
    strict: bool = False,
    **kwargs,
) -> None:
    """An option whose help (and default, unless given) is the config field ``fd``'s; ``choices`` (from
    a registry) are listed in the help and checked by the config, whose error names the field
    (``strict``: checked by argparse instead, whose error names the flag)."""
    text = fd.help()
    if strict:
        kwargs["choices"] = list(choices)
    elif choices and not all(c in text for c in choices):
        text = f"{text} One of: {', '.join(choices)}."
    if "default" not in kwargs and not kwargs.get("required") and not fd.required:
        if fd.default is cli_docs.NO_DEFAULT:  # e.g. field(default_factory=...): argparse would pass None
            raise TypeError(f"{flag}: the default of field {fd.name} is not a literal; give the option a default")
        kwargs["default"] = fd.default
    p.add_argument(flag, help=text.replace("%", "%%"), **kwargs)


def _add_prepare(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{imagefolder,wds,parquet,synthetic}")
    mod = "teacher_cache.prepare"
    f = _parser(kinds, "imagefolder", "ImageNet-style class folders -> tar shards")
    doc = cli_docs.config_fields(mod, "ImageFolderConfig")
    _field(f, "root", doc["root"])
    _field(f, "--out", doc["out"], required=True)
    _field(f, "--shard-size", doc["shard_size"], type=int)
    w = _parser(kinds, "wds", "index existing webdataset / img2dataset shards in place")
    doc = cli_docs.config_fields(mod, "WdsConfig")
    _field(w, "pattern", doc["pattern"])
    _field(w, "--out", doc["out"], required=True)
    q = _parser(kinds, "parquet", "parquet shards with an image-bytes column (Hugging Face layout) -> tar shards")
    doc = cli_docs.config_fields(mod, "ParquetConfig")
    _field(q, "pattern", doc["pattern"])
    _field(q, "--out", doc["out"], required=True)
    _field(q, "--shard-size", doc["shard_size"], type=int)
    _field(q, "--image-column", doc["image_column"])
    _field(q, "--label-column", doc["label_column"])
    s = _parser(kinds, "synthetic", "generate a class-structured image set (demo, tests)")
    doc = cli_docs.config_fields(mod, "SyntheticConfig")
    _field(s, "--out", doc["out"], required=True)
    for name in ("num_samples", "num_classes", "image_size", "shard_size", "seed"):
        _field(s, "--" + name.replace("_", "-"), doc[name], type=int)


def _cmd_prepare(a: argparse.Namespace) -> int:
    from teacher_cache import prepare as P

    if a.kind == "synthetic":
        ds = P.prepare_synthetic(
            P.SyntheticConfig(
                out=a.out,
                num_samples=a.num_samples,
                num_classes=a.num_classes,
                image_size=a.image_size,
                shard_size=a.shard_size,
                seed=a.seed,
            )
        )
    elif a.kind == "imagefolder":
        ds = P.prepare_imagefolder(P.ImageFolderConfig(root=a.root, out=a.out, shard_size=a.shard_size))
    elif a.kind == "parquet":
        ds = P.prepare_parquet(
            P.ParquetConfig(
                pattern=a.pattern,
                out=a.out,
                shard_size=a.shard_size,
                image_column=a.image_column,
                label_column=a.label_column,
            )
        )
    else:
        ds = P.prepare_wds(P.WdsConfig(pattern=a.pattern, out=a.out))
    print(ds.summary())
    return 0


def _add_extract(p: argparse.ArgumentParser) -> None:
    run = cli_docs.config_fields("teacher_cache.config", "ExtractConfig")
    teacher = cli_docs.config_fields("teacher_cache.config", "TeacherConfig")
    storage = cli_docs.config_fields("teacher_cache.config", "StorageConfig")
    aug = cli_docs.config_fields("teacher_cache.views", "AugConfig")
    _field(p, "--shards", run["shards"], required=True)
    _field(p, "--out", run["out"], required=True)
    p.add_argument(
        "--teacher",
        action="append",
        required=True,
        metavar="NAME",
        help="teacher to extract (repeatable); see `digpt teachers`",
    )
    p.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="FILE",
        help="local weights file, one per --teacher in order (use '-' for none)",
    )
    _field(p, "--layer", teacher["layer"], type=int)
    p.add_argument("--group", action="append", default=None, help="cache group name, one per --teacher")
    _field(p, "--views", aug["views"], type=int)
    _field(p, "--seed", aug["seed"], type=int)
    _field(p, "--dtype", storage["dtype"], choices=cli_docs.module_value("teacher_cache.store", "DTYPES"))
    _field(p, "--chunk-rows", storage["chunk_rows"], type=int)
    _field(p, "--codec", storage["codec"], choices=cli_docs.module_value("teacher_cache.store", "CODECS"))
    _field(p, "--batch-size", run["batch_size"], type=int)
    _field(p, "--codebook-size", teacher["codebook_size"], type=int)
    _field(p, "--metric", teacher["metric"], choices=cli_docs.module_value("teacher_cache.config", "KMEANS_METRICS"))
    _field(p, "--pca-dim", teacher["pca_dim"], type=int)
    _field(p, "--fit-samples", teacher["fit_samples"], type=int)
    _field(p, "--codebook", teacher["codebook"])
    _field(p, "--executor", run["executor"])
    _field(p, "--ray-address", run["ray_address"])
    _field(p, "--workers", run["workers"], type=int)
    _field(p, "--threads", run["threads"], type=int)
    _field(p, "--device", run["device"])
    _field(p, "--decode-threads", run["decode_threads"], type=int)
    _field(p, "--decode-processes", run["decode_processes"], type=int)
    _field(p, "--shards-in-flight", run["shards_in_flight"], type=int)
    _field(p, "--autocast", run["autocast"], choices=cli_docs.module_value("teacher_cache.config", "AUTOCAST"))
    _field(p, "--allow-hub", teacher["allow_hub"], action="store_true")


def _extract_config(a: argparse.Namespace):
    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.views import AugConfig

    n = len(a.teacher)
    weights = a.weights or [None] * n
    groups = a.group or [None] * n
    for flag, vals in (("--weights", weights), ("--group", groups)):
        if len(vals) != n:
            raise ValueError(f"{flag} was given {len(vals)} times for {n} --teacher(s); give one per teacher")
    teachers = tuple(
        TeacherConfig(
            name=t,
            weights=None if w in (None, "-") else w,
            layer=a.layer,
            group=g,
            codebook=a.codebook,
            codebook_size=a.codebook_size,
            metric=a.metric,
            fit_samples=a.fit_samples,
            pca_dim=a.pca_dim,
            allow_hub=a.allow_hub,
        )
        for t, w, g in zip(a.teacher, weights, groups)
    )
    return ExtractConfig(
        shards=a.shards,
        out=a.out,
        teachers=teachers,
        aug=AugConfig(views=a.views, seed=a.seed),
        storage=StorageConfig(dtype=a.dtype, chunk_rows=a.chunk_rows, codec=a.codec),
        batch_size=a.batch_size,
        executor=a.executor,
        ray_address=a.ray_address,
        workers=a.workers,
        threads=a.threads,
        device=a.device,
        decode_threads=a.decode_threads,
        decode_processes=a.decode_processes,
        shards_in_flight=a.shards_in_flight,
        autocast=a.autocast,
    )


def _cmd_extract(a: argparse.Namespace) -> int:
    from teacher_cache.extract import run_extract

    summary = run_extract(_extract_config(a))
    print(summary.table())
    return 0 if summary.ok else 1


def _add_verify(p: argparse.ArgumentParser) -> None:
    doc = cli_docs.config_fields("teacher_cache.verify", "VerifyConfig")
    _field(p, "--shards", doc["shards"], required=True)
    _field(p, "--cache", doc["cache"], required=True)
    _field(p, "--tokenizer", doc["tokenizers"], action="append", default=None)
    _field(p, "--spot-checks", doc["spot_checks"], type=int)
    _field(p, "--seed", doc["seed"], type=int)
    _field(p, "--device", doc["device"])
    _field(p, "--full", doc["full"], action="store_true")


def _cmd_verify(a: argparse.Namespace) -> int:
    from teacher_cache.verify import VerifyConfig, run_verify

    report = run_verify(
        VerifyConfig(
            shards=a.shards,
            cache=a.cache,
            tokenizers=tuple(a.tokenizer or ()),
            spot_checks=a.spot_checks,
            seed=a.seed,
            device=a.device,
            full=a.full,
        )
    )
    print(report.table())
    return 0 if report.ok else 1


def _add_train(p: argparse.ArgumentParser) -> None:
    from pipelines.cli_table import TRAIN, add_options

    p.add_argument(
        "--config",
        metavar="FILE",
        help="start from a run's config.json (or one written by hand); the flags given override its values",
    )
    add_options(p, TRAIN)
    _add_objective_knobs(p)


# ``objective_knobs`` in a TrainConfig: each objective registers the config of its own knobs
# (``@register_objective("masked", config=MaskedConfig)``); every field becomes a flag here.
_KNOB = "knob__"


def _knob_fields() -> dict[str, dict[str, cli_docs.FieldDoc]]:
    """``{field: {objective: its FieldDoc}}`` over every objective's own config, read from source."""
    out: dict[str, dict[str, cli_docs.FieldDoc]] = {}
    for objective, (module, cls) in cli_docs.registered_configs("student.objectives", "register_objective").items():
        for name, fd in cli_docs.config_fields(module, cls).items():
            out.setdefault(name, {})[objective] = fd
    return out


def _add_objective_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("objective knobs", "settings of one objective (an error with any other objective)")
    for name, owners in _knob_fields().items():
        text = " ".join(
            f"[{o}] {fd.help()}" + ("" if fd.default is cli_docs.NO_DEFAULT else f" (default: {fd.default})")
            for o, fd in owners.items()
        )
        kind = next(type(fd.default) for fd in owners.values())
        kind = float if kind is int else kind  # an int default must not refuse --x 0.5
        g.add_argument(
            "--" + name.replace("_", "-"),
            dest=_KNOB + name,
            metavar=name.upper(),
            default=None,
            type=kind if kind in (int, float, str) else None,
            help=text.replace("%", "%%"),
        )


def objective_knobs(a: argparse.Namespace, objective: str):
    """The knobs config of ``objective`` from the knob flags given (None when none were: its defaults).
    A value is checked by every config that has the field (its error names the field) before a flag that
    ``objective`` does not take is refused."""
    import importlib

    given = {k[len(_KNOB) :]: v for k, v in vars(a).items() if k.startswith(_KNOB) and v is not None}
    if not given:
        return None
    configs = cli_docs.registered_configs("student.objectives", "register_objective")
    classes = {o: getattr(importlib.import_module(m), c) for o, (m, c) in configs.items()}
    fields = _knob_fields()
    for name, value in given.items():
        for owner in fields[name]:
            classes[owner](**{name: value})
    foreign = [n for n in given if objective not in fields[n]]
    if foreign:
        flags = ", ".join(f"--{n.replace('_', '-')} ({'/'.join(fields[n])})" for n in foreign)
        raise ValueError(f"objective {objective!r} does not take {flags}; drop it or choose that objective")
    return classes[objective](**given)


def train_config(a: argparse.Namespace):
    """The TrainConfig of ``digpt train``: the config's defaults, or ``--config FILE``'s values with only the
    flags given on the command line (``a.given``, set by :func:`main`) over them."""
    import json
    from dataclasses import replace

    from pipelines.cli_table import TRAIN, apply, get_path, missing_required, set_path
    from student.config import train_config_from_dict
    from student.sizes import vit_config
    from teacher_cache.config_io import from_dict

    tree: dict = {}
    given = None
    if getattr(a, "config", None):
        with open(a.config) as f:
            tree = json.load(f)
        tree = dict(tree.get("train", tree))
        # What one invocation does, not what the run is: a new run from an old one's config starts fresh
        # and keeps its own log of skipped samples.
        tree["resume"] = False
        set_path(tree, "data.mismatch_log", None)
        given = getattr(a, "given", None)
    else:
        missing = missing_required(a, TRAIN)
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --config FILE)")
    file_objective, file_knobs = tree.get("objective"), tree.pop("objective_knobs", None)
    tree = apply(a, TRAIN, tree, given)
    if given is None or "student" in given or get_path(tree, "data.img_size") is None:
        set_path(tree, "data.img_size", vit_config(get_path(tree, "student.size", "tiny-test")).img_size)
    cfg = train_config_from_dict(tree)
    knobs = objective_knobs(a, cfg.objective)  # the knob flags given, checked against the objective
    if file_knobs is not None and file_objective == cfg.objective:  # the file's knobs, flags over them
        flags = {k[len(_KNOB) :]: v for k, v in vars(a).items() if k.startswith(_KNOB) and v is not None}
        knobs = from_dict(
            type(knobs or _default_knobs(cfg.objective)), {**file_knobs, **flags}, where="objective_knobs"
        )
    return replace(cfg, objective_knobs=knobs)


def _default_knobs(objective: str):
    from student.objectives import objective_config

    return objective_config(objective)


def _cmd_train(a: argparse.Namespace) -> int:
    from student.train import train

    train(train_config(a))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output .safetensors file")


def _cmd_export(a: argparse.Namespace) -> int:
    from student.export import export_encoder

    line = export_encoder(a.run, a.out)
    print(f"wrote {a.out}; load it with:\n  {line}")
    return 0


def _add_teachers(p: argparse.ArgumentParser) -> None:
    """No options."""


def _cmd_teachers(a: argparse.Namespace) -> int:
    from teacher_cache.teachers import PRESETS, describe_teachers, list_teachers

    print("families (NAME or NAME:ARG):")
    for fam, doc in describe_teachers().items():
        print(f"  {fam:18s} {doc}")
    print("presets (need --weights FILE or --allow-hub):")
    for k, v in PRESETS.items():
        print(f"  {k:18s} {v}")
    print("tiny, offline test variants: " + ", ".join(list_teachers(tiny=True)))
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    doc = cli_docs.config_fields("pipelines.config", "DemoConfig")
    _field(p, "--out", doc["out"])
    _field(p, "--num-samples", doc["num_samples"], type=int)
    _field(p, "--steps", doc["steps"], type=int)
    _field(p, "--student", doc["student"], choices=cli_docs.module_value("student.sizes", "VIT_SIZES"))
    _field(p, "--base-lr", doc["base_lr"], type=float)
    _field(p, "--decoder-dim", doc["decoder_dim"], type=int)
    _field(p, "--probe-samples", doc["probe_samples"], type=int)
    _field(p, "--executor", doc["executor"])
    _field(p, "--jobs", doc["jobs"], type=int)
    _field(p, "--quick", doc["quick"], action="store_true")


def _cmd_demo(a: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=a.out,
        num_samples=a.num_samples,
        steps=a.steps,
        student=a.student,
        executor=a.executor,
        base_lr=a.base_lr,
        decoder_dim=a.decoder_dim,
        probe_samples=a.probe_samples,
        jobs=a.jobs,
        quick=a.quick,
    )
    return 0 if run_demo(cfg).ok else 1


def _add_ablate(p: argparse.ArgumentParser) -> None:
    doc = cli_docs.config_fields("pipelines.config", "AblateConfig")
    p.add_argument("recipe", help="one of: " + ", ".join(cli_docs.registered("pipelines.recipes", "recipe")))
    _field(p, "--out", doc["out"], required=True)
    _field(p, "--shards", doc["shards"])
    _field(p, "--num-samples", doc["num_samples"], type=int)
    _field(p, "--num-classes", doc["num_classes"], type=int)
    _field(p, "--student", doc["student"], choices=cli_docs.module_value("student.sizes", "VIT_SIZES"))
    _field(p, "--steps", doc["steps"], type=int)
    _field(p, "--batch-size", doc["batch_size"], type=int)
    _field(p, "--base-lr", doc["base_lr"], type=float)
    _field(p, "--seeds", doc["seeds"], type=int)
    _field(p, "--views", doc["views"], type=int)
    _field(
        p, "--semantic-teacher", doc["semantic_teacher"], default=cli_docs.module_value("pipelines.config", "SEMANTIC")
    )
    _field(p, "--stem", doc["stem"], choices=cli_docs.module_value("student.sizes", "STEMS"))
    _field(p, "--decoder-dim", doc["decoder_dim"], type=int)
    _field(p, "--cache", doc["cache"])
    _field(p, "--probe-shards", doc["probe_shards"])
    _field(p, "--probe-samples", doc["probe_samples"], type=int)
    _field(p, "--workers", doc["workers"], type=int)
    _field(p, "--jobs", doc["jobs"], type=int)
    _field(p, "--executor", doc["executor"])
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="TEACHER=FILE",
        help="add a headline teacher with local weights to the tokenizers recipe (repeatable)",
    )


def _cmd_ablate(a: argparse.Namespace) -> int:
    from pipelines.ablate import AblateConfig, run_ablation

    weights = []
    for item in a.weights:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights expects TEACHER=FILE, got {item!r}")
        weights.append((name, path))
    run_ablation(
        AblateConfig(
            recipe=a.recipe,
            out=a.out,
            shards=a.shards,
            num_samples=a.num_samples,
            num_classes=a.num_classes,
            student=a.student,
            steps=a.steps,
            batch_size=a.batch_size,
            base_lr=a.base_lr,
            seeds=a.seeds,
            views=a.views,
            semantic_teacher=a.semantic_teacher,
            stem=a.stem,
            decoder_dim=a.decoder_dim,
            cache=a.cache,
            probe_shards=a.probe_shards,
            probe_samples=a.probe_samples,
            workers=a.workers,
            jobs=a.jobs,
            executor=a.executor,
            weights=tuple(weights),
        )
    )
    return 0


def _add_probe(p: argparse.ArgumentParser) -> None:
    doc = cli_docs.config_fields("pipelines.config", "ProbeConfig")
    sizes = cli_docs.module_value("student.sizes", "VIT_SIZES")
    _field(p, "--run", doc["run"])
    _field(p, "--shards", doc["shards"], required=True)
    _field(p, "--val-shards", doc["val_shards"])
    _field(p, "--kind", doc["kind"], choices=cli_docs.module_value("pipelines.config", "KINDS"))
    _field(p, "--random-init", doc["random_init"], action="store_true")
    _field(p, "--student", doc["student"], choices=sizes)
    _field(p, "--pool", doc["pool"], choices=cli_docs.module_value("pipelines.config", "POOLS"))
    p.add_argument("--layers", default=None, help="0-based blocks to probe, comma-separated (default all)")
    _field(p, "--out", doc["out"])
    _field(p, "--batch-size", doc["batch_size"], type=int)
    _field(p, "--holdout", doc["holdout"], type=float)
    p.add_argument(
        "--lrs", default=",".join(map(str, doc["lrs"].default)), help=doc["lrs"].help() + " Comma-separated."
    )
    for name in ("epochs", "k"):
        _field(p, "--" + name, doc[name], type=int)
    _field(p, "--temperature", doc["temperature"], type=float)
    _field(p, "--finetune-epochs", doc["finetune_epochs"], type=int)
    _field(p, "--finetune-lr", doc["finetune_lr"], type=float)
    _field(p, "--layer-decay", doc["layer_decay"], type=float)
    _field(p, "--crop-scale", doc["crop_scale"], type=float)
    _field(p, "--seed", doc["seed"], type=int)
    _field(p, "--device", doc["device"])


def _cmd_probe(a: argparse.Namespace) -> int:
    from pipelines.probe import ProbeConfig, run_probe

    def values(text: str, flag: str, kind: type) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None

    layers = None if a.layers is None else values(a.layers, "--layers", int)
    cfg = ProbeConfig(
        shards=a.shards,
        kind=a.kind,
        run=a.run,
        val_shards=a.val_shards,
        out=a.out,
        random_init=a.random_init,
        student=a.student,
        pool=a.pool,
        layers=layers,
        batch_size=a.batch_size,
        holdout=a.holdout,
        lrs=values(a.lrs, "--lrs", float),
        epochs=a.epochs,
        k=a.k,
        temperature=a.temperature,
        finetune_epochs=a.finetune_epochs,
        finetune_lr=a.finetune_lr,
        layer_decay=a.layer_decay,
        crop_scale=a.crop_scale,
        seed=a.seed,
        device=a.device,
    )
    result = run_probe(cfg)
    print(result.table())
    print(f"wrote {cfg.out_path()}")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("turn images into webdataset shards + a Parquet manifest", _add_prepare, _cmd_prepare),
    "extract": ("run teachers once over the shards and write the Zarr cache", _add_extract, _cmd_extract),
    "verify": ("check a cache: complete, finite, consistent, aligned", _add_verify, _cmd_verify),
    "train": ("pretrain a student against a teacher cache", _add_train, _cmd_train),
    "export": ("write a run's encoder as a timm ViT checkpoint (safetensors)", _add_export, _cmd_export),
    "teachers": ("list teacher families and presets", _add_teachers, _cmd_teachers),
    "ablate": ("train several students against several caches; one report", _add_ablate, _cmd_ablate),
    "demo": ("the whole pipeline on a generated dataset, on a CPU, in minutes", _add_demo, _cmd_demo),
    "probe": ("evaluate an encoder per layer: linear probe, k-NN or a short fine-tune", _add_probe, _cmd_probe),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, a parser in which only that command has its options (the
    others are listed by name), which is all one invocation needs."""
    parser = argparse.ArgumentParser(
        prog="digpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add, _) in COMMANDS.items():
        p = _parser(sub, name, summary)
        if only is None or name == only:
            add(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # `digpt --help` or an unknown command: every command by name only, nothing else read.
    only = command if command in COMMANDS else ""
    args = build_parser(only=only).parse_args(argv)
    if getattr(args, "config", None):  # which flags the command line gives, to lay over the file's values
        from pipelines.cli_table import explicit

        args.given = explicit(lambda: build_parser(only=only), argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, OSError) as e:
        # Configuration and input errors, and the environment's (read-only folder, full disk: OSError
        # names the path): one line that names the problem, no traceback.
        if os.environ.get("DIGPT_DEBUG"):
            raise
        print(f"digpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
