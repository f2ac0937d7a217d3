"""Extraction as overlapped stages (teacher_cache/extract/pipeline.py): the cache's bytes never depend on the
number of decode threads, and a failing stage fails its shard by name and leaves no thread behind."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.extract import run_extract
from teacher_cache.prepare import WdsConfig, prepare_wds
from teacher_cache.shards import RawSample, write_tar_shards
from teacher_cache.views import AugConfig
from tests.test_extract import _chunk_bytes

TEACHERS = (
    TeacherConfig("random-vit:32/8", group="vit"),  # tokens + cls
    TeacherConfig("kmeans:random-vit:32/8", group="codes", codebook_size=8, fit_samples=8),  # integer codes
)


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """20 JPEGs of varied sizes in 2 shards, with a truncated, an empty and an image-less sample, and two
    bad rows side by side so that one chunk of 2 rows holds no decodable image at all."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(20):
        w, h = int(rng.integers(34, 70)), int(rng.integers(34, 70))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
        samples.append(RawSample(f"k{i:03d}", {"jpg": buf.getvalue(), "cls": str(i % 3).encode()}))
    samples[3] = RawSample("k003", {"jpg": samples[3].files["jpg"][:300], "cls": b"0"})  # truncated
    samples[12] = RawSample("k012", {"jpg": b"", "cls": b"0"})  # rows 12, 13: one whole chunk of 2 rows
    samples[13] = RawSample("k013", {"txt": b"no image"})
    root = tmp_path_factory.mktemp("mixed")
    write_tar_shards(samples, str(root / "raw"), shard_size=10)
    prepare_wds(WdsConfig(pattern=str(root / "raw" / "*.tar"), out=str(root / "ds")))
    return str(root / "ds")


def _cfg(ds: str, out, decode_threads: int, teachers=TEACHERS, **kw) -> ExtractConfig:
    kw.setdefault("executor", "local")
    return ExtractConfig(
        shards=ds,
        out=str(out),
        teachers=teachers,
        aug=AugConfig(views=2),
        # chunks of 2 rows, batches of 3 views: batches straddle rows, chunks straddle batches
        storage=StorageConfig(dtype="int8", chunk_rows=2),
        batch_size=3,
        decode_threads=decode_threads,
        **kw,
    )


def _records(cache: str, group: str) -> dict[str, dict]:
    root = zarr.open_group(cache, mode="r")
    out = {}
    for sid, g in root[group].groups():
        rec = dict(g.attrs["complete"])
        rec.pop("seconds")  # the one field that is a measurement
        out[sid] = rec
    return out


def _extract_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("extract-")]


def test_cache_bytes_do_not_depend_on_decode_threads(mixed_dataset, tmp_path):
    """1 decode thread and 1 shard at a time vs 4 decode threads and 2 shards in flight: the same bytes."""
    one = run_extract(_cfg(mixed_dataset, tmp_path / "one", 1), progress=False)
    many = run_extract(_cfg(mixed_dataset, tmp_path / "many", 4, shards_in_flight=2), progress=False)
    assert one.ok and many.ok, (one.table(), many.table())
    assert (one.tokenizers[0].samples, one.tokenizers[0].valid) == (20, 17)
    for group in ("vit", "codes"):
        a, b = _chunk_bytes(str(tmp_path / "one"), group), _chunk_bytes(str(tmp_path / "many"), group)
        # schema 2: a few objects per shard group (one per view per target array + metadata), 2 shards
        assert a.keys() == b.keys() and len(a) >= 12
        assert [k for k in a if a[k] != b[k]] == []
        assert _records(str(tmp_path / "one"), group) == _records(str(tmp_path / "many"), group)
    # The all-bad chunk is written (zeros), and its rows are invalid; the others hold tokens.
    g = zarr.open_group(str(tmp_path / "many"), mode="r")["vit"]
    sid = sorted(g.group_keys())[1]
    assert not g[sid]["valid"][2:4].any() and g[sid]["valid"][[0, 1, 4, 5]].all()
    assert not g[sid]["tokens"][2:4].any() and g[sid]["tokens"][4:6].any()
    assert _extract_threads() == []


def test_a_failing_writer_fails_its_shard_by_name_and_leaves_no_thread(mixed_dataset, tmp_path, monkeypatch):
    import teacher_cache.extract.worker as worker

    real, calls = worker.write_rows, []

    def flaky(g, lo, *a, **k):
        calls.append(lo)
        if len(calls) == 3:  # the third chunk of the run: mid-shard
            raise OSError(28, "No space left on device")
        return real(g, lo, *a, **k)

    monkeypatch.setattr(worker, "write_rows", flaky)
    teachers = TEACHERS[:1]
    summary = run_extract(_cfg(mixed_dataset, tmp_path / "c", 3, teachers), progress=False)
    assert [f["shard"].rsplit("/", 1)[-1] for f in summary.failed] == ["shard-000000.tar"]
    assert "No space left on device" in summary.failed[0]["error"]
    assert "writing" in summary.failed[0]["error"] and "/vit/" in summary.failed[0]["error"]
    assert _extract_threads() == []
    # A re-run redoes only that shard, and the cache equals one made without the fault.
    monkeypatch.setattr(worker, "write_rows", real)
    again = run_extract(_cfg(mixed_dataset, tmp_path / "c", 3, teachers), progress=False)
    assert again.ok and again.tokenizers[0].shards_done == 1
    run_extract(_cfg(mixed_dataset, tmp_path / "clean", 1, teachers), progress=False)
    assert _chunk_bytes(str(tmp_path / "c"), "vit") == _chunk_bytes(str(tmp_path / "clean"), "vit")


def test_a_failing_teacher_or_decoder_fails_the_shard_and_stops_every_stage(mixed_dataset, tmp_path, monkeypatch):
    import teacher_cache.extract.pipeline as pipeline

    def broken(*a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(pipeline, "replay_view", broken)
    summary = run_extract(_cfg(mixed_dataset, tmp_path / "c", 2, TEACHERS[:1]), progress=False)
    assert len(summary.failed) == 2 and all("decoder exploded" in f["error"] for f in summary.failed)
    assert _extract_threads() == []
    root = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert not any("complete" in g.attrs for _, g in root["vit"].groups())  # nothing marked complete


def test_pipeline_options_are_checked_before_work(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="decode_threads must be >= 1"):
        _cfg(tiny_dataset, tmp_path / "c", 0)
    with pytest.raises(ValueError, match="shards_in_flight must be >= 1"):
        _cfg(tiny_dataset, tmp_path / "c", 1, shards_in_flight=0)
    with pytest.raises(ValueError, match="decode_processes must be >= 0"):
        _cfg(tiny_dataset, tmp_path / "c", 1, decode_processes=-1)
    with pytest.raises(ValueError, match="autocast 'bf16' needs a CUDA device"):
        ExtractConfig(shards=tiny_dataset, out=str(tmp_path), teachers=TEACHERS, device="cpu", autocast="bf16")
    if not torch.cuda.is_available():  # device "auto" resolves to the CPU: refused before any work
        with pytest.raises(ValueError, match="autocast 'fp16' needs a CUDA device and none is available"):
            run_extract(ExtractConfig(shards=tiny_dataset, out=str(tmp_path / "a"), teachers=TEACHERS, autocast="fp16"))
        assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="autocast must be one of none, bf16, fp16"):
        ExtractConfig(shards=tiny_dataset, out=str(tmp_path), teachers=TEACHERS, autocast="fp8")


@pytest.mark.slow
def test_ray_workers_with_shards_in_flight_write_the_same_bytes(mixed_dataset, tmp_path, ray_session):
    """Threaded Ray actors (two shards at once each) write what one local thread writes."""
    ray_cfg = _cfg(mixed_dataset, tmp_path / "ray", 2, TEACHERS[:1], executor="ray", workers=1, shards_in_flight=2)
    assert run_extract(ray_cfg, progress=False).ok
    assert run_extract(_cfg(mixed_dataset, tmp_path / "local", 1, TEACHERS[:1]), progress=False).ok
    assert _chunk_bytes(str(tmp_path / "ray"), "vit") == _chunk_bytes(str(tmp_path / "local"), "vit")
    assert _records(str(tmp_path / "ray"), "vit") == _records(str(tmp_path / "local"), "vit")


def _decode_children() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.is_alive()]


def test_decode_processes_write_the_same_bytes_and_survive_a_killed_process(mixed_dataset, tmp_path):
    """Decoding in spawned processes (shared by two shards in flight) writes what one thread writes; a
    SIGKILLed decode process fails the shard it was decoding — nothing marked complete — and the worker
    starts a fresh pool for the next shard, which then completes with the same bytes."""
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from teacher_cache.dataset import load_dataset
    from teacher_cache.extract.plan import ShardJob
    from teacher_cache.extract.worker import Worker, extract_shard
    from teacher_cache.teachers import build_teacher

    teachers = TEACHERS[:1]
    one = run_extract(_cfg(mixed_dataset, tmp_path / "one", 1, teachers), progress=False)
    cfg = _cfg(mixed_dataset, tmp_path / "procs", 1, teachers, decode_processes=2, shards_in_flight=2)
    procs = run_extract(cfg, progress=False)
    assert one.ok and procs.ok, (one.table(), procs.table())
    assert _chunk_bytes(str(tmp_path / "one"), "vit") == _chunk_bytes(str(tmp_path / "procs"), "vit")
    assert _records(str(tmp_path / "one"), "vit") == _records(str(tmp_path / "procs"), "vit")
    assert _decode_children() == [] and _extract_threads() == []  # the worker closed its pool

    cache = str(tmp_path / "procs")
    group = zarr.open_group(cache, mode="r+")["vit"]
    sid = sorted(group.group_keys())[0]
    del group[sid].attrs["complete"]  # the shard is to be extracted again
    ds = load_dataset(mixed_dataset)
    job = ShardJob(
        os.path.abspath(mixed_dataset), ds.shards[0], sid, cache, "vit", cfg.aug, cfg.storage, cfg.batch_size,
        decode_threads=1, decode_processes=2,
    )  # fmt: skip
    worker = Worker({"vit": teachers[0]}, {}, "cpu", 1)
    try:
        pool = worker.decode_pool(2)
        assert not pool.broken  # (starts its processes)
        victim = next(iter(pool.executor._processes.values()))
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        with pytest.raises(BrokenProcessPool):
            extract_shard(job, build_teacher(teachers[0]), torch.device("cpu"), ds, pool)
        assert "complete" not in zarr.open_group(cache, mode="r")["vit"][sid].attrs
        assert _extract_threads() == []
        result = worker.run(job)  # a fresh pool
        assert result.error == "" and (result.rows, result.valid) == (10, 9), result.error
        assert worker.decode_pool(2) is not pool
    finally:
        worker.close()
    assert _chunk_bytes(cache, "vit") == _chunk_bytes(str(tmp_path / "one"), "vit")
    assert _decode_children() == []


@pytest.mark.slow
def test_decode_processes_exit_when_their_worker_is_killed(tmp_path):
    """A SIGKILLed extraction worker (a lost Ray actor) leaves no decode process behind. The worker is a
    script read from stdin: its decode processes start without re-importing it (there is no file to
    import; a Ray worker's entry point or a script without a main guard must not run again either)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "from teacher_cache.extract.pipeline import DecodePool\n"
        "p = DecodePool(2)\n"
        "assert not p.broken\n"
        "print(' '.join(str(q.pid) for q in p.executor._processes.values()), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    parent = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    parent.stdin.write(code)
    parent.stdin.close()
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            with open(f"/proc/{pid}/stat") as f:  # an exited child not yet reaped by init is a zombie
                return f.read().split(")")[-1].split()[0] != "Z"

        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids)
    finally:
        parent.kill()


def test_a_shard_grown_past_its_manifest_fails_by_name(tmp_path):
    """A sample appended to a tar after prepare: its rows would no longer describe the file, so extraction
    refuses the shard (the stream is read to its end), and extracts the other one."""
    import tarfile

    rng = np.random.default_rng(1)
    samples = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
        samples.append(RawSample(f"k{i:03d}", {"jpg": buf.getvalue(), "cls": b"0"}))
    write_tar_shards(samples, str(tmp_path / "raw"), shard_size=4)
    prepare_wds(WdsConfig(pattern=str(tmp_path / "raw" / "*.tar"), out=str(tmp_path / "ds")))
    from teacher_cache.dataset import load_dataset

    grown = load_dataset(str(tmp_path / "ds")).shard_url(load_dataset(str(tmp_path / "ds")).shards[0])
    with tarfile.open(grown, "a") as tar:
        data = samples[0].files["jpg"]
        info = tarfile.TarInfo("extra.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    summary = run_extract(_cfg(str(tmp_path / "ds"), tmp_path / "c", 2, TEACHERS[:1]), progress=False)
    assert [f["shard"].rsplit("/", 1)[-1] for f in summary.failed] == [grown.rsplit("/", 1)[-1]]
    assert "more samples than the manifest" in summary.failed[0]["error"]
    assert summary.tokenizers[0].shards_done == 1 and _extract_threads() == []


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "fp32"])
def test_outputs_narrowed_before_the_copy_store_the_same_bytes(dtype):
    """``Forward`` narrows float outputs to the storage dtype where the teacher ran (half the bytes off a GPU):
    what the store then encodes is bit-identical to encoding the float32 outputs."""
    from teacher_cache.extract.pipeline import Forward
    from teacher_cache.store import encode_block
    from teacher_cache.teachers import build_teacher

    teacher = build_teacher(TeacherConfig("random-vit:32/8"))
    views = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    wide = Forward(teacher, torch.device("cpu"))(views)
    narrow = Forward(teacher, torch.device("cpu"), store_dtype=dtype)(views)
    assert wide[0].dtype == torch.float32
    assert narrow[0].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype, torch.float32)
    for w, n in zip(wide, narrow):
        (a, sa), (b, sb) = encode_block(w, dtype), encode_block(n, dtype)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        assert (sa is None and sb is None) or np.array_equal(sa, sb)


def test_batches_capped_by_the_write_block_are_named(tiny_dataset, tmp_path, capsys):
    """A batch never spans two write blocks: a batch_size above chunk_rows x views gets a note saying so."""
    run_extract(
        ExtractConfig(
            shards=tiny_dataset,
            out=str(tmp_path / "c"),
            teachers=(TeacherConfig("pixel:32/8"),),
            aug=AugConfig(views=2),
            storage=StorageConfig(chunk_rows=4),
            batch_size=32,
            executor="local",
        ),
        progress=False,
    )
    err = capsys.readouterr().err
    assert "at most chunk_rows x views = 4 x 2 = 8 views" in err and "raise --chunk-rows to 16" in err
