"""Student step time with cached targets vs the same teacher run online (same student, batch, device).

**Step level** (any shape, random weights): one optimizer step as ``student/train.py`` takes it — targets
into the batch, per-channel target standardisation (when the trainer has it), forward under the run's
autocast, backward, gradient clipping, AdamW — with

* **cached**: the targets are the teacher's tokens as stored (``--dtype``), copied to the device in that dtype
  and widened to float32 there, as ``digpt train``'s loader and ``DecodeTargets`` stage do;
* **online**: ``student.train.online_targets`` runs the teacher on the batch's ``teacher_images`` first, under
  the run's autocast, exactly what ``digpt train --online-teacher`` does.

The two interleave; the speedup is the median over rounds of ``t_online / t_cached``. The teacher forward
and the bare student step are also timed alone.

**Loop level** (``--loop-steps N``, registry teachers only): the real ``train()`` for N steps, cached vs
``online_teacher=True``, on a small generated dataset and cache — loader included (online also replays
every view at the teacher's resolution).

    python bench/train.py                                     # demo-cpu student, EfficientNet-Lite0@256 teacher, CPU
    python bench/train.py --student tiny-test --teacher random-vit:32/8 --batch-size 8
    python bench/train.py --student vit_base --teacher-shape vit_large_14 --batch-size 64 --device cuda --loop-steps 0

**Paper shapes** (``--paper-shapes``, or ``--pairs STUDENT:TEACHER_SHAPE,...``): one table, a row per pair —
ViT-B/16 + CLIP ViT-L/14, ViT-B/16 + OpenCLIP ViT-H/14 (D-iGPT's own teacher), ViT-S/16 + CLIP ViT-B/16 —
with the measured online / cached ratio beside the ceiling the FLOPs give. Student and teacher both see
224 px, as in D-iGPT (the teacher is fed 224 px: /14 -> 16x16 = 256 tokens + cls; /16 -> 14x14 = 196).

    python bench/train.py --paper-shapes                      # batch 2, CPU, random weights (a few minutes)
    python bench/train.py --paper-shapes --batch-size 64 --device cuda

FLOPs are counted analytically from the shapes (a multiply-add is 2 FLOPs; masks are not subtracted,
the kernels compute the full score matrix):

* ViT block over N tokens of width D, MLP ratio r: ``(8 + 4r) N D^2`` (qkv, proj, MLP) ``+ 4 N^2 D``
  (scores and A.V); patch embedding ``2 P (3 p^2) D`` for P patches of side p.
* teacher forward: patch embedding + depth x block at N = (224/p)^2 + 1.
* D-iGPT student forward: encoder blocks at N = 3 x 49 + 1 = 148 (the three visible clusters + cls),
  and per decoder (two): memory projection ``2 N (4 D) (2 d)``, per decoder block over Q queries of
  width d reading N memory tokens ``28 Q d^2 + 4 N d^2 + 4 Q^2 d + 4 Q N d``, head ``2 Q d D_t``.
* student step = fwd + bwd = 3 x fwd (the backward does two matmuls per forward one).

Online step = student step + teacher forward; cached step = student step. So the ceiling of
``online / cached`` is ``1 + F_teacher / (3 F_student)``: what caching saves when time follows FLOPs.
The same counts, taken by ``torch.utils.flop_counter`` from the first (untimed) step, are printed
beside them as a check. The measured ratio falls short of the ceiling by what the FLOPs leave out:
the optimizer step (per step, not per sample: large at batch 2) and target decode; kernels running at
different FLOP rates move it either way. Beside the side-by-side ratio, each online step also times its
own teacher forward: ``online / (online - teacher)`` within one step is immune to a neighbour's load.
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

# Random-weight ViT teachers at the shapes of the paper's teachers: (input size, patch, width, depth, heads);
# the same shapes extraction builds as ``random-vit:<shape>``.
from teacher_cache.teachers.tiny import SHAPES as TEACHER_SHAPES  # noqa: E402

SHAPE_LABELS = {
    "vit_base_16": "CLIP ViT-B/16",
    "vit_large_14": "CLIP ViT-L/14",
    "vit_huge_14": "OpenCLIP ViT-H/14",
    "vit_small": "ViT-S/16",
    "vit_base": "ViT-B/16",
}
# The pairs of the paper's tables: ViT-B/16 students with CLIP-L/14 and D-iGPT's own ViT-H/14 teacher, and the
# small pair (ViT-S/16 + CLIP-B/16).
PAPER_PAIRS = (("vit_base", "vit_large_14"), ("vit_base", "vit_huge_14"), ("vit_small", "vit_base_16"))


# ---------------------------------------------------------------------------------------------
# FLOPs from the shapes (see the module docstring for the formulas)


def vit_block_flops(n: int, d: int, mlp_ratio: float = 4.0) -> float:
    """One pre-norm transformer block over ``n`` tokens of width ``d``: qkv + proj + MLP, scores + A.V."""
    return (8 + 4 * mlp_ratio) * n * d * d + 4 * n * n * d


def teacher_fwd_flops(shape: str) -> float:
    """Per image: patch embedding + every block of a timm ViT of ``TEACHER_SHAPES[shape]``."""
    size, patch, dim, depth, _ = TEACHER_SHAPES[shape]
    p = (size // patch) ** 2
    return 2 * p * 3 * patch * patch * dim + depth * vit_block_flops(p + 1, dim)


def digpt_fwd_flops(student, target, decoders: int = 2, memory_layers: int = 4) -> float:
    """Per image: the D-iGPT student's forward (encoder over the visible clusters + cls, ``decoders``
    decoders) for ``student: StudentConfig`` and ``target: TargetSpec``, with the trainer's defaults."""
    enc = student.encoder_config()
    g, d_enc = enc.grid_size, enc.embed_dim
    cs = student.cluster_size or max(1, g // 2)
    seen = (g // cs) ** 2 * cs * cs - cs * cs  # all clusters but the last
    n, q = seen + 1, seen + (1 if target.has_cls else 0)
    d, _ = student.decoder_width()
    depth = student.decoder_depth
    embed = 2 * g * g * enc.in_chans * enc.patch_size**2 * d_enc
    encoder = enc.depth * vit_block_flops(n, d_enc, enc.mlp_ratio)
    block = 28 * q * d * d + 4 * n * d * d + 4 * q * q * d + 4 * q * n * d
    decoder = 2 * n * memory_layers * d_enc * depth * d + depth * block + 2 * q * d * target.dim
    return embed + encoder + decoders * decoder


def _sdpa_flops(*shapes, out_shape=None, **_):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(*shapes[:3])


def _sdpa_bwd_flops(grad_out, q, k, v, *_, out_shape=None, **__):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU attention kernels (torch counts
    only the CUDA ones)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    for name, fn in (
        ("scaled_dot_product_attention", _sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd_flops),
    ):
        if hasattr(aten, name):
            # the overload keeps the counter from decomposing the op, the packet is what it counts by
            mapping[getattr(aten, name).default] = mapping[getattr(aten, name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


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


def step_bench(a, device, teacher, student_size: str | None = None, count_flops: bool = False) -> dict:
    """Cached vs online optimizer steps of ``student_size`` (default ``--student``) against ``teacher``,
    interleaved. ``count_flops``: first take one cached step and one teacher forward under torch's FLOP
    counter (untimed; it doubles as a warmup)."""
    import torch

    from student.data import stored_targets, widen_targets
    from student.objectives import StudentConfig, TargetSpec, create_objective
    from student.train import make_optimizer, online_targets
    from teacher_cache.store import encode_block

    student = StudentConfig(size=student_size or a.student, attn_impl=a.attn, decoder_dim=a.decoder_dim)
    target = TargetSpec.from_spec(teacher.spec.to_json())
    torch.manual_seed(0)
    objective = create_objective(a.objective, student, target).to(device)
    opt = make_optimizer(objective, 0.05, 1e-4, (0.9, 0.95))
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

    opt_s: list[float] = []  # clip + AdamW + zero_grad of each cached step: per step, whatever the batch
    teacher_in: list[float] = []  # the teacher forward inside each online step

    phase = torch.profiler.record_function  # labels the profile (--profile) splits the step by

    def step(batch, opt_rec=None):
        if norm is not None:
            with phase("phase: target standardisation"):
                batch = norm(batch)
        with phase("phase: forward"), autocast():
            loss, _ = objective(batch)
        with phase("phase: backward"):
            loss.backward()
        C.sync(device)
        t0 = time.perf_counter()
        with phase("phase: optimizer"):
            torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        C.sync(device)
        if opt_rec is not None:
            opt_rec.append(time.perf_counter() - t0)
        return loss.item()

    def base_batch(with_teacher_images: bool):
        batch = {"images": images, "labels": labels, "order_seed": order_seed}
        if with_teacher_images:
            batch["teacher_images"] = teacher_images
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    # The targets as `digpt train`'s loader hands them over: stacked in their stored dtype (pinned on CUDA, as
    # the DataLoader pins), copied, then widened to float32 on the device (student/stages.py: DecodeTargets).
    held = {"tokens": list(stored)}
    if scale is not None:
        held["token_scale"] = list(scale)
    if stored_cls is not None:
        held["cls"] = list(stored_cls)
        if cls_scale is not None:
            held["cls_scale"] = list(cls_scale)
    held_t = stored_targets(held, a.dtype, codes=False)
    if device.type == "cuda":
        held_t = {k: v.pin_memory() for k, v in held_t.items()}
        images, teacher_images = images.pin_memory(), teacher_images.pin_memory()

    def cached():
        with phase("phase: batch to device + target widening"):
            batch = base_batch(False)
            batch.update(widen_targets({k: v.to(device, non_blocking=True) for k, v in held_t.items()}, None))
        return step(batch, opt_s)

    def online():
        batch = base_batch(True)
        t0 = time.perf_counter()
        with autocast():  # as `digpt train --online-teacher` runs it: under the run's autocast
            batch.update(online_targets(teacher, batch))
        C.sync(device)
        teacher_in.append(time.perf_counter() - t0)
        return step(batch)

    def teacher_only():
        with autocast():
            return online_targets(teacher, base_batch(True))

    counted = {}
    if count_flops:
        with flop_counter() as fc:
            cached()
        counted["student_step"] = fc.get_total_flops() / b
        with flop_counter() as fc:
            teacher_only()
        counted["teacher_fwd"] = fc.get_total_flops() / b
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
    profile = profile_step(cached, a.profile, device) if getattr(a, "profile", 0) else None
    n_params = sum(p.numel() for p in objective.parameters())
    # Within-run view: each timed online step against itself minus its own teacher forward, so a neighbour's
    # load that slows the whole step cancels out (the side-by-side ratio pairs steps seconds apart).
    inner = [o / (o - t) for o, t in zip(times["online"], teacher_in[-a.repeats :]) if o > t]
    return {
        "times": times,
        "within_run": C.median(inner) if inner else math.nan,
        "optimizer_s": C.median(opt_s[-a.repeats :]) if opt_s else math.nan,
        "counted_flops": counted,
        "student": student,
        "target": target,
        "peak": peak,
        "student_params": n_params,
        "target_norm": norm is not None,
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "amp": "bf16" if use_bf16 else "off",
        "profile": profile,
    }


# Op classes of the profile (aten op names; each class's backward ops included). Layout ops are matched by
# their exact name: a substring test would put every op whose name holds a "t" among them.
LAYOUT_OPS = frozenset(
    [
        "copy_",
        "clone",
        "contiguous",
        "cat",
        "stack",
        "index",
        "index_select",
        "gather",
        "scatter",
        "scatter_add_",
        "transpose",
        "permute",
        "view",
        "reshape",
        "expand",
        "_to_copy",
        "to",
        "empty",
        "empty_like",
        "empty_strided",
        "zeros",
        "zeros_like",
        "zero_",
        "fill_",
        "select",
        "slice",
        "_unsafe_view",
        "as_strided",
        "t",
        "unbind",
        "split",
        "chunk",
        "narrow",
        "flip",
        "repeat",
        "index_put_",
        "masked_fill",
        "where",
        "detach",
        "alias",
        "new_empty",
        "new_zeros",
        "unsqueeze",
        "squeeze",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
    ]
)
MATMUL_OPS = frozenset(["addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv"])


def op_class(name: str) -> str:
    base = name.split("::")[-1]
    if any(k in base for k in ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")):
        return "attention"
    if base in MATMUL_OPS:
        return "matmul"
    if "conv" in base:
        return "convolution"
    if any(k in base for k in ("layer_norm", "batch_norm", "group_norm")):
        return "norm"
    if name.startswith("Optimizer.") or "_foreach" in base or "_fused_adam" in base:
        return "optimizer (per-parameter loop and arithmetic)"
    if base in LAYOUT_OPS:
        return "copies and layout"
    return "activations, elementwise, reductions"


def profile_step(fn, steps: int, device) -> dict:
    """``fn`` (one cached step) ``steps`` times under the torch profiler: wall time per phase of the step
    (the ``phase:`` labels) and self time per op class, per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        C.sync(device)
    wall = (time.perf_counter() - t0) / steps
    phases: dict[str, float] = {}
    classes: dict[str, float] = {}
    ops: list[tuple[str, float, int]] = []
    for ev in prof.key_averages():
        if ev.key.startswith("phase: "):
            phases[ev.key[7:]] = phases.get(ev.key[7:], 0.0) + ev.cpu_time_total / 1e6 / steps
            continue
        self_s = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / 1e6 / steps
        if self_s <= 0:
            continue
        cls = op_class(ev.key)
        classes[cls] = classes.get(cls, 0.0) + self_s
        ops.append((ev.key, self_s, ev.count // steps))
    ops.sort(key=lambda o: -o[1])
    del torch
    return {"wall_s": wall, "phases_s": phases, "classes_s": classes, "top_ops": ops[:20], "steps": steps}


def loop_bench(a, wd: str, threads: int) -> dict:
    """The real ``train()`` for ``--loop-steps`` steps, cached vs online teacher."""
    from student.data import DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig, train
    from teacher_cache.config import ExtractConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
    from teacher_cache.views import AugConfig

    student = StudentConfig(size=a.student, attn_impl=a.attn, decoder_dim=a.decoder_dim)
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


def efficiency_tables(a, rep, res, cached_s: float, device, threads: int) -> dict:
    """The cached step against the machine: its counted FLOPs, achieved FLOP/s and the matmul peak measured
    at the same threads and dtype; then where its time goes (phases, op classes, top ops)."""
    import torch

    dtype = torch.bfloat16 if res["amp"] == "bf16" else torch.float32
    peak = C.matmul_peak(device, dtype)
    flops = res["counted_flops"]["student_step"] * a.batch_size
    achieved = flops / cached_s
    prof = res["profile"]
    rep.table(
        f"Step efficiency: the cached step of {a.student} at batch {a.batch_size} against this machine "
        f"({device}, {threads} thread(s), {str(dtype).replace('torch.', '')})",
        ["step GFLOPs (counted)", "ms / step (median)", "achieved GFLOP/s", "matmul peak GFLOP/s", "fraction of peak"],
        [
            [
                f"{flops / 1e9:.2f}",
                C.fmt_ms(cached_s),
                f"{achieved / 1e9:.1f}",
                f"{peak['flops'] / 1e9:.1f} ({peak['n']}³ products)",
                f"**{achieved / peak['flops']:.2f}**",
            ]
        ],
    )
    wall = prof["wall_s"]
    phase_rows = [[k, C.fmt_ms(v), f"{100 * v / wall:.0f}%"] for k, v in prof["phases_s"].items()]
    rep.table(
        f"Where the step's time goes, by phase ({prof['steps']} profiled steps, {C.fmt_ms(wall)} ms per step under "
        "the profiler)",
        ["phase", "ms / step", "share"],
        phase_rows,
        align="lrr",
    )
    cls = sorted(prof["classes_s"].items(), key=lambda kv: -kv[1])
    total = sum(v for _, v in cls) or 1.0
    rep.table(
        "By op class (self time of the ops, forward + backward + optimizer)",
        ["op class", "ms / step", "share"],
        [[k, C.fmt_ms(v), f"{100 * v / total:.0f}%"] for k, v in cls],
        align="lrr",
    )
    rep.table(
        "Top ops (self time)",
        ["op", "ms / step", "calls / step"],
        [[name, C.fmt_ms(v), str(n)] for name, v, n in prof["top_ops"]],
        align="lrr",
    )
    return {
        "step_gflops": flops / 1e9,
        "achieved_gflops": achieved / 1e9,
        "peak_gflops": peak["flops"] / 1e9,
        "fraction": achieved / peak["flops"],
        "profile": prof,
    }


def _label(name: str) -> str:
    return SHAPE_LABELS.get(name, name)


def pairs_bench(a, device, threads: int, rep) -> dict:
    """One row per (student, teacher shape): FLOP ceiling beside the measured online / cached ratio."""
    import gc

    pairs = []
    for item in a.pairs.split(","):
        st, _, sh = item.strip().partition(":")
        if sh not in TEACHER_SHAPES:
            raise SystemExit(f"--pairs: teacher shape must be one of {sorted(TEACHER_SHAPES)}, got {sh!r} in {item!r}")
        pairs.append((st, sh))
    decoders = {"digpt": 2, "gen": 1}.get(a.objective)
    rows, meaning, out = [], [], {}
    for st, sh in pairs:
        teacher = make_teacher(None, sh)
        res = step_bench(a, device, teacher, student_size=st, count_flops=True)
        t, cnt = res["times"], res["counted_flops"]
        cached, online, tf = C.median(t["cached"]), C.median(t["online"]), C.median(t["teacher forward"])
        measured = C.paired_ratio(t["online"], t["cached"])
        f_t = teacher_fwd_flops(sh)
        f_s = digpt_fwd_flops(res["student"], res["target"], decoders) if decoders else math.nan
        ceiling = 1 + f_t / (3 * f_s)
        ceiling_counted = 1 + cnt["teacher_fwd"] / cnt["student_step"]
        enc = res["student"].encoder_config()
        size, patch, dim, _, _ = TEACHER_SHAPES[sh]
        tg = size // patch
        rows.append(
            [
                f"{_label(st)} ({res['student_params'] / 1e6:.0f}M; {enc.img_size} px, {enc.grid_size}x{enc.grid_size})",
                f"{_label(sh)} ({res['teacher_params'] / 1e6:.0f}M; {size} px, {tg}x{tg}x{dim})",
                f"{3 * f_s / 1e9:.1f} / {f_t / 1e9:.1f}",
                f"{cnt['student_step'] / 1e9:.1f} / {cnt['teacher_fwd'] / 1e9:.1f}",
                f"**{ceiling:.2f}x** ({ceiling_counted:.2f}x)",
                f"**{measured:.2f}x**",
                f"{res['within_run']:.2f}x",
                f"{cached:.2f}",
                f"{online:.2f}",
                f"{tf:.2f}",
                f"{res['optimizer_s']:.2f}",
            ]
        )
        meaning.append(
            f"- {_label(st)} + {_label(sh)}: caching the teacher makes each optimizer step **{measured:.2f}x** "
            f"cheaper here (batch {a.batch_size}, {device}); the FLOPs put the ceiling at {ceiling:.2f}x — the "
            f"teacher forward is {100 * (1 - 1 / ceiling):.0f}% of an online step's FLOPs and took "
            f"{100 * (1 - 1 / res['within_run']):.0f}% of its time (within the step)."
        )
        out[f"{st}:{sh}"] = {
            "measured": measured,
            "within_run": res["within_run"],
            "ceiling": ceiling,
            "ceiling_counted": ceiling_counted,
            "student_step_gflops": 3 * f_s / 1e9,
            "teacher_fwd_gflops": f_t / 1e9,
            "counted_gflops": {k: v / 1e9 for k, v in cnt.items()},
            "cached_s": t["cached"],
            "online_s": t["online"],
            "teacher_s": t["teacher forward"],
            "optimizer_s": res["optimizer_s"],
        }
        print(f"{st} + {sh}: online / cached {measured:.2f}x, ceiling {ceiling:.2f}x", flush=True)
        del teacher, res
        gc.collect()
    rep.table(
        f"Cached targets vs online teacher at the paper's shapes: {a.objective} objective, batch {a.batch_size}, "
        f"device {device}, {threads} thread(s), random weights; medians of {a.repeats} interleaved rounds "
        "(cached step, online step, teacher forward alone); the FLOP-counted step is the warmup",
        [
            "student",
            "teacher",
            "GFLOPs / image: student step (3 x fwd) / teacher fwd",
            "same, counted by torch",
            "ceiling online / cached (counted)",
            "measured online / cached",
            "within the online step",
            "cached s/step",
            "online s/step",
            "teacher fwd s",
            "optimizer s/step",
        ],
        rows,
        align="llrrrrrrrrr",
    )
    rep.note(
        "What it means:\n"
        + "\n".join(meaning)
        + "\n\nCeiling = 1 + F_teacher_fwd / (3 x F_student_fwd): the saving if time followed FLOPs and nothing "
        "else were in the step. The measured ratio falls short of it by what FLOPs leave out: the optimizer step "
        "(clip + AdamW over all student parameters, paid once per step, so large at a small batch; the column "
        "above), target decode and copies; it can pass it where the teacher's kernels run at a lower FLOP rate "
        "than the student's fwd + bwd, or by noise on a loaded machine. 'Within the "
        "online step' = online step time / (the same step minus its own teacher forward), median over rounds: "
        "both parts are timed in one step, so a neighbour's load cancels out of it (on a shared machine the "
        "side-by-side ratio pairs steps taken seconds apart)."
    )
    return out


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
    p.add_argument("--decoder-dim", type=int, default=None, help="student decoder width (default: the encoder's)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 16; 2 with --pairs)")
    p.add_argument(
        "--pairs",
        default=None,
        help="STUDENT:TEACHER_SHAPE,... : one table of FLOP ceiling vs measured ratio, a row per pair",
    )
    p.add_argument(
        "--paper-shapes",
        action="store_true",
        help="--pairs " + ",".join(f"{s}:{t}" for s, t in PAPER_PAIRS) + " (the paper's pairs; no loop level)",
    )
    p.add_argument("--dtype", default="fp16", help="storage dtype of the cached targets")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA), bf16 or off — as `digpt train`")
    p.add_argument("--loop-steps", type=int, default=4, help="steps of the real train() loop per mode (0 skips)")
    p.add_argument("--loop-repeats", type=int, default=1, help="train() runs per mode (alternating)")
    p.add_argument(
        "--profile",
        type=int,
        default=3,
        help="cached steps profiled for the step-efficiency tables (FLOP/s vs the measured matmul peak, time per "
        "phase and per op class); 0 skips them",
    )
    a = p.parse_args(argv)
    if a.paper_shapes:
        a.pairs = a.pairs or ",".join(f"{s}:{t}" for s, t in PAPER_PAIRS)
    if a.batch_size is None:
        a.batch_size = 2 if a.pairs else 16
    threads = C.setup_threads(a.threads)

    from teacher_cache.runtime import resolve_device

    device = resolve_device(a.device)
    if a.pairs:
        rep = C.Report("train", "Student step at the paper's shapes: cached vs online teacher (bench/train.py)", argv)
        result = {"pairs": pairs_bench(a, device, threads, rep)}
        if device.type != "cuda":
            rep.note(f"The same on a GPU (`--paper-shapes --batch-size 64 --device cuda`, bf16): {C.NO_GPU}.")
        rep.append(a.results)
        return result
    teacher = make_teacher(a.teacher, a.teacher_shape)
    tname = a.teacher_shape or a.teacher
    rep = C.Report("train", "Student step: cached targets vs online teacher (bench/train.py)", argv)
    res = step_bench(a, device, teacher, count_flops=bool(a.profile))
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
        f"Step level: student {a.student} ({res['student_params'] / 1e6:.2f}M params, {a.objective}, attn {a.attn}, "
        f"decoder width {a.decoder_dim or 'default'}), "
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
    if res["profile"]:
        result["efficiency"] = efficiency_tables(a, rep, res, cached, device, threads)
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
