"""Every registered teacher builds offline (tiny variant) and honours the Teacher contract."""

from __future__ import annotations

import pytest
import torch

from teacher_cache.config import TeacherConfig
from teacher_cache.teachers import base_teacher, build_teacher, create_teacher, family_fit, list_teachers
from teacher_cache.teachers.kmeans import fit_kmeans, save_codebook
from teacher_cache.teachers.pca import explained_variance, fit_pca
from teacher_cache.teachers.pixel import PixelTeacher


def _build(name: str, tmp_path):
    if name.startswith("kmeans:"):
        base = create_teacher(name.removeprefix("kmeans:"))
        x = torch.rand(4, 3, base.spec.input_size, base.spec.input_size, generator=torch.Generator().manual_seed(0))
        cb = fit_kmeans(base(x).tokens.flatten(0, 1), 8)
        path = tmp_path / "cb.safetensors"
        save_codebook(str(path), cb, base.spec.name, base.fingerprint())
        return create_teacher(name, codebook=str(path))
    fit = family_fit(name)
    if fit is not None:  # any fitted family (pca:, one a test registers): fit its array on random views
        tc = TeacherConfig(name, codebook_size=8, pca_dim=8)
        base = base_teacher(tc)
        x = torch.rand(4, 3, base.spec.input_size, base.spec.input_size, generator=torch.Generator().manual_seed(0))
        return build_teacher(tc, fit.fit(base(x).tokens.flatten(0, 1), tc))
    return create_teacher(name)


@pytest.mark.parametrize("name", list_teachers(tiny=True))
def test_tiny_teacher_contract(name, tmp_path):
    t = _build(name, tmp_path)
    s = t.spec
    x = torch.rand(3, 3, s.input_size, s.input_size)
    out = t(x)
    n = s.grid[0] * s.grid[1]
    if s.kind == "codes":
        assert out.tokens.shape == (3, n) and out.tokens.dtype == torch.int64
        assert out.tokens.min() >= 0 and out.tokens.max() < s.num_codes
    else:
        assert out.tokens.shape == (3, n, s.dim) and torch.isfinite(out.tokens).all()
    assert (out.cls is not None) == s.has_cls
    if out.cls is not None:
        assert out.cls.shape == (3, s.dim)
    # Deterministic, batch-independent outputs: what the cache stores must not depend on batching.
    again = t(x[1:2])
    ref = out.tokens[1:2]
    assert torch.equal(again.tokens, ref) if s.kind == "codes" else torch.allclose(again.tokens, ref, atol=1e-5)
    # The fingerprint is stable across builds and sensitive to weights.
    assert _build(name, tmp_path).fingerprint() == t.fingerprint()
    with pytest.raises(ValueError, match="expects"):
        t(torch.rand(1, 3, s.input_size + 8, s.input_size + 8))


def test_fingerprint_catches_a_changed_weight():
    t = create_teacher("random-vit:32/8")
    fp = t.fingerprint()
    with torch.no_grad():
        next(t.parameters()).view(-1)[0] += 1e-3
    assert t.fingerprint() != fp
    assert create_teacher("random-vit:32/8", seed=1).fingerprint() != fp


def test_pixel_tokens_are_normalised_patches():
    t = PixelTeacher(16, 8)
    x = torch.rand(2, 3, 16, 16)
    tok = t(x).tokens
    assert tok.shape == (2, 4, 192)
    assert torch.allclose(tok.mean(-1), torch.zeros(2, 4), atol=1e-5)
    raw = PixelTeacher(16, 8, norm=False)(x).tokens
    # token 1 is the top-right patch, channel-last inside the patch (MAE's patchify layout)
    assert torch.allclose(raw[0, 1].view(8, 8, 3), x[0, :, :8, 8:].permute(1, 2, 0))


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)
    x = centers.repeat_interleave(40, 0) + 0.01 * torch.randn(200, 16, generator=g)
    cb = fit_kmeans(x, 5, seed=0)
    assign = (torch.nn.functional.normalize(x, dim=-1) @ cb.T).argmax(1).view(5, 40)
    assert all(len(set(row.tolist())) == 1 for row in assign)  # each true cluster -> one code
    assert len({row[0].item() for row in assign}) == 5


def test_kmeans_refuses_codebook_of_another_base(tmp_path):
    path = tmp_path / "cb.safetensors"
    save_codebook(str(path), torch.randn(4, 32), "random-vit:32/8", "0" * 64)
    with pytest.raises(ValueError, match="different"):
        create_teacher("kmeans:random-vit:32/8", codebook=str(path))


def test_pca_projects_on_a_deterministic_orthonormal_basis():
    base = create_teacher("random-vit:32/8")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    ref = base(x)
    basis = fit_pca(ref.tokens.flatten(0, 1), 8)
    assert basis.shape == (9, 32) and basis.dtype == torch.float32
    assert torch.equal(fit_pca(ref.tokens.flatten(0, 1), 8), basis)  # deterministic, bit for bit
    mean, comps = basis[0], basis[1:]
    assert torch.allclose(comps @ comps.T, torch.eye(8), atol=1e-5)
    ev = explained_variance(basis, ref.tokens)
    assert (ev[:-1] >= ev[1:] - 1e-9).all(), ev  # explained variance is non-increasing
    # ...and the top directions are the top directions: a full basis's leading 8 rows are this one's.
    full = fit_pca(ref.tokens.flatten(0, 1), 32)
    assert torch.allclose(full[:9], basis, atol=1e-5) and ev.sum() <= explained_variance(full, ref.tokens).sum()
    t = create_teacher("pca:random-vit:32/8", basis=basis)
    s = t.spec
    assert (s.dim, s.grid, s.kind, s.has_cls) == (8, base.spec.grid, "continuous", base.spec.has_cls)
    assert s.extra["base"] == "random-vit:32/8" and s.extra["pca_dim"] == 8
    out = t(x)
    assert torch.allclose(out.tokens, (ref.tokens - mean) @ comps.T, atol=1e-5)
    assert torch.allclose(out.cls, (ref.cls - mean) @ comps.T, atol=1e-5)  # cls: the same basis
    # The basis is part of the fingerprint (verify and --online-teacher rely on it).
    other = basis.clone()
    other[0, 0] += 1e-3
    assert create_teacher("pca:random-vit:32/8", basis=other).fingerprint() != t.fingerprint()
    assert create_teacher("pca:random-vit:32/8", basis=basis.clone()).fingerprint() == t.fingerprint()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, "fitted basis"),
        ({"basis": torch.zeros(9, 16)}, "does not fit"),
        ({"basis": torch.zeros(9, 32), "pca_dim": 4}, "pca_dim"),
    ],
)
def test_pca_refuses_a_missing_or_mismatched_basis(kw, match):
    with pytest.raises(ValueError, match=match):
        create_teacher("pca:random-vit:32/8", **kw)
    with pytest.raises(ValueError, match="pca_dim"):
        fit_pca(torch.randn(10, 4), 5)


@pytest.mark.parametrize(
    "name,match",
    [("nope", "unknown teacher"), ("pixel:30/8", "multiple"), ("kmeans", "base teacher"), ("pca", "base teacher")],
)
def test_bad_names_are_named(name, match):
    with pytest.raises(ValueError, match=match):
        create_teacher(name)


def test_random_vit_at_a_headline_teachers_shape():
    """``random-vit:vit_base_16`` costs what CLIP ViT-B/16 costs (width, depth, grid), with no weights to fetch."""
    t = create_teacher("random-vit:vit_base_16")
    assert (t.spec.name, t.spec.input_size, t.spec.grid, t.spec.dim) == ("random-vit:vit_base_16", 224, (14, 14), 768)
    assert len(t.vit.blocks) == 12 and t.vit.blocks[0].attn.num_heads == 12
    assert 85e6 < sum(p.numel() for p in t.parameters()) < 87e6  # ViT-B/16's trunk
    with torch.no_grad():
        out = t(torch.rand(1, 3, 224, 224))
    assert out.tokens.shape == (1, 196, 768) and out.cls.shape == (1, 768)
    assert create_teacher("random-vit:vit_base_16").fingerprint() == t.fingerprint()  # seeded
    with pytest.raises(ValueError, match="SIZE/PATCH .* or one of vit_base_16"):
        create_teacher("random-vit:vit_bogus")
