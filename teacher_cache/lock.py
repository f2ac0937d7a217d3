"""One writer per cache: ``CACHE/reports/writer.lock`` with owner and heartbeat (DESIGN invariant 7).

Two ``extract`` runs on one ``--out`` would otherwise race: both create the root, both delete and
redo the same incomplete shard, and a paused run can delete a shard the other run completed. The
lock holds ``{host, pid, started, heartbeat, command}``; a thread of the holder rewrites
``heartbeat`` every :data:`HEARTBEAT_S` seconds. Another run refuses while the lock is live and
takes it over — saying whose it was — when it is stale: its pid is gone (same host) or its heartbeat
is older than :data:`STALE_S` (any host). Local files are created with ``O_EXCL``; object stores
have no exclusive create, so there the check-then-write leaves a window of one round trip.

The lock lives in ``reports/`` (outside the Zarr hierarchy, which ignores that directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

import fsspec

from .store import REPORTS_DIR

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 5.0
STALE_S = 60.0


class CacheLocked(ValueError):
    """Another live run writes this cache (a ``ValueError``: the CLI reports it in one line)."""


def lock_path(cache: str) -> str:
    return f"{cache.rstrip('/')}/{REPORTS_DIR}/{LOCK_NAME}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict, now: float) -> str:
    age = now - float(owner.get("heartbeat", 0))
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')!r} (started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(float(owner.get('started', 0))))} UTC, "
        f"last heartbeat {age:.0f} s ago)"
    )


def stale_reason(owner: dict, now: float | None = None) -> str:
    """Why a lock's owner is gone ('' while it is live)."""
    now = time.time() if now is None else now
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return "its process no longer exists"
    if now - float(owner.get("heartbeat", 0)) > STALE_S:
        return f"no heartbeat for more than {STALE_S:.0f} s"
    return ""


class WriterLock:
    """Held by one run; see the module docstring. Use :func:`writer_lock`."""

    def __init__(self, cache: str, command: str = "extract"):
        self.path = lock_path(cache)
        self.fs, self.p = fsspec.core.url_to_fs(self.path)
        self.local = "file" in self.fs.protocol
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "heartbeat": time.time(),
            "command": command,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.p, "r") as f:
                return json.loads(f.read() or "{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):  # a holder killed mid-write: no owner to name
            return {}

    def _write(self, exclusive: bool) -> bool:
        data = json.dumps(self.me)
        if self.local:
            if exclusive:
                try:
                    fd = os.open(self.p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(data)
                return True
            tmp = f"{self.p}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(data)
            os.replace(tmp, self.p)  # a reader never sees a half-written heartbeat
            return True
        if exclusive and self.fs.exists(self.p):
            return False
        with self.fs.open(self.p, "w") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        self.fs.makedirs(self.p.rsplit("/", 1)[0], exist_ok=True)
        for _ in range(3):
            if self._write(exclusive=True):
                break
            owner = self._read()
            if owner is None:  # released between our create and our read: try again
                continue
            now = time.time()
            why = stale_reason(owner, now) if owner else "it is unreadable (its writer died while writing it)"
            if not why:
                raise CacheLocked(
                    f"cache {self.path.rsplit('/', 2)[0]} is being written by another run: {_describe(owner, now)} "
                    f"(lock {self.path}); wait for it to finish, or use another --out"
                )
            print(
                f"digpt: taking over the stale lock {self.path} of "
                f"{_describe(owner, now) if owner else 'an unknown run'}: {why}",
                file=sys.stderr,
            )
            self._write(exclusive=False)
            if self._read() == self.me:  # two runs taking over at once: the last writer wins, the other backs off
                break
        else:
            raise CacheLocked(f"could not take the lock {self.path}: it keeps changing hands; is another run starting?")
        self._thread = threading.Thread(target=self._beat, name="digpt-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            # A full disk or an object store that is briefly unreachable (botocore's connection errors are
            # not OSErrors): skip this beat, the next one tries again; staleness is judged by readers. A
            # heartbeat thread that died with a traceback would add noise to a run that reports the
            # affected shards itself.
            try:
                if self._read() != self.me:  # taken over (we looked dead): stop touching it
                    return
                self.me["heartbeat"] = time.time()
                self._write(exclusive=False)
            except Exception:  # noqa: BLE001 - see above
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S + 1)
        # Unreachable store at exit: the lock goes stale and the next run takes it over, naming it.
        with contextlib.suppress(Exception):
            if self._read() == self.me:
                self.fs.rm(self.p)


@contextmanager
def writer_lock(cache: str, command: str = "extract"):
    lock = WriterLock(cache, command)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def foreign_out(out: str) -> bool:
    """Whether ``out`` holds something that is not a digpt cache: a file, or a folder with entries but no
    Zarr root (a folder holding only ``reports/`` — our lock — counts as ours)."""
    fs, path = fsspec.core.url_to_fs(out)
    if not fs.exists(path):
        return False
    if not fs.isdir(path):
        return True
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)}
    return "zarr.json" not in names and bool(names - {REPORTS_DIR})
