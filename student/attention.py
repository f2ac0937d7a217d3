"""Attention under (block-)causal masks over sequences laid out in permutation order.

D-iGPT attends in a random cluster order that differs per sample. The encoder gathers the tokens into
that order first (position embeddings already added), after which the mask is the *same* for every
sample: block-causal over consecutive clusters. So one mask per shape serves the whole batch, and fused
kernels can take it:

- ``"eager"``: dense boolean mask, ``softmax(QK^T / sqrt(d)) V`` by hand. The reference for tests only.
- ``"sdpa_dense"``: ``F.scaled_dot_product_attention`` with the dense mask built on every call.
- ``"sdpa"``: the training path. ``is_causal=True`` when the mask is plain causal, else SDPA with the
  dense mask built once per (mask, shape, device) and cached.
- ``"flex"``: FlexAttention with a cached block mask (fully masked tiles are skipped). Compiled on CUDA;
  on CPU torch runs it uncompiled, forward only (torch has no CPU backward for it).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from student.config import ATTN_IMPLS as ATTN_IMPLS  # re-exported beside the kernels it names


@dataclass(frozen=True)
class AttnMask:
    """Block-causal mask over a query and a key sequence, both laid out in cluster order.

    Each sequence is ``n_prefix`` prefix tokens (the class token) followed by clusters of ``cluster_size``
    consecutive tokens. Query ``i`` may attend to key ``j`` iff ``cluster(j) <= cluster(i)``. A plain
    causal mask is ``cluster_size=1, n_prefix=0``; "no mask" is ``None`` wherever a mask is accepted.
    The prefix takes part as follows:

    - ``prefix="own"``: the prefix is cluster -1: it is attended by every query and attends only to the
      prefix.
    - ``prefix="last"`` (official D-iGPT): the prefix belongs to the *last* key cluster: it attends to
      everything, and only queries of the last cluster (and the prefix) attend to it. The official code
      appends the class token at the end of the sequence and reflect-pads the block-causal mask by one
      row/column, which is exactly this rule; we keep the class token first (timm layout) instead.
    """

    cluster_size: int = 1
    """Tokens per cluster (``c*c`` for clusters of ``c x c`` patches)."""
    n_prefix: int = 0
    """Prefix tokens at the start of the key sequence (and of the query sequence, see below)."""
    prefix: Literal["own", "last"] = "own"
    """How the prefix joins the cluster order (see the class docstring)."""
    n_query_prefix: int | None = None
    """Prefix tokens at the start of the query sequence, when it differs (cross-attention); None: same."""

    def __post_init__(self) -> None:
        if self.cluster_size < 1:
            raise ValueError(f"AttnMask.cluster_size must be >= 1, got {self.cluster_size}")
        if self.n_prefix < 0 or (self.n_query_prefix is not None and self.n_query_prefix < 0):
            raise ValueError("AttnMask.n_prefix / n_query_prefix must be >= 0")
        if self.prefix not in ("own", "last"):
            raise ValueError(f"AttnMask.prefix must be 'own' or 'last', got {self.prefix!r}")

    @classmethod
    def causal(cls) -> AttnMask:
        return cls(cluster_size=1)

    @property
    def q_prefix(self) -> int:
        return self.n_prefix if self.n_query_prefix is None else self.n_query_prefix

    def prefix_ids(self, kv_len: int) -> tuple[int, int]:
        """Cluster ids given to prefix queries and prefix keys, for a key sequence of ``kv_len``."""
        if self.prefix == "own":
            return -1, -1
        n_kv_clusters = -(-(kv_len - self.n_prefix) // self.cluster_size)
        return kv_len + 1, n_kv_clusters - 1  # query: sees every key; key: in the last cluster

    def is_causal(self, q_len: int, kv_len: int) -> bool:
        """True when the mask equals SDPA's ``is_causal=True`` for these lengths."""
        same_prefix = self.q_prefix == self.n_prefix
        prefix_is_first_token = self.n_prefix == 0 or (self.n_prefix == 1 and self.prefix == "own")
        return self.cluster_size == 1 and q_len == kv_len and same_prefix and prefix_is_first_token

    def dense(self, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean ``[q_len, kv_len]``, True where attention is allowed."""
        q_pref, kv_pref = self.prefix_ids(kv_len)
        q = torch.arange(q_len, device=device) - self.q_prefix
        k = torch.arange(kv_len, device=device) - self.n_prefix
        q_id = torch.where(q < 0, q_pref, q.div(self.cluster_size, rounding_mode="floor"))
        k_id = torch.where(k < 0, kv_pref, k.div(self.cluster_size, rounding_mode="floor"))
        return k_id[None, :] <= q_id[:, None]


def dense_block_causal_mask(
    n_prefix: int,
    n_clusters: int,
    cluster_size: int,
    device: torch.device | str = "cpu",
    prefix: Literal["own", "last"] = "own",
) -> torch.Tensor:
    """Boolean ``[L, L]`` self-attention mask, ``L = n_prefix + n_clusters * cluster_size``."""
    length = n_prefix + n_clusters * cluster_size
    return AttnMask(cluster_size, n_prefix, prefix).dense(length, length, device)


@functools.lru_cache(maxsize=64)
def _cached_dense(mask: AttnMask, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return mask.dense(q_len, kv_len, device)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(mask: AttnMask, q_len: int, kv_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    p, qp, c = mask.n_prefix, mask.q_prefix, mask.cluster_size
    q_pref, kv_pref = mask.prefix_ids(kv_len)

    def mask_mod(b, h, q_idx, kv_idx):
        q_id = torch.where(q_idx < qp, q_pref, (q_idx - qp) // c)
        kv_id = torch.where(kv_idx < p, kv_pref, (kv_idx - p) // c)
        return kv_id <= q_id

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled flex is the fused kernel; on CPU torch compiles forward only, and the uncompiled
    # reference is cheaper to start, so CPU (tests) runs it uncompiled.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def flex_available() -> tuple[bool, str]:
    """Whether FlexAttention can be imported here, and why not."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the torch build
        return False, f"FlexAttention not importable: {e}"
    return True, ""


def _eager(q, k, v, allowed: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _flex(q, k, v, mask: AttnMask | None) -> torch.Tensor:
    block_mask = None if mask is None else _cached_block_mask(mask, q.shape[-2], k.shape[-2], q.device)
    if q.device.type == "cuda":
        return _flex_fn("cuda")(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_fn(q.device.type)(q, k, v, block_mask=block_mask)


def attend(q, k, v, mask: AttnMask | None, impl: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention. ``q: [B, H, L, d]``, ``k, v: [B, H, S, d]`` -> ``[B, H, L, d]``."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if impl == "sdpa":
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v)
        if mask.is_causal(q_len, kv_len):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_dense(mask, q_len, kv_len, q.device))
    if impl == "flex":
        return _flex(q, k, v, mask)
    allowed = None if mask is None else mask.dense(q_len, kv_len, q.device)
    if impl == "sdpa_dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    if impl == "eager":
        return _eager(q, k, v, allowed)
    raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, D]`` -> ``[B, H, L, D/H]``."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d]`` -> ``[B, L, H*d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Multi-head self-attention; parameter names match timm's ``Attention`` (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: AttnMask | None = None) -> torch.Tensor:
        """``x: [B, L, D]`` -> ``[B, L, D]``."""
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(attend(q, k, v, mask, self.impl)))


class CrossAttention(nn.Module):
    """Multi-head attention from queries into a memory of the same width (``q``, ``kv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.impl = num_heads, impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: AttnMask | None = None) -> torch.Tensor:
        """``x: [B, L, D]``, ``memory: [B, S, D]`` -> ``[B, L, D]``."""
        q = _split_heads(self.q(x), self.num_heads)
        k, v = (_split_heads(t, self.num_heads) for t in self.kv(memory).chunk(2, dim=-1))
        return self.proj(_merge_heads(attend(q, k, v, mask, self.impl)))


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention layer in ``model`` to ``impl``; returns ``model``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.impl = impl
    return model
