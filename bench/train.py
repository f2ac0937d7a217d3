"""Student step time with cached targets vs the same teacher run online (same student, batch, device).

**Step level** (any shape, random weights): one optimizer step as ``student/train.py`` takes it — targets
into the batch, per-channel target standardisation (when the trainer has it), forward under the run's
autocast, backward, gradient clipping, AdamW — with

* **cached**: the targets are the teacher's tokens as stored (``--dtype``), decoded with the store's
  ``decode_block`` and copied to the device, as the loader hands them over;
* **online**: ``student.train.online_targets`` runs the teacher on the batch's ``teacher_images`` first,
  exactly what ``digpt train --online-teacher`` does.

The two interleave; the speedup is the median over rounds of ``t_online / t_cached``. The teacher forward
and the bare student step are also timed alone.

**Loop level** (``--loop-steps N``, registry teachers only): the real ``train()`` for N steps, cached vs
``online_teacher=True``, on a small generated dataset and cache — loader included (online also replays
every view at the teacher's resolution).

    python bench/train.py                                     # demo-cpu student, EfficientNet-Lite0@256 teacher, CPU
    python bench/train.py --student tiny-test --teacher random-vit:32/8 --batch-size 8
    python bench/train.py --student vit_base --teacher-shape vit_large_14 --batch-size 64 --device cuda --loop-steps 0
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import contextlib
import math
import time

from bench import _common as C

# Random-weight ViT teachers at the shapes of the paper's teachers: (input size, patch, width, depth, heads).
TEACHER_SHAPES = {
    "vit_base_16": (224, 16, 768, 12, 12),  # CLIP / DINO ViT-B/16: 14x14 tokens x 768
    "vit_large_14": (224, 14, 1024, 24, 16),  # CLIP / OpenCLIP ViT-L/14: 16x16 tokens x 1024
    "vit_huge_14": (224, 14, 1280, 32, 16),  # OpenCLIP ViT-H/14 trunk: 16x16 tokens x 1280
}


def make_teacher(name: str | None, shape: str | None):
    if shape:
        from teacher_cache.teachers.tiny import RandomViTTeacher

        if shape not in TEACHER_SHAPES:
            raise SystemExit(f"--teacher-shape must be one of {sorted(TEACHER_SHAPES)}, got {shape!r}")
        size, patch, dim, depth, heads = TEACHER_SHAPES[shape]
        t = RandomViTTeacher(size, patch, dim=dim, depth=depth, heads=heads)
        t.eval()
        return t
    from teacher_cache.config import TeacherConfig
    from teacher_cache.teachers import build_teacher

    return build_teacher(TeacherConfig(name))


def step_bench(a, device, teacher) -> dict:
    import torch

    from student.objectives import StudentConfig, TargetSpec, create_objective
    from student.train import online_targets, param_groups
    from teacher_cache.store import decode_block, encode_block

    student = StudentConfig(size=a.student, attn_impl=a.attn)
    target = TargetSpec.from_spec(teacher.spec.to_json())
    torch.manual_seed(0)
    objective = create_objective(a.objective, student, target).to(device)
    opt = torch.optim.AdamW(param_groups(objective, 0.05), lr=1e-4, betas=(0.9, 0.95))
    teacher = teacher.to(device)
    b, s, ts = a.batch_size, student.encoder_config().img_size, teacher.spec.input_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, s, s, generator=g)
    teacher_images = torch.rand(b, 3, ts, ts, generator=g)
    order_seed = torch.arange(b, dtype=torch.long)
    labels = torch.zeros(b, dtype=torch.long)
    ref = teacher(teacher_images.to(device))  # what the cache would hold for these views
    stored, scale = encode_block(ref.tokens, a.dtype)
    stored_cls, cls_scale = encode_block(ref.cls, a.dtype) if ref.cls is not None else (None, None)
    norm = None
    try:  # per-channel target standardisation, as train() applies by default (versions that have it)
        from student.targets import TargetNorm

        tok = ref.tokens.float().reshape(-1, ref.tokens.shape[-1]).cpu()
        cls_ms = (
            (ref.cls.float().cpu().mean(0), ref.cls.float().cpu().std(0).clamp_min(1e-6))
            if ref.cls is not None
            else (None, None)
        )
        norm = TargetNorm(tok.mean(0), tok.std(0).clamp_min(1e-6), *cls_ms).to(device)
    except ImportError:
        pass
    use_bf16 = a.amp == "bf16" or (a.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def step(batch):
        if norm is not None:
            batch = norm(batch)
        with autocast():
            loss, _ = objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def base_batch(with_teacher_images: bool):
        batch = {"images": images, "labels": labels, "order_seed": order_seed}
        if with_teacher_images:
            batch["teacher_images"] = teacher_images
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def cached():
        batch = base_batch(False)
        batch["tokens"] = decode_block(stored, a.dtype, scale).to(device)
        if stored_cls is not None:
            batch["cls"] = decode_block(stored_cls, a.dtype, cls_scale).to(device)
        return step(batch)

    def online():
        batch = base_batch(True)
        batch.update(online_targets(teacher, batch))
        return step(batch)

    def teacher_only():
        return online_targets(teacher, base_batch(True))

    peak = {}
    if device.type == "cuda":
        for name, fn in (("cached", cached), ("online", online)):
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() - base
    times = C.interleave(
        {"cached": cached, "online": online, "teacher forward": teacher_only},
        warmup=a.warmup,
        repeats=a.repeats,
        device=device,
    )
    n_params = sum(p.numel() for p in objective.parameters())
    return {
        "times": times,
        "peak": peak,
        "student_params": n_params,
        "target_norm": norm is not None,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "amp": "bf16" if use_bf16 else "off",
    }


def loop_bench(a, wd: str, threads: int) -> dict:
    """The real ``train()`` for ``--loop-steps`` steps, cached vs online teacher."""
    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig, train
    from teacher_cache.config import ExtractConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
    from teacher_cache.views import AugConfig

    student = StudentConfig(size=a.student, attn_impl=a.attn)
    size = student.encoder_config().img_size
    data, cache = os.path.join(wd, "loop-data"), os.path.join(wd, "loop-cache")
    n = a.batch_size * a.loop_steps
    prepare_synthetic(SyntheticConfig(out=data, num_samples=n, num_classes=4, image_size=size, shard_size=n, seed=0))
    t0 = time.perf_counter()
    run_extract(
        ExtractConfig(
            shards=data,
            out=cache,
            teachers=(TeacherConfig(a.teacher),),
            aug=AugConfig(views=1),
            batch_size=32,
            executor="local",
            threads=threads,
            device=a.device,
        ),
        progress=False,
    )
    extract_s = time.perf_counter() - t0
    C.setup_threads(threads)
    out: dict[str, list[float]] = {"cached": [], "online": []}
    for r in range(a.loop_repeats):
        for mode in ("cached", "online") if r % 2 == 0 else ("online", "cached"):
            cfg = TrainConfig(
                data=DataConfig(
                    shards=data, cache=cache, img_size=size, batch_size=a.batch_size, num_workers=0, seed=0
                ),
                out=os.path.join(wd, f"run-{mode}-{r}"),
                student=student,
                objective=a.objective,
                steps=a.loop_steps,
                optim=OptimConfig(warmup=0),
                log_every=a.loop_steps,
                device=a.device,
                amp=a.amp,
                online_teacher=mode == "online",
            )
            res = train(cfg, progress=False)
            C.setup_threads(threads)
            out[mode].append(res.seconds)
    return {"seconds": out, "extract_s": extract_s, "samples": n}


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=5, warmup=2)
    p.add_argument("--student", default="demo-cpu", help="student size preset (student/sizes.py)")
    p.add_argument("--teacher", default="efficientnet_lite0:256", help="registry teacher name")
    p.add_argument(
        "--teacher-shape",
        default=None,
        choices=sorted(TEACHER_SHAPES),
        help="instead of --teacher: a random-weight ViT of this shape (step level only)",
    )
    p.add_argument("--objective", default="digpt", help="training objective")
    p.add_argument("--attn", default="sdpa", help="student attention impl")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step")
    p.add_argument("--dtype", default="fp16", help="storage dtype of the cached targets")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16 or off — as `digpt train`")
    p.add_argument("--loop-steps", type=int, default=4, help="steps of the real train() loop per mode (0 skips)")
    p.add_argument("--loop-repeats", type=int, default=1, help="train() runs per mode (alternating)")
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    from teacher_cache.runtime import resolve_device

    device = resolve_device(a.device)
    teacher = make_teacher(a.teacher, a.teacher_shape)
    tname = a.teacher_shape or a.teacher
    rep = C.Report("train", "Student step: cached targets vs online teacher (bench/train.py)", argv)
    res = step_bench(a, device, teacher)
    t = res["times"]
    cached, online, tf = C.median(t["cached"]), C.median(t["online"]), C.median(t["teacher forward"])
    speedup = C.paired_ratio(t["online"], t["cached"])
    peak = res["peak"]
    mem = (lambda k: C.fmt_bytes(peak[k])) if peak else (lambda k: "n/a (CPU)")
    rows = [
        ["cached targets", C.fmt_ms(cached), f"{a.batch_size / cached:.1f}", mem("cached"), "1.00x"],
        ["online teacher", C.fmt_ms(online), f"{a.batch_size / online:.1f}", mem("online"), f"{speedup:.2f}x"],
        ["(teacher forward alone)", C.fmt_ms(tf), f"{a.batch_size / tf:.1f}", "-", "-"],
    ]
    rep.table(
        f"Step level: student {a.student} ({res['student_params'] / 1e6:.2f}M params, {a.objective}, attn {a.attn}), "
        f"teacher {tname} ({res['teacher_params'] / 1e6:.2f}M params, {teacher.spec.grid[0]}x{teacher.spec.grid[1]}"
        f"x{teacher.spec.dim}), batch {a.batch_size}, device {device}, amp {res['amp']}, {threads} thread(s); "
        f"medians of {a.repeats} interleaved rounds"
        + ("; targets standardised per channel as train() does" if res["target_norm"] else ""),
        ["mode", "ms / step", "samples/s", "peak GPU memory", "online / cached"],
        rows,
        align="lrrrr",
    )
    result = {
        "step": {
            "cached_s": t["cached"],
            "online_s": t["online"],
            "teacher_s": t["teacher forward"],
            "online_over_cached": speedup,
            "peak": peak,
        }
    }
    if a.loop_steps and not a.teacher_shape:
        with C.workdir(a.workdir) as wd:
            loop = loop_bench(a, wd, threads)
        s = loop["seconds"]
        lc, lo = C.median(s["cached"]), C.median(s["online"])
        ratio = C.paired_ratio(s["online"], s["cached"]) if s["cached"] else math.nan
        rep.table(
            f"Loop level: real train() for {a.loop_steps} steps x batch {a.batch_size} per mode "
            f"(loader in-process, first step included; cache of {loop['samples']} images built in "
            f"{loop['extract_s']:.0f}s, not timed; {a.loop_repeats} run(s) per mode)",
            ["mode", "s", "samples/s", "online / cached"],
            [
                ["cached targets", f"{lc:.2f}", f"{loop['samples'] / lc:.1f}", "1.00x"],
                ["online teacher", f"{lo:.2f}", f"{loop['samples'] / lo:.1f}", f"{ratio:.2f}x"],
            ],
            align="lrrr",
        )
        result["loop"] = {"cached_s": s["cached"], "online_s": s["online"], "online_over_cached": ratio}
    if device.type != "cuda":
        rep.note(
            f"GPU shapes (e.g. `--student vit_base --teacher-shape vit_large_14 --batch-size 64 --device cuda`): "
            f"{C.NO_GPU}."
        )
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
