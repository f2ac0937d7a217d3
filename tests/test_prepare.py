"""The prepare stage: synthetic, imagefolder and wds sources, the manifest and dataset.json."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from teacher_cache.dataset import (
    MANIFEST_SCHEMA,
    ManifestMismatch,
    iter_dataset_samples,
    load_dataset,
    manifest_fingerprint,
)
from teacher_cache.prepare import (
    ImageFolderConfig,
    SyntheticConfig,
    WdsConfig,
    expand_shard_pattern,
    prepare_imagefolder,
    prepare_synthetic,
    prepare_wds,
)
from teacher_cache.shards import RawSample, write_tar_shards
from teacher_cache.synthetic import (
    class_mask,
    class_names,
    iter_synthetic,
    make_synthetic_image,
)

# ---------------------------------------------------------------------------------------- helpers


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 20, h: int = 12, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _jpeg(seed: int = 0, w: int = 20, h: int = 12) -> bytes:
    return _encode(_rgb(w, h, seed), "JPEG", quality=90)


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced(tmp_path: Path) -> None:
    cfg = SyntheticConfig(out=str(tmp_path / "a"), num_samples=24, num_classes=4, image_size=32, shard_size=10)
    a = prepare_synthetic(cfg)
    b = prepare_synthetic(SyntheticConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    assert a.manifest.column("hash").to_pylist() == b.manifest.column("hash").to_pylist()
    assert a.fingerprint == b.fingerprint
    assert a.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for shard in a.shards:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()

    labels = a.manifest.column("label").to_pylist()
    assert [labels.count(c) for c in range(4)] == [6, 6, 6, 6]
    assert a.manifest.column("index").to_pylist()[:12] == list(range(10)) + [0, 1]
    assert set(a.manifest.column("error").to_pylist()) == {""}
    assert set(a.manifest.column("width").to_pylist()) == {32}
    assert a.info["classes"] == class_names(4) and a.info["num_classes"] == 4

    other_seed = prepare_synthetic(SyntheticConfig(**{**cfg.__dict__, "out": str(tmp_path / "c"), "seed": 1}))
    assert other_seed.fingerprint != a.fingerprint


def test_synthetic_sample_is_independent_of_stream_position() -> None:
    stream = list(iter_synthetic(num_samples=7, num_classes=5, image_size=32, seed=3))
    key, label, img = stream[6]
    alone = make_synthetic_image(6 % 5, np.random.default_rng([3, 6]), 32, 5)
    assert (key, label) == ("00000006", 1)
    assert np.array_equal(np.asarray(img), np.asarray(alone))
    assert img.mode == "RGB" and img.size == (32, 32)


def test_synthetic_classes_are_not_separable_by_mean_colour() -> None:
    feats, labels = [], []
    for _, label, img in iter_synthetic(num_samples=8 * 24, num_classes=8, image_size=32, seed=0):
        feats.append(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))
        labels.append(label)
    x, y = np.stack(feats), np.array(labels)
    train = np.arange(len(y)) // 8 % 2 == 0  # every other round of the 8 classes
    means = np.stack([x[train & (y == c)].mean(0) for c in range(8)])
    pred = np.argmin(((x[~train, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == y[~train]).mean())
    assert accuracy < 0.3, accuracy  # chance is 0.125


@pytest.mark.parametrize("num_classes", [8, 64])
def test_synthetic_classes_differ_in_form(num_classes: int) -> None:
    # Best rotation-invariant IoU of each class's canonical mask against every other class.
    size, angles = 48, [2 * math.pi * k / 12 for k in range(12)]
    masks = np.stack(
        [np.stack([class_mask(c, num_classes, size, a).ravel() for a in angles]) for c in range(num_classes)]
    ).astype(np.float32)  # [C, A, D]
    upright, turned = masks[:, 0], masks.reshape(num_classes * len(angles), -1)
    inter = upright @ turned.T
    iou = inter / (upright.sum(1)[:, None] + turned.sum(1)[None] - inter)
    iou = iou.reshape(num_classes, num_classes, len(angles)).max(-1)
    assert np.allclose(np.diag(iou), 1.0)
    np.fill_diagonal(iou, 0.0)
    assert iou.max() < 0.85, iou.max()
    assert len(set(class_names(num_classes))) == num_classes


def test_rerun_replaces_stale_shards_and_loads(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare_synthetic(SyntheticConfig(out=str(out), num_samples=6, num_classes=2, image_size=16, shard_size=2))
    ds = prepare_synthetic(SyntheticConfig(out=str(out), num_samples=6, num_classes=2, image_size=16, shard_size=4))
    assert (
        sorted(p for p in os.listdir(out) if p.endswith(".tar"))
        == ds.shards
        == ["shard-000000.tar", "shard-000001.tar"]
    )
    loaded = load_dataset(str(out))
    assert loaded.fingerprint == ds.fingerprint and loaded.num_samples == 6
    assert loaded.manifest.schema.equals(MANIFEST_SCHEMA)
    assert loaded.rows("shard-000001.tar")["key"] == ["00000004", "00000005"]
    assert loaded.rows("nope.tar")["key"] == []
    assert loaded.shard_url("shard-000000.tar") == os.path.join(str(out), "shard-000000.tar")
    assert loaded.shard_url("/abs/x.tar") == "/abs/x.tar" and loaded.shard_url("s3://b/x.tar") == "s3://b/x.tar"
    assert "6 samples in 2 shards, 2 classes" in loaded.summary()


# ---------------------------------------------------------------------------------------- imagefolder


def _image_tree(root: Path) -> dict[str, bytes]:
    """An ImageNet-style tree with the awkward cases; returns {relative path: bytes} of images."""
    good = _jpeg(1)
    cmyk = _encode(_rgb(16, 10, 2).convert("CMYK"), "JPEG")
    gray = _encode(_rgb(9, 7, 3).convert("L"), "PNG")
    rgba = _rgb(8, 8, 4).convert("RGBA")
    rgba.putalpha(128)
    deep = Image.fromarray(np.arange(30 * 5, dtype=np.uint16).reshape(5, 30) * 400)
    assert deep.mode.startswith("I;16")
    files = {
        "cat/a.jpg": good,
        "cat/corrupt.jpg": good[: len(good) // 2],
        "cat/empty.jpg": b"",
        "dog/cmyk.jpg": cmyk,
        "dog/gray.png": gray,
        "dog/sub/rgba.png": _encode(rgba, "PNG"),
        "eel/deep.PNG": _encode(deep, "PNG"),
        "eel/junk.webp": b"not an image at all",
        "eel/x y.v2.JPEG": _jpeg(5, 6, 4),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "stray.jpg").write_bytes(good)
    (root / ".hidden").mkdir()
    return files


def test_imagefolder_rows_labels_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = _image_tree(root)
    ds = prepare_imagefolder(ImageFolderConfig(root=str(root), out=str(tmp_path / "out"), shard_size=3))
    m = ds.manifest.to_pydict()
    assert ds.info["classes"] == ["cat", "dog", "eel"] and ds.info["kind"] == "imagefolder"
    assert m["key"] == [
        "0000_a", "0000_corrupt", "0000_empty", "0001_cmyk", "0001_gray", "0001_sub_rgba",
        "0002_deep", "0002_junk", "0002_x_y_v2",
    ]  # fmt: skip
    assert m["label"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert m["ext"] == ["jpg", "jpg", "jpg", "jpg", "png", "png", "png", "webp", "jpeg"]
    assert m["shard"] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 3 + ["shard-000002.tar"] * 3
    assert m["index"] == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert list(zip(m["width"], m["height"])) == [
        (20, 12),
        (0, 0),
        (0, 0),
        (16, 10),
        (9, 7),
        (8, 8),
        (30, 5),
        (0, 0),
        (6, 4),
    ]
    assert m["error"][1].startswith("undecodable") and m["error"][2] == "empty file"
    assert m["error"][7].startswith("undecodable")
    assert [e for i, e in enumerate(m["error"]) if i not in (1, 2, 7)] == [""] * 6
    assert ds.info["num_errors"] == 3
    assert m["bytes"] == [len(d) for d in files.values()]
    skipped = {s["path"]: s["reason"] for s in ds.info["skipped_files"]}
    assert set(skipped) == {"cat/notes.txt", "stray.jpg", ".hidden"}
    assert "not an image extension" in skipped["cat/notes.txt"]
    assert "errors: 3 samples (empty file: 1, undecodable: 2)" in ds.summary()

    # Identical input, identical output: shards and manifest byte for byte (no object addresses
    # from PIL's error messages, no timestamps).
    again = prepare_imagefolder(ImageFolderConfig(root=str(root), out=str(tmp_path / "again"), shard_size=3))
    for name in [*again.shards, "manifest.parquet"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()

    # The shards hold the original bytes unchanged, with a cls member, and pair with the manifest.
    originals = iter(files.values())
    for shard in ds.shards:
        for row, sample in iter_dataset_samples(ds, shard):
            assert sample is not None and sample.files[row["ext"]] == next(originals)
            assert sample.files["cls"] == str(row["label"]).encode()


def test_imagefolder_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="root"):
        prepare_imagefolder(ImageFolderConfig(root=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(_jpeg())
    with pytest.raises(ValueError, match="no class directories"):
        prepare_imagefolder(ImageFolderConfig(root=str(tmp_path / "flat"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # bad input fails before any output is made


# ---------------------------------------------------------------------------------------- wds


def _wds_shards(tmp_path: Path) -> Path:
    """Two img2dataset-style shards (00000 with a parquet sidecar, 00001 without) and a broken one."""
    data = tmp_path / "laion"
    first = [
        RawSample("000000000", {"jpg": _jpeg(10), "txt": b"ignored when parquet", "cls": b"3"}),
        RawSample("000000001", {"png": _encode(_rgb(5, 5, 11), "PNG"), "json": b'{"label": 7}'}),
        RawSample("000000002", {"txt": b"no image here"}),
        RawSample("000000000", {"jpg": _jpeg(12)}),  # the same key again later in the shard
    ]
    second = [
        RawSample("000010000", {"jpg": _jpeg(13), "txt": "a café".encode(), "json": b'{"url": "http://x/1"}'}),
        RawSample("000010001", {"jpg": _jpeg(14), "cls": b"dog"}),
        RawSample("000010002", {"jpg": _jpeg(15), "json": b"{not json"}),
    ]
    third = [RawSample(f"00002000{i}", {"jpg": _jpeg(20 + i, 64, 64)}) for i in range(3)]
    for number, samples in enumerate([first, second, third]):
        (name,) = write_tar_shards(samples, str(data), shard_size=len(samples), prefix=f"tmp{number}")
        os.replace(data / name, data / f"{number:05d}.tar")
    pq.write_table(
        pa.table(
            {
                "key": ["000000000", "000000001", "000000002", "000000003"],
                "caption": ["a cat", None, "text only", "failed download"],
                "url": ["http://a/0", "http://a/1", "http://a/2", "http://a/3"],
                "width": [20, 5, None, None],
                "height": [12, 5, None, None],
                "status": ["success", "success", "success", "failed_to_download"],
            }
        ),
        data / "00000.parquet",
    )
    broken = (data / "00002.tar").read_bytes()
    with tarfile.open(data / "00002.tar") as tf:
        cut = tf.getmembers()[2].offset_data + 100  # inside the last sample's image
    (data / "00002.tar").write_bytes(broken[:cut])
    return data


def test_wds_indexes_in_place_with_metadata(tmp_path: Path) -> None:
    data = _wds_shards(tmp_path)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    ds = prepare_wds(WdsConfig(pattern=str(data / "{00000..00002}.tar"), out=str(tmp_path / "idx")))
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # never rewritten
    assert ds.shards == [str(data / f"{i:05d}.tar") for i in range(3)]
    assert sorted(os.listdir(tmp_path / "idx")) == ["dataset.json", "manifest.parquet"]
    assert ds.manifest.column_names == MANIFEST_SCHEMA.names + ["caption", "url"]

    m = ds.manifest.to_pydict()
    assert m["key"] == ["000000000", "000000001", "000000002", "000000000", "000010000", "000010001", "000010002",
                        "000020000", "000020001"]  # fmt: skip
    assert m["index"] == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert m["label"] == [3, 7, -1, -1, -1, -1, -1, -1, -1]
    assert m["caption"][:5] == ["a cat", "", "text only", "a cat", "a café"]
    assert m["url"][:5] == ["http://a/0", "http://a/1", "http://a/2", "http://a/0", "http://x/1"]
    assert m["error"][:3] == ["", "", "no image member"]
    assert m["error"][3] == "duplicate key"
    assert m["error"][5].startswith("unknown label") and m["error"][6].startswith("bad json")
    assert m["error"][7:] == ["", ""]
    assert m["bytes"][2] == 0 and m["hash"][2] == "" and m["ext"][:3] == ["jpg", "png", ""]

    (err,) = ds.info["shard_errors"]
    assert err["shard"] == str(data / "00002.tar") and err["key"] == "000020002"
    assert err["reason"].startswith("truncated")
    info = json.loads((tmp_path / "idx" / "dataset.json").read_text())
    assert info["kind"] == "wds" and info["classes"] is None and info["num_samples"] == 9
    assert info["num_errors"] == 4 and info["config"]["pattern"].endswith("{00000..00002}.tar")
    assert info["created_by"].startswith("digpt ")

    rows = list(iter_dataset_samples(load_dataset(str(tmp_path / "idx")), ds.shards[2]))
    assert [r["key"] for r, _ in rows] == ["000020000", "000020001"]
    assert all(s is not None for _, s in rows)


def test_wds_pattern_expansion(tmp_path: Path) -> None:
    data = _wds_shards(tmp_path)
    assert expand_shard_pattern(str(data / "*.tar")) == [str(data / f"{i:05d}.tar") for i in range(3)]
    assert expand_shard_pattern(str(data / "0000{1,0}.tar")) == [
        str(data / "00001.tar"),
        str(data / "00000.tar"),
    ]
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        expand_shard_pattern(str(data / "{00000..00009}.tar"))
    with pytest.raises(FileNotFoundError, match="matched no shards"):
        expand_shard_pattern(str(data / "*.tgz"))
    url = f"file://{data}/{{00000..00001}}.tar"
    assert expand_shard_pattern(url) == [f"file://{data}/00000.tar", f"file://{data}/00001.tar"]
    with pytest.raises(FileNotFoundError, match="00007.tar"):
        expand_shard_pattern(f"file://{data}/{{00006..00007}}.tar")


def test_fingerprint_follows_image_bytes(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    samples = [RawSample(f"k{i}", {"jpg": _jpeg(i)}) for i in range(3)]
    (name,) = write_tar_shards(samples, str(data), shard_size=3)
    ds = prepare_wds(WdsConfig(pattern=str(data / name), out=str(tmp_path / "a")))

    raw = bytearray((data / name).read_bytes())
    with tarfile.open(data / name) as tf:
        pos = tf.getmembers()[1].offset_data + 300  # inside k1's entropy-coded data
    raw[pos] ^= 0x01
    (data / name).write_bytes(bytes(raw))
    changed = prepare_wds(WdsConfig(pattern=str(data / name), out=str(tmp_path / "b")))
    assert changed.manifest.column("hash")[1] != ds.manifest.column("hash")[1]
    assert changed.fingerprint != ds.fingerprint
    assert manifest_fingerprint(changed.manifest) == changed.fingerprint

    # The old index now describes another file: reading through it is refused, not misaligned.
    with pytest.raises(ManifestMismatch, match="k1"):
        list(iter_dataset_samples(ds, ds.shards[0]))


def test_load_dataset_names_missing_and_tampered_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="digpt prepare"):
        load_dataset(str(tmp_path / "nothing"))
    out = tmp_path / "ds"
    ds = prepare_synthetic(SyntheticConfig(out=str(out), num_samples=4, num_classes=2, image_size=16, shard_size=4))
    pq.write_table(ds.manifest.slice(0, 3), out / "manifest.parquet")
    with pytest.raises(ValueError, match="fingerprint"):
        load_dataset(str(out))


# ---------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda t: SyntheticConfig(out=t, num_samples=0), "num_samples"),
        (lambda t: SyntheticConfig(out=t, num_classes=1), "num_classes"),
        (lambda t: SyntheticConfig(out=t, num_classes=65), "num_classes"),
        (lambda t: SyntheticConfig(out=t, image_size=4), "image_size"),
        (lambda t: SyntheticConfig(out=t, shard_size=0), "shard_size"),
        (lambda t: SyntheticConfig(out=t, seed=-1), "seed"),
        (lambda t: SyntheticConfig(out=""), "out"),
        (lambda t: ImageFolderConfig(root=t, out=t + "/o", shard_size=0), "shard_size"),
        (lambda t: ImageFolderConfig(root=t, out=t + "/inside"), "out"),
        (lambda t: ImageFolderConfig(root="", out=t), "root"),
        (lambda t: WdsConfig(pattern="", out=t), "pattern"),
        (lambda t: WdsConfig(pattern="s3://bucket/*.tar", out=t), "pattern"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, make, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        make(str(tmp_path))


def test_wds_over_fsspec_urls(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    write_tar_shards([RawSample(f"k{i}", {"jpg": _jpeg(i)}) for i in range(4)], str(data), shard_size=2)
    pattern = f"file://{data}/shard-{{000000..000001}}.tar"
    ds = prepare_wds(WdsConfig(pattern=pattern, out=str(tmp_path / "idx")))
    assert ds.shards == [f"file://{data}/shard-00000{i}.tar" for i in range(2)]
    loaded = load_dataset(f"file://{tmp_path}/idx")
    assert loaded.shard_url(ds.shards[1]) == ds.shards[1]
    assert [s.key for _, s in iter_dataset_samples(loaded, ds.shards[1])] == ["k2", "k3"]


def test_synthetic_sets_drawn_in_processes_are_byte_identical(tmp_path):
    """`prepare synthetic` draws in spawned processes for larger sets: the shards and manifest are the same
    bytes as drawn here, in one process (sample i depends on (seed, i) alone)."""
    import hashlib

    def digest(processes: int) -> dict[str, str]:
        out = tmp_path / str(processes)
        prepare_synthetic(
            SyntheticConfig(out=str(out), num_samples=150, num_classes=5, image_size=32, shard_size=64, seed=2),
            processes=processes,
        )
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}

    one, two = digest(1), digest(2)
    assert len(one) == 3 and one == two
