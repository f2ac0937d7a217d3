"""The plan of a loader epoch: which shards, samples and views each rank and loader worker reads, in
which order, and where a resumed epoch starts. Pure: no I/O, no torch; numbers in, numbers out, so it is
tested without a cache (``tests/test_epoch_plan.py``) and the loader (``student/data.py``) only follows it.

Per epoch, the shard list is shuffled with ``(seed, epoch)`` and dealt out by rank, then by loader
worker, so no sample is read twice in an epoch. Each worker batches on its own (a shuffle buffer drawn
with ``(seed, epoch, rank, worker)``) and drops its ragged tail, so the number of batches each worker
yields is known before the epoch starts (from the valid samples of its shards). That makes two things
exact:

* DDP: every rank runs ``min`` over ranks of its batch count, so no rank waits on a collective;
* resume: the DataLoader hands out worker batches round-robin, so a global batch index maps to a
  per-worker count of batches to skip, and skipped batches are dropped *before* decoding.

Within a shard, samples come in tar (= manifest row) order; each sample's view and its order seed are
hashes of ``(seed, epoch, shard, key)``, so they do not depend on rank, worker or resume point.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")


def hash64(*parts: Any) -> int:
    """A non-negative 63-bit hash of ``parts`` (their ``str``), stable across processes and runs."""
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def resume_point(batches: Sequence[int], skip: int) -> tuple[list[int], int]:
    """``(batches each logical worker skips, the logical worker due next)`` after ``skip`` global batches.

    The DataLoader takes batches from its workers round-robin, passing over exhausted ones, and always
    starts at worker 0; so after a resume, physical worker 0 plays the logical worker that was due next,
    and the cyclic order (hence the batch sequence) is unchanged."""
    left = list(batches)
    skips = [0] * len(left)
    w, todo = 0, skip
    while todo > 0 and any(left):
        if left[w]:
            left[w] -= 1
            skips[w] += 1
            todo -= 1
        w = (w + 1) % len(left)
    return skips, w


def take_batch(buf: list[T], batch_size: int, shuffle: bool, rng: np.random.Generator) -> list[T]:
    """One batch out of the shuffle buffer ``buf`` (removed from it): a random draw, or the first ones."""
    if shuffle:
        idx = sorted(rng.choice(len(buf), size=batch_size, replace=False).tolist(), reverse=True)
        return [buf.pop(i) for i in idx]
    out = buf[:batch_size]
    del buf[:batch_size]
    return out


def shuffled_batches(
    stream: Iterable[T],
    batch_size: int,
    shuffle_buffer: int,
    rng: np.random.Generator,
    n_batches: int,
    skip: int = 0,
) -> Iterator[list[T]]:
    """Batches ``skip .. n_batches-1`` of ``stream`` through a shuffle buffer (``shuffle_buffer=0``: in
    stream order). Skipped batches are drawn like the others (same buffer, same ``rng`` draws), so batch
    ``i`` is the same whatever the resume point, but are not yielded: the caller never decodes them.
    The stream is read no further than batch ``n_batches`` needs."""
    fill = min(batch_size * (2 if shuffle_buffer else 1), max(shuffle_buffer, batch_size))
    buf: list[T] = []
    made = 0
    for item in stream:
        buf.append(item)
        if len(buf) < fill:
            continue
        batch = take_batch(buf, batch_size, shuffle_buffer > 0, rng)
        if made >= n_batches:
            return
        if made >= skip:
            yield batch
        made += 1
    while len(buf) >= batch_size and made < n_batches:
        batch = take_batch(buf, batch_size, shuffle_buffer > 0, rng)
        if made >= skip:
            yield batch
        made += 1


class WorkerShare(NamedTuple):
    """What one loader worker process does in an epoch."""

    worker: int
    """The logical worker it plays (after a resume, not always its own id)."""
    shards: list[str]
    """Its shards, in reading order."""
    batches: int
    """Batches it forms (its valid samples // batch size)."""
    skip: int
    """Of those, how many it drops undecoded (resume)."""


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of the loader, for every rank and loader worker."""

    shards: tuple[str, ...]
    """The dataset's shards, in manifest order."""
    valid: Mapping[str, int]
    """Samples with stored targets in each shard: what the loader reads of it."""
    seed: int
    epoch: int
    world: int = 1
    """Ranks."""
    workers: int = 1
    """Loader workers per rank (a rank without worker processes is one worker)."""
    batch_size: int = 1
    """Samples per batch per rank."""
    shuffle_buffer: int = 0
    """Samples held for in-shard shuffling (0: stream order)."""

    def shard_order(self) -> list[str]:
        """This epoch's order of all shards, before they are dealt out."""
        shards = list(self.shards)
        np.random.default_rng([self.seed, self.epoch]).shuffle(shards)
        return shards

    def shards_of(self, rank: int, worker: int, workers: int | None = None) -> list[str]:
        """The shards of ``rank``'s loader ``worker`` (of ``workers``, default the plan's), in reading order."""
        return self.shard_order()[rank :: self.world][worker :: workers or self.workers]

    def samples_per_worker(self, rank: int) -> list[int]:
        return [sum(self.valid[s] for s in self.shards_of(rank, w)) for w in range(self.workers)]

    def batches_per_worker(self, rank: int) -> list[int]:
        return [n // self.batch_size for n in self.samples_per_worker(rank)]

    def steps(self) -> int:
        """Batches every rank can deliver this epoch (the minimum over ranks)."""
        return min(sum(self.batches_per_worker(r)) for r in range(self.world))

    def rng(self, rank: int, worker: int) -> np.random.Generator:
        """The shuffle buffer's generator of ``rank``'s logical ``worker``."""
        return np.random.default_rng([self.seed, self.epoch, rank, worker])

    def worker_share(self, rank: int, physical: int, skip_batches: int = 0, workers: int | None = None) -> WorkerShare:
        """What ``rank``'s loader process ``physical`` (of ``workers`` processes, default the plan's) does
        when the epoch starts at global batch ``skip_batches`` of the rank."""
        workers = workers or self.workers
        counts = self.batches_per_worker(rank)
        skips, first = resume_point(counts, skip_batches)
        worker = (physical + first) % workers
        return WorkerShare(worker, self.shards_of(rank, worker, workers), counts[worker], skips[worker])

    # ----- per sample: independent of rank, worker and resume point
    def views(self, shard: str, keys: Sequence[str], views: int) -> np.ndarray:
        """The stored view (in ``[0, views)``) each sample of ``shard`` trains on this epoch, by manifest row."""
        return np.array([hash64(self.seed, self.epoch, shard, key) % views for key in keys], dtype=np.int64)

    def order_seed(self, shard: str, key: str) -> int:
        """Seed of the sample's random patch order this epoch (the objective's); it also names the sample."""
        return hash64(self.seed, self.epoch, shard, key, "order")

    # ----- the batches, predicted from the manifest (what the loader yields when every shard matches it)

    def worker_batches(
        self, rank: int, share: WorkerShare, keys: Mapping[str, Sequence[str]]
    ) -> list[list[tuple[str, str]]]:
        """The ``(shard, key)`` batches a worker yields, given each shard's keys with stored targets in
        row order (what the loader streams when every shard matches its manifest)."""
        stream = ((shard, key) for shard in share.shards for key in keys[shard])
        return list(
            shuffled_batches(
                stream, self.batch_size, self.shuffle_buffer, self.rng(rank, share.worker), share.batches, share.skip
            )
        )

    def rank_batches(
        self, rank: int, keys: Mapping[str, Sequence[str]], skip_batches: int = 0
    ) -> list[list[tuple[str, str]]]:
        """The rank's batches in the order the DataLoader delivers them: round-robin over its worker
        processes from process 0, passing over exhausted ones, starting at global batch ``skip_batches``.
        (The trainer takes the first :meth:`steps` of the uninterrupted sequence.)"""
        per = [self.worker_batches(rank, self.worker_share(rank, p, skip_batches), keys) for p in range(self.workers)]
        out: list[list[tuple[str, str]]] = []
        while any(per):
            for queue in per:
                if queue:
                    out.append(queue.pop(0))
        return out
