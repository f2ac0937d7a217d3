"""Object storage end to end, against an S3-compatible server on loopback (issue 11, item 2).

moto's server mode runs as its own process on a free port of 127.0.0.1 (started and stopped by pid
here). Every command is a real ``python cli.py ...`` process that finds the endpoint and credentials
in the standard ``AWS_*`` variables (``AWS_ENDPOINT_URL`` included), as it would on a cluster:

* ``prepare wds 's3://bucket/shards/{000..003}.tar'`` (and ``prepare parquet 's3://...'``), ``extract --out s3://bucket/cache`` on Ray
  workers, ``verify``, ``train`` (loader workers forked) and ``probe`` all read ``s3://``; the cache's
  arrays and chunk bytes equal the same extraction written to local disk; no endpoint or credential
  is written anywhere in the cache or the dataset directory.
* The server stopped while shards are being written (its port refuses connections; the objects stay): the affected shards fail with an error
  that names them, the run exits 1, and once the server answers again a re-run completes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from teacher_cache.dataset import load_dataset
from teacher_cache.extract import FAULT_PAUSE_ENV
from teacher_cache.prepare import SyntheticConfig, prepare_synthetic
from teacher_cache.store import shard_ids

pytest.importorskip("s3fs")
pytest.importorskip("moto")

REPO = Path(__file__).resolve().parent.parent
GROUP = "random-vit_32_8"
KEY, SECRET = "AKIDDIGPTTESTKEY", "digpt-test-secret-7f3a"
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
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# moto's server mode in a process of its own. SIGUSR1 stops the server (the port refuses connections, as
# an endpoint in an outage does) and SIGUSR2 starts it again on the same port; the stored objects live in
# the process, so they survive the outage (a killed moto would lose them).
_SERVER = """
import signal, sys
from moto.server import ThreadedMotoServer
port = int(sys.argv[1])
state = {"srv": ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)}
state["srv"].start()
def stop(*_):
    state["srv"].stop()
def start(*_):
    state["srv"] = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    state["srv"].start()
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGUSR2, start)
print("serving", flush=True)
while True:
    signal.pause()
"""


class S3Server:
    """moto's S3 server on 127.0.0.1:PORT, in its own process and session; stopped by pid."""

    def __init__(self, log: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log = log
        self.wait_up()

    def wait_up(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.2)

    def outage(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)

    def restore(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR2)
        self.wait_up()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, four tar shards uploaded to s3://bucket/shards/ and a dataset indexed from there."""
    base = tmp_path_factory.mktemp("s3")
    server = S3Server(base / "moto.log")
    try:
        src = base / "src"
        prepare_synthetic(
            SyntheticConfig(out=str(src), num_samples=48, num_classes=4, image_size=32, shard_size=12, seed=3)
        )
        fs = server.fs()
        fs.mkdir("bucket")
        for i, shard in enumerate(load_dataset(str(src)).shards):
            fs.put(str(src / shard), f"bucket/shards/{i:03d}.tar")
        ds = base / "ds"
        r = _cli(["prepare", "wds", "s3://bucket/shards/{000..003}.tar", "--out", str(ds)], server, base / "prep.log")
        assert r.returncode == 0, r.stdout
        yield server, str(ds), base
    finally:
        server.stop()


def _cli(
    args: list[str],
    server: S3Server,
    log: Path,
    extra: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = 600,
):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "RAY_DEDUP_LOGS": "1",
        **server.env(),
        **(extra or {}),
    }
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    if FAULT_PAUSE_ENV not in (extra or {}):
        env.pop(FAULT_PAUSE_ENV, None)
    f = open(log, "w")  # noqa: SIM115 - handed to the child; closed below or by the caller's wait
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=REPO,
        env=env,
        stdout=f,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return proc
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        f.close()
    proc.stdout = log.read_text()
    return proc


def _arrays(root: zarr.Group) -> dict[str, np.ndarray]:
    out = {}
    tok = root[GROUP]
    for sid, g in tok.groups():
        assert "complete" in g.attrs and g["valid"][:].all(), sid
        for name, arr in g.arrays():
            out[f"{sid}/{name}"] = arr[:]
    return out


def _assert_same_as_local(server: S3Server, url: str, local: Path) -> None:
    """Decoded arrays and raw chunk bytes of the s3 cache equal the local one's."""
    opts = {"key": KEY, "secret": SECRET, "endpoint_url": server.endpoint}
    a = _arrays(zarr.open_group(url, mode="r", storage_options=opts))
    b = _arrays(zarr.open_group(str(local), mode="r"))
    assert a.keys() == b.keys() and len(a) >= 4 * 5
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    fs, prefix = server.fs(), url.removeprefix("s3://")
    chunks = [p for p in (local / GROUP).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for p in chunks:
        assert fs.cat(f"{prefix}/{p.relative_to(local)}") == p.read_bytes(), p


@pytest.fixture(scope="module")
def local_cache(s3) -> Path:
    """The same extraction, reading the same s3 shards, written to local disk (in-process executor)."""
    server, ds, base = s3
    out = base / "local-cache"
    r = _cli(
        ["extract", "--shards", ds, "--out", str(out), *EXTRACT, "--executor", "local"], server, base / "local.log"
    )
    assert r.returncode == 0, r.stdout[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_s3_prepare_extract_verify_train_probe(s3, local_cache, tmp_path):
    server, ds, _ = s3
    info = json.loads(Path(ds, "dataset.json").read_text())
    assert info["shards"] == [f"s3://bucket/shards/{i:03d}.tar" for i in range(4)]

    r = _cli(
        [
            "extract",
            "--shards",
            ds,
            "--out",
            "s3://bucket/cache",
            *EXTRACT,
            "--executor",
            "ray",
            "--workers",
            "2",
            "--threads",
            "1",
        ],
        server,
        tmp_path / "extract.log",
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert "shards per node:" in r.stdout
    _assert_same_as_local(server, "s3://bucket/cache", local_cache)

    r = _cli(
        ["verify", "--shards", ds, "--cache", "s3://bucket/cache", "--device", "cpu"], server, tmp_path / "verify.log"
    )
    assert r.returncode == 0 and "cache OK: s3://bucket/cache" in r.stdout, r.stdout[-3000:]

    run = tmp_path / "run"
    # Two loader workers: forked processes that read the s3 cache and the s3 shards.
    r = _cli(
        [
            "train",
            "--shards",
            ds,
            "--cache",
            "s3://bucket/cache",
            "--out",
            str(run),
            "--student",
            "tiny-test",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--log-every",
            "1",
        ],
        server,
        tmp_path / "train.log",
    )
    assert r.returncode == 0 and "trained 3 steps" in r.stdout, r.stdout[-3000:]
    assert "attached to a different loop" not in r.stdout and "Unclosed client session" not in r.stdout

    r = _cli(
        ["probe", "--run", str(run), "--shards", ds, "--device", "cpu", "--epochs", "5"], server, tmp_path / "probe.log"
    )
    assert r.returncode == 0 and (run / "probe_linear.json").exists(), r.stdout[-3000:]

    # Parquet shards (Hugging Face layout) read from s3:// by `prepare parquet`
    from test_prepare_parquet import write_hf_parquet

    write_hf_parquet(tmp_path / "pq")
    fs = server.fs()
    for p in sorted((tmp_path / "pq").iterdir()):
        fs.put(str(p), f"bucket/pq/{p.name}")
    r = _cli(
        ["prepare", "parquet", "s3://bucket/pq/train-{00000..00001}-of-00002.parquet", "--out", str(tmp_path / "pqds")],
        server,
        tmp_path / "parquet.log",
    )
    assert r.returncode == 0 and "20 samples" in r.stdout, r.stdout[-3000:]

    # Neither the endpoint nor a credential is written into the cache or the dataset directory.
    secrets = [server.endpoint, f"127.0.0.1:{server.port}", KEY, SECRET]
    objects = fs.find("bucket/cache")
    assert len(objects) > 20
    for p in objects:
        data = fs.cat(p).decode("latin-1")
        assert not [s for s in secrets if s in data], p
    for p in [*Path(ds).rglob("*"), *(tmp_path / "pqds").rglob("*")]:
        data = p.read_bytes().decode("latin-1")
        assert not [s for s in secrets if s in data], p


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_s3_server_stopped_mid_extract_fails_named_shards_and_rerun_completes(s3, local_cache, tmp_path):
    server, ds, _ = s3
    pause = tmp_path / "pause"
    pause.mkdir()
    # One botocore attempt per s3fs retry (fsspec reads FSSPEC_S3 as s3fs's default options), so a refused
    # connection fails in seconds.
    quick = {"FSSPEC_S3": json.dumps({"config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}})}
    url = "s3://bucket/outage"
    args = ["extract", "--shards", ds, "--out", url, *EXTRACT, "--executor", "ray", "--workers", "2", "--threads", "1"]
    log = tmp_path / "outage.log"
    proc = _cli(args, server, log, {**quick, FAULT_PAUSE_ENV: str(pause)}, wait=False)
    sids = shard_ids(load_dataset(ds).shards)
    jobs = [f"{GROUP}.{sid}" for sid in sids.values()]
    try:
        deadline = time.monotonic() + 300
        while len([j for j in jobs if (pause / f"{j}.pid").exists()]) < 2:  # both workers mid-shard
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        server.outage()
        try:
            for j in jobs:
                (pause / f"{j}.go").touch()
            time.sleep(8)  # the paused shards' next writes are refused while the server is down
        finally:
            server.restore()
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # "FAILED shard <shard> of <group>: <error type>: <message> (left incomplete; re-run ...)"
    failed = [line.split() for line in text.splitlines() if line.startswith("FAILED shard ")]
    assert failed, text[-3000:]
    assert {f[2] for f in failed} <= set(sids) and all(f[4] == f"{GROUP}:" for f in failed)
    assert all("Error" in f[5] for f in failed) and all("re-run the same command" in " ".join(f) for f in failed)

    r = _cli(args, server, tmp_path / "rerun.log", quick)
    assert r.returncode == 0, r.stdout[-3000:]
    _assert_same_as_local(server, url, local_cache)
