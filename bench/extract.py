"""Extraction efficiency: images/s of the full extract pipeline ÷ images/s of the bare teacher forward.

For each teacher, on one generated dataset:

* **bare forward**: the teacher alone on views decoded and replayed beforehand, in exactly the batches the
  pipeline forms (per shard, per chunk of ``chunk_rows`` samples, ``--batch-size`` views per forward),
  including the copy of the outputs back to the host — the ceiling of the pipeline.
* **pipeline**: ``run_extract(executor="local")`` into a fresh cache: read tar + hash check, decode,
  replay crop, teacher forward, Zarr write, metadata. Its rate is the summary's execution-phase rate
  (teacher construction and fingerprinting happen before it and are reported apart).

The two run interleaved (round ``r`` alternates which goes first); efficiency is the median over rounds of
``t_bare / t_pipeline`` (target >= 0.90). Stage times come from timers wrapped around the functions
``teacher_cache.extract`` calls (``iter_dataset_samples``, ``decode_image``/``to_uint8_chw``,
``replay_view``, ``_run_teacher``, ``_write_rows``/``create_shard_group``/``stored_bytes``, ``plan_shard``);
the wrappers cost about a microsecond per call. Then the same extraction on Ray with 1 and 2 workers.

    python bench/extract.py                                   # tiny: 64 images, random-vit + EfficientNet
    python bench/extract.py --num-samples 1024 --image-size 256 --shard-size 256 --batch-size 64
    python bench/extract.py --teachers efficientnet_lite0 --device cuda --batch-size 128
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python bench/extract.py`: import the project, not bench/ siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import shutil
import time

from bench import _common as C

STAGES = ("read tar + hash check", "decode", "replay/crop", "teacher forward", "zarr write", "view plan")


def _instrument(timer: C.StageTimer) -> None:
    from teacher_cache import extract as E

    timer.patch(E, "iter_dataset_samples", "read tar + hash check", iterator=True)
    timer.patch(E, "decode_image", "decode")
    timer.patch(E, "to_uint8_chw", "decode")
    timer.patch(E, "replay_view", "replay/crop")
    timer.patch(E, "_run_teacher", "teacher forward")
    timer.patch(E, "_write_rows", "zarr write")
    timer.patch(E, "create_shard_group", "zarr write")
    timer.patch(E, "stored_bytes", "zarr write")
    timer.patch(E, "plan_shard", "view plan")


def _chunked_views(data: str, teacher, views: int, chunk_rows: int):
    """Per shard and chunk, the stacked views the pipeline would hand the teacher (decoded beforehand)."""
    import torch

    from teacher_cache.dataset import iter_dataset_samples, load_dataset
    from teacher_cache.images import decode_image, to_uint8_chw
    from teacher_cache.shards import pick_image
    from teacher_cache.views import AugConfig, plan_shard, replay_view

    ds, aug, size = load_dataset(data), AugConfig(views=views), teacher.spec.input_size
    chunks = []
    for shard in ds.shards:
        rows = ds.rows(shard)
        plan = plan_shard(shard, rows["key"], rows["width"], rows["height"], aug)
        per_row = {}
        for row, raw in iter_dataset_samples(ds, shard):
            i = row["index"]
            img = torch.from_numpy(to_uint8_chw(decode_image(pick_image(raw)[1])))
            per_row[i] = [replay_view(img, plan.boxes[i, v], plan.flips[i, v], size) for v in range(views)]
        n = len(rows["key"])
        c = max(1, min(chunk_rows, n))
        for lo in range(0, n, c):
            vs = [x for i in range(lo, min(lo + c, n)) for x in per_row.get(i, [])]
            if vs:
                chunks.append(torch.stack(vs))
    return chunks


def _bare_forward(teacher, chunks, batch_size: int, device) -> int:
    """What ``_run_teacher`` does for every chunk: forward per batch, outputs back to the host."""
    n = 0
    for views in chunks:
        for b in range(0, len(views), batch_size):
            out = teacher(views[b : b + batch_size].to(device))
            out.tokens.cpu()
            if out.cls is not None:
                out.cls.cpu()
            n += 1
    return n


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=5, warmup=1)
    p.add_argument(
        "--teachers",
        default="random-vit:32/8,efficientnet_lite0",
        help="comma-separated teacher names (registry names, no weights files)",
    )
    p.add_argument("--num-samples", type=int, default=32, help="generated images")
    p.add_argument("--image-size", type=int, default=64, help="generated image side (px)")
    p.add_argument("--shard-size", type=int, default=16, help="images per shard (>= 2 shards feed 2 Ray workers)")
    p.add_argument("--views", type=int, default=2, help="views per image")
    p.add_argument("--batch-size", type=int, default=32, help="views per teacher forward")
    p.add_argument("--dtype", default="fp16", help="token storage dtype (fp32, fp16, bf16, int8)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--ray-workers", default="1,2", help="Ray worker counts to compare ('' skips Ray)")
    p.add_argument("--ray-repeats", type=int, default=1, help="runs per Ray worker count (interleaved)")
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
    from teacher_cache.runtime import resolve_device
    from teacher_cache.teachers import build_teacher
    from teacher_cache.views import AugConfig

    device = resolve_device(a.device)
    names = [t.strip() for t in a.teachers.split(",") if t.strip()]
    workers = [int(w) for w in a.ray_workers.split(",") if w.strip()]
    rep = C.Report("extract", "Extraction efficiency (bench/extract.py)", argv)
    result: dict = {"teachers": {}, "ray": {}}
    with C.workdir(a.workdir) as wd:
        data = os.path.join(wd, "data")
        if os.path.exists(data):
            shutil.rmtree(data)
        prepare_synthetic(
            SyntheticConfig(
                out=data,
                num_samples=a.num_samples,
                num_classes=4,
                image_size=a.image_size,
                shard_size=a.shard_size,
                seed=0,
            )
        )
        storage = StorageConfig(dtype=a.dtype)
        aug = AugConfig(views=a.views)
        eff_rows, stage_rows = [], []
        for name in names:
            tc = TeacherConfig(name)
            t0 = time.perf_counter()
            teacher = build_teacher(tc).to(device)
            build_s = time.perf_counter() - t0
            chunks = _chunked_views(data, teacher, a.views, storage.chunk_rows)
            timer = C.StageTimer()
            runs = {"n": 0}

            def pipeline(tc=tc, timer=timer, runs=runs):
                out = os.path.join(wd, f"cache-{runs['n']}")
                runs["n"] += 1
                timer.reset()
                cfg = ExtractConfig(
                    shards=data,
                    out=out,
                    teachers=(tc,),
                    aug=aug,
                    storage=storage,
                    batch_size=a.batch_size,
                    executor="local",
                    device=a.device,
                    threads=threads,
                )
                summary = run_extract(cfg, progress=False)
                shutil.rmtree(out, ignore_errors=True)
                if not summary.ok:
                    raise RuntimeError(f"extraction failed: {summary.failed}")
                tok = summary.tokenizers[0]
                return {
                    "exec_s": tok.samples / tok.images_per_s,
                    "stages": timer.snapshot(),
                    "bytes_per_view": tok.bytes_per_view,
                }

            seen: list[dict] = []
            _instrument(timer)
            try:
                times = C.interleave(
                    {
                        "bare": lambda t=teacher, c=chunks: _bare_forward(t, c, a.batch_size, device),
                        "pipeline": pipeline,
                    },
                    warmup=a.warmup,
                    repeats=a.repeats,
                    device=device,
                    on_result=lambda n, v: seen.append(v) if n == "pipeline" else None,
                )
            finally:
                timer.restore()
            C.setup_threads(threads)  # the worker sets threads; keep the bare forward on the same count
            exec_s = [r["exec_s"] for r in seen]
            bare_s = times["bare"]
            eff = C.paired_ratio(bare_s, exec_s)
            n_img = a.num_samples
            share = C.median(r["stages"].get("teacher forward", 0.0) / r["exec_s"] for r in seen)
            eff_rows.append(
                [
                    name,
                    f"{n_img / C.median(bare_s):.1f}",
                    f"{n_img / C.median(exec_s):.1f}",
                    f"{n_img / C.median(times['pipeline']):.1f}",
                    f"{eff:.3f}",
                    f"{C.median(bare_s) / C.median(exec_s):.3f}",
                    f"{share:.3f}",
                    C.verdict(eff >= 0.90),
                    f"{build_s:.2f}",
                ]
            )
            med_stage = {s: C.median(r["stages"].get(s, 0.0) for r in seen) for s in STAGES}
            total = C.median(exec_s)
            other = max(0.0, total - sum(med_stage.values()))
            for s in (*STAGES, "other (metadata, seeds/keys arrays, bookkeeping)"):
                v = med_stage.get(s, other)
                stage_rows.append([name, s, C.fmt_ms(v), f"{100 * v / total:.1f}%", f"{1e3 * v / n_img:.2f}"])
            stage_rows.append(
                [name, "**pipeline (execution phase)**", C.fmt_ms(total), "100%", f"{1e3 * total / n_img:.2f}"]
            )
            stage_rows.append(
                [
                    name,
                    "bare forward (same batches)",
                    C.fmt_ms(C.median(bare_s)),
                    f"{100 * C.median(bare_s) / total:.1f}%",
                    f"{1e3 * C.median(bare_s) / n_img:.2f}",
                ]
            )
            result["teachers"][name] = {
                "efficiency": eff,
                "teacher_share": share,
                "bare_s": bare_s,
                "pipeline_exec_s": exec_s,
                "pipeline_wall_s": times["pipeline"],
                "stages": med_stage,
                "bytes_per_view": seen[-1]["bytes_per_view"] if seen else None,
            }
            del teacher, chunks

        rep.table(
            f"Efficiency: {a.num_samples} images x {a.views} views, {a.image_size}px JPEG, batch {a.batch_size}, "
            f"{a.dtype} storage, device {device}, {threads} thread(s); medians of {a.repeats} interleaved rounds",
            [
                "teacher",
                "bare forward img/s",
                "pipeline img/s (exec)",
                "pipeline img/s (wall)",
                "efficiency (paired median)",
                "ratio of medians",
                "teacher share within run",
                ">= 0.90?",
                "teacher build s",
            ],
            eff_rows,
        )
        rep.table(
            "Where the pipeline's time goes (local executor, median per stage over the timed rounds)",
            ["teacher", "stage", "ms", "share", "ms / image"],
            stage_rows,
            align="llrrr",
        )

        if workers:
            import ray

            from teacher_cache.ray_utils import ensure_ray

            started = not ray.is_initialized()
            t0 = time.perf_counter()
            ensure_ray(num_cpus=max(workers) * threads)
            ray_start = time.perf_counter() - t0
            ray_rows = []
            for name in names:
                tc = TeacherConfig(name)
                got: dict[int, list[dict]] = {w: [] for w in workers}
                runs = {"n": 0}

                def on_ray(w, tc=tc, runs=runs):
                    out = os.path.join(wd, f"ray-cache-{runs['n']}")
                    runs["n"] += 1
                    cfg = ExtractConfig(
                        shards=data,
                        out=out,
                        teachers=(tc,),
                        aug=aug,
                        storage=storage,
                        batch_size=a.batch_size,
                        executor="ray",
                        workers=w,
                        threads=threads,
                        device=a.device,
                    )
                    t0 = time.perf_counter()
                    summary = run_extract(cfg, progress=False)
                    wall = time.perf_counter() - t0
                    shutil.rmtree(out, ignore_errors=True)
                    if not summary.ok:
                        raise RuntimeError(f"Ray extraction failed: {summary.failed}")
                    tok = summary.tokenizers[0]
                    got[w].append({"exec_s": tok.samples / tok.images_per_s, "shard_s": tok.seconds, "wall_s": wall})

                C.interleave({str(w): (lambda w=w: on_ray(w)) for w in workers}, warmup=0, repeats=a.ray_repeats)
                base = None
                for w in workers:
                    ex = C.median(r["exec_s"] for r in got[w])
                    sh = C.median(r["shard_s"] for r in got[w])
                    rate = a.num_samples / ex
                    base = base or rate
                    ray_rows.append(
                        [
                            name,
                            str(w),
                            str(threads),
                            f"{rate:.1f}",
                            f"{rate / base:.2f}x",
                            f"{a.num_samples / (sh / w):.1f}",
                            f"{max(0.0, ex - sh / w):.2f}",
                        ]
                    )
                    result["ray"].setdefault(name, {})[w] = {
                        "images_per_s": rate,
                        "exec_s": [r["exec_s"] for r in got[w]],
                    }
            rep.table(
                f"Ray scaling ({a.num_samples} images in "
                f"{-(-a.num_samples // a.shard_size)} shards; Ray start {ray_start:.1f}s not included; "
                f"medians of {a.ray_repeats} run(s))",
                [
                    "teacher",
                    "workers",
                    "threads/worker",
                    "img/s (exec phase)",
                    "speedup",
                    "img/s inside shards",
                    "actor start + teacher build s",
                ],
                ray_rows,
            )
            if started:
                ray.shutdown()
        rep.note(
            "Efficiency = median over rounds of (bare forward time / pipeline execution time); 'ratio of "
            "medians' is the same from the medians; 'teacher share within run' is the pipeline's own teacher-forward "
            "time / its execution time — measured inside one run, so a noisy neighbour cancels out. "
            "Pipeline 'exec' excludes building the teacher and fingerprinting its weights (done once per "
            "run before any shard); 'wall' includes them. 'img/s inside shards' divides by the shard-task "
            "time per worker, i.e. without actor start-up and teacher construction in the workers."
        )
        if not C.has_cuda():
            rep.note(f"GPU: {C.NO_GPU}.")
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
