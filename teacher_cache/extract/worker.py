"""Per-shard extraction: :func:`extract_shard` is the unit of work; :class:`Worker` runs it in-process or as
a Ray actor, building each tokenizer's teacher once.

A shard group is complete only when its ``complete`` attribute exists, and that attribute is written
after every array (DESIGN invariant 3). Every chunk is written, even one that holds only fill values:
readers take a missing chunk for damage, never for zeros.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import zarr

from ..config import TeacherConfig
from ..dataset import PreparedDataset, iter_dataset_samples, load_dataset
from ..integrity import source_stamp
from ..runtime import resolve_device
from ..store import ShardLayout, create_shard_group, is_complete, open_writer, stored_bytes, write_rows
from ..teachers import Teacher, build_teacher
from ..views import plan_shard
from .pipeline import Batches, DecodePool, Forward, Writer, run_rows
from .plan import RUN_ONLY, ShardJob, ShardResult, failed

FAULT_PAUSE_ENV = "DIGPT_FAULT_PAUSE"


def run_teacher(teacher: Teacher, views: torch.Tensor, batch_size: int, device: torch.device):
    """The teacher over ``views`` in batches of ``batch_size``; ``(tokens, cls or None)`` on the host.

    The same forward and batching as a shard's extraction (:class:`~.pipeline.Forward`,
    :class:`~.pipeline.Batches`), without autocast or narrowing: full-precision outputs."""
    batches = Batches(Forward(teacher, device), batch_size)
    batches.add(views)
    return batches.finish()


def extract_shard(
    job: ShardJob,
    teacher: Teacher,
    device: torch.device,
    ds: PreparedDataset | None = None,
    decode_pool: DecodePool | None = None,
) -> ShardResult:
    """Extract one shard for one tokenizer: plan its views, run the teacher, write its group. Rows decode
    on ``decode_pool`` when given (the worker's processes), else on ``job.decode_threads`` threads.

    Every chunk is written, even one that holds only fill values (zarr skips those by default, and the
    setting is not stored with the array): readers take a missing chunk for damage, never for zeros."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        return _extract_shard(job, teacher, device, ds, decode_pool)


def _extract_shard(
    job: ShardJob, teacher: Teacher, device: torch.device, ds: PreparedDataset | None, decode_pool: DecodePool | None
) -> ShardResult:
    t0 = time.perf_counter()
    ds = ds or load_dataset(job.dataset)
    rows = ds.rows(job.shard)
    n, k, spec = len(rows["key"]), job.aug.views, teacher.spec
    plan = plan_shard(job.shard, rows["key"], rows["width"], rows["height"], job.aug)
    lay = ShardLayout.for_teacher(n, k, spec, job.storage)
    tok = zarr.open_group(job.cache, mode="r+")[job.group]
    if is_complete(tok, job.sid):  # a retried task whose first attempt finished: a complete shard is never redone
        rec = dict(tok[job.sid].attrs["complete"])
        return ShardResult(job.group, **{f: rec[f] for f in ShardResult.__dataclass_fields__ if f in rec})
    source = source_stamp(ds, job.shard)  # before reading: a change while we read fails the hash check

    # The writer thread creates the group and its metadata while the first rows decode; it then writes
    # each chunk as the teacher finishes it. run_rows returns only once the writer has stopped.
    box: dict[str, Any] = {}

    def create() -> None:
        g = box["g"] = create_shard_group(tok, job.sid, job.shard, lay)
        box["w"] = open_writer(g)  # streams each target array into its per-view objects (store.py)
        g["keys"][:] = np.asarray(rows["key"], dtype=str)
        g["seeds"][:], g["boxes"][:], g["flips"][:] = plan.seeds, plan.boxes, plan.flips

    writer = Writer(
        lambda lo, hi, idx, tokens, cls: write_rows(box["w"], lo, hi, idx, tokens, cls, lay),
        after_first=lambda: fault_pause(job),
    )
    size = spec.input_size
    try:
        valid, bad = run_rows(
            n,
            iter_dataset_samples(ds, job.shard),
            plan.boxes,
            plan.flips,
            size,
            Forward(teacher, device, job.autocast, job.storage.dtype),
            writer.start(create),
            job.storage.chunk_rows,
            job.batch_size,
            job.decode_threads,
            decode_pool,
        )
        box["w"].close()  # every object is published before the shard is marked complete
    except BaseException:
        if "w" in box:  # drop the spooled, unpublished objects; the group is redone by the next run
            box["w"].abort()
        raise
    g = box["g"]
    skipped = [{"shard": job.shard, "key": rows["key"][i], "reason": reason} for i, reason in bad]
    g["valid"][:] = valid
    result = ShardResult(
        job.group,
        job.shard,
        n,
        int(valid.sum()),
        int(valid.sum()) * k,
        time.perf_counter() - t0,
        stored_bytes(g),
        skipped,
    )
    record = {k_: v for k_, v in asdict(result).items() if k_ not in RUN_ONLY}
    g.attrs["complete"] = {**record, "source": source}  # written last
    return result


def fault_pause(job: ShardJob) -> None:
    """Test-only hook (tests/test_faults.py); inert unless ``DIGPT_FAULT_PAUSE`` names a directory.

    The first time a (tokenizer, shard) has written its first chunk, the process writing it records
    its pid in ``DIR/<group>.<sid>.pid`` and waits (at most 120 s) for ``DIR/<group>.<sid>.go``, so a
    test can SIGKILL that worker or driver mid-shard, at a chosen point. A retry of the same shard
    finds the pid file and does not wait."""
    d = os.environ.get(FAULT_PAUSE_ENV)
    if not d:
        return
    base = os.path.join(d, f"{job.group}.{job.sid}")
    try:
        fd = os.open(base + ".pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    deadline = time.monotonic() + 120
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)


class Worker:
    """Builds each tokenizer's teacher once, then extracts shards. Runs in-process or as a Ray actor."""

    def __init__(
        self, teachers: dict[str, TeacherConfig], fitted: dict[str, np.ndarray], device: str, threads: int | None
    ):
        if threads:
            torch.set_num_threads(threads)
        self.cfgs, self.fitted = teachers, fitted
        self.device = resolve_device(device)
        self.teachers: dict[str, Teacher] = {}
        self.datasets: dict[str, PreparedDataset] = {}
        self._lock = threading.Lock()
        # Shards in flight at once each enter extract_shard's zarr config context; set here for the whole
        # worker, their contexts restore this value instead of zarr's default. (A Ray actor's process is
        # this worker's alone; the local executor restores the default when its run ends.)
        self._config = zarr.config.set({"array.write_empty_chunks": True})
        self._decode_pool: DecodePool | None = None

    def close(self) -> None:
        """Stop the decode processes; give zarr's process-wide config back (the local executor, in the
        caller's process)."""
        if self._decode_pool is not None:
            self._decode_pool.close()
            self._decode_pool = None
        self._config.__exit__(None, None, None)

    def decode_pool(self, processes: int) -> DecodePool | None:
        """The worker's decode processes, started on first use and again after one of them died (a
        broken pool fails the shard it was decoding, never the shards after it)."""
        if processes < 1:
            return None
        with self._lock:
            pool = self._decode_pool
            if pool is None or pool.broken or pool.processes != processes:
                if pool is not None:
                    pool.close()
                pool = self._decode_pool = DecodePool(processes)
            return pool

    def run(self, job: ShardJob) -> ShardResult:
        try:
            result = self._run(job)
        except Exception as e:  # one broken shard must not take the others down; it is reported
            import traceback

            at = ""
            if isinstance(e, OSError) and not e.filename:  # zarr's store drops the path: name the shard group
                at = f" (writing {job.cache.rstrip('/')}/{job.group}/{job.sid})"
            result = failed(job, f"{type(e).__name__}: {e}{at}\n{traceback.format_exc()}")
        result.node, result.host = where()
        return result

    def _run(self, job: ShardJob) -> ShardResult:
        with self._lock:  # shards in flight at once share one teacher per tokenizer and one dataset reader
            if job.group not in self.teachers:
                t = build_teacher(self.cfgs[job.group], self.fitted.get(job.group))
                self.teachers[job.group] = t.to(self.device)
            if job.dataset not in self.datasets:
                self.datasets[job.dataset] = load_dataset(job.dataset)
        pool = self.decode_pool(job.decode_processes)
        return extract_shard(job, self.teachers[job.group], self.device, self.datasets[job.dataset], pool)


def where() -> tuple[str, str]:
    """(Ray node id, host name) of this process; node ``local`` outside Ray."""
    import socket
    import sys

    ray = sys.modules.get("ray")  # never imported by the local executor: do not pay for it there
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
    return node, socket.gethostname()
