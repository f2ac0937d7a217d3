"""Bad configuration: every option of ``prepare``, ``extract`` and ``verify`` given an invalid value.

Each case runs ``cli.main`` in-process and must (DESIGN invariant 5):

* exit 2 at once (argparse's own exit for unparsable values, the CLI's for invalid ones);
* say so in ONE line that names the option or config field (and the accepted values where there
  is a fixed set);
* write nothing: the output directory is not created, the input dataset/cache is left unchanged.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli

# Each case: (argv after the command, strings of which at least one must be in the error line,
#             strings that must ALL be in it (accepted values)).
# Placeholders: {ds} a valid prepared dataset, {cache} a valid cache of it, {out} the output that
# must not appear, {root} a valid image folder, {tmp} a scratch directory; EMPTY an empty argument.

PREPARE_CASES = [
    ("synthetic --out {out} --num-samples 0", ["num_samples"], []),
    ("synthetic --out {out} --num-samples -5", ["num_samples"], []),
    ("synthetic --out {out} --num-samples many", ["--num-samples"], ["invalid int value"]),
    ("synthetic --out {out} --num-classes 1", ["num_classes"], ["[2, 64]"]),
    ("synthetic --out {out} --num-classes 65", ["num_classes"], ["[2, 64]"]),
    ("synthetic --out {out} --image-size 8", ["image_size"], ["[16, 1024]"]),
    ("synthetic --out {out} --shard-size 0", ["shard_size"], []),
    ("synthetic --out {out} --shard-size -1", ["shard_size"], []),
    ("synthetic --out {out} --seed -1", ["seed"], []),
    ("synthetic --out EMPTY", ["out"], []),
    ("synthetic", ["--out"], ["required"]),
    ("imagefolder {tmp}/no-such-root --out {out}", ["root"], []),
    ("imagefolder {root} --out {out} --shard-size 0", ["shard_size"], []),
    ("imagefolder {root} --out {root}/inside", ["out must not be inside root"], []),
    ("imagefolder {tmp}/empty-root --out {out}", ["root"], ["class directories"]),
    ("imagefolder {tmp}/no-images-root --out {out}", ["root"], ["no image files"]),
    ("wds {tmp}/nothing-*.tar --out {out}", ["pattern"], ["matched no shards"]),
    ("wds {tmp}/{{a,b}}.tar --out {out}", ["pattern"], ["no such shard"]),
    ("wds s3://bucket/*.tar --out {out}", ["pattern"], ["glob"]),
    ("wds EMPTY --out {out}", ["pattern"], []),
    ("bogus --out {out}", ["invalid choice", "kind"], []),
]

EXTRACT = "--shards {ds} --out {out} --executor local"
EXTRACT_CASES = [
    ("--shards {tmp}/no-such-ds --out {out} --teacher pixel:32/8", ["not a prepared dataset", "dataset.json"], []),
    (EXTRACT + " --teacher nope", ["unknown teacher"], ["families are", "pixel", "random-vit"]),
    (EXTRACT + " --teacher EMPTY", ["teacher name"], []),
    (EXTRACT + " --teacher pixel:30/8", ["pixel:30/8"], ["multiple of patch size"]),
    (EXTRACT + " --teacher pixel:abc", ["pixel:abc"], ["SIZE/PATCH"]),
    (EXTRACT + " --teacher kmeans:nope", ["kmeans:nope"], ["unknown teacher"]),
    (EXTRACT + " --teacher kmeans:random-vit:32/8 --codebook {tmp}/no-codebook.safetensors", ["codebook"], ["not found"]),
    (EXTRACT + " --teacher kmeans:random-vit:32/8 --codebook-size 600 --fit-samples 2", ["codebook_size"], ["fit_samples"]),
    (EXTRACT + " --teacher random-vit:32/8 --weights a.pt --weights b.pt", ["--weights"], ["one per teacher"]),
    (EXTRACT + " --teacher timm:vit_tiny_test --weights {tmp}/no-weights.safetensors", ["weights"], ["not found"]),
    (EXTRACT + " --teacher efficientnet_lite0 --weights {tmp}/no-weights.pth", ["weights"], ["not found"]),
    (EXTRACT + " --teacher random-vit:32/8 --weights {tmp}/w.pt", ["weights"], []),
    (EXTRACT + " --teacher pixel:32/8 --weights {tmp}/w.pt", ["weights"], []),
    (EXTRACT + " --teacher random-vit:32/8 --layer 0", ["layer"], [">= 1"]),
    (EXTRACT + " --teacher random-vit:32/8 --layer -2", ["layer"], []),
    (EXTRACT + " --teacher random-vit:32/8 --layer 9", ["layer"], ["random-vit:32/8", "[1, 2]"]),
    (EXTRACT + " --teacher efficientnet_lite0 --layer 8", ["layer"], ["1..7"]),
    (EXTRACT + " --teacher random-vit:32/8 --layer two", ["--layer"], ["invalid int value"]),
    (EXTRACT + " --teacher random-vit:32/8 --group a --group b", ["--group"], ["one per teacher"]),
    (EXTRACT + " --teacher random-vit:32/8 --teacher pixel:32/8 --group x --group x", ["group"], ["duplicate"]),
    (EXTRACT + " --teacher pixel:32/8 --views 0", ["views"], ["[1, 1024]"]),
    (EXTRACT + " --teacher pixel:32/8 --views 5000", ["views"], ["[1, 1024]"]),
    (EXTRACT + " --teacher pixel:32/8 --seed -1", ["seed"], []),
    (EXTRACT + " --teacher pixel:32/8 --dtype fp64", ["dtype"], ["fp32", "fp16", "bf16", "int8"]),
    (EXTRACT + " --teacher pixel:32/8 --chunk-rows 0", ["chunk_rows"], []),
    (EXTRACT + " --teacher pixel:32/8 --batch-size 0", ["batch_size"], []),
    (EXTRACT + " --teacher pixel:32/8 --batch-size -4", ["batch_size"], []),
    (EXTRACT + " --teacher kmeans:pixel:32/8 --codebook-size 1", ["codebook_size"], []),
    (EXTRACT + " --teacher kmeans:pixel:32/8 --fit-samples 0", ["fit_samples"], []),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --executor dask", ["executor"], ["'ray'", "'local'"]),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --ray-address nonsense", ["ray_address"], ["auto", "HOST:PORT"]),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --workers 0", ["workers"], []),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --threads 0", ["threads"], []),
    (EXTRACT + " --teacher pixel:32/8 --device tpu", ["device"], ["'auto'", "'cpu'", "'cuda'"]),
    pytest.param(EXTRACT + " --teacher pixel:32/8 --device cuda", ["device"], ["cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")),
    ("--shards {ds} --out {out}", ["--teacher"], ["required"]),
    # An existing directory that is not a cache is never written into (zarr would have emptied it).
    ("--shards {ds} --out {root} --teacher pixel:32/8 --executor local", ["out"], ["not a digpt cache"]),
]

VERIFY = "--shards {ds} --cache {cache} --spot-checks 1"
VERIFY_CASES = [
    ("--shards {tmp}/no-such-ds --cache {cache}", ["not a prepared dataset", "dataset.json"], []),
    ("--shards {ds} --cache {tmp}/no-such-cache", ["no teacher cache"], []),
    (VERIFY + " --tokenizer nope", ["tokenizer"], ["pixel_32_8"]),
    ("--shards {ds} --cache {cache} --spot-checks -1", ["spot_checks"], []),
    ("--shards {ds} --cache {cache} --spot-checks some", ["--spot-checks"], ["invalid int value"]),
    (VERIFY + " --seed -1", ["seed"], []),
    (VERIFY + " --device tpu", ["device"], ["'auto'", "'cpu'", "'cuda'"]),
]


def _png(mode="RGB", size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_dataset):
    """A valid image folder, some broken roots, and a valid cache of the shared tiny dataset."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    for cls in ("a", "b"):
        (tmp / "root" / cls).mkdir(parents=True)
        (tmp / "root" / cls / "x.png").write_bytes(_png())
    (tmp / "empty-root").mkdir()
    (tmp / "no-images-root" / "a").mkdir(parents=True)
    (tmp / "no-images-root" / "a" / "notes.txt").write_text("not an image")
    (tmp / "w.pt").write_bytes(b"\0")
    cache = tmp / "cache"
    assert cli.main(["extract", "--shards", tiny_dataset, "--out", str(cache), "--teacher", "pixel:32/8",
                     "--executor", "local"]) == 0
    return {"tmp": str(tmp), "root": str(tmp / "root"), "ds": tiny_dataset, "cache": str(cache)}


def _snapshot(path: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _run(command: str, args: str, places: dict, tmp_path: Path, capsys) -> tuple[int, str, str]:
    out = tmp_path / "out"
    argv = [command, *("" if a == "EMPTY" else a for a in args.format(out=out, **places).split())]
    watched = {k: _snapshot(places[k]) for k in ("ds", "cache", "root")}
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse rejects unparsable values itself, with exit status 2
        rc = e.code
    seconds = time.perf_counter() - t0
    _, err = capsys.readouterr()
    assert not out.exists(), f"{argv}: output {out} was created"
    assert not (Path(places["root"]) / "inside").exists()
    for k, before in watched.items():
        assert _snapshot(places[k]) == before, f"{argv}: {k} was modified"
    assert seconds < 30, f"{argv}: took {seconds:.1f}s to fail"
    return rc, err, " ".join(argv)


def _check(rc: int, err: str, argv: str, any_of: list[str], all_of: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"{argv}: exit {rc}, stderr:\n{err}"
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, f"{argv}: expected one error line, got:\n{err}"
    # Our own errors are exactly one line; argparse's come after its usage text.
    assert lines[-1] == errors[0] and (len(lines) == 1 or lines[0].startswith("usage:")), err
    line = errors[0]
    assert any(s in line for s in any_of), f"{argv}: {line!r} names none of {any_of}"
    assert all(s in line for s in all_of), f"{argv}: {line!r} lacks one of {all_of}"


@pytest.mark.parametrize("args,any_of,all_of", PREPARE_CASES)
def test_prepare_rejects(args, any_of, all_of, places, tmp_path, capsys):
    _check(*_run("prepare", args, places, tmp_path, capsys), any_of, all_of)


@pytest.mark.parametrize("args,any_of,all_of", EXTRACT_CASES)
def test_extract_rejects(args, any_of, all_of, places, tmp_path, capsys):
    _check(*_run("extract", args, places, tmp_path, capsys), any_of, all_of)


@pytest.mark.parametrize("args,any_of,all_of", VERIFY_CASES)
def test_verify_rejects(args, any_of, all_of, places, tmp_path, capsys):
    _check(*_run("verify", args, places, tmp_path, capsys), any_of, all_of)


def test_every_option_has_a_bad_value_case():
    """A new option of prepare/extract/verify must get a case above (or be listed here as exempt)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    exempt = {"--help", "--allow-hub"}  # flags: no value to get wrong
    texts = " ".join(str(c.values[0] if hasattr(c, "values") else c[0]) for c in PREPARE_CASES + EXTRACT_CASES
                     + VERIFY_CASES)
    missing = []
    for command in ("extract", "verify"):
        for action in sub[command]._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in exempt and opt not in texts:
                    missing.append(f"{command} {opt}")
    kinds = next(a for a in sub["prepare"]._actions if a.dest == "kind").choices
    for kind, p in kinds.items():
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in exempt and opt not in texts:
                    missing.append(f"prepare {kind} {opt}")
    assert not missing, f"options without a bad-value case: {missing}"
