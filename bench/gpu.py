"""GPU acceptance: what only a GPU shows, in one run that writes one folder.

Sections, in this order, each in a subprocess of its own with a time limit (a hang or a crash costs that
section alone; the results so far are written after every section, so a killed run still reports):

1. **machine** — GPU, driver, torch and CUDA versions; the measured matmul peak in bf16 and fp32 (no TF32)
   that every fraction below divides by (``bench/_common.matmul_peak``).
2. **extract** — ``bench/extract.py`` with ``random-vit:vit_large_14`` (CLIP ViT-L/14's cost) under bf16
   autocast, decoding in spawned processes: img/s, pipeline ÷ bare forward, and the fraction of the bf16
   peak the teacher's FLOPs reach. Target: ≥ 0.5 of peak.
3. **step** — ``bench/train.py --paper-shapes`` in bf16 at batch 64: online ÷ cached beside the FLOP
   ceiling, and the cached step's achieved FLOP/s ÷ peak.
4. **attention** — ``bench/attention.py`` at D-iGPT's block-causal masks, bf16, batch 64: FlexAttention
   and SDPA vs the eager reference, forward + backward time and peak memory. Target: ≤ 0.5 × eager in both.
5. **pipeline** — the CLI as a user runs it: ``prepare synthetic`` → ``extract`` (bf16 autocast, decode
   processes) → ``verify`` (the teacher re-run in fp32 against the bf16-autocast cache) → ``train`` (bf16
   AMP, FlexAttention, pinned memory, targets widened on the device) → ``train --resume`` from the
   mid-run checkpoint, its steps compared with the uninterrupted run's → ``probe`` (linear).
6. **tests** — the CUDA-marked tests (``pytest -m gpu``).

Files in ``--out``: ``gpu.json`` (every number), ``gpu.md`` (the summary table, then each bench's own
tables), ``benchmarks.md`` (the benches' sections, in BENCHMARKS.md's format), ``log.txt`` (all output).

On the CPU (``--device cpu``) every section runs at tiny shapes — FlexAttention training and autocast are
CUDA-only, so the pipeline trains with SDPA in fp32 there — which is how the test suite reaches every line
(``tests/test_bench_smoke.py``).

    python bench/gpu.py --out gpu_out                         # a GPU machine: about 6 minutes on an H200
    python bench/gpu.py --device cpu --out /tmp/gpu_cpu       # the CPU smoke run (about a minute)
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import csv
import datetime as _dt
import json
import math
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from bench import _common as C

SECTIONS = ("machine", "extract", "step", "attention", "pipeline", "tests")
LIMITS_S = {"machine": 60, "extract": 180, "step": 120, "attention": 120, "pipeline": 240, "tests": 150}
"""Each section's time limit on a GPU (seconds); the run's ``--budget`` caps what is left for the rest."""
TARGET_PEAK_FRACTION = 0.5
TARGET_VS_EAGER = 0.5


def profile(cuda: bool) -> dict[str, Any]:
    """What each section runs: the GPU sizes, or the tiny CPU ones."""
    if cuda:
        return {
            "attention": ["--batch", "64", "--heads", "12", "--head-dim", "64", "--dtype", "bf16"]
            + ["--device", "cuda", "--repeats", "10", "--warmup", "2"],
            "extract_shape": "vit_large_14",
            "extract": ["--teachers", "random-vit:vit_large_14", "--device", "cuda", "--autocast", "bf16"]
            + ["--decode-processes", "12", "--num-samples", "1536", "--image-size", "256", "--shard-size", "512"]
            + ["--views", "1", "--batch-size", "256", "--chunk-rows", "256", "--ray-workers", ""]
            + ["--repeats", "1", "--warmup", "1", "--threads", "4"],
            "step": ["--paper-shapes", "--batch-size", "64", "--device", "cuda", "--repeats", "3", "--warmup", "1"],
            "pipeline": {
                "samples": 2048,
                "image_size": 64,
                "shard_size": 512,
                "teacher": "efficientnet_lite0:128",
                "extract": ["--device", "cuda", "--autocast", "bf16", "--decode-processes", "4", "--batch-size", "256"],
                "student": "demo-cpu",
                "steps": 120,
                "train": ["--device", "cuda", "--amp", "bf16", "--attn", "flex", "--batch-size", "64"]
                + ["--base-lr", "8e-3", "--decoder-dim", "48", "--workers", "4", "--log-every", "10"],
                "device": "cuda",
            },
        }
    return {
        "attention": ["--batch", "1", "--heads", "2", "--head-dim", "8", "--shape", "clusters"]
        + ["--device", "cpu", "--repeats", "1", "--warmup", "0"],
        "extract_shape": "tiny_32_8",
        "extract": ["--teachers", "random-vit:32/8", "--device", "cpu", "--decode-processes", "1"]
        + ["--num-samples", "16", "--image-size", "32", "--shard-size", "8", "--views", "1", "--batch-size", "8"]
        + ["--ray-workers", "", "--repeats", "1", "--warmup", "0"],
        "step": ["--pairs", "tiny-test:tiny_32_8", "--batch-size", "2", "--device", "cpu"]
        + ["--repeats", "1", "--warmup", "0"],
        "pipeline": {
            "samples": 48,
            "image_size": 32,
            "shard_size": 16,
            "teacher": "random-vit:32/8",
            "extract": ["--device", "cpu", "--decode-processes", "1", "--batch-size", "16"],
            "student": "tiny-test",
            "steps": 4,
            "train": ["--device", "cpu", "--amp", "off", "--attn", "sdpa", "--batch-size", "8"]
            + ["--workers", "0", "--log-every", "1", "--blind-batches", "2"],
            "device": "cpu",
        },
    }


# ---------------------------------------------------------------------------------------------
# sections (each runs in a child process: `bench/gpu.py --child NAME`)


def sec_machine(a, prof, wd) -> dict:
    import torch

    from teacher_cache.runtime import resolve_device

    device = resolve_device(a.device)
    info = C.machine_info()
    out: dict[str, Any] = {"machine": info, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": p.total_memory / 2**30,
            "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["gpu"]["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["gpu"]["nvidia_smi"] = f"unavailable: {e}"
    peaks = {}
    # bf16 matmuls on a CPU without bf16 units are slower than fp32 and nothing here runs them: fp32 only
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))[0 if device.type == "cuda" else 1 :]:
        peaks[name] = C.matmul_peak(device, dtype)
        print(f"matmul peak {name}: {peaks[name]['flops'] / 1e12:.2f} TFLOP/s (n={peaks[name]['n']})", flush=True)
    out["peak"] = peaks
    return out


def _bench(name: str, argv: list[str], a) -> dict:
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    return mod.main([*argv, "--results", os.path.join(a.out, "benchmarks.md")])


def sec_extract(a, prof, wd) -> dict:
    return {"bench": _bench("extract", [*prof["extract"], "--workdir", os.path.join(wd, "extract")], a)}


def sec_step(a, prof, wd) -> dict:
    return {"bench": _bench("train", prof["step"], a)}


def sec_attention(a, prof, wd) -> dict:
    return {"bench": _bench("attention", prof["attention"], a)}


def _cli(args: list[str], log: list[dict], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` as a user runs it; output goes to this process's stdout (the log)."""
    cmd = [sys.executable, os.path.join(C.REPO, "cli.py"), *args]
    print("$ digpt " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    print(r.stdout, flush=True)
    log.append({"command": "digpt " + " ".join(args), "rc": r.returncode, "seconds": seconds})
    if r.returncode != 0:
        raise RuntimeError(f"digpt {args[0]} exited {r.returncode}: {r.stdout.strip().splitlines()[-1:]}")
    return r


def _metrics(run: str) -> list[dict[str, str]]:
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def rewind(run: str, step: int) -> None:
    """Make ``run`` look as if it had stopped right after its step-``step`` checkpoint: ``latest`` points
    there, later checkpoints and metric rows are gone (what a run killed after that checkpoint leaves)."""
    ckpts = os.path.join(run, "checkpoints")
    keep = f"step_{step:08d}"
    if not os.path.isdir(os.path.join(ckpts, keep)):
        raise RuntimeError(f"no checkpoint {keep} in {ckpts}: {sorted(os.listdir(ckpts))}")
    for name in os.listdir(ckpts):
        if name.startswith("step_") and name > keep:
            shutil.rmtree(os.path.join(ckpts, name))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write(keep)
    rows = [r for r in _metrics(run) if int(r["step"]) <= step]
    with open(os.path.join(run, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name in ("summary.json",):
        if os.path.exists(os.path.join(run, name)):
            os.remove(os.path.join(run, name))


def compare_resumed(ref: list[dict[str, str]], resumed: list[dict[str, str]], after: int) -> dict:
    """The resumed run's logged steps after ``after`` against the uninterrupted run's, field by field."""
    ref_by = {int(r["step"]): r for r in ref}
    steps = [int(r["step"]) for r in resumed if int(r["step"]) > after]
    diffs = {"loss": 0.0, "grad_norm": 0.0}
    for r in resumed:
        s = int(r["step"])
        if s <= after:
            continue
        if s not in ref_by:
            raise RuntimeError(f"resumed run logged step {s}, the uninterrupted run did not")
        for k in diffs:
            if k in r and r[k] not in ("", None):
                x, y = float(r[k]), float(ref_by[s][k])
                diffs[k] = max(diffs[k], abs(x - y) / max(abs(y), 1e-12))
    return {"steps_compared": steps, "max_rel_diff": diffs, "identical": all(v == 0.0 for v in diffs.values())}


def sec_pipeline(a, prof, wd) -> dict:
    p = prof["pipeline"]
    data, cache = os.path.join(wd, "data"), os.path.join(wd, "cache")
    r1, r2 = os.path.join(wd, "run"), os.path.join(wd, "run-resumed")
    log: list[dict] = []
    out: dict[str, Any] = {"commands": log, "config": p}
    n, size, shard = str(p["samples"]), str(p["image_size"]), str(p["shard_size"])
    _cli(["prepare", "synthetic", "--out", data, "--num-samples", n, "--image-size", size, "--shard-size", shard], log)
    _cli(["extract", "--shards", data, "--out", cache, "--teacher", p["teacher"], "--views", "2"]
         + ["--executor", "local", *p["extract"]], log)  # fmt: skip
    with open(os.path.join(cache, "reports", "extract-summary.json")) as f:
        out["extract_summary"] = json.load(f)
    out["verify"] = {}
    # On the device that made the cache (re-run under its autocast), and on the CPU (re-run in float32, the
    # autocast floor): a GPU cache is often verified on a machine without one.
    for device in dict.fromkeys([p["device"], "cpu"]):
        r = _cli(["verify", "--shards", data, "--cache", cache, "--device", device], log)
        out["verify"][device] = [line for line in r.stdout.splitlines() if "alignment" in line]
    steps, half = p["steps"], p["steps"] // 2
    train = ["train", "--shards", data, "--cache", cache, "--student", p["student"], "--steps", str(steps)]
    train += ["--ckpt-every", str(half), *p["train"]]
    _cli([*train, "--out", r1], log)
    with open(os.path.join(r1, "summary.json")) as f:
        out["summary"] = json.load(f)
    shutil.copytree(r1, r2)
    rewind(r2, half)
    _cli([*train, "--out", r2, "--resume"], log)
    out["resume"] = compare_resumed(_metrics(r1), _metrics(r2), half)
    probe_out = os.path.join(wd, "probe_linear.json")
    _cli(["probe", "--run", r1, "--shards", data, "--kind", "linear", "--device", p["device"], "--out", probe_out], log)
    with open(probe_out) as f:
        out["probe"] = json.load(f)
    return out


def sec_tests(a, prof, wd) -> dict:
    """``pytest -m gpu`` over the test files that hold GPU-marked tests (collecting the whole suite would
    import what only CPU tests need)."""
    tests = os.path.join(C.REPO, "tests")
    files = sorted(
        os.path.join(tests, f)
        for f in os.listdir(tests)
        if f.startswith("test_") and f.endswith(".py") and "mark.gpu" in open(os.path.join(tests, f)).read()
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=C.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout, flush=True)
    last = [line for line in r.stdout.strip().splitlines() if line.strip()][-1:] or [""]
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "errors", "deselected"):
        for part in last[0].replace("=", " ").split(","):
            bits = part.split()
            if len(bits) >= 2 and bits[1] == word and bits[0].isdigit():
                counts[word] = int(bits[0])
    return {
        "files": [os.path.basename(f) for f in files],
        "rc": r.returncode,
        "summary": last[0].strip("= "),
        "counts": counts,
        "seconds": time.perf_counter() - t0,
        # pytest exits 5 when every collected test was deselected or skipped: not a failure here
        "ok": r.returncode in (0, 5) and not counts.get("failed") and not counts.get("errors"),
    }


RUNNERS = {
    "machine": sec_machine,
    "extract": sec_extract,
    "step": sec_step,
    "attention": sec_attention,
    "pipeline": sec_pipeline,
    "tests": sec_tests,
}


# ---------------------------------------------------------------------------------------------
# the parent: run the sections, keep their results, write the summary


def _run_child(name: str, a, wd: str, limit: float, logf) -> dict:
    """``bench/gpu.py --child NAME`` in a new session, killed with its whole process group at ``limit``."""
    path = os.path.join(wd, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--device", a.device, "--out", a.out]
    cmd += ["--workdir", wd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=C.REPO)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"seconds": seconds}
    if os.path.exists(path):
        with open(path) as f:
            result.update(json.load(f))
    if rc is None:
        result.update(status="timeout", error=f"killed after its limit of {limit:.0f} s")
    elif rc != 0 and result.get("status") != "error":
        result.update(status="error", error=result.get("error") or f"exited {rc}")
    else:
        result.setdefault("status", "ok" if rc == 0 else "error")
    return result


def child(a) -> int:
    import torch

    from teacher_cache.runtime import resolve_device

    cuda = resolve_device(a.device).type == "cuda"
    prof = profile(cuda)
    path = os.path.join(a.workdir, f"{a.child}.json")
    wd = os.path.join(a.workdir, a.child)
    os.makedirs(wd, exist_ok=True)
    try:
        result = {"status": "ok", "result": RUNNERS[a.child](a, prof, wd)}
        rc = 0
    except Exception as e:  # noqa: BLE001 - one section's failure is reported, the run goes on
        import traceback

        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        rc = 1
    if cuda:
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return rc


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def summarize(results: dict[str, dict], cuda: bool, prof: dict) -> tuple[list[list[str]], dict]:
    """The acceptance table: one row per check, with the figure, the target and whether it is met."""
    from bench.train import teacher_fwd_flops

    rows: list[list[str]] = []
    derived: dict[str, Any] = {}
    peak = _get(results, "machine", "result", "peak", "bf16" if cuda else "fp32", "flops")
    dtype = "bf16" if cuda else "fp32"

    def status_row(name: str, what: str) -> bool:
        r = results.get(name)
        if r is None:
            rows.append([what, "not run", "", "n/a"])
            return False
        if r.get("status") != "ok":
            rows.append([what, f"{r.get('status')}: {r.get('error', '')}"[:200], "", "no"])
            return False
        return True

    if status_row("machine", "matmul peak"):
        m = results["machine"]["result"]
        gpu = _get(m, "gpu", "name", default="CPU")
        rows.append(
            [
                f"matmul peak ({gpu})",
                " / ".join(f"{k} {v['flops'] / 1e12:.1f} TFLOP/s" for k, v in m["peak"].items()),
                "measured, the denominator below",
                "-",
            ]
        )
    if status_row("extract", "extraction"):
        b = results["extract"]["result"]["bench"]
        (name, t), = b["teachers"].items()  # fmt: skip
        argv = prof["extract"]
        n = int(argv[argv.index("--num-samples") + 1]) * int(argv[argv.index("--views") + 1])
        flops = teacher_fwd_flops(prof["extract_shape"])
        best = {"threads": C.median(t["pipeline_exec_s"])}
        tp = _get(b, "teachers_processes", name)
        fwd = C.median(t["stages_s"]["forward"])
        if tp:  # in-shard seconds of the process pipeline, scaled to the exec-phase clock of the threaded one
            best["processes"] = C.median(t["pipeline_exec_s"]) / tp["processes_over_threads"]
        kind = min(best, key=lambda k: best[k])
        img_s, fwd_s = n / best[kind], n / fwd
        frac = img_s * flops / peak if peak else math.nan
        fwd_frac = fwd_s * flops / peak if peak else math.nan
        resident = t.get("resident_forward_views_per_s")
        res_frac = resident * flops / peak if resident and peak else math.nan
        derived["extract"] = {
            "views_per_s": img_s,
            "decode": kind,
            "forward_views_per_s": fwd_s,
            "peak_fraction": frac,
            "forward_peak_fraction": fwd_frac,
            "resident_forward_views_per_s": resident,
            "resident_forward_peak_fraction": res_frac,
            "pipeline_over_forward": fwd / best[kind],
            "gflops_per_view": flops / 1e9,
        }
        met = frac >= TARGET_PEAK_FRACTION
        rows.append(
            [
                f"extraction, {name}, {dtype} (decode in {kind})",
                f"{img_s:.0f} views/s = **{frac:.2f}** of peak (bare forward with copies {fwd_s:.0f}/s = "
                f"{fwd_frac:.2f}; on GPU-resident input "
                + (f"{resident:.0f}/s = {res_frac:.2f}" if resident else "n/a")
                + f"); pipeline ÷ forward {fwd / best[kind]:.2f}",
                f">= {TARGET_PEAK_FRACTION} of {dtype} peak",
                C.verdict(met) if cuda else "n/a (CPU)",
            ]
        )
    if status_row("step", "D-iGPT step at the paper's shapes"):
        pairs = results["step"]["result"]["bench"]["pairs"]
        argv = prof["step"]
        batch = int(argv[argv.index("--batch-size") + 1])
        derived["step"] = {}
        for key, r in pairs.items():
            cached = C.median(r["cached_s"])
            flops = r["counted_gflops"]["student_step"] * 1e9 * batch
            frac = flops / cached / peak if peak else math.nan
            tf = C.median(r["teacher_s"])
            t_frac = r["counted_gflops"]["teacher_fwd"] * 1e9 * batch / tf / peak if peak else math.nan
            derived["step"][key] = {"cached_peak_fraction": frac, "teacher_peak_fraction": t_frac}
            rows.append(
                [
                    f"step {key}, batch {batch}, {dtype}",
                    f"online ÷ cached **{r['measured']:.2f}x** (ceiling {r['ceiling']:.2f}x); cached step "
                    f"{1e3 * cached:.0f} ms = {frac:.2f} of peak; teacher fwd {t_frac:.2f} of peak",
                    "near the FLOP ceiling",
                    "-",
                ]
            )
    if status_row("attention", "attention kernels"):
        b = results["attention"]["result"]["bench"]
        for label, impls in b.items():
            for impl in ("sdpa", "flex"):
                if impl not in impls:
                    if impl == "flex":
                        rows.append([f"attention {impl}, {label}", "n/a (CUDA only)", "", "n/a"])
                    continue
                r, ref = impls[impl], impls["eager"]
                mem = r["peak_bytes"] / ref["peak_bytes"] if r.get("peak_bytes") and ref.get("peak_bytes") else math.nan
                met = r["vs_eager"] <= TARGET_VS_EAGER and mem <= TARGET_VS_EAGER
                rows.append(
                    [
                        f"attention {impl}, {label}",
                        f"time {r['vs_eager']:.2f}x eager ({r['ms']:.2f} ms), memory {mem:.2f}x",
                        f"<= {TARGET_VS_EAGER}x eager in both",
                        C.verdict(met) if cuda else "n/a (CPU)",
                    ]
                )
    if status_row("pipeline", "CLI pipeline"):
        r = results["pipeline"]["result"]
        secs = {c["command"].split()[1]: c["seconds"] for c in r["commands"]}
        summ, res, probe = r["summary"], r["resume"], r["probe"]
        loss, blind = summ.get("final_loss"), summ.get("blind_loss")
        what = "a bf16-autocast cache" if cuda else "the cache"
        for device, lines in r["verify"].items():
            detail = lines[0].split("alignment", 1)[1].strip() if lines else "passed"
            rows.append([f"CLI: verify {what} on {device}", detail, "passes", "yes"])
        rows.append(
            [
                f"CLI: extract {r['config']['teacher']}, {r['config']['samples']} images x 2 views",
                f"{secs.get('extract', math.nan):.1f} s (process start and teacher build included)",
                "finishes",
                "yes",
            ]
        )
        rows.append(
            [
                f"CLI: train {r['config']['steps']} steps ({' '.join(r['config']['train'][:6])})",
                f"final loss {float(loss):.4f} vs input-blind baseline {float(blind or math.nan):.4f}; "
                f"{summ.get('steps_per_s', math.nan):.1f} steps/s; {secs.get('train', math.nan):.1f} s in all",
                "finishes, loss finite",
                C.verdict(loss is not None and math.isfinite(float(loss))),
            ]
        )
        rows.append(
            [
                "CLI: train --resume from the mid-run checkpoint",
                ("identical steps" if res["identical"] else f"max relative difference {res['max_rel_diff']}")
                + f" over steps {res['steps_compared'][:1]}..{res['steps_compared'][-1:]}",
                "the uninterrupted run's steps",
                C.verdict(res["identical"]),
            ]
        )
        rows.append(
            [
                "CLI: probe --kind linear (on the pretraining set's holdout)",
                f"top-1 {probe['top1']:.3f} at {probe['best_layer']} ({probe['n_report']} report images, "
                f"chance {1 / probe['num_classes']:.3f})",
                "runs",
                "yes",
            ]
        )
    if status_row("tests", "CUDA-marked tests"):
        t = results["tests"]["result"]
        rows.append(["`pytest -m gpu`", t["summary"], "no failure", C.verdict(t["ok"])])
    return rows, derived


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_out", help="folder for gpu.json, gpu.md, benchmarks.md, log.txt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole run; a section gets what is left")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = argv
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    if a.child:
        return {"rc": child(a)}
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")

    from teacher_cache.runtime import resolve_device

    cuda = resolve_device(a.device).type == "cuda"
    prof = profile(cuda)
    started = _dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    with C.workdir(a.workdir) as wd, open(os.path.join(a.out, "log.txt"), "a") as logf:
        tmp = tempfile.mkdtemp(prefix="gpu-", dir=wd)
        for name in sections:
            left = a.budget - (time.perf_counter() - t0)
            limit = min(LIMITS_S[name] * (1 if cuda else 2), left)
            if limit < 10:
                results[name] = {"status": "skipped", "error": f"budget of {a.budget:.0f} s spent"}
                print(f"[gpu] {name}: skipped (budget spent)", flush=True)
                continue
            print(f"[gpu] {name}: running (limit {limit:.0f} s)", flush=True)
            logf.write(f"\n===== {name} =====\n")
            logf.flush()
            results[name] = _run_child(name, a, tmp, limit, logf)
            r = results[name]
            print(f"[gpu] {name}: {r['status']} in {r['seconds']:.1f} s {r.get('error', '')}", flush=True)
            if r["status"] != "ok":  # the end of its output, so a remote run's reply shows why
                logf.flush()
                with open(os.path.join(a.out, "log.txt")) as f:
                    print("".join(f.readlines()[-25:]), flush=True)
            write(a, results, cuda, prof, started, time.perf_counter() - t0)
    doc = write(a, results, cuda, prof, started, time.perf_counter() - t0)
    with open(os.path.join(a.out, "gpu.md")) as f:
        print(f.read().split("### The benches")[0], flush=True)
    return doc


def write(a, results: dict, cuda: bool, prof: dict, started, seconds: float) -> dict:
    rows, derived = summarize(results, cuda, prof)
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
        "code": C.code_version(),
        "device": "cuda" if cuda else "cpu",
        "command": C.command_line("gpu", a.argv),
        "sections": results,
        "derived": derived,
        "acceptance": rows,
    }
    with open(os.path.join(a.out, "gpu.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    machine = _get(results, "machine", "result", "machine")
    md = [
        f"## GPU acceptance (bench/gpu.py) — {started.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"- machine: {C.machine_line(machine) if machine else 'n/a'}",
        f"- GPU: {_get(results, 'machine', 'result', 'gpu', default='none')}",
        f"- code: {doc['code']}; took {seconds:.0f} s",
        "",
        C.table(["check", "measured", "target", "met"], rows, align="llll"),
        "",
        "Sections: " + ", ".join(f"{k} {v['status']} ({v.get('seconds', 0):.0f} s)" for k, v in results.items()),
        "",
    ]
    bench_md = os.path.join(a.out, "benchmarks.md")
    if os.path.exists(bench_md):
        md += ["", "### The benches' own tables", "", open(bench_md).read()]
    with open(os.path.join(a.out, "gpu.md"), "w") as f:
        f.write("\n".join(md))
    return doc


if __name__ == "__main__":
    main()
