"""The student's loader: stream webdataset image shards, join each sample with its cached targets,
replay the stored view so pixels and targets align, and batch.

It is a pipeline of small stages, each in its own module and testable alone:

* ``student/epoch_plan.py`` — the plan of an epoch (pure: no I/O, no torch): the shard order, its split by
  rank and loader worker, batch counts, the resume point, each sample's view and order seed, the shuffle
  buffer;
* ``student/cache_join.py`` — validated access to the cache (:class:`CacheJoin`), read once per process;
* ``student/samples.py`` — per shard: read the tar and join the manifest (through
  ``teacher_cache.dataset.join_shard``, the join extraction uses) with content-hash checks → pick the view
  → read its stored targets;
* ``student/prefetch.py`` — the thread that runs those a few dozen samples ahead of decoding, and the target
  blocks (one byte range per run of adjacent rows sharing a view, ``teacher_cache/objects.py``);
* ``student/collate.py`` — after batching: replay each crop (checked against its seed) and collate.

:class:`CachedViews` composes them; :class:`DataConfig` says where samples and targets come from.
Shards are read with the project's own tar reader (``teacher_cache.shards.iter_tar_samples``, webdataset's
key convention), the one extraction and ``prepare`` use, so the loader sees exactly the keys the
manifest holds; it costs ~23 µs per two-member sample against tarfile's ~76 µs (BENCHMARKS.md, #12.2).
Targets stay in their stored dtype until a batch is formed (``digpt train``: until its stages widen them
on the device).
"""

from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from student.cache_join import CacheJoin
from student.collate import Collate, stored_targets, widen_targets
from student.config import ON_MISMATCH, DataConfig
from student.epoch_plan import EpochPlan, shuffled_batches
from student.epoch_plan import hash64 as _hash64  # a sample's per-epoch hashes (bench and tests use it)
from student.prefetch import JoinThread
from student.samples import Mismatches, shard_samples

__all__ = [
    "ON_MISMATCH",
    "CacheJoin",
    "CachedViews",
    "DataConfig",
    "_hash64",
    "make_loader",
    "stored_targets",
    "widen_targets",
]


class CachedViews(IterableDataset):
    """Yields whole batches: ``images [B,3,S,S]`` in [0, 1]; ``tokens [B,T,D]`` float targets (code
    teachers: codebook vectors) and ``codes [B,T]`` for code teachers; ``cls [B,D]`` when the
    teacher has one; ``labels [B]``; ``order_seed [B]`` (seeds of per-sample random orders).

    With ``decode_targets=False`` the targets stay in their stored form (``tokens``/``cls`` in fp16, bf16
    or fp32, int8 with ``token_scale``/``cls_scale``; code teachers ``codes`` only) and
    :class:`student.stages.DecodeTargets` makes them float32 on the training device, as ``digpt train``
    does: half the bytes to copy to a GPU, and the conversion (up to 40 µs per sample of EfficientNet
    targets on a CPU core) off the loader.

    Each worker process follows its share of :meth:`epoch_plan` (``student/epoch_plan.py``): its shards through
    the sample stages (``student/samples.py``) in the join thread, a shuffle buffer, then
    :class:`student.collate.Collate` for the batches it does not skip."""

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world: int = 1,
        join: CacheJoin | None = None,
        teacher_size: int | None = None,
        decode_targets: bool = True,
    ):
        """``teacher_size``: also yield ``teacher_images`` — the same views replayed at the teacher's
        resolution — for ``--online-teacher`` runs and the cached-vs-online oracle."""
        self.cfg, self.rank, self.world, self.teacher_size = cfg, rank, world, teacher_size
        self.decode_targets = decode_targets
        self.join = join or CacheJoin(cfg)
        if cfg.fresh_views and not teacher_size:
            # Invariant 1: a view the cache never saw has no stored targets; only an online teacher has them.
            raise ValueError(
                "fresh_views needs the teacher run online (--online-teacher): the cache holds no "
                "targets for views it did not store"
            )
        if cfg.max_views is not None and cfg.max_views > self.join.aug.views:
            raise ValueError(
                f"max_views={cfg.max_views}, but cache {cfg.cache} stores {self.join.aug.views} per sample"
            )
        self.epoch, self.skip = 0, 0
        self._mismatch = Mismatches(cfg.on_mismatch, cfg.mismatch_log)
        self._valid = {s: int(self.join.valid[s].sum()) for s in self.join.ds.shards}
        self.collate = Collate(
            self.join.aug, self.join.info, cfg.img_size, teacher_size, self.join.codebook, decode_targets
        )
        self._check_split()

    def _check_split(self) -> None:
        """Refuses a split that leaves a loader worker without a shard or the epoch without a step."""
        cfg, world, workers = self.cfg, self.world, max(1, self.cfg.num_workers)
        if len(self.join.ds.shards) < world * workers:
            raise ValueError(
                f"{len(self.join.ds.shards)} shard(s) cannot feed {world} rank(s) x "
                f"{workers} worker(s); use fewer workers or re-shard with a smaller --shard-size"
            )
        plan = self.epoch_plan(0)
        if plan.steps() == 0:  # the epoch loop would never take a step
            per_worker = max(n for r in range(world) for n in plan.samples_per_worker(r))
            raise ValueError(
                f"batch_size {cfg.batch_size} is more than the valid samples of a loader worker "
                f"(at most {per_worker}, over {world} rank(s) x {workers} worker(s)); "
                "use a smaller --batch-size or fewer --workers"
            )

    @property
    def mismatched(self) -> int:
        """Samples skipped by ``on_mismatch="skip"`` (this process only)."""
        return self._mismatch.count

    # ----- the deterministic plan of an epoch
    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan for every rank and loader worker (``student/epoch_plan.py``)."""
        cfg = self.cfg
        return EpochPlan(
            tuple(self.join.ds.shards),
            self._valid,
            cfg.seed,
            epoch,
            self.world,
            max(1, cfg.num_workers),
            cfg.batch_size,
            cfg.shuffle_buffer,
        )

    def batches_per_worker(self, epoch: int, rank: int | None = None) -> list[int]:
        return self.epoch_plan(epoch).batches_per_worker(self.rank if rank is None else rank)

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches every rank can deliver this epoch (the minimum over ranks)."""
        return self.epoch_plan(epoch).steps()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Start ``epoch`` at global batch ``skip_batches`` (for exact resume)."""
        self.epoch, self.skip = epoch, skip_batches

    # ----- streaming
    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.epoch_plan(self.epoch)
        share = plan.worker_share(self.rank, physical, self.skip, workers)
        stream = iter(JoinThread(self._raw_samples(share.shards, plan)))
        try:
            bs, sb, rng = self.cfg.batch_size, self.cfg.shuffle_buffer, plan.rng(self.rank, share.worker)
            for batch in shuffled_batches(stream, bs, sb, rng, share.batches, share.skip):
                yield self.collate(batch)
        finally:
            stream.close()  # stops the join thread when the consumer stops early

    def _raw_samples(self, shards: list[str], plan: EpochPlan):
        """Undecoded samples joined with their row, view and stored targets, in shard stream order."""
        for shard in shards:
            yield from self._shard_samples(shard, plan)

    def _shard_samples(self, shard: str, plan: EpochPlan | None = None):
        """One shard's samples this epoch (``student/samples.py``)."""
        cfg = self.cfg
        plan = plan or self.epoch_plan(self.epoch)
        return shard_samples(self.join, shard, plan, cfg.max_views, cfg.fresh_views, self._mismatch)


def _reopen_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reopen the cache in the forked worker.

    A forked worker inherits the parent's open Zarr store. For an object store (``s3://``, ``gs://``) that
    store holds an fsspec filesystem whose aiohttp session was created on the parent's event loop; zarr
    and fsspec give the child fresh loops after a fork, so the first read through the inherited session
    fails with "attached to a different loop". Opening the store again here builds a new filesystem
    (fsspec's instance cache is per process) whose session lives on the child's own loop. Local stores
    are reopened too: it costs one metadata read and keeps one code path."""
    info = get_worker_info()
    if info is not None:
        info.dataset.join.reopen()


def make_loader(ds: CachedViews) -> DataLoader:
    """A DataLoader over pre-batched samples (workers batch themselves)."""
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=ds.cfg.num_workers,
        worker_init_fn=_reopen_in_worker,
        persistent_workers=False,
        prefetch_factor=2 if ds.cfg.num_workers else None,
    )
