"""One way to write a file atomically, on a local disk or at an fsspec URL.

A reader (a resumed run, a concurrent ``verify``, a second rank) sees either the previous file or the
whole new one, never a part: a crash mid-write leaves only a temporary file, which is removed when the
writer fails in-process and is never read under the final name.

- Local paths: the content goes to ``.<name>.tmp-<pid>`` beside the target (same file system, so the
  rename is atomic), is fsynced, and replaces the target with ``os.replace``.
- Other fsspec URLs (``s3://``, ``gs://``, ``memory://``): the content goes to a local temporary file
  and is uploaded with one ``put``. Object stores make an object visible only once its upload has
  completed, which is the same guarantee.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import fsspec


def is_local(path: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return fsspec.utils.get_protocol(path) in ("file", "local")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` with what ``write(tmp)`` writes to the local file ``tmp``.

    ``write`` gets a local path whatever ``path`` is, so writers that only take a file name
    (``pyarrow.parquet.write_table``, ``safetensors.torch.save_file``, ``tarfile``) work unchanged.
    """
    if is_local(path):
        path = fsspec.core.strip_protocol(path) if path.startswith("file://") else path
        parent = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    fs, remote = fsspec.core.url_to_fs(path)
    with tempfile.TemporaryDirectory(prefix="digpt-put-") as d:
        tmp = os.path.join(d, os.path.basename(remote) or "object")
        write(tmp)
        fs.put_file(tmp, remote)


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)
