"""``run_extract``: build the teachers, take the cache's writer lock, fit what needs fitting, hand the
shards out (in-process or to a pool of Ray actors) and report.

One job per (tokenizer, shard). On Ray each worker is an actor that builds every teacher once and
processes whole shards; the ``local`` executor runs the same :class:`~.worker.Worker` in-process.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np

from ..config import ExtractConfig, TeacherConfig
from ..dataset import PreparedDataset, load_dataset
from ..lock import WriterLock, foreign_out
from ..runtime import progress_bar, resolve_device
from ..teachers import Teacher
from .plan import ShardJob, ShardResult, failed, plan_workers, shard_jobs
from .summary import ExtractSummary, summarize
from .tokenizers import build_configured, init_root, init_tokenizers
from .worker import Worker


def run_extract(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every configured tokenizer; skip complete shards, redo incomplete ones."""
    t_start = time.perf_counter()
    ds = load_dataset(cfg.shards)
    device = resolve_device(cfg.device)
    if cfg.autocast != "none" and device.type != "cuda":  # device "auto" on a machine without CUDA
        raise ValueError(f"autocast {cfg.autocast!r} needs a CUDA device and none is available; use autocast 'none'")
    largest = cfg.storage.chunk_rows * cfg.aug.views
    if cfg.batch_size > largest:  # batches never span two write blocks (a cache's bytes stay timing-free)
        print(
            f"note: the teacher's batches hold at most chunk_rows x views = {cfg.storage.chunk_rows} x "
            f"{cfg.aug.views} = {largest} views, fewer than batch_size {cfg.batch_size}; raise --chunk-rows to "
            f"{-(-cfg.batch_size // cfg.aug.views)} for full batches (BENCHMARKS.md: GPU acceptance)",
            file=sys.stderr,
        )
    # Every teacher (a fitted one: its base) is built before the lock: bad configuration fails first.
    teachers, bases = build_configured(cfg)
    if foreign_out(cfg.out):  # before the lock creates anything inside it
        raise ValueError(f"out {cfg.out} exists and is not a digpt cache (nor empty); choose another --out")
    try:
        lock = WriterLock(cfg.out)
        lock.acquire()
    except OSError as e:  # read-only or missing parent: one line naming the path
        raise ValueError(
            f"cannot write the cache at {cfg.out}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        ) from None
    try:
        root = init_root(cfg, ds)
        fitted = init_tokenizers(cfg, root, ds, device, teachers, bases)
        jobs, already, changed = shard_jobs(cfg, ds, root)
        t_exec = time.perf_counter()
        results = _execute(cfg, jobs, teachers, fitted, ds, progress)
        exec_seconds = time.perf_counter() - t_exec
        return summarize(cfg, root, results, already, exec_seconds, time.perf_counter() - t_start, changed)
    finally:
        lock.release()


def _execute(
    cfg: ExtractConfig,
    jobs: list[ShardJob],
    teachers: dict[str, Teacher],
    fitted: dict[str, np.ndarray],
    ds: PreparedDataset,
    progress: bool,
) -> list[ShardResult]:
    if not jobs:
        return []
    total = sum(len(ds.rows(j.shard)["key"]) for j in jobs)
    bar = progress_bar(total=total, desc="extract", unit="img", disable=not progress)
    results: list[ShardResult] = []

    def done(r: ShardResult) -> None:
        results.append(r)
        bar.update(r.rows or len(ds.rows(r.shard)["key"]))
        bar.set_postfix(shards=f"{len(results)}/{len(jobs)}", skipped=sum(len(x.skipped) for x in results))

    cfgs = {tc.group_name: tc for tc in cfg.teachers}
    workers, threads, gpus = plan_workers(cfg, len(jobs))
    if cfg.executor == "local":
        w = Worker(cfgs, fitted, cfg.device, threads)
        w.teachers.update({k: t.to(w.device) for k, t in teachers.items()})  # reuse the driver's models
        w.datasets[os.path.abspath(ds.root)] = ds
        try:
            with ThreadPoolExecutor(cfg.shards_in_flight, thread_name_prefix="extract-shard") as pool:
                # At most shards_in_flight shards run at once, started in job order.
                for fut in as_completed([pool.submit(w.run, job) for job in jobs]):
                    r = fut.result()
                    r.node = "local"  # (even when a Ray session exists in this process: the driver did the work)
                    done(r)
        finally:
            w.close()
    else:
        _run_ray(cfg, jobs, cfgs, fitted, workers, threads, gpus, done)
    bar.close()
    return results


def _run_ray(
    cfg: ExtractConfig,
    jobs: list[ShardJob],
    cfgs: dict[str, TeacherConfig],
    fitted: dict[str, np.ndarray],
    workers: int,
    threads: int | None,
    gpus: float,
    done: Callable[[ShardResult], None],
) -> None:
    import ray

    from ..ray_utils import ensure_ray

    ensure_ray(cfg.ray_address)
    if cfg.ray_address and cfg.workers is None:
        # Joining a cluster: the default is one worker per GPU (or per `threads` CPUs) of the whole
        # cluster, not of the machine the driver happens to run on.
        res = ray.cluster_resources()
        workers = max(1, int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 1) // (threads or 1)))
    # Ray runs a task at least once: an actor that dies is restarted and its task retried. Retrying a
    # shard is safe because extract_shard recreates the shard group before writing it. An actor whose
    # node is lost is restarted on another node, which needs a free slot there: so an actor that comes
    # back idle with nothing left to hand out is killed at once, giving its slot to such a restart
    # (otherwise the retried shard would wait forever for a slot held by an idle actor).
    # Each actor runs up to shards_in_flight shards at once (a threaded actor: max_concurrency).
    actor_cls = ray.remote(
        num_cpus=threads or 1,
        num_gpus=gpus,
        max_restarts=3,
        max_task_retries=3,
        max_concurrency=cfg.shards_in_flight,
    )(Worker)
    actors = [actor_cls.remote(cfgs, fitted, cfg.device, threads) for _ in range(min(workers, len(jobs)))]
    pending = list(jobs)
    inflight: dict[Any, tuple[Any, ShardJob]] = {}
    for _ in range(cfg.shards_in_flight):
        for a in actors:
            if pending:
                job = pending.pop(0)
                inflight[a.run.remote(job)] = (a, job)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, job = inflight.pop(ready[0])
        try:
            done(ray.get(ready[0]))
        except ray.exceptions.RayActorError as e:  # restarts used up (a node lost for good): named, re-runnable
            done(failed(job, f"worker lost: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            actor = None
        if pending and actor is not None:
            job = pending.pop(0)
            inflight[actor.run.remote(job)] = (actor, job)
        elif actor is not None and not any(a is actor for a, _ in inflight.values()):
            ray.kill(actor)
    for job in pending:  # every worker was lost before these could be handed out
        done(failed(job, "not run: every Ray worker was lost"))
    for a in actors:
        ray.kill(a)
