"""SemAIM's published order (``semaim``): start at the patch most like the global token, then outward by
Euclidean grid distance (skyoux/SemAIM ``generate_attention_distance_center_permutation``), at cluster
granularity; the similarity comes from the teacher, or for pixel targets from the model's own encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student.digpt_model import cluster_index
from student.objectives import StudentConfig, TargetSpec, create_objective, list_objectives
from student.orders import get_order, list_orders, needs_similarity, similarity_map
from student.train import OptimConfig, TrainConfig, build_run, train

semaim = get_order("semaim")


def _brute_force(sim: torch.Tensor, seed: int) -> list[int]:
    """SemAIM per patch, from its code's description: argmax start, ascending Euclidean distance from it,
    ties broken by noise * 1e-3 (here the order's documented seeded noise)."""
    h, w = sim.shape
    flat = sim.flatten().tolist()
    start = max(range(h * w), key=lambda i: flat[i])
    r0, c0 = divmod(start, w)
    noise = torch.rand(h * w, generator=torch.Generator().manual_seed(seed)).tolist()
    score = [math.sqrt((i // w - r0) ** 2 + (i % w - c0) ** 2) + 1e-3 * noise[i] for i in range(h * w)]
    return sorted(range(h * w), key=lambda i: score[i])


def _centre_distances(start: int, w: int, cells: torch.Tensor) -> list[float]:
    r0, c0 = divmod(start, w)
    out = []
    for row in cells.tolist():
        rs, cs = [i // w for i in row], [i % w for i in row]
        out.append(math.hypot(sum(rs) / len(rs) - r0, sum(cs) / len(cs) - c0))
    return out


def test_registered_and_semantic_retired():
    assert {"semaim", "similarity"} <= set(list_orders()) and "semantic" not in list_orders()
    assert needs_similarity(semaim) and not needs_similarity(get_order("similarity"))
    with pytest.raises(ValueError) as e:
        get_order("semantic")
    msg = str(e.value)
    assert "retired" in msg and "semaim" in msg and "similarity" in msg and "SemAIM" in msg


def test_per_patch_matches_brute_force_on_14x14():
    g = torch.Generator().manual_seed(0)
    b = 6
    sim = torch.randn(b, 14, 14, generator=g)
    seeds = torch.arange(100, 100 + b)
    got = semaim({"similarity": sim, "order_seed": seeds}, 196, cluster_index(14, 14, 14))
    for i in range(b):
        want = _brute_force(sim[i], int(seeds[i]))
        assert got[i].tolist() == want
        assert want[0] == int(sim[i].flatten().argmax())  # the start patch first (distance 0)
        r0, c0 = divmod(want[0], 14)
        d = [math.hypot(p // 14 - r0, p % 14 - c0) for p in want]
        assert all(x <= y + 1e-9 for x, y in zip(d, d[1:]))  # nearest first


def test_per_patch_from_teacher_tokens_through_the_objective():
    """Clusters of one patch, student and teacher grids equal: the objective hands SemAIM's order computed
    from the cosine of the teacher's class token to its patch tokens."""
    obj = create_objective(
        "digpt", StudentConfig("tiny-test", cluster_size=1), TargetSpec("t", 32, (4, 4), True), "semaim"
    )
    g = torch.Generator().manual_seed(1)
    batch = {
        "images": torch.rand(4, 3, 32, 32, generator=g),
        "order_seed": torch.arange(4),
        "tokens": torch.randn(4, 16, 32, generator=g),
        "cls": torch.randn(4, 32, generator=g),
    }
    got = obj.cluster_order(batch)
    for i in range(4):
        sim = F.cosine_similarity(batch["tokens"][i], batch["cls"][i][None], dim=-1).view(4, 4)
        assert got[i].tolist() == _brute_force(sim, i)


def test_teacher_similarity_reads_raw_tokens():
    """The trainer standardises targets per channel before the objective sees them; the order reads the
    raw tokens kept beside them (``teacher_view``), so the statistics do not move it."""
    from student.targets import TargetNorm

    obj = create_objective("digpt", StudentConfig("tiny-test"), TargetSpec("t", 32, (4, 4), True), "semaim")
    g = torch.Generator().manual_seed(4)
    batch = {
        "images": torch.rand(8, 3, 32, 32, generator=g),
        "order_seed": torch.arange(8),
        "tokens": torch.randn(8, 16, 32, generator=g) + 3.0 * torch.randn(32, generator=g),
        "cls": torch.randn(8, 32, generator=g),
    }
    raw = obj.cluster_order(batch)
    std = torch.exp(2 * torch.randn(32, generator=g))
    normed = TargetNorm(3 * torch.randn(32, generator=g), std, torch.randn(32, generator=g), std)(batch)
    assert "raw_tokens" in normed and torch.equal(obj.cluster_order(normed), raw)


@pytest.mark.parametrize(("grid", "per_side"), [((14, 14), 2), ((16, 16), 4), ((8, 12), 4)])
def test_cluster_order_starts_at_the_start_cluster_then_ascends_by_centre_distance(grid, per_side):
    h, w = grid
    cells = cluster_index(h, w, per_side)
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(16, h, w, generator=g)
    order = semaim({"similarity": sim, "order_seed": torch.arange(16)}, per_side**2, cells)
    for i in range(16):
        start = int(sim[i].flatten().argmax())
        assert sorted(order[i].tolist()) == list(range(per_side**2))
        assert start in cells[order[i, 0]].tolist()
        d = _centre_distances(start, w, cells)
        rest = [d[k] for k in order[i, 1:].tolist()]
        assert all(x <= y + 1e-9 for x, y in zip(rest, rest[1:])), rest


def test_seeded_ties_only():
    """Same order_seed, same order; another seed only permutes clusters at equal distance."""
    h = w = 16
    cells = cluster_index(h, w, 4)
    sim = torch.zeros(1, h, w)
    sim[0, 1, 1] = 1.0  # start (1, 1): clusters (0, 1) and (1, 0) are equally far, and more such pairs
    d = _centre_distances(17, w, cells)
    orders = [semaim({"similarity": sim, "order_seed": torch.tensor([s])}, 16, cells)[0].tolist() for s in range(12)]
    again = semaim({"similarity": sim, "order_seed": torch.tensor([3])}, 16, cells)[0].tolist()
    assert again == orders[3]
    for o in orders:
        assert o[0] == 0  # cluster (0, 0) holds the start patch
        assert [round(d[k], 6) for k in o] == sorted(round(x, 6) for x in d)
    assert len({tuple(o) for o in orders}) > 1  # the ties are broken differently by other seeds
    # No global RNG: drawing from it in between changes nothing.
    torch.manual_seed(0)
    torch.rand(5)
    assert semaim({"similarity": sim, "order_seed": torch.tensor([3])}, 16, cells)[0].tolist() == orders[3]


def test_similarity_map_falls_back_to_the_mean_token():
    tokens = torch.randn(2, 6, 8)
    got = similarity_map(tokens, None, (2, 3))
    want = F.cosine_similarity(tokens, tokens.mean(1, keepdim=True), dim=-1).view(2, 2, 3)
    assert torch.allclose(got, want)


def _pixel_objective(target_grid=(4, 4), **student) -> torch.nn.Module:
    patch = 32 // target_grid[0]
    target = TargetSpec(f"pixel:32/{patch}", 3 * patch * patch, target_grid, False)
    assert target.from_pixels
    return create_objective("digpt", StudentConfig("tiny-test", **student), target, "semaim")


def _encoder_order(obj, batch) -> torch.Tensor:
    """The brute-force pixel-target order: the encoder in eval mode, all patches, cosine(CLS, patch)."""
    enc = obj.encoder
    enc.eval()
    with torch.no_grad():
        x = enc.forward_features(batch["images"])[0]
    enc.train()
    g = enc.cfg.grid_size
    sim = F.cosine_similarity(x[:, 1:], x[:, :1], dim=-1).view(-1, g, g)
    return semaim(
        {"similarity": sim, "order_seed": batch["order_seed"]}, obj.model.cfg.n_clusters, obj.model.cluster_patches
    )


def _pixel_batch(b=8, target_grid=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = target_grid[0] * target_grid[1]
    return {
        "images": torch.rand(b, 3, 32, 32, generator=g),
        "order_seed": torch.arange(b),
        "tokens": torch.randn(b, t, 3 * (32 // target_grid[0]) ** 2, generator=g),
    }


def test_pixel_targets_order_from_the_models_encoder():
    assert TargetSpec("kmeans:pixel:32/8", 16, (4, 4), False).from_pixels
    assert TargetSpec("pca:pixel:32/8", 16, (4, 4), False).from_pixels
    assert not TargetSpec("random-vit:32/8", 16, (4, 4), True).from_pixels
    torch.manual_seed(0)
    obj = _pixel_objective(drop_path=0.5)  # eval mode matters: drop path would make the map random
    obj.train()
    batch = _pixel_batch()
    order = obj.cluster_order(batch)
    assert all(m.training for m in obj.modules())  # back in train mode
    assert all(p.grad is None for p in obj.parameters()) and not order.requires_grad
    assert torch.equal(order, obj.cluster_order(batch)) and torch.equal(order, _encoder_order(obj, batch))
    # The pixel tokens play no part ...
    assert torch.equal(order, obj.cluster_order({**batch, "tokens": torch.randn_like(batch["tokens"])}))
    # ... the encoder's weights do.
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(torch.randn_like(p))
    moved = obj.cluster_order(batch)
    assert torch.equal(moved, _encoder_order(obj, batch)) and not torch.equal(moved, order)
    # An objective in eval mode stays in eval mode.
    obj.eval()
    obj.cluster_order(batch)
    assert not any(m.training for m in obj.modules())


def test_pixel_targets_on_another_grid_use_the_student_clusters():
    """pixel:32/4 has an 8x8 grid, the tiny student a 4x4 one: the map lives on the student grid, so the
    order reads the student's cluster index (indices into 16 patches, not 64 teacher tokens)."""
    torch.manual_seed(1)
    obj = _pixel_objective((8, 8))
    batch = _pixel_batch(target_grid=(8, 8))
    assert torch.equal(obj.cluster_order(batch), _encoder_order(obj, batch))
    loss, _ = obj(batch)
    loss.backward()
    assert torch.isfinite(loss)


def _cfg(tiny_dataset, cache, out, tokenizer, objective) -> TrainConfig:
    from student.data import DataConfig

    data = DataConfig(
        shards=tiny_dataset, cache=cache, tokenizer=tokenizer, img_size=32, batch_size=8, shuffle_buffer=16
    )
    return TrainConfig(
        data=data,
        out=str(out),
        student=StudentConfig("tiny-test"),
        objective=objective,
        order="semaim",
        steps=2,
        log_every=1,
        optim=OptimConfig(base_lr=3e-3, warmup=0.1),
    )


PER_PATCH = "next-patch" if "next-patch" in list_objectives() else "igpt"


@pytest.mark.parametrize(
    ("objective", "tokenizer"), [("digpt", "vit"), ("digpt", "pixel"), (PER_PATCH, "pixel"), (PER_PATCH, "vit")]
)
def test_objectives_train_with_semaim(objective, tokenizer, tiny_dataset, tiny_cache, tmp_path):
    cfg = _cfg(tiny_dataset, tiny_cache, tmp_path / f"{objective}-{tokenizer}", tokenizer, objective)
    obj = build_run(cfg)[0]
    assert obj.target.from_pixels == (tokenizer == "pixel")
    losses = [row["loss"] for row in train(cfg, progress=False).history]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
