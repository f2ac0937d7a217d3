"""The loader's per-shard sample stages, each a small generator over sample dicts:

``joined_samples`` (read the tar, join the manifest through ``teacher_cache.dataset.join_shard``, check
each image's content hash) → ``with_views`` (the view this epoch trains on: a stored one, or a fresh crop)
→ ``with_targets`` (that view's stored targets, read a block of rows at a time).

They run in the loader's join thread (``student/prefetch.py``), ahead of decoding; the crop is replayed after
batching (``student/collate.py``), so a batch skipped on resume is never decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from student.cache_join import CacheJoin
from student.epoch_plan import EpochPlan
from student.prefetch import TargetBlocks
from teacher_cache.dataset import checked_image, join_shard
from teacher_cache.integrity import CacheIntegrityError
from teacher_cache.shards import printable_key
from teacher_cache.views import AugConfig, sample_crop, view_seed

_WHAT = {
    "content hash differs": "image {where} differs from the manifest's content hash: the shard changed after "
    "`digpt prepare`, so its cached targets belong to other pixels",
    "missing from the shard": "sample {where} has cached targets but the shard no longer holds it: the shard "
    "changed after `digpt prepare`",
    "not in the manifest": "sample {where} is not in the manifest: the shard changed after `digpt prepare`, "
    "and the cache holds no targets for it",
}


class Mismatches:
    """What the loader does with a sample whose shard changed after ``prepare`` (``DataConfig.on_mismatch``):
    ``error`` refuses naming it; ``skip`` counts it and appends one JSON line to ``log``."""

    def __init__(self, on_mismatch: str, log: str | None = None):
        self.on_mismatch, self.log = on_mismatch, log
        self.count = 0  # this process only

    def __call__(self, shard: str, key: str, reason: str) -> None:
        what = _WHAT[reason].format(where=f"{shard}/{key}")
        if self.on_mismatch == "error":
            raise CacheIntegrityError(f"{what}; re-run prepare and extract, or train with --on-mismatch skip")
        self.count += 1
        if self.log:  # one short line per sample: appends from several workers do not interleave
            with open(self.log, "a") as f:
                f.write(json.dumps({"shard": shard, "key": key, "reason": reason}) + "\n")


def joined_samples(join: CacheJoin, shard: str, mismatch: Mismatches) -> Iterator[dict]:
    """The shard's samples that have stored targets, in tar order: ``shard``, ``key``, ``row`` (manifest),
    ``image`` (undecoded bytes, checked against the manifest's content hash), ``size``, ``label``.

    Samples skipped at prepare or extraction (recorded there) and repeated keys are passed over; a changed
    image, a sample the manifest does not list and a row with targets that the tar no longer holds go to
    ``mismatch``. A damaged tar is an error: its targets were computed from samples the loader can no
    longer read."""
    rows, index, valid = join.rows(shard), join.index(shard), join.valid[shard]
    taken: set[int] = set()
    for step in join_shard(join.ds, shard, rows, index):
        if step.damage is not None:
            raise RuntimeError(f"shard {shard} could not be read to the end: {step.damage.reason}")
        i, s = step.row, step.sample
        if s is None:  # after the stream: a row no sample was joined to
            if valid[i]:
                mismatch(shard, str(rows["key"][i]), "missing from the shard")
            continue
        if i is None:
            if printable_key(s.key) not in join.listed(shard):  # prepare lists every sample, bad ones too
                mismatch(shard, s.key, "not in the manifest")
            continue
        if i in taken or rows["error"][i] or not valid[i]:
            continue  # unreadable at prepare or skipped at extraction (recorded there), or a repeated key
        taken.add(i)
        image = checked_image(s, rows["hash"][i])
        if image is None:
            mismatch(shard, s.key, "content hash differs")
            continue
        size = (rows["width"][i], rows["height"][i])
        yield {"shard": shard, "key": s.key, "row": i, "image": image, "size": size, "label": rows["label"][i]}


def with_views(
    samples: Iterator[dict], plan: EpochPlan, shard: str, views: np.ndarray, stored: tuple, fresh: AugConfig | None
) -> Iterator[dict]:
    """Adds the view each sample of ``shard`` trains on this epoch: ``view`` (its index in the cache, -1 for
    a fresh one), ``seed``, ``box``, ``flip``, and the sample's ``order_seed``.

    ``views``: each row's stored view (:meth:`EpochPlan.views`); ``stored``: the shard's stored seeds,
    boxes and flips. ``fresh``: the cache's augmentation, to draw a new crop instead, one no cache holds
    (the online teacher makes its targets), seeded by the sample and the epoch."""
    seeds, boxes, flips = stored
    aug_fp = fresh.fingerprint() if fresh else ""
    for s in samples:
        i, v = s["row"], int(views[s["row"]])
        seed, box, flip = int(seeds[i, v]), boxes[i, v], bool(flips[i, v])
        if fresh:
            seed = view_seed(aug_fp, fresh.seed, shard, s["key"], f"fresh.{plan.seed}.{plan.epoch}")
            box, flip = sample_crop(seed, int(s["size"][0]), int(s["size"][1]), fresh)
            v = -1
        yield {**s, "view": v, "seed": seed, "box": box, "flip": flip, "order_seed": plan.order_seed(shard, s["key"])}


def with_targets(samples: Iterator[dict], targets: TargetBlocks | None) -> Iterator[dict]:
    """Adds ``targets``: the stored targets of each sample's row at its view (``{}`` for fresh views)."""
    for s in samples:
        s["targets"] = targets.row(s["row"]) if targets is not None else {}
        yield s


def shard_samples(
    join: CacheJoin, shard: str, plan: EpochPlan, max_views: int | None, fresh: bool, mismatch: Mismatches
):
    """One shard's pass: the stages above composed, each sample joined with its row, view and stored targets."""
    stored = join.plan(shard)
    views = plan.views(shard, join.rows(shard)["key"], join.aug.views if max_views is None else max_views)
    # Fresh views have no stored targets (the online teacher makes them): nothing is read from the cache.
    targets = None if fresh else TargetBlocks(join.reader(shard), views, join.valid[shard])
    samples = joined_samples(join, shard, mismatch)
    yield from with_targets(with_views(samples, plan, shard, views, stored, join.aug if fresh else None), targets)
