"""Objects per sample (issue 11 item 3): a dataset shard maps to a fixed number of stored objects, a loader
read of one sample's view fetches one byte range of exactly that view, and schema-1 caches still read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from bench.storage import CountingStore
from student.data import CachedViews, CacheJoin, DataConfig
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.extract import run_extract
from teacher_cache.extract import tokenizers as extract_tokenizers
from teacher_cache.extract import worker as extract_worker
from teacher_cache.store import ShardLayout, create_shard_group, open_view_reader, open_writer, write_rows
from teacher_cache.verify import VerifyConfig, run_verify
from teacher_cache.views import AugConfig

T, D, K = 16, 32, 2


def _write(root: zarr.Group, name: str, rows: int, dtype: str = "fp16", sharded: bool = True, codes: bool = False):
    """A shard group of ``rows`` rows through the extractor's writer, 4 rows per block; returns (group, tokens)."""
    lay = ShardLayout(
        rows=rows,
        views=K,
        tokens=T,
        dim=D,
        has_cls=not codes,
        codes=codes,
        dtype=dtype,
        chunk_rows=4,
        clevel=3,
        num_codes=50 if codes else 0,
        codec="auto",
        sharded=sharded,
    )
    g = create_shard_group(root.require_group(name), "s", "s.tar", lay)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randint(0, 50, (rows, K, T), generator=gen) if codes else torch.randn(rows, K, T, D, generator=gen)
    cls = None if codes else torch.randn(rows, K, D, generator=gen)
    w = open_writer(g)
    for lo in range(0, rows, 4):
        hi = min(lo + 4, rows)
        flat_cls = None if cls is None else cls[lo:hi].reshape(-1, D)
        write_rows(w, lo, hi, np.arange(hi - lo), x[lo:hi].reshape(-1, *x.shape[2:]), flat_cls, lay)
    w.close()
    with zarr.config.set({"array.write_empty_chunks": True}):  # as extract_shard writes them
        g["keys"][:] = np.array([f"k{i}" for i in range(rows)])
        g["seeds"][:], g["boxes"][:] = np.zeros((rows, K), np.uint64), np.zeros((rows, K, 4), np.int32)
        g["flips"][:], g["valid"][:] = np.zeros((rows, K), bool), np.ones(rows, dtype=bool)
    return g, x


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("dtype,codes,per_shard", [("fp16", False, 17), ("int8", False, 23), ("fp16", True, 14)])
def test_objects_per_shard_do_not_grow_with_its_rows(tmp_path, dtype, codes, per_shard):
    """1 group + one zarr.json per array + K objects per target array + one chunk per metadata array,
    for 5 rows as for 300 (schema 1 at 4 rows per chunk: one object per 4 rows per array)."""
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    for rows in (5, 300):
        _write(root, f"r{rows}", rows, dtype, codes=codes)
        files = _files(tmp_path / "c" / f"r{rows}" / "s")
        assert len(files) == per_shard, files
        assert not [f for f in files if f.endswith(".partial")]
        assert f"tokens/c/0/1/0{'' if codes else '/0'}" in files  # view 1's object of every row
    _write(root, "old", 300, dtype, sharded=False, codes=codes)
    assert len(_files(tmp_path / "c" / "old" / "s")) > 10 * per_shard


@pytest.mark.parametrize("dtype,codes", [("fp16", False), ("int8", False), ("bf16", False), ("fp16", True)])
def test_streamed_objects_are_zarr_sharding_and_the_reader_agrees(tmp_path, dtype, codes):
    """zarr itself decodes the streamed objects (checksums included) to what was written, and the
    loader's reader returns the same values for any (row, view) pairs."""
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    g, x = _write(root, "t", 13, dtype, codes=codes)
    stored = np.asarray(g["tokens"][:])
    if codes:
        assert np.array_equal(stored, x.numpy())
    elif dtype == "fp16":
        assert np.array_equal(stored, x.half().numpy())
    rows = np.array([0, 1, 2, 5, 6, 12])
    views = np.array([1, 1, 0, 1, 0, 1])
    got = open_view_reader(g).read(rows, views)
    for name in ("tokens", "token_scale", "cls", "cls_scale"):
        if name in g:
            assert np.array_equal(np.stack(got[name]), np.asarray(g[name][:])[rows, views]), name


def test_loader_read_of_one_view_fetches_only_that_views_bytes(tmp_path):
    """Counted through a zarr store wrapper: after the objects' indexes (read once per shard), reading one
    sample's view fetches its tokens and class token and their checksums, nothing else; schema 1 fetches
    the whole chunk of rows with every view."""
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    g_new, _ = _write(root, "new", 32)
    g_old, _ = _write(root, "old", 32, sharded=False)
    view_bytes = (T * D * 2 + 4) + (D * 2 + 4)  # tokens + cls inner chunks, fp16, each with its crc32c
    counted = {}
    for name in ("new", "old"):
        store = CountingStore(LocalStore(str(tmp_path / "c"), read_only=True))
        g = zarr.open_group(store=store, mode="r")[name]["s"]
        store.reset()
        reader = open_view_reader(g)
        if name == "new":  # the objects' indexes (2 arrays x K objects); the rest are arrays' zarr.json
            assert store.counter["range_bytes"] == 2 * K * (16 * 32 + 4) == reader.bytes_read
            assert store.counter["range_gets"] == 2 * K
        store.reset()
        got = reader.read(np.array([5]), np.array([1]))
        counted[name] = store.counter["bytes"]
        local = open_view_reader(zarr.open_group(str(tmp_path / "c"), mode="r")[name]["s"]).read([5], [1])
        for n in ("tokens", "cls"):  # the local fast path (pread) reads the same values
            assert np.array_equal(np.asarray(got[n][0]), np.asarray(local[n][0]))
    assert counted["new"] == view_bytes
    assert counted["old"] >= 4 * K * (T * D * 2)  # a whole chunk of 4 rows x K views of tokens, at least


def test_reads_coalesce_adjacent_rows_of_a_view(tmp_path):
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    g, _ = _write(root, "t", 16)
    store = CountingStore(LocalStore(str(tmp_path / "c"), read_only=True))
    reader = open_view_reader(zarr.open_group(store=store, mode="r")["t"]["s"])
    store.reset()
    reader.read(np.arange(8), np.array([0, 0, 0, 1, 1, 0, 0, 0]))
    assert store.counter["gets"] == 2 * 3  # per array: rows 0-2 and 5-7 of view 0 are 2 ranges, 3-4 of view 1 one


@dataclasses.dataclass(frozen=True)
class _Schema1Layout(ShardLayout):
    """The old layout, as the extractor would build it (``ShardLayout.for_teacher`` on this class)."""

    sharded: bool = False


def test_schema_1_cache_reads_the_same_batches_and_is_not_extended(tiny_dataset, tmp_path, monkeypatch):
    """A cache written with the old layout (schema 1) trains on the same batches as a new one and passes
    verify; extracting into it is refused with a message that says what to do."""
    cfg = ExtractConfig(
        shards=tiny_dataset,
        out=str(tmp_path / "new"),
        teachers=(TeacherConfig("random-vit:32/8", group="vit"),),
        aug=AugConfig(views=2),
        storage=StorageConfig(dtype="fp16", chunk_rows=4),
        executor="local",
    )
    assert run_extract(cfg, progress=False).ok
    old = dataclasses.replace(cfg, out=str(tmp_path / "old"))
    with monkeypatch.context() as m:
        m.setattr(extract_tokenizers, "SCHEMA_VERSION", 1)
        m.setattr(extract_worker, "ShardLayout", _Schema1Layout)
        assert run_extract(old, progress=False).ok
    assert len(_files(tmp_path / "old")) > len(_files(tmp_path / "new")) + 3 * 10  # the layouts differ on disk
    batches = {}
    for name in ("new", "old"):
        data = DataConfig(tiny_dataset, str(tmp_path / name), img_size=32, batch_size=8, shuffle_buffer=16)
        views = CachedViews(data, join=CacheJoin(data))
        batches[name] = list(views)
        report = run_verify(
            VerifyConfig(shards=tiny_dataset, cache=str(tmp_path / name), spot_checks=1, device="cpu", full=True),
            progress=False,
        )
        assert report.ok, report.table()
    assert len(batches["new"]) == 6
    for a, b in zip(batches["new"], batches["old"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="has schema 1; this version writes schema 2.*new --out"):
        run_extract(old, progress=False)


def test_interrupted_writer_leaves_no_published_object(tmp_path):
    """An object becomes visible only when its shard's writer closes; ``abort`` removes the spools."""
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    lay = ShardLayout(
        rows=8, views=K, tokens=T, dim=D, has_cls=False, codes=False, dtype="fp16", chunk_rows=4, clevel=3
    )
    g = create_shard_group(root.require_group("t"), "s", "s.tar", lay)
    w = open_writer(g)
    write_rows(w, 0, 4, np.arange(4), torch.randn(8, T, D), None, lay)
    base = tmp_path / "c" / "t" / "s" / "tokens" / "c" / "0"
    assert [p.name for p in base.rglob("*") if p.is_file()] == ["0.partial", "0.partial"]
    with pytest.raises(RuntimeError, match=r"rows \[4, 5, 6, 7\] were never written"):
        w.close()
    assert not [p for p in base.rglob("*") if p.is_file()]
    assert os.path.isdir(base)
