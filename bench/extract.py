"""Extraction: the overlapped pipeline's img/s beside the throughput of each of its stages measured alone.

For each teacher, on one generated dataset, timed interleaved (round ``r`` rotates which goes first):

* **read**: ``iter_dataset_samples`` over every shard — tar read + content-hash check (the reader thread);
* **decode/crop**: ``decode_row`` over the rows read beforehand, on a pool of ``--decode-threads`` threads —
  decode, size check, replay of the K views (the decode pool);
* **forward**: the teacher alone on views decoded beforehand, in exactly the batches the pipeline forms
  (per chunk of ``chunk_rows`` rows, ``--batch-size`` views at a time), outputs back on the host;
* **write**: the writer's work alone on outputs computed beforehand — create each shard group and its
  metadata (keys, seeds, boxes, flips), ``write_rows`` per chunk, ``valid``, bytes stored, the completion
  record;
* **pipeline**: ``run_extract(executor="local")`` into a fresh cache, all stages overlapped; its rate is the
  summary's execution-phase rate (teacher construction and fingerprinting happen before it).

Every stage runs with the same torch threads (``--threads``) and decode threads as the pipeline. A pipeline
with perfect overlap runs at its slowest stage's rate, so the targets are: pipeline ≥ 0.90 × the slowest
stage, and — when the teacher forward *is* the slowest stage (a slow teacher) — pipeline ≥ 0.95 × bare
forward. On a machine with fewer free cores than busy stages, the stages compete for CPU and the pipeline
tends to the serial sum of the stages; the table prints the overlap achieved (sum of stages ÷ pipeline).
Then the same extraction on Ray with 1 and 2 workers.

    python bench/extract.py --results -                       # random-vit:32/8 + EfficientNet-Lite0, 64 px
    python bench/extract.py --num-samples 256 --image-size 256 --shard-size 64 --batch-size 64
    python bench/extract.py --teachers efficientnet_lite0 --device cuda --batch-size 128 --autocast bf16
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python bench/extract.py`: import the project, not bench/ siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from bench import _common as C

STAGES = ("read", "decode/crop", "forward", "write")


class _Stages:
    """Inputs of every stage computed once, and a callable per stage that runs it alone."""

    def __init__(self, data: str, teacher, aug, storage, batch_size: int, decode_threads: int, device, autocast: str):
        import numpy as np
        import torch

        from teacher_cache.dataset import iter_dataset_samples, load_dataset
        from teacher_cache.extract.pipeline import Forward, decode_row
        from teacher_cache.views import plan_shard

        self.ds, self.teacher, self.aug, self.storage = load_dataset(data), teacher, aug, storage
        self.batch_size, self.decode_threads = batch_size, decode_threads
        self.forward_fn = Forward(teacher, device, autocast, storage.dtype)
        self._iter, self._decode_row = iter_dataset_samples, decode_row
        self.plans = {}
        for shard in self.ds.shards:
            rows = self.ds.rows(shard)
            self.plans[shard] = plan_shard(shard, rows["key"], rows["width"], rows["height"], aug)
        self.raw = {s: list(iter_dataset_samples(self.ds, s)) for s in self.ds.shards}
        self.decoded = {s: [self._decode(s, row, raw) for row, raw in self.raw[s]] for s in self.ds.shards}
        # The batches the pipeline forms: per chunk, the decoded rows' views, batch_size at a time.
        self.chunks = []  # (shard, lo, hi, idx, [batches])
        c = storage.chunk_rows
        for s in self.ds.shards:
            n = len(self.decoded[s])
            for lo in range(0, n, max(1, min(c, n))):
                hi = min(lo + c, n)
                ok = [i for i in range(lo, hi) if self.decoded[s][i][0] is not None]
                views = [v for i in ok for v in self.decoded[s][i][0].unbind(0)]
                batches = [torch.stack(views[b : b + batch_size]) for b in range(0, len(views), batch_size)]
                self.chunks.append((s, lo, hi, np.asarray(ok, dtype=np.int64) - lo, batches))
        self.outputs = self.forward()

    def _decode(self, shard, row, raw):
        plan, i = self.plans[shard], row["index"]
        return self._decode_row(row, raw, plan.boxes[i], plan.flips[i], self.teacher.spec.input_size)

    def read(self) -> int:
        return sum(1 for s in self.ds.shards for _ in self._iter(self.ds, s))

    def decode(self) -> int:
        with ThreadPoolExecutor(self.decode_threads) as pool:
            return sum(
                1 for s in self.ds.shards for _ in pool.map(lambda item, s=s: self._decode(s, *item), self.raw[s])
            )

    def decode_in(self, pool) -> int:
        """decode/crop alone on a :class:`DecodePool` (its processes, ``rows_per_task`` rows per task)."""
        from teacher_cache.extract.pipeline import decode_rows

        size, n, futures = self.teacher.spec.input_size, 0, []
        for s in self.ds.shards:
            plan, rows = self.plans[s], self.raw[s]
            for b in range(0, len(rows), pool.rows_per_task):
                tasks = [
                    (r, raw, plan.boxes[r["index"]], plan.flips[r["index"]])
                    for r, raw in rows[b : b + pool.rows_per_task]
                ]
                futures.append(pool.executor.submit(decode_rows, tasks, size))
        for f in futures:
            n += len(f.result())
        return n

    def forward(self) -> list:
        import torch

        out = []
        for _, _, _, _, batches in self.chunks:
            res = [self.forward_fn(b) for b in batches]
            toks = torch.cat([t for t, _ in res]) if res else None
            cls = torch.cat([c for _, c in res]) if res and res[0][1] is not None else None
            out.append((toks, cls))
        return out

    def write(self, cache: str) -> float:
        """Seconds of the writer's work on shard groups, not counting the cache root and tokenizer group
        (the pipeline makes those before its execution phase)."""
        import numpy as np
        import zarr

        from teacher_cache.store import (
            ShardLayout,
            create_shard_group,
            open_writer,
            shard_ids,
            stored_bytes,
            write_rows,
        )

        spec, sids = self.teacher.spec, shard_ids(self.ds.shards)
        with zarr.config.set({"array.write_empty_chunks": True}):
            tok = zarr.open_group(cache, mode="w").create_group("t")
            t0 = time.perf_counter()
            groups = {}
            for s in self.ds.shards:
                rows, plan = self.ds.rows(s), self.plans[s]
                lay = ShardLayout.for_teacher(len(rows["key"]), self.aug.views, spec, self.storage)
                g = create_shard_group(tok, sids[s], s, lay)
                g["keys"][:] = np.asarray(rows["key"], dtype=str)
                g["seeds"][:], g["boxes"][:], g["flips"][:] = plan.seeds, plan.boxes, plan.flips
                groups[s] = (g, lay, open_writer(g))
            for (s, lo, hi, idx, _), (toks, cls) in zip(self.chunks, self.outputs):
                _, lay, w = groups[s]
                write_rows(w, lo, hi, idx, toks if len(idx) else None, cls, lay)
            for s, (g, _, w) in groups.items():
                w.close()
                g["valid"][:] = np.array([d[0] is not None for d in self.decoded[s]])
                g.attrs["complete"] = {"bytes": stored_bytes(g)}
            return time.perf_counter() - t0


def _resident_forward(teacher, a, device, batches: int = 10) -> float:
    """Views/s of the teacher on a GPU-resident batch of ``--batch-size``, under ``--autocast``."""
    import contextlib

    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.autocast)
    ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext
    s = teacher.spec.input_size
    x = torch.rand(a.batch_size, 3, s, s, device=device)

    def run():
        with torch.no_grad(), ctx():
            for _ in range(batches):
                teacher(x)

    t = C.median(C.repeat(run, warmup=1, repeats=3, device=device))
    return batches * a.batch_size / t


def _row(name, stage, seconds, n_img, slowest):
    return [name, stage, C.fmt_ms(seconds), f"{n_img / seconds:.1f}", "**slowest**" if stage == slowest else ""]


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
    p.add_argument("--decode-threads", type=int, default=2, help="decode/crop threads (ExtractConfig.decode_threads)")
    p.add_argument(
        "--decode-processes",
        type=int,
        default=0,
        help="also time the pipeline decoding in N spawned processes (ExtractConfig.decode_processes) beside "
        "the threaded one, and decode/crop alone on N processes; 0: threads only",
    )
    p.add_argument(
        "--shards-in-flight",
        type=int,
        default=1,
        help="shards a worker extracts at once (ExtractConfig.shards_in_flight)",
    )
    p.add_argument("--dtype", default="fp16", help="token storage dtype (fp32, fp16, bf16, int8)")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=64,
        help="rows per write block (StorageConfig.chunk_rows): the teacher's batches never span two blocks, "
        "so a batch holds at most chunk_rows x views views",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--autocast", default="none", help="none, bf16 or fp16 (CUDA only)")
    p.add_argument("--ray-workers", default="1,2", help="Ray worker counts to compare ('' or 0 skips Ray)")
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
    workers = [int(w) for w in a.ray_workers.split(",") if w.strip() and int(w) > 0]  # "" or "0": skip Ray
    rep = C.Report("extract", "Extraction: overlapped pipeline vs its stages alone (bench/extract.py)", argv)
    result: dict = {"teachers": {}, "ray": {}, "load_average": {"start": os.getloadavg()}}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
        storage = StorageConfig(dtype=a.dtype, chunk_rows=a.chunk_rows)
        aug = AugConfig(views=a.views)
        summary_rows, stage_rows, proc_rows = [], [], []
        for name in names:
            tc = TeacherConfig(name)
            teacher = build_teacher(tc).to(device)
            st = _Stages(data, teacher, aug, storage, a.batch_size, a.decode_threads, device, a.autocast)
            runs = {"n": 0}

            def pipeline(tc=tc, runs=runs, processes=0):
                out = os.path.join(wd, f"cache-{runs['n']}")
                runs["n"] += 1
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
                    decode_threads=a.decode_threads,
                    decode_processes=processes,
                    shards_in_flight=a.shards_in_flight,
                    autocast=a.autocast,
                )
                summary = run_extract(cfg, progress=False)
                shutil.rmtree(out, ignore_errors=True)
                if not summary.ok:
                    raise RuntimeError(f"extraction failed: {summary.failed}")
                tok = summary.tokenizers[0]
                # In-shard seconds (the shards' own clocks, summed: one shard at a time) leave out the
                # once-per-worker start, which for decode processes is their spawn (~1-2 s of imports).
                return {"exec_s": tok.samples / tok.images_per_s, "shard_s": tok.seconds, "processes": processes}

            def write(st=st, runs=runs):
                out = os.path.join(wd, f"write-{runs['n']}")
                runs["n"] += 1
                seconds = st.write(out)
                shutil.rmtree(out, ignore_errors=True)
                return {"write_s": seconds}

            seen: list[dict] = []
            written: list[float] = []
            cpu: dict[str, list[float]] = {s: [] for s in STAGES}

            def cpu_timed(stage, fn, cpu=cpu):
                """``fn`` with the process's CPU seconds (every thread's) recorded: what the stage costs the cores."""

                def run():
                    c0 = time.process_time()
                    value = fn()
                    cpu[stage].append(time.process_time() - c0)
                    return value

                return run

            variants = {
                "read": cpu_timed("read", st.read),
                "decode/crop": cpu_timed("decode/crop", st.decode),
                "forward": cpu_timed("forward", st.forward),
                "write": cpu_timed("write", write),
                "pipeline": pipeline,
            }
            seen_p: list[dict] = []
            if a.decode_processes:
                from teacher_cache.extract.pipeline import DecodePool

                t0 = time.perf_counter()
                pool = DecodePool(a.decode_processes)
                pool_start_s = time.perf_counter() - t0
                variants["decode/crop (processes)"] = lambda st=st, pool=pool: st.decode_in(pool)
                variants["pipeline (processes)"] = lambda pipeline=pipeline: pipeline(processes=a.decode_processes)
            times = C.interleave(
                variants,
                warmup=a.warmup,
                repeats=a.repeats,
                device=device,
                on_result=lambda n, v: (
                    seen.append(v)
                    if n == "pipeline"
                    else seen_p.append(v)
                    if n == "pipeline (processes)"
                    else written.append(v["write_s"])
                    if n == "write"
                    else None
                ),
            )
            if a.decode_processes:
                pool.close()
            C.setup_threads(threads)  # the worker sets threads; keep every stage on the same count
            # Both without their cache root and tokenizer group (made before the execution phase), and
            # without deleting the cache afterwards.
            times["pipeline"] = [r["exec_s"] for r in seen]
            times["write"] = written
            if a.decode_processes:
                shard_t = [r["shard_s"] for r in seen]
                shard_p = [r["shard_s"] for r in seen_p]
                procs_over_threads = C.paired_ratio(shard_t, shard_p)  # > 1: processes are faster
                dec_p = C.median(times["decode/crop (processes)"])
                stages_p = {**{s: C.median(times[s]) for s in STAGES}, "decode/crop": dec_p}
                slowest_p = max(stages_p, key=lambda s: stages_p[s])
                n = a.num_samples
                proc_rows.append(
                    [
                        name,
                        f"{n / C.median(shard_t):.1f}",
                        f"{n / C.median(shard_p):.1f}",
                        f"{procs_over_threads:.2f}",
                        f"{n / C.median(times['decode/crop']):.1f}",
                        f"{n / dec_p:.1f}",
                        f"{slowest_p} {n / stages_p[slowest_p]:.1f}",
                        f"{stages_p[slowest_p] / C.median(shard_p):.2f}",
                        f"{pool_start_s:.2f}",
                    ]
                )
                result["teachers_processes"] = result.get("teachers_processes", {})
                result["teachers_processes"][name] = {
                    "shard_s_threads": shard_t,
                    "shard_s_processes": shard_p,
                    "processes_over_threads": procs_over_threads,
                    "decode_s_processes": times["decode/crop (processes)"],
                    "pool_start_s": pool_start_s,
                }
            med = {s: C.median(times[s]) for s in (*STAGES, "pipeline")}
            cpu = {s: xs[a.warmup :] for s, xs in cpu.items()}  # the timed rounds only
            slowest = max(STAGES, key=lambda s: med[s])
            # The CPU-bound ceiling: no schedule beats its slowest stage, nor runs the stages' CPU work faster
            # than the cores can do it. On few cores the second bound is the binding one.
            ceiling = [
                max(times[slowest][r], sum(cpu[s][r] for s in STAGES) / cores) for r in range(len(times["pipeline"]))
            ]
            vs_ceiling = C.paired_ratio(ceiling, times["pipeline"])
            vs_slowest = C.paired_ratio(times[slowest], times["pipeline"])
            vs_forward = C.paired_ratio(times["forward"], times["pipeline"])
            serial = [sum(times[s][r] for s in STAGES) for r in range(len(times["pipeline"]))]
            overlap = C.paired_ratio(serial, times["pipeline"])  # > 1: the stages overlapped
            slow_teacher = slowest == "forward"
            met = vs_forward >= 0.95 if slow_teacher else vs_slowest >= 0.90
            n = a.num_samples
            summary_rows.append(
                [
                    name,
                    f"{n / med['pipeline']:.1f}",
                    f"{slowest} {n / med[slowest]:.1f}",
                    f"{vs_slowest:.2f}",
                    f"{n / med['forward']:.1f}",
                    f"{vs_forward:.2f}",
                    f"{overlap:.2f}",
                    f"{n / C.median(ceiling):.1f}",
                    f"{vs_ceiling:.2f}",
                    (">= 0.95 x forward: " if slow_teacher else ">= 0.90 x slowest: ") + C.verdict(met),
                ]
            )
            for s in STAGES:
                stage_rows.append([*_row(name, s, med[s], n, slowest), C.fmt_ms(C.median(cpu[s]))])
            stage_rows.append([*_row(name, "**pipeline (all overlapped)**", med["pipeline"], n, slowest), ""])
            cpu_sum = C.fmt_ms(C.median([sum(cpu[s][r] for s in STAGES) for r in range(len(ceiling))]))
            stage_rows.append([name, "sum of stages (serial)", C.fmt_ms(sum(med[s] for s in STAGES)), "", "", cpu_sum])
            result["teachers"][name] = {
                "stages_s": {s: times[s] for s in STAGES},
                "pipeline_exec_s": times["pipeline"],
                "slowest": slowest,
                "pipeline_over_slowest": vs_slowest,
                "pipeline_over_forward": vs_forward,
                "overlap": overlap,
                "stages_cpu_s": cpu,
                "cpu_ceiling_s": ceiling,
                "pipeline_over_cpu_ceiling": vs_ceiling,
                "met": met,
            }
            if device.type == "cuda":
                resident = _resident_forward(teacher, a, device)
                result["teachers"][name]["resident_forward_views_per_s"] = resident
                rep.note(
                    f"{name}: the teacher alone on input already on the GPU, batch {a.batch_size} under "
                    f"autocast {a.autocast}, outputs left there: **{resident:.0f} views/s** (what the GPU does "
                    "with no host in the loop; 'bare forward' above includes the copies both ways)."
                )
            del teacher, st

        result["load_average"]["end"] = os.getloadavg()
        la = result["load_average"]
        rep.table(
            f"Pipeline vs stages alone: {a.num_samples} images x {a.views} views, {a.image_size}px JPEG, batch "
            f"{a.batch_size}, {a.dtype} storage, device {device}, {threads} torch thread(s), {a.decode_threads} "
            f"decode thread(s), {a.shards_in_flight} shard(s) in flight, {cores} core(s); medians of {a.repeats} interleaved rounds; load average "
            f"{la['start'][0]:.1f} at start, {la['end'][0]:.1f} at end",
            [
                "teacher",
                "pipeline img/s",
                "slowest stage img/s",
                "pipeline ÷ slowest (paired)",
                "bare forward img/s",
                "pipeline ÷ forward (paired)",
                "overlap: sum of stages ÷ pipeline (paired)",
                f"CPU-bound ceiling img/s ({cores} cores)",
                "pipeline ÷ ceiling (paired)",
                "target",
            ],
            summary_rows,
        )
        rep.table(
            "Each stage alone (same threads), and the pipeline",
            ["teacher", "stage", "ms", "img/s", "", "CPU ms (all threads)"],
            stage_rows,
            align="llrrlr",
        )

        if proc_rows:
            rep.table(
                f"Decode/crop in {a.decode_processes} spawned process(es) vs {a.decode_threads} thread(s) "
                "(ExtractConfig.decode_processes; in-shard seconds, which leave out the once-per-worker start)",
                [
                    "teacher",
                    "pipeline img/s, threads",
                    "pipeline img/s, processes",
                    "processes ÷ threads (paired)",
                    "decode/crop alone img/s, threads",
                    "decode/crop alone img/s, processes",
                    "slowest stage with process decode, img/s",
                    "pipeline (processes) ÷ that stage",
                    "pool start s (once per worker)",
                ],
                proc_rows,
            )
        if workers:
            _ray(a, rep, result, names, workers, threads, data, wd, aug, storage)
        rep.note(
            "'pipeline ÷ slowest' and 'pipeline ÷ forward' are medians over rounds of (stage time / pipeline "
            "time), measured in the same round. A stage 'alone' runs on inputs prepared beforehand with the same "
            "torch and decode threads. 'overlap' is the serial sum of the four stages ÷ the pipeline, per round: "
            "1.0 means no overlap at all; perfect overlap reaches sum ÷ slowest stage. The "
            "stages overlap only where cores are free: on a machine whose cores are busy with other work the "
            "threads time-share one core's worth of CPU and the pipeline tends to the serial sum. The "
            "'CPU-bound ceiling' is the best any schedule of these stages can do on this machine's cores: the "
            "slower of the slowest stage alone and (CPU seconds of all four stages) ÷ cores. 'pipeline ÷ "
            "ceiling' near 1 means the stages overlap as well as the cores allow; the gap to the 0.90 target "
            "is then the core count, not the pipeline."
        )
        if not C.has_cuda():
            rep.note(f"GPU: {C.NO_GPU}.")
    rep.append(a.results)
    return result


def _ray(a, rep, result, names, workers, threads, data, wd, aug, storage) -> None:
    import ray

    from teacher_cache.config import ExtractConfig, TeacherConfig
    from teacher_cache.extract import run_extract
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

        def on_ray(w, tc=tc, runs=runs, got=got):
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
                decode_threads=a.decode_threads,
                shards_in_flight=a.shards_in_flight,
                autocast=a.autocast,
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
            result["ray"].setdefault(name, {})[w] = {"images_per_s": rate, "exec_s": [r["exec_s"] for r in got[w]]}
    rep.table(
        f"Ray scaling ({a.num_samples} images in {-(-a.num_samples // a.shard_size)} shards; Ray start "
        f"{ray_start:.1f}s not included; medians of {a.ray_repeats} run(s))",
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


if __name__ == "__main__":
    main()
