"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST; ``.gz`` or not) -> an ImageFolder tree of PNGs, for
``digpt prepare imagefolder``: the real, labelled data the comparisons in LEARNING.md are checked on.

Fashion-MNIST ships in Debian (``apt-get install dataset-fashion-mnist``: 70,000 28x28 grayscale photos of
10 kinds of clothing, under ``/usr/share/datasets/fashion-mnist``), so it installs offline. The study's sets::

    D=/usr/share/datasets/fashion-mnist
    python scripts/idx_to_imagefolder.py $D/train-images-idx3-ubyte.gz $D/train-labels-idx1-ubyte.gz \\
        --out data/fmnist-pretrain --count 2048 --names fashion-mnist
    python scripts/idx_to_imagefolder.py $D/t10k-images-idx3-ubyte.gz $D/t10k-labels-idx1-ubyte.gz \\
        --out data/fmnist-probe --count 8192 --names fashion-mnist
    digpt prepare imagefolder data/fmnist-pretrain --out data/fmnist-pretrain-shards
    digpt prepare imagefolder data/fmnist-probe --out data/fmnist-probe-shards

The first ``count`` images are taken in file order (the pretraining and probe sets come from the two
different files, so no image is in both). Pixels are written unchanged (PNG, lossless, grayscale): the
pipeline's views resample them to each model's input size.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys

import numpy as np

NAMES = {
    "fashion-mnist": (
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle-boot",
    ),
    "mnist": tuple(str(i) for i in range(10)),
}
_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (``magic = 0, 0, dtype, ndim``, big-endian dims, then the data) as an array; only unsigned
    byte data, the format of every MNIST-family release. Raises ValueError naming the file when it is not one."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    size = int(np.prod(dims))
    body = raw[4 + 4 * ndim :]
    if len(body) != size:
        raise ValueError(f"{path}: header says {dims} ({size} bytes), the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def convert(images: str, labels: str, out: str, count: int | None = None, names: str | None = None) -> int:
    """Write the first ``count`` images (all when None) as ``out/<class>/<index>.png``; returns how many."""
    from PIL import Image

    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{images} / {labels}: expected [N, H, W] images and [N] labels, got {x.shape} / {y.shape}")
    n = len(x) if count is None else min(count, len(x))
    if count is not None and count > len(x):
        raise ValueError(f"{images}: asked for {count} images, the file holds {len(x)}")
    classes = NAMES.get(names or "")
    for i in range(n):
        label = int(y[i])
        folder = os.path.join(out, f"{label:02d}-{classes[label]}" if classes else f"{label:02d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(x[i]).save(os.path.join(folder, f"{i:06d}.png"))
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="IDX image file ([N, H, W] unsigned bytes), .gz or not")
    p.add_argument("labels", help="IDX label file ([N] unsigned bytes)")
    p.add_argument("--out", required=True, help="ImageFolder root to write")
    p.add_argument("--count", type=int, default=None, help="the first COUNT images (default: all)")
    p.add_argument("--names", choices=sorted(NAMES), default=None, help="class folder names (default: the label)")
    a = p.parse_args(argv)
    try:
        n = convert(a.images, a.labels, a.out, a.count, a.names)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images under {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
