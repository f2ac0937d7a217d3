"""An ablation run again in the same directory picks up where the earlier one stopped.

A comparison over seeds costs hours on a CPU (``digpt ablate all``: ~73 minutes a seed on 2 cores, LEARNING.md §14), so
``--seeds 2`` after ``--seeds 1`` trains only the new seed, and an ablation cut short (a killed job, a
session's end) resumes instead of starting over. Nothing is reused on trust:

- a training run is **finished** when its ``config.json`` holds this very train config (``resume`` aside)
  and was trained against this very cache (teacher, manifest and view-plan fingerprints: the comparison
  ``--resume`` makes, ``student/rundir.py``), and its ``summary.json`` says it reached the config's last step;
- it is **resumable** when the config and cache match but no finished summary exists: it continues from
  its last checkpoint with ``resume=True`` (the loader replays exactly; ``student/train.py``);
- a probe's JSON is reused when it records this very probe config and is newer than both the encoder it
  probed (the run's ``summary.json``) and the probe set (its ``dataset.json``).

Two ablations at once in one directory would train the same runs side by side: :func:`ablation_lock` refuses
the second. A run directory that holds a run of another config is refused before any work (``check_earlier_runs``);
an empty one trains from scratch, as in a first run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
from collections.abc import Iterator

from student.config import TrainConfig

__all__ = ["ablation_lock", "check_earlier_runs", "earlier_run", "probe_record", "read_history"]


def _jsonable(obj) -> object:
    """``obj`` as its JSON form (tuples as lists, paths as strings): how run and probe records store it."""
    return json.loads(json.dumps(obj, default=str))


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent or torn: not reusable, the run starts over


def earlier_run(cfg: TrainConfig) -> tuple[bool, dict | None]:
    """``(same, summary)``: whether ``cfg.out`` holds a run of exactly ``cfg`` (``resume`` aside) against the
    cache ``cfg`` names now, and that run's ``summary.json`` when it also reached ``cfg.steps`` (finished)."""
    from student.cache_join import CacheJoin
    from student.rundir import cache_diff, recorded_diff

    have = _read(os.path.join(cfg.out, "config.json"))
    if not have or recorded_diff(cfg, have):
        return False, None
    try:
        if cache_diff(have, CacheJoin(cfg.data)):
            return False, None
    except (OSError, ValueError, KeyError):
        return False, None
    summary = _read(os.path.join(cfg.out, "summary.json"))
    # an epoch-bounded run knows its steps only after the fact: never counted as finished here
    finished = summary is not None and cfg.epochs is None and summary.get("steps") == cfg.steps
    return True, summary if finished else None


def check_earlier_runs(cfgs: list[TrainConfig]) -> None:
    """Refuse, before any work, an output directory whose run directories hold runs of other configs (a run
    is never overwritten), naming the run and what differs; runs of these very configs are reused."""
    from student.rundir import recorded_diff

    for cfg in cfgs:
        have = _read(os.path.join(cfg.out, "config.json"))
        if have is None:
            if os.path.isdir(cfg.out) and os.listdir(cfg.out):
                raise ValueError(f"{cfg.out} holds files but no readable config.json; choose another --out")
            continue
        diff = recorded_diff(cfg, have)
        if diff:
            shown = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in list(diff.items())[:3])
            raise ValueError(
                f"{cfg.out} holds a run of another config ({shown}); an ablation reuses only runs of its own "
                f"configs: choose another --out, or run the ablation that made it again"
            )


def read_history(run: str) -> list[dict]:
    """The logged rows of ``run``'s ``metrics.csv`` as floats, one per step (a resumed run's repeated steps
    keep their last row), in step order: what ``train()`` returns as its history."""
    rows: dict[int, dict] = {}
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        for row in csv.DictReader(f):
            rec = {k: float(v) for k, v in row.items() if v not in ("", None)}
            rows[int(rec["step"])] = rec
    return [rows[s] for s in sorted(rows)]


def probe_record(path: str, want: dict, after: list[str]) -> dict | None:
    """The probe result at ``path`` when it records the probe config ``want`` (``asdict`` of a
    :class:`~pipelines.config.ProbeConfig`) and is newer than every file in ``after`` that exists."""
    got = _read(path)
    if not got or got.get("config") != _jsonable(want):
        return None
    mtime = os.path.getmtime(path)
    if any(os.path.exists(p) and os.path.getmtime(p) > mtime for p in after):
        return None
    return got


@contextlib.contextmanager
def ablation_lock(out: str) -> Iterator[None]:
    """Hold ``out/ablate.lock`` while an ablation runs there; refuse, naming its pid, a second one started in
    the same directory (it would train the same runs at once). An advisory ``flock``: released when the
    process exits, however it ends (a killed ablation leaves no stale lock)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ablate.lock")
    f = open(path, "a+")  # noqa: SIM115 -- held open for the block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise ValueError(
                f"{out}: another ablation is running in this directory (pid {pid}); wait for it, or choose "
                f"another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()
