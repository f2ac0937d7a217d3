"""A new teacher family *with a knob of its own*, added in one file: this module registers ``scaled:<base>``
(another teacher's tokens times ``factor``) with a knobs config, and the knob reaches the teacher from
``digpt extract --knob factor=3``, is recorded in the cache, is rebuilt by ``verify``, and is refused by name
when wrong — without touching any other module (README "Extending: a new teacher")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import zarr

import cli
from teacher_cache.teachers import Teacher, TeacherOutput, create_teacher, list_teachers, register_teacher

# ------------------------------------------------------------------------------ the family (one file's worth)


@dataclass(frozen=True)
class ScaledKnobs:
    """The knobs of ``scaled:<base>`` (only this family has them)."""

    factor: float = 2.0
    """What the base teacher's tokens are multiplied by."""

    def __post_init__(self) -> None:
        if self.factor == 0:
            raise ValueError("factor must not be 0")


class ScaledTeacher(Teacher):
    def __init__(self, base: Teacher, factor: float):
        super().__init__()
        self.base = base
        self.register_buffer("factor", torch.tensor(float(factor)))  # part of the weights fingerprint
        self.spec = replace(base.spec, name=f"scaled:{base.spec.name}", extra={**base.spec.extra, "factor": factor})

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        out = self.base.encode(x)
        return TeacherOutput(out.tokens * self.factor, None if out.cls is None else out.cls * self.factor)


def scaled(arg, *, weights=None, layer=None, knobs: ScaledKnobs, **options) -> Teacher:
    """Another teacher's tokens, scaled: ``scaled:<teacher>``."""
    return ScaledTeacher(create_teacher(arg, weights=weights, layer=layer, **options), knobs.factor)


if "scaled" not in list_teachers():
    register_teacher("scaled", knobs=ScaledKnobs)(scaled)


# ------------------------------------------------------------------------------ the test


def _extract(ds, out, *extra):
    argv = ["extract", "--shards", ds, "--out", out, "--executor", "local", "--dtype", "fp32", "--views", "1"]
    return cli.main([*argv, "--batch-size", "8", *extra])


def test_a_family_knob_goes_from_the_command_line_to_the_cache(tiny_dataset, tmp_path, capsys):
    cache = str(tmp_path / "c")
    assert _extract(tiny_dataset, cache, "--teacher", "random-vit:32/8", "--tokenizer", "base") == 0
    assert (
        _extract(tiny_dataset, cache, "--teacher", "scaled:random-vit:32/8", "--tokenizer", "x3", "--knob", "factor=3")
        == 0
    )
    root = zarr.open_group(cache, mode="r")
    sid = sorted(root["x3"].group_keys())[0]
    assert np.allclose(root["x3"][sid]["tokens"][:], 3 * root["base"][sid]["tokens"][:], atol=1e-5)
    record = dict(root["x3"].attrs["tokenizer"])["teacher_config"]
    assert record["knobs"] == {"factor": "3"}  # as given; the family's config reads it as a float

    # verify rebuilds the teacher with the recorded knob: the re-run views match what is stored.
    assert (
        cli.main(["verify", "--shards", tiny_dataset, "--cache", cache, "--tokenizer", "x3", "--spot-checks", "2"]) == 0
    )
    capsys.readouterr()

    # Wrong knobs are refused before any work, naming the knob.
    for knob, words in (("factor=0", "factor must not be 0"), ("factor=x", "expected float"), ("gain=2", "gain")):
        assert _extract(tiny_dataset, str(tmp_path / "bad"), "--teacher", "scaled:random-vit:32/8", "--knob", knob) == 2
        assert words in capsys.readouterr().err, knob
    assert _extract(tiny_dataset, str(tmp_path / "bad"), "--teacher", "random-vit:32/8", "--knob", "factor=3") == 2
    assert "takes no knobs" in capsys.readouterr().err


def test_a_family_declares_where_its_global_token_lives():
    """What the student's similarity orders read (``TargetSpec.cls_in_token_space``) is the family's
    declaration, not a name the student knows: EfficientNet's head declares it outside, a fitted family
    asks its base, an unknown or undeclared family is a ViT-like inside."""
    from teacher_cache.teachers import global_token_in_token_space as inside

    effnet = {"name": "efficientnet_lite0:128", "layer": None, "extra": {}}
    assert not inside(effnet) and inside({**effnet, "layer": 4})
    assert not inside(
        {"name": "pca:efficientnet_lite0:128", "layer": None, "extra": {"base": "efficientnet_lite0:128"}}
    )
    assert inside({"name": "scaled:random-vit:32/8", "extra": {}}) and inside({"name": "not-registered"})
    with pytest.raises(ValueError, match="registered twice"):
        register_teacher("scaled", knobs=ScaledKnobs)(scaled)
