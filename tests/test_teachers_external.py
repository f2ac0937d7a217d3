"""Teachers backed by external libraries: open_clip, timm, and the shipped EfficientNet-Lite0.

Tiny variants are saved to disk and loaded back through ``create_teacher(name, weights=FILE)`` —
the same code path a user's real checkpoint takes — with the network switched off.
"""

from __future__ import annotations

import socket

import pytest
import torch

from teacher_cache.teachers import create_teacher, list_teachers

OPENCLIP_TINY = "openclip:tiny"
TIMM_TINY = "timm:vit_tiny_test"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (DESIGN invariant 6)."""

    def refuse(*args, **kwargs):
        raise AssertionError("teacher loading tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _pixels(spec, b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, spec.input_size, spec.input_size, generator=g)


def _state_dict(name: str, teacher) -> dict[str, torch.Tensor]:
    """What a user's checkpoint file holds: the full open_clip model, or the timm model."""
    if name == OPENCLIP_TINY:
        from teacher_cache.teachers.openclip import build_tiny_clip

        return build_tiny_clip().state_dict()
    return teacher.model.state_dict()


def _save(sd: dict[str, torch.Tensor], path) -> str:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return str(path)


def _visual_key(name: str) -> str:
    return "visual.conv1.weight" if name == OPENCLIP_TINY else "patch_embed.proj.weight"


def test_registered_names():
    assert {OPENCLIP_TINY, TIMM_TINY} <= set(list_teachers(tiny=True))
    assert {"openclip", "timm", "efficientnet_lite0"} <= set(list_teachers())


@pytest.mark.parametrize(
    "name,fmt",
    [(OPENCLIP_TINY, "pt"), (OPENCLIP_TINY, "safetensors"), (TIMM_TINY, "safetensors"), (TIMM_TINY, "pth")],
)
def test_roundtrip_through_weights_file(name, fmt, tmp_path, no_network):
    orig = create_teacher(name)
    path = _save(_state_dict(name, orig), tmp_path / f"w.{fmt}")
    loaded = create_teacher(name, weights=path)
    assert loaded.spec == orig.spec
    assert loaded.fingerprint() == orig.fingerprint()  # path-independent: same bytes, same teacher
    assert loaded.weights_path == path and orig.weights_path is None

    x = _pixels(orig.spec)
    a, b = orig(x), loaded(x)
    h, w = orig.spec.grid
    assert a.tokens.shape == (2, h * w, orig.spec.dim)
    assert a.cls.shape == (2, orig.spec.dim)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cls, b.cls)


@pytest.mark.parametrize("name", [OPENCLIP_TINY, TIMM_TINY])
def test_perturbed_weights_change_fingerprint(name, tmp_path, no_network):
    orig = create_teacher(name)
    sd = _state_dict(name, orig)
    sd[_visual_key(name)] = sd[_visual_key(name)].clone()
    sd[_visual_key(name)].view(-1)[0] += 1e-3
    loaded = create_teacher(name, weights=_save(sd, tmp_path / "w.safetensors"))
    assert loaded.fingerprint() != orig.fingerprint()


@pytest.mark.parametrize("name", [OPENCLIP_TINY, TIMM_TINY])
def test_layer_selection(name):
    last = create_teacher(name)
    x = _pixels(last.spec)
    ref = last(x)
    first = create_teacher(name, layer=1)
    assert first.spec.layer == 1 and first.fingerprint() != last.fingerprint()
    out = first(x)
    assert out.tokens.shape == ref.tokens.shape
    assert (out.tokens - ref.tokens).abs().max() > 1e-3
    # The tiny models have 2 blocks: layer=2 is the default, bit for bit.
    same = create_teacher(name, layer=2)(x)
    torch.testing.assert_close(same.tokens, ref.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(same.cls, ref.cls, rtol=0, atol=1e-6)
    for bad in (0, 3):
        with pytest.raises(ValueError, match=r"1\.\.2"):
            create_teacher(name, layer=bad)


@pytest.mark.parametrize(
    "name", ["openclip:ViT-B-16@openai", "timm:vit_small_patch14_dinov2.lvd142m", "dinov2-b14-reg"]
)
def test_real_teacher_without_weights_refuses(name, no_network):
    with pytest.raises(ValueError, match="--weights"):
        create_teacher(name)


def test_openclip_matches_open_clip(tmp_path, no_network):
    """cls == encode_image (unnormalised); tokens == ln_post(block output) @ proj for every patch."""
    import open_clip

    from teacher_cache.teachers.openclip import TINY_ARCH

    path = _save(_state_dict(OPENCLIP_TINY, None), tmp_path / "w.pt")
    teacher = create_teacher(OPENCLIP_TINY, weights=path)
    model = open_clip.create_model(TINY_ARCH, pretrained=path).eval()
    x = _pixels(teacher.spec)
    out = teacher(x)
    xn = teacher.normalize(x)
    v = model.visual
    with torch.no_grad():
        torch.testing.assert_close(out.cls, model.encode_image(xn), rtol=0, atol=1e-5)
        inter = v.forward_intermediates(xn, indices=[1], normalize_intermediates=True, output_fmt="NLC")
        torch.testing.assert_close(out.tokens, inter["image_intermediates"][0] @ v.proj, rtol=0, atol=1e-5)
        mid = create_teacher(OPENCLIP_TINY, weights=path, layer=1)(x)
        inter1 = v.forward_intermediates(
            xn, indices=[0], normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
        )
        torch.testing.assert_close(mid.tokens, inter1["image_intermediates"][0] @ v.proj, rtol=0, atol=1e-5)
        torch.testing.assert_close(mid.cls, inter1["image_intermediates_prefix"][0][:, 0] @ v.proj, rtol=0, atol=1e-5)
    assert teacher.spec.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and teacher.spec.has_cls


def test_openclip_tag_sets_activation_and_normalisation(tmp_path, monkeypatch, no_network):
    """With a weights file, open_clip itself ignores the tag; we read its QuickGELU flag and mean/std
    (e.g. OpenAI tags are QuickGELU; ViT-L-14@laion2b_s32b_b82k uses mean/std 0.5) from open_clip's table."""
    import open_clip
    from open_clip.model import QuickGELU

    from teacher_cache.teachers.openclip import TINY_ARCH

    real = open_clip.get_pretrained_cfg
    fake = {"quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg", lambda a, t: fake if (a, t) == (TINY_ARCH, "fake") else real(a, t)
    )
    path = _save(_state_dict(OPENCLIP_TINY, None), tmp_path / "w.safetensors")
    t = create_teacher("openclip:tiny@fake", weights=path)
    assert isinstance(t.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert t.spec.mean == (0.5, 0.5, 0.5) and t.spec.extra["pretrained"] == "fake" and t.spec.extra["quick_gelu"]
    plain = create_teacher(OPENCLIP_TINY, weights=path)
    assert not isinstance(plain.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert plain.fingerprint() != t.fingerprint()  # same bytes, different activation: a different teacher
    with pytest.warns(UserWarning, match="not in open_clip's pretrained table"):
        create_teacher("openclip:tiny@unknown", weights=path)


def test_timm_drops_class_and_register_tokens():
    teacher = create_teacher(TIMM_TINY)
    m = teacher.model
    assert m.num_prefix_tokens == 3  # class token + 2 registers: the tiny model exercises registers
    x = _pixels(teacher.spec)
    out = teacher(x)
    with torch.no_grad():
        feats = m.forward_features(teacher.normalize(x))
    assert feats.shape[1] == 3 + 16 and out.tokens.shape[1] == 16
    torch.testing.assert_close(out.tokens, feats[:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(out.cls, feats[:, 0], rtol=0, atol=0)


# --- EfficientNet-Lite0: real ImageNet weights shipped in a pip package -------------------------


@pytest.fixture(scope="module")
def lite0():
    return create_teacher("efficientnet_lite0")


def _sample_images():
    """Grace Hopper (twice: two different crops, one flipped) and two unrelated images, at 224 px."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    def load(name):
        with cbook.get_sample_data(name) as f:
            return Image.open(f).convert("RGB")

    def view(img, box, flip=False):
        im = img.crop(box).resize((224, 224), Image.BICUBIC)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255

    hopper, pack, logo = load("grace_hopper.jpg"), load("Minduka_Present_Blue_Pack.png"), load("logo2.png")
    return torch.stack(
        [
            view(hopper, (0, 0, 512, 512)),
            view(hopper, (40, 60, 472, 492), flip=True),
            view(pack, (0, 0, 128, 128)),
            view(logo, (0, 0, 130, 130)),
        ]
    )


def test_efficientnet_shapes_and_layers(lite0):
    spec = lite0.spec
    assert (spec.input_size, spec.grid, spec.dim, spec.has_cls) == (224, (7, 7), 1280, True)
    x = _pixels(spec, b=1)
    out = lite0(x)
    assert out.tokens.shape == (1, 49, 1280) and out.cls.shape == (1, 1280)
    # Tokens are the head map before its ReLU6 (signed); cls is the pool of the activated map,
    # the vector the ImageNet classifier reads.
    assert (out.tokens < 0).float().mean() > 0.2
    torch.testing.assert_close(out.cls, out.tokens.clamp(0, 6).mean(1))
    with torch.inference_mode():
        torch.testing.assert_close(lite0.net._fc(out.cls), lite0.logits(x), atol=1e-4, rtol=1e-4)
    stage4 = create_teacher("efficientnet_lite0", layer=4)
    assert (stage4.spec.grid, stage4.spec.dim) == ((14, 14), 80)
    assert stage4(x).tokens.shape == (1, 196, 80)
    with pytest.raises(ValueError, match=r"1\.\.7"):
        create_teacher("efficientnet_lite0", layer=8)


def test_efficientnet_is_semantically_sensible(lite0):
    x = _sample_images()
    out = lite0(x)
    z = torch.nn.functional.normalize(out.cls, dim=-1)
    sim = z @ z.T
    # Two crops of the same photo are far closer than any pair of different images.
    assert sim[0, 1] > 0.8
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) + 0.3
    # ImageNet head: Grace Hopper in uniform -> 652 "military uniform" (top-1), and in the top-3 of the other crop.
    logits = lite0.logits(x[:2])
    assert logits[0].argmax().item() == 652
    assert 652 in logits[1].topk(3).indices.tolist()


def test_efficientnet_weights_override(lite0, tmp_path, no_network):
    sd = lite0.net.state_dict()
    same = create_teacher("efficientnet_lite0", weights=_save(sd, tmp_path / "lite0.safetensors"))
    assert same.fingerprint() == lite0.fingerprint()
    sd = {k: v.clone() for k, v in sd.items()}
    sd["_conv_stem.weight"].view(-1)[0] += 1e-3
    other = create_teacher("efficientnet_lite0", weights=_save(sd, tmp_path / "lite0_perturbed.pt"))
    assert other.fingerprint() != lite0.fingerprint()
