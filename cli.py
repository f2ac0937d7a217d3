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
    from pipelines.cli_commands import prepare_sources, prepare_table
    from pipelines.cli_table import add_options

    sources = prepare_sources()  # teacher_cache/prepare's registry, read from source
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(sources) + "}")
    for name, (module, cls) in sources.items():
        add_options(_parser(kinds, name, cli_docs.class_doc(module, cls)), prepare_table(name))


def _cmd_prepare(a: argparse.Namespace) -> int:
    from pipelines.cli_commands import prepare_table
    from pipelines.cli_table import build_config
    from teacher_cache.prepare import get_source

    ds = get_source(a.kind).prepare(build_config(a, prepare_table(a.kind)))
    print(ds.summary())
    return 0


def _table(name: str):
    from pipelines.cli_commands import COMMAND_TABLES

    return COMMAND_TABLES[name]


def _add_table(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from pipelines.cli_table import add_options

        add_options(p, _table(name))

    return add


def _config(a: argparse.Namespace):
    """The config of a command whose flags are a table (``pipelines/cli_commands.py``)."""
    from pipelines.cli_table import build_config

    return build_config(a, _table(a.command))


def _cmd_extract(a: argparse.Namespace) -> int:
    from teacher_cache.extract import run_extract

    summary = run_extract(_config(a))
    print(summary.table())
    return 0 if summary.ok else 1


def _cmd_verify(a: argparse.Namespace) -> int:
    from teacher_cache.verify import run_verify

    report = run_verify(_config(a))
    print(report.table())
    return 0 if report.ok else 1


def _add_train(p: argparse.ArgumentParser) -> None:
    from pipelines.cli_commands import TRAIN
    from pipelines.cli_table import add_options

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

    from pipelines.cli_commands import TRAIN
    from pipelines.cli_table import apply, get_path, missing_required, set_path
    from student.config import StudentConfig
    from student.rundir import train_config_from_dict
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
        student = from_dict(StudentConfig, tree.get("student", {}), where="student")  # names a bad field
        set_path(tree, "data.img_size", student.encoder_config().img_size)
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


def _cmd_demo(a: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return 0 if run_demo(_config(a)).ok else 1


def _cmd_ablate(a: argparse.Namespace) -> int:
    from pipelines.ablate import run_ablation

    run_ablation(_config(a))
    return 0


def _cmd_probe(a: argparse.Namespace) -> int:
    from pipelines.probe import run_probe

    cfg = _config(a)
    result = run_probe(cfg)
    print(result.table())
    print(f"wrote {cfg.out_path()}")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("turn images into webdataset shards + a Parquet manifest", _add_prepare, _cmd_prepare),
    "extract": ("run teachers once over the shards and write the Zarr cache", _add_table("extract"), _cmd_extract),
    "verify": ("check a cache: complete, finite, consistent, aligned", _add_table("verify"), _cmd_verify),
    "train": ("pretrain a student against a teacher cache", _add_train, _cmd_train),
    "export": ("write a run's encoder as a timm ViT checkpoint (safetensors)", _add_export, _cmd_export),
    "teachers": ("list teacher families and presets", _add_teachers, _cmd_teachers),
    "ablate": ("train several students against several caches; one report", _add_table("ablate"), _cmd_ablate),
    "demo": ("the whole pipeline on a generated dataset, on a CPU, in minutes", _add_table("demo"), _cmd_demo),
    "probe": (
        "evaluate an encoder per layer: linear probe, k-NN or a short fine-tune",
        _add_table("probe"),
        _cmd_probe,
    ),
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
    try:
        args = build_parser(only=only).parse_args(argv)
    except SystemExit as e:  # argparse has said what is wrong (or printed --help); the code is the answer
        return e.code if isinstance(e.code, int) else 2
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
