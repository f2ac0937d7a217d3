"""The loader's split of an epoch over ranks x loader workers (DESIGN, Scale): no sample is read twice,
none is dropped, in every epoch, through real DataLoader worker processes."""

from __future__ import annotations

from collections import Counter

import pytest

from student.data import CachedViews, CacheJoin, DataConfig, _hash64, make_loader
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import run_extract
from teacher_cache.views import AugConfig

SEED, BATCH = 3, 8


@pytest.fixture(scope="module")
def pixel_cache(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("split") / "cache")
    run_extract(
        ExtractConfig(
            shards=tiny_dataset,
            out=out,
            teachers=(TeacherConfig("pixel:32/8"),),
            aug=AugConfig(views=2),
            storage=StorageConfig(dtype="fp16"),
            executor="local",
        ),
        progress=False,
    )
    return out


def _identities(dataset: str, epoch: int) -> dict[int, tuple[str, str]]:
    """Every sample's per-epoch order seed -> (shard, key): the loader hashes each sample's identity
    into its batch's ``order_seed``, so a batch says exactly which samples it holds."""
    ds = load_dataset(dataset)
    out = {}
    for shard in ds.shards:
        rows = ds.rows(shard)
        for key, err in zip(rows["key"], rows["error"], strict=True):
            if not err:
                out[_hash64(SEED, epoch, shard, key, "order")] = (shard, key)
    assert len(out) == 48
    return out


# (ranks, loader workers per rank): the 3 shards of 16 split evenly (1 or 3 slots) and unevenly (2 slots).
@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (3, 1), (1, 2), (2, 1)])
def test_each_sample_is_read_once_per_epoch(world, workers, tiny_dataset, pixel_cache):
    cfg = DataConfig(
        tiny_dataset, pixel_cache, img_size=32, batch_size=BATCH, num_workers=workers, seed=SEED, shuffle_buffer=BATCH
    )
    join = CacheJoin(cfg)
    orders = []
    for epoch in (0, 1):
        ident = _identities(tiny_dataset, epoch)
        read: Counter = Counter()
        steps = []
        for rank in range(world):
            views = CachedViews(cfg, rank=rank, world=world, join=join)
            views.set_epoch(epoch)
            steps.append(views.steps_per_epoch(epoch))
            for batch in make_loader(views):  # worker processes when workers > 1
                read.update(ident[s] for s in batch["order_seed"].tolist())  # KeyError: not a sample of the set
        twice = [k for k, n in read.items() if n > 1]
        assert not twice, f"epoch {epoch}: read twice: {twice[:4]}"
        assert set(read) == set(ident.values()), (
            f"epoch {epoch}: never read: {sorted(set(ident.values()) - set(read))[:4]}"
        )
        orders.append(list(read))
        # What the trainer consumes: the same number of steps on every rank.
        assert len(set(steps)) == 1
        if 3 % (world * workers) == 0:  # whole shards per slot: the trainer itself drops nothing either
            assert steps[0] * world * BATCH == 48
    assert orders[0] != orders[1], "two epochs read the samples in the same order"


# (ranks, loader workers, resume point): 2 workers get 4 and 2 batches (worker 1 runs out first).
@pytest.mark.parametrize("world,workers,skip", [(1, 2, 0), (1, 2, 3), (1, 2, 5), (2, 1, 1), (1, 3, 2)])
def test_the_loader_yields_its_epoch_plan(world, workers, skip, tiny_dataset, pixel_cache):
    """The epoch plan (``student/epoch_plan.py``, tested alone in test_epoch_plan.py) says exactly which
    samples each batch holds, in which order, through real DataLoader workers and from a resume point."""
    cfg = DataConfig(
        tiny_dataset, pixel_cache, img_size=32, batch_size=BATCH, num_workers=workers, seed=SEED, shuffle_buffer=11
    )
    join = CacheJoin(cfg)
    keys = {s: [k for k, ok in zip(join.rows(s)["key"], join.valid[s]) if ok] for s in join.ds.shards}
    for rank in range(world):
        views = CachedViews(cfg, rank=rank, world=world, join=join)
        views.set_epoch(1, skip)
        plan = views.epoch_plan(1)
        expected = [[plan.order_seed(s, k) for s, k in b] for b in plan.rank_batches(rank, keys, skip)]
        got = [b["order_seed"].tolist() for b in make_loader(views)]
        assert got == expected and len(got) == sum(views.batches_per_worker(1, rank)) - skip
