"""The cache on disk: a Zarr v3 hierarchy, one group per tokenizer, one sub-group per shard.

::

    CACHE/                       root attrs["digpt_cache"]: schema, dataset + plan fingerprints, aug config
      <tokenizer>/               attrs["tokenizer"]: teacher spec, weights fingerprint, storage form, ...
        codebook                 [C, D] float32            (code teachers only)
        pca_basis                [K+1, D] float32          (pca:<t> only: mean, then K principal directions)
        <shard>/                 attrs["shard"]: shard name, rows, layout; attrs["complete"]: written LAST
          tokens                 [n, K, T, D] fp32|fp16|bf16(as uint16)|int8, or [n, K, T] int16 codes
          token_scale            [n, K, T] float32         (int8 only: per-token absmax / 127)
          cls, cls_scale         [n, K, D], [n, K]         (teachers with a global token)
          keys [n] str, valid [n] bool, seeds [n, K] uint64, boxes [n, K, 4] int32, flips [n, K] bool

Every array of a shard lives in that shard's group, so the task that owns the shard is the only
writer of every chunk in it (DESIGN invariant 3). A shard group without ``complete`` is garbage
from an interrupted run: the next run deletes and redoes it.

**Objects** (schema 2, ``layout: "view-objects"``). Object stores bill and throttle per object, so a
dataset shard maps to a bounded number of them whatever its row count: the target arrays use Zarr v3's
sharding codec with one shard per view holding all ``n`` rows and one inner chunk per sample view
(``objects.py``: why, and how it is written as a stream); the five metadata arrays are one chunk each.
Per shard group: 1 group + A array ``zarr.json`` + ``K`` objects per target array (G of them) + 5
metadata chunks; features with a class token have A = 7, G = 2 (int8: 9, 4; codes: 6, 1): 17 objects at
K = 2 for fp16 with a class token (23 int8, 14 codes), whatever the shard's row count. A training read of one sample's view fetches one byte range of that view
(its ``T x D`` values + 4 B checksum, plus 16 B of index per row, read once per shard). Schema 1 caches
(one object per ``chunk_rows`` rows per array, every view in it; ``store_v1.py``) are still read, by zarr,
with the same checks; ``extract`` refuses to add to them.

Compression: float features are stored raw by default (``codec="auto"`` -> ``none``): they barely
compress (Blosc lz4 or zstd saves 2-4% on fp16 EfficientNet tokens) and the loader pays the decode on
every sample; integer codes use Blosc zstd with bit-shuffle (they compress ~2x), as do the metadata
arrays. Every chunk (every inner chunk of a sharded array, and each shard index) ends in a ``crc32c``
checksum, and every chunk is written, even an all-fill one, so a missing chunk is damage rather than
zeros (``integrity.py``; shard attribute ``integrity``).

This module is the one place that knows the layout, the write side (groups, writers) and the read side
(targets, view readers), so a layout change starts here. Beside it: the object format in ``objects.py``,
schema 1's writer and reader in ``store_v1.py``, and the names (schema versions, storage forms, array and
group names) in ``names.py``, which imports neither torch nor zarr; every name of ``names.py`` is also
importable from here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .integrity import INTEGRITY, checked, chunk_config, damaged_object, with_checksum
from .names import CODECS, DTYPES, LAYOUT, READABLE_SCHEMAS, REPORTS_DIR, SCHEMA_VERSION, TARGETS, shard_ids, slug
from .objects import ObjectDamaged, ShardWriter, ViewReader, is_view_sharded
from .store_v1 import ChunkedViewReader, RowChunkWriter, rows_per_chunk

# The public interface; the names of names.py are in it because many modules import them from here.
__all__ = [
    "CODECS",
    "DTYPES",
    "LAYOUT",
    "READABLE_SCHEMAS",
    "REPORTS_DIR",
    "SCHEMA_VERSION",
    "TARGET_ARRAYS",
    "TARGETS",
    "ShardLayout",
    "ShardTargets",
    "TokenizerInfo",
    "compressor",
    "create_shard_group",
    "decode_block",
    "encode_block",
    "is_complete",
    "lay_dtype",
    "list_tokenizers",
    "open_root",
    "open_shard",
    "open_view_reader",
    "open_writer",
    "package_version",
    "shard_ids",
    "slug",
    "stored_bytes",
    "target_codec",
    "tokenizer_info",
    "write_rows",
    "zarr_dtype",
]

# zarr lists every directory of a group and warns about ones that are not Zarr nodes; ours is known.
warnings.filterwarnings("ignore", message=f"Object at {REPORTS_DIR} is not recognized")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digpt")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def compressor(clevel: int, cname: str = "zstd") -> list[BloscCodec]:
    """The compressor chain (before the checksum): Blosc with bit-shuffle, or nothing for ``none``."""
    return [] if cname == "none" else [BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle")]


def target_codec(codec: str, codes: bool) -> str:
    """The codec of the target arrays. ``auto``: zstd for integer codes (they compress ~2x), ``none``
    for float features — teacher features are near-incompressible (zstd saves 2-4% on fp16
    EfficientNet tokens, lz4 about as much) and every decoded byte is paid by the loader per sample.
    Metadata arrays always use zstd."""
    if codec == "auto":
        return "zstd" if codes else "none"
    return codec


# ---------------------------------------------------------------------------------------------
# encoding of token blocks into the storage form


def encode_block(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float ``[..., D]`` -> (stored array, per-row scale or None)."""
    x = x.detach().float().cpu()
    if dtype == "fp32":
        return x.numpy(), None
    if dtype == "fp16":
        return x.half().numpy(), None
    if dtype == "bf16":
        # Zarr has no bfloat16; the bits are stored as uint16 and reinterpreted on read.
        return x.bfloat16().view(torch.uint16).numpy(), None
    if dtype == "int8":
        scale = x.abs().amax(-1).clamp_min(1e-12) / 127.0
        q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q.numpy(), scale.numpy().astype(np.float32)
    raise ValueError(f"unknown storage dtype {dtype!r}; choose from {DTYPES}")


def decode_block(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_block`, returning float32."""
    t = torch.from_numpy(np.ascontiguousarray(stored))
    if dtype == "bf16":
        return t.view(torch.bfloat16).float()
    if dtype == "int8":
        assert scale is not None
        return t.float() * torch.from_numpy(np.ascontiguousarray(scale)).unsqueeze(-1)
    return t.float()


def zarr_dtype(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16", "bf16": "uint16", "int8": "int8"}[dtype]


# ---------------------------------------------------------------------------------------------
# the hierarchy


def open_root(path: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(path, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise FileNotFoundError(f"no teacher cache at {path} (create one with `digpt extract`)") from None


@dataclass(frozen=True)
class ShardLayout:
    """Shapes of one shard group's arrays."""

    rows: int
    views: int
    tokens: int
    dim: int
    has_cls: bool
    codes: bool
    dtype: str
    chunk_rows: int
    """Rows per write block (and, for ``sharded=False``, per chunk object)."""
    clevel: int
    num_codes: int = 0
    codec: str = "zstd"
    sharded: bool = True
    """Schema 2's few-objects layout; ``False`` writes schema 1's (``store_v1.py``; kept to test and benchmark
    old caches)."""

    @classmethod
    def for_teacher(cls, rows: int, views: int, spec: Any, storage: Any) -> ShardLayout:
        """The layout ``extract`` writes for a teacher's ``TeacherSpec`` under a ``StorageConfig``."""
        return cls(
            rows=rows,
            views=views,
            tokens=spec.grid[0] * spec.grid[1],
            dim=spec.dim,
            has_cls=spec.has_cls,
            codes=spec.kind == "codes",
            dtype=storage.dtype,
            chunk_rows=storage.chunk_rows,
            clevel=storage.clevel,
            num_codes=spec.num_codes,
            codec=storage.codec,
        )


def create_shard_group(tok: zarr.Group, sid: str, shard: str, lay: ShardLayout) -> zarr.Group:
    """(Re)create an empty shard group. Any previous, incomplete group is deleted first."""
    if sid in tok:
        del tok[sid]
    g = tok.create_group(sid)
    # ``integrity``: every chunk is written (even all-fill ones) and checksummed; readers rely on both.
    rec = {"name": shard, "rows": lay.rows, "integrity": INTEGRITY}
    g.attrs["shard"] = {**rec, "layout": LAYOUT} if lay.sharded else rec
    n, k, t, d = lay.rows, lay.views, lay.tokens, lay.dim
    c = max(1, n) if lay.sharded else rows_per_chunk(lay.rows, lay.chunk_rows)
    comp, target_comp = compressor(lay.clevel), compressor(lay.clevel, target_codec(lay.codec, lay.codes))

    def arr(name: str, shape: tuple[int, ...], dtype: str, fill: Any = 0, target: bool = False) -> None:
        kw: dict[str, Any] = {"chunks": (c, *shape[1:])}
        if target and lay.sharded:  # one object per view, one inner chunk per sample view
            kw = {"chunks": (1, 1, *shape[2:]), "shards": (max(1, n), 1, *shape[2:])}
        g.create_array(
            name,
            shape=shape,
            dtype=dtype,
            fill_value=fill,
            config=chunk_config(),
            compressors=with_checksum(target_comp if target else comp),
            **kw,
        )

    if lay.codes:
        arr("tokens", (n, k, t), "int16" if lay.num_codes <= 32767 else "int32", target=True)
    else:
        arr("tokens", (n, k, t, d), zarr_dtype(lay.dtype), target=True)
        if lay.dtype == "int8":
            arr("token_scale", (n, k, t), "float32", target=True)
    if lay.has_cls and not lay.codes:
        arr("cls", (n, k, d), zarr_dtype(lay.dtype), target=True)
        if lay.dtype == "int8":
            arr("cls_scale", (n, k), "float32", target=True)
    g.create_array(
        "keys",
        shape=(n,),
        chunks=(max(1, n),),
        dtype=str,
        config=chunk_config(),
        compressors=with_checksum(ZstdCodec()),
    )
    arr("valid", (n,), "bool", False)
    arr("seeds", (n, k), "uint64")
    arr("boxes", (n, k, 4), "int32", -1)
    arr("flips", (n, k), "bool", False)
    return g


TARGET_ARRAYS = TARGETS  # the name this module gave ``names.TARGETS`` before there was one


def open_writer(g: zarr.Group) -> ShardWriter | RowChunkWriter:
    """The writer of a new shard group's target arrays: call ``write_rows`` per block, ``close()`` before
    marking the shard complete (and ``abort()`` on failure). Schema 2's streaming :class:`ShardWriter`, or
    for a group made with ``sharded=False``, schema 1's :class:`store_v1.RowChunkWriter`."""
    if "tokens" in g and is_view_sharded(g["tokens"]):
        return ShardWriter(g)
    return RowChunkWriter(g)


def write_rows(
    w: ShardWriter | RowChunkWriter,
    lo: int,
    hi: int,
    idx: np.ndarray,
    tokens: torch.Tensor | None,
    cls: torch.Tensor | None,
    lay: ShardLayout,
) -> None:
    """Write rows ``lo .. hi`` of every target array once: the teacher outputs of the decoded rows
    (``idx``, offsets from ``lo``; ``tokens [len(idx) * K, ...]``) scattered into fill values.
    ``tokens=None``: no row of the block decoded; fill values are written all the same."""
    m, k = hi - lo, lay.views
    names = ["tokens"] + (["token_scale"] if lay.dtype == "int8" and not lay.codes else [])
    if lay.has_cls and not lay.codes:
        names += ["cls"] + (["cls_scale"] if lay.dtype == "int8" else [])
    shapes = {
        "tokens": (lay.tokens,) if lay.codes else (lay.tokens, lay.dim),
        "token_scale": (lay.tokens,),
        "cls": (lay.dim,),
        "cls_scale": (),
    }
    got: dict[str, np.ndarray | None] = dict.fromkeys(names)
    if tokens is not None and lay.codes:
        got["tokens"] = tokens.reshape(len(idx), k, lay.tokens).numpy()
    elif tokens is not None:
        got["tokens"], got["token_scale"] = encode_block(tokens.reshape(len(idx), k, lay.tokens, lay.dim), lay.dtype)
        if cls is not None and "cls" in names:
            got["cls"], got["cls_scale"] = encode_block(cls.reshape(len(idx), k, lay.dim), lay.dtype)
    for name in names:
        dtype = np.dtype(lay_dtype(lay, name))
        block = np.zeros((m, k, *shapes[name]), dtype=dtype)
        if got[name] is not None:
            block[idx] = got[name]
        w.write(name, lo, block)


def lay_dtype(lay: ShardLayout, name: str) -> str:
    """Stored dtype of a target array (as :func:`create_shard_group` makes it)."""
    if name in ("token_scale", "cls_scale"):
        return "float32"
    if lay.codes:
        return "int16" if lay.num_codes <= 32767 else "int32"
    return zarr_dtype(lay.dtype)


def is_complete(tok: zarr.Group, sid: str) -> bool:
    return sid in tok and "complete" in tok[sid].attrs


def stored_bytes(g: zarr.Group, names: tuple[str, ...] = TARGET_ARRAYS) -> int:
    """Compressed bytes of the target arrays of a shard group."""
    total = 0
    for name in names:
        if name in g:
            total += int(g[name].nbytes_stored())
    return total


@dataclass
class TokenizerInfo:
    """Provenance of one tokenizer group, as read back from its attributes."""

    name: str
    attrs: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.attrs["spec"]

    @property
    def dtype(self) -> str:
        return self.attrs["storage"]["dtype"]

    @property
    def codes(self) -> bool:
        return self.spec["kind"] == "codes"


def list_tokenizers(root: zarr.Group) -> list[str]:
    return sorted(name for name, g in root.groups() if "tokenizer" in g.attrs)


def tokenizer_info(root: zarr.Group, name: str) -> TokenizerInfo:
    if name not in root or "tokenizer" not in root[name].attrs:
        raise KeyError(f"cache has no tokenizer {name!r}; it has {list_tokenizers(root)}")
    return TokenizerInfo(name, dict(root[name].attrs["tokenizer"]))


class ShardTargets:
    """Read access to one complete shard group: targets for row blocks, dequantised to float32."""

    def __init__(self, group: zarr.Group, info: TokenizerInfo, codebook: torch.Tensor | None = None):
        self.g, self.info, self.codebook = group, info, codebook

    @property
    def keys(self) -> list[str]:
        return [str(k) for k in self._read("keys", lambda a: a[:])]

    def _read(self, name: str, read) -> np.ndarray:
        """``read(array)``, with a damaged chunk reported by array, shard and chunk (never fill values:
        missing chunks are refused before reading, by ``integrity.check_shard_group``)."""
        return checked(self.g, name, lambda: read(self.g[name]))

    def _select(self, name: str, rows: slice | np.ndarray, view: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            return self._read(name, lambda a: a[rows, view])
        return self._read(name, lambda a: a.get_orthogonal_selection((rows, view)))

    def tokens(self, rows: slice | np.ndarray, view: int | slice | np.ndarray = slice(None)) -> torch.Tensor:
        """Float tokens ``[len(rows), (K,) T, D]``; code teachers are looked up in the codebook."""
        stored = self._select("tokens", rows, view)
        if self.info.codes:
            assert self.codebook is not None
            return self.codebook[torch.from_numpy(stored.astype(np.int64))]
        scale = self._select("token_scale", rows, view) if self.info.dtype == "int8" else None
        return decode_block(stored, self.info.dtype, scale)

    def codes(self, rows: slice, view: int | slice = slice(None)) -> torch.Tensor:
        if not self.info.codes:
            raise ValueError(f"tokenizer {self.info.name!r} stores features, not codes")
        return torch.from_numpy(self._select("tokens", rows, view).astype(np.int64))

    def cls(self, rows: slice, view: int | slice = slice(None)) -> torch.Tensor | None:
        if "cls" not in self.g:
            return None
        scale = self._select("cls_scale", rows, view) if self.info.dtype == "int8" else None
        return decode_block(self._select("cls", rows, view), self.info.dtype, scale)


def open_shard(root: zarr.Group, tokenizer: str, sid: str) -> ShardTargets:
    info = tokenizer_info(root, tokenizer)
    tok = root[tokenizer]
    if not is_complete(tok, sid):
        raise RuntimeError(f"shard {sid!r} of tokenizer {tokenizer!r} is not complete; re-run `digpt extract`")
    codebook = torch.from_numpy(tok["codebook"][:]) if "codebook" in tok else None
    return ShardTargets(tok[sid], info, codebook)


def open_view_reader(g: zarr.Group) -> ViewReader | ChunkedViewReader:
    """A reader of chosen (row, view) targets of a complete shard group, in stored dtype: ranged reads of
    single views (schema 2), or whole chunks by zarr (schema 1). Damage raises :class:`CacheIntegrityError`
    naming array, object, row and view."""
    if "tokens" in g and is_view_sharded(g["tokens"]):
        return _CheckedViewReader(g)
    return ChunkedViewReader(g)


class _CheckedViewReader(ViewReader):
    """ViewReader whose damage errors name the shard group like every other integrity error."""

    def __init__(self, g: zarr.Group):
        try:
            super().__init__(g)
        except ObjectDamaged as e:
            raise damaged_object(g, _array_of(g, e), e) from None

    def read(self, rows: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return super().read(rows, views)
        except ObjectDamaged as e:
            raise damaged_object(self.g, _array_of(self.g, e), e) from None


def _array_of(g: zarr.Group, e: ObjectDamaged) -> str:
    return e.key.removeprefix(f"{g.path}/").split("/", 1)[0]
