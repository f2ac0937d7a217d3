"""Schema 1 of the cache: every array of a shard group in chunks of ``chunk_rows`` rows, all views in each.

A shard group of ``n`` rows is ``ceil(n / chunk_rows)`` objects per array (every view of those rows in each),
written and read by zarr itself; its ``attrs["shard"]`` has no ``layout``. Schema 2 (``store.py``,
``objects.py``) replaced it because object stores bill and throttle per object, and because a training read
of one sample's view here decodes every view of a whole chunk of rows.

Caches written under schema 1 are still read, with the same integrity checks (``integrity.checked``);
``extract`` refuses to add to them. ``ShardLayout(sharded=False)`` still writes this layout, so tests and
``bench/storage.py`` can make old caches and compare. ``store.open_writer`` and ``store.open_view_reader``
pick this module's classes for a schema-1 group; nothing else should need to import it.
"""

from __future__ import annotations

import numpy as np
import zarr

from .integrity import checked
from .names import TARGETS


def rows_per_chunk(rows: int, chunk_rows: int) -> int:
    """Rows per chunk object of every array of a schema-1 shard group of ``rows`` rows (``keys`` excepted:
    one chunk in both schemas)."""
    return max(1, min(chunk_rows, rows))


class RowChunkWriter:
    """Schema 1's writer: each block of rows is whole chunks, written by zarr. Same interface as
    :class:`objects.ShardWriter` (``write``, ``close``, ``abort``)."""

    def __init__(self, g: zarr.Group):
        self.g = g

    def write(self, name: str, lo: int, block: np.ndarray) -> None:
        self.g[name][lo : lo + len(block)] = block

    def close(self) -> None:
        pass  # every block went to zarr as it came: nothing held back

    def abort(self) -> None:
        pass  # chunks already written belong to a group without ``complete``, which the next run deletes


class ChunkedViewReader:
    """:class:`objects.ViewReader`'s interface over a schema-1 group (chunks of rows x all views, read by zarr)."""

    def __init__(self, g: zarr.Group, names: tuple[str, ...] = TARGETS):
        self.g, self.names = g, [n for n in names if n in g]
        self.bytes_read = 0

    def read(self, rows: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Stored targets of ``(rows[i], views[i])``, by name. Reads the span ``min(rows) .. max(rows)`` of
        every view; a damaged chunk raises :class:`integrity.CacheIntegrityError`."""
        rows, views = np.asarray(rows, dtype=np.int64), np.asarray(views, dtype=np.int64)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        out = {}
        for n in self.names:
            block = checked(self.g, n, lambda n=n: self.g[n][lo:hi])
            self.bytes_read += block.nbytes  # decoded bytes of every view of the rows spanned
            out[n] = block[rows - lo, views]
        return out
