"""The prepare sources' registry: every source is listed, reachable by name, offered by ``digpt prepare``,
and found by ``pipelines.cli_docs`` from source (what the CLI would build its subcommands from)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli
import teacher_cache.prepare as P
from pipelines import cli_docs
from teacher_cache.dataset import load_dataset
from teacher_cache.prepare import get_source, list_sources
from teacher_cache.shards import iter_tar_samples

SOURCES = ["imagefolder", "parquet", "synthetic", "wds"]


def test_registry_lists_every_source():
    assert list_sources() == SOURCES


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_is_reachable_by_name_and_re_exported(name):
    source = get_source(name)
    assert source.name == name
    assert dataclasses.is_dataclass(source.config) and source.config.__dataclass_params__.frozen
    # The names callers import from the package are the registered objects themselves.
    assert getattr(P, f"prepare_{name}") is source.prepare
    assert getattr(P, source.config.__name__) is source.config
    assert source.config.__module__ == source.prepare.__module__ == f"teacher_cache.prepare.{name}"


def test_unknown_source_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown prepare source 'tiff'.*imagefolder"):
        get_source("tiff")


def test_cli_docs_finds_each_source_config_from_source():
    """``registered_configs`` reads ``@register_source(name, config=Cls)`` without importing: the same
    sources and configs as the registry, with every field documented (a flag's help)."""
    read = cli_docs.registered_configs("teacher_cache.prepare", "register_source")
    assert read == {n: (get_source(n).config.__module__, get_source(n).config.__name__) for n in SOURCES}
    for name, (module, cls) in read.items():
        fields = cli_docs.config_fields(module, cls)
        assert list(fields) == [f.name for f in dataclasses.fields(get_source(name).config)]
        assert all(fd.doc for fd in fields.values()), cls


def test_digpt_prepare_offers_exactly_the_registered_sources():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    kinds = next(a for a in sub["prepare"]._actions if a.dest == "kind").choices
    assert sorted(kinds) == list_sources()


def test_every_source_prepares_through_the_registry(tmp_path: Path):
    """Each source run by name on a tiny input: synthetic shards, then the same images as a class tree,
    as Parquet, and the shards indexed in place; every one loads with the same image bytes."""

    def run(name: str, **kwargs):
        source = get_source(name)
        return load_dataset(source.prepare(source.config(out=str(tmp_path / name), **kwargs)).root)

    syn = run("synthetic", num_samples=6, num_classes=2, image_size=16, shard_size=4)
    samples = [s for shard in syn.shards for s in iter_tar_samples(syn.shard_url(shard))]
    images = {s.key: s.files["jpg"] for s in samples}
    for s in samples:
        (tmp_path / "tree" / s.files["cls"].decode()).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / s.files["cls"].decode() / f"{s.key}.jpg").write_bytes(images[s.key])
    table = pa.table({"image": [{"bytes": d, "path": None} for d in images.values()], "label": [0] * len(images)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (tmp_path / "train.parquet").write_bytes(buf.getvalue())

    made = {
        "synthetic": syn,
        "imagefolder": run("imagefolder", root=str(tmp_path / "tree"), shard_size=4),
        "parquet": run("parquet", pattern=str(tmp_path / "train.parquet"), shard_size=4),
        "wds": run("wds", pattern=str(tmp_path / "synthetic" / "*.tar")),
    }
    assert sorted(made) == list_sources()
    for name, ds in made.items():
        assert ds.info["kind"] == name
        assert ds.num_samples == 6 and ds.info["num_errors"] == 0, name
        assert sorted(ds.manifest.column("hash").to_pylist()) == sorted(syn.manifest.column("hash").to_pylist())
