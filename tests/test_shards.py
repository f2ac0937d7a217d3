"""Tar shard reading and writing: determinism, key grouping, hostile names, damage."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from teacher_cache.shards import (
    RawSample,
    ShardError,
    iter_tar_samples,
    pick_image,
    split_member_name,
    write_tar_shards,
)


def _make_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar written with plain tarfile, member names taken literally (no sanitising)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _samples(n: int, size: int = 700) -> list[RawSample]:
    return [
        RawSample(f"s{i:03d}", {"jpg": bytes([i % 256]) * size, "cls": str(i % 3).encode(), "txt": b"hi"})
        for i in range(n)
    ]


def _read(url: str) -> list[RawSample | ShardError]:
    return list(iter_tar_samples(url))


def test_write_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    samples = _samples(5)
    names_a = write_tar_shards(samples, str(tmp_path / "a"), shard_size=2)
    names_b = write_tar_shards(iter(samples), str(tmp_path / "b"), shard_size=2, prefix="shard")
    assert names_a == names_b == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".")]  # no temp files left

    read = [s for name in names_a for s in _read(str(tmp_path / "a" / name))]
    assert read == samples
    with tarfile.open(tmp_path / "a" / names_a[0]) as tf:
        first = tf.getmembers()[0]
        assert [m.name for m in tf.getmembers()[:3]] == ["s000.cls", "s000.jpg", "s000.txt"]
        assert (first.mtime, first.uid, first.gid, first.uname, first.gname, first.mode) == (
            0,
            0,
            0,
            "",
            "",
            0o644,
        )


def test_write_refuses_keys_that_would_not_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot write member"):
        write_tar_shards([RawSample("a.b", {"jpg": b"x"})], str(tmp_path), shard_size=1)
    with pytest.raises(ValueError, match="cannot write member"):
        write_tar_shards([RawSample("a", {"JPG": b"x"})], str(tmp_path), shard_size=1)
    with pytest.raises(ValueError, match="shard_size"):
        write_tar_shards([], str(tmp_path), shard_size=0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tar") or p.startswith(".")]


def test_split_member_name_cuts_basename_at_first_dot() -> None:
    assert split_member_name("a.b.c") == ("a", "b.c")
    assert split_member_name("dir.v2/x.Seg.PNG") == ("dir.v2/x", "seg.png")
    assert split_member_name("noext") == ("noext", "")


def test_grouping_by_key(tmp_path: Path) -> None:
    url = _make_tar(
        tmp_path / "g.tar",
        [
            ("a.b.c", b"1"),
            ("a.jpg", b"2"),
            ("d/x.seg.png", b"3"),
            ("d/x.JPG", b"4"),
            ("y.jpg", b"5"),
            ("a.jpg", b"6"),  # the key comes back later: a separate sample, same key
            ("z.jpg", b"7"),
            ("z.jpg", b"8"),  # the same member twice in a row: also a separate sample
        ],
    )
    got = _read(url)
    assert [(s.key, s.files) for s in got] == [
        ("a", {"b.c": b"1", "jpg": b"2"}),
        ("d/x", {"seg.png": b"3", "jpg": b"4"}),
        ("y", {"jpg": b"5"}),
        ("a", {"jpg": b"6"}),
        ("z", {"jpg": b"7"}),
        ("z", {"jpg": b"8"}),
    ]


def test_pick_image_prefers_ext_order() -> None:
    assert pick_image(RawSample("k", {"png": b"p", "jpg": b"j", "txt": b"t"})) == ("jpg", b"j")
    assert pick_image(RawSample("k", {"webp": b"w"})) == ("webp", b"w")
    assert pick_image(RawSample("k", {"txt": b"t"})) is None


def test_hostile_member_names_are_only_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    url = _make_tar(work / "evil.tar", [("../evil.jpg", b"e"), ("/abs/x.jpg", b"x"), ("ok.jpg", b"o")])
    with tarfile.open(url, "a") as tf:  # non-regular members are skipped
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(work)
    got = _read(url)
    assert [(s.key, s.files) for s in got] == [
        ("../evil", {"jpg": b"e"}),
        ("/abs/x", {"jpg": b"x"}),
        ("ok", {"jpg": b"o"}),
    ]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.jpg").exists()


def _cut(tmp_path: Path, data: bytes, n: int) -> str:
    path = tmp_path / f"cut{n}.tar"
    path.write_bytes(data[:n])
    return str(path)


def test_truncated_tar_keeps_complete_samples_then_errors(tmp_path: Path) -> None:
    samples = _samples(4, size=1500)
    (name,) = write_tar_shards(samples, str(tmp_path), shard_size=4)
    data = (tmp_path / name).read_bytes()
    offsets = {}
    with tarfile.open(tmp_path / name) as tf:
        for m in tf.getmembers():
            offsets[m.name] = (m.offset, m.offset_data + m.size)

    # Cut in the middle of s002's image: s000 and s001 survive, s002 is named and dropped.
    start, end = offsets["s002.jpg"]
    got = _read(_cut(tmp_path, data, (start + end) // 2))
    assert got[:-1] == samples[:2]
    assert isinstance(got[-1], ShardError)
    assert got[-1].key == "s002" and got[-1].reason.startswith("truncated")

    # Cut exactly between members, before s003 ends: tarfile alone would end quietly here.
    got = _read(_cut(tmp_path, data, offsets["s003.jpg"][0]))
    assert got[:-1] == samples[:3]
    assert isinstance(got[-1], ShardError) and got[-1].key == "s003"
    assert "end-of-archive" in got[-1].reason

    # Cut inside the first header of s002. s001 was read to its last member, but a reader cannot
    # know that nothing of s001 followed, so s001 is dropped and named rather than kept half-known.
    got = _read(_cut(tmp_path, data, offsets["s002.cls"][0] + 100))
    assert got[:-1] == samples[:1]
    assert isinstance(got[-1], ShardError) and got[-1].key == "s001" and "dropped" in got[-1].reason


def test_corrupt_and_missing_shards_yield_shard_errors(tmp_path: Path) -> None:
    samples = _samples(3)
    (name,) = write_tar_shards(samples, str(tmp_path), shard_size=3)
    data = bytearray((tmp_path / name).read_bytes())
    with tarfile.open(tmp_path / name) as tf:
        third = tf.getmembers()[6].offset  # first member of s002
    data[third : third + 512] = b"\x07" * 512  # garbage header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    got = _read(str(bad))
    assert got[:-1] == samples[:1]
    assert isinstance(got[-1], ShardError) and got[-1].reason.startswith("corrupt")
    assert got[-1].key == "s001"  # the sample in progress is named

    missing = _read(str(tmp_path / "nope.tar"))
    assert len(missing) == 1 and isinstance(missing[0], ShardError)
    assert missing[0].key is None and missing[0].reason.startswith("missing")

    (tmp_path / "empty.tar").write_bytes(b"")
    (empty,) = _read(str(tmp_path / "empty.tar"))
    assert isinstance(empty, ShardError)


def test_gzipped_shards_are_read(tmp_path: Path) -> None:
    samples = _samples(2)
    (name,) = write_tar_shards(samples, str(tmp_path), shard_size=2)
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    assert _read(str(gz)) == samples
    gz.write_bytes(gzip.compress((tmp_path / name).read_bytes())[:-200])
    got = _read(str(gz))
    assert isinstance(got[-1], ShardError) and got[:-1] == samples[: len(got) - 1]
