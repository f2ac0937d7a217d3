"""``wds``: index existing webdataset shards in place (LAION/img2dataset style), never rewriting them.

The manifest names each shard by absolute path or URL. Captions and URLs come from img2dataset's parquet
beside each shard when there is one, else from the sample's ``txt`` and ``json`` members; labels from
``cls``, else the ``json`` ``label`` field. A shard that ends early is indexed up to the damage and named
under ``shard_errors`` in dataset.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq
from tqdm import tqdm

from teacher_cache.dataset import PreparedDataset
from teacher_cache.shards import ShardError, iter_tar_samples

from .common import ManifestBuilder, begin_output, check_pattern, expand_shard_pattern, finish, progress, require
from .registry import register_source

WDS_EXTRA_COLUMNS = ("caption", "url")

ERR_UNKNOWN_LABEL = "unknown label"


@dataclass(frozen=True)
class WdsConfig:
    """Index existing webdataset shards in place."""

    pattern: str
    """Shards as a brace/glob pattern, e.g. ``/data/{00000..00009}.tar`` or ``/data/*.tar``;
    fsspec URLs may use braces but not globs."""
    out: str
    """Dataset directory for manifest.parquet and dataset.json (the shards stay where they are)."""

    def __post_init__(self) -> None:
        require(bool(self.pattern), "pattern must be a non-empty shard pattern")
        require(bool(self.out), "out must be a non-empty path")
        check_pattern(self.pattern)


def _sidecar_path(shard: str) -> str | None:
    """img2dataset writes ``NNNNN.parquet`` beside ``NNNNN.tar``."""
    return shard[: -len(".tar")] + ".parquet" if shard.endswith(".tar") else None


def _read_sidecar(shard: str) -> tuple[dict[str, tuple[str, str]] | None, str | None]:
    """``({key: (caption, url)}, problem)`` from the shard's img2dataset parquet, if there is one."""
    path = _sidecar_path(shard)
    if path is None:
        return None, None
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return None, None
    try:
        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - a damaged sidecar costs captions, not the shard
        return None, f"metadata {path} unreadable ({type(e).__name__}: {e}); captions from txt members"
    if "key" not in table.column_names:
        return None, f"metadata {path} has no 'key' column; captions from txt members"
    keys = [str(k) for k in table.column("key").to_pylist()]
    empty = [None] * len(keys)
    captions = table.column("caption").to_pylist() if "caption" in table.column_names else empty
    urls = table.column("url").to_pylist() if "url" in table.column_names else empty
    return {k: (c or "", u or "") for k, c, u in zip(keys, captions, urls)}, None


def _parse_json(files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    if "json" not in files:
        return {}, ""
    try:
        value = json.loads(files["json"])
    except ValueError as e:
        return {}, f"bad json: {e}"
    return (value, "") if isinstance(value, dict) else ({}, "bad json: not an object")


def _wds_label(files: dict[str, bytes], meta: dict[str, Any]) -> tuple[int, str]:
    """``(label, error)``: from ``cls`` (int text), else the ``json`` ``label`` field, else ``-1``."""
    if "cls" in files:
        text = files["cls"].decode("utf-8", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            return -1, f"{ERR_UNKNOWN_LABEL}: cls {text[:40]!r}"
    elif "label" in meta:
        label = meta["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            return -1, f"{ERR_UNKNOWN_LABEL}: json label {str(label)[:40]!r}"
    else:
        return -1, ""
    return (label, "") if label >= -1 else (-1, f"{ERR_UNKNOWN_LABEL}: {label}")


def _index_wds_shard(shard: str, builder: ManifestBuilder, bar: tqdm, shard_errors: list[ShardError]) -> None:
    sidecar, problem = _read_sidecar(shard)
    if problem:
        shard_errors.append(ShardError(shard, None, problem))
    for index, item in enumerate(iter_tar_samples(shard)):
        if isinstance(item, ShardError):  # nothing after damage can be read: keep the rows before it
            shard_errors.append(item)
            return
        meta, json_error = _parse_json(item.files)
        label, label_error = _wds_label(item.files, meta)
        if sidecar is not None and item.key in sidecar:
            caption, url = sidecar[item.key]
        else:
            caption = item.files.get("txt", b"").decode("utf-8", errors="replace")
            url = str(meta.get("url") or "")
        builder.add(shard, index, item, label, label_error or json_error, caption=caption, url=url)
        bar.update(1)


@register_source("wds", config=WdsConfig)
def prepare_wds(cfg: WdsConfig) -> PreparedDataset:
    """Index existing shards in place: the manifest names them by absolute path or URL."""
    shards = expand_shard_pattern(cfg.pattern)
    begin_output(cfg.out)
    builder = ManifestBuilder(WDS_EXTRA_COLUMNS)
    shard_errors: list[ShardError] = []
    with progress(None, "wds") as bar:
        for shard in shards:
            _index_wds_shard(shard, builder, bar, shard_errors)
    return finish(cfg.out, "wds", cfg, builder, shards, None, shard_errors)
