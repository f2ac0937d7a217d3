"""The cache's names have one definition (``teacher_cache.names``), which configs use without loading the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_config_does_not_load_the_store_or_zarr():
    """Validating a config must not import zarr (or the store, which imports it): a fresh interpreter, since
    this one has them loaded already."""
    code = (
        "import sys, teacher_cache.config, teacher_cache.names\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'zarr' or m.startswith('teacher_cache.store')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_names_module_imports_neither_torch_nor_zarr():
    code = "import sys, teacher_cache.names\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'zarr', 'numpy'}))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_target_names_are_one_definition():
    from teacher_cache import names, objects, store

    assert names.TARGETS == ("tokens", "token_scale", "cls", "cls_scale")
    assert objects.TARGETS is names.TARGETS and store.TARGETS is names.TARGETS and store.TARGET_ARRAYS is names.TARGETS


def test_store_still_exports_the_names():
    """Modules import these from ``teacher_cache.store``; they must be the very objects of ``names``."""
    from teacher_cache import names, store

    for name in (
        "SCHEMA_VERSION",
        "READABLE_SCHEMAS",
        "REPORTS_DIR",
        "LAYOUT",
        "DTYPES",
        "CODECS",
        "slug",
        "shard_ids",
    ):
        assert getattr(store, name) is getattr(names, name), name
    assert all(hasattr(store, name) for name in store.__all__)
