"""Bad configuration: every option of every command that takes one, given an invalid value.

Each case runs ``cli.main`` in-process and must (DESIGN invariant 5):

* exit 2 at once (argparse's own exit for unparsable values, the CLI's for invalid ones);
* say so in ONE line that names the option or config field (and the accepted values where there
  is a fixed set);
* write nothing: the output directory is not created, the input dataset/cache is left unchanged.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli

# Each case: (argv after the command, strings of which at least one must be in the error line,
#             strings that must ALL be in it (accepted values)).
# Placeholders: {ds} a valid prepared dataset, {cache} a valid cache of it, {out} the output that
# must not appear, {root} a valid image folder, {tmp} a scratch directory, {run} a trained run of
# {cache} (left unchanged: probe and export write into or beside it), {norun} a run directory with
# a config but no checkpoint; EMPTY an empty argument.

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
    ("parquet {tmp}/nothing-*.parquet --out {out}", ["pattern"], ["matched no shards"]),
    ("parquet s3://bucket/*.parquet --out {out}", ["pattern"], ["glob"]),
    ("parquet {tmp}/a.parquet --out {out} --shard-size 0", ["shard_size"], []),
    ("parquet {tmp}/a.parquet --out {out} --image-column EMPTY", ["image_column"], []),
    ("parquet {tmp}/a.parquet --out {out} --label-column EMPTY", ["label_column"], []),
    ("bogus --out {out}", ["invalid choice", "kind"], []),
]

EXTRACT = "--shards {ds} --out {out} --executor local"
EXTRACT_CASES = [
    (EXTRACT + " --teacher pixel:32/8 --knob depth=3", ["pixel:32/8"], ["takes no knobs", "depth"]),
    (EXTRACT + " --teacher pixel:32/8 --knob depth", ["--knob"], ["NAME=VALUE"]),
    (EXTRACT + " --teacher pixel:32/8 --clevel 12", ["clevel"], ["[0, 9]"]),
    ("--shards {tmp}/no-such-ds --out {out} --teacher pixel:32/8", ["not a prepared dataset", "dataset.json"], []),
    (EXTRACT + " --teacher nope", ["unknown teacher"], ["families are", "pixel", "random-vit"]),
    (EXTRACT + " --teacher EMPTY", ["teacher name"], []),
    (EXTRACT + " --teacher pixel:30/8", ["pixel:30/8"], ["multiple of patch size"]),
    (EXTRACT + " --teacher pixel:abc", ["pixel:abc"], ["SIZE/PATCH"]),
    (EXTRACT + " --teacher kmeans:nope", ["kmeans:nope"], ["unknown teacher"]),
    (
        EXTRACT + " --teacher kmeans:random-vit:32/8 --codebook {tmp}/no-codebook.safetensors",
        ["codebook"],
        ["not found"],
    ),
    (
        EXTRACT + " --teacher kmeans:random-vit:32/8 --codebook-size 600 --fit-samples 2",
        ["codebook_size"],
        ["fit_samples"],
    ),
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
    (EXTRACT + " --teacher random-vit:32/8 --tokenizer a --tokenizer b", ["--tokenizer"], ["one per teacher"]),
    (EXTRACT + " --teacher random-vit:32/8 --teacher pixel:32/8 --group x --group x", ["group"], ["duplicate"]),
    (EXTRACT + " --teacher pixel:32/8 --views 0", ["views"], ["[1, 1024]"]),
    (EXTRACT + " --teacher pixel:32/8 --views 5000", ["views"], ["[1, 1024]"]),
    (EXTRACT + " --teacher pixel:32/8 --seed -1", ["seed"], []),
    (EXTRACT + " --teacher pixel:32/8 --dtype fp64", ["dtype"], ["fp32", "fp16", "bf16", "int8"]),
    (EXTRACT + " --teacher pixel:32/8 --chunk-rows 0", ["chunk_rows"], []),
    (EXTRACT + " --teacher pixel:32/8 --codec gzip", ["codec"], ["auto", "zstd", "lz4"]),
    (EXTRACT + " --teacher pixel:32/8 --batch-size 0", ["batch_size"], []),
    (EXTRACT + " --teacher pixel:32/8 --batch-size -4", ["batch_size"], []),
    (EXTRACT + " --teacher kmeans:pixel:32/8 --codebook-size 1", ["codebook_size"], []),
    (EXTRACT + " --teacher kmeans:pixel:32/8 --metric manhattan", ["metric"], ["euclidean", "cosine"]),
    (EXTRACT + " --teacher kmeans:pixel:32/8 --fit-samples 0", ["fit_samples"], []),
    (EXTRACT + " --teacher pca:pixel:32/8 --pca-dim 0", ["pca_dim"], [">= 1"]),
    (EXTRACT + " --teacher pca:random-vit:32/8 --pca-dim 33", ["pca_dim"], ["32"]),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --executor dask", ["executor"], ["'ray'", "'local'"]),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --ray-address nonsense", ["ray_address"], ["auto", "HOST:PORT"]),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --workers 0", ["workers"], []),
    ("--shards {ds} --out {out} --teacher pixel:32/8 --threads 0", ["threads"], []),
    (EXTRACT + " --teacher pixel:32/8 --device tpu", ["device"], ["'auto'", "'cpu'", "'cuda'"]),
    (EXTRACT + " --teacher pixel:32/8 --decode-threads 0", ["decode_threads"], [">= 1"]),
    (EXTRACT + " --teacher pixel:32/8 --decode-processes -1", ["decode_processes"], [">= 0"]),
    (EXTRACT + " --teacher pixel:32/8 --shards-in-flight 0", ["shards_in_flight"], [">= 1"]),
    (EXTRACT + " --teacher pixel:32/8 --autocast fp8", ["autocast"], ["none", "bf16", "fp16"]),
    (EXTRACT + " --teacher pixel:32/8 --device cpu --autocast bf16", ["autocast"], ["CUDA"]),
    pytest.param(
        EXTRACT + " --teacher pixel:32/8 --device cuda",
        ["device"],
        ["cpu"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here"),
    ),
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

TRAIN = "--shards {ds} --cache {cache} --out {out} --workers 0 --batch-size 8"
TRAIN_CASES = [
    ("--config {tmp}/no-such-config.json", ["no-such-config.json"], []),
    (TRAIN + " --steps 1 --betas 0.9", ["--betas"], ["expected 2"]),
    (TRAIN + " --steps 1 --decoder-heads 0", ["decoder_heads"], [">= 1"]),
    (TRAIN + " --steps 1 --max-views 0", ["max_views"], [">= 1"]),
    (TRAIN + " --steps 1 --max-views 3", ["max_views=3"], ["stores 2 per sample"]),
    (TRAIN + " --steps 1 --fresh-views", ["fresh_views"], ["--online-teacher"]),
    ("--shards {tmp}/no-such-ds --cache {cache} --out {out} --steps 1", ["not a prepared dataset", "dataset.json"], []),
    ("--shards {ds} --cache {tmp}/no-such-cache --out {out} --steps 1", ["no teacher cache"], []),
    ("--shards {ds} --cache {root} --out {out} --steps 1", ["no teacher cache", "not a digpt cache"], []),
    ("--cache {cache} --out {out} --steps 1", ["--shards"], ["required"]),
    ("--shards {ds} --out {out} --steps 1", ["--cache"], ["required"]),
    ("--shards {ds} --cache {cache} --steps 1", ["--out"], ["required"]),
    (TRAIN + " --steps 1 --tokenizer nope", ["tokenizer"], ["pixel_32_8"]),
    (TRAIN + " --steps 1 --student nope", ["student"], ["tiny-test", "small-cpu", "vit_base"]),
    (TRAIN + " --steps 1 --objective nope", ["objective"], ["digpt", "gen", "fd", "masked", "next-patch", "digit"]),
    (TRAIN + " --steps 1 --order nope", ["order"], ["raster", "random", "semaim", "similarity"]),
    (TRAIN + " --steps 1 --objective fd --order raster", ["--order"], ["no order"]),
    (TRAIN, ["--steps", "--epochs"], ["required"]),
    (TRAIN + " --steps 0", ["steps"], [">= 1"]),
    (TRAIN + " --steps -3", ["steps"], [">= 1"]),
    (TRAIN + " --steps one", ["--steps"], ["invalid int value"]),
    (TRAIN + " --epochs 0", ["epochs"], [">= 1"]),
    (TRAIN + " --epochs 1.5", ["--epochs"], ["invalid int value"]),
    (TRAIN + " --steps 1 --epochs 1", ["--epochs", "--steps"], ["not allowed with"]),
    ("--shards {ds} --cache {cache} --out {out} --steps 1 --batch-size 0", ["batch_size"], [">= 1"]),
    ("--shards {ds} --cache {cache} --out {out} --steps 1 --batch-size 1000", ["batch_size"], ["samples"]),
    (TRAIN + " --steps 1 --accum 0", ["accum"], [">= 1"]),
    (TRAIN + " --steps 1 --base-lr 0", ["base_lr"], ["> 0"]),
    (TRAIN + " --steps 1 --base-lr fast", ["--base-lr"], ["invalid float value"]),
    (TRAIN + " --steps 1 --min-lr -1", ["min_lr"], [">= 0"]),
    (TRAIN + " --steps 1 --weight-decay -0.1", ["weight_decay"], [">= 0"]),
    (TRAIN + " --steps 1 --warmup -1", ["warmup"], [">= 0"]),
    (TRAIN + " --steps 1 --clip-grad 0", ["clip_grad"], ["> 0"]),
    (TRAIN + " --steps 1 --cluster-size 0", ["cluster_size"], [">= 1"]),
    (TRAIN + " --steps 1 --cluster-size 3", ["cluster"], []),
    (TRAIN + " --steps 1 --decoder-depth 0", ["decoder_depth"], [">= 1"]),
    (TRAIN + " --steps 1 --decoder-dim 0", ["decoder_dim"], [">= 1"]),
    (TRAIN + " --steps 1 --decoder-dim -8", ["decoder_dim"], [">= 1"]),
    (TRAIN + " --steps 1 --mask-ratio 1.5", ["mask_ratio"], ["(0, 1)"]),
    (TRAIN + " --steps 1 --mask-ratio 0.3", ["--mask-ratio", "digpt"], ["masked"]),
    (TRAIN + " --steps 1 --drop-path 1", ["drop_path"], ["[0, 1)"]),
    (TRAIN + " --steps 1 --stem resnet", ["stem"], ["patch", "conv"]),
    (TRAIN + " --steps 1 --blind-batches 1", ["blind_batches"], [">= 2"]),
    (TRAIN + " --steps 1 --attn nope", ["attn"], ["sdpa", "flex", "eager"]),
    (TRAIN + " --steps 1 --workers -1", ["num_workers"], [">= 0"]),
    ("--shards {ds} --cache {cache} --out {out} --steps 1 --workers 9", ["worker"], ["shard"]),
    (TRAIN + " --steps 1 --shuffle-buffer -1", ["shuffle_buffer"], [">= 0"]),
    (TRAIN + " --steps 1 --seed -1", ["seed"], [">= 0"]),
    (TRAIN + " --steps 1 --log-every 0", ["log_every"], [">= 1"]),
    (TRAIN + " --steps 1 --ckpt-every -1", ["ckpt_every"], [">= 0"]),
    (TRAIN + " --steps 1 --amp fp8", ["amp"], ["auto", "bf16", "off"]),
    (TRAIN + " --steps 1 --device tpu", ["device"], ["auto", "cpu", "cuda"]),
    pytest.param(
        TRAIN + " --steps 1 --device cuda",
        ["device"],
        ["cpu"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here"),
    ),
    (TRAIN + " --steps 1 --target-norm zscore", ["--target-norm"], ["channel", "none"]),
    (TRAIN + " --steps 1 --on-mismatch ignore", ["on_mismatch"], ["error", "skip"]),
    ("--shards {ds} --cache {cache} --out EMPTY --steps 1", ["out"], []),
    ("--shards {ds} --cache {cache} --out {tmp}/w.pt --steps 1", ["out"], ["not a directory"]),
    # An existing directory that is not a run is never written into.
    ("--shards {ds} --cache {cache} --out {root} --steps 1 --workers 0 --batch-size 8", ["out"], ["not a digpt run"]),
]

PROBE = "--shards {ds} --run {run}"
RANDOM = "--shards {ds} --random-init --student tiny-test --out {out}/probe.json"
PROBE_CASES = [
    (RANDOM + " --select-fraction 1", ["select_fraction"], ["(0, 1)"]),
    (RANDOM + " --weight-decay -1", ["ProbeConfig.weight_decay"], [">= 0"]),
    (RANDOM + " --finetune-weight-decay -1", ["finetune_weight_decay"], [">= 0"]),
    (RANDOM + " --drop-path 1", ["drop_path"], ["[0, 1)"]),
    (RANDOM + " --warmup 1", ["warmup"], ["[0, 1)"]),
    ("--shards {ds} --run {tmp}/no-such-run", ["run"], ["not a run directory"]),
    ("--shards {ds} --run {root}", ["run"], ["not a run directory"]),
    ("--shards {ds} --run {norun}", ["no checkpoint"], []),
    ("--shards {tmp}/no-such-ds --run {run}", ["shards"], ["not a prepared dataset"]),
    ("--run {run}", ["--shards"], ["required"]),
    (PROBE + " --val-shards {tmp}/no-such-val", ["val_shards"], ["not a prepared dataset"]),
    (PROBE + " --kind svm", ["kind"], ["linear", "knn", "finetune"]),
    ("--shards {ds} --out {out}/probe.json", ["run"], ["random_init"]),
    ("--shards {ds} --random-init --out {out}/probe.json", ["student"], ["random_init"]),
    ("--shards {ds} --random-init --student nope --out {out}/probe.json", ["student"], ["tiny-test", "small-cpu"]),
    (PROBE + " --student tiny-test", ["student"], ["run"]),
    ("--shards {ds} --random-init --student tiny-test", ["out"], ["required"]),
    (PROBE + " --pool max", ["pool"], ["mean", "cls"]),
    (PROBE + " --layers a,b", ["--layers"], ["int"]),
    (PROBE + " --layers -1", ["layers"], ["0-based"]),
    (PROBE + " --layers EMPTY", ["layers"], ["non-empty"]),
    (PROBE + " --layers 9", ["layers"], ["depth"]),
    (PROBE + " --out EMPTY", ["out"], []),
    (PROBE + " --out {tmp}", ["out"], ["directory"]),
    (RANDOM + " --batch-size 0", ["batch_size"], [">= 1"]),
    (RANDOM + " --holdout 0", ["holdout"], ["(0, 1)"]),
    (RANDOM + " --holdout 1", ["holdout"], ["(0, 1)"]),
    (RANDOM + " --holdout half", ["--holdout"], ["invalid float value"]),
    (RANDOM + " --lrs 0.1,x", ["--lrs"], ["float"]),
    (RANDOM + " --lrs -0.1", ["lrs"], ["> 0"]),
    (RANDOM + " --lrs EMPTY", ["lrs"], ["non-empty"]),
    (RANDOM + " --epochs 0", ["epochs"], [">= 1"]),
    (RANDOM + " --k 0", ["ProbeConfig.k "], [">= 1"]),
    (RANDOM + " --k three", ["--k"], ["invalid int value"]),
    (RANDOM + " --temperature 0", ["temperature"], ["> 0"]),
    (RANDOM + " --finetune-epochs 0", ["finetune_epochs"], [">= 1"]),
    (RANDOM + " --finetune-lr 0", ["finetune_lr"], ["> 0"]),
    (RANDOM + " --layer-decay 0", ["layer_decay"], ["(0, 1]"]),
    (RANDOM + " --layer-decay 1.5", ["layer_decay"], ["(0, 1]"]),
    (RANDOM + " --crop-scale 0", ["crop_scale"], ["(0, 1]"]),
    (RANDOM + " --seed -1", ["seed"], [">= 0"]),
    (PROBE + " --device tpu", ["device"], ["auto", "cpu", "cuda"]),
    pytest.param(
        PROBE + " --device cuda",
        ["device"],
        ["cpu"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here"),
    ),
]

ABLATE = "demo --out {out} --executor local"
ABLATE_CASES = [
    (ABLATE + " --image-size 32", ["image"], ["64"]),
    ("bogus --out {out}", ["recipe"], ["demo", "tokenizers", "decoders", "orders", "storage"]),
    ("demo", ["--out"], ["required"]),
    ("demo --out EMPTY", ["out"], []),
    ("demo --out {tmp}/w.pt", ["out"], ["not a directory"]),
    (ABLATE + " --shards {tmp}/no-such-ds", ["shards"], ["not a prepared dataset"]),
    (ABLATE + " --num-samples 0", ["num_samples"], [">= 1"]),
    (ABLATE + " --num-samples 8", ["num_samples"], ["num_classes"]),
    (ABLATE + " --num-samples lots", ["--num-samples"], ["invalid int value"]),
    (ABLATE + " --num-classes 1", ["num_classes"], ["[2, 64]"]),
    (ABLATE + " --num-classes 65", ["num_classes"], ["[2, 64]"]),
    (ABLATE + " --student nope", ["student"], ["small-cpu", "demo-cpu"]),
    (ABLATE + " --steps 0", ["steps"], [">= 1"]),
    (ABLATE + " --batch-size 0", ["batch_size"], [">= 1"]),
    (ABLATE + " --base-lr 0", ["base_lr"], ["> 0"]),
    (ABLATE + " --base-lr quick", ["--base-lr"], ["invalid float value"]),
    (ABLATE + " --seeds 0", ["seeds"], [">= 1"]),
    ("demo --out {out} --executor dask", ["executor"], ["ray", "local"]),
    (ABLATE + " --weights nofile", ["--weights"], ["TEACHER=FILE"]),
    (
        "tokenizers --out {out} --executor local --weights efficientnet_lite0={tmp}/no-weights.pth",
        ["weights"],
        ["not found"],
    ),
    ("tokenizers --out {out} --executor local --weights nope={tmp}/w.pt", ["unknown teacher"], []),
    (ABLATE + " --weights efficientnet_lite0={tmp}/w.pt", ["weights"], ["tokenizers"]),
    (ABLATE + " --views 0", ["views"], [">= 1"]),
    (ABLATE + " --semantic-teacher nope:128", ["semantic_teacher"], ["unknown teacher"]),
    (ABLATE + " --stem resnet", ["stem"], ["patch", "conv"]),
    (ABLATE + " --decoder-dim 0", ["decoder_dim"], [">= 1"]),
    (ABLATE + " --cache {tmp}/w.pt", ["cache"], ["not a directory"]),
    (ABLATE + " --workers -1", ["workers"], [">= 0"]),
    (ABLATE + " --probe-samples 8", ["probe_samples"], ["num_classes"]),
    (ABLATE + " --probe-samples -1", ["probe_samples"], [">= 0"]),
    (ABLATE + " --probe-shards {tmp}/nope", ["probe_shards"], ["not found"]),
    (ABLATE + " --jobs -1", ["jobs"], [">= 0"]),
    (ABLATE + " --jobs two", ["--jobs"], ["invalid int value"]),
]

DEMO = "--out {out} --executor local"
DEMO_CASES = [
    (DEMO + " --num-classes 1", ["num_classes"], ["[2, 64]"]),
    (DEMO + " --batch-size 0", ["batch_size"], [">= 1"]),
    (DEMO + " --semantic-teacher nope:128", ["semantic_teacher"], ["unknown teacher"]),
    ("--out EMPTY", ["out"], []),
    ("--out {tmp}/w.pt", ["out"], ["not a directory"]),
    (DEMO + " --num-samples 0", ["num_samples"], [">="]),
    (DEMO + " --num-samples 8", ["num_samples"], ["num_classes"]),
    (DEMO + " --num-samples some", ["--num-samples"], ["invalid int value"]),
    (DEMO + " --steps 0", ["steps"], [">= 1"]),
    (DEMO + " --steps x", ["--steps"], ["invalid int value"]),
    (DEMO + " --base-lr 0", ["base_lr"], ["> 0"]),
    (DEMO + " --student nope", ["student"], ["demo-cpu", "small-cpu"]),
    (DEMO + " --student tiny-test", ["student"], ["64"]),
    (DEMO + " --decoder-dim 0", ["decoder_dim"], [">= 1"]),
    (DEMO + " --probe-samples 8", ["probe_samples"], ["num_classes"]),
    ("--out {out} --executor dask", ["executor"], ["ray", "local"]),
    (DEMO + " --jobs -1", ["jobs"], [">= 0"]),
]

EXPORT_CASES = [
    ("{tmp}/no-such-run --out {out}/enc.safetensors", ["run"], ["not a run directory"]),
    ("{root} --out {out}/enc.safetensors", ["run"], ["not a run directory"]),
    ("{norun} --out {out}/enc.safetensors", ["no checkpoint"], []),
    ("--out {out}/enc.safetensors", ["run"], ["required"]),
    ("{run}", ["--out"], ["required"]),
    ("{run} --out EMPTY", ["out"], []),
    ("{run} --out {tmp}/dir.safetensors", ["out"], ["directory"]),
    ("{run} --out {out}/enc.pt", ["out"], [".safetensors"]),
]


def _png(mode="RGB", size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_dataset):
    """A valid image folder, some broken roots, a valid cache of the shared tiny dataset, a one-step run
    trained on it, and a run directory without a checkpoint."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    for cls in ("a", "b"):
        (tmp / "root" / cls).mkdir(parents=True)
        (tmp / "root" / cls / "x.png").write_bytes(_png())
    (tmp / "empty-root").mkdir()
    (tmp / "no-images-root" / "a").mkdir(parents=True)
    (tmp / "no-images-root" / "a" / "notes.txt").write_text("not an image")
    (tmp / "w.pt").write_bytes(b"\0")
    (tmp / "dir.safetensors").mkdir()
    cache = tmp / "cache"
    assert (
        cli.main(
            ["extract", "--shards", tiny_dataset, "--out", str(cache), "--teacher", "pixel:32/8", "--executor", "local"]
        )
        == 0
    )
    run = tmp / "run"
    assert (
        cli.main(
            [
                "train",
                "--shards",
                tiny_dataset,
                "--cache",
                str(cache),
                "--out",
                str(run),
                "--student",
                "tiny-test",
                "--steps",
                "1",
                "--batch-size",
                "8",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    (tmp / "norun").mkdir()
    shutil.copy(run / "config.json", tmp / "norun" / "config.json")
    return {
        "tmp": str(tmp),
        "root": str(tmp / "root"),
        "ds": tiny_dataset,
        "cache": str(cache),
        "run": str(run),
        "norun": str(tmp / "norun"),
    }


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
    watched = {k: _snapshot(places[k]) for k in ("ds", "cache", "root", "run", "norun")}
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


CASES_BY_COMMAND = {
    "prepare": PREPARE_CASES,
    "extract": EXTRACT_CASES,
    "verify": VERIFY_CASES,
    "train": TRAIN_CASES,
    "probe": PROBE_CASES,
    "ablate": ABLATE_CASES,
    "demo": DEMO_CASES,
    "export": EXPORT_CASES,
}


def _with_command(command: str, case):
    """(command, args, any_of, all_of), keeping a case's marks (e.g. skip where CUDA is present)."""
    if hasattr(case, "values"):
        return pytest.param(command, *case.values, marks=case.marks, id=f"{command}-{case.values[0]}")
    return pytest.param(command, *case, id=f"{command}-{case[0]}")


@pytest.mark.parametrize(
    "command,args,any_of,all_of", [_with_command(c, case) for c, cases in CASES_BY_COMMAND.items() for case in cases]
)
def test_bad_value_is_refused(command, args, any_of, all_of, places, tmp_path, capsys):
    _check(*_run(command, args, places, tmp_path, capsys), any_of, all_of)


CASES = {
    "prepare": PREPARE_CASES,
    "extract": EXTRACT_CASES,
    "verify": VERIFY_CASES,
    "train": TRAIN_CASES,
    "probe": PROBE_CASES,
    "ablate": ABLATE_CASES,
    "demo": DEMO_CASES,
    "export": EXPORT_CASES,
}


def test_every_option_has_a_bad_value_case():
    """A new option of any command must get a case of that command above (or be listed here as exempt)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    # Flags: no value to get wrong.
    exempt = {"--help", "--allow-hub", "--resume", "--online-teacher", "--random-init", "--full", "--quick", "--no-knn"}
    assert set(sub) == set(CASES) | {"teachers"}, "a new command needs a case table"
    missing = []
    for command, cases in CASES.items():
        # Whole words, so that a case for --kind does not count as one for --k.
        words = {w for c in cases for w in str(c.values[0] if hasattr(c, "values") else c[0]).split()}
        parsers = (
            next(a for a in sub[command]._actions if a.dest == "kind").choices.items()
            if command == "prepare"
            else [(None, sub[command])]
        )
        for kind, p in parsers:
            for action in p._actions:
                for opt in action.option_strings:
                    if opt.startswith("--") and opt not in exempt and opt not in words:
                        missing.append(" ".join(x for x in (command, kind, opt) if x))
    assert not missing, f"options without a bad-value case: {missing}"
