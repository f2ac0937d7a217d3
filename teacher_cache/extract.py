"""``digpt extract``: run each teacher once over the prepared shards and write the Zarr cache.

One job per (tokenizer, shard). On Ray each worker is an actor that builds every teacher once and
processes whole shards; :func:`extract_shard` is the unit of work and is also what the ``local``
executor runs in-process. A shard group is complete only when its ``complete`` attribute exists,
and that attribute is written after every array (DESIGN invariant 3).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import zarr

from .config import ExtractConfig, StorageConfig, TeacherConfig
from .images import BadImage, decode_image, to_uint8_chw
from .integrity import changed_since_extraction, source_stamp
from .lock import WriterLock, foreign_out
from .prepare import PreparedDataset, iter_dataset_samples, load_dataset
from .runtime import progress_bar, resolve_device
from .shards import pick_image
from .store import (
    REPORTS_DIR,
    SCHEMA_VERSION,
    ShardLayout,
    create_shard_group,
    is_complete,
    open_writer,
    package_version,
    shard_ids,
    stored_bytes,
    write_rows,
)
from .teachers import Teacher, create_teacher, resolve_name
from .teachers.kmeans import fit_kmeans
from .teachers.pca import fit_pca
from .views import AugConfig, plan_fingerprint, plan_shard, replay_view

# ---------------------------------------------------------------------------------------------
# building teachers from configs


# Tokenizers fit on the data by extract, and the array each stores in its cache group (reused on re-runs,
# loaded back by verify and the trainer): ``kmeans:<t>`` a codebook, ``pca:<t>`` a PCA basis.
FITTED_ARRAYS = {"kmeans": "codebook", "pca": "pca_basis"}


def fitted_family(tc: TeacherConfig) -> str | None:
    """``kmeans`` / ``pca`` for a tokenizer fit on the data, else ``None``."""
    family = resolve_name(tc.name).partition(":")[0]
    return family if family in FITTED_ARRAYS else None


def load_fitted(tok: zarr.Group) -> dict[str, torch.Tensor]:
    """A tokenizer group's fitted arrays, as :func:`build_teacher` keywords (``codebook``, ``pca_basis``)."""
    return {n: torch.from_numpy(np.array(tok[n][:])) for n in FITTED_ARRAYS.values() if n in tok}


def build_teacher(
    tc: TeacherConfig, codebook: torch.Tensor | None = None, *, pca_basis: torch.Tensor | None = None
) -> Teacher:
    """The one place a :class:`TeacherConfig` becomes a model (driver, workers and verify alike)."""
    opts = tc.options()
    family = fitted_family(tc)
    if family == "kmeans":
        opts["codebook"] = codebook if codebook is not None else tc.codebook
    elif family == "pca":
        opts["basis"], opts["pca_dim"] = pca_basis, tc.pca_dim
    return create_teacher(tc.name, weights=tc.weights, layer=tc.layer, **opts)


def _build_fitted(tc: TeacherConfig, fitted: np.ndarray | None) -> Teacher:
    """:func:`build_teacher` with the array ``fitted_family(tc)`` stores (or ``None``)."""
    t = torch.from_numpy(np.array(fitted)) if fitted is not None else None
    return build_teacher(tc, pca_basis=t) if fitted_family(tc) == "pca" else build_teacher(tc, t)


# ---------------------------------------------------------------------------------------------
# the unit of work: one shard, one tokenizer


@dataclass(frozen=True)
class ShardJob:
    dataset: str
    shard: str
    sid: str
    cache: str
    group: str
    aug: AugConfig
    storage: StorageConfig
    batch_size: int


@dataclass
class ShardResult:
    group: str
    shard: str
    rows: int
    valid: int
    views: int
    seconds: float
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    error: str = ""
    """Non-empty when the shard failed as a whole (left incomplete; a re-run redoes it)."""
    node: str = ""
    """Ray node id of the worker that ran it (``local`` in-process); kept out of the completion record,
    so where a shard ran never changes the cache's bytes."""
    host: str = ""


_RUN_ONLY = ("group", "node", "host")  # ShardResult fields the completion record leaves out


def _views_of(
    job: ShardJob,
    teacher: Teacher,
    rows: dict[str, list],
    plan,
    lo: int,
    hi: int,
    samples: dict[int, Any],
    skipped: list[dict[str, str]],
) -> tuple[list[int], torch.Tensor]:
    """Decode rows [lo, hi) and replay their views at the teacher's resolution.

    Returns the rows that decoded and their views ``[n_ok * K, 3, S, S]``. Bad rows are appended
    to ``skipped`` with shard, key and reason."""
    ok, views = [], []
    size = teacher.spec.input_size
    for i in range(lo, hi):
        key = rows["key"][i]
        reason = rows["error"][i]
        raw = samples.pop(i, None)
        if not reason:
            picked = pick_image(raw) if raw is not None else None
            if picked is None:
                reason = "no image member"
            else:
                try:
                    img = torch.from_numpy(to_uint8_chw(decode_image(picked[1])))
                    if tuple(img.shape[1:]) != (rows["height"][i], rows["width"][i]):
                        raise BadImage(f"decoded size {tuple(img.shape[1:])} differs from manifest")
                    views.extend(
                        replay_view(img, plan.boxes[i, v], plan.flips[i, v], size) for v in range(job.aug.views)
                    )
                    ok.append(i)
                except BadImage as e:
                    reason = str(e)
        if reason:
            skipped.append({"shard": job.shard, "key": key, "reason": reason})
    stacked = torch.stack(views) if views else torch.empty(0, 3, size, size)
    return ok, stacked


def _run_teacher(teacher: Teacher, views: torch.Tensor, batch_size: int, device: torch.device):
    toks, clss = [], []
    for b in range(0, len(views), batch_size):
        out = teacher(views[b : b + batch_size].to(device))
        toks.append(out.tokens.cpu())
        if out.cls is not None:
            clss.append(out.cls.cpu())
    return torch.cat(toks), (torch.cat(clss) if clss else None)


def extract_shard(
    job: ShardJob, teacher: Teacher, device: torch.device, ds: PreparedDataset | None = None
) -> ShardResult:
    """Extract one shard for one tokenizer: plan its views, run the teacher, write its group.

    Every chunk is written, even one that holds only fill values (zarr skips those by default, and the
    setting is not stored with the array): readers take a missing chunk for damage, never for zeros."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        return _extract_shard(job, teacher, device, ds)


def _extract_shard(job: ShardJob, teacher: Teacher, device: torch.device, ds: PreparedDataset | None) -> ShardResult:
    t0 = time.perf_counter()
    ds = ds or load_dataset(job.dataset)
    rows = ds.rows(job.shard)
    n, k, spec = len(rows["key"]), job.aug.views, teacher.spec
    plan = plan_shard(job.shard, rows["key"], rows["width"], rows["height"], job.aug)
    codes = spec.kind == "codes"
    lay = ShardLayout(
        rows=n,
        views=k,
        tokens=spec.grid[0] * spec.grid[1],
        dim=spec.dim,
        has_cls=spec.has_cls,
        codes=codes,
        dtype=job.storage.dtype,
        chunk_rows=job.storage.chunk_rows,
        clevel=job.storage.clevel,
        num_codes=spec.num_codes,
        codec=job.storage.codec,
    )
    tok = zarr.open_group(job.cache, mode="r+")[job.group]
    if is_complete(tok, job.sid):  # a retried task whose first attempt finished: a complete shard is never redone
        rec = dict(tok[job.sid].attrs["complete"])
        return ShardResult(job.group, **{f: rec[f] for f in ShardResult.__dataclass_fields__ if f in rec})
    source = source_stamp(ds, job.shard)  # before reading: a change while we read fails the hash check
    g = create_shard_group(tok, job.sid, job.shard, lay)
    writer = open_writer(g)
    g["keys"][:] = np.asarray(rows["key"], dtype=str)
    g["seeds"][:], g["boxes"][:], g["flips"][:] = plan.seeds, plan.boxes, plan.flips

    valid = np.zeros(n, dtype=bool)
    skipped: list[dict[str, str]] = []
    stream = iter_dataset_samples(ds, job.shard)
    samples: dict[int, Any] = {}
    read = 0
    c = max(1, min(job.storage.chunk_rows, n))
    for lo in range(0, n, c):  # one chunk of rows at a time: every write covers whole chunks
        hi = min(lo + c, n)
        while read < hi and (item := next(stream, None)) is not None:  # rows arrive in index order
            row, raw = item
            samples[row["index"]] = raw
            read = row["index"] + 1
        ok, views = _views_of(job, teacher, rows, plan, lo, hi, samples, skipped)
        if not ok:  # no row of this chunk decoded: its target chunks hold fill values, written all the same
            write_rows(writer, lo, hi, np.zeros(0, dtype=np.int64), None, None, lay)
            continue
        tokens, cls = _run_teacher(teacher, views, job.batch_size, device)
        idx = np.asarray(ok) - lo
        _write_rows(writer, lo, hi, idx, tokens, cls, k, lay)
        valid[ok] = True
        if lo == 0:
            _fault_pause(job)
    writer.close()  # every object is complete before the shard is (a failure before: the group is redone)
    g["valid"][:] = valid
    result = ShardResult(
        job.group,
        job.shard,
        n,
        int(valid.sum()),
        int(valid.sum()) * k,
        time.perf_counter() - t0,
        stored_bytes(g),
        skipped,
    )
    record = {k_: v for k_, v in asdict(result).items() if k_ not in _RUN_ONLY}
    g.attrs["complete"] = {**record, "source": source}  # written last
    return result


FAULT_PAUSE_ENV = "DIGPT_FAULT_PAUSE"


def _fault_pause(job: ShardJob) -> None:
    """Test-only hook (tests/test_faults.py); inert unless ``DIGPT_FAULT_PAUSE`` names a directory.

    The first time a (tokenizer, shard) has written its first chunk, the process writing it records
    its pid in ``DIR/<group>.<sid>.pid`` and waits (at most 120 s) for ``DIR/<group>.<sid>.go``, so a
    test can SIGKILL that worker or driver mid-shard, at a chosen point. A retry of the same shard
    finds the pid file and does not wait."""
    d = os.environ.get(FAULT_PAUSE_ENV)
    if not d:
        return
    base = os.path.join(d, f"{job.group}.{job.sid}")
    try:
        fd = os.open(base + ".pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    deadline = time.monotonic() + 120
    while not os.path.exists(base + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)


def _write_rows(w, lo: int, hi: int, idx: np.ndarray, tokens: torch.Tensor, cls, k: int, lay: ShardLayout) -> None:
    """Scatter the teacher outputs of the decoded rows into a full block of rows and write it once."""
    write_rows(w, lo, hi, idx, tokens, cls, lay)


# ---------------------------------------------------------------------------------------------
# the driver


class _Worker:
    """Builds each tokenizer's teacher once, then extracts shards. Runs in-process or as a Ray actor."""

    def __init__(
        self, teachers: dict[str, TeacherConfig], fitted: dict[str, np.ndarray], device: str, threads: int | None
    ):
        if threads:
            torch.set_num_threads(threads)
        self.cfgs, self.fitted = teachers, fitted
        self.device = resolve_device(device)
        self.teachers: dict[str, Teacher] = {}
        self.datasets: dict[str, PreparedDataset] = {}

    def run(self, job: ShardJob) -> ShardResult:
        try:
            result = self._run(job)
        except Exception as e:  # one broken shard must not take the others down; it is reported
            import traceback

            where = ""
            if isinstance(e, OSError) and not e.filename:  # zarr's store drops the path: name the shard group
                where = f" (writing {job.cache.rstrip('/')}/{job.group}/{job.sid})"
            result = ShardResult(
                job.group, job.shard, 0, 0, 0, 0.0, 0, error=f"{type(e).__name__}: {e}{where}\n{traceback.format_exc()}"
            )
        result.node, result.host = _where()
        return result

    def _run(self, job: ShardJob) -> ShardResult:
        if job.group not in self.teachers:
            t = _build_fitted(self.cfgs[job.group], self.fitted.get(job.group))
            self.teachers[job.group] = t.to(self.device)
        if job.dataset not in self.datasets:
            self.datasets[job.dataset] = load_dataset(job.dataset)
        return extract_shard(job, self.teachers[job.group], self.device, self.datasets[job.dataset])


def _where() -> tuple[str, str]:
    """(Ray node id, host name) of this process; node ``local`` outside Ray."""
    import socket
    import sys

    ray = sys.modules.get("ray")  # never imported by the local executor: do not pay for it there
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
    return node, socket.gethostname()


@dataclass
class TokenizerSummary:
    group: str
    teacher: str
    shards_done: int
    shards_skipped_complete: int
    samples: int
    valid: int
    views: int
    seconds: float
    images_per_s: float
    bytes_per_view: float
    skipped_by_reason: dict[str, int]
    skipped_file: str


@dataclass
class ExtractSummary:
    cache: str
    tokenizers: list[TokenizerSummary]
    wall_seconds: float
    failed: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Problems writing the reports (full disk, read-only folder); the summary is printed regardless."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """This run's shards: group, shard, node (Ray node id), host, seconds, ok, in completion order."""
    report_error: str = ""
    """Non-empty when the cache could not be read back or reported on after the shards ran."""

    def nodes(self) -> dict[str, int]:
        """``node@host -> shards run there`` over this run (failed ones included)."""
        return dict(Counter(f"{s['node'][:12]}@{s['host']}" for s in self.shards))

    @property
    def ok(self) -> bool:
        return not self.failed and not self.notes and not self.report_error

    def table(self) -> str:
        head = f"{'tokenizer':28s} {'shards':>7s} {'samples':>8s} {'views':>8s} {'skipped':>8s} {'img/s':>8s} {'B/view':>10s}"
        lines = [head, "-" * len(head)]
        for t in self.tokenizers:
            skipped = t.samples - t.valid
            lines.append(
                f"{t.group[:28]:28s} {t.shards_done:>7d} {t.samples:>8d} {t.views:>8d} {skipped:>8d} "
                f"{t.images_per_s:>8.1f} {t.bytes_per_view:>10.0f}"
            )
        lines.append(f"cache: {self.cache}   wall time: {self.wall_seconds:.1f}s")
        if self.shards:
            lines.append("shards per node: " + ", ".join(f"{n} x{c}" for n, c in sorted(self.nodes().items())))
        if self.report_error:
            lines.append(
                f"cache {self.cache} unreachable after the shards ran ({self.report_error}); totals and "
                "reports not written; re-run the same command when it answers"
            )
        for f in self.failed:
            hint = "" if f["error"].startswith("changed") else " (left incomplete; re-run the same command to retry)"
            lines.append(f"FAILED shard {f['shard']} of {f['group']}: {f['error'].splitlines()[0]}{hint}")
        lines += [f"WARNING: {n}" for n in self.notes]
        for t in self.tokenizers:
            if t.skipped_by_reason:
                reasons = ", ".join(f"{r} x{c}" for r, c in sorted(t.skipped_by_reason.items()))
                lines.append(f"skipped in {t.group}: {reasons} (details: {t.skipped_file})")
        return "\n".join(lines)


def _init_root(cfg: ExtractConfig, ds: PreparedDataset) -> zarr.Group:
    """Create the cache root, or check that an existing one was made from the same shards and plan."""
    plan_fp = plan_fingerprint(cfg.aug, ds.fingerprint)
    want = {
        "schema_version": SCHEMA_VERSION,
        "dataset": {
            "root": os.path.abspath(ds.root),
            "manifest_fingerprint": ds.fingerprint,
            "num_samples": ds.num_samples,
            "shards": ds.shards,
            "shard_ids": shard_ids(ds.shards),
        },
        "aug": cfg.aug.to_json(),
        "aug_fingerprint": cfg.aug.fingerprint(),
        "plan_fingerprint": plan_fp,
    }
    try:
        root = zarr.open_group(cfg.out, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        if foreign_out(cfg.out):  # checked again under the lock: nothing of another run's is ever emptied
            raise ValueError(
                f"out {cfg.out} exists and is not a digpt cache (nor empty); choose another --out"
            ) from None
        # Mode "a" creates without deleting anything (mode "w" empties the folder, and tries to remove an
        # empty mount point). The attributes go into the group's one metadata write: a crash cannot leave
        # a root without them.
        return zarr.open_group(
            cfg.out, mode="a", attributes={"digpt_cache": {**want, "created_by": f"digpt {package_version()}"}}
        )
    have = root.attrs.get("digpt_cache")
    if have is None:
        raise ValueError(f"{cfg.out} exists but is not a digpt cache; choose another --out")
    if have.get("schema_version") != SCHEMA_VERSION:  # readable, but one cache holds one layout
        raise ValueError(
            f"cache {cfg.out} has schema {have.get('schema_version')}; this version writes schema {SCHEMA_VERSION} "
            "(a few objects per shard, teacher_cache/store.py): extract into a new --out"
        )
    if have["dataset"]["manifest_fingerprint"] != ds.fingerprint:
        raise ValueError(
            f"cache {cfg.out} was made from other shards (manifest fingerprint "
            f"{have['dataset']['manifest_fingerprint'][:12]} != {ds.fingerprint[:12]}); use a new --out"
        )
    if have["aug_fingerprint"] != want["aug_fingerprint"]:
        diff = {k: (have["aug"].get(k), v) for k, v in want["aug"].items() if have["aug"].get(k) != v}
        raise ValueError(f"cache {cfg.out} has another view plan; differing aug fields (cache, asked): {diff}")
    return root


def _provenance(root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher) -> dict[str, Any]:
    return {
        "teacher_config": asdict(tc),
        "resolved_name": resolve_name(tc.name),
        "fingerprint": teacher.fingerprint(),
        "spec": teacher.spec.to_json(),
        "storage": asdict(cfg.storage),
        "aug_fingerprint": root.attrs["digpt_cache"]["aug_fingerprint"],
        "plan_fingerprint": root.attrs["digpt_cache"]["plan_fingerprint"],
        "manifest_fingerprint": root.attrs["digpt_cache"]["dataset"]["manifest_fingerprint"],
        "schema_version": SCHEMA_VERSION,
        "created_by": f"digpt {package_version()}",
    }


def _check_tokenizer(root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher) -> None:
    """Refuse an existing tokenizer group that another teacher, layer, grid or storage form made."""
    name = tc.group_name
    if name not in root:
        return
    prov = _provenance(root, cfg, tc, teacher)
    have = dict(root[name].attrs.get("tokenizer", {}))
    for field_ in ("fingerprint", "spec", "storage"):
        if have.get(field_) != prov[field_]:
            raise ValueError(
                f"cache group {name!r} holds a tokenizer with a different {field_} "
                f"({_short(have.get(field_))} != {_short(prov[field_])}); extract into another group "
                f"(--group NAME) or another cache"
            )


def _init_tokenizer(
    root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher, fitted: np.ndarray | None
) -> None:
    name = tc.group_name
    if name in root:
        _check_tokenizer(root, cfg, tc, teacher)
        return
    prov = _provenance(root, cfg, tc, teacher)
    g = root.create_group(name)
    if fitted is not None:  # the codebook / PCA basis, beside the codes
        g.create_array(FITTED_ARRAYS[fitted_family(tc)], data=fitted.astype(np.float32))
    g.attrs["tokenizer"] = prov


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) < 120 else s[:117] + "..."


def _fitted_base(tc: TeacherConfig) -> Teacher:
    """The base teacher of a ``kmeans:<base>`` / ``pca:<base>`` tokenizer, built so that a bad base name,
    weights file or layer, a missing ``codebook`` file, an impossible ``codebook_size`` or a ``pca_dim``
    wider than the base's tokens fail before any work."""
    family = fitted_family(tc)
    try:
        base = create_teacher(
            resolve_name(tc.name).removeprefix(f"{family}:"), weights=tc.weights, layer=tc.layer, **tc.options()
        )
    except ValueError as e:
        raise ValueError(f"teacher {tc.name!r}: {e}") from e
    if family == "pca":
        if tc.pca_dim > base.spec.dim:
            raise ValueError(
                f"pca_dim {tc.pca_dim} exceeds the token dim {base.spec.dim} of {base.spec.name}; "
                f"lower pca_dim to at most {base.spec.dim}"
            )
    elif tc.codebook is not None:
        if not os.path.isfile(tc.codebook):
            raise FileNotFoundError(f"codebook file not found: {tc.codebook}")
    else:
        per_view = base.spec.grid[0] * base.spec.grid[1]
        if tc.codebook_size > tc.fit_samples * per_view:
            raise ValueError(
                f"codebook_size {tc.codebook_size} exceeds the {tc.fit_samples * per_view} token vectors "
                f"fit_samples={tc.fit_samples} views give ({per_view} tokens each); lower codebook_size or "
                "raise fit_samples"
            )
    return base


def sample_base_tokens(
    tc: TeacherConfig,
    ds: PreparedDataset,
    aug: AugConfig,
    device: torch.device,
    base: Teacher | None = None,
    desc: str = "fit",
) -> torch.Tensor:
    """The base teacher's tokens ``[M, D]`` of the first views of the first ``fit_samples`` usable
    samples (a deterministic sample: what is fit on it is reproducible). Shared by every fitted tokenizer."""
    base = (base or _fitted_base(tc)).to(device)
    feats, seen = [], 0
    bar = progress_bar(total=tc.fit_samples, desc=desc, unit="img", leave=False)
    for shard in ds.shards:
        rows = ds.rows(shard)
        plan = plan_shard(shard, rows["key"], rows["width"], rows["height"], aug)
        batch = []
        for row, raw in iter_dataset_samples(ds, shard):
            i = row["index"]
            picked = pick_image(raw) if raw is not None and not row["error"] else None
            if picked is None:
                continue
            try:
                img = torch.from_numpy(to_uint8_chw(decode_image(picked[1])))
            except BadImage:
                continue
            batch.append(replay_view(img, plan.boxes[i, 0], plan.flips[i, 0], base.spec.input_size))
            seen += 1
            bar.update(1)
            if seen >= tc.fit_samples:
                break
        if batch:
            feats.append(_run_teacher(base, torch.stack(batch), 64, device)[0].flatten(0, 1))
        if seen >= tc.fit_samples:
            break
    bar.close()
    if not feats:
        raise ValueError(f"no decodable samples to fit the {tc.name} tokenizer on")
    return torch.cat(feats)


def fit_codebook(
    tc: TeacherConfig, ds: PreparedDataset, aug: AugConfig, device: torch.device, base: Teacher | None = None
) -> np.ndarray:
    """Fit a ``kmeans:<base>`` codebook ``[codebook_size, D]`` on :func:`sample_base_tokens`."""
    x = sample_base_tokens(tc, ds, aug, device, base, f"fit k-means ({tc.codebook_size} codes)")
    return fit_kmeans(x, tc.codebook_size, seed=0).numpy()


def fit_pca_basis(
    tc: TeacherConfig, ds: PreparedDataset, aug: AugConfig, device: torch.device, base: Teacher | None = None
) -> np.ndarray:
    """Fit a ``pca:<base>`` basis ``[pca_dim + 1, D]`` (mean, then directions) on :func:`sample_base_tokens`."""
    x = sample_base_tokens(tc, ds, aug, device, base, f"fit PCA ({tc.pca_dim} dims)")
    return fit_pca(x, tc.pca_dim).numpy()


_FITS = {"kmeans": fit_codebook, "pca": fit_pca_basis}


def _plan_workers(cfg: ExtractConfig, n_jobs: int) -> tuple[int, int | None, float]:
    """(workers, torch threads per worker, GPUs per worker)."""
    if resolve_device(cfg.device).type == "cuda":
        gpus = max(1, torch.cuda.device_count())
        return cfg.workers or gpus, cfg.threads, 1.0
    cpus = os.cpu_count() or 1
    workers = cfg.workers or max(1, min(n_jobs, cpus // (cfg.threads or 1)))
    return workers, cfg.threads or max(1, cpus // workers), 0.0


def run_extract(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every configured tokenizer; skip complete shards, redo incomplete ones."""
    t_start = time.perf_counter()
    ds = load_dataset(cfg.shards)
    device = resolve_device(cfg.device)
    # Build every teacher in the driver first: a bad name, file or layer fails before any work,
    # and the weights fingerprint goes into the provenance before a single token is written.
    # (k-means / PCA tokenizers: their base teacher; the codebook or basis comes from the cache, a file
    # (codebooks only) or a fit.)
    fit = {tc.group_name for tc in cfg.teachers if fitted_family(tc)}
    teachers = {tc.group_name: build_teacher(tc) for tc in cfg.teachers if tc.group_name not in fit}
    bases = {tc.group_name: _fitted_base(tc) for tc in cfg.teachers if tc.group_name in fit}
    if foreign_out(cfg.out):  # before the lock creates anything inside it
        raise ValueError(f"out {cfg.out} exists and is not a digpt cache (nor empty); choose another --out")
    try:
        lock = WriterLock(cfg.out)
        lock.acquire()
    except OSError as e:  # read-only or missing parent: one line naming the path
        raise ValueError(
            f"cannot write the cache at {cfg.out}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        ) from None
    try:
        return _extract_locked(cfg, ds, device, fit, teachers, bases, t_start, progress)
    finally:
        lock.release()


def _extract_locked(
    cfg: ExtractConfig,
    ds: PreparedDataset,
    device: torch.device,
    fit: set[str],
    teachers: dict[str, Teacher],
    bases: dict[str, Teacher],
    t_start: float,
    progress: bool,
) -> ExtractSummary:
    """:func:`run_extract` once this run holds the cache's writer lock."""
    root = _init_root(cfg, ds)
    fitted: dict[str, np.ndarray] = {}  # group -> its codebook / PCA basis
    for tc in cfg.teachers:  # every existing group must match its config before anything is written or fit
        name = tc.group_name
        if name in root and "tokenizer" not in root[name].attrs:
            if any(True for _ in root[name].groups()):
                raise ValueError(
                    f"cache group {name!r} holds shards but no tokenizer record; "
                    "extract into another group (--group NAME) or another cache"
                )
            del root[name]  # left by a run that died while creating it (its record is written last)
        if name in fit and name in root and FITTED_ARRAYS[fitted_family(tc)] in root[name]:
            fitted[name] = np.array(root[name][FITTED_ARRAYS[fitted_family(tc)]][:])
            teachers[name] = _build_fitted(tc, fitted[name])
        if name in teachers:
            _check_tokenizer(root, cfg, tc, teachers[name])
    for tc in cfg.teachers:
        name = tc.group_name
        if name in fit and name not in teachers:
            family = fitted_family(tc)
            if not (family == "kmeans" and tc.codebook is not None):
                fitted[name] = _FITS[family](tc, ds, cfg.aug, device, base=bases[name])
            teachers[name] = _build_fitted(tc, fitted.get(name))
            if name not in fitted:  # a user-given codebook file: keep a copy beside the codes
                fitted[name] = teachers[name].codebook.numpy()
        _init_tokenizer(root, cfg, tc, teachers[name], fitted.get(name))
    bases.clear()

    sids = shard_ids(ds.shards)
    jobs, already, changed = [], Counter(), []
    # Workers may run in another directory (Ray starts them in its session dir): hand them an absolute path.
    out = cfg.out if "://" in cfg.out else os.path.abspath(cfg.out)
    for tc in cfg.teachers:
        tok = root[tc.group_name]
        for shard in ds.shards:
            if is_complete(tok, sids[shard]):
                why = changed_since_extraction(tok, sids[shard], ds, shard)
                if why:
                    changed.append(
                        {"group": tc.group_name, "shard": shard, "error": f"changed since extraction: {why}"}
                    )
                already[tc.group_name] += 1
            else:
                jobs.append(
                    ShardJob(
                        os.path.abspath(ds.root),
                        shard,
                        sids[shard],
                        out,
                        tc.group_name,
                        cfg.aug,
                        cfg.storage,
                        cfg.batch_size,
                    )
                )
    t_exec = time.perf_counter()
    results = _execute(cfg, jobs, teachers, fitted, ds, progress)
    exec_seconds = time.perf_counter() - t_exec
    return _summarize(cfg, root, results, already, exec_seconds, time.perf_counter() - t_start, changed)


def _execute(
    cfg: ExtractConfig,
    jobs: list[ShardJob],
    teachers: dict[str, Teacher],
    fitted: dict[str, np.ndarray],
    ds: PreparedDataset,
    progress: bool,
) -> list[ShardResult]:
    if not jobs:
        return []
    total = sum(len(ds.rows(j.shard)["key"]) for j in jobs)
    bar = progress_bar(total=total, desc="extract", unit="img", disable=not progress)
    results: list[ShardResult] = []

    def done(r: ShardResult) -> None:
        results.append(r)
        bar.update(r.rows or len(ds.rows(r.shard)["key"]))
        bar.set_postfix(shards=f"{len(results)}/{len(jobs)}", skipped=sum(len(x.skipped) for x in results))

    cfgs = {tc.group_name: tc for tc in cfg.teachers}
    workers, threads, gpus = _plan_workers(cfg, len(jobs))
    if cfg.executor == "local":
        w = _Worker(cfgs, fitted, cfg.device, threads)
        w.teachers.update({k: t.to(w.device) for k, t in teachers.items()})  # reuse the driver's models
        w.datasets[os.path.abspath(ds.root)] = ds
        for job in jobs:
            r = w.run(job)
            r.node = "local"  # (even when a Ray session exists in this process: the driver did the work)
            done(r)
    else:
        _run_ray(cfg, jobs, cfgs, fitted, workers, threads, gpus, done)
    bar.close()
    return results


def _run_ray(
    cfg: ExtractConfig,
    jobs: list[ShardJob],
    cfgs: dict[str, TeacherConfig],
    fitted: dict[str, np.ndarray],
    workers: int,
    threads: int | None,
    gpus: float,
    done,
) -> None:
    import ray

    from .ray_utils import ensure_ray

    ensure_ray(cfg.ray_address)
    if cfg.ray_address and cfg.workers is None:
        # Joining a cluster: the default is one worker per GPU (or per `threads` CPUs) of the whole
        # cluster, not of the machine the driver happens to run on.
        res = ray.cluster_resources()
        workers = max(1, int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 1) // (threads or 1)))
    # Ray runs a task at least once: an actor that dies is restarted and its task retried. Retrying a
    # shard is safe because extract_shard recreates the shard group before writing it. An actor whose
    # node is lost is restarted on another node, which needs a free slot there: so an actor that comes
    # back idle with nothing left to hand out is killed at once, giving its slot to such a restart
    # (otherwise the retried shard would wait forever for a slot held by an idle actor).
    actor_cls = ray.remote(num_cpus=threads or 1, num_gpus=gpus, max_restarts=3, max_task_retries=3)(_Worker)
    actors = [actor_cls.remote(cfgs, fitted, cfg.device, threads) for _ in range(min(workers, len(jobs)))]
    pending = list(jobs)
    inflight: dict[Any, tuple[Any, ShardJob]] = {}
    for a in actors:
        if pending:
            job = pending.pop(0)
            inflight[a.run.remote(job)] = (a, job)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, job = inflight.pop(ready[0])
        try:
            done(ray.get(ready[0]))
        except ray.exceptions.RayActorError as e:  # restarts used up (a node lost for good): named, re-runnable
            done(
                ShardResult(
                    job.group,
                    job.shard,
                    0,
                    0,
                    0,
                    0.0,
                    0,
                    error=f"worker lost: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                )
            )
            actor = None
        if pending and actor is not None:
            job = pending.pop(0)
            inflight[actor.run.remote(job)] = (actor, job)
        elif actor is not None:
            ray.kill(actor)
    for job in pending:  # every worker was lost before these could be handed out
        done(ShardResult(job.group, job.shard, 0, 0, 0, 0.0, 0, error="not run: every Ray worker was lost"))
    for a in actors:
        ray.kill(a)


def _summarize(
    cfg: ExtractConfig,
    root: zarr.Group,
    results: list[ShardResult],
    already: Counter,
    exec_seconds: float,
    wall: float,
    changed: list[dict[str, str]] = (),
) -> ExtractSummary:
    """Per-tokenizer totals over the whole cache; images/s over this run's execution phase (all
    tokenizers share it, so a tokenizer's rate is its share of samples / that time)."""
    failed = [*changed, *({"group": r.group, "shard": r.shard, "error": r.error} for r in results if r.error)]
    ran = [
        {
            "group": r.group,
            "shard": r.shard,
            "node": r.node,
            "host": r.host,
            "seconds": round(r.seconds, 3),
            "ok": not r.error,
        }
        for r in results
    ]
    notes: list[str] = []
    try:
        out = [
            _tokenizer_totals(cfg, root[tc.group_name], tc, results, already, exec_seconds, notes)
            for tc in cfg.teachers
        ]
    except Exception as e:  # noqa: BLE001 - the store itself went away (object-store outage): the shards
        # that failed are still named, and the run still ends with its table, not a traceback.
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return ExtractSummary(cfg.out, [], wall, failed, notes, ran, report_error=why)
    summary = ExtractSummary(cfg.out, out, wall, failed, notes, ran)
    _report_or_note(
        notes,
        "extract-summary.json",
        write_report,
        cfg.out,
        "extract-summary.json",
        json.dumps({"config": cfg.to_json(), "summary": asdict(summary)}, indent=2, default=str),
    )
    return summary


def _tokenizer_totals(
    cfg: ExtractConfig,
    tok: zarr.Group,
    tc: TeacherConfig,
    results: list[ShardResult],
    already: Counter,
    exec_seconds: float,
    notes: list[str],
) -> TokenizerSummary:
    name = tc.group_name
    mine = [r for r in results if r.group == name and not r.error]
    # Totals cover the whole cache (earlier runs included), read back from completion records.
    complete = [dict(g.attrs["complete"]) for _, g in tok.groups() if "complete" in g.attrs]
    skipped = [s for c in complete for s in c["skipped"]]
    valid = sum(c["valid"] for c in complete)
    views = sum(c["views"] for c in complete)
    nbytes = sum(c["bytes"] for c in complete)
    return TokenizerSummary(
        group=name,
        teacher=tc.name,
        shards_done=len(mine),
        shards_skipped_complete=already[name],
        samples=sum(c["rows"] for c in complete),
        valid=valid,
        views=views,
        seconds=sum(r.seconds for r in mine),
        images_per_s=(sum(r.rows for r in mine) / exec_seconds) if mine and exec_seconds > 0 else 0.0,
        bytes_per_view=(nbytes / views) if views else 0.0,
        skipped_by_reason=dict(Counter(_reason_kind(s["reason"]) for s in skipped)),
        skipped_file=_report_or_note(notes, f"skipped-{name}.jsonl", _write_skipped, cfg.out, name, skipped),
    )


def _report_or_note(notes: list[str], report: str, write, cache: str, *args) -> str:
    """Write a report file; on a full disk or read-only folder say so in the summary instead of dying
    before the summary (which lists the failed shards) is printed."""
    try:
        return write(cache, *args)
    except OSError as e:
        path = e.filename or f"{cache.rstrip('/')}/{REPORTS_DIR}/{report}"
        notes.append(f"could not write report {path}: {e.strerror or e}")
        return ""


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def write_report(cache: str, name: str, text: str) -> str:
    """Write ``CACHE/reports/<name>`` (outside the Zarr hierarchy: zarr ignores it)."""
    path = f"{cache.rstrip('/')}/{REPORTS_DIR}/{name}"
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(text)
    return path


def _write_skipped(cache: str, group: str, skipped: list[dict[str, str]]) -> str:
    return write_report(cache, f"skipped-{group}.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
