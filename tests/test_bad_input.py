"""Bad input through the real commands: ``prepare imagefolder`` / ``prepare wds`` -> ``extract --executor
local`` -> ``verify`` (DESIGN invariant 5: bad input is named, not fatal, and never silent).

Policy under test (teacher_cache/images.py, prepare/, shards.py):

* CMYK, grayscale, RGBA/LA, palette(+transparency) and 16-bit images are converted to 8-bit RGB
  (alpha composited onto white) and extracted like any other;
* a zero-byte, undecodable or truncated image, a decompression bomb (header claims more than
  ``MAX_PIXELS``), a duplicate key within a shard, a sample with no image and an unknown label are
  skipped: kept in the manifest with a reason, recorded in ``CACHE/reports/skipped-<group>.jsonl`` with
  shard, key and reason, counted in the extract summary;
* a truncated or corrupt tar keeps every complete sample before the damage; the damage is recorded
  in ``dataset.json`` (shard, the dropped key, why) and printed by ``prepare``;
* files that are not images, and hidden class folders, are listed under ``skipped_files``;
* every run finishes, and ``verify`` passes on the result.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from teacher_cache.images import MAX_PIXELS, BadImage, decode_image
from teacher_cache.shards import RawSample, write_tar_shards

# ---------------------------------------------------------------------------------------------
# image bytes of every kind


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb_jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    return _save(Image.new("RGB", size, color), "JPEG", quality=95)


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (36, 28), (0, 0, 0, 0)), "JPEG", quality=95)  # no ink: white


def _gray_png() -> bytes:
    return _save(Image.new("L", (30, 30), 128), "PNG")


def _rgba_png() -> bytes:
    img = Image.new("RGBA", (32, 24), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (0, 0, 16, 24))  # left half fully transparent
    return _save(img, "PNG")


def _la_png() -> bytes:
    return _save(Image.new("LA", (20, 20), (10, 0)), "PNG")


def _palette_png() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))
    return _save(img, "PNG", transparency=0)  # index 0 transparent


def _gray16_png() -> bytes:
    arr = np.full((24, 24), 65535, dtype=np.uint16)
    arr[:, :12] = 0
    img = Image.fromarray(arr)
    assert img.mode == "I;16", img.mode
    return _save(img, "PNG")


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 mode-"1" PNG whose header is patched to claim ``width x height`` (a few bytes)."""
    data = bytearray(_save(Image.new("1", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _truncated_jpeg() -> bytes:
    return _rgb_jpeg((10, 200, 10), (64, 64))[:300]  # header intact, entropy-coded data cut


GARBAGE = bytes(range(256)) * 4

CONVERTED = {  # name -> bytes; all must decode to RGB and be extracted
    "cmyk.jpg": _cmyk_jpeg,
    "gray.png": _gray_png,
    "rgba.png": _rgba_png,
    "la.png": _la_png,
    "palette.png": _palette_png,
    "gray16.png": _gray16_png,
}
REFUSED = {  # name -> (bytes, reason kind recorded)
    "zero.jpg": (lambda: b"", "empty file"),
    "garbage.jpg": (lambda: GARBAGE, "undecodable"),
    "truncated.jpg": (_truncated_jpeg, "undecodable"),
    "bomb.png": (lambda: _bomb_png(20000, 20000), "too large"),  # past PIL's error threshold
    "bomb2.png": (lambda: _bomb_png(10000, 10000), "too large"),  # PIL would only warn here
}


# ---------------------------------------------------------------------------------------------
# the decoder's conversion policy


@pytest.mark.parametrize(
    "name,left,right",
    [
        ("cmyk.jpg", (255, 255, 255), (255, 255, 255)),
        ("gray.png", (128, 128, 128), (128, 128, 128)),
        ("rgba.png", (255, 255, 255), (255, 0, 0)),  # transparent half composited onto white
        ("la.png", (255, 255, 255), (255, 255, 255)),  # alpha 0 everywhere
        ("palette.png", (255, 255, 255), (255, 255, 255)),  # index 0 transparent; index 1 yellow... left
        ("gray16.png", (0, 0, 0), (255, 255, 255)),  # 16-bit full scale -> 8-bit full scale
    ],
)
def test_modes_are_converted_to_rgb(name, left, right):
    img = decode_image(CONVERTED[name]())
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if name == "palette.png":  # left half is palette index 1 (opaque yellow), right half transparent
        left = (255, 255, 0)
    got_l, got_r = tuple(int(v) for v in arr[arr.shape[0] // 2, 1]), tuple(int(v) for v in arr[arr.shape[0] // 2, -2])
    assert np.allclose(got_l, left, atol=3) and np.allclose(got_r, right, atol=3), (got_l, got_r)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_images_name_the_reason(name):
    make, kind = REFUSED[name]
    with pytest.raises(BadImage) as e:
        decode_image(make())
    assert str(e.value).startswith(kind)
    assert "0x" not in str(e.value)  # no object addresses: the same file gives the same recorded reason


def test_bomb_limit_is_the_stated_one():
    assert MAX_PIXELS == 89_478_485
    decode_image(_bomb_png(1, 1))  # the unpatched file is fine
    with pytest.raises(BadImage, match="too large"):
        decode_image(_bomb_png(9460, 9460))  # 89.49 M pixels: just over


# ---------------------------------------------------------------------------------------------
# end to end


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().out


def _skipped(cache: Path, group: str) -> list[dict]:
    return [json.loads(line) for line in (cache / "reports" / f"skipped-{group}.jsonl").read_text().splitlines()]


def _summary(cache: Path) -> dict:
    return json.loads((cache / "reports" / "extract-summary.json").read_text())["summary"]


def _extract_and_verify(capsys, ds: Path, cache: Path) -> str:
    rc, out = _run(
        capsys,
        "extract",
        "--shards",
        str(ds),
        "--out",
        str(cache),
        "--teacher",
        "pixel:32/8",
        "--teacher",
        "random-vit:32/8",
        "--executor",
        "local",
        "--chunk-rows",
        "4",
    )
    assert rc == 0, out
    rc, vout = _run(capsys, "verify", "--shards", str(ds), "--cache", str(cache), "--spot-checks", "6")
    assert rc == 0, vout
    return out


def test_imagefolder_bad_images(tmp_path, capsys):
    root = tmp_path / "root"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"ok{i}.jpg").write_bytes(_rgb_jpeg((60 * i, 100, 50)))
    for name, make in CONVERTED.items():
        (root / "cats" / name).write_bytes(make())
    for name, (make, _) in REFUSED.items():
        (root / "dogs" / name).write_bytes(make())
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(_rgb_jpeg())
    (root / "stray.jpg").write_bytes(_rgb_jpeg())

    ds, cache = tmp_path / "ds", tmp_path / "cache"
    rc, out = _run(capsys, "prepare", "imagefolder", str(root), "--out", str(ds), "--shard-size", "8")
    assert rc == 0
    assert f"errors: {len(REFUSED)} samples" in out
    info = json.loads((ds / "dataset.json").read_text())
    assert sorted(s["path"] for s in info["skipped_files"]) == [".cache", "dogs/notes.txt", "stray.jpg"]
    assert all(s["reason"] for s in info["skipped_files"])

    table = _extract_and_verify(capsys, ds, cache)
    n_ok = 6 + len(CONVERTED)
    for group in ("pixel_32_8", "random-vit_32_8"):
        skipped = _skipped(cache, group)
        by_key = {s["key"].split("_", 1)[1]: s for s in skipped}  # key = {label:04d}_{path stem}
        assert sorted(by_key) == sorted(Path(n).stem for n in REFUSED)
        for name, (_, kind) in REFUSED.items():
            s = by_key[Path(name).stem]
            assert s["reason"].startswith(kind) and s["shard"].endswith(".tar"), s
        t = next(t for t in _summary(cache)["tokenizers"] if t["group"] == group)
        assert (t["samples"], t["valid"]) == (n_ok + len(REFUSED), n_ok)
        assert t["skipped_by_reason"] == {"empty file": 1, "undecodable": 2, "too large": 2}
        assert f"skipped in {group}: empty file x1, too large x2, undecodable x2" in table
    # Converted images were extracted: their rows are valid.
    import zarr

    tok = zarr.open_group(str(cache), mode="r")["pixel_32_8"]
    valid = {str(k).split("_", 1)[1]: bool(v) for _, g in tok.groups() for k, v in zip(g["keys"][:], g["valid"][:])}
    assert all(valid[Path(n).stem] for n in CONVERTED) and not any(valid[Path(n).stem] for n in REFUSED)


def _tar_bytes(samples: list[RawSample], tmp: Path, name: str) -> bytes:
    write_tar_shards(samples, str(tmp / name), shard_size=len(samples))
    return (tmp / name / "shard-000000.tar").read_bytes()


def test_wds_bad_samples_and_damaged_shards(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    jpg = _rgb_jpeg()
    # Shard 0: every per-sample problem. Duplicate keys cannot be written by our writer (it
    # groups by key), so the second copy of "dup" is made by splicing two tars' members.
    good = [RawSample(f"g{i}", {"jpg": _rgb_jpeg((30 * i, 90, 9)), "cls": b"1"}) for i in range(4)]
    bad = [
        RawSample("cmyk", {"jpg": _cmyk_jpeg(), "cls": b"0"}),
        RawSample("gray16", {"png": _gray16_png(), "cls": b"0"}),
        RawSample("rgba", {"png": _rgba_png(), "json": b'{"label": 2}'}),
        RawSample("zero", {"jpg": b"", "cls": b"0"}),
        RawSample("garbage", {"jpg": GARBAGE, "cls": b"0"}),
        RawSample("bomb", {"png": _bomb_png(20000, 20000), "cls": b"0"}),
        RawSample("noimage", {"txt": b"a caption without its image", "cls": b"0"}),
        RawSample("badcls", {"jpg": jpg, "cls": b"tabby"}),
        RawSample("badjson", {"jpg": jpg, "json": b'{"label": "tabby"}'}),
        RawSample("neglabel", {"jpg": jpg, "cls": b"-7"}),
        RawSample("dup", {"jpg": jpg, "cls": b"1"}),
    ]
    first = _tar_bytes(good + bad, tmp_path, "a")
    again = _tar_bytes([RawSample("dup", {"jpg": _rgb_jpeg((1, 2, 3)), "cls": b"1"})], tmp_path, "b")
    # a tar is 512-byte blocks ending in two zero blocks (+ record padding): splice before the end
    body = first.rstrip(b"\0")
    body += b"\0" * (-len(body) % 512)
    extra = again.rstrip(b"\0")
    extra += b"\0" * (-len(extra) % 512)
    (raw / "s0.tar").write_bytes(body + extra + b"\0" * 10240)
    # Shard 1: truncated in the middle of its second sample's image (t1.jpg; t0 stays whole).
    full = _tar_bytes(
        [RawSample(f"t{i}", {"jpg": _rgb_jpeg((9, 9, 20 * i), (64, 48)), "cls": b"1"}) for i in range(4)], tmp_path, "c"
    )
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        t1 = tf.getmember("t1.jpg")
    (raw / "s1.tar").write_bytes(full[: t1.offset_data + t1.size // 2])
    # Shard 2: not a tar at all.
    (raw / "s2.tar").write_bytes(GARBAGE)

    ds, cache = tmp_path / "ds", tmp_path / "cache"
    rc, out = _run(capsys, "prepare", "wds", str(raw / "s{0..2}.tar"), "--out", str(ds))
    assert rc == 0
    info = json.loads((ds / "dataset.json").read_text())
    errors = {Path(e["shard"]).name: e for e in info["shard_errors"]}
    assert set(errors) == {"s1.tar", "s2.tar"}
    assert errors["s1.tar"]["reason"].startswith("truncated") and errors["s1.tar"]["key"] == "t1"
    assert errors["s2.tar"]["reason"].startswith(("corrupt", "truncated")) and errors["s2.tar"]["key"] is None
    assert "shard error: " in out and "truncated" in out

    table = _extract_and_verify(capsys, ds, cache)
    want = {
        "zero": "empty file",
        "garbage": "undecodable",
        "bomb": "too large",
        "noimage": "no image member",
        "badcls": "unknown label",
        "badjson": "unknown label",
        "neglabel": "unknown label",
        "dup": "duplicate key",
    }
    for group in ("pixel_32_8", "random-vit_32_8"):
        skipped = _skipped(cache, group)
        assert {s["key"]: s["reason"].split(":")[0] for s in skipped} == want
        assert all(Path(s["shard"]).name == "s0.tar" for s in skipped)
        t = next(t for t in _summary(cache)["tokenizers"] if t["group"] == group)
        # s0: 4 good + 3 converted + the first "dup" valid; s1: t0 only (t1 was cut); s2: nothing
        assert (t["samples"], t["valid"]) == (16 + 1, 8 + 1)
        assert sum(t["skipped_by_reason"].values()) == len(want)
        assert "skipped in " + group in table
    import zarr

    tok = zarr.open_group(str(cache), mode="r")["pixel_32_8"]
    shards = {g.attrs["shard"]["name"]: g for _, g in tok.groups()}
    assert all("complete" in g.attrs for g in shards.values()) and len(shards) == 3
    s0 = next(g for n, g in shards.items() if n.endswith("s0.tar"))
    keys, valid = [str(k) for k in s0["keys"][:]], s0["valid"][:]
    assert keys.count("dup") == 2 and valid[keys.index("dup")] and not valid[len(keys) - 1]
    assert all(valid[keys.index(k)] for k in ("cmyk", "gray16", "rgba"))
