"""The ViT encoder (timm compatibility, ordering), D-iGPT's decoders (shapes, no leak, order), and the
``masked`` objective across student and teacher grids (no leak across the mask)."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from student.attention import set_attn_impl
from student.blind import BlindStats
from student.digpt_model import DiGPT, DiGPTConfig, digpt_loss, loss_cos, random_cluster_order
from student.objectives import StudentConfig, TargetSpec, create_objective
from student.objectives.distill import MaskedConfig
from student.sizes import VIT_SIZES, timm_kwargs_for, vit_config
from student.vit import VisionTransformer, timm_conv_stem_embed

TINY = vit_config("tiny-test")  # 32 px, patch 8 -> 4x4 grid


def _digpt(cluster_size=2, target_grid=(6, 6), attn_impl="sdpa", **kw) -> DiGPT:
    torch.manual_seed(0)
    cfg = DiGPTConfig(
        encoder=TINY,
        cluster_size=cluster_size,
        decoder_dim=32,
        decoder_heads=2,
        target_dim=16,
        target_grid=target_grid,
        **kw,
    )
    return DiGPT(cfg, attn_impl).eval()


def _images(batch=2, seed=0) -> torch.Tensor:
    return torch.randn(batch, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(seed))


def test_vit_shapes():
    vit = VisionTransformer(TINY)
    x = _images()
    n, d = TINY.num_patches, TINY.embed_dim
    assert vit.patchify(x).shape == (2, n, TINY.patch_size**2 * 3)
    assert vit.embed(x).shape == (2, 1 + n, d)
    order = torch.stack([torch.randperm(n)[:10] for _ in range(2)])
    final, layers = vit.forward_features(x, order, return_layers=(0, 3))
    assert final.shape == (2, 11, d) and sorted(layers) == [0, 3] and layers[3].shape == (2, 11, d)
    inter = vit.forward_intermediates(x)
    assert len(inter) == TINY.depth and torch.equal(inter[-1], vit.forward_features(x, final_norm=False)[0])
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    with pytest.raises(ValueError, match="return_layers"):
        vit.forward_features(x, return_layers=(TINY.depth,))


@pytest.mark.parametrize("name", list(VIT_SIZES))
def test_state_dict_keys_match_timm(name):
    preset = VIT_SIZES[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost, even for ViT-L
        extra = {"embed_layer": timm_conv_stem_embed()} if preset.config.stem == "conv" else {}
        ref = timm.create_model(preset.timm_name, pretrained=False, num_classes=0, **preset.timm_kwargs, **extra)
        ref2 = timm.create_model(preset.timm_name, pretrained=False, **timm_kwargs_for(preset.config), **extra)
        ours = VisionTransformer(preset.config)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref2.state_dict().items()}


@pytest.mark.parametrize("sincos", [True, False])
def test_timm_loads_our_weights_and_agrees(sincos):
    cfg = dataclasses.replace(TINY, sincos_pos_embed=sincos)
    ours = VisionTransformer(cfg).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **timm_kwargs_for(cfg)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_gather_is_a_pure_permutation_of_rows():
    """Positions are added before the gather: with no mask, encoding in any order = permuting rows."""
    vit = VisionTransformer(TINY).eval()
    x = _images()
    perm = torch.stack([torch.randperm(TINY.num_patches) for _ in range(2)])
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), perm + 1], 1)[..., None].expand(-1, -1, TINY.embed_dim)
    assert torch.equal(vit.gather(vit.embed(x), perm), vit.embed(x).gather(1, rows))
    with torch.no_grad():
        plain, _ = vit.forward_features(x)
        ordered, _ = vit.forward_features(x, perm)
    torch.testing.assert_close(ordered, plain.gather(1, rows), atol=1e-5, rtol=1e-5)


def _perturb_cluster(x: torch.Tensor, order: torch.Tensor, slot: int, model: DiGPT) -> torch.Tensor:
    """Add noise to the pixels of each sample's cluster at position ``slot`` of its order."""
    side = model.cfg.cluster_size * model.cfg.encoder.patch_size
    x = x.clone()
    for b, cluster in enumerate(order[:, slot].tolist()):
        r, c = divmod(cluster, model.cfg.clusters_per_side)
        x[b, :, r * side : (r + 1) * side, c * side : (c + 1) * side] += torch.randn(3, side, side)
    return x


@pytest.mark.parametrize("cluster_size, target_grid, slot", [(2, (6, 6), 1), (2, (6, 6), 2), (1, (8, 8), 5)])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_no_leak_from_later_clusters(cluster_size, target_grid, slot, attn_impl):
    model = _digpt(cluster_size, target_grid, attn_impl)
    x = _images()
    order = torch.stack(
        [torch.randperm(model.cfg.n_clusters, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    )
    x2 = _perturb_cluster(x, order, slot, model)
    with torch.no_grad():
        seen = model.cluster_patches[order][:, :-1].flatten(1)
        enc, enc2 = model.forward_encoder(x, seen)[-1], model.forward_encoder(x2, seen)[-1]
        out, out2 = model(x, order), model(x2, order)
    tok = 1 + slot * cluster_size**2  # encoder rows before the perturbed cluster (class token first)
    torch.testing.assert_close(enc2[:, 1:tok], enc[:, 1:tok], atol=1e-6, rtol=0)
    assert (enc2[:, tok:] - enc[:, tok:]).abs().amax(dim=-1).min() > 1e-4  # every later row changes
    assert not torch.allclose(enc2[:, 0], enc[:, 0])  # the class token sits in the last visible cluster
    rows = slot * model.cfg.target_share[0] * model.cfg.target_share[1]
    for a, b in ((out.gen, out2.gen), (out.dis, out2.dis)):  # gen row-group t predicts cluster t+1 from <= t
        torch.testing.assert_close(b.pred[:, :rows], a.pred[:, :rows], atol=1e-6, rtol=0)
        assert (b.pred[:, rows:] - a.pred[:, rows:]).abs().amax(dim=-1).min() > 1e-5
        assert not torch.allclose(b.cls, a.cls)


def test_never_encoded_cluster_changes_nothing():
    model = _digpt()
    x, order = _images(), random_cluster_order(2, 4, torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, out2 = model(x, order), model(_perturb_cluster(x, order, 3, model), order)
    for (name, a), (_, b) in zip(out.decoders(), out2.decoders(), strict=True):
        for field in ("pred", "index", "cls"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)


def test_order_matters_and_index_maps_align():
    model = _digpt()
    x = _images(1).expand(3, -1, -1, -1)
    order = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 2], [1, 0, 2, 3]])
    with torch.no_grad():
        out = model(x, order)
    share = model.cfg.target_share[0] * model.cfg.target_share[1]
    # Same visible prefix (clusters 0, 1): same discriminative predictions for them, at the same targets.
    dis = out.dis
    assert torch.equal(dis.index[0, : 2 * share], dis.index[1, : 2 * share])
    torch.testing.assert_close(dis.pred[1, : 2 * share], dis.pred[0, : 2 * share], atol=1e-6, rtol=0)
    # Different position in the order: cluster 0 seen alone vs after cluster 1.
    first = dis.pred[0, :share]
    other = dis.pred[2, share : 2 * share]
    assert torch.equal(dis.index[0, :share], dis.index[2, share : 2 * share])
    assert not torch.allclose(first, other, atol=1e-4)
    # Per-sample orders in one batch equal running each sample alone.
    with torch.no_grad():
        alone = model(x[:1], order[2:])
    torch.testing.assert_close(alone.gen.pred[0], out.gen.pred[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cluster_size, target_grid", [(1, (4, 4)), (2, (4, 4)), (2, (6, 6)), (1, (8, 8))])
@pytest.mark.parametrize("predict_cls, cls_mode", [(True, "last_cluster"), (False, "prefix")])
def test_forward_backward(cluster_size, target_grid, predict_cls, cls_mode):
    model = _digpt(cluster_size, target_grid, predict_cls=predict_cls, cls_mode=cls_mode).train()
    cfg = model.cfg
    order = random_cluster_order(2, cfg.n_clusters, torch.Generator().manual_seed(1))
    out = model(_images(), order)
    rows = (cfg.n_clusters - 1) * cfg.target_share[0] * cfg.target_share[1]
    assert out.gen.pred.shape == out.dis.pred.shape == (2, rows, cfg.target_dim)
    assert out.gen.index.shape == (2, rows) and int(out.gen.index.max()) < target_grid[0] * target_grid[1]
    assert (out.gen.cls is not None) == (out.dis.cls is not None) == predict_cls
    tokens = torch.randn(2, target_grid[0] * target_grid[1], cfg.target_dim)
    losses = digpt_loss(out, tokens, torch.randn(2, cfg.target_dim))
    losses["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert not model.encoder.norm.weight.requires_grad and not model.encoder.pos_embed.requires_grad


def test_output_has_one_entry_per_built_decoder():
    """A generative-only model (the paper's Table 9 row) returns no discriminative output; its rows are the
    ones :meth:`DiGPT.target_index` names, and the loss logs only the decoders present."""
    model = _digpt(decoders=("gen",), predict_cls=False, cls_mode="prefix")
    order = random_cluster_order(2, model.cfg.n_clusters, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(_images(), order)
    assert out.dis is None and out.gen.cls is None and [n for n, _ in out.decoders()] == ["gen"]
    assert torch.equal(out.gen.index, model.target_index(order)[0])
    tokens = torch.randn(2, 36, model.cfg.target_dim)
    assert sorted(digpt_loss(out, tokens, torch.randn(2, model.cfg.target_dim))) == ["gen", "loss"]


def test_impls_agree_on_the_whole_model():
    model = _digpt()
    x, order = _images(), random_cluster_order(2, 4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, order)
        for impl in ("sdpa_dense", "sdpa"):
            out = set_attn_impl(model, impl)(x, order)
            for (_, a), (_, b) in zip(out.decoders(), ref.decoders(), strict=True):
                torch.testing.assert_close(a.pred, b.pred, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.cls, b.cls, atol=1e-5, rtol=1e-5)
                assert torch.equal(a.index, b.index)


def test_config_defaults_and_errors():
    cfg = DiGPTConfig()
    assert (cfg.n_clusters, cfg.target_share, cfg.memory_blocks) == (4, (8, 8), (5, 7, 9, 11))
    assert DiGPTConfig(encoder=vit_config("vit_large")).memory_blocks == (11, 15, 19, 23)
    with pytest.raises(ValueError, match="cluster_size"):
        DiGPTConfig(cluster_size=5)
    with pytest.raises(ValueError, match="target_grid"):
        DiGPTConfig(target_grid=(15, 15))
    with pytest.raises(ValueError, match="predict_cls"):
        DiGPTConfig(cls_mode="prefix")
    with pytest.raises(ValueError, match="order"):
        _digpt()(_images(), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("cluster_size, target_grid", [(2, (2, 2)), (2, (6, 6)), (1, (4, 4)), (2, (4, 4))])
def test_head_and_resampling_commute(cluster_size, target_grid):
    """The head runs before or after the resampling to the teacher grid, whichever is cheaper: both orders
    give the same predictions (bilinear weights sum to 1, the head is affine) and the same gradients."""
    model = _digpt(cluster_size, target_grid).train()
    feats = torch.randn(2, 3 * cluster_size**2, 32, requires_grad=True)
    head = model.gen.head
    fast = model.predict_on_target_grid(head, feats)
    slow = model.to_target_grid(head(feats))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fast)
    (ga,) = torch.autograd.grad(fast, feats, g)
    (gb,) = torch.autograd.grad(slow, feats, g)
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
    cheaper_first = model.cfg.target_share[0] * model.cfg.target_share[1] < cluster_size**2
    assert cheaper_first == (target_grid == (2, 2))  # 1x1 of 2x2: resample first; else the head goes first


def _masked_objective(target_grid, ratio=0.5, size="tiny-test"):
    torch.manual_seed(0)
    spec = TargetSpec("t", 16, target_grid, True)
    return create_objective("masked", StudentConfig(size), spec, knobs=MaskedConfig(ratio)).eval()


def _masked_batch(obj, seeds=(5, 17, 123456789), gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    b, px, (h, w) = len(seeds), obj.encoder.cfg.img_size, obj.target.grid
    return {
        "images": torch.randn(b, 3, px, px, generator=g),
        "tokens": torch.randn(b, h * w, 16, generator=g),
        "cls": torch.randn(b, 16, generator=g),
        "order_seed": torch.tensor(seeds),
    }


def _footprint(t: int, grid: tuple[int, int], px: int) -> tuple[slice, slice]:
    """The pixels under teacher token ``t`` (raster on ``grid``) of a ``px``-pixel view."""
    (h, w), (r, c) = grid, divmod(t, grid[1])
    return slice(r * px // h, -(-(r + 1) * px // h)), slice(c * px // w, -(-(c + 1) * px // w))


@pytest.mark.parametrize("target_grid", [(4, 4), (2, 2), (8, 8), (3, 3), (6, 6), (2, 8)])
def test_masked_objective_no_leak_across_the_mask(target_grid):
    """``masked`` on any teacher grid (student 4x4): the student never sees a pixel under a scored teacher
    token, and no scored prediction is built from a visible patch's output. Black-box: the scored targets
    are those the loss has a gradient for, the visible patches those whose pixels it has a gradient for."""
    obj = _masked_objective(target_grid)
    batch = _masked_batch(obj)
    images = batch["images"].requires_grad_()
    tokens = batch["tokens"].requires_grad_()
    seen = {}
    obj.head.register_forward_pre_hook(lambda m, args: seen.setdefault("feats", args[0]).retain_grad())
    loss, _ = obj(batch)
    loss.backward()
    scored = tokens.grad.abs().sum(-1) > 0  # [B, T]
    p, g = obj.encoder.cfg.patch_size, obj.encoder.cfg.grid_size
    pix = images.grad.abs().sum(1).reshape(-1, g, p, g, p).sum((2, 4)).flatten(1)
    visible = pix > 0  # [B, N]: masked patches are replaced by the mask token, their pixels get no gradient
    assert scored.any(-1).all() and visible.any(-1).all() and not visible.all(-1).any()
    # 1. Pixels under scored teacher tokens are all hidden: changing them changes nothing, bit for bit.
    px = obj.encoder.cfg.img_size
    x2 = images.detach().clone()
    for b, t in scored.nonzero().tolist():
        rows, cols = _footprint(t, target_grid, px)
        x2[b, :, rows, cols] += 10 * torch.randn_like(x2[b, :, rows, cols])
    with torch.no_grad():
        after = obj({**batch, "images": x2, "tokens": tokens.detach()})[0]
    assert float((after - loss.detach()).abs()) == 0.0
    # 2. Scored predictions read masked positions' outputs only.
    leak = seen["feats"].grad.abs().sum(-1)[visible]
    assert float(leak.max()) == 0.0
    # 3. The blind baseline scores the same teacher tokens.
    tok = tokens.detach().clone().requires_grad_()
    stats = BlindStats(token_unit_mean=torch.randn(tok.shape[1:]), cls_unit_mean=torch.randn(16))
    obj.blind_loss({**batch, "tokens": tok}, stats).backward()
    assert torch.equal(tok.grad.abs().sum(-1) > 0, scored)


def test_masked_objective_on_equal_grids_is_unchanged():
    """Student and teacher on one grid: the loss is bit for bit what it was before the cross-grid fix (the
    code of that version, inlined)."""
    obj = _masked_objective((4, 4))
    batch = _masked_batch(obj)
    enc, x, n = obj.encoder, batch["images"], obj.encoder.cfg.num_patches
    k = max(1, round(obj.mask_ratio * n))
    mask = torch.stack(
        [
            torch.zeros(n, dtype=torch.bool).index_fill_(
                0, torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k], True
            )
            for s in batch["order_seed"].tolist()
        ]
    )
    with torch.no_grad():
        t = torch.where(mask[..., None], obj.mask_token, enc.patch_embed(x))
        t = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + enc.pos_embed
        for blk in enc.blocks:
            t = blk(t)
        feats, w = enc.norm(t), mask.float()
        tok = (loss_cos(obj.head(feats[:, 1:]), batch["tokens"]) * w).sum() / w.sum().clamp_min(1)
        ref = tok + loss_cos(obj.cls_head(feats[:, 0]), batch["cls"]).mean()
        loss, metrics = obj(batch)
    assert torch.equal(loss, ref) and torch.equal(metrics["tokens"], tok)
    got_mask, got_weight = obj.mask_and_weight(batch["order_seed"], "cpu")
    assert torch.equal(got_mask, mask) and torch.equal(got_weight, w)


@pytest.mark.parametrize(
    "target_grid, masked, scored",
    [((2, 2), 0.5, 0.5), ((8, 8), 0.5, 0.5), ((2, 8), 0.5, 0.5), ((3, 3), (0.3, 0.7), (0.1, 0.6))],
)
def test_masked_objective_mask_across_grids(target_grid, masked, scored):
    """Deterministic from the seeds; close to ``mask_ratio`` of the patches masked, and all of the masked
    area scored on an integer grid ratio; every sample has a scored token; a 1x1 teacher grid is refused."""
    obj = _masked_objective(target_grid)
    seeds = torch.arange(64) * 7919
    mask, weight = obj.mask_and_weight(seeds, "cpu")
    again, weight2 = obj.mask_and_weight(seeds, "cpu")
    assert torch.equal(mask, again) and torch.equal(weight, weight2)
    assert not torch.equal(mask[0], mask[1]) and (weight.sum(-1) > 0).all() and (~mask).any(-1).all()
    if isinstance(masked, float):
        assert float(mask.float().mean()) == masked and float(weight.mean()) == scored
    else:
        assert masked[0] < float(mask.float().mean()) < masked[1] and scored[0] < float(weight.mean()) < scored[1]


def test_masked_objective_refuses_a_mask_that_hides_everything():
    with pytest.raises(ValueError, match="nothing would stay visible"):
        _masked_objective((1, 1))
