"""Every benchmark script runs end to end at its very smallest size and appends a section to a results file
(a temporary one: the repository's BENCHMARKS.md is never touched by tests)."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The scripts set torch's thread count (``--threads``); give the rest of the session its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(name: str, args: list[str], tmp_path) -> tuple[dict, str]:
    mod = importlib.import_module(f"bench.{name}")
    results = tmp_path / "BENCHMARKS.md"
    out = mod.main([*args, "--results", str(results), "--workdir", str(tmp_path / "work")])
    text = results.read_text()
    assert f"python bench/{name}.py" in text and "machine: CPU:" in text and "| " in text
    return out, text


def test_results_go_to_the_given_file_only(tmp_path, monkeypatch):
    import bench._common as C

    before = os.path.getmtime(C.DEFAULT_RESULTS) if os.path.exists(C.DEFAULT_RESULTS) else None
    out, text = _run(
        "attention",
        ["--batch", "1", "--heads", "2", "--head-dim", "8", "--shape", "clusters", "--repeats", "1", "--warmup", "0"],
        tmp_path,
    )
    assert text.startswith("# Benchmarks")
    row = out["clusters (148 = 3x49 + cls)"]
    assert {"eager", "sdpa_dense", "sdpa"} <= set(row)
    assert "n/a (no GPU)" in text or "flex" in row
    after = os.path.getmtime(C.DEFAULT_RESULTS) if os.path.exists(C.DEFAULT_RESULTS) else None
    assert before == after


def test_common_helpers():
    import bench._common as C

    calls = []
    times = C.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert len(times["a"]) == len(times["b"]) == 3 and calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"]
    assert calls[4:6] == ["b", "a"]  # the starting variant rotates each round
    assert C.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == 2.0
    t = C.table(["x", "y"], [["a", 1]])
    assert t.splitlines()[1].startswith("|:") and t.splitlines()[2].startswith("| a")
    info = C.machine_info()
    assert info["nproc"] >= 1 and info["torch"]


def test_storage_smoke(tmp_path):
    out, _ = _run(
        "storage",
        [
            "--teacher",
            "random-vit:32/8",
            "--num-samples",
            "8",
            "--views",
            "1",
            "--pca-dims",
            "8",
            "--codebook-size",
            "4",
            "--objects-rows",
            "40",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ],
        tmp_path,
    )
    objects = out["objects"]
    assert objects["fp16-s2"]["objects"] == 1 + 7 + 2 * 1 + 5  # group, arrays, 1 view x (tokens, cls), metadata
    assert objects["fp16-s1"]["bytes_per_sample"] > 0 and objects["codes-4-s2"]["objects"] == 1 + 6 + 1 + 5
    forms = out["forms"]
    assert {"fp32", "fp16", "bf16", "int8", "pca-8", "codes-4"} <= set(forms)
    assert forms["fp16"]["raw_bytes_per_view"] == pytest.approx(forms["fp32"]["raw_bytes_per_view"] / 2)
    assert forms["codes-4"]["bytes_per_view"] < forms["fp16"]["bytes_per_view"]


def test_loader_smoke(tmp_path):
    out, _ = _run(
        "loader",
        [
            "--teachers",
            "pixel:32/8",
            "--num-samples",
            "16",
            "--image-size",
            "32",
            "--img-size",
            "32",
            "--shard-size",
            "16",
            "--batch-size",
            "8",
            "--views",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ],
        tmp_path,
    )
    assert out["plain_samples_per_s"] > 0 and "pixel:32/8" in out["tokenizers"]


def test_train_smoke(tmp_path):
    out, _ = _run(
        "train",
        [
            "--student",
            "tiny-test",
            "--teacher",
            "random-vit:32/8",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--loop-steps",
            "1",
        ],
        tmp_path,
    )
    assert out["step"]["online_over_cached"] > 0 and "loop" in out


def test_train_paper_shapes_smoke(tmp_path):
    from bench.train import teacher_fwd_flops

    out, text = _run("train", ["--pairs", "tiny-test:tiny_32_8", "--repeats", "1", "--warmup", "0"], tmp_path)
    r = out["pairs"]["tiny-test:tiny_32_8"]
    assert (
        r["measured"] > 0
        and r["within_run"] > 0
        and r["ceiling"] > 1
        and "ceiling online / cached" in text
        and "What it means" in text
    )
    # the analytic counts agree with torch's FLOP counter run on the real step and teacher forward
    assert r["teacher_fwd_gflops"] == pytest.approx(r["counted_gflops"]["teacher_fwd"], rel=0.02)
    assert r["student_step_gflops"] == pytest.approx(r["counted_gflops"]["student_step"], rel=0.05)
    # and with the published multiply-adds of the teachers at 224 px (2 FLOPs each): ViT-B/16 17.6 G, ViT-L/14
    # 81 G, ViT-H/14 167 G
    for shape, gmacs in (("vit_base_16", 17.6), ("vit_large_14", 81.0), ("vit_huge_14", 167.0)):
        assert teacher_fwd_flops(shape) / 2e9 == pytest.approx(gmacs, rel=0.02), shape


@pytest.mark.slow
def test_cluster_smoke(tmp_path):
    """Two `ray start` nodes and a moto S3 server, all on loopback, at the smallest size."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    out, text = _run(
        "cluster",
        [
            "--teacher",
            "random-vit:32/8",
            "--num-samples",
            "8",
            "--shard-size",
            "4",
            "--image-size",
            "32",
            "--img-size",
            "32",
            "--read-batch-size",
            "4",
            "--repeats",
            "1",
            "--read-repeats",
            "1",
            "--warmup",
            "0",
        ],
        tmp_path,
    )
    ray = out["ray"]
    assert ray["1"]["nodes"] == 1 and ray["2"]["nodes"] == 2, ray  # --workers 2: one actor on each node
    assert sum(ray["2"]["shards_per_node"].values()) == 2 and ray["2"]["speedup"] > 0
    assert out["s3"]["write"]["s3"]["images_per_s"][0] > 0 and out["s3"]["read"]["s3"]["samples_per_s"] > 0
    assert "2-core caveat" in text and "s3 (moto on 127.0.0.1)" in text


def test_extract_smoke_local(tmp_path):
    out, text = _run(
        "extract",
        [
            "--teachers",
            "random-vit:32/8",
            "--num-samples",
            "8",
            "--shard-size",
            "4",
            "--views",
            "1",
            "--batch-size",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--ray-workers",
            "",
            "--decode-processes",
            "1",
        ],
        tmp_path,
    )
    r = out["teachers"]["random-vit:32/8"]
    p = out["teachers_processes"]["random-vit:32/8"]  # the pipeline decoding in a process, side by side
    assert len(p["shard_s_processes"]) == len(p["shard_s_threads"]) == 1 and p["processes_over_threads"] > 0
    assert min(p["decode_s_processes"]) > 0 and p["pool_start_s"] > 0
    assert "spawned process(es) vs" in text
    assert r["pipeline_over_slowest"] > 0 and r["pipeline_over_forward"] > 0 and r["slowest"] in r["stages_s"]
    assert all(min(v) > 0 for v in r["stages_s"].values()) and set(r["stages_s"]) == {
        "read",
        "decode/crop",
        "forward",
        "write",
    }
    assert "slowest" in text and "Ray scaling" not in text
    # CPU seconds per stage, one per timed round, and a ceiling no faster than the slowest stage alone
    assert {s: len(v) for s, v in r["stages_cpu_s"].items()} == {s: 1 for s in r["stages_s"]}
    assert r["cpu_ceiling_s"][0] >= max(v[0] for v in r["stages_s"].values()) and r["pipeline_over_cpu_ceiling"] > 0
    assert "CPU-bound ceiling" in text


@pytest.mark.slow
def test_extract_smoke_ray(tmp_path, ray_session):
    out, text = _run(
        "extract",
        [
            "--teachers",
            "pixel:32/8",
            "--num-samples",
            "8",
            "--shard-size",
            "4",
            "--views",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--ray-workers",
            "1",
        ],
        tmp_path,
    )
    assert out["ray"]["pixel:32/8"][1]["images_per_s"] > 0 and "Ray scaling" in text


@pytest.mark.slow
def test_e2e_smoke(tmp_path):
    out, _ = _run(
        "e2e",
        ["--num-samples", "8", "--num-classes", "2", "--steps", "1", "--batch-size", "4", "--executor", "local"]
        + ["--probe-samples", "16"],
        tmp_path,
    )
    assert out["verified"] and all(out["stages"][s] > 0 for s in ("prepare", "extract", "train", "probe", "verify"))


def test_learning_compare_pairs_by_seed(tmp_path):
    """``bench/learning.py compare``: probe results grouped by variant, each gap paired seed by seed."""
    import subprocess

    n = 200

    def probe(name, seed, right):
        d = tmp_path / f"{name}_s{seed}"
        d.mkdir()
        vec = [1 if i < right else 0 for i in range(n)]
        r = {"kind": "knn", "top1": right / n, "n_report": n, "report_correct": vec, "config": {"seed": seed}}
        (d / "probe_linear.json").write_text(json.dumps(r))

    for seed in (0, 1):
        probe("floor", seed, 30)
        probe("student", seed, 60 + 10 * seed)
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "learning.py"),
            "compare",
            "--out",
            str(tmp_path / "o"),
            "--ref",
            "floor",
            f"floor={tmp_path}/floor_s*/probe_linear.json",
            f"student={tmp_path}/student_s*/probe_linear.json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {r["variant"]: r for r in json.load(open(tmp_path / "o" / "compare.json"))["rows"]}
    assert rows["student"]["per_seed"] == [0.3, 0.35] and rows["student"]["gap"] == pytest.approx(0.175)
    assert 0 < rows["student"]["margin"] < 0.175 and "| student | 2 | 0.325 |" in out and "| yes |" in out
    assert "knn top-1 per variant on 200 report samples" in out  # what was probed, and on how many samples
    # A pattern that catches another variant's probe of the same seed is refused, naming both files.
    probe("student_semaim", 0, 90)
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "learning.py"), "compare", "--out", str(tmp_path / "o")]
        + ["--ref", "floor", f"floor={tmp_path}/floor_s*/probe_linear.json"]
        + [f"student={tmp_path}/student_s*/probe_linear.json"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "matches two probes of seed 0" in bad.stderr and "student_semaim_s0" in bad.stderr


@pytest.mark.slow
def test_gpu_acceptance_runs_every_section_on_the_cpu(tmp_path):
    """bench/gpu.py at its CPU sizes: every section runs in its own process and reports, the CLI pipeline
    resumes to the uninterrupted run's steps, and the files a GPU run brings back are written."""
    from bench import gpu

    doc = gpu.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")])
    assert {k: v["status"] for k, v in doc["sections"].items()} == {s: "ok" for s in gpu.SECTIONS}
    assert sorted(os.listdir(tmp_path / "out")) == ["benchmarks.md", "gpu.json", "gpu.md", "log.txt"]
    pipe = doc["sections"]["pipeline"]["result"]
    assert pipe["resume"]["identical"] and pipe["resume"]["steps_compared"] == [3, 4]
    assert set(pipe["verify"]) == {"cpu"} and "worst mean token cosine" in pipe["verify"]["cpu"][0]
    tests = doc["sections"]["tests"]["result"]
    assert tests["ok"] and "test_gpu_paths.py" in tests["files"] and tests["counts"].get("skipped", 0) >= 6
    assert doc["derived"]["extract"]["views_per_s"] > 0 and doc["derived"]["step"]
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "| check" in md and "matmul peak (CPU)" in md and "train --resume" in md
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["device"] == "cpu"


def test_gpu_acceptance_rewind_and_compare(tmp_path):
    """The resume check's two helpers: a run rewound to a checkpoint, and a resumed run that differs."""
    from bench import gpu

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,loss,grad_norm\n1,3.0,1.0\n2,2.5,0.9\n3,2.0,0.8\n4,1.5,0.7\n")
    (run / "summary.json").write_text("{}")
    gpu.rewind(str(run), 2)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run / "checkpoints" / "step_00000004").exists() and not (run / "summary.json").exists()
    assert [r["step"] for r in gpu._metrics(str(run))] == ["1", "2"]
    ref = [{"step": str(s), "loss": str(x), "grad_norm": "1"} for s, x in ((3, 2.0), (4, 1.5))]
    same = gpu.compare_resumed(ref, [dict(r) for r in ref], 2)
    assert same["identical"] and same["steps_compared"] == [3, 4]
    off = gpu.compare_resumed(ref, [ref[0], {**ref[1], "loss": "1.65"}], 2)
    assert not off["identical"] and abs(off["max_rel_diff"]["loss"] - 0.1) < 1e-9
    with pytest.raises(RuntimeError, match="step 5"):
        gpu.compare_resumed(ref, [{"step": "5", "loss": "1", "grad_norm": "1"}], 2)
