"""scripts/idx_to_imagefolder.py: MNIST-format files (the real labelled set of LEARNING.md) to an ImageFolder."""

from __future__ import annotations

import gzip
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import idx_to_imagefolder as idx  # noqa: E402


def _write_idx(path: str, a: np.ndarray) -> str:
    raw = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)
    return path


def test_images_and_labels_land_in_their_class_folders_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.array([3, 0, 3, 9, 1, 0, 2], dtype=np.uint8)
    images = _write_idx(str(tmp_path / "img-idx3-ubyte.gz"), x)
    labels = _write_idx(str(tmp_path / "lab-idx1-ubyte"), y)
    out = tmp_path / "folder"
    assert idx.main([images, labels, "--out", str(out), "--count", "5", "--names", "fashion-mnist"]) == 0
    assert sorted(os.listdir(out)) == ["00-t-shirt", "01-trouser", "03-dress", "09-ankle-boot"]
    for i in range(5):
        name = idx.NAMES["fashion-mnist"][y[i]]
        png = Image.open(out / f"{y[i]:02d}-{name}" / f"{i:06d}.png")
        assert png.mode == "L" and np.array_equal(np.asarray(png), x[i])  # lossless, same pixels
    assert not (out / "02-pullover").exists()  # image 6 was beyond --count


def test_bad_files_are_named(tmp_path, capsys):
    images = _write_idx(str(tmp_path / "i"), np.zeros((2, 4, 4)))
    labels = _write_idx(str(tmp_path / "l"), np.zeros(3))
    assert idx.main([images, labels, "--out", str(tmp_path / "o")]) == 2
    assert "expected [N, H, W] images and [N] labels" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match=f"{bad}: not an unsigned-byte IDX file"):
        idx.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        idx.read_idx(str(short))
    assert (
        idx.main([images, _write_idx(str(tmp_path / "l2"), np.zeros(2)), "--out", str(tmp_path / "p"), "--count", "3"])
        == 2
    )
