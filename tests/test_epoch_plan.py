"""The loader's epoch plan (``student/epoch_plan.py``) without a cache: deterministic, disjoint over ranks and
loader workers, and a resumed epoch is exactly the tail of the uninterrupted one."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from student.epoch_plan import EpochPlan, hash64, resume_point, shuffled_batches

# 7 shards of uneven sizes (what extraction left valid), so workers get uneven batch counts.
SIZES = {f"shard-{i:06d}.tar": n for i, n in enumerate([9, 4, 11, 7, 9, 3, 8])}
KEYS = {s: [f"{s[6:12]}-{j:03d}" for j in range(n)] for s, n in SIZES.items()}


def _plan(epoch=0, world=1, workers=1, batch_size=3, shuffle_buffer=5, seed=11) -> EpochPlan:
    return EpochPlan(tuple(SIZES), SIZES, seed, epoch, world, workers, batch_size, shuffle_buffer)


SPLITS = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 2)]


def test_the_module_needs_no_torch():
    code = "import sys, student.epoch_plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("world,workers", SPLITS)
def test_same_inputs_same_plan(world, workers):
    a, b = _plan(3, world, workers), _plan(3, world, workers)
    for rank in range(world):
        assert a.rank_batches(rank, KEYS) == b.rank_batches(rank, KEYS)
    assert a.shard_order() == b.shard_order()
    assert _plan(4).shard_order() != a.shard_order() or _plan(5).shard_order() != a.shard_order()
    assert _plan(3, seed=12).rank_batches(0, KEYS) != _plan(3).rank_batches(0, KEYS)


@pytest.mark.parametrize("world,workers", SPLITS)
@pytest.mark.parametrize("epoch", [0, 1])
def test_shards_and_samples_are_dealt_disjointly(world, workers, epoch):
    plan = _plan(epoch, world, workers)
    dealt = Counter(s for r in range(world) for w in range(workers) for s in plan.shards_of(r, w))
    assert dealt == Counter(list(SIZES)), "every shard goes to exactly one (rank, worker)"
    read: Counter = Counter()
    for rank in range(world):
        batches = plan.rank_batches(rank, KEYS)
        assert all(len(b) == plan.batch_size for b in batches)
        assert len(batches) == sum(plan.batches_per_worker(rank)) >= plan.steps()
        read.update(x for b in batches for x in b)
        for worker in range(workers):  # a worker reads only its own shards and drops only its ragged tail
            share = plan.worker_share(rank, worker)
            mine = {x for b in plan.worker_batches(rank, share, KEYS) for x in b}
            assert {s for s, _ in mine} <= set(share.shards)
            assert len(mine) == sum(SIZES[s] for s in share.shards) // plan.batch_size * plan.batch_size
    assert max(read.values()) == 1, "no sample is read twice in an epoch"
    assert set(read) <= {(s, k) for s, keys in KEYS.items() for k in keys}


@pytest.mark.parametrize("world,workers", SPLITS)
@pytest.mark.parametrize("shuffle_buffer", [0, 5, 100])
def test_resume_is_the_tail_of_the_uninterrupted_epoch(world, workers, shuffle_buffer):
    plan = _plan(2, world, workers, shuffle_buffer=shuffle_buffer)
    for rank in range(world):
        whole = plan.rank_batches(rank, KEYS)
        for skip in range(len(whole) + 2):
            assert plan.rank_batches(rank, KEYS, skip) == whole[skip:], f"rank {rank}, resumed at batch {skip}"


def test_resume_point_follows_the_round_robin():
    assert resume_point([2, 1], 0) == ([0, 0], 0)
    assert resume_point([2, 1], 2) == ([1, 1], 0)
    assert resume_point([2, 1], 3) == ([2, 1], 1)  # all consumed
    assert resume_point([1, 3, 2], 4) == ([1, 2, 1], 2)  # worker 0 exhausted after the first round
    assert resume_point([0, 2], 1) == ([0, 1], 0)
    assert resume_point([3], 10) == ([3], 0)


@pytest.mark.parametrize("shuffle_buffer", [0, 4, 7, 50])
def test_skipped_batches_are_drawn_but_not_yielded(shuffle_buffer):
    def run(skip, n=6):
        rng = np.random.default_rng([1, 2])
        return list(shuffled_batches(iter(range(23)), 3, shuffle_buffer, rng, n, skip))

    whole = run(0)
    assert len(whole) == 6 and len({x for b in whole for x in b}) == 18
    for skip in range(8):
        assert run(skip) == whole[skip:]
    if shuffle_buffer == 0:
        assert whole == [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(6)]  # stream order
    else:
        assert whole != [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(6)]


def test_the_stream_is_read_no_further_than_needed():
    pulled = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield i

    batches = list(shuffled_batches(stream(), 4, 0, np.random.default_rng(0), 2))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(pulled) <= 12


@pytest.mark.parametrize("world,workers", SPLITS)
def test_batch_counts_match_the_batches(world, workers):
    plan = _plan(1, world, workers)
    per_rank = [sum(plan.batches_per_worker(r)) for r in range(world)]
    assert plan.steps() == min(per_rank)
    for rank in range(world):
        for worker, n in enumerate(plan.batches_per_worker(rank)):
            share = plan.worker_share(rank, worker)
            assert share.worker == worker and share.skip == 0 and share.batches == n
            assert len(plan.worker_batches(rank, share, KEYS)) == n


def test_views_and_order_seeds_depend_on_the_sample_and_epoch_only():
    shard, keys = "shard-000002.tar", KEYS["shard-000002.tar"]
    views = _plan(0).views(shard, keys, 3)
    assert views.dtype == np.int64 and set(views.tolist()) <= {0, 1, 2} and len(set(views.tolist())) > 1
    for world, workers in SPLITS:  # not of the split, the batch size or the shuffle buffer
        other = _plan(0, world, workers, batch_size=2, shuffle_buffer=0)
        assert np.array_equal(other.views(shard, keys, 3), views)
        assert other.order_seed(shard, keys[0]) == _plan(0).order_seed(shard, keys[0])
    assert not np.array_equal(_plan(1).views(shard, keys, 3), views)
    assert set(_plan(0).views(shard, keys, 1).tolist()) == {0}  # max_views=1: always the first stored view
    seeds = {_plan(0).order_seed(s, k) for s in KEYS for k in KEYS[s]}
    assert len(seeds) == sum(SIZES.values())  # a batch's order seeds name its samples
    assert _plan(0).order_seed(shard, keys[0]) == hash64(11, 0, shard, keys[0], "order")
