"""A real multi-node Ray cluster on this machine (issue 11, item 1).

A head and a second node are started with ``ray start`` as separate processes, each in its own session
and with its own temp dir and one CPU, so the two extraction actors must land on different nodes. The
CLI driver joins with ``--ray-address 127.0.0.1:PORT``; the test session's embedded Ray (conftest) never
sees this cluster (``ray start --temp-dir`` writes its address file there, not in /tmp/ray) and this
cluster never sees it.

* A clean run: the extract summary names, per shard, the node that ran it; both nodes did work.
* The second node lost mid-shard (SIGKILL of its raylet, its workers and its agents, by pid): the same
  run finishes on the head (the lost actor restarts there and retries its shard), exit 0, and the cache
  equals the clean run's byte for byte.

Every process a node started lives in that node's session; the fixture SIGKILLs them by pid in a
``finally``, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from teacher_cache.dataset import load_dataset
from teacher_cache.extract import FAULT_PAUSE_ENV
from teacher_cache.store import shard_ids

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
GROUP = "random-vit_32_8"
# No --workers: joining a cluster, extract starts one worker per `--threads` CPUs of the whole cluster (2 here).
EXTRACT = [
    "--teacher",
    "random-vit:32/8",
    "--views",
    "2",
    "--dtype",
    "fp16",
    "--chunk-rows",
    "8",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2 :].split()
    return f[0], int(f[1]), int(f[3])


def _session(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[2] == sid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def _kill_session(sid: int) -> list[int]:
    """SIGKILL every live process of session ``sid``, by pid; wait until none is left. Returns them."""
    pids = _session(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


class Node:
    """One ``ray start`` node: its own session (so every process it starts can be found) and temp dir."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], temp: Path):
        self.name, self.temp = name, temp
        temp.mkdir(parents=True)
        log = temp.parent / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [RAY, "start", *args, "--num-cpus", "1", "--temp-dir", str(temp), "--disable-usage-stats"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=temp,
            )
        self.sid = proc.pid  # the session the node's daemons stay in after `ray start` itself exits
        rc = proc.wait(timeout=180)
        assert rc == 0, f"ray start ({name}) failed:\n{log.read_text()[-3000:]}"

    def pids(self) -> list[int]:
        return _session(self.sid)

    def stop(self) -> list[int]:
        return _kill_session(self.sid)


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker node on 127.0.0.1, one CPU each. Yields (address, head, worker, pause dir)."""
    # Unix socket paths are limited to ~107 bytes: the temp dirs get short names of their own.
    base = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "1",
        FAULT_PAUSE_ENV: str(pause),  # the nodes' workers inherit it (inert until a test pauses a shard)
        # notice a lost node in seconds, not the default ~30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    nodes: list[Node] = []
    try:
        nodes.append(Node("head", ["--head", "--port", str(port), "--include-dashboard=false"], env, base / "h"))
        nodes.append(Node("worker", ["--address", f"127.0.0.1:{port}"], env, base / "w"))
        yield f"127.0.0.1:{port}", nodes[0], nodes[1], pause
    finally:
        for n in reversed(nodes):
            n.stop()
        left = [p for n in nodes for p in n.pids()]
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"Ray processes still alive: {left}"


def _extract(ds: str, out: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "1"}
    env.pop(FAULT_PAUSE_ENV, None)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    with open(log, "w") as f:
        return subprocess.Popen(
            [
                sys.executable,
                str(REPO / "cli.py"),
                "extract",
                "--shards",
                ds,
                "--out",
                str(out),
                *EXTRACT,
                "--ray-address",
                address,
            ],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"extract did not finish in {timeout}s:\n{log.read_text()[-3000:]}") from None
    finally:
        _kill_session(proc.pid)  # the driver's own helpers, if any outlived it


def _summary(out: Path) -> dict:
    return json.loads((out / "reports" / "extract-summary.json").read_text())["summary"]


def _cache_bytes(cache: Path) -> dict[str, object]:
    """Every chunk file's bytes, every decoded array, every record (a shard's run time aside)."""
    snap: dict[str, object] = {}
    for d, _, files in os.walk(cache / GROUP):
        for f in files:
            p = Path(d) / f
            if f == "zarr.json":
                meta = json.loads(p.read_text())
                done = meta.get("attributes", {}).get("complete")
                if done:
                    done.pop("seconds")
                snap[str(p.relative_to(cache))] = meta
            else:
                snap[str(p.relative_to(cache))] = p.read_bytes()
    tok = zarr.open_group(str(cache), mode="r")[GROUP]
    for sid, g in tok.groups():
        assert "complete" in g.attrs and g["valid"][:].all(), sid
        for name, arr in g.arrays():
            snap[f"{sid}/{name}[:]"] = arr[:]
    return snap


def _assert_same(a: Path, b: Path) -> None:
    x, y = _cache_bytes(a), _cache_bytes(b)
    assert x.keys() == y.keys(), sorted(set(x) ^ set(y))
    for k in x:
        if isinstance(x[k], np.ndarray):
            assert np.array_equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_cluster_both_work_and_node_loss_is_survived(cluster, tiny_dataset, tmp_path):
    address, head, worker, pause = cluster

    # 1. a clean run on both nodes
    clean, log = tmp_path / "clean", tmp_path / "clean.log"
    sids = shard_ids(load_dataset(tiny_dataset).shards)
    jobs = [f"{GROUP}.{sid}" for sid in sids.values()]
    for j in jobs:  # nothing pauses in the clean run
        (pause / f"{j}.go").touch()
    assert _finish(_extract(tiny_dataset, clean, address, log), log) == 0, log.read_text()[-3000:]
    s = _summary(clean)
    assert s["failed"] == [] and len(s["shards"]) == 3 and all(r["ok"] for r in s["shards"])
    nodes = {r["node"] for r in s["shards"]}
    assert len(nodes) == 2, f"expected both nodes to run shards, got {s['shards']}"
    assert all(r["host"] == socket.gethostname() for r in s["shards"])
    assert "shards per node:" in log.read_text()

    # 2. the worker node lost mid-shard
    for f in pause.iterdir():
        f.unlink()
    out, log = tmp_path / "lost", tmp_path / "lost.log"
    proc = _extract(tiny_dataset, out, address, log)
    try:
        # Each actor pauses after the first chunk of its first shard and writes its pid.
        deadline, paused = time.monotonic() + 240, {}
        while len(paused) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            for j in jobs:
                f = pause / f"{j}.pid"
                if j not in paused and f.exists() and f.read_text().endswith("\n"):
                    paused[j] = int(f.read_text())
            time.sleep(0.05)
        on_worker = {j: p for j, p in paused.items() if p in worker.pids()}
        on_head = {j: p for j, p in paused.items() if p in head.pids()}
        assert len(on_worker) == 1 and len(on_head) == 1, (paused, worker.pids(), head.pids())
        ((lost_job, lost_pid),) = on_worker.items()
        killed = worker.stop()  # raylet, workers, agents: the whole node, SIGKILL by pid
        assert lost_pid in killed and not worker.pids()
        for j in jobs:
            (pause / f"{j}.go").touch()
        rc = _finish(proc, log)
    finally:
        _kill_session(proc.pid)
    # Usually the lost node's shard is retried by its actor, restarted on the head once the head's actor is
    # idle, and the same run finishes (exit 0). When Ray gives up on the lost actor first (its restart
    # raced the node's death: seen on a loaded machine), the run must name the failed shard and exit 1,
    # and a re-run of the same command completes it on the surviving node -- both outcomes the design allows.
    if rc != 0:
        first = _summary(out)
        assert rc == 1 and first["failed"], log.read_text()[-3000:]
        assert {f["shard"] for f in first["failed"]} <= set(sids), first["failed"]
        log = tmp_path / "rerun.log"
        rc = _finish(_extract(tiny_dataset, out, address, log), log)
    assert rc == 0, log.read_text()[-3000:]
    s = _summary(out)
    assert s["failed"] == []
    # every shard of this run, the lost one's retry included, was done by the head alone
    ran = {r["node"] for r in s["shards"] if r["ok"]}
    assert len(ran) == 1 and ran <= {r["node"] for r in _summary(clean)["shards"]}, s["shards"]
    assert lost_job.split(".", 1)[1] in {sids[r["shard"]] for r in s["shards"] if r["ok"]}
    _assert_same(out, clean)
