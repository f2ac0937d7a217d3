"""The unit of work — one shard for one tokenizer — and how a run's work is planned.

:func:`shard_jobs` lists the (tokenizer, shard) pairs still to do (a complete shard is never redone;
one whose tar changed since it was extracted is named); :func:`plan_workers` sizes the pool.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import zarr

from ..config import ExtractConfig, StorageConfig
from ..dataset import PreparedDataset
from ..integrity import changed_since_extraction
from ..runtime import resolve_device
from ..store import is_complete, shard_ids
from ..views import AugConfig


@dataclass(frozen=True)
class ShardJob:
    """Extract ``shard`` (group ``sid``) of the dataset at ``dataset`` into ``cache/group``."""

    dataset: str
    shard: str
    sid: str
    cache: str
    group: str
    aug: AugConfig
    storage: StorageConfig
    batch_size: int
    decode_threads: int = 2
    """Decode/crop threads beside the teacher forward (never changes the bytes written)."""
    decode_processes: int = 0
    """Decode/crop processes of the worker instead of threads (0: threads; never changes the bytes)."""
    autocast: str = "none"
    """``none``, ``bf16`` or ``fp16`` (CUDA only)."""


@dataclass
class ShardResult:
    group: str
    shard: str
    rows: int
    valid: int
    views: int
    seconds: float
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    error: str = ""
    """Non-empty when the shard failed as a whole (left incomplete; a re-run redoes it)."""
    node: str = ""
    """Ray node id of the worker that ran it (``local`` in-process); kept out of the completion record,
    so where a shard ran never changes the cache's bytes."""
    host: str = ""


RUN_ONLY = ("group", "node", "host")
"""ShardResult fields the completion record leaves out."""


def failed(job: ShardJob, error: str) -> ShardResult:
    """The result of a shard that did not run to completion."""
    return ShardResult(job.group, job.shard, 0, 0, 0, 0.0, 0, error=error)


def shard_jobs(
    cfg: ExtractConfig, ds: PreparedDataset, root: zarr.Group
) -> tuple[list[ShardJob], Counter, list[dict[str, str]]]:
    """``(jobs, complete shards per group, shards changed since extraction)`` of this run."""
    sids = shard_ids(ds.shards)
    jobs, already, changed = [], Counter(), []
    # Workers may run in another directory (Ray starts them in its session dir): hand them an absolute path.
    out = cfg.out if "://" in cfg.out else os.path.abspath(cfg.out)
    for tc in cfg.teachers:
        tok = root[tc.group_name]
        for shard in ds.shards:
            if is_complete(tok, sids[shard]):
                why = changed_since_extraction(tok, sids[shard], ds, shard)
                if why:
                    changed.append(
                        {"group": tc.group_name, "shard": shard, "error": f"changed since extraction: {why}"}
                    )
                already[tc.group_name] += 1
            else:
                jobs.append(
                    ShardJob(
                        os.path.abspath(ds.root),
                        shard,
                        sids[shard],
                        out,
                        tc.group_name,
                        cfg.aug,
                        cfg.storage,
                        cfg.batch_size,
                        cfg.decode_threads,
                        cfg.decode_processes,
                        cfg.autocast,
                    )
                )
    return jobs, already, changed


def plan_workers(cfg: ExtractConfig, n_jobs: int) -> tuple[int, int | None, float]:
    """(workers, torch threads per worker, GPUs per worker)."""
    if resolve_device(cfg.device).type == "cuda":
        gpus = max(1, torch.cuda.device_count())
        return cfg.workers or gpus, cfg.threads, 1.0
    cpus = os.cpu_count() or 1
    workers = cfg.workers or max(1, min(n_jobs, cpus // (cfg.threads or 1)))
    return workers, cfg.threads or max(1, cpus // workers), 0.0
