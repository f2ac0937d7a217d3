"""The learning study (LEARNING.md): can a student learn on a CPU budget, and what moves its probe?

Two parts, each printing a markdown table (and writing it as JSON under ``--out``):

``supervised`` — the upper bound of a budget: the student trained *with labels* for ``--steps`` steps
on the probe's training split, scored on its report split (the same splits every probe uses). A
regime in which the student cannot learn the task with labels cannot show a pretraining effect. Rows:
the plain ViT, the ViT with the convolutional stem, a 4-layer CNN (is the task learnable at all?), and
``probe --kind finetune --random-init`` with the same number of steps (the product's own recipe).

``pretrain`` — one ``digpt ablate learning`` per setting (feature distillation and D-iGPT on the
semantic teacher, D-iGPT on pixel targets, the random-init floor), all against one cache: linear-probe
top-1 (best layer), mean ± standard deviation over seeds, and the noise margin (two standard errors of a
difference on the report split).

``compare`` — probe results already written (``probe_linear.json`` of runs made by ``digpt train``/``probe``
or ``digpt ablate``), grouped by variant: mean top-1 over seeds, and each variant's gap to a reference
with its paired two-standard-error bar (``pipelines/report.py: paired_margin``: per seed on the shared
report split, and the spread between seeds when there are several).

    python bench/learning.py supervised --shards study/data --steps 600 --seeds 2
    python bench/learning.py pretrain --shards study/data --cache study/cache --steps 300 600 --seeds 2
    python bench/learning.py compare --ref floor floor='runs/random-init_s*/probe_linear.json' \
        pixel='runs/digpt_pixel_s*/probe_linear.json' semantic='runs/digpt_semantic_s*/probe_linear.json'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pipelines.probe import (  # noqa: E402
    Classifier,
    ProbeConfig,
    finetune_scores,
    load_views,
    make_splits,
    topk_accuracy,
)
from student.sizes import vit_config  # noqa: E402
from student.train import lr_schedule  # noqa: E402
from student.vit import VisionTransformer  # noqa: E402
from teacher_cache.dataset import load_dataset  # noqa: E402


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


class SmallCNN(nn.Module):
    """3x3 convs 32-64-96-96 with BN, ReLU and 2x max-pool, global average pool, linear head."""

    def __init__(self, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in (32, 64, 96, 96):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def supervised_loop(
    model: nn.Module,
    views: torch.Tensor,
    labels: torch.Tensor,
    test_views: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> torch.Tensor:
    """A plain supervised loop: AdamW, warmup + cosine, flips, batches drawn with replacement."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    lrs = lr_schedule(steps, lr, 0.1, 0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x = views[idx].float().div_(255)
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in opt.param_groups:
            group["lr"] = float(lrs[step])
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(v.float().div(255)) for v in test_views.split(256)])


def two_se(p: float, n: int) -> float:
    """Two standard errors of a difference of two accuracies near ``p``, each on ``n`` samples."""
    return 2 * math.sqrt(2 * p * (1 - p) / n)


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def supervised(args: argparse.Namespace) -> list[dict]:
    ds = load_dataset(args.shards)
    cfg = vit_config(args.student)
    views, labels = load_views(ds, cfg.img_size, Counter())
    splits = make_splits(labels.numpy(), 0, 0.25, 0.25, 0)
    tr, rp = splits.train, splits.report
    num_classes = int(labels.max()) + 1
    rows = []
    for name in args.models:
        accs, secs = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            if name == "finetune-probe":
                enc = VisionTransformer(vit_config(args.student, **({"stem": args.stem} if args.stem else {})))
                epochs = max(1, round(args.steps * args.batch_size / len(tr)))
                pcfg = ProbeConfig(
                    shards=args.shards,
                    kind="finetune",
                    random_init=True,
                    student=args.student,
                    out="-",
                    finetune_epochs=epochs,
                    batch_size=args.batch_size,
                    seed=seed,
                )
                scores = finetune_scores(pcfg, enc, views[tr], labels[tr], views[rp], num_classes)
            else:
                if name == "cnn":
                    model: nn.Module = SmallCNN(num_classes)
                else:
                    stem = "conv" if name == "vit-conv" else "patch"
                    model = Classifier(VisionTransformer(vit_config(args.student, stem=stem)), num_classes, "mean")
                scores = supervised_loop(
                    model, views[tr], labels[tr], views[rp], args.steps, args.batch_size, args.lr, seed
                )
            accs.append(topk_accuracy(scores, labels[rp], 1))
            secs.append(time.perf_counter() - t0)
            print(f"{name} seed {seed}: top-1 {accs[-1]:.3f} ({secs[-1]:.0f}s)", flush=True)
        mean, std = _stats(accs)
        rows.append(
            {
                "model": name,
                "top1": mean,
                "std": std,
                "seeds": accs,
                "seconds": statistics.fmean(secs),
                "n_report": len(rp),
            }
        )
    print(
        f"\nSupervised upper bound: {args.student} ({args.steps} steps x {args.batch_size}, lr {args.lr}), "
        f"{len(tr)} train / {len(rp)} report images of {args.shards}; {machine()}\n"
    )
    print("| model | report top-1 (mean ± std over seeds) | seconds / run |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['top1']:.3f} ± {r['std']:.3f} | {r['seconds']:.0f} |")
    print(f"\nnoise: two standard errors of a difference at p=0.5 on {len(rp)} samples = {two_se(0.5, len(rp)):.3f}")
    return rows


def pretrain(args: argparse.Namespace) -> list[dict]:
    from pipelines.ablate import AblateConfig, run_ablation

    rows = []
    for steps in args.steps_list:
        for lr in args.base_lrs:
            out = os.path.join(args.out, f"{args.student}_{args.stem or 'preset'}_{steps}steps_lr{lr:g}")
            cfg = AblateConfig(
                recipe="learning",
                out=out,
                shards=args.shards,
                cache=args.cache,
                student=args.student,
                steps=steps,
                batch_size=args.batch_size,
                base_lr=lr,
                seeds=args.seeds,
                views=args.views,
                executor=args.executor,
                semantic_teacher=args.semantic,
                knn=False,
                stem=args.stem,
            )
            res = run_ablation(cfg)
            for r in res["rows"]:
                rows.append(
                    {
                        "steps": steps,
                        "base_lr": lr,
                        "variant": r["variant"],
                        "top1": r["linear_top1"],
                        "std": r["linear_top1_std"],
                        "loss_vs_blind": r.get("loss_vs_blind"),
                        "train_seconds": r["train_seconds"],
                        "n_report": res["n_report"],
                    }
                )
    n = rows[0]["n_report"] if rows else 0
    print(
        f"\nPretraining: {args.student} (stem {args.stem or 'preset'}), batch {args.batch_size}, {args.seeds} seed(s), semantic teacher "
        f"{args.semantic}, {args.views} views; {machine()}\n"
    )
    print(
        "| steps | base lr | variant | linear top-1 (mean ± std) | loss / blind | train s |\n|---:|---:|---|---:|---:|---:|"
    )
    for r in rows:
        lb = (
            "-"
            if r["loss_vs_blind"] is None or r["loss_vs_blind"] != r["loss_vs_blind"]
            else f"{r['loss_vs_blind']:.3f}"
        )
        print(
            f"| {r['steps']} | {r['base_lr']:g} | {r['variant']} | {r['top1']:.3f} ± {r['std']:.3f} | {lb} | "
            f"{r['train_seconds']:.0f} |"
        )
    if n:
        print(f"\nnoise: two standard errors of a difference at p=0.5 on {n} report samples = {two_se(0.5, n):.3f}")
    return rows


def compare(args: argparse.Namespace) -> list[dict]:
    """Group probe JSONs by variant (``NAME=GLOB``; a probe's seed is its config's), then each variant's
    mean top-1 and its gap to ``--ref`` with the paired error bar."""
    import glob

    from pipelines.report import paired_margin

    groups: dict[str, dict[str, dict]] = {}
    for item in args.groups:
        name, sep, pattern = item.partition("=")
        if not sep:
            raise SystemExit(f"compare: expected NAME=GLOB, got {item!r}")
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"compare: {pattern!r} matches no probe result")
        groups[name] = {}
        where: dict[str, str] = {}
        for f in files:
            r = json.load(open(f))
            if r.get("report_correct") is None:
                raise SystemExit(f"compare: {f} has no per-sample results (probed before they were recorded)")
            seed = str(r["config"]["seed"])
            if seed in where:  # e.g. 'digpt_s*' also matches 'digpt_semaim_s0': one would silently replace the other
                raise SystemExit(
                    f"compare: {name}={pattern!r} matches two probes of seed {seed}: {where[seed]} and {f}; "
                    "narrow the pattern (e.g. NAME_s[0-9]/...)"
                )
            where[seed] = f
            groups[name][seed] = r
    if args.ref not in groups:
        raise SystemExit(f"compare: --ref {args.ref!r} is not one of {list(groups)}")
    ref = groups[args.ref]
    rows = []
    for name, runs in groups.items():
        tops = [r["top1"] for r in runs.values()]
        common = sorted(set(runs) & set(ref))
        gaps = [runs[s]["top1"] - ref[s]["top1"] for s in common]
        m = paired_margin({s: runs[s]["report_correct"] for s in common}, {s: ref[s]["report_correct"] for s in common})
        rows.append(
            {
                "variant": name,
                "seeds": sorted(runs),
                "top1": statistics.fmean(tops),
                "per_seed": tops,
                "gap": statistics.fmean(gaps) if gaps else None,
                "margin": m,
                "n_report": next(iter(runs.values()))["n_report"],
            }
        )
    kinds = sorted({r.get("kind", "linear") for runs in groups.values() for r in runs.values()})
    kind = kinds[0] if len(kinds) == 1 else "/".join(kinds) + " (mixed!)"
    n = sorted({r["n_report"] for runs in groups.values() for r in runs.values()})
    print(
        f"\n{kind} top-1 per variant on {'/'.join(map(str, n))} report samples; gap to {args.ref!r} paired per "
        f"seed on the shared report split; {machine()}\n"
    )
    print(f"| variant | seeds | {kind} top-1 (mean) | per seed | gap to ref ± 2 SE | beyond noise? |")
    print("|---|---:|---:|---|---:|---|")
    for r in rows:
        per = ", ".join(f"{x:.3f}" for x in r["per_seed"])
        if r["variant"] == args.ref or r["gap"] is None or r["margin"] is None:
            gap, verdict = "—", "—"
        else:
            gap = f"{r['gap']:+.3f} ± {r['margin']:.3f}"
            verdict = "yes" if abs(r["gap"]) > r["margin"] else "no"
        print(f"| {r['variant']} | {len(r['seeds'])} | {r['top1']:.3f} | {per} | {gap} | {verdict} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("supervised", help="the student trained with labels in the same budget")
    s.add_argument("--shards", required=True)
    s.add_argument("--student", default="demo-cpu")
    s.add_argument("--stem", default=None, help="stem of the finetune-probe row (default: the preset's)")
    s.add_argument("--models", nargs="+", default=["vit", "vit-conv", "cnn", "finetune-probe"])
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seeds", type=int, default=2)
    s.add_argument("--out", default="study_out")
    t = sub.add_parser("pretrain", help="pretraining variants against the floor, per setting")
    t.add_argument("--shards", required=True)
    t.add_argument("--cache", required=True)
    t.add_argument("--student", default="demo-cpu")
    t.add_argument("--stem", default=None, help="patch or conv (default: the preset's)")
    t.add_argument("--steps", dest="steps_list", type=int, nargs="+", default=[600])
    t.add_argument("--base-lr", dest="base_lrs", type=float, nargs="+", default=[1.5e-3])
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seeds", type=int, default=2)
    t.add_argument("--views", type=int, default=2)
    t.add_argument("--semantic", default="efficientnet_lite0:128")
    t.add_argument("--executor", default="local")
    t.add_argument("--out", default="study_out")
    c = sub.add_parser("compare", help="probe results grouped by variant, gaps with paired error bars")
    c.add_argument("groups", nargs="+", metavar="NAME=GLOB", help="a variant and its probe_linear.json files")
    c.add_argument("--ref", required=True, help="the variant every gap is measured from (e.g. the floor)")
    c.add_argument("--out", default="study_out")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = {"supervised": supervised, "pretrain": pretrain, "compare": compare}[args.part](args)
    with open(os.path.join(args.out, f"{args.part}.json"), "w") as f:
        json.dump({"args": vars(args), "machine": machine(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
