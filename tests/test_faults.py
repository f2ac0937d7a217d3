"""Crashes, for real: SIGKILL a Ray worker, the ``extract`` driver and ``train`` mid-run, then check that
nothing was lost and nothing duplicated (issue #6; the table is in RELIABILITY.md).

* A Ray worker killed while it writes a shard: the actor is restarted, the shard retried, the job
  finishes, and the cache equals a clean run's byte for byte.
* The ``extract`` driver killed mid-shard (``--executor local`` after 1 and after 2 complete shards;
  ``--executor ray`` with a worker mid-shard): re-running redoes only the incomplete shards, leaves the
  complete ones untouched, and the cache equals a clean run's byte for byte.
* ``train`` killed between checkpoints, with a half-written checkpoint and pointer left beside it:
  ``--resume`` loads the last complete checkpoint, and metrics.csv holds every step once, with the
  losses of an uninterrupted run.
* Two quick mismatch checks the other test files lack: another layer, grid or shard set into an
  existing cache is refused before anything is written; a missing shard and Inf targets are caught
  by ``verify`` and ``train``.

Every killed command is a real ``python cli.py ...`` process in its own session; every process of
that session is reaped afterwards (by pid). To kill at a chosen point, the tests set
``DIGPT_FAULT_PAUSE`` (teacher_cache/extract/worker.py ``fault_pause``): the process writing a shard records
its pid after the shard's first chunk and waits until the test releases it (or kills it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import FAULT_PAUSE_ENV, run_extract
from teacher_cache.store import shard_ids
from teacher_cache.views import AugConfig

REPO = Path(__file__).resolve().parent.parent
VIT, PIX = "random-vit_32_8", "pixel_32_8"
GROUPS = (VIT, PIX)
CHUNK = 8  # rows per chunk: a 16-row shard is written in two, so "mid-shard" is well defined
EXTRACT = [
    "--teacher",
    "random-vit:32/8",
    "--teacher",
    "pixel:32/8",
    "--views",
    "2",
    "--dtype",
    "fp16",
    "--chunk-rows",
    str(CHUNK),
    "--batch-size",
    "8",
    "--device",
    "cpu",
]


# ---------------------------------------------------------------------------------------------
# processes


def _cli(args: list[str], log: Path, pause: Path | None = None) -> subprocess.Popen:
    """``python cli.py ARGS`` in a new session (so every process it starts can be found and reaped)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop(FAULT_PAUSE_ENV, None)
    if pause is not None:
        env[FAULT_PAUSE_ENV] = str(pause)
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None when it is gone."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[3])  # state, ppid, pgrp, session


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the command's own session: nothing else is in it)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[1] == sid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def _reap(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """SIGKILL the command and whatever it left in its session (Ray's agents outlive a killed driver)."""
    deadline = time.monotonic() + grace
    while grace and _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


def _wait(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, f"command ended (rc {proc.returncode}) before {what}:\n{_tail(log)}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}:\n{_tail(log)}")


def _paused_pid(pause: Path, job: str, proc: subprocess.Popen, log: Path) -> int:
    """Wait until the process writing ``job`` (``<group>.<sid>``) stops mid-shard; its pid."""

    def read():
        try:
            text = (pause / f"{job}.pid").read_text()
        except FileNotFoundError:
            return None
        return int(text) if text.endswith("\n") else None

    return _wait(read, proc, log, f"{job} to pause mid-shard")


def _release(pause: Path, jobs) -> None:
    for job in jobs:
        (pause / f"{job}.go").touch()


# ---------------------------------------------------------------------------------------------
# the cache


def _complete(cache: Path) -> set[str]:
    """``<group>.<sid>`` of every shard marked complete (read from the metadata files, so it is safe
    while another process writes)."""
    done = set()
    for g in GROUPS:
        for meta in (cache / g).glob("*/zarr.json"):
            try:
                attrs = json.loads(meta.read_text()).get("attributes", {})
            except (OSError, ValueError):
                continue
            if "complete" in attrs:
                done.add(f"{g}.{meta.parent.name}")
    return done


def _snapshot(cache: Path) -> dict:
    """Everything a reader sees: root and tokenizer records, every decoded array of every shard and
    tokenizer, shard records (completion time aside), and the raw bytes of every chunk file."""
    root = zarr.open_group(str(cache), mode="r")
    snap = {"root": dict(root.attrs)}
    for g in GROUPS:
        tok = root[g]
        snap[f"{g}/attrs"] = dict(tok.attrs)
        for name, arr in tok.arrays():
            snap[f"{g}/{name}"] = arr[:]
        for sid, grp in tok.groups():
            attrs = dict(grp.attrs)
            if "complete" in attrs:
                attrs["complete"] = {k: v for k, v in attrs["complete"].items() if k != "seconds"}
            snap[f"{g}/{sid}/attrs"] = attrs
            for name, arr in grp.arrays():
                snap[f"{g}/{sid}/{name}"] = arr[:]
        for d, _, files in os.walk(cache / g):
            for f in files:
                if f != "zarr.json":
                    p = Path(d) / f
                    snap[f"chunk:{p.relative_to(cache)}"] = p.read_bytes()
    return snap


def _assert_same_cache(got: Path, want: Path) -> None:
    a, b = _snapshot(got), _snapshot(want)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    root = zarr.open_group(str(got), mode="r")
    for g in GROUPS:  # and nothing is marked complete with rows missing
        for _, grp in root[g].groups():
            done = grp.attrs["complete"]
            assert done["rows"] == done["valid"] == grp["keys"].shape[0] == grp.attrs["shard"]["rows"]
            assert grp["valid"][:].all()


def _file_stamps(cache: Path, jobs) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of the given shards: equal before and after = not rewritten."""
    out = {}
    for job in jobs:
        g, sid = job.split(".", 1)
        for d, _, files in os.walk(cache / g / sid):
            for f in files:
                st = os.stat(Path(d) / f)
                out[str(Path(d) / f)] = (st.st_ino, st.st_mtime_ns)
    return out


def _assert_mid_shard(cache: Path, job: str) -> None:
    """The shard has its first block of tokens written and nothing after it, and is not complete: each
    view's token object holds exactly CHUNK rows in its spool (raw fp16 + 4 B checksum per row) and is
    not published yet, so zarr sees no tokens at all."""
    g, sid = job.split(".", 1)
    grp = zarr.open_group(str(cache), mode="r")[g][sid]
    assert "complete" not in grp.attrs
    n, k, t, d = grp["tokens"].shape
    for v in range(k):
        obj = cache / g / sid / "tokens" / "c" / "0" / str(v) / "0" / "0"
        spool = obj.with_name("0.partial")
        assert not obj.exists() and spool.stat().st_size == CHUNK * (t * d * 2 + 4), (spool, v)
    assert not np.any(grp["tokens"][:] != 0)


@pytest.fixture(scope="module")
def jobs(tiny_dataset) -> list[str]:
    """Every (tokenizer, shard) as ``<group>.<sid>``, in the order the local executor runs them."""
    sids = shard_ids(load_dataset(tiny_dataset).shards)
    return [f"{g}.{sids[s]}" for g in GROUPS for s in sids]  # (dicts keep the manifest's shard order)


def _extract_cfg(tiny_dataset: str, out: Path) -> ExtractConfig:
    """The same extraction as ``EXTRACT`` on the command line."""
    return ExtractConfig(
        shards=tiny_dataset,
        out=str(out),
        executor="local",
        batch_size=8,
        device="cpu",
        teachers=(TeacherConfig("random-vit:32/8"), TeacherConfig("pixel:32/8")),
        aug=AugConfig(views=2, seed=0),
        storage=StorageConfig(dtype="fp16", chunk_rows=CHUNK),
    )


@pytest.fixture(scope="module")
def clean_cache(tiny_dataset, tmp_path_factory) -> Path:
    """The uninterrupted run every crashed one is compared with."""
    out = tmp_path_factory.mktemp("faults") / "clean"
    assert run_extract(_extract_cfg(tiny_dataset, out), progress=False).ok
    return out


# ---------------------------------------------------------------------------------------------
# extract


@pytest.mark.slow
def test_ray_worker_sigkill_mid_shard_is_retried(tiny_dataset, clean_cache, jobs, tmp_path):
    """SIGKILL the Ray actor process while it is writing a shard: Ray restarts the actor and retries
    the shard (max_restarts / max_task_retries), the job exits 0, the cache equals a clean run's."""
    pause, out, log = tmp_path / "pause", tmp_path / "ray", tmp_path / "extract.log"
    pause.mkdir()
    target = jobs[1]
    _release(pause, [j for j in jobs if j != target])
    proc = _cli(
        [
            "extract",
            "--shards",
            tiny_dataset,
            "--out",
            str(out),
            *EXTRACT,
            "--executor",
            "ray",
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        log,
        pause,
    )
    try:
        pid = _paused_pid(pause, target, proc, log)
        assert pid != proc.pid and _stat(pid)[1] == proc.pid  # a worker of this job, not the driver
        _assert_mid_shard(out, target)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, _tail(log)
    finally:
        _reap(proc)
    assert not _alive(pid)
    summary = json.loads((out / "reports" / "extract-summary.json").read_text())["summary"]
    assert summary["failed"] == [] and [t["shards_done"] for t in summary["tokenizers"]] == [3, 3]
    _assert_same_cache(out, clean_cache)


@pytest.mark.slow
def test_driver_sigkill_local_resumes_only_incomplete_shards(tiny_dataset, clean_cache, jobs, tmp_path):
    """Kill ``extract --executor local`` mid-shard after 1, then (re-run) after 2 complete shards; the
    third run redoes only what is incomplete, never rewrites a complete shard, and matches a clean run."""
    out = tmp_path / "c"
    args = ["extract", "--shards", tiny_dataset, "--out", str(out), *EXTRACT, "--executor", "local"]
    stamps = {}
    for run, done in ((1, 1), (2, 2)):  # kill while writing jobs[done]: jobs[:done] are complete
        pause, log = tmp_path / f"pause{run}", tmp_path / f"run{run}.log"
        pause.mkdir()
        _release(pause, jobs[:done])  # (only this run's unfinished jobs ever pause)
        proc = _cli(args, log, pause)
        try:
            pid = _paused_pid(pause, jobs[done], proc, log)
            assert pid == proc.pid  # the local executor writes in the driver itself
            _assert_mid_shard(out, jobs[done])
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            _reap(proc)
        assert _complete(out) == set(jobs[:done])
        now = _file_stamps(out, jobs[: done - 1] if run > 1 else [])
        assert all(stamps[k] == v for k, v in now.items())  # run 2 did not touch run 1's shard
        stamps = _file_stamps(out, jobs[:done])
    summary = run_extract(_extract_cfg(tiny_dataset, out), progress=False)
    assert summary.ok
    by = {t.group: (t.shards_done, t.shards_skipped_complete) for t in summary.tokenizers}
    assert by == {VIT: (1, 2), PIX: (3, 0)}
    assert _file_stamps(out, jobs[:2]) == stamps  # complete shards were skipped, not redone
    _assert_same_cache(out, clean_cache)


@pytest.mark.slow
def test_ray_driver_sigkill_resumes(tiny_dataset, clean_cache, jobs, tmp_path):
    """Kill the ``extract --executor ray`` driver while a worker is mid-shard and the other shards are
    complete: the job's workers die with it (no orphan writes on), and a re-run redoes that shard only."""
    pause, out, log = tmp_path / "pause", tmp_path / "ray", tmp_path / "extract.log"
    pause.mkdir()
    target = jobs[-1]  # one worker runs the jobs in order: the others are complete when it pauses
    _release(pause, [j for j in jobs if j != target])
    proc = _cli(
        [
            "extract",
            "--shards",
            tiny_dataset,
            "--out",
            str(out),
            *EXTRACT,
            "--executor",
            "ray",
            "--workers",
            "1",
            "--threads",
            "1",
        ],
        log,
        pause,
    )
    try:
        pid = _paused_pid(pause, target, proc, log)
        assert pid != proc.pid and _stat(pid)[1] == proc.pid
        _wait(lambda: _complete(out) == set(jobs) - {target}, proc, log, "the other shards to complete")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "a worker outlived its driver (it could still write into the cache)"
    finally:
        _reap(proc)
    _assert_mid_shard(out, target)
    stamps = _file_stamps(out, set(jobs) - {target})
    summary = run_extract(_extract_cfg(tiny_dataset, out), progress=False)
    by = {t.group: (t.shards_done, t.shards_skipped_complete) for t in summary.tokenizers}
    assert summary.ok and by == {VIT: (0, 3), PIX: (1, 2)}
    assert _file_stamps(out, set(jobs) - {target}) == stamps
    _assert_same_cache(out, clean_cache)


# ---------------------------------------------------------------------------------------------
# mismatches the other tests do not cover: another layer, grid or shard set into an existing cache;
# a missing shard; Inf in the targets


def test_existing_cache_refuses_other_layer_grid_and_shards(tiny_dataset, clean_cache, tmp_path):
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic

    cache = tmp_path / "c"
    shutil.copytree(clean_cache, cache)
    before = _snapshot(cache)
    other = tmp_path / "other"
    prepare_synthetic(
        SyntheticConfig(out=str(other), num_samples=16, num_classes=2, image_size=32, shard_size=8, seed=9)
    )

    def into(teacher: TeacherConfig) -> ExtractConfig:
        return dataclasses.replace(_extract_cfg(tiny_dataset, cache), teachers=(teacher,))

    cases = [
        (into(TeacherConfig("random-vit:32/8", layer=1, group=VIT)), f"{VIT}.*different (fingerprint|spec)"),
        (into(TeacherConfig("pixel:32/16", group=PIX)), f"{PIX}.*different (fingerprint|spec)"),
        (_extract_cfg(str(other), cache), "other shards"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            run_extract(cfg, progress=False)
    after = _snapshot(cache)
    assert after.keys() == before.keys()
    assert all(
        np.array_equal(after[k], before[k]) if isinstance(before[k], np.ndarray) else after[k] == before[k]
        for k in before
    )  # refused before writing anything


def test_missing_shard_and_inf_targets_are_caught(tiny_dataset, clean_cache, tmp_path):
    from student.data import CacheJoin, DataConfig
    from student.objectives import StudentConfig
    from student.train import OptimConfig, TrainConfig, train
    from teacher_cache.verify import VerifyConfig, run_verify

    def failed(cache):
        report = run_verify(VerifyConfig(shards=tiny_dataset, cache=str(cache), spot_checks=1), progress=False)
        return {(c.scope, c.name) for c in report.checks if not c.ok}

    gone = tmp_path / "gone"
    shutil.copytree(clean_cache, gone)
    sid = sorted(n for n, _ in zarr.open_group(str(gone), mode="r")[VIT].groups())[1]
    shutil.rmtree(gone / VIT / sid)
    assert failed(gone) == {(VIT, "complete")}
    with pytest.raises(ValueError, match=f"{VIT}.*incomplete.*1 shard"):
        CacheJoin(DataConfig(tiny_dataset, str(gone), VIT, 32, 8))

    inf = tmp_path / "inf"
    shutil.copytree(clean_cache, inf)
    zarr.open_group(str(inf), mode="r+")[PIX][sid]["tokens"][:] = np.inf  # a whole shard of +Inf targets
    assert failed(inf) == {(PIX, "finite")}
    cfg = TrainConfig(
        data=DataConfig(tiny_dataset, str(inf), PIX, 32, 8, shuffle_buffer=16),
        out=str(tmp_path / "run"),
        student=StudentConfig("tiny-test"),
        objective="next-patch",
        steps=6,
        optim=OptimConfig(base_lr=3e-3),
    )
    for norm in ("none", "token", "channel"):  # refused before any step or write, whatever the normalisation
        with pytest.raises(ValueError, match="non-finite tokens.*digpt verify"):
            train(dataclasses.replace(cfg, target_norm=norm), progress=False)
        assert not (tmp_path / "run").exists(), norm
    # Past the rows checked up front, each batch is checked as its targets are widened, the sample named.
    from student.data import widen_targets

    batch = {"tokens": torch.ones(3, 4, 2, dtype=torch.float16), "shard": ["a", "b", "c"], "key": ["x", "y", "z"]}
    batch["tokens"][1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite stored targets \(NaN/Inf\) in b/y; .*digpt verify"):
        widen_targets(batch, None)


# ---------------------------------------------------------------------------------------------
# train

STEPS, CKPT_EVERY = 24, 4


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _logged_steps(run: Path) -> list[int]:
    try:
        return [int(r["step"]) for r in _metrics(run) if r.get("samples_per_s")]  # complete rows only
    except (FileNotFoundError, ValueError, TypeError):
        return []


def _latest_step(run: Path) -> int | None:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.slow
def test_train_sigkill_then_resume_replays_the_same_losses(tiny_dataset, clean_cache, tmp_path):
    """Kill ``train`` between checkpoints, leave a half-written checkpoint, pointer and metrics line
    beside the good ones, ``--resume``: every step is logged once, with the uninterrupted run's loss,
    gradient norm and lr, and the final weights are identical."""
    args = [
        "train",
        "--shards",
        tiny_dataset,
        "--cache",
        str(clean_cache),
        "--tokenizer",
        VIT,
        "--steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--shuffle-buffer",
        "16",
        "--base-lr",
        "3e-3",
        "--warmup",
        "0.1",
        "--log-every",
        "1",
        "--ckpt-every",
        str(CKPT_EVERY),
        "--device",
        "cpu",
    ]
    clean, run = tmp_path / "clean", tmp_path / "run"
    ref = _cli([*args, "--out", str(clean)], tmp_path / "clean.log")  # runs alongside the killed one
    proc = _cli([*args, "--out", str(run)], tmp_path / "run.log")
    try:
        # Kill once a checkpoint exists and at least two steps past it are logged.
        def past_checkpoint():
            latest, steps = _latest_step(run), _logged_steps(run)
            return latest is not None and steps and max(steps) >= latest + 2

        _wait(past_checkpoint, proc, tmp_path / "run.log", "a checkpoint and two more steps")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(proc)
    latest = _latest_step(run)
    assert not (run / "summary.json").exists() and latest < STEPS
    assert max(_logged_steps(run)) > latest  # steps the resumed run will log again

    # What a kill inside save_checkpoint / the metrics writer leaves: a temporary checkpoint directory
    # with truncated files, a half-written `latest` replacement, a half-written metrics row.
    ck = run / "checkpoints"
    good = ck / f"step_{latest:08d}"
    half = ck / f".step_{latest + CKPT_EVERY:08d}.tmp-99999"
    half.mkdir()
    (half / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    (half / "optim.pt").write_bytes((good / "optim.pt").read_bytes()[:50])
    (ck / "latest.tmp-99999").write_text(f"step_{latest + CKPT_EVERY:08d}")
    with open(run / "metrics.csv", "a") as f:
        f.write(f"{STEPS - 1},0,0.00")

    proc = _cli([*args, "--out", str(run), "--resume"], tmp_path / "resume.log")
    try:
        assert proc.wait(timeout=300) == 0, _tail(tmp_path / "resume.log")
        assert ref.wait(timeout=300) == 0, _tail(tmp_path / "clean.log")
    finally:
        _reap(proc)
        _reap(ref)
    assert f"trained {STEPS - latest} steps" in (tmp_path / "resume.log").read_text()
    cols = ("step", "epoch", "lr", "grad_norm", "loss")
    want = [{k: r[k] for k in cols} for r in _metrics(clean)]
    got = [{k: r[k] for k in cols} for r in _metrics(run)]
    assert [int(r["step"]) for r in got] == list(range(1, STEPS + 1))  # each step once
    assert got == want
    a = load_file(str(clean / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))
    b = load_file(str(ck / f"step_{STEPS:08d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
