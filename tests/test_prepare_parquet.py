"""``prepare parquet``: Hugging Face style parquet shards (``image`` struct with ``bytes`` and ``path``,
``label``) become tar shards with the image bytes unchanged; extract and the student's loader read them
(issue 11, item 5). The ``s3://`` form runs in tests/test_object_store.py."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from student.data import CachedViews, DataConfig
from teacher_cache.config import ExtractConfig, StorageConfig, TeacherConfig
from teacher_cache.dataset import load_dataset
from teacher_cache.extract import run_extract
from teacher_cache.prepare import ParquetConfig, prepare_parquet
from teacher_cache.shards import iter_tar_samples, pick_image
from teacher_cache.views import AugConfig

REPO = Path(__file__).resolve().parent.parent


def _image(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24 + i % 3, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_hf_parquet(folder: Path, files: int = 2, rows: int = 10) -> list[list[dict]]:
    """``train-0000N-of-0000F.parquet`` files in the Hugging Face ``datasets`` layout; row 3 of the first
    file has no image bytes and row 5 bytes that are no image. Returns every file's rows."""
    folder.mkdir(parents=True, exist_ok=True)
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    out = []
    for f in range(files):
        table_rows = []
        for r in range(rows):
            i = f * rows + r
            fmt = "PNG" if i % 2 else "JPEG"
            data = _image(i, fmt)
            if f == 0 and r == 3:
                data = None
            elif f == 0 and r == 5:
                data = b"not an image"
            table_rows.append(
                {"image": {"bytes": data, "path": f"img{i}.{fmt.lower()}" if i % 4 else None}, "label": i % 3}
            )
        pq.write_table(
            pa.table(
                {
                    "image": pa.array([t["image"] for t in table_rows], type=image_t),
                    "label": pa.array([t["label"] for t in table_rows], type=pa.int64()),
                }
            ),
            folder / f"train-{f:05d}-of-{files:05d}.parquet",
        )
        out.append(table_rows)
    return out


def test_prepare_parquet_keeps_bytes_labels_and_names_bad_rows(tmp_path):
    rows = write_hf_parquet(tmp_path / "pq")
    ds = prepare_parquet(
        ParquetConfig(
            pattern=str(tmp_path / "pq" / "train-{00000..00001}-of-00002.parquet"),
            out=str(tmp_path / "ds"),
            shard_size=8,
        )
    )
    assert ds.info["kind"] == "parquet" and ds.num_samples == 20 and len(ds.shards) == 3
    m = ds.manifest.to_pydict()
    flat = [r for f in rows for r in f]
    assert m["key"][:2] == ["train-00000-of-00002_000000", "train-00000-of-00002_000001"]
    assert m["key"][10] == "train-00001-of-00002_000000"
    assert m["label"] == [r["label"] for r in flat]
    assert m["error"][3] == "no image member" and m["error"][5] and not any(m["error"][6:])
    # The tars hold the parquet's image bytes, unchanged, with an extension that says what they are.
    got = {}
    for shard in ds.shards:
        for s in iter_tar_samples(ds.shard_url(shard)):
            got[s.key] = s
    for i, key in enumerate(m["key"]):
        data = flat[i]["image"]["bytes"]
        picked = pick_image(got[key])
        if data is None:
            assert picked is None
            continue
        assert picked[1] == data and m["hash"][i] == hashlib.blake2b(data, digest_size=16).hexdigest()
        if i != 5:  # the row's path names the extension when it has one, else the magic bytes do
            assert picked[0] == (("png" if i % 2 else "jpeg") if i % 4 else ("png" if i % 2 else "jpg"))
    assert load_dataset(str(tmp_path / "ds")).fingerprint == ds.fingerprint


def test_prepare_parquet_refuses_a_missing_image_column_naming_the_file(tmp_path):
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "pq" / "a.parquet")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "cli.py"),
            "prepare",
            "parquet",
            str(tmp_path / "pq" / "*.parquet"),
            "--out",
            str(tmp_path / "ds"),
        ],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "a.parquet: no image column 'image'" in r.stderr and "--image-column" in r.stderr
    with pytest.raises(ValueError, match="globs are only supported for local paths"):
        ParquetConfig(pattern="s3://bucket/*.parquet", out=str(tmp_path / "x"))


def test_extract_and_loader_read_parquet_shards(tmp_path):
    write_hf_parquet(tmp_path / "pq")
    ds = prepare_parquet(
        ParquetConfig(pattern=str(tmp_path / "pq" / "*.parquet"), out=str(tmp_path / "ds"), shard_size=10)
    )
    cache = tmp_path / "cache"
    summary = run_extract(
        ExtractConfig(
            shards=ds.root,
            out=str(cache),
            executor="local",
            device="cpu",
            teachers=(TeacherConfig("random-vit:32/8"),),
            aug=AugConfig(views=2),
            storage=StorageConfig(chunk_rows=8),
            batch_size=8,
        ),
        progress=False,
    )
    assert summary.ok and summary.tokenizers[0].valid == 18  # the two bad rows are skipped, and named
    assert summary.tokenizers[0].skipped_by_reason
    views = CachedViews(DataConfig(shards=ds.root, cache=str(cache), img_size=32, batch_size=6, shuffle_buffer=0))
    batches = list(views)
    assert len(batches) == 3 and batches[0]["images"].shape == (6, 3, 32, 32)
    assert batches[0]["tokens"].shape[:2] == (6, 16)
    assert sorted(int(x) for b in batches for x in b["labels"]) == sorted(
        ds.manifest.column("label").to_pylist()[i] for i in range(20) if i not in (3, 5)
    )
