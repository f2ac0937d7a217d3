"""The ``kmeans:`` tokenizer's ``metric``: DiGIT's euclidean k-means (the default of a new extract) and the
spherical one every cache from before the knob was made with (``cosine``), chunked for large ``K``."""

from __future__ import annotations

import pytest
import torch
import zarr

import teacher_cache.teachers.kmeans as km
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.extract import run_extract
from teacher_cache.teachers import build_teacher, create_teacher, load_fitted
from teacher_cache.teachers.kmeans import assign_codes, fit_kmeans, save_codebook, spec_metric
from teacher_cache.verify import VerifyConfig, run_verify
from teacher_cache.views import AugConfig

BASE = "random-vit:32/8"


def _sq_dist_argmin(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Brute force, float64: argmin over centroids of the squared euclidean distance."""
    return ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1).argmin(1)


def _sse(x: torch.Tensor, c: torch.Tensor) -> float:
    return float(((x.double() - c.double()[_sq_dist_argmin(x, c)]) ** 2).sum())


def _norm_spread(n: int, d: int, seed: int) -> torch.Tensor:
    """Random directions with norms over two orders of magnitude: cosine and euclidean disagree."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(-1, 1, n)[torch.randperm(n, generator=g)][:, None]


def test_euclidean_assignment_is_the_brute_force_argmin_and_not_cosine(monkeypatch):
    x, c = _norm_spread(500, 32, 0), _norm_spread(40, 32, 1)
    want = _sq_dist_argmin(x, c)
    monkeypatch.setattr(km, "BLOCK_ENTRIES", 40 * 7)  # blocks of 7 rows: exercise the chunking
    got = assign_codes(x, c, "euclidean")
    assert torch.equal(got, want)
    unit = torch.nn.functional.normalize(c, dim=-1)
    cos = assign_codes(x, unit, "cosine")
    assert torch.equal(cos, (torch.nn.functional.normalize(x, dim=-1) @ unit.T).argmax(1))
    assert (cos != want).float().mean() > 0.3  # the two metrics really pick different centroids here
    # ...and the teacher assigns by the metric it was built with (its codebook raw, or unit for cosine).
    euc_t = create_teacher(f"kmeans:{BASE}", codebook=c, metric="euclidean")
    cos_t = create_teacher(f"kmeans:{BASE}", codebook=c, metric="cosine")
    assert torch.equal(euc_t.codebook, c) and torch.allclose(cos_t.codebook.norm(dim=-1), torch.ones(40))
    assert torch.equal(euc_t.assign(x.view(5, 100, 32)), want.view(5, 100))
    assert torch.equal(cos_t.assign(x.view(5, 100, 32)), cos.view(5, 100))
    assert euc_t.fingerprint() != cos_t.fingerprint()


def test_euclidean_fit_lowers_the_squared_error_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    # Clusters along ONE direction at norms 1, 4 and 9: cosine cannot tell them apart, euclidean can.
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    blobs = torch.cat([s * u + 0.05 * torch.randn(100, 16, generator=g) for s in (1.0, 4.0, 9.0)])
    # faiss' random-sample init can land two centroids in one blob: keep the best of a few seeds (nredo).
    cb = min((fit_kmeans(blobs, 3, metric="euclidean", seed=s) for s in range(4)), key=lambda c: _sse(blobs, c))
    codes = assign_codes(blobs, cb, "euclidean").view(3, 100)
    assert all(len(set(row.tolist())) == 1 for row in codes) and len({int(r[0]) for r in codes}) == 3
    assert sorted(cb.norm(dim=-1).round().tolist()) == [1.0, 4.0, 9.0]  # raw scale: not unit centroids

    x = _norm_spread(2000, 16, 2)
    init = fit_kmeans(x, 32, metric="euclidean", iters=0)  # the seeded random sample the fit starts from
    fit = fit_kmeans(x, 32, metric="euclidean")
    assert init.shape == fit.shape == (32, 16) and fit.dtype == torch.float32
    assert _sse(x, fit) < 0.9 * _sse(x, init)
    assert torch.equal(fit_kmeans(x, 32, metric="euclidean"), fit)  # deterministic, bit for bit
    assert not torch.equal(fit_kmeans(x, 32, metric="euclidean", seed=1), fit)
    # faiss' max_points_per_centroid: a big sample is subsampled (seeded), and still fits.
    sub = fit_kmeans(x, 8, metric="euclidean", max_points_per_centroid=20)
    assert torch.equal(sub, fit_kmeans(x, 8, metric="euclidean", max_points_per_centroid=20))
    assert not torch.equal(sub, fit_kmeans(x, 8, metric="euclidean"))


def test_empty_clusters_are_split_not_lost():
    x = torch.cat([torch.zeros(50, 4) + 1.0, torch.zeros(50, 4) - 1.0])  # 2 distinct points, 4 centroids
    x = x + 1e-3 * torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    cb = fit_kmeans(x, 4, metric="euclidean")
    assert torch.isfinite(cb).all() and len({tuple(r.tolist()) for r in cb}) == 4


def test_bad_metric_and_too_large_k_are_refused():
    with pytest.raises(ValueError, match="metric must be one of euclidean, cosine"):
        TeacherConfig(f"kmeans:{BASE}", metric="manhattan")
    with pytest.raises(ValueError, match="metric"):
        create_teacher(f"kmeans:{BASE}", codebook=torch.randn(4, 32), metric="l1")
    with pytest.raises(ValueError, match="metric"):
        fit_kmeans(torch.randn(10, 4), 2, metric="dot")
    with pytest.raises(ValueError, match="codebook_size=16"):
        fit_kmeans(torch.randn(10, 4), 16, metric="euclidean")


def test_large_codebook_assigns_in_row_blocks(monkeypatch):
    """K=2048 on 20k vectors: never an N x K distance matrix (that would be 41M entries)."""
    x, c = torch.randn(20_000, 64), torch.randn(2048, 64)
    biggest = []
    addmm = torch.addmm

    def spy(*a, **kw):
        out = addmm(*a, **kw)
        biggest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    codes = assign_codes(x, c, "euclidean")
    cb = fit_kmeans(x, 2048, metric="euclidean", iters=2)
    assert cb.shape == (2048, 64) and codes.shape == (20_000,)
    assert max(biggest) <= km.BLOCK_ENTRIES < x.shape[0] * c.shape[0]
    rows = torch.arange(0, 20_000, 97)
    assert torch.equal(codes[rows], _sq_dist_argmin(x[rows], c))


def test_codebook_file_records_its_metric(tmp_path):
    base = create_teacher(BASE)
    cb = torch.randn(4, 32)
    euc, old, foreign = (str(tmp_path / f) for f in ("euc.safetensors", "old.safetensors", "foreign.safetensors"))
    save_codebook(euc, cb, BASE, base.fingerprint(), metric="euclidean")
    save_codebook(old, cb, BASE, base.fingerprint())  # as before the knob: fit by the cosine k-means
    from safetensors.torch import save_file

    save_file({"codebook": cb}, foreign)  # e.g. DiGIT's faiss centroids, converted: no metadata
    assert create_teacher(f"kmeans:{BASE}", codebook=euc).metric == "euclidean"
    assert create_teacher(f"kmeans:{BASE}", codebook=old).metric == "cosine"
    assert create_teacher(f"kmeans:{BASE}", codebook=foreign, metric="euclidean").metric == "euclidean"
    with pytest.raises(ValueError, match="fit with metric euclidean, not cosine"):
        create_teacher(f"kmeans:{BASE}", codebook=euc, metric="cosine")
    with pytest.raises(ValueError, match="--metric cosine"):
        create_teacher(f"kmeans:{BASE}", codebook=old, metric="euclidean")


def _extract(ds: str, out: str, tc: TeacherConfig) -> None:
    cfg = ExtractConfig(
        shards=ds,
        out=out,
        teachers=(tc,),
        aug=AugConfig(views=1),
        storage=StorageConfig(dtype="fp32"),
        executor="local",
    )
    run_extract(cfg, progress=False)


def test_metric_round_trips_through_the_cache(tiny_dataset, tmp_path):
    out = str(tmp_path / "c")
    _extract(tiny_dataset, out, TeacherConfig(f"kmeans:{BASE}", group="euc", codebook_size=8, fit_samples=16))
    _extract(
        tiny_dataset,
        out,
        TeacherConfig(f"kmeans:{BASE}", group="cos", codebook_size=8, fit_samples=16, metric="cosine"),
    )
    root = zarr.open_group(out, mode="r")
    euc, cos = (dict(root[g].attrs["tokenizer"]) for g in ("euc", "cos"))
    # Unset -> euclidean (DiGIT's), recorded in the config and the spec; cosine recorded in the config,
    # and its spec is the one caches from before the knob have (no metric: reads as cosine).
    assert euc["teacher_config"]["metric"] == "euclidean" and euc["spec"]["extra"]["metric"] == "euclidean"
    assert cos["teacher_config"]["metric"] == "cosine" and "metric" not in cos["spec"]["extra"]
    assert spec_metric(euc["spec"]) == "euclidean" and spec_metric(cos["spec"]) == "cosine"
    assert root["euc"]["codebook"][:].std() > 0 and (abs((root["euc"]["codebook"][:] ** 2).sum(1) - 1) > 1e-3).any()
    for g, a in (("euc", euc), ("cos", cos)):
        t = build_teacher(TeacherConfig(**a["teacher_config"]), **load_fitted(root[g]))
        assert t.fingerprint() == a["fingerprint"] and t.metric == a["teacher_config"]["metric"]
    assert run_verify(VerifyConfig(shards=tiny_dataset, cache=out, spot_checks=3), progress=False).ok


def test_a_cache_from_before_the_knob_reads_as_cosine(tiny_dataset, tmp_path):
    out = str(tmp_path / "c")
    tc = TeacherConfig(f"kmeans:{BASE}", group="old", codebook_size=8, fit_samples=16, metric="cosine")
    _extract(tiny_dataset, out, tc)
    g = zarr.open_group(out, mode="r+")["old"]
    rec = dict(g.attrs["tokenizer"])
    del rec["teacher_config"]["metric"]  # what a cache written before the knob records
    g.attrs["tokenizer"] = rec
    assert "metric" not in rec["spec"]["extra"] and spec_metric(rec["spec"]) == "cosine"
    # Every reader rebuilds with TeacherConfig(**teacher_config): an unset metric is cosine, what made it.
    old = TeacherConfig(**rec["teacher_config"])
    assert old.metric is None and TeacherConfig.from_record(rec["teacher_config"]).metric == "cosine"
    t = build_teacher(old, **load_fitted(g))
    assert t.metric == "cosine" and t.fingerprint() == rec["fingerprint"]
    assert run_verify(VerifyConfig(shards=tiny_dataset, cache=out, spot_checks=3), progress=False).ok
    # Extending it: the new default (euclidean) is refused, naming the metric; --metric cosine matches.
    with pytest.raises(ValueError, match="metric 'cosine', asked 'euclidean'"):
        _extract(tiny_dataset, out, TeacherConfig(f"kmeans:{BASE}", group="old", codebook_size=8, fit_samples=16))
    _extract(tiny_dataset, out, tc)


def test_timm_intermediate_layer_has_the_final_norm():
    """DiGIT's features: a block's output with the model's final norm applied, prefix tokens dropped —
    what ``timm:<vit> --layer L`` stores (L 1-based; DiGIT's ViT-B/14 block depth-3 is --layer 10)."""
    t = create_teacher("timm:vit_tiny_test", layer=1)
    m = t.model
    x = t.normalize(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        h = m.blocks[0](h)
        want = m.norm(h)[:, m.num_prefix_tokens :]
        got = t.encode(x).tokens
        assert not torch.allclose(h[:, m.num_prefix_tokens :], want, atol=1e-3)  # the norm does something
    assert torch.allclose(got, want, atol=1e-5)
    k = create_teacher("kmeans:timm:vit_tiny_test", layer=1, codebook=torch.randn(4, 32), metric="euclidean")
    assert k.spec.layer == 1 and torch.equal(k.assign(got), assign_codes(got.flatten(0, 1), k.codebook).view(2, -1))
