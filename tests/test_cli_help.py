"""``digpt --help`` answers at once, and what it says is what the code does: defaults, help and accepted
values are read from the configs and registries (``pipelines/cli_docs.py``), never retyped."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
from pipelines import cli_docs

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "zarr", "ray", "open_clip", "webdataset", "pyarrow", "matplotlib")


def test_help_imports_nothing_heavy():
    """Building every command's options (what any `--help` needs) imports none of the heavy packages."""
    code = f"import sys, cli\ncli.build_parser()\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert out.stdout.strip() == "[]", out.stdout
    # Importing torch alone takes ~2 s here; generous for a loaded 2-core CI box.
    assert seconds < 5, f"building the parser took {seconds:.1f}s"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_answers(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if argv[0] == "train":
        from student.objectives import list_objectives
        from student.sizes import list_vit_sizes

        for name in [*list_vit_sizes(), *list_objectives()]:
            assert name in out, f"{name} missing from `digpt train --help`"
        assert "(default: 0.00015)" in out and "(default: 2)" in out  # --base-lr, and the CLI's --workers


def test_names_read_from_source_equal_the_registries():
    from pipelines.ablate import RECIPES
    from pipelines.probe import KINDS, POOLS
    from student.attention import ATTN_IMPLS
    from student.objectives import list_objectives
    from student.orders import list_orders
    from student.sizes import list_vit_sizes
    from student.targets import NORMS
    from teacher_cache.names import CODECS, DTYPES

    assert cli_docs.registered("student.objectives", "register_objective") == sorted(list_objectives())
    assert cli_docs.registered("student.orders", "register_order") == sorted(list_orders())
    from student.objectives import base

    knobs = cli_docs.registered_configs("student.objectives", "register_objective")
    assert {o: c for o, (_, c) in knobs.items()} == {
        o: base.OBJECTIVES.meta(o)["config"].__name__ for o in base.OBJECTIVES if base.OBJECTIVES.meta(o)["config"]
    }
    assert "masked" in knobs
    assert cli_docs.registered("pipelines.recipes", "recipe") == sorted(RECIPES)
    assert cli_docs.module_value("student.sizes", "VIT_SIZES") == list_vit_sizes()
    assert "demo-cpu" in cli_docs.module_value("student.sizes", "VIT_SIZES")
    for module, name, value in [
        ("student.config", "ATTN_IMPLS", ATTN_IMPLS),
        ("student.config", "NORMS", NORMS),
        ("teacher_cache.names", "DTYPES", DTYPES),
        ("teacher_cache.names", "CODECS", CODECS),
        ("pipelines.config", "KINDS", KINDS),
        ("pipelines.config", "POOLS", POOLS),
    ]:
        assert cli_docs.module_value(module, name) == value, f"{module}.{name}"


CONFIGS = [
    ("teacher_cache.prepare.synthetic", "SyntheticConfig"),
    ("teacher_cache.prepare.imagefolder", "ImageFolderConfig"),
    ("teacher_cache.prepare.wds", "WdsConfig"),
    ("teacher_cache.config", "ExtractConfig"),
    ("teacher_cache.config", "TeacherConfig"),
    ("teacher_cache.config", "StorageConfig"),
    ("teacher_cache.views", "AugConfig"),
    ("teacher_cache.verify", "VerifyConfig"),
    ("student.config", "TrainConfig"),
    ("student.config", "OptimConfig"),
    ("student.config", "DataConfig"),
    ("student.config", "StudentConfig"),
    ("student.objectives.distill", "MaskedConfig"),
    ("pipelines.config", "DemoConfig"),
    ("pipelines.config", "AblateConfig"),
    ("pipelines.config", "ProbeConfig"),
]


@pytest.mark.parametrize("module,cls", CONFIGS, ids=[c for _, c in CONFIGS])
def test_fields_read_from_source_equal_the_dataclass(module, cls):
    import importlib

    real = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    read = cli_docs.config_fields(module, cls)
    assert list(read) == list(real)
    for name, f in real.items():
        assert read[name].doc, f"{cls}.{name} has no docstring: the CLI's help for it would be empty"
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert read[name].required == no_default, f"{cls}.{name}"
        if (
            read[name].default is not cli_docs.NO_DEFAULT
        ):  # else an expression or a factory: not offered as a flag default
            assert read[name].default == f.default, f"{cls}.{name}"


def test_every_option_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    parsers = [
        (f"prepare {k}", p) for k, p in next(a for a in sub["prepare"]._actions if a.dest == "kind").choices.items()
    ]
    parsers += [(name, p) for name, p in sub.items() if name != "prepare"]
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in parsers
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing, f"options without help: {missing}"


def test_train_defaults_are_the_configs(tmp_path):
    """The flags pass the dataclass defaults through unchanged (the one stated CLI override: 2 workers)."""
    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import TrainConfig

    args = cli.build_parser("train").parse_args(
        ["train", "--shards", "s", "--cache", "c", "--out", "o", "--steps", "1"]
    )
    got = cli.train_config(args)
    student = StudentConfig()
    want = TrainConfig(
        data=DataConfig("s", "c", img_size=student.encoder_config().img_size, num_workers=2),
        out="o",
        student=student,
        steps=1,
    )
    assert got == want


def test_objective_knobs_come_from_the_objective(tmp_path):
    """``--mask-ratio`` is generated from ``MaskedConfig`` and lands in ``TrainConfig.objective_knobs``;
    it is checked by that config, and refused for an objective that does not take it."""
    from student.objectives.distill import MaskedConfig

    base = ["train", "--shards", "s", "--cache", "c", "--out", "o", "--steps", "1"]
    parse = cli.build_parser("train").parse_args
    assert cli.train_config(parse(base + ["--objective", "masked", "--mask-ratio", "0.3"])).objective_knobs == (
        MaskedConfig(mask_ratio=0.3)
    )
    assert cli.train_config(parse(base + ["--objective", "masked"])).objective_knobs is None  # its defaults
    with pytest.raises(ValueError, match=r"objective 'digpt' does not take --mask-ratio \(masked\)"):
        cli.train_config(parse(base + ["--mask-ratio", "0.3"]))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        cli.train_config(parse(base + ["--objective", "masked", "--mask-ratio", "1.5"]))
