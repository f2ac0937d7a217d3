"""The cache on disk: a Zarr v3 hierarchy, one group per tokenizer, one sub-group per shard.

::

    CACHE/                       root attrs["digpt_cache"]: schema, dataset + plan fingerprints, aug config
      <tokenizer>/               attrs["tokenizer"]: teacher spec, weights fingerprint, storage form, ...
        codebook                 [C, D] float32            (code teachers only)
        pca_basis                [K+1, D] float32          (pca:<t> only: mean, then K principal directions)
        <shard>/                 attrs["shard"]: shard name, rows; attrs["complete"]: written LAST
          tokens                 [n, K, T, D] fp32|fp16|bf16(as uint16)|int8, or [n, K, T] int16 codes
          token_scale            [n, K, T] float32         (int8 only: per-token absmax / 127)
          cls, cls_scale         [n, K, D], [n, K]         (teachers with a global token)
          keys [n] str, valid [n] bool, seeds [n, K] uint64, boxes [n, K, 4] int32, flips [n, K] bool

Every array of a shard lives in that shard's group, so the task that owns the shard is the only
writer of every chunk in it (DESIGN invariant 3). A shard group without ``complete`` is garbage
from an interrupted run: the next run deletes and redoes it.

Compression is Blosc with bit-shuffle (zarr's ``BloscCodec``, backed by numcodecs' Blosc): lz4 for
float features by default (they are near-incompressible, and lz4 decodes ~3x faster than zstd for ~2%
more bytes), zstd for integer codes and metadata arrays; ``StorageConfig.codec`` chooses (see
:func:`target_codec`), followed by a ``crc32c`` checksum on every chunk; every
chunk is written, even an all-fill one, so a missing chunk file is damage rather than zeros
(``integrity.py``; shard attribute ``integrity``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .integrity import INTEGRITY, checked, chunk_config, with_checksum

SCHEMA_VERSION = 1
REPORTS_DIR = "reports"  # CACHE/reports holds JSON summaries and skip lists, outside the hierarchy

# zarr lists every directory of a group and warns about ones that are not Zarr nodes; ours is known.
warnings.filterwarnings("ignore", message=f"Object at {REPORTS_DIR} is not recognized")
DTYPES = ("fp32", "fp16", "bf16", "int8")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("digpt")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


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


CODECS = ("auto", "zstd", "lz4")


def compressor(clevel: int, cname: str = "zstd") -> BloscCodec:
    return BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle")


def target_codec(codec: str, codes: bool) -> str:
    """The Blosc codec of the target arrays. ``auto``: zstd for integer codes (they compress ~2x),
    lz4 for float features — teacher features are near-incompressible (zstd saves 2-4% on fp16
    EfficientNet tokens) and lz4 decodes ~3x faster (1.4 vs 0.44 GB/s on this project's CPU), which
    is what the loader pays per sample. Metadata arrays always use zstd."""
    if codec == "auto":
        return "zstd" if codes else "lz4"
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
    clevel: int
    num_codes: int = 0
    codec: str = "zstd"


def create_shard_group(tok: zarr.Group, sid: str, shard: str, lay: ShardLayout) -> zarr.Group:
    """(Re)create an empty shard group. Any previous, incomplete group is deleted first."""
    if sid in tok:
        del tok[sid]
    g = tok.create_group(sid)
    # ``integrity``: every chunk is written (even all-fill ones) and checksummed; readers rely on both.
    g.attrs["shard"] = {"name": shard, "rows": lay.rows, "integrity": INTEGRITY}
    n, k, t, d, c = lay.rows, lay.views, lay.tokens, lay.dim, max(1, min(lay.chunk_rows, lay.rows))
    comp, target_comp = compressor(lay.clevel), compressor(lay.clevel, target_codec(lay.codec, lay.codes))

    def arr(name: str, shape: tuple[int, ...], dtype: str, fill: Any = 0, target: bool = False) -> None:
        chunks = (c, *shape[1:]) if shape else shape
        g.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill,
            config=chunk_config(),
            compressors=with_checksum(target_comp if target else comp),
        )

    if lay.codes:
        arr("tokens", (n, k, t), "int16" if lay.num_codes <= 32767 else "int32", target=True)
    else:
        arr("tokens", (n, k, t, d), zarr_dtype(lay.dtype), target=True)
        if lay.dtype == "int8":
            arr("token_scale", (n, k, t), "float32")
    if lay.has_cls and not lay.codes:
        arr("cls", (n, k, d), zarr_dtype(lay.dtype), target=True)
        if lay.dtype == "int8":
            arr("cls_scale", (n, k), "float32")
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


TARGET_ARRAYS = ("tokens", "token_scale", "cls", "cls_scale")
"""The arrays of a shard group that hold teacher outputs (the rest is the view plan and bookkeeping)."""


def write_rows(
    g: zarr.Group,
    lo: int,
    hi: int,
    idx: np.ndarray,
    tokens: torch.Tensor | None,
    cls: torch.Tensor | None,
    lay: ShardLayout,
) -> None:
    """Write the targets of rows ``[lo, hi)`` — whole chunks, each written once.

    ``idx``: the rows (relative to ``lo``) that decoded, whose teacher outputs are ``tokens``
    ``[len(idx) * K, T, D]`` (codes: ``[len(idx) * K, T]``) and ``cls`` ``[len(idx) * K, D]`` or ``None``;
    the other rows hold fill values (zeros). ``tokens is None``: no row decoded, every target array's
    rows are zeros, written all the same (a missing chunk reads as damage)."""
    m, k = hi - lo, lay.views
    if tokens is None:
        for name in TARGET_ARRAYS:
            if name in g:
                g[name][lo:hi] = 0
        return
    if lay.codes:
        block = np.zeros((m, k, lay.tokens), dtype=np.dtype(g["tokens"].dtype))
        block[idx] = tokens.reshape(len(idx), k, lay.tokens).numpy()
        g["tokens"][lo:hi] = block
        return
    stored, scale = encode_block(tokens.reshape(len(idx), k, lay.tokens, lay.dim), lay.dtype)
    block = np.zeros((m, *stored.shape[1:]), dtype=stored.dtype)
    block[idx] = stored
    g["tokens"][lo:hi] = block
    if scale is not None:
        sblock = np.zeros((m, *scale.shape[1:]), dtype=np.float32)
        sblock[idx] = scale
        g["token_scale"][lo:hi] = sblock
    if cls is not None and "cls" in g:
        stored, scale = encode_block(cls.reshape(len(idx), k, lay.dim), lay.dtype)
        block = np.zeros((m, *stored.shape[1:]), dtype=stored.dtype)
        block[idx] = stored
        g["cls"][lo:hi] = block
        if scale is not None:
            sblock = np.zeros((m, k), dtype=np.float32)
            sblock[idx] = scale
            g["cls_scale"][lo:hi] = sblock


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
