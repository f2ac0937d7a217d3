"""Validated access to a teacher cache for one prepared dataset (:class:`CacheJoin`): what the loader's
stages read of it, each part read once per process and run.

It refuses, before any step, a cache made from other shards, an incomplete one, a missing tokenizer, or a
shard group whose keys, owner or valid count do not match (invariant 7), naming what differs. Manifest
rows, key index, stored seeds/boxes/flips and the objects' indexes are read once per process and run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr

from teacher_cache.dataset import PreparedDataset, load_dataset, readable_index
from teacher_cache.integrity import CacheIntegrityError, check_shard_group, checked, warn_unchecked
from teacher_cache.store import (
    is_complete,
    list_tokenizers,
    open_root,
    open_view_reader,
    shard_ids,
    tokenizer_info,
)
from teacher_cache.views import AugConfig

if TYPE_CHECKING:
    from student.config import DataConfig


class CacheJoin:
    """Validated access to a cache for one dataset: refuses a cache made from other shards, an
    incomplete one, or a missing tokenizer, naming what differs."""

    def __init__(self, cfg: DataConfig, ds: PreparedDataset | None = None):
        """``cfg``: a :class:`student.data.DataConfig` (its shards, cache and tokenizer); ``ds``: the
        dataset already loaded from ``cfg.shards``, to share it between joins."""
        self.ds = ds or load_dataset(cfg.shards)
        self.cache = cfg.cache
        self.root = open_root(cfg.cache)
        meta = self.root.attrs.get("digpt_cache")
        if meta is None:
            raise ValueError(f"{cfg.cache} is not a digpt cache")
        if meta["dataset"]["manifest_fingerprint"] != self.ds.fingerprint:
            raise ValueError(
                f"cache {cfg.cache} was made from other shards: its manifest fingerprint is "
                f"{meta['dataset']['manifest_fingerprint'][:12]}, {cfg.shards} has {self.ds.fingerprint[:12]}"
            )
        toks = list_tokenizers(self.root)
        name = cfg.tokenizer or (toks[0] if len(toks) == 1 else None)
        if name is None:
            raise ValueError(f"cache {cfg.cache} holds several tokenizers {toks}; choose one with --tokenizer")
        if name not in toks:
            raise ValueError(f"tokenizer {name!r} is not in cache {cfg.cache}; it holds {toks}")
        self.info = tokenizer_info(self.root, name)
        self.aug = AugConfig.from_json(meta["aug"])
        self.sids = shard_ids(self.ds.shards)
        tok = self.root[name]
        missing = [s for s in self.ds.shards if not is_complete(tok, self.sids[s])]
        if missing:
            raise ValueError(
                f"tokenizer {name!r} is incomplete: {len(missing)} shard(s) missing, e.g. {missing[:2]}; "
                "re-run `digpt extract`"
            )
        self.codebook = torch.from_numpy(np.array(tok["codebook"][:])) if "codebook" in tok else None
        # pca:<t> tokenizers: the basis their (already projected) tokens were made with; only the online
        # teacher needs it.
        self.pca_basis = torch.from_numpy(np.array(tok["pca_basis"][:])) if "pca_basis" in tok else None
        self._check_shards(cfg.cache, tok)
        self.valid = {s: np.array(tok[self.sids[s]]["valid"][:]) for s in self.ds.shards}
        self._rows: dict[str, dict] = {}
        self._index: dict[str, dict[str, int]] = {}
        self._listed: dict[str, set[str]] = {}
        self._plan: dict[str, tuple] = {}
        self._readers: dict[str, object] = {}

    def _check_shards(self, cache: str, tok: zarr.Group) -> None:
        """Before any step (invariant 7), per shard group: it belongs to this shard, its keys equal the
        manifest's in order, its valid count equals the completion record's, no chunk is missing."""
        groups = [tok[self.sids[s]] for s in self.ds.shards]
        warn_unchecked(cache, groups)
        bad = []
        for shard, g in zip(self.ds.shards, groups):
            bad += [f"{shard}: {p}" for p in check_shard_group(g, shard, self.ds.rows(shard)["key"])]
        if bad:
            raise CacheIntegrityError(
                f"cache {cache} tokenizer {self.info.name!r} does not match its shards "
                f"({len(bad)} problem(s)): "
                + "; ".join(bad[:3])
                + "; run `digpt verify` and re-extract the named shards"
            )

    @property
    def spec(self) -> dict:
        return self.info.spec

    def reopen(self) -> None:
        """Open the cache's store again, in this process (see :func:`student.data._reopen_in_worker`)."""
        # The inherited store stays referenced: its session belongs to the parent's loop, so closing it
        # (or letting it be collected, which warns "Unclosed client session") is not this process's business.
        self._inherited = self.root
        self.root = open_root(self.cache)
        self._readers = {}  # bound to the inherited store

    def group(self, shard: str) -> zarr.Group:
        return self.root[self.info.name][self.sids[shard]]

    # Per-run caches (per process): a worker reads the same shards every epoch.
    def rows(self, shard: str) -> dict[str, list]:
        if shard not in self._rows:
            self._rows[shard] = self.ds.rows(shard)
        return self._rows[shard]

    def index(self, shard: str) -> dict[str, int]:
        """Row of each readable key of the shard."""
        if shard not in self._index:
            self._index[shard] = readable_index(self.rows(shard))
        return self._index[shard]

    def listed(self, shard: str) -> set[str]:
        """Every key the manifest lists for the shard, unreadable ones too (prepare records them all)."""
        if shard not in self._listed:
            self._listed[shard] = set(self.rows(shard)["key"])
        return self._listed[shard]

    def plan(self, shard: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The shard's stored seeds, boxes and flips."""
        if shard not in self._plan:
            g = self.group(shard)
            self._plan[shard] = tuple(np.array(checked(g, n, lambda n=n: g[n][:])) for n in ("seeds", "boxes", "flips"))
        return self._plan[shard]

    def reader(self, shard: str):
        """The shard's target reader (its object indexes read once per process)."""
        if shard not in self._readers:
            self._readers[shard] = open_view_reader(self.group(shard))
        return self._readers[shard]
