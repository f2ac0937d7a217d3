"""End to end: the demo's wall time per stage (prepare, extract, train, probe, verify, report).

Runs ``pipelines.demo.run_demo`` — prepare synthetic shards -> extract the pixel and EfficientNet-Lite0@256
tokenizers once -> train a D-iGPT student on each -> linear + k-NN probes, a random-init floor and a probe
of the cached targets themselves -> verify the cache -> report and plots — at a reduced size by default.
Stage times come from timers wrapped (by this script, at run time) around the functions the demo calls:
``prepare_synthetic``, ``run_extract`` (with ``ensure_ray`` inside it shown apart), ``train``, ``run_probe``,
``teacher_ceiling``, ``run_verify`` and the report writer. No project file is changed.

    python bench/e2e.py                                        # 128 images, 20 steps per student
    python bench/e2e.py --num-samples 512 --steps 200          # the full `digpt demo`
    python bench/e2e.py --executor local                       # extraction without Ray
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import time

from bench import _common as C

STAGES = (
    "prepare",
    "extract",
    "  of which Ray start",
    "train",
    "probe",
    "probe of the cached targets (ceiling)",
    "verify",
    "report + plots",
)
# (module, function, stage); functions a given version of the pipeline lacks are skipped
PATCHES = (
    ("A", "prepare_synthetic", "prepare"),
    ("A", "run_extract", "extract"),
    ("R", "ensure_ray", "  of which Ray start"),
    ("A", "train", "train"),
    ("A", "run_probe", "probe"),  # before the probes shared their features
    ("A", "run_probes", "probe"),
    ("A", "teacher_ceiling", "probe of the cached targets (ceiling)"),
    ("D", "run_verify", "verify"),
    ("A", "_write_report", "report + plots"),
)


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=1, warmup=0, threads=0)
    p.add_argument("--num-samples", type=int, default=128, help="synthetic images (demo: 512)")
    p.add_argument("--num-classes", type=int, default=8, help="synthetic classes")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per student (demo: 200)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step")
    p.add_argument("--probe-samples", type=int, default=8192, help="held-out probe images (demo: 8192; 0: a holdout)")
    p.add_argument("--executor", default="ray", help="extraction executor: ray (the demo's) or local")
    a = p.parse_args(argv)
    threads = C.setup_threads(a.threads)

    import ray

    import pipelines.ablate as A
    import pipelines.demo as D
    from teacher_cache import ray_utils

    rep = C.Report("e2e", "End to end: demo wall time per stage (bench/e2e.py)", argv)
    runs: list[dict[str, float]] = []
    ok = True
    ray_was_up = ray.is_initialized()
    with C.workdir(a.workdir) as wd:
        for r in range(a.warmup + a.repeats):
            timer = C.StageTimer()
            mods = {"A": A, "D": D, "R": ray_utils}
            for m, fn, stage in PATCHES:
                if hasattr(mods[m], fn):
                    timer.patch(mods[m], fn, stage)
            out = os.path.join(wd, f"demo-{r}")
            try:
                t0 = time.perf_counter()
                res = D.run_demo(
                    D.DemoConfig(
                        out=out,
                        num_samples=a.num_samples,
                        num_classes=a.num_classes,
                        steps=a.steps,
                        batch_size=a.batch_size,
                        probe_samples=a.probe_samples,
                        executor=a.executor,
                    )
                )
                total = time.perf_counter() - t0
            finally:
                timer.restore()
                if not ray_was_up and ray.is_initialized():
                    ray.shutdown()  # the next repeat pays Ray's start again, as a fresh `digpt demo` would
            ok = ok and res.ok
            if r >= a.warmup:
                runs.append({**timer.snapshot(), "total": total, "calls": dict(timer.calls)})
    rows = []
    total = C.median(x["total"] for x in runs)
    for s in STAGES:
        v = C.median(x.get(s, 0.0) for x in runs)
        rows.append([s, f"{v:.1f}", f"{100 * v / total:.1f}%", str(runs[-1]["calls"].get(s, 0))])
    accounted = sum(C.median(x.get(s, 0.0) for x in runs) for s in STAGES if not s.startswith(" "))
    rows.append(
        [
            "other (demo glue)",
            f"{max(0.0, total - accounted):.1f}",
            f"{100 * max(0.0, total - accounted) / total:.1f}%",
            "-",
        ]
    )
    rows.append(["**total**", f"{total:.1f}", "100%", "-"])
    rep.table(
        f"`digpt demo` at {a.num_samples} images, {a.steps} steps x batch {a.batch_size} per student, executor "
        f"{a.executor}, {threads} torch thread(s) in the driver; median of {a.repeats} run(s); verify "
        f"{'passed' if ok else 'FAILED'}",
        ["stage", "seconds", "share", "calls"],
        rows,
        align="lrrr",
    )
    rep.note(
        "Train covers two students (pixel and EfficientNet targets); probe covers linear + k-NN for each "
        "student and for the random-init floor (three calls, linear and k-NN sharing one feature pass each; "
        "prepare includes the held-out probe set). Extract includes Ray's start when the "
        "executor is ray."
    )
    rep.append(a.results)
    return {"stages": {s: C.median(x.get(s, 0.0) for x in runs) for s in STAGES}, "total": total, "verified": ok}


if __name__ == "__main__":
    main()
