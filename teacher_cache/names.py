"""The cache's vocabulary: schema versions, storage forms, and the names of its groups and arrays.

This module imports neither torch nor zarr, so that configs (``config.py``) and anything that only needs to
validate a name or list the choices can use it without loading either. Every name here is also importable
from ``store.py``, where many modules import them from (``DTYPES`` and ``CODECS`` as literal copies, which the
CLI's help reads from that file's source; tests/test_names.py keeps them equal). The layout itself is
described in ``store.py``.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 2
"""2: target arrays sharded, one object per (array, view) per dataset shard (``objects.py``); metadata
arrays one chunk each. 1: one object per ``chunk_rows`` rows per array, all views in it (``store_v1.py``;
still read)."""
READABLE_SCHEMAS = (1, 2)
REPORTS_DIR = "reports"  # CACHE/reports holds JSON summaries and skip lists, outside the hierarchy

DTYPES = ("fp32", "fp16", "bf16", "int8")
"""Storage forms of float features (``StorageConfig.dtype``); ``int8`` carries a per-token scale."""
CODECS = ("auto", "none", "zstd", "lz4")
"""Codecs of the target arrays (``StorageConfig.codec``); ``auto``: ``none`` for features, zstd for codes."""

LAYOUT = "view-objects"
"""``attrs["shard"]["layout"]`` of a schema-2 shard group (see ``store.py``)."""

TARGETS = ("tokens", "token_scale", "cls", "cls_scale")
"""The arrays of a shard group that hold teacher outputs (the rest is the view plan and bookkeeping). A shard
group has the ones its teacher and storage form need: ``tokens`` always, ``cls`` for a teacher with a global
token, each ``*_scale`` for ``int8``."""


def slug(name: str) -> str:
    """A group-name-safe form of a teacher or shard name."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
    return s or "x"


def shard_ids(shards: list[str]) -> dict[str, str]:
    """Map each manifest shard name to a unique group name (its file stem, made safe)."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    for i, shard in enumerate(shards):
        stem = slug(shard.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar"))
        sid = stem if stem not in used else f"{stem}-{i:06d}"
        used.add(sid)
        ids[shard] = sid
    return ids
