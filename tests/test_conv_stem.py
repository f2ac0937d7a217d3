"""The convolutional patch stem: same token grid as the patch projection, trains under every objective's
machinery, refuses patch sizes it cannot build, and exports into timm key for key."""

from __future__ import annotations

import pytest
import torch

from student.data import DataConfig
from student.export import create_timm_from_export, export_encoder, load_encoder
from student.objectives import StudentConfig
from student.train import OptimConfig, TrainConfig, train
from student.vit import VisionTransformer, ViTConfig


def test_conv_stem_keeps_the_token_grid():
    patch = VisionTransformer(ViTConfig(32, 8, 32, 2, 2))
    conv = VisionTransformer(ViTConfig(32, 8, 32, 2, 2, stem="conv"))
    x = torch.rand(2, 3, 32, 32)
    assert conv(x).shape == patch(x).shape == (2, 1 + 16, 32)
    # three stride-2 stages for patch 8, then the 1x1 projection
    strides = [m.stride for m in conv.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1)]


@pytest.mark.parametrize("bad", [dict(stem="resnet"), dict(patch_size=6, img_size=36, stem="conv")])
def test_conv_stem_refuses_what_it_cannot_build(bad):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2) | bad
    with pytest.raises(ValueError, match="stem"):
        ViTConfig(**kw)
    with pytest.raises(ValueError, match="stem"):
        StudentConfig("tiny-test", stem="resnet")


def test_conv_stem_student_trains_and_exports_to_timm(tiny_dataset, tiny_cache, tmp_path):
    run = tmp_path / "run"
    data = DataConfig(tiny_dataset, tiny_cache, "vit", 32, 8, shuffle_buffer=16)
    result = train(
        TrainConfig(
            data=data,
            out=str(run),
            student=StudentConfig("tiny-test", stem="conv"),
            steps=4,
            optim=OptimConfig(base_lr=3e-3),
            log_every=1,
        ),
        progress=False,
    )
    assert result.steps == 4
    enc = load_encoder(str(run))
    assert enc.cfg.stem == "conv"
    line = export_encoder(str(run), str(tmp_path / "enc.safetensors"))
    assert "embed_layer=timm_conv_stem_embed()" in line
    model = create_timm_from_export(str(tmp_path / "enc.safetensors")).eval()  # strict load inside timm
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), enc(x), atol=1e-5, rtol=1e-5)
