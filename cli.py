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


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn images into webdataset shards + a Parquet manifest")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{imagefolder,wds,parquet,synthetic}")
    f = kinds.add_parser("imagefolder", help="ImageNet-style class folders -> tar shards")
    f.add_argument("root", help="directory with one sub-directory per class")
    f.add_argument("--out", required=True, help="dataset directory to write")
    f.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    w = kinds.add_parser("wds", help="index existing webdataset / img2dataset shards in place")
    w.add_argument("pattern", help="shard pattern, e.g. '/data/laion/{00000..00099}.tar'")
    w.add_argument("--out", required=True, help="dataset directory to write the manifest into")
    q = kinds.add_parser("parquet", help="parquet shards with an image-bytes column (Hugging Face layout) -> tar shards")
    q.add_argument("pattern", help="parquet pattern, e.g. 's3://bucket/train-{00000..00009}.parquet'")
    q.add_argument("--out", required=True, help="dataset directory to write")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    q.add_argument("--image-column", default="image", help="struct column with 'bytes' or binary column (default image)")
    q.add_argument("--label-column", default="label", help="integer label column (default label; absent: -1)")
    s = kinds.add_parser("synthetic", help="generate a class-structured image set (demo, tests)")
    s.add_argument("--out", required=True, help="dataset directory to write")
    s.add_argument("--num-samples", type=int, default=512)
    s.add_argument("--num-classes", type=int, default=8)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--shard-size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)


def _cmd_prepare(a: argparse.Namespace) -> int:
    from teacher_cache import prepare as P

    if a.kind == "synthetic":
        ds = P.prepare_synthetic(P.SyntheticConfig(out=a.out, num_samples=a.num_samples, num_classes=a.num_classes,
                                                   image_size=a.image_size, shard_size=a.shard_size, seed=a.seed))
    elif a.kind == "imagefolder":
        ds = P.prepare_imagefolder(P.ImageFolderConfig(root=a.root, out=a.out, shard_size=a.shard_size))
    elif a.kind == "parquet":
        ds = P.prepare_parquet(P.ParquetConfig(pattern=a.pattern, out=a.out, shard_size=a.shard_size,
                                               image_column=a.image_column, label_column=a.label_column))
    else:
        ds = P.prepare_wds(P.WdsConfig(pattern=a.pattern, out=a.out))
    print(ds.summary())
    return 0


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="run teachers once over the shards and write the Zarr cache")
    p.add_argument("--shards", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="cache directory or fsspec URL")
    p.add_argument("--teacher", action="append", required=True, metavar="NAME",
                   help="teacher to extract (repeatable); see `digpt teachers`")
    p.add_argument("--weights", action="append", default=None, metavar="FILE",
                   help="local weights file, one per --teacher in order (use '-' for none)")
    p.add_argument("--layer", type=int, default=None, help="block whose tokens are stored (1-based; default last)")
    p.add_argument("--group", action="append", default=None, help="cache group name per --teacher")
    p.add_argument("--views", type=int, default=2, help="augmented views per sample (default 2)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the view plan")
    p.add_argument("--dtype", default="fp16", help="token storage: fp32, fp16, bf16 or int8 (default fp16)")
    p.add_argument("--chunk-rows", type=int, default=64, help="samples per Zarr chunk")
    p.add_argument("--codec", default="auto",
                   help="Blosc codec of the targets: auto (lz4 for features, zstd for codes), zstd or lz4")
    p.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    p.add_argument("--codebook-size", type=int, default=512, help="kmeans:<teacher> codebook size")
    p.add_argument("--pca-dim", type=int, default=64, help="pca:<teacher> principal directions kept (default 64)")
    p.add_argument("--fit-samples", type=int, default=512, help="kmeans:<teacher> / pca:<teacher> samples to fit on")
    p.add_argument("--codebook", default=None, help="kmeans:<teacher> codebook file instead of fitting")
    p.add_argument("--executor", default="ray", help="ray (default) or local (in-process, serial)")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (e.g. auto)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: GPUs, else cores/threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--allow-hub", action="store_true", help="let teachers download weights from a hub")


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
        TeacherConfig(name=t, weights=None if w in (None, "-") else w, layer=a.layer, group=g,
                      codebook=a.codebook, codebook_size=a.codebook_size, fit_samples=a.fit_samples, pca_dim=a.pca_dim,
                      allow_hub=a.allow_hub)
        for t, w, g in zip(a.teacher, weights, groups)
    )
    return ExtractConfig(shards=a.shards, out=a.out, teachers=teachers, aug=AugConfig(views=a.views, seed=a.seed),
                         storage=StorageConfig(dtype=a.dtype, chunk_rows=a.chunk_rows, codec=a.codec), batch_size=a.batch_size,
                         executor=a.executor, ray_address=a.ray_address, workers=a.workers, threads=a.threads,
                         device=a.device)


def _cmd_extract(a: argparse.Namespace) -> int:
    from teacher_cache.extract import run_extract

    summary = run_extract(_extract_config(a))
    print(summary.table())
    return 0 if summary.ok else 1


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a cache: complete, finite, consistent, aligned")
    p.add_argument("--shards", required=True, help="prepared dataset directory")
    p.add_argument("--cache", required=True, help="cache directory or URL")
    p.add_argument("--tokenizer", action="append", default=None, help="group(s) to check (default all)")
    p.add_argument("--spot-checks", type=int, default=8, help="views recomputed by the teacher (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _cmd_verify(a: argparse.Namespace) -> int:
    from teacher_cache.verify import VerifyConfig, run_verify

    report = run_verify(VerifyConfig(shards=a.shards, cache=a.cache, tokenizers=tuple(a.tokenizer or ()),
                                     spot_checks=a.spot_checks, seed=a.seed, device=a.device))
    print(report.table())
    return 0 if report.ok else 1


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a student against a teacher cache")
    p.add_argument("--shards", required=True, help="prepared dataset directory")
    p.add_argument("--cache", required=True, help="teacher cache made from those shards")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer group (needed when the cache holds several)")
    p.add_argument("--student", default="tiny-test", help="encoder size: tiny-test, small-cpu, vit_tiny, vit_small, vit_base, vit_large")
    p.add_argument("--objective", default="digpt", help="digpt, gen, fd, masked, igpt, digit")
    p.add_argument("--order", default=None, help="raster, random, semantic (default: the objective's)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=int, help="epochs over the shards")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step per rank (default 64)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    p.add_argument("--base-lr", type=float, default=1.5e-4, help="lr per 256 samples (default 1.5e-4)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup: fraction of steps (<1) or steps")
    p.add_argument("--clip-grad", type=float, default=3.0)
    p.add_argument("--cluster-size", type=int, default=None, help="cluster side in patches (default: grid/2)")
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--decoder-dim", type=int, default=None)
    p.add_argument("--mask-ratio", type=float, default=0.5, help="masked objective: fraction of patches masked")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--attn", default="sdpa", help="attention kernel: sdpa, flex (GPU), sdpa_dense, eager")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16, off")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--online-teacher", action="store_true", help="run the teacher in the step (baseline/oracle)")
    p.add_argument("--target-norm", default="channel", choices=["channel", "none"],
                   help="standardise continuous targets per channel with the cache's statistics (default) or not")


def train_config(a: argparse.Namespace):
    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig

    student = StudentConfig(size=a.student, cluster_size=a.cluster_size, decoder_depth=a.decoder_depth,
                            decoder_dim=a.decoder_dim, mask_ratio=a.mask_ratio, drop_path=a.drop_path, attn_impl=a.attn)
    data = DataConfig(shards=a.shards, cache=a.cache, tokenizer=a.tokenizer, img_size=student.encoder_config().img_size,
                      batch_size=a.batch_size, num_workers=a.workers, seed=a.seed, shuffle_buffer=a.shuffle_buffer)
    optim = OptimConfig(base_lr=a.base_lr, min_lr=a.min_lr, weight_decay=a.weight_decay, warmup=a.warmup,
                        clip_grad=a.clip_grad, accum=a.accum)
    return TrainConfig(data=data, out=a.out, student=student, objective=a.objective, order=a.order, optim=optim,
                       steps=a.steps, epochs=a.epochs, log_every=a.log_every, ckpt_every=a.ckpt_every, amp=a.amp,
                       device=a.device, resume=a.resume, online_teacher=a.online_teacher, seed=a.seed,
                       target_norm=a.target_norm)


def _cmd_train(a: argparse.Namespace) -> int:
    from student.train import train

    train(train_config(a))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's encoder as a timm ViT checkpoint (safetensors)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="output .safetensors file")


def _cmd_export(a: argparse.Namespace) -> int:
    from student.export import export_encoder

    line = export_encoder(a.run, a.out)
    print(f"wrote {a.out}; load it with:\n  {line}")
    return 0


def _add_teachers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("teachers", help="list teacher families and presets")


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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from pipelines.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the whole pipeline on a generated dataset, on a CPU, in minutes")
    p.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help=f"dataset size (default {d.num_samples})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps per student (default {d.steps})")
    p.add_argument("--student", default=d.student, help=f"student preset (default {d.student})")
    p.add_argument("--executor", default=d.executor, help="ray (default) or local")


def _cmd_demo(a: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=a.out, num_samples=a.num_samples, steps=a.steps, student=a.student, executor=a.executor)
    return 0 if run_demo(cfg).ok else 1


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    from pipelines.ablate import RECIPES, AblateConfig

    d = AblateConfig(recipe="demo", out="-")
    p = sub.add_parser("ablate", help="train several students against several caches; one report")
    p.add_argument("recipe", help="one of: " + ", ".join(sorted(RECIPES)))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shards", default=None, help="prepared dataset (default: generate a synthetic one)")
    p.add_argument("--num-samples", type=int, default=d.num_samples)
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--student", default=d.student)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per variant (mean +- std)")
    p.add_argument("--executor", default=d.executor)
    p.add_argument("--weights", action="append", default=[], metavar="TEACHER=FILE",
                   help="add a headline teacher with local weights to the tokenizers recipe (repeatable)")


def _cmd_ablate(a: argparse.Namespace) -> int:
    from pipelines.ablate import AblateConfig, run_ablation

    weights = []
    for item in a.weights:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights expects TEACHER=FILE, got {item!r}")
        weights.append((name, path))
    run_ablation(AblateConfig(recipe=a.recipe, out=a.out, shards=a.shards, num_samples=a.num_samples,
                              num_classes=a.num_classes, student=a.student, steps=a.steps, batch_size=a.batch_size,
                              base_lr=a.base_lr, seeds=a.seeds, executor=a.executor, weights=tuple(weights)))
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    from pipelines.probe import ProbeConfig

    d = ProbeConfig(shards="-", run="-")
    p = sub.add_parser("probe", help="evaluate an encoder per layer: linear probe, k-NN or a short fine-tune")
    p.add_argument("--run", default=None, help="trained run directory (omit with --random-init --student)")
    p.add_argument("--shards", required=True, help="prepared dataset to train the probe on")
    p.add_argument("--val-shards", default=None, help="dataset to report on (default: a stratified holdout)")
    p.add_argument("--kind", default=d.kind, help="linear (default), knn or finetune")
    p.add_argument("--random-init", action="store_true", help="a seeded random encoder of the same shape: the floor")
    p.add_argument("--student", default=None, help="encoder preset for --random-init without --run")
    p.add_argument("--pool", default=d.pool, help="mean (of patch tokens, default) or cls")
    p.add_argument("--layers", default=None, help="0-based blocks to probe, comma-separated (default all)")
    p.add_argument("--out", default=None, help="result JSON (default RUN/probe_<kind>.json; required without --run)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--holdout", type=float, default=d.holdout, help=f"report fraction without --val-shards ({d.holdout})")
    p.add_argument("--lrs", default=",".join(map(str, d.lrs)), help="linear: learning rates tried, comma-separated")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"linear: full-batch steps (default {d.epochs})")
    p.add_argument("--k", type=int, default=d.k, help=f"knn: neighbours (default {d.k})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"knn: vote temperature ({d.temperature})")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--layer-decay", type=float, default=d.layer_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)


def _cmd_probe(a: argparse.Namespace) -> int:
    from pipelines.probe import ProbeConfig, run_probe

    def values(text: str, flag: str, kind: type) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None

    layers = None if a.layers is None else values(a.layers, "--layers", int)
    cfg = ProbeConfig(shards=a.shards, kind=a.kind, run=a.run, val_shards=a.val_shards, out=a.out,
                      random_init=a.random_init, student=a.student, pool=a.pool, layers=layers,
                      batch_size=a.batch_size, holdout=a.holdout, lrs=values(a.lrs, "--lrs", float), epochs=a.epochs,
                      k=a.k, temperature=a.temperature, finetune_epochs=a.finetune_epochs,
                      finetune_lr=a.finetune_lr, layer_decay=a.layer_decay, seed=a.seed, device=a.device)
    result = run_probe(cfg)
    print(result.table())
    print(f"wrote {cfg.out_path()}")
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "prepare": (_add_prepare, _cmd_prepare),
    "extract": (_add_extract, _cmd_extract),
    "verify": (_add_verify, _cmd_verify),
    "train": (_add_train, _cmd_train),
    "export": (_add_export, _cmd_export),
    "teachers": (_add_teachers, _cmd_teachers),
    "ablate": (_add_ablate, _cmd_ablate),
    "demo": (_add_demo, _cmd_demo),
    "probe": (_add_probe, _cmd_probe),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as e:
        # Configuration and input errors: one line that names the problem, no traceback, nothing run.
        if os.environ.get("DIGPT_DEBUG"):
            raise
        print(f"digpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
