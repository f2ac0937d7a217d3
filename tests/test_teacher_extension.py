"""A new teacher family added in one file: this module registers ``whiten:<base>`` — a fitted family that
standardises another teacher's tokens with a per-dim mean and std it fits on the data — and runs it through
extract -> verify -> the student loader without touching any other module (README "Extending: a new teacher").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import zarr

from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.teachers import Fit, Teacher, TeacherOutput, create_teacher, list_teachers, register_teacher
from teacher_cache.views import AugConfig

# ------------------------------------------------------------------------------ the family (one file's worth)


class WhitenTeacher(Teacher):
    """The base teacher's tokens, minus a stored per-dim mean, over a stored per-dim std."""

    def __init__(self, base: Teacher, stats: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("stats", stats.float().clone())  # a buffer: part of the weights fingerprint
        self.spec = replace(
            base.spec, name=f"whiten:{base.spec.name}", extra={**base.spec.extra, "base": base.spec.name}
        )

    def encode(self, x: torch.Tensor) -> TeacherOutput:
        out = self.base.encode(x)
        mean, std = self.stats[0], self.stats[1]
        return TeacherOutput((out.tokens - mean) / std, None if out.cls is None else (out.cls - mean) / std)


def _fit(x: torch.Tensor, tc: TeacherConfig) -> np.ndarray:
    x = x.double()
    return torch.stack([x.mean(0), x.std(0).clamp_min(1e-6)]).float().numpy()


WHITEN_FIT = Fit(array="whiten_stats", keyword="stats", fit=_fit, describe=lambda tc: "fit whitening")


def whiten(arg, *, weights=None, layer=None, stats=None, **options) -> Teacher:
    """Standardised tokens of another teacher: ``whiten:<teacher>``."""
    if not arg:
        raise ValueError("name the base teacher: whiten:<teacher>")
    if stats is None:
        raise ValueError(f"whiten:{arg} needs fitted stats; `digpt extract` fits them")
    return WhitenTeacher(create_teacher(arg, weights=weights, layer=layer, **options), torch.as_tensor(stats))


if "whiten" not in list_teachers():  # (a module imported twice must not register twice)
    register_teacher("whiten", tiny="whiten:random-vit:32/8", fit=WHITEN_FIT)(whiten)


# ------------------------------------------------------------------------------ the test


def test_a_fitted_family_from_one_file_runs_extract_verify_and_the_loader(tiny_dataset, tmp_path):
    from student.data import CachedViews, DataConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.store import open_root, open_shard
    from teacher_cache.verify import VerifyConfig, run_verify

    cache = str(tmp_path / "c")
    teachers = (
        TeacherConfig("random-vit:32/8", group="base"),
        TeacherConfig("whiten:random-vit:32/8", group="w", fit_samples=16),
    )
    cfg = ExtractConfig(
        shards=tiny_dataset,
        out=cache,
        teachers=teachers,
        aug=AugConfig(views=2),
        storage=StorageConfig(dtype="fp32"),
        executor="local",
        batch_size=8,
    )
    summary = run_extract(cfg, progress=False)
    assert summary.ok, summary.table()

    # What it fit is stored beside its tokens, and the tokens are the base's, standardised by it.
    root = zarr.open_group(cache, mode="r")
    stats = root["w"]["whiten_stats"][:]
    assert stats.shape == (2, 32) and stats.dtype == np.float32 and (stats[1] > 0).all()
    sid = sorted(root["w"].group_keys())[0]
    base, white = root["base"][sid]["tokens"][:], root["w"][sid]["tokens"][:]
    assert np.allclose(white, (base - stats[0]) / stats[1], atol=1e-4)
    assert not np.allclose(white, base, atol=1e-2)  # it did something

    # verify rebuilds the teacher from the stored stats (fingerprint, alignment spot checks).
    report = run_verify(VerifyConfig(shards=tiny_dataset, cache=cache, spot_checks=4), progress=False)
    assert report.ok, report.table()
    assert any(c.scope == "w" and c.name == "alignment" and c.ok for c in report.checks), report.table()

    # A re-run reuses the stored stats (no refit) and leaves the cache as it is.
    again = run_extract(cfg, progress=False)
    assert again.ok and again.tokenizers[1].shards_skipped_complete == 3
    assert np.array_equal(zarr.open_group(cache, mode="r")["w"]["whiten_stats"][:], stats)

    # The store and the student loader read its targets like any continuous teacher's.
    t = open_shard(open_root(cache), "w", sid).tokens(slice(0, 4), 0)
    assert torch.allclose(t, torch.from_numpy(white[:4, 0]))
    views = CachedViews(
        DataConfig(shards=tiny_dataset, cache=cache, tokenizer="w", img_size=32, batch_size=4, shuffle_buffer=0)
    )
    batch = next(iter(views))
    assert batch["tokens"].shape == (4, 16, 32) and torch.isfinite(batch["tokens"]).all()
    assert batch["images"].shape == (4, 3, 32, 32)
