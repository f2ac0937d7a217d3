"""The student's loader: stream webdataset image shards, join each sample with its cached targets,
replay the stored view so pixels and targets align, and batch.

Shards are read with the project's own tar reader (``teacher_cache.shards.iter_tar_samples``, webdataset's
key convention), the one extraction and ``prepare`` use, so the loader sees exactly the keys the
manifest holds; it costs ~23 µs per two-member sample against tarfile's ~76 µs (BENCHMARKS.md, #12.2).

Per epoch, the shard list is shuffled with ``(seed, epoch)`` and dealt out by rank, then by loader
worker, so no sample is read twice in an epoch. Each worker batches on its own and drops its ragged
tail, so the number of batches each worker yields is known before the epoch starts (from the
manifest and the cache's ``valid`` flags). That makes two things exact:

* DDP: every rank runs ``min`` over ranks of its batch count, so no rank waits on a collective;
* resume: the DataLoader hands out worker batches round-robin, so a global batch index maps to a
  per-worker count of batches to skip, and skipped batches are dropped *before* decoding.

Targets are read a block of rows at a time, each row at the one view it uses this epoch (one byte
range per run of adjacent rows sharing a view, ``teacher_cache/objects.py``), in a background thread one
block ahead of the tar stream so the reads overlap JPEG decoding, and kept in their stored dtype until
a batch is formed (``digpt train``: until its stages widen them on the device). Manifest rows, key
index, stored seeds/boxes/flips and the objects' indexes are read once per process and run.

At ~520 lines this is over the project's ~450 (issue #22 splits it): the epoch plan, rank/worker split, resume skip and
view replay are one contract (exactly which sample, view and crop each global batch holds), kept in one
file so it can be read and checked in one place; the join's thread and target blocks live in ``join.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from student.join import JoinThread, TargetBlocks
from teacher_cache.dataset import PreparedDataset, load_dataset
from teacher_cache.dataset import content_hash as _content_hash  # the manifest's `hash` of image bytes
from teacher_cache.images import BadImage, decode_image, to_uint8_chw
from teacher_cache.integrity import CacheIntegrityError, check_shard_group, checked, warn_unchecked
from teacher_cache.shards import ShardError, iter_tar_samples, pick_image, printable_key
from teacher_cache.store import (
    is_complete,
    list_tokenizers,
    open_root,
    open_view_reader,
    shard_ids,
    tokenizer_info,
)
from teacher_cache.views import AugConfig, replay_view, sample_crop, view_seed

ON_MISMATCH = ("error", "skip")


@dataclass(frozen=True)
class DataConfig:
    """Where the student's samples and targets come from."""

    shards: str
    """Prepared dataset directory (image shards + manifest)."""
    cache: str
    """Teacher cache made from those shards."""
    tokenizer: str | None = None
    """Tokenizer group in the cache; ``None`` when the cache holds exactly one."""
    img_size: int = 224
    """Student input resolution (the teacher may have run at another)."""
    batch_size: int = 64
    """Samples per batch *per rank*."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 0
    """Seeds shard order, the shuffle buffer, the per-epoch view choice and the per-sample orders."""
    shuffle_buffer: int = 256
    """Samples held for in-shard shuffling (0 disables)."""
    on_mismatch: str = "error"
    """An image whose bytes no longer match the manifest's content hash (so its cached targets were
    computed from other pixels): ``error`` refuses naming the key; ``skip`` counts it and skips it."""
    mismatch_log: str | None = None
    """File that each skipped sample is appended to (one JSON line; ``on_mismatch="skip"``)."""
    max_views: int | None = None
    """Train on only the first N of the cache's stored views (None: all of them): what a cache that
    stored N views would give, from one cache of more (the K-views study, LEARNING.md)."""
    fresh_views: bool = False
    """Draw a new crop of every sample each epoch instead of a stored view. The cache holds no targets
    for such a view, so this needs the teacher run online (``--online-teacher``); the loader refuses it
    otherwise. With it, a run sees as many views as it has epochs: the other end of the K-views curve."""

    def __post_init__(self) -> None:
        if self.max_views is not None and self.max_views < 1:
            raise ValueError(f"max_views must be >= 1 (or None for all stored views), got {self.max_views}")
        if self.on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {self.on_mismatch!r}")
        for name in ("img_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"num_workers and shuffle_buffer must be >= 0, got {self.num_workers} and {self.shuffle_buffer}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def _hash64(*parts: Any) -> int:
    h = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class CacheJoin:
    """Validated access to a cache for one dataset: refuses a cache made from other shards, an
    incomplete one, or a missing tokenizer, naming what differs."""

    def __init__(self, cfg: DataConfig, ds: PreparedDataset | None = None):
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
        """Open the cache's store again, in this process (see :func:`_reopen_in_worker`)."""
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
            rows = self.rows(shard)
            self._index[shard] = {key: i for i, key in enumerate(rows["key"]) if not rows["error"][i]}
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


class CachedViews(IterableDataset):
    """Yields whole batches: ``images [B,3,S,S]`` in [0, 1]; ``tokens [B,T,D]`` float targets (code
    teachers: codebook vectors) and ``codes [B,T]`` for code teachers; ``cls [B,D]`` when the
    teacher has one; ``labels [B]``; ``order_seed [B]`` (seeds of per-sample random orders).

    With ``decode_targets=False`` the targets stay in their stored form (``tokens``/``cls`` in fp16, bf16
    or fp32, int8 with ``token_scale``/``cls_scale``; code teachers ``codes`` only) and
    :class:`student.stages.DecodeTargets` makes them float32 on the training device, as ``digpt train``
    does: half the bytes to copy to a GPU, and the conversion (up to 40 µs per sample of EfficientNet
    targets on a CPU core) off the loader."""

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
        self.aug_fp = self.join.aug.fingerprint()
        self.epoch, self.skip = 0, 0
        self.mismatched = 0  # samples skipped by on_mismatch="skip" (this process only)
        need = world * max(1, cfg.num_workers)
        if len(self.join.ds.shards) < need:
            raise ValueError(
                f"{len(self.join.ds.shards)} shard(s) cannot feed {world} rank(s) x "
                f"{max(1, cfg.num_workers)} worker(s); use fewer workers or re-shard with a smaller --shard-size"
            )
        if self.steps_per_epoch(0) == 0:  # the epoch loop would never take a step
            per_worker = max(
                sum(int(self.join.valid[s].sum()) for s in self._shards(0, r, w, need // world))
                for r in range(world)
                for w in range(need // world)
            )
            raise ValueError(
                f"batch_size {cfg.batch_size} is more than the valid samples of a loader worker "
                f"(at most {per_worker}, over {world} rank(s) x {max(1, cfg.num_workers)} worker(s)); "
                "use a smaller --batch-size or fewer --workers"
            )

    # ----- the deterministic plan of an epoch -----
    def _shards(self, epoch: int, rank: int, worker: int, workers: int) -> list[str]:
        shards = list(self.join.ds.shards)
        np.random.default_rng([self.cfg.seed, epoch]).shuffle(shards)
        return shards[rank :: self.world][worker::workers]

    def batches_per_worker(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        workers = max(1, self.cfg.num_workers)
        return [
            sum(int(self.join.valid[s].sum()) for s in self._shards(epoch, rank, w, workers)) // self.cfg.batch_size
            for w in range(workers)
        ]

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches every rank can deliver this epoch (the minimum over ranks)."""
        return min(sum(self.batches_per_worker(epoch, r)) for r in range(self.world))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Start ``epoch`` at global batch ``skip_batches`` (for exact resume)."""
        self.epoch, self.skip = epoch, skip_batches

    def _resume_plan(self) -> tuple[list[int], int]:
        """(batches each logical worker skips, the logical worker due next).

        The DataLoader takes batches from its workers round-robin, passing over exhausted ones, and
        always starts at worker 0; so after a resume, physical worker 0 plays the logical worker that
        was due next, and the cyclic order (hence the batch sequence) is unchanged."""
        left = self.batches_per_worker(self.epoch)
        skips = [0] * len(left)
        w, todo = 0, self.skip
        while todo > 0 and any(left):
            if left[w]:
                left[w] -= 1
                skips[w] += 1
                todo -= 1
            w = (w + 1) % len(left)
        return skips, w

    # ----- streaming -----
    def __iter__(self):
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        skips, first = self._resume_plan()
        worker = (physical + first) % workers
        n_batches = self.batches_per_worker(self.epoch)[worker]
        skip = skips[worker]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        buf: list[dict] = []
        made = 0
        for raw in JoinThread(self._raw_samples(self._shards(self.epoch, self.rank, worker, workers))):
            buf.append(raw)
            if len(buf) < self.cfg.batch_size * (1 + (self.cfg.shuffle_buffer > 0)) and len(buf) < max(
                self.cfg.shuffle_buffer, self.cfg.batch_size
            ):
                continue
            batch = self._take(buf, rng)
            if made >= n_batches:
                return
            if made >= skip:
                yield self._collate(batch)
            made += 1
        while len(buf) >= self.cfg.batch_size and made < n_batches:
            batch = self._take(buf, rng)
            if made >= skip:
                yield self._collate(batch)
            made += 1

    def _take(self, buf: list[dict], rng: np.random.Generator) -> list[dict]:
        if self.cfg.shuffle_buffer:
            idx = sorted(rng.choice(len(buf), size=self.cfg.batch_size, replace=False).tolist(), reverse=True)
            return [buf.pop(i) for i in idx]
        out = buf[: self.cfg.batch_size]
        del buf[: self.cfg.batch_size]
        return out

    def _raw_samples(self, shards: list[str]):
        """Undecoded samples joined with their row, view and stored targets, in shard stream order."""
        for shard in shards:
            yield from self._shard_samples(shard)

    def _shard_samples(self, shard: str):
        j = self.join
        k = j.aug.views if self.cfg.max_views is None else self.cfg.max_views
        rows, index, (seeds, boxes, flips) = j.rows(shard), j.index(shard), j.plan(shard)
        valid = j.valid[shard]
        views = np.array([_hash64(self.cfg.seed, self.epoch, shard, key) % k for key in rows["key"]], dtype=np.int64)
        # Fresh views have no stored targets (the online teacher makes them): nothing is read from the cache.
        targets = None if self.cfg.fresh_views else TargetBlocks(j.reader(shard), views, valid)
        seen: set[str] = set()
        # The project's tar reader, as extraction uses: the same keys, a third of tarfile's cost per member.
        for s in iter_tar_samples(j.ds.shard_url(shard)):
            if isinstance(s, ShardError):
                raise RuntimeError(f"shard {shard} could not be read to the end: {s.reason}")
            key = s.key
            i = index.get(key)
            if i is None:
                if printable_key(key) not in j.listed(shard):  # prepare lists every sample, bad ones too
                    self._mismatch(shard, key, "not in the manifest")
                continue  # unreadable at prepare (recorded there)
            if key in seen or not valid[i]:
                continue  # skipped at extraction (recorded there) or a duplicate key
            seen.add(key)
            picked = pick_image(s)
            image = picked[1] if picked else b""
            if _content_hash(image) != rows["hash"][i]:
                self._mismatch(shard, key, "content hash differs")
                continue
            v = int(views[i])
            seed, box, flip = int(seeds[i, v]), boxes[i, v], bool(flips[i, v])
            if self.cfg.fresh_views:  # a view no cache holds: the online teacher replaces the stored targets
                size = (int(rows["width"][i]), int(rows["height"][i]))
                seed = view_seed(self.aug_fp, j.aug.seed, shard, key, f"fresh.{self.cfg.seed}.{self.epoch}")
                box, flip = sample_crop(seed, *size, j.aug)
                v = -1
            yield {
                "shard": shard,
                "key": key,
                "row": i,
                "view": v,
                "seed": seed,
                "box": box,
                "flip": flip,
                "size": (rows["width"][i], rows["height"][i]),
                "label": rows["label"][i],
                "image": image,
                "targets": targets.row(i) if targets is not None else {},
                "order_seed": _hash64(self.cfg.seed, self.epoch, shard, key, "order"),
            }
        if len(seen) < int(valid.sum()):  # a sample with cached targets that the tar no longer holds
            for i in np.flatnonzero(valid):
                if rows["key"][i] not in seen:
                    self._mismatch(shard, str(rows["key"][i]), "missing from the shard")

    def _mismatch(self, shard: str, key: str, reason: str) -> None:
        what = {
            "content hash differs": f"image {shard}/{key} differs from the manifest's content hash: the shard "
            "changed after `digpt prepare`, so its cached targets belong to other pixels",
            "missing from the shard": f"sample {shard}/{key} has cached targets but the shard no longer holds "
            "it: the shard changed after `digpt prepare`",
            "not in the manifest": f"sample {shard}/{key} is not in the manifest: the shard changed after "
            "`digpt prepare`, and the cache holds no targets for it",
        }[reason]
        if self.cfg.on_mismatch == "error":
            raise CacheIntegrityError(f"{what}; re-run prepare and extract, or train with --on-mismatch skip")
        self.mismatched += 1
        if self.cfg.mismatch_log:  # one short line per sample: appends from several workers do not interleave
            with open(self.cfg.mismatch_log, "a") as f:
                f.write(json.dumps({"shard": shard, "key": key, "reason": reason}) + "\n")

    def _collate(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        j = self.join
        images, teacher_images = [], []
        for b in batch:
            # Invariant 1: re-derive the view from its seed and check it against the stored one.
            box, flip = sample_crop(b["seed"], b["size"][0], b["size"][1], j.aug)
            if tuple(box) != tuple(int(x) for x in b["box"]) or flip != b["flip"]:
                raise RuntimeError(
                    f"view of {b['shard']}/{b['key']} does not re-derive from its seed: stored "
                    f"{tuple(b['box'])}/{b['flip']}, derived {box}/{flip} (cache and code disagree)"
                )
            try:
                img = torch.from_numpy(to_uint8_chw(decode_image(b["image"])))
            except BadImage as e:  # decoded fine at extraction; failing now means the shard changed
                raise RuntimeError(f"{b['shard']}/{b['key']}: {e}") from None
            images.append(replay_view(img, b["box"], b["flip"], self.cfg.img_size))
            if self.teacher_size:
                teacher_images.append(replay_view(img, b["box"], b["flip"], self.teacher_size))
        out = {
            "images": torch.stack(images),
            "labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            "order_seed": torch.tensor([b["order_seed"] for b in batch], dtype=torch.long),
        }
        if teacher_images:
            out["teacher_images"] = torch.stack(teacher_images)
        t = {n: [b["targets"][n] for b in batch] for n in batch[0]["targets"]}
        if not t:  # fresh views: the online teacher adds the targets
            return out
        out.update(stored_targets(t, j.info.dtype, j.info.codes))
        return widen_targets(out, j.codebook) if self.decode_targets else out


def stored_targets(t: dict[str, list[np.ndarray]], dtype: str, codes: bool) -> dict[str, torch.Tensor]:
    """A batch's targets stacked in their stored dtype (bf16 bits viewed as bfloat16), scales kept apart;
    :class:`student.stages.DecodeTargets` turns them into float32."""
    if codes:
        return {"codes": torch.from_numpy(np.stack(t["tokens"]).astype(np.int64))}
    out = {}
    for name in ("tokens", "token_scale", "cls", "cls_scale"):
        if name in t:
            x = torch.from_numpy(np.stack(t[name]))
            out[name] = x.view(torch.bfloat16) if dtype == "bf16" and not name.endswith("scale") else x
    return out


def widen_targets(batch: dict[str, torch.Tensor], codebook: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Stored targets to float32 wherever the batch is: fp16/bf16 widened, int8 times its per-row scale,
    k-means ``codes`` looked up in ``codebook`` (on the batch's device). Exact: each value is one widening
    or one float32 product. A batch already decoded, or without stored targets, comes back unchanged."""
    out = dict(batch)
    if "codes" in out and "tokens" not in out:
        out["tokens"] = codebook[out["codes"]]
    for name, scale in (("tokens", "token_scale"), ("cls", "cls_scale")):
        if scale in out:
            out[name] = out[name].float() * out.pop(scale).unsqueeze(-1)
        elif name in out and out[name].dtype != torch.float32:
            out[name] = out[name].float()
    if "tokens" in out and "shard" in out and not bool(torch.isfinite(out["tokens"]).all()):
        # A damaged chunk past the rows checked before training: refused before the step reads it.
        bad = (~torch.isfinite(out["tokens"])).flatten(1).any(1).nonzero().flatten().tolist()
        where = ", ".join(f"{out['shard'][i]}/{out['key'][i]}" for i in bad[:3])
        raise ValueError(
            f"non-finite stored targets (NaN/Inf) in {where}; find them with `digpt verify` and re-extract"
        )
    return out


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
