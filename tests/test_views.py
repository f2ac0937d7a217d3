"""The view plan: a pure function of (seed, shard, key, view, aug config), and replay that fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_cache.views import AugConfig, plan_fingerprint, plan_shard, replay_view, sample_crop, view_seed

KEYS = [f"k{i:03d}" for i in range(40)]
W = [64 + 7 * i for i in range(40)]
H = [48 + 5 * (i % 9) for i in range(40)]


def test_plan_is_independent_of_order_and_partition():
    aug = AugConfig(views=3, seed=7)
    whole = plan_shard("s0.tar", KEYS, W, H, aug)
    # Planned in reverse order, and in two halves ("two workers"): identical per sample.
    rev = plan_shard("s0.tar", KEYS[::-1], W[::-1], H[::-1], aug)
    a = plan_shard("s0.tar", KEYS[:17], W[:17], H[:17], aug)
    b = plan_shard("s0.tar", KEYS[17:], W[17:], H[17:], aug)
    assert np.array_equal(whole.seeds, rev.seeds[::-1])
    assert np.array_equal(whole.boxes, rev.boxes[::-1])
    assert np.array_equal(whole.boxes, np.concatenate([a.boxes, b.boxes]))
    assert np.array_equal(whole.flips, np.concatenate([a.flips, b.flips]))


def test_plan_changes_with_identity_and_config():
    aug = AugConfig(views=2)
    base = plan_shard("s0.tar", KEYS, W, H, aug)
    assert not np.array_equal(base.seeds, plan_shard("s1.tar", KEYS, W, H, aug).seeds)
    assert not np.array_equal(base.seeds, plan_shard("s0.tar", KEYS, W, H, AugConfig(views=2, seed=1)).seeds)
    assert not np.array_equal(base.seeds, plan_shard("s0.tar", KEYS, W, H, AugConfig(views=2, scale=(0.5, 1.0))).seeds)
    assert len(set(base.seeds.ravel().tolist())) == base.seeds.size  # views differ from each other
    assert plan_fingerprint(aug, "m1") != plan_fingerprint(aug, "m2")


def test_crops_follow_random_resized_crop_ranges():
    aug = AugConfig(views=1, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    areas, flips = [], []
    for i in range(2000):
        (top, left, h, w), flip = sample_crop(view_seed("x", 0, "s", str(i), 0), 200, 150, aug)
        assert top >= 0 and top + h <= 150 and left >= 0 and left + w <= 200
        areas.append(h * w / (200 * 150))
        flips.append(flip)
    areas = np.array(areas)
    assert areas.min() >= 0.19 and areas.max() <= 1.0
    assert 0.45 < np.mean(flips) < 0.55
    # Same distribution as torchvision's sampler (whose rejection step biases toward small crops).
    import torchvision.transforms as T

    torch.manual_seed(0)
    ref = []
    for _ in range(2000):
        _, _, h, w = T.RandomResizedCrop.get_params(torch.empty(3, 150, 200), list(aug.scale), list(aug.ratio))
        ref.append(h * w / (200 * 150))
    assert abs(areas.mean() - np.mean(ref)) < 0.03
    assert abs(np.median(areas) - np.median(ref)) < 0.04


def test_unknown_size_rows_have_no_box():
    plan = plan_shard("s", ["a", "b"], [0, 32], [0, 32], AugConfig(views=2))
    assert (plan.boxes[0] == -1).all() and (plan.boxes[1] >= 0).all()


def test_replay_is_exact_crop_resize_flip():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = replay_view(img, (5, 7, 20, 20), False, 20)  # same size: a pure crop
    assert torch.allclose(out, img[:, 5:25, 7:27].float() / 255, atol=1e-6)
    flipped = replay_view(img, (5, 7, 20, 20), True, 20)
    assert torch.equal(flipped, out.flip(-1))
    big = replay_view(img, (0, 0, 40, 50), False, 64)
    assert big.shape == (3, 64, 64) and big.min() >= 0 and big.max() <= 1
    with pytest.raises(ValueError, match="does not fit"):
        replay_view(img, (30, 0, 20, 20), False, 16)


@pytest.mark.parametrize(
    "field,value", [("views", 0), ("scale", (0.5, 0.2)), ("ratio", (0.0, 1.0)), ("hflip", 1.5), ("seed", -1)]
)
def test_aug_config_names_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugConfig(**{field: value})
