"""Cache integrity and run safety (issue 10, DESIGN invariant 7): a damaged or mismatched cache never
trains quietly, one run writes a cache at a time, and a run directory is never overwritten.

Each test damages a real cache or run on disk (flipped, truncated or deleted chunk files, swapped
shard folders, a tar whose image was replaced, a truncated checkpoint, a live or dead lock holder)
and checks the error names what is wrong; every one of these passed silently before.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from student.checkpoint import TrainState, save_checkpoint
from student.data import CacheJoin, DataConfig
from student.objectives import StudentConfig
from student.train import OptimConfig, TrainConfig, train
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import ShardJob, extract_shard, run_extract
from teacher_cache.integrity import CacheIntegrityError
from teacher_cache.lock import CacheLocked, lock_path
from teacher_cache.store import open_root, open_shard, shard_ids
from teacher_cache.verify import VerifyConfig, run_verify
from teacher_cache.views import AugConfig

REPO = Path(__file__).resolve().parents[1]
GROUP = "vit"
CHUNK = 4  # 16 rows per shard, written 4 rows at a time


def _extract_cfg(ds: str, out: Path) -> ExtractConfig:
    return ExtractConfig(
        shards=ds,
        out=str(out),
        executor="local",
        batch_size=8,
        device="cpu",
        teachers=(TeacherConfig("random-vit:32/8", group=GROUP),),
        aug=AugConfig(views=2, seed=0),
        storage=StorageConfig(dtype="fp16", chunk_rows=CHUNK),
    )


@pytest.fixture(scope="module")
def dataset(tiny_dataset, tmp_path_factory) -> str:
    """A private copy of the tiny dataset: tests here rewrite its tars."""
    out = tmp_path_factory.mktemp("integrity") / "ds"
    shutil.copytree(tiny_dataset, out)
    return str(out)


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "cache"
    assert run_extract(_extract_cfg(dataset, out), progress=False).ok
    return out


@pytest.fixture
def cache(clean, tmp_path) -> Path:
    """A fresh copy of the clean cache for a test to damage."""
    out = tmp_path / "cache"
    shutil.copytree(clean, out)
    return out


def _sid(ds: str, i: int = 0) -> str:
    d = load_dataset(ds)
    return shard_ids(d.shards)[d.shards[i]]


def _chunk(cache: Path, ds: str, array: str, key: str = "c/0/0/0/0", shard: int = 0) -> Path:
    """A stored object: a target array's object of one view (``c/0/<view>/...``), or a metadata array's chunk."""
    return cache / GROUP / _sid(ds, shard) / array / key


def _inner(path: Path, row: int, rows: int = 16) -> tuple[int, int]:
    """Byte range of one row's inner chunk in a target array's object (from the shard index at its end)."""
    data = path.read_bytes()
    index = np.frombuffer(data[-(16 * rows + 4) : -4], dtype="<u8").reshape(rows, 2)
    return int(index[row, 0]), int(index[row, 0] + index[row, 1])


def _verify(ds: str, cache: Path, full: bool = False):
    return run_verify(VerifyConfig(shards=ds, cache=str(cache), spot_checks=0, device="cpu", full=full), progress=False)


def _failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}


def _train_cfg(ds: str, cache: Path, out: Path, **kw) -> TrainConfig:
    data = {
        "shards": ds,
        "cache": str(cache),
        "tokenizer": GROUP,
        "img_size": 32,
        "batch_size": 8,
        "shuffle_buffer": 0,
        "num_workers": 0,
        **kw.pop("data", {}),
    }
    kw.setdefault("steps", 2)
    kw.setdefault("optim", OptimConfig(base_lr=1e-3, warmup=0.1))
    return TrainConfig(
        data=DataConfig(**data), out=str(out), student=StudentConfig("tiny-test"), log_every=1, device="cpu", **kw
    )


# ---------------------------------------------------------------------------------------------
# checksums and missing chunks


def test_flipped_bytes_in_a_token_chunk_are_named(dataset, cache, tmp_path):
    """8 bytes flipped inside row 5's token chunk (both views' objects): verify fails 'chunks intact' naming
    array, shard, object, row and view; reading the row raises the same; training stops before using it.
    (Before: `cache OK`, trains.)"""
    for view in (1, 0):
        path = _chunk(cache, dataset, "tokens", f"c/0/{view}/0/0")
        data = bytearray(path.read_bytes())
        lo, hi = _inner(path, 5)
        mid = (lo + hi) // 2
        data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
        path.write_bytes(bytes(data))
    failed = _failed(_verify(dataset, cache))
    assert set(failed) == {"chunks intact"}, failed
    assert "c/0/0/0/0" in failed["chunks intact"] and "'tokens'" in failed["chunks intact"]
    assert "shard-000000" in failed["chunks intact"] and "row 5, view 0" in failed["chunks intact"]
    root = open_root(str(cache))
    targets = open_shard(root, GROUP, _sid(dataset))
    targets.tokens(slice(0, 5))  # the neighbouring rows are fine
    targets.tokens(slice(6, 16))
    with pytest.raises(CacheIntegrityError, match=r"corrupt chunk c/0/0/0/0 of array 'tokens'.*shard-000000.*row 5"):
        targets.tokens(slice(4, 8))
    with pytest.raises(CacheIntegrityError, match="corrupt chunk c/0/[01]/0/0 of array 'tokens'.*row 5"):
        train(_train_cfg(dataset, cache, tmp_path / "run", steps=6), progress=False)


def test_truncated_chunk_is_named_not_a_blosc_traceback(dataset, cache):
    path = _chunk(cache, dataset, "cls", "c/0/1/0")
    path.write_bytes(path.read_bytes()[:-7])
    failed = _failed(_verify(dataset, cache))
    assert "c/0/1/0" in failed["chunks intact"] and "'cls'" in failed["chunks intact"]
    with pytest.raises(CacheIntegrityError, match="corrupt chunk c/0/1/0 of array 'cls'.*shard index"):
        open_shard(open_root(str(cache)), GROUP, _sid(dataset)).cls(slice(0, 16))


@pytest.mark.parametrize("array,key", [("tokens", "c/0/1/0/0"), ("cls", "c/0/0/0"), ("valid", "c/0")])
def test_chunk_deleted_from_a_complete_shard_is_an_error_not_fill_values(dataset, cache, tmp_path, array, key):
    """(Before: verify `cache OK`; train read zeros, or dropped the rows whose `valid` chunk vanished.)"""
    _chunk(cache, dataset, array, key, shard=1).unlink()
    failed = _failed(_verify(dataset, cache))
    assert f"{array}/{key}" in failed["chunks intact"] and "missing" in failed["chunks intact"], failed
    with pytest.raises(CacheIntegrityError, match=f"shard-000001.tar: .*missing.*{array}/{key}"):
        CacheJoin(_train_cfg(dataset, cache, tmp_path / "run").data)


def test_old_cache_without_checksums_reads_with_one_warning_and_valid_count_still_checked(dataset, cache, capsys):
    """A cache written before checksums (no `integrity` attribute, all-False chunks not written) is
    still read, with one warning line; a `valid` chunk lost from it is still caught by the count."""
    sid = _sid(dataset, 2)
    meta_path = cache / GROUP / sid / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for s in load_dataset(dataset).shards:
        p = cache / GROUP / shard_ids(load_dataset(dataset).shards)[s] / "zarr.json"
        m = json.loads(p.read_text())
        m["attributes"]["shard"].pop("integrity")
        p.write_text(json.dumps(m))
    cfg = _train_cfg(dataset, cache, cache.parent / "run")
    CacheJoin(cfg.data)
    CacheJoin(cfg.data)
    err = capsys.readouterr().err
    assert err.count("written without chunk checksums") == 1 and len(err.strip().splitlines()) == 1
    assert meta["attributes"]["complete"]["valid"] == 16
    (cache / GROUP / sid / "valid" / "c" / "0").unlink()  # every row of `valid` now reads as False
    with pytest.raises(
        CacheIntegrityError,
        match=r"shard-000002.tar: valid count 0 differs from the completion "
        r"record's 16",
    ):
        CacheJoin(cfg.data)
    assert "chunks intact" in _failed(_verify(dataset, cache))


def test_verify_full_decodes_every_chunk(dataset, cache):
    ok = _verify(dataset, cache, full=True)
    assert ok.ok, ok.table()
    detail = next(c.detail for c in ok.checks if c.name == "chunks intact")
    assert "chunks decoded, every checksum matches" in detail
    # a damaged `seeds` chunk: the default pass compares the plan arrays and names it; --full as well
    path = _chunk(cache, dataset, "seeds", "c/0/0", shard=2)
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    for full in (False, True):
        failed = _failed(_verify(dataset, cache, full=full))
        assert "'seeds'" in failed["chunks intact"] and "c/0/0" in failed["chunks intact"], failed


def test_swapped_shard_groups_are_refused_by_train(dataset, cache, tmp_path):
    """Two shard folders swapped on disk: every sample would get another image's targets."""
    a, b = cache / GROUP / _sid(dataset, 0), cache / GROUP / _sid(dataset, 1)
    a.rename(tmp_path / "x")
    b.rename(a)
    (tmp_path / "x").rename(b)
    with pytest.raises(
        CacheIntegrityError,
        match=r"shard-000000.tar: group .* was written for shard "
        r"'shard-000001.tar'.*swapped",
    ):
        CacheJoin(_train_cfg(dataset, cache, tmp_path / "run").data)


# ---------------------------------------------------------------------------------------------
# an image changed after extraction


def _members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def _rewrite(tar: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """Replace ``tar`` (atomically) by a tar of ``members``, each member's size set to its payload's."""
    tmp = tar.with_suffix(".new")
    with tarfile.open(tmp, "w") as t:
        for member, payload in members:
            member.size = len(payload)
            t.addfile(member, io.BytesIO(payload))
    os.replace(tmp, tar)


def _replace_image(tar: Path, index: int) -> str:
    """Rewrite ``tar`` with the image of sample ``index`` replaced by its mirror image (same key, same size)."""
    members = _members(tar)
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith((".jpg", ".png"))]
    m, data = members[images[index]]
    img = Image.open(io.BytesIO(data)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if m.name.endswith(".png") else "JPEG", quality=75)
    members[images[index]] = (m, buf.getvalue())
    _rewrite(tar, members)
    return m.name.split(".", 1)[0]


@pytest.fixture
def changed_dataset(dataset, tmp_path) -> tuple[str, str]:
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    key = _replace_image(out / "shard-000001.tar", 5)
    return str(out), key


def test_changed_image_is_refused_by_the_loader_or_counted_and_skipped(changed_dataset, cache, tmp_path):
    """(Before: trained on the new pixels with the old targets.)"""
    ds, key = changed_dataset
    with pytest.raises(CacheIntegrityError, match=f"image shard-000001.tar/{key} differs from the manifest"):
        train(_train_cfg(ds, cache, tmp_path / "a", steps=6), progress=False)
    run = tmp_path / "b"
    res = train(_train_cfg(ds, cache, run, steps=6, data={"on_mismatch": "skip"}), progress=False)
    assert res.steps == 6
    lines = [json.loads(x) for x in (run / "skipped-mismatch.jsonl").read_text().splitlines()]
    assert {(x["shard"], x["key"]) for x in lines} == {("shard-000001.tar", key)}
    with pytest.raises(ValueError, match="on_mismatch"):
        DataConfig(shards=ds, cache=str(cache), on_mismatch="ignore")


def _drop_or_add(tar: Path, change: str) -> str:
    """Rewrite ``tar`` without its sixth sample (``removed``) or with one more at its end (``added``)."""
    members = _members(tar)
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    if change == "removed":
        key = keys[5]
        members = [(m, d) for m, d in members if m.name.split(".", 1)[0] != key]
    else:
        key = "zz-added-later"
        members += [(tarfile.TarInfo(f"{key}.jpg"), members[0][1]), (tarfile.TarInfo(f"{key}.cls"), b"0")]
    _rewrite(tar, members)
    return key


@pytest.mark.parametrize(
    "change, says, reason",
    [
        ("removed", "has cached targets but the shard no longer holds it", "missing from the shard"),
        ("added", "is not in the manifest", "not in the manifest"),
    ],
)
def test_a_sample_gone_or_added_after_prepare_is_refused_or_counted(change, says, reason, dataset, cache, tmp_path):
    """(Before: the loader passed over a vanished sample or an unknown key without a word, so an epoch just
    had fewer samples.)"""
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    key = _drop_or_add(ds / "shard-000001.tar", change)
    with pytest.raises(CacheIntegrityError, match=f"sample shard-000001.tar/{key} {says}"):
        train(_train_cfg(str(ds), cache, tmp_path / "a", steps=6), progress=False)
    run = tmp_path / "b"
    res = train(_train_cfg(str(ds), cache, run, steps=6, data={"on_mismatch": "skip"}), progress=False)
    assert res.steps == 6
    lines = [json.loads(x) for x in (run / "skipped-mismatch.jsonl").read_text().splitlines()]
    assert {(x["shard"], x["key"], x["reason"]) for x in lines} == {("shard-000001.tar", key, reason)}


def test_extract_rerun_names_a_shard_whose_images_changed(changed_dataset, cache):
    """(Before: the re-run skipped the shard as complete.)"""
    ds, key = changed_dataset
    summary = run_extract(_extract_cfg(ds, cache), progress=False)
    assert not summary.ok
    assert [f["shard"] for f in summary.failed] == ["shard-000001.tar"]
    assert key in summary.failed[0]["error"] and "changed since extraction" in summary.failed[0]["error"]
    assert "FAILED shard shard-000001.tar" in summary.table()
    # an unchanged shard that was only touched is re-hashed, found equal, and still skipped as complete
    later = time.time() + 5
    os.utime(Path(ds) / "shard-000000.tar", (later, later))
    again = run_extract(_extract_cfg(ds, cache), progress=False)
    assert [f["shard"] for f in again.failed] == ["shard-000001.tar"]
    assert again.tokenizers[0].shards_skipped_complete == 3 and again.tokenizers[0].shards_done == 0


def test_retried_task_never_rewrites_a_complete_shard(dataset, cache):
    """Ray runs a task at least once: a retry of a shard that already completed returns its record."""
    sid = _sid(dataset)
    chunk = _chunk(cache, dataset, "tokens")
    before = (chunk.stat().st_ino, chunk.stat().st_mtime_ns)
    d = load_dataset(dataset)
    job = ShardJob(
        os.path.abspath(dataset),
        d.shards[0],
        sid,
        str(cache),
        GROUP,
        AugConfig(views=2, seed=0),
        StorageConfig(dtype="fp16", chunk_rows=CHUNK),
        8,
    )
    from teacher_cache.teachers import build_teacher

    result = extract_shard(job, build_teacher(TeacherConfig("random-vit:32/8", group=GROUP)), torch.device("cpu"), d)
    assert result.rows == 16 and not result.error
    assert (chunk.stat().st_ino, chunk.stat().st_mtime_ns) == before


# ---------------------------------------------------------------------------------------------
# one writer per cache


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(cache: Path, **owner) -> None:
    path = Path(lock_path(str(cache)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "host": "node-7",
                "pid": 4242,
                "started": time.time() - 100,
                "heartbeat": time.time(),
                "command": "extract",
                **owner,
            }
        )
    )


def test_live_lock_refuses_a_second_writer_and_stale_locks_are_named_and_taken_over(dataset, cache, capsys):
    import socket

    _write_lock(cache)  # another host, heartbeat now: live
    with pytest.raises(CacheLocked, match=r"being written by another run: pid 4242 on host 'node-7'"):
        run_extract(_extract_cfg(dataset, cache), progress=False)
    _write_lock(cache, heartbeat=time.time() - 3600)  # another host, silent for an hour: stale
    assert run_extract(_extract_cfg(dataset, cache), progress=False).ok
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and "pid 4242 on host 'node-7'" in err and "no heartbeat" in err
    assert not Path(lock_path(str(cache))).exists()  # released at the end
    dead = _dead_pid()
    _write_lock(cache, host=socket.gethostname(), pid=dead)  # this host, process gone: stale at once
    assert run_extract(_extract_cfg(dataset, cache), progress=False).ok
    assert f"pid {dead}" in capsys.readouterr().err


def test_new_cache_never_empties_a_folder(dataset, tmp_path):
    """`--out` a folder with someone's files: refused, nothing created in it, nothing removed."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a digpt cache"):
        run_extract(_extract_cfg(dataset, out), progress=False)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def _cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_extract_runs_on_one_out_never_race(dataset, tmp_path):
    """A run paused mid-shard (real process, `DIGPT_FAULT_PAUSE`) holds the lock; a second `extract`
    into the same --out exits 2 naming the holder, and touches nothing; the first then finishes.
    (Before: the two raced - `KeyError: 'boxes'`, `Directory not empty` - or one deleted the other's shard.)"""
    out, pause = tmp_path / "cache", tmp_path / "pause"
    pause.mkdir()
    args = [
        "extract",
        "--shards",
        dataset,
        "--out",
        str(out),
        "--teacher",
        "random-vit:32/8",
        "--group",
        GROUP,
        "--executor",
        "local",
        "--chunk-rows",
        str(CHUNK),
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    first = _cli(args, tmp_path / "first.log", {"DIGPT_FAULT_PAUSE": str(pause)})
    try:
        deadline = time.monotonic() + 240
        while not list(pause.glob("*.pid")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(pause.glob("*.pid")), (tmp_path / "first.log").read_text()
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        second = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), *args],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=240,
        )
        assert second.returncode == 2, second.stderr
        assert f"being written by another run: pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        for p in pause.glob("*.pid"):
            p.with_suffix(".go").touch()
        for _ in range(3):  # every shard pauses once
            time.sleep(0.5)
            for p in pause.glob("*.pid"):
                p.with_suffix(".go").touch()
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
            first.wait()
    assert _verify(dataset, out).ok


# ---------------------------------------------------------------------------------------------
# runs are never overwritten


def test_existing_run_is_refused_without_resume(dataset, clean, tmp_path):
    """(Before: metrics.csv truncated, the new checkpoint pruned, `latest` dangling.)"""
    run = tmp_path / "run"
    train(_train_cfg(dataset, clean, run, steps=4, ckpt_every=2), progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(_train_cfg(dataset, clean, run, steps=2), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_refuses_another_configuration_naming_fields(dataset, clean, cache, tmp_path):
    run = tmp_path / "run"
    train(_train_cfg(dataset, clean, run, steps=2), progress=False)
    config = (run / "config.json").read_text()
    # another cache of the same shapes (another teacher: its weights fingerprint differs)
    meta = json.loads((cache / GROUP / "zarr.json").read_text())
    meta["attributes"]["tokenizer"]["fingerprint"] = "f" * 64
    (cache / GROUP / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"cache.fingerprint: run has '.*', asked 'ffff"):
        train(_train_cfg(dataset, cache, run, steps=4, resume=True), progress=False)
    with pytest.raises(
        ValueError,
        match=r"2 field\(s\) differ: objective: run has 'digpt', asked 'fd'; "
        r"optim.base_lr",
    ):
        train(
            _train_cfg(
                dataset, clean, run, steps=4, resume=True, objective="fd", optim=OptimConfig(base_lr=2e-3, warmup=0.1)
            ),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"data.batch_size: run has 8, asked 4"):
        train(_train_cfg(dataset, clean, run, steps=4, resume=True, data={"batch_size": 4}), progress=False)
    assert (run / "config.json").read_text() == config  # refused before anything was written
    # more steps (and another worker count, another path to the same cache) is allowed
    res = train(_train_cfg(dataset, clean, run, steps=4, resume=True, data={"num_workers": 1}), progress=False)
    assert [r["step"] for r in res.history] == [3, 4]


def test_pruning_orders_by_step_and_keeps_the_new_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (99_999_998, 99_999_999, 100_000_000):  # 9 digits: name order is no longer step order
        save_checkpoint(str(tmp_path), model, opt, TrainState(step=step), keep=2)
    left = sorted(os.listdir(tmp_path / "checkpoints"))
    assert left == ["latest", "step_100000000", "step_99999999"], left
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_100000000"


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(dataset, clean, tmp_path, capsys):
    run = tmp_path / "run"
    ref = train(_train_cfg(dataset, clean, run, steps=8, ckpt_every=4), progress=False).history
    weights = run / "checkpoints" / "step_00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = train(_train_cfg(dataset, clean, run, steps=8, ckpt_every=4, resume=True), progress=False)
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step_00000008 is unreadable" in out and "falling back" in out
    assert [r["step"] for r in res.history] == [5, 6, 7, 8]
    for x, y in zip(ref[4:], res.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (x, y)
    assert np.isfinite(res.final_loss)
