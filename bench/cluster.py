"""Cluster and object-store throughput (issue #11, item 6), side by side in one run.

**Ray nodes.** A Ray head and a second node are started on this machine with ``ray start`` as separate
processes (each in its own session, with its own temp dir and ``--num-cpus 1``), as a cluster's nodes
would be. ``digpt extract --ray-address 127.0.0.1:PORT`` then runs with ``--workers 1`` (one node does
the work; the other idles) and ``--workers 2`` (one actor per node: each node has one CPU), interleaved
round-robin over fresh caches. Reported: img/s over the extract's execution phase (from its summary),
the command's wall time, shards per node and each node's img/s inside its shards. Every process the
nodes started is SIGKILLed by pid (their sessions) in a ``finally``.

**Object store.** moto's S3 server runs on a free port of 127.0.0.1 in a process of its own; endpoint and
credentials reach every command through the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL``), as on a
cluster. Side by side, interleaved:

* cache write: ``digpt extract --executor local --out s3://bench/cache-N`` vs a local directory (img/s
  and MB/s of cache written, from the extract summary);
* training read: ``student.data.CachedViews`` over the S3 cache vs the local one (same image shards on
  local disk, same seed), one epoch per round: samples/s and MB/s of cached targets read.

    python bench/cluster.py                                   # both parts, ~3 minutes on 2 free cores
    python bench/cluster.py --parts s3 --num-samples 512
    python bench/cluster.py --parts ray --teacher efficientnet_lite0:224

Only public entry points are used: the ``digpt`` CLI (``python cli.py``), the summary it writes
(``reports/extract-summary.json``), ``prepare_synthetic`` and ``CachedViews``/``make_loader``.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import _common as C

RAY = str(Path(sys.executable).with_name("ray"))
CLI = os.path.join(C.REPO, "cli.py")
BUCKET = "bench"
KEY, SECRET = "AKIDDIGPTBENCHKEY", "digpt-bench-secret"  # moto accepts any; never real credentials


# ---------------------------------------------------------------------------------------------
# processes: started in sessions of their own, stopped by pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (found in /proc by their session id, not by name)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            text = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = text[text.rindex(")") + 2 :].split()
        if int(f[3]) == sid and f[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def kill_session(sid: int, timeout: float = 30) -> list[int]:
    """SIGKILL every live process of session ``sid`` by pid and wait until none is left; returns them."""
    pids = session_pids(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": C.REPO,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "RAY_DEDUP_LOGS": "1",
        **(extra or {}),
    }
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    return env


class RayNode:
    """One ``ray start`` node with ``--num-cpus 1``, its own session (every daemon it starts stays in it)
    and its own temp dir."""

    def __init__(self, name: str, args: list[str], temp: Path):
        self.name = name
        temp.mkdir(parents=True)
        self.log = temp.parent / f"{name}.log"
        t0 = time.perf_counter()
        with open(self.log, "w") as out:
            proc = subprocess.Popen(
                [RAY, "start", *args, "--num-cpus", "1", "--temp-dir", str(temp), "--disable-usage-stats"],
                env=child_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=temp,
            )
        self.sid = proc.pid
        rc = proc.wait(timeout=300)
        self.start_s = time.perf_counter() - t0
        if rc != 0:
            self.stop()
            raise RuntimeError(f"ray start ({name}) failed:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> list[int]:
        return kill_session(self.sid)


_MOTO = """
import signal, sys
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
srv.start()
print("serving", flush=True)
while True:
    signal.pause()
"""


class MotoServer:
    """moto's S3 server on 127.0.0.1:PORT in a process and session of its own; stopped by pid."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO, str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        kill_session(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def environ(extra: dict[str, str]):
    """Set ``extra`` in this process's environment (for in-process S3 reads), restore it afterwards."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# extraction through the CLI


def run_cli_extract(args: list[str], log: Path, env: dict[str, str], timeout: float = 1800) -> float:
    """``python cli.py extract ARGS`` in a session of its own; returns its wall seconds; raises on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, CLI, "extract", *args],
            cwd=C.REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            kill_session(proc.pid)  # the driver's helpers, if any outlived it
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"extract exited {rc}:\n{log.read_text()[-3000:]}")
    return wall


def read_summary(out: str) -> dict:
    """The extract summary a run wrote beside its cache (local path or fsspec URL)."""
    import fsspec

    with fsspec.open(f"{out.rstrip('/')}/reports/extract-summary.json", "r") as f:
        return json.load(f)["summary"]


def extract_args(a, data: str, out: str, teacher: str) -> list[str]:
    return [
        "--shards",
        data,
        "--out",
        out,
        "--teacher",
        teacher,
        "--views",
        str(a.views),
        "--batch-size",
        str(a.batch_size),
        "--device",
        "cpu",
        "--threads",
        "1",
    ]


# ---------------------------------------------------------------------------------------------
# the two parts


def ray_part(a, wd: Path, data: str, rep: C.Report) -> dict:
    """One node working vs two nodes working, on one two-node cluster."""
    base = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # Unix socket paths must stay short
    port = free_port()
    nodes: list[RayNode] = []
    runs: dict[str, list[dict]] = {"1": [], "2": []}
    try:
        nodes.append(RayNode("head", ["--head", "--port", str(port), "--include-dashboard=false"], base / "h"))
        nodes.append(RayNode("worker", ["--address", f"127.0.0.1:{port}"], base / "w"))
        env = child_env()
        n = {"i": 0}

        def run(workers: str):
            out = str(wd / f"ray-cache-{n['i']}")
            n["i"] += 1
            args = extract_args(a, data, out, a.teacher) + ["--ray-address", f"127.0.0.1:{port}", "--workers", workers]
            wall = run_cli_extract(args, wd / f"ray-{workers}-{n['i']}.log", env)
            s = read_summary(out)
            shutil.rmtree(out, ignore_errors=True)
            if s["failed"]:
                raise RuntimeError(f"extract failed shards: {s['failed']}")
            runs[workers].append({"wall": wall, "summary": s})

        C.interleave({w: (lambda w=w: run(w)) for w in ("1", "2")}, warmup=0, repeats=a.repeats)
    finally:
        for node in reversed(nodes):
            node.stop()
        left = [p for node in nodes for p in session_pids(node.sid)]
        shutil.rmtree(base, ignore_errors=True)
        if left:
            print(f"warning: Ray processes still alive: {left}", file=sys.stderr)
    rows, out = [], {}
    per_shard = a.shard_size
    # the same node keeps its label in both rows (Ray node ids, sorted)
    ids = sorted({sh["node"] for rs in runs.values() for r in rs for sh in r["summary"]["shards"]})
    names = {nid: f"node {i + 1}" for i, nid in enumerate(ids)}
    for w, rs in runs.items():
        rate = [r["summary"]["tokenizers"][0]["images_per_s"] for r in rs]
        walls = [r["wall"] for r in rs]
        nodes_used: Counter = Counter()
        node_rate: dict[str, list[float]] = {}
        for r in rs:
            secs: dict[str, float] = {}
            for sh in r["summary"]["shards"]:
                nodes_used[sh["node"]] += 1
                secs[sh["node"]] = secs.get(sh["node"], 0.0) + sh["seconds"]
            for node, sec in secs.items():
                done = sum(1 for sh in r["summary"]["shards"] if sh["node"] == node)
                node_rate.setdefault(node, []).append(done * per_shard / sec)
        out[w] = {
            "images_per_s": rate,
            "wall_s": walls,
            "shards_per_node": {names[k]: v / len(rs) for k, v in nodes_used.items()},
            "node_images_per_s": {names[k]: C.median(v) for k, v in node_rate.items()},
            "nodes": len(node_rate),
        }
    base_rate = out["1"]["images_per_s"]
    for w in ("1", "2"):
        o = out[w]
        speedup = C.paired_ratio(o["images_per_s"], base_rate)
        o["speedup"] = speedup
        rows.append(
            [
                f"{w} worker(s): {o['nodes']} node(s) working",
                f"{C.median(o['images_per_s']):.1f}",
                f"{speedup:.2f}x",
                f"{C.median(o['wall_s']):.1f}",
                ", ".join(f"{k}: {v:g}" for k, v in sorted(o["shards_per_node"].items())),
                ", ".join(f"{k}: {v:.1f}" for k, v in sorted(o["node_images_per_s"].items())),
            ]
        )
    shards = a.num_samples // a.shard_size
    rep.table(
        f"Ray: one vs two nodes of a `ray start` cluster on 127.0.0.1 (head + second node, --num-cpus 1 each, "
        f"node start {nodes[0].start_s:.1f}s + {nodes[1].start_s:.1f}s, not timed); `digpt extract --ray-address` "
        f"{a.teacher}, {a.num_samples} images ({a.image_size} px) in {shards} shards, {a.views} view(s), "
        f"1 torch thread per worker; medians of {a.repeats} interleaved run(s) each",
        [
            "run",
            "img/s (exec phase)",
            "vs 1 node",
            "command wall s",
            "shards per node",
            "img/s inside shards, per node",
        ],
        rows,
        align="lrrrll",
    )
    rep.note(
        "The 2-core caveat: both nodes run on this machine's two cores, beside the Ray daemons of both nodes "
        "(GCS, raylets, agents), the CLI driver and whatever else the machine runs; two nodes cannot show more "
        "than the second core that is actually free. On a cluster each node brings its own cores: the 'inside "
        "shards, per node' rate is the per-node figure to multiply. The exec phase includes starting the "
        "actors and building the teacher on each node."
    )
    return out


def s3_part(a, wd: Path, data: str, rep: C.Report) -> dict:
    """Cache write and training read, S3 (moto on loopback) vs local disk."""
    from student.data import CachedViews, DataConfig, make_loader

    server = MotoServer(wd / "moto.log")
    result: dict = {}
    try:
        s3env = server.env()
        with environ(s3env):
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            env = child_env(s3env)
            n = {"i": 0}
            writes: dict[str, list[dict]] = {"local": [], "s3": []}
            keep: dict[str, str] = {}

            def write(where: str):
                i = n["i"]
                n["i"] += 1
                out = f"s3://{BUCKET}/cache-{i}" if where == "s3" else str(wd / f"cache-{i}")
                args = extract_args(a, data, out, a.s3_teacher) + ["--executor", "local"]
                wall = run_cli_extract(args, wd / f"write-{where}-{i}.log", env)
                s = read_summary(out)
                if s["failed"]:
                    raise RuntimeError(f"extract failed shards: {s['failed']}")
                if where in keep:  # one cache of each kind is kept for the read side
                    if where == "s3":
                        fs.rm(out[len("s3://") :], recursive=True)
                    else:
                        shutil.rmtree(out, ignore_errors=True)
                else:
                    keep[where] = out
                writes[where].append({"wall": wall, "summary": s})

            C.interleave({w: (lambda w=w: write(w)) for w in ("local", "s3")}, warmup=0, repeats=a.repeats)

            tok = writes["local"][0]["summary"]["tokenizers"][0]
            group, bpv = tok["group"], tok["bytes_per_view"]
            rows = []
            for where in ("local", "s3"):
                rate = [w["summary"]["tokenizers"][0]["images_per_s"] for w in writes[where]]
                ratio = C.paired_ratio(rate, [w["summary"]["tokenizers"][0]["images_per_s"] for w in writes["local"]])
                mbs = C.median(rate) * a.views * bpv / 1e6
                rows.append(
                    [
                        where if where == "local" else "s3 (moto on 127.0.0.1)",
                        f"{C.median(rate):.1f}",
                        f"{mbs:.2f}",
                        f"{ratio:.2f}x",
                        f"{C.median(w['wall'] for w in writes[where]):.1f}",
                    ]
                )
                result.setdefault("write", {})[where] = {"images_per_s": rate, "ratio": ratio, "mb_per_s": mbs}
            rep.table(
                f"Cache write: `digpt extract --executor local` {a.s3_teacher}, {a.num_samples} images in "
                f"{a.num_samples // a.shard_size} shards, {a.views} view(s), {bpv:,.0f} B/view stored; "
                f"--out local directory vs s3://; medians of {a.repeats} interleaved run(s) each",
                ["cache on", "img/s (exec phase)", "MB/s of cache written", "img/s vs local", "command wall s"],
                rows,
                align="lrrrr",
            )

            # training read: the loader over each cache, one epoch per round, interleaved
            cfgs = {
                w: DataConfig(
                    shards=data,
                    cache=keep[w],
                    tokenizer=group,
                    img_size=a.img_size,
                    batch_size=a.read_batch_size,
                    num_workers=a.workers,
                    seed=0,
                )
                for w in ("local", "s3")
            }
            loaders = {w: CachedViews(cfg) for w, cfg in cfgs.items()}
            counts: dict[str, int] = {}

            def epoch(where: str):
                ds = loaders[where]
                ds.set_epoch(0)
                k = 0
                for batch in make_loader(ds):
                    k += int(batch["images"].shape[0])
                counts[where] = k
                return k

            times = C.interleave(
                {w: (lambda w=w: epoch(w)) for w in ("local", "s3")}, warmup=a.warmup, repeats=a.read_repeats
            )
            rows = []
            for where in ("local", "s3"):
                sps = counts[where] / C.median(times[where])
                ratio = C.paired_ratio(times[where], times["local"])
                rows.append(
                    [
                        where if where == "local" else "s3 (moto on 127.0.0.1)",
                        f"{sps:.0f}",
                        f"{sps * bpv / 1e6:.2f}",
                        f"{ratio:.2f}x",
                        C.spread(times[where]),
                    ]
                )
                result.setdefault("read", {})[where] = {"samples_per_s": sps, "time_ratio": ratio}
            rep.table(
                f"Training read: `CachedViews` + `make_loader` over the cache written above (image shards on local "
                f"disk), {a.img_size} px views, batch {a.read_batch_size}, {a.workers} loader worker(s); one epoch of "
                f"{counts['local']} samples per round, medians of {a.read_repeats} interleaved rounds",
                ["cache on", "samples/s", "MB/s of targets", "epoch time vs local", "epoch s, range"],
                rows,
                align="lrrrr",
            )
            rep.note(
                "The S3 server is moto on loopback: no network latency or bandwidth limit, but every object "
                "is a separate HTTP request through botocore/aiobotocore and moto's Python server, so the "
                "ratio shows the object-store client's per-request cost, not a real bucket's throughput "
                "(SCALE.md sizes that from published figures)."
            )
    finally:
        server.stop()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, repeats=2, warmup=1)
    p.add_argument("--parts", default="ray,s3", help="which comparisons: ray, s3 or both (comma-separated)")
    p.add_argument("--teacher", default="efficientnet_lite0:128", help="Ray part: registry teacher name")
    p.add_argument(
        "--s3-teacher",
        default="pixel:64/8",
        help="object-store part: registry teacher (cheap, so the store's cost shows; pixel:64/8 stores ~19 KB/view)",
    )
    p.add_argument("--num-samples", type=int, default=256, help="generated images")
    p.add_argument("--image-size", type=int, default=64, help="generated image side (px)")
    p.add_argument("--shard-size", type=int, default=32, help="images per shard (several shards feed two nodes)")
    p.add_argument("--views", type=int, default=1, help="views per image")
    p.add_argument("--batch-size", type=int, default=32, help="views per teacher forward")
    p.add_argument("--img-size", type=int, default=64, help="training read: student resolution")
    p.add_argument("--read-batch-size", type=int, default=16, help="training read: samples per batch")
    p.add_argument("--read-repeats", type=int, default=5, help="training read: epochs per cache (interleaved)")
    p.add_argument("--workers", type=int, default=0, help="training read: DataLoader worker processes")
    a = p.parse_args(argv)
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    if not parts or parts - {"ray", "s3"}:
        raise SystemExit(f"--parts must name ray and/or s3, got {a.parts!r}")
    if a.num_samples % a.shard_size:
        raise SystemExit("--num-samples must be a multiple of --shard-size (per-node rates assume full shards)")
    C.setup_threads(a.threads)

    from teacher_cache.prepare import SyntheticConfig, prepare_synthetic

    rep = C.Report("cluster", "Cluster and object store: Ray nodes, S3 vs local disk (bench/cluster.py)", argv)
    result: dict = {}
    with C.workdir(a.workdir) as wd:
        wd = Path(wd)
        data = str(wd / "data")
        shutil.rmtree(data, ignore_errors=True)
        prepare_synthetic(
            SyntheticConfig(
                out=data,
                num_samples=a.num_samples,
                num_classes=4,
                image_size=a.image_size,
                shard_size=a.shard_size,
                seed=0,
            )
        )
        if "ray" in parts:
            result["ray"] = ray_part(a, wd, data, rep)
        if "s3" in parts:
            result["s3"] = s3_part(a, wd, data, rep)
    rep.append(a.results)
    return result


if __name__ == "__main__":
    main()
