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
    TarDamage,
    iter_tar_members,
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


# ------------------------------------------------------------- the project's tar parser against tarfile


def _tarfile_members(path: Path) -> list[tuple[str, bytes]]:
    """What Python's tarfile reads: the reference the project's parser must agree with."""
    with tarfile.open(path, "r|") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]  # type: ignore[union-attr]


def _ours(path: Path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as f:
        return list(iter_tar_members(f))


def _write(path: Path, fmt: int, entries: list[tuple[str, bytes | str | None]], **kw) -> Path:
    """``entries``: (name, bytes) a regular file, (name, None) a directory, (name, "target") a symlink."""
    with tarfile.open(path, "w", format=fmt, **kw) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


LONG = "d" * 90 + "/" + "e" * 80  # over 100 characters: ustar prefix, GNU ././@LongLink, pax path
ENTRIES: list[tuple[str, bytes | str | None]] = [
    ("dir", None),
    ("a.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("a.cls", b"7"),
    ("link.jpg", "a.jpg"),
    ("empty.txt", b""),
    ("exact.bin", b"x" * 1024),  # a multiple of the block size: no padding
    (LONG + ".jpg", b"long name"),
    ("café/ünï.jpg", "naïve".encode()),
    ("b.c.d.json", b"{}"),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_reads_what_tarfile_reads(tmp_path: Path, fmt: int) -> None:
    path = _write(tmp_path / "t.tar", fmt, ENTRIES)
    assert _ours(path) == _tarfile_members(path)
    assert [n for n, _ in _ours(path)] == [n for n, d in ENTRIES if isinstance(d, bytes)]  # links, dirs skipped


def test_tar_parser_pax_overrides_global_headers_and_base256_sizes(tmp_path: Path) -> None:
    # A global pax header (e.g. `git archive` writes one) and per-member pax records of another size field.
    path = _write(tmp_path / "g.tar", tarfile.PAX_FORMAT, ENTRIES[:3], pax_headers={"comment": "global"})
    assert _ours(path) == _tarfile_members(path)
    # GNU base-256 size field (what tars of files over 8 GiB carry), here on a small member: checksum redone.
    data = bytearray(_write(tmp_path / "u.tar", tarfile.USTAR_FORMAT, [("big.jpg", b"q" * 700)]).read_bytes())
    data[124:136] = b"\x80" + (700).to_bytes(11, "big")
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\x00 " % sum(data[:512])
    (tmp_path / "b256.tar").write_bytes(bytes(data))
    assert _ours(tmp_path / "b256.tar") == _tarfile_members(tmp_path / "b256.tar") == [("big.jpg", b"q" * 700)]


def test_tar_parser_names_damage(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.tar", tarfile.PAX_FORMAT, [("a.jpg", b"1" * 600), ("b.jpg", b"2" * 600)])
    data = path.read_bytes()

    def damaged(blob: bytes) -> tuple[list[str], TarDamage]:
        got: list[str] = []
        with pytest.raises(TarDamage) as e:
            for name, _ in iter_tar_members(io.BytesIO(blob)):
                got.append(name)
        return got, e.value

    second = 512 + 1024  # header of b.jpg: a.jpg's header, 600 bytes of data padded to 1024
    got, e = damaged(data[: second + 512 + 100])  # cut inside b.jpg's data: its header was whole
    assert got == ["a.jpg"] and str(e).startswith("truncated") and e.member == "b.jpg"
    got, e = damaged(data[: second + 200])  # cut inside b.jpg's header
    assert got == ["a.jpg"] and "partial header" in str(e) and e.member is None
    got, e = damaged(data[: second + 512 + 1024])  # both members whole, no end-of-archive blocks
    assert got == ["a.jpg", "b.jpg"] and "no end-of-archive marker" in str(e)
    bad = bytearray(data)
    bad[second + 10] ^= 0xFF  # one flipped byte in a header: the checksum refuses it
    got, e = damaged(bytes(bad))
    assert got == ["a.jpg"] and str(e).startswith(f"corrupt: invalid tar header at offset {second}")
    got, e = damaged(b"")
    assert got == [] and str(e).startswith("corrupt: empty")
    # tarfile ends quietly on a cut header; the reader names it (so a shard is never half-read in silence).
    (tmp_path / "cut.tar").write_bytes(data[: second + 200])
    assert [n for n, _ in _tarfile_members(tmp_path / "cut.tar")] == ["a.jpg"]


def test_tar_parser_refuses_sparse_members(tmp_path: Path) -> None:
    data = bytearray(_write(tmp_path / "u.tar", tarfile.GNU_FORMAT, [("s.jpg", b"z" * 10)]).read_bytes())
    data[156:157] = b"S"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\x00 " % sum(data[:512])
    with open(tmp_path / "s.tar", "wb") as f:
        f.write(bytes(data))
    (err,) = _read(str(tmp_path / "s.tar"))
    assert isinstance(err, ShardError) and err.reason.startswith("unsupported: GNU sparse member 's.jpg'")


def test_loader_and_extraction_read_the_same_keys_as_webdataset(tmp_path: Path) -> None:
    """The loader read shards with webdataset before; the project's reader groups members into the same
    samples (key = name up to the basename's first dot, extension lower-cased) on a tar of mixed formats."""
    wds = pytest.importorskip("webdataset")
    path = _write(tmp_path / "m.tar", tarfile.PAX_FORMAT, [e for e in ENTRIES if e[0] != "b.c.d.json"])
    theirs = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.tarfile_to_samples()(iter([{"url": str(path)}]))
    ]
    ours = [(s.key, s.files) for s in _read(str(path))]
    assert ours == theirs


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_tar_parser_reads_gnu_tar_cli_archives(tmp_path: Path, fmt: str) -> None:
    """Shards made by the `tar` command line (GNU tar: its long-name records, pax headers with atime/ctime
    per member in posix mode, directory entries) read as tarfile reads them."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar command on this machine")
    src = tmp_path / "src"
    files = {
        "0001.jpg": b"\xff\xd8" + os.urandom(3000),
        "0001.cls": b"3",
        "sub/0002.jpg": os.urandom(512),
        ("n" * 120) + ".jpg": b"long",  # ustar can hold it only through its 155-byte prefix: give it a dir
    }
    if fmt == "ustar":
        files.pop(("n" * 120) + ".jpg")
        files[("d" * 60) + "/" + ("n" * 80) + ".jpg"] = b"split into prefix and name"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = tmp_path / f"{fmt}.tar"
    subprocess.run(["tar", f"--format={fmt}", "-cf", str(out), "-C", str(src), "."], check=True)
    ours, theirs = _ours(out), _tarfile_members(out)
    assert ours == theirs
    assert {n.removeprefix("./"): d for n, d in ours} == files


def test_tar_parser_a_lying_size_field_costs_no_memory(tmp_path: Path) -> None:
    """A header claiming a 1 TiB member (GNU base-256 size) in a 2 KB file: named as truncated, without
    asking for a terabyte (a single read(size) raises MemoryError or is killed by the OOM killer)."""
    import resource

    data = bytearray(_write(tmp_path / "t.tar", tarfile.USTAR_FORMAT, [("a.jpg", b"x" * 10)]).read_bytes())
    data[124:136] = b"\x80" + (1 << 40).to_bytes(11, "big")
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\x00 " % sum(data[:512])
    (tmp_path / "lie.tar").write_bytes(bytes(data))
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < used + (4 << 30):
        pytest.skip("the address-space limit is already below what this test sets")
    try:  # what the process maps now + 4 GiB: room for the test, far below the claimed size
        resource.setrlimit(resource.RLIMIT_AS, (used + (4 << 30), hard))
        (err,) = _read(str(tmp_path / "lie.tar"))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert isinstance(err, ShardError) and err.reason.startswith("truncated: unexpected end of data")
    assert err.key == "a"


def test_tar_parser_fuzz_every_damage_is_named(tmp_path: Path) -> None:
    """3,000 seeded mutations of a PAX shard (flipped bytes, cuts, inserted runs): the parser either reads
    it or raises TarDamage naming truncated/corrupt; no other exception escapes, and a cut never yields a
    member that was not whole in the original."""
    import random

    path = _write(
        tmp_path / "f.tar",
        tarfile.PAX_FORMAT,
        [
            (f"k{i}.{e}" if i != 3 else "é" * 60 + f"{i}.{e}", bytes([i]) * n)
            for i in range(6)
            for e, n in (("jpg", 700 + 300 * i), ("cls", 1))
        ],
    )
    good = path.read_bytes()
    whole = dict(_ours(path))
    rng = random.Random(0)
    outcomes = set()
    for _ in range(3000):
        b = bytearray(good)
        op = rng.random()
        if op < 0.5:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.8:
            b = b[: rng.randrange(len(b))]
        else:
            i = rng.randrange(len(b))
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
        got = []
        try:
            for name, data in iter_tar_members(io.BytesIO(bytes(b))):
                got.append((name, data))
            outcomes.add("read")
        except TarDamage as e:
            assert str(e).startswith(("truncated", "corrupt")), e
            outcomes.add(str(e).split(":")[0])
        if op >= 0.5 and op < 0.8:  # a cut: whatever was read is a whole member of the original
            assert all(whole.get(n) == d for n, d in got)
    assert outcomes == {"read", "truncated", "corrupt"}
