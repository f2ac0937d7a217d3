"""The shared chores: one atomic write (local and fsspec URLs), one device resolver, progress bars that
write no ``\\r`` frames into logs, one reader of a cache's augmentation record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from teacher_cache.io import atomic_write, atomic_write_text
from teacher_cache.runtime import resolve_device
from teacher_cache.views import AugConfig

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(str(path), "old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("ne")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(str(path), half_then_crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"], "the temporary file was left behind"
    atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["state.json"]
    atomic_write_text(f"file://{tmp_path}/b.txt", "via url")
    assert (tmp_path / "b.txt").read_text() == "via url"


def test_atomic_write_to_an_fsspec_url():
    """A non-local URL gets the whole object in one put; a failed writer uploads nothing."""
    fs = fsspec.filesystem("memory")
    url = "memory://digpt-test/run/summary.json"
    try:
        atomic_write_text(url, '{"ok": true}')
        assert fs.cat_file("/digpt-test/run/summary.json") == b'{"ok": true}'

        def fail(tmp: str) -> None:
            Path(tmp).write_text("partial")
            raise OSError("disk full")

        with pytest.raises(OSError):
            atomic_write(url, fail)
        assert fs.cat_file("/digpt-test/run/summary.json") == b'{"ok": true}'
    finally:
        fs.rm("/digpt-test", recursive=True)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"ProbeConfig\.device 'cuda'.*'auto' or 'cpu'"):
            resolve_device("cuda", "ProbeConfig.device")


def _bar_in_subprocess(stderr_to: str) -> bytes:
    """A real process whose stderr is a file (as under nohup, CI or a job scheduler) runs a bar."""
    code = (
        "from teacher_cache.runtime import progress_bar\n"
        "bar = progress_bar(total=500, desc='extract', unit='img')\n"
        "for _ in range(500): bar.update(1)\n"
        "bar.set_postfix(shards='3/3')\n"
        "bar.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["PYTHONPATH"] = str(REPO)
    with open(stderr_to, "wb") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, timeout=60)
    return Path(stderr_to).read_bytes()


def test_progress_writes_lines_not_frames_into_a_log(tmp_path):
    log = _bar_in_subprocess(str(tmp_path / "err.log"))
    assert b"\r" not in log, log
    lines = log.decode().splitlines()
    # Updates within the interval are not written: a start line and the final state, not 500 frames.
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("extract: 500/500 img") and "shards=3/3" in lines[-1], lines


def test_aug_config_round_trips_through_a_cache_record():
    aug = AugConfig(views=3, scale=(0.3, 0.9), seed=7)
    assert AugConfig.from_json(aug.to_json()) == aug
    assert AugConfig.from_json(aug.to_json()).fingerprint() == aug.fingerprint()
    with pytest.raises(ValueError, match="'solarize'"):
        AugConfig.from_json({**aug.to_json(), "solarize": 0.2})
