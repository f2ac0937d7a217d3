"""The fused attention paths agree with the eager reference, forward and backward, under every mask."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from student.attention import (
    Attention,
    AttnMask,
    CrossAttention,
    _cached_dense,
    attend,
    dense_block_causal_mask,
    flex_available,
    set_attn_impl,
)

DIM, HEADS, BATCH = 16, 2, 3
MASKS = {
    "no-prefix": {"n_prefix": 0},
    "prefix-own": {"n_prefix": 1, "prefix": "own"},
    "prefix-last": {"n_prefix": 1, "prefix": "last"},
}


def _permuted(x: torch.Tensor, n_prefix: int, gen: torch.Generator) -> torch.Tensor:
    """Gather the non-prefix rows of ``x [B, L, D]`` into a random order per sample."""
    n = x.shape[1] - n_prefix
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(x.shape[0])]) + n_prefix
    prefix = torch.arange(n_prefix).expand(x.shape[0], -1)
    return x.gather(1, torch.cat([prefix, perm], 1)[..., None].expand(-1, -1, x.shape[-1]))


def _run(module, impl, inputs, mask):
    module = set_attn_impl(copy.deepcopy(module), impl)
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(*inputs, mask=mask)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    grads = [t.grad for t in inputs] + [p.grad for p in module.parameters()]
    return out, grads


def test_dense_mask_rules():
    own = dense_block_causal_mask(1, 3, 2, prefix="own").int()
    assert own.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    last = dense_block_causal_mask(1, 3, 2, prefix="last").int()
    assert last[0].tolist() == [1] * 7  # the class token sees every cluster
    assert last[:, 0].tolist() == [1, 0, 0, 0, 0, 1, 1]  # only the last cluster sees it
    assert torch.equal(dense_block_causal_mask(0, 5, 1), torch.ones(5, 5).tril().bool())


@pytest.mark.parametrize("n_clusters, c", [(3, 49), (3, 4), (5, 2)])
def test_last_prefix_is_the_official_reflect_padded_mask(n_clusters, c):
    # Official layout: [clusters..., cls]; block-tril over clusters, then one reflect-padded row/column.
    # (Reflect copies row/column L-2, which lies in the last cluster only when c >= 2; for c = 1 the
    # official trick would put cls in the second-to-last cluster, so "last" is defined by the rule.)
    blocks = torch.kron(torch.ones(n_clusters, n_clusters).tril(), torch.ones(c, c))
    official = F.pad(blocks[None, None], (0, 1, 0, 1), mode="reflect")[0, 0].bool()
    ours = dense_block_causal_mask(1, n_clusters, c, prefix="last")
    to_end = torch.cat([torch.arange(1, ours.shape[0]), torch.tensor([0])])  # move cls from first to last
    assert torch.equal(ours[to_end][:, to_end], official)


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_dense"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("c", [1, 3, 4])
def test_self_attention_paths_match_eager(impl, mask_kind, c):
    gen = torch.Generator().manual_seed(c)
    mask = AttnMask(cluster_size=c, **MASKS[mask_kind])
    x = _permuted(torch.randn(BATCH, mask.n_prefix + 4 * c, DIM, generator=gen), mask.n_prefix, gen)
    attn = Attention(DIM, HEADS)
    ref, ref_grads = _run(attn, "eager", [x], mask)
    out, grads = _run(attn, impl, [x], mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_dense"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("c, q_prefix", [(1, None), (3, None), (4, 0)])
def test_cross_attention_paths_match_eager(impl, mask_kind, c, q_prefix):
    gen = torch.Generator().manual_seed(10 + c)
    mask = AttnMask(cluster_size=c, n_query_prefix=q_prefix, **MASKS[mask_kind])
    queries = torch.randn(BATCH, mask.q_prefix + 3 * c, DIM, generator=gen)
    memory = _permuted(torch.randn(BATCH, mask.n_prefix + 3 * c, DIM, generator=gen), mask.n_prefix, gen)
    attn = CrossAttention(DIM, HEADS)
    ref, ref_grads = _run(attn, "eager", [queries, memory], mask)
    out, grads = _run(attn, impl, [queries, memory], mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [1, 2])
def test_gathered_block_mask_equals_per_sample_permuted_mask(c):
    """DESIGN's fact (a): a per-sample permuted-causal mask in raster order equals gathering into
    permutation order, one shared block-causal mask, and scattering back."""
    gen = torch.Generator().manual_seed(0)
    n_clusters, d = 5, 8
    q, k, v = torch.randn(3, BATCH, 1, n_clusters * c, d, generator=gen)
    cluster_order = torch.stack([torch.randperm(n_clusters, generator=gen) for _ in range(BATCH)])
    perm = (cluster_order[:, :, None] * c + torch.arange(c)).flatten(1)  # token order, [B, L]
    rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm)) // c
    raster_mask = (rank[:, None, :] <= rank[:, :, None])[:, None]  # [B, 1, L, L]
    scores = (q @ k.transpose(-2, -1) / d**0.5).masked_fill(~raster_mask, float("-inf"))
    ref = scores.softmax(-1) @ v

    def take(t):
        return t.gather(2, perm[:, None, :, None].expand_as(t))

    out_perm = attend(take(q), take(k), take(v), AttnMask(cluster_size=c), "sdpa")
    out = torch.empty_like(out_perm).scatter_(2, perm[:, None, :, None].expand_as(out_perm), out_perm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_fast_path_and_cache():
    assert AttnMask.causal().is_causal(7, 7)
    assert AttnMask(1, n_prefix=1, prefix="own").is_causal(7, 7)  # a self-only prefix is plain causal
    assert not AttnMask(1, n_prefix=1, prefix="last").is_causal(7, 7)
    assert not AttnMask(2).is_causal(8, 8) and not AttnMask.causal().is_causal(6, 7)
    q, k, v = torch.randn(3, 2, HEADS, 7, 8)
    mask = AttnMask(1, n_prefix=1)
    torch.testing.assert_close(attend(q, k, v, mask, "sdpa"), attend(q, k, v, mask, "eager"), atol=1e-5, rtol=1e-5)
    m = AttnMask(3, n_prefix=1, prefix="last")
    assert _cached_dense(m, 10, 10, torch.device("cpu")) is _cached_dense(m, 10, 10, torch.device("cpu"))


def test_unknown_impl_is_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="bogus"):
        attend(q, q, q, None, "bogus")
    with pytest.raises(ValueError, match="prefix"):
        AttnMask(2, n_prefix=1, prefix="middle")


def _flex_forward_or_skip(q, k, v, mask):
    ok, why = flex_available()
    if not ok:
        pytest.skip(why)
    try:
        with torch.no_grad():
            return attend(q, k, v, mask, "flex")
    except Exception as e:  # noqa: BLE001 - any backend failure means "unsupported here"
        pytest.skip(f"FlexAttention forward unsupported on this CPU build: {type(e).__name__}: {e}")


@pytest.mark.parametrize(
    "mask",
    [None, AttnMask.causal(), AttnMask(3, 1, "own"), AttnMask(3, 1, "last"), AttnMask(4, 1, "last", n_query_prefix=0)],
)
def test_flex_forward_matches_eager_on_cpu(mask):
    gen = torch.Generator().manual_seed(1)
    q_pref = 0 if mask is None else mask.q_prefix
    kv_pref = 0 if mask is None else mask.n_prefix
    q = torch.randn(2, HEADS, q_pref + 12, 8, generator=gen)
    k, v = torch.randn(2, 2, HEADS, kv_pref + 12, 8, generator=gen)
    out = _flex_forward_or_skip(q, k, v, mask)
    torch.testing.assert_close(out, attend(q, k, v, mask, "eager"), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("mask", [AttnMask.causal(), AttnMask(49, 1, "last"), AttnMask(4, 1, "own")])
def test_fused_paths_forward_backward_on_gpu(impl, mask):
    torch.manual_seed(0)
    length = mask.n_prefix + 3 * mask.cluster_size
    x = torch.randn(4, length, 64, device="cuda")
    attn = Attention(64, 4).cuda()
    ref, ref_grads = _run(attn, "eager", [x], mask)
    out, grads = _run(attn, impl, [x], mask)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4)
