"""Shared fixtures: one tiny generated dataset and one local Ray instance per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """Starting Ray costs seconds: every test that needs it shares this one local instance."""
    import ray

    from teacher_cache.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """48 synthetic 32px images, 4 classes, 3 shards of 16."""
    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic

    out = tmp_path_factory.mktemp("tiny_ds")
    prepare_synthetic(
        SyntheticConfig(out=str(out), num_samples=48, num_classes=4, image_size=32, shard_size=16, seed=1)
    )
    return str(out)


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory):
    """fp32 targets (so cached == online exactly) for a feature, a pixel, a code and a PCA-reduced teacher."""
    from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
    from teacher_cache.extract import run_extract
    from teacher_cache.views import AugConfig

    out = str(tmp_path_factory.mktemp("cache") / "c")
    teachers = (
        TeacherConfig("random-vit:32/8", group="vit"),
        TeacherConfig("pixel:32/8", group="pixel"),
        TeacherConfig("kmeans:random-vit:32/8", group="codes", codebook_size=16, fit_samples=24),
        TeacherConfig("pca:random-vit:32/8", group="pca", pca_dim=8, fit_samples=24),
    )
    run_extract(
        ExtractConfig(
            shards=tiny_dataset,
            out=out,
            teachers=teachers,
            aug=AugConfig(views=2),
            storage=StorageConfig(dtype="fp32"),
            executor="local",
        ),
        progress=False,
    )
    return out
