"""extract -> verify on generated shards: Ray and local executors, resume, bad input, mismatches."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.extract import run_extract
from teacher_cache.prepare import WdsConfig, prepare_wds
from teacher_cache.shards import RawSample, write_tar_shards
from teacher_cache.verify import VerifyConfig, run_verify
from teacher_cache.views import AugConfig

TINY = (TeacherConfig("random-vit:32/8"), TeacherConfig("pixel:32/8"))


def _cfg(shards, out, teachers=TINY, **kw) -> ExtractConfig:
    kw.setdefault("executor", "local")
    kw.setdefault("batch_size", 8)
    return ExtractConfig(shards=shards, out=str(out), teachers=teachers, aug=AugConfig(views=2), **kw)


def _arrays(cache: str, group: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(cache, mode="r")
    out = {}
    for sid, g in sorted(root[group].groups()):
        for name, arr in g.arrays():
            out[f"{sid}/{name}"] = arr[:]
    return out


def _chunk_bytes(cache: str, group: str) -> dict[str, bytes]:
    """Every stored chunk file of a tokenizer group, by relative path."""
    base = os.path.join(cache, group)
    out = {}
    for d, _, files in os.walk(base):
        for f in files:
            if f != "zarr.json":
                p = os.path.join(d, f)
                out[os.path.relpath(p, base)] = open(p, "rb").read()
    return out


@pytest.mark.slow
def test_ray_extract_then_verify(tiny_dataset, tmp_path, ray_session, monkeypatch):
    teachers = (*TINY, TeacherConfig("kmeans:random-vit:32/8", codebook_size=8, fit_samples=16))
    monkeypatch.chdir(tmp_path)  # a relative --out: Ray workers run in another directory
    summary = run_extract(_cfg(tiny_dataset, "c", teachers, executor="ray", workers=2, threads=1), progress=False)
    assert summary.ok
    by = {t.group: t for t in summary.tokenizers}
    assert by["random-vit_32_8"].samples == 48 and by["random-vit_32_8"].views == 96
    assert by["kmeans_random-vit_32_8"].bytes_per_view < by["random-vit_32_8"].bytes_per_view
    root = zarr.open_group(str(tmp_path / "c"), mode="r")
    g = next(iter(root["random-vit_32_8"].groups()))[1]
    assert g["tokens"].shape == (16, 2, 16, 32) and g["cls"].shape == (16, 2, 32)
    assert root["kmeans_random-vit_32_8"]["codebook"].shape == (8, 32)
    report = run_verify(VerifyConfig(shards=tiny_dataset, cache=str(tmp_path / "c"), spot_checks=4), progress=False)
    assert report.ok, report.table()
    # Same cache from the in-process executor with one worker: identical arrays (worker count and
    # scheduling do not leak into the data).
    run_extract(_cfg(tiny_dataset, tmp_path / "l", TINY), progress=False)
    for group in ("random-vit_32_8", "pixel_32_8"):
        a, b = _arrays(str(tmp_path / "c"), group), _arrays(str(tmp_path / "l"), group)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_redoes_only_incomplete_shards_byte_identically(tiny_dataset, tmp_path):
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    run_extract(_cfg(tiny_dataset, clean), progress=False)
    run_extract(_cfg(tiny_dataset, resumed), progress=False)
    root = zarr.open_group(resumed, mode="r+")
    tok = root["random-vit_32_8"]
    sids = sorted(n for n, _ in tok.groups())
    # Interrupted mid-write: first shard lost its completion marker and has a garbage chunk;
    # second shard's group vanished entirely.
    attrs = dict(tok[sids[0]].attrs)
    del attrs["complete"]
    tok[sids[0]].attrs.clear()
    tok[sids[0]].attrs.update(attrs)
    tok[sids[0]]["tokens"][0] = 123.0
    del tok[sids[1]]
    summary = run_extract(_cfg(tiny_dataset, resumed), progress=False)
    done = {t.group: t.shards_done for t in summary.tokenizers}
    assert done == {"random-vit_32_8": 2, "pixel_32_8": 0}
    for group in ("random-vit_32_8", "pixel_32_8"):
        assert _chunk_bytes(clean, group) == _chunk_bytes(resumed, group)


def _jpeg(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_images_are_skipped_and_named(tmp_path):
    good = _jpeg((200, 10, 10))
    truncated = _jpeg((10, 200, 10))[:200]  # header intact, data cut
    samples = [RawSample(f"s{i:03d}", {"jpg": good, "cls": b"1"}) for i in range(6)]
    samples[2] = RawSample("s002", {"jpg": truncated, "cls": b"0"})
    samples[4] = RawSample("s004", {"jpg": b"", "cls": b"0"})
    samples[5] = RawSample("s005", {"txt": b"caption without image"})
    shard_dir = tmp_path / "raw"
    write_tar_shards(samples, str(shard_dir), shard_size=3)
    prepare_wds(WdsConfig(pattern=str(shard_dir / "*.tar"), out=str(tmp_path / "ds")))
    cache = str(tmp_path / "cache")
    summary = run_extract(_cfg(str(tmp_path / "ds"), cache, (TeacherConfig("pixel:32/8"),)), progress=False)
    t = summary.tokenizers[0]
    assert (t.samples, t.valid) == (6, 3)
    skipped = [json.loads(line) for line in open(t.skipped_file.removeprefix("file://"))]
    assert sorted(s["key"] for s in skipped) == ["s002", "s004", "s005"]
    assert all(s["reason"] and s["shard"] for s in skipped)
    assert "skipped in" in summary.table()
    assert run_verify(VerifyConfig(shards=str(tmp_path / "ds"), cache=cache, spot_checks=3), progress=False).ok


def test_existing_cache_must_match(tiny_dataset, tmp_path):
    cache = str(tmp_path / "c")
    run_extract(_cfg(tiny_dataset, cache, (TeacherConfig("pixel:32/8"),)), progress=False)
    with pytest.raises(ValueError, match="view plan.*seed"):
        run_extract(
            ExtractConfig(
                shards=tiny_dataset,
                out=cache,
                teachers=(TeacherConfig("pixel:32/8"),),
                aug=AugConfig(views=2, seed=5),
                executor="local",
            ),
            progress=False,
        )
    with pytest.raises(ValueError, match="different fingerprint"):
        run_extract(_cfg(tiny_dataset, cache, (TeacherConfig("random-vit:32/8", group="pixel_32_8"),)), progress=False)
    with pytest.raises(ValueError, match="different storage"):
        run_extract(
            _cfg(tiny_dataset, cache, (TeacherConfig("pixel:32/8"),), storage=StorageConfig(dtype="int8")),
            progress=False,
        )


def test_verify_catches_nan_and_swapped_teacher(tiny_dataset, tmp_path):
    cache = str(tmp_path / "c")
    run_extract(_cfg(tiny_dataset, cache, (TeacherConfig("random-vit:32/8"),)), progress=False)
    root = zarr.open_group(cache, mode="r+")
    tok = root["random-vit_32_8"]
    sid = sorted(n for n, _ in tok.groups())[0]
    tok[sid]["tokens"][3, 1, 0, 0] = np.nan
    # A "swapped teacher": the recorded config now names another seed's weights.
    attrs = dict(tok.attrs["tokenizer"])
    attrs["teacher_config"] = {**attrs["teacher_config"], "name": "random-vit:32/8", "weights": None}
    tok.attrs["tokenizer"] = attrs
    report = run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=2), progress=False)
    failed = {c.name for c in report.checks if not c.ok}
    assert failed == {"finite"}
    attrs["fingerprint"] = "f" * 64
    tok.attrs["tokenizer"] = attrs
    report = run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=2), progress=False)
    assert {c.name for c in report.checks if not c.ok} == {"finite", "teacher fingerprint"}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_storage_forms_verify(tiny_dataset, tmp_path, dtype):
    cache = str(tmp_path / dtype)
    summary = run_extract(
        _cfg(tiny_dataset, cache, (TeacherConfig("random-vit:32/8"),), storage=StorageConfig(dtype=dtype)),
        progress=False,
    )
    assert summary.tokenizers[0].bytes_per_view > 0
    assert run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=3), progress=False).ok


@pytest.mark.slow
def test_efficientnet_extract_verify(tiny_dataset, tmp_path):
    cache = str(tmp_path / "eff")
    summary = run_extract(
        _cfg(tiny_dataset, cache, (TeacherConfig("efficientnet_lite0"),), batch_size=32), progress=False
    )
    assert summary.tokenizers[0].valid == 48
    root = zarr.open_group(cache, mode="r")
    g = next(iter(root["efficientnet_lite0"].groups()))[1]
    assert g["tokens"].shape == (16, 2, 49, 1280)
    assert run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=2), progress=False).ok


def test_token_agreement_handles_directionless_tokens():
    from teacher_cache.verify import token_agreement

    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    x[2] = 0  # a flat patch under norm-pix: no direction
    assert token_agreement(x, x.clone()) == pytest.approx(1.0)
    y = x.clone()
    y[2] = 1.0  # zero in one, not in the other: disagreement
    assert token_agreement(x, y) == pytest.approx(5 / 6, abs=1e-6)
    assert token_agreement(x, -x) == pytest.approx(-5 / 6 + 1 / 6, abs=1e-6)


def test_pca_extract_verifies_reuses_its_basis_and_projects_the_base(tiny_dataset, tmp_path):
    """``pca:<t>``: the basis is fit once, stored, reused byte-identically; tokens are (x - mean) @ C.T."""
    from teacher_cache.dataset import load_dataset
    from teacher_cache.extract import sample_base_tokens
    from teacher_cache.teachers import base_teacher
    from teacher_cache.teachers.pca import explained_variance

    pca = TeacherConfig("pca:random-vit:32/8", group="pca", pca_dim=8, fit_samples=24)
    teachers = (TeacherConfig("random-vit:32/8", group="base"), pca)
    cache = str(tmp_path / "c")
    cfg = _cfg(tiny_dataset, cache, teachers, storage=StorageConfig(dtype="fp32"))
    summary = run_extract(cfg, progress=False)
    assert summary.ok
    by = {t.group: t for t in summary.tokenizers}
    assert by["pca"].bytes_per_view < by["base"].bytes_per_view
    root = zarr.open_group(cache, mode="r")
    basis = root["pca"]["pca_basis"][:]
    assert basis.shape == (9, 32) and basis.dtype == np.float32
    prov = dict(root["pca"].attrs["tokenizer"])
    assert prov["spec"]["dim"] == 8 and prov["spec"]["kind"] == "continuous" and prov["spec"]["grid"] == [4, 4]
    report = run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=4), progress=False)
    assert report.ok, report.table()
    assert any(c.scope == "pca" and c.name == "alignment" and c.ok for c in report.checks), report.table()
    # Stored tokens (and cls) are the base teacher's stored tokens projected on the stored basis.
    mean, comps = basis[0], basis[1:]
    base, red = _arrays(cache, "base"), _arrays(cache, "pca")
    for key in base:
        sid, name = key.split("/")
        if name in ("tokens", "cls"):
            assert red[key].shape == base[key].shape[:-1] + (8,)
            assert np.allclose(red[key], (base[key] - mean) @ comps.T, atol=1e-4), key
    # Explained variance along the stored directions is non-increasing on the sample it was fit on.
    x = sample_base_tokens(pca, load_dataset(tiny_dataset), cfg.aug, torch.device("cpu"), base_teacher(pca))
    ev = explained_variance(torch.from_numpy(basis), x)
    assert (ev[:-1] >= ev[1:] - 1e-9).all(), ev
    # A re-run reuses the stored basis (no refit); a redone shard is byte-identical.
    before = _chunk_bytes(cache, "pca")
    r = zarr.open_group(cache, mode="r+")
    first = sorted(r["pca"].group_keys())[0]
    del r["pca"][first].attrs["complete"]
    import teacher_cache.extract.tokenizers as tokenizers

    def no_refit(*a, **k):
        raise AssertionError("the stored basis should have been reused")

    old = tokenizers.sample_base_tokens
    tokenizers.sample_base_tokens = no_refit
    try:
        assert run_extract(cfg, progress=False).ok
    finally:
        tokenizers.sample_base_tokens = old
    assert _chunk_bytes(cache, "pca") == before
    # A fresh cache fits the same basis, bit for bit (deterministic sample, exact PCA).
    run_extract(_cfg(tiny_dataset, tmp_path / "again", (pca,)), progress=False)
    assert np.array_equal(zarr.open_group(str(tmp_path / "again"), mode="r")["pca"]["pca_basis"][:], basis)


def test_pca_dim_wider_than_the_base_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="pca_dim 33 exceeds the token dim 32"):
        run_extract(
            _cfg(tiny_dataset, tmp_path / "c", (TeacherConfig("pca:random-vit:32/8", pca_dim=33),)), progress=False
        )
    assert not os.path.exists(tmp_path / "c")  # refused before any work
    with pytest.raises(ValueError, match="pca_dim"):
        TeacherConfig("pca:random-vit:32/8", pca_dim=0)
