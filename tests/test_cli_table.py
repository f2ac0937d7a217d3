"""``digpt train``'s flags are a table of config paths: every field is a flag or hidden on purpose, and a
run's config.json comes back through ``train --config`` (flags given on the command line over it)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import pytest

import cli
from pipelines.cli_commands import COMMAND_TABLES, TRAIN


def _parse(argv):
    """What ``cli.main`` does before it runs the command."""
    args = cli.build_parser("train").parse_args(argv)
    if args.config:
        from pipelines.cli_table import explicit

        args.given = explicit(lambda: cli.build_parser("train"), argv)
    return args


def _tables():
    from pipelines.cli_commands import prepare_sources, prepare_table

    return {**COMMAND_TABLES, **{f"prepare {s}": prepare_table(s) for s in prepare_sources()}}


@pytest.mark.parametrize("name", sorted(_tables()))
def test_every_field_is_a_flag_or_hidden_on_purpose(name):
    cmd = _tables()[name]
    flagged = {p for o in cmd.opts for p in (o.path, *o.also)}
    fields = cmd.paths()
    assert flagged <= fields, f"flags for fields that do not exist: {sorted(flagged - fields)}"
    assert not flagged & set(cmd.hidden), f"hidden fields that have a flag: {sorted(flagged & set(cmd.hidden))}"
    uncovered = fields - flagged - set(cmd.hidden)
    assert not uncovered, f"{name}: config fields with neither a flag nor a reason: {sorted(uncovered)}"
    assert all(reason.strip() for reason in cmd.hidden.values())


def test_a_new_field_without_a_flag_is_caught(monkeypatch):
    """The check above could fail: a field added to a section and given no flag shows up as uncovered."""
    from pipelines import cli_docs

    real = cli_docs.config_fields

    def with_extra(module, cls):
        out = dict(real(module, cls))
        if cls == "OptimConfig":
            out["eps"] = cli_docs.FieldDoc("eps", 1e-8, "AdamW epsilon.")
        return out

    monkeypatch.setattr(cli_docs, "config_fields", with_extra)
    flagged = {p for o in TRAIN.opts for p in (o.path, *o.also)}
    assert TRAIN.paths() - flagged - set(TRAIN.hidden) == {"optim.eps"}


BASE = ["train", "--shards", "s", "--cache", "c", "--out", "o"]


def test_required_flags_are_named_without_a_config():
    with pytest.raises(ValueError, match=r"required: --steps/--epochs \(or --config FILE\)"):
        cli.train_config(_parse(BASE))
    with pytest.raises(ValueError, match=r"required: --shards"):
        cli.train_config(_parse(["train", "--cache", "c", "--out", "o", "--steps", "1"]))


def test_config_json_round_trips_with_flags_over_it(tmp_path):
    argv = BASE + ["--steps", "7", "--student", "small-cpu", "--objective", "masked", "--mask-ratio", "0.3"]
    argv += ["--betas", "0.9", "0.99", "--seed", "5", "--target-norm", "channel", "--decoder-heads", "2"]
    cfg = cli.train_config(_parse(argv))
    assert cfg.optim.betas == (0.9, 0.99) and cfg.data.seed == 5 and cfg.student.decoder_heads == 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": asdict(cfg), "resolved": {}}))

    back = cli.train_config(_parse(["train", "--config", str(path)]))
    assert back == cfg
    # Only the flags given override the file: --steps and a knob change, the rest stays the file's
    # (the file's small-cpu, seed 5 and channel norm are not reset to the flags' defaults).
    over = cli.train_config(_parse(["train", "--config", str(path), "--steps", "9", "--mask-ratio", "0.5"]))
    assert over == replace(cfg, steps=9, objective_knobs=replace(cfg.objective_knobs, mask_ratio=0.5))
    # Another objective drops the file's knobs (they were the old objective's).
    other = cli.train_config(_parse(["train", "--config", str(path), "--objective", "digpt"]))
    assert other.objective == "digpt" and other.objective_knobs is None


def test_a_config_with_an_unknown_field_is_refused_by_name(tmp_path):
    cfg = cli.train_config(_parse(BASE + ["--steps", "1"]))
    d = asdict(cfg)
    d["optim"]["lr_peak"] = 1.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": d}))
    with pytest.raises(ValueError, match=r"train\.optim: unknown field\(s\) lr_peak"):
        cli.train_config(_parse(["train", "--config", str(path)]))


def test_a_run_config_json_trains_again(tiny_dataset, tiny_cache, tmp_path):
    """``train --config RUN/config.json --out NEW`` reproduces the run: the same resolved config, and a
    resumed run's record does not make the new one a resume."""
    first = str(tmp_path / "a")
    argv = ["train", "--shards", tiny_dataset, "--cache", tiny_cache, "--tokenizer", "vit", "--out", first]
    argv += ["--student", "tiny-test", "--steps", "2", "--batch-size", "8", "--workers", "0", "--blind-batches", "0"]
    assert cli.main(argv) == 0
    second = str(tmp_path / "b")
    assert cli.main(["train", "--config", os.path.join(first, "config.json"), "--out", second]) == 0
    a = json.load(open(os.path.join(first, "config.json")))
    b = json.load(open(os.path.join(second, "config.json")))
    assert {**a["train"], "out": None} == {**b["train"], "out": None}
    assert a["resolved"] == b["resolved"] and a["cache"] == b["cache"]


def test_configs_import_no_torch():
    """The configs of every stage load without torch, timm or zarr (a fresh interpreter): ``--help``, recipes
    and ``train --config`` read them without building a model."""
    import subprocess
    import sys

    code = (
        "import sys, teacher_cache.config, student.config, pipelines.config, pipelines.cli_commands\n"
        "print(sorted(m for m in ('torch', 'timm', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
