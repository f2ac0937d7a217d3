"""``digpt verify``: is this cache complete, finite, consistent with these shards, and aligned?

Checks, per tokenizer: provenance matches the shards' manifest and the view plan; every shard is
complete with the manifest's keys; the stored seeds/boxes/flips equal the ones re-derived from the
plan; tokens are finite; the teacher rebuilt from the recorded config has the recorded weights
fingerprint; and an alignment spot check replays random stored views from the image shards, runs
the teacher and compares with the cached tokens.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from .config import TeacherConfig
from .dataset import iter_dataset_samples, load_dataset
from .images import decode_image, to_uint8_chw
from .integrity import CacheIntegrityError, check_shard_group, checked, has_integrity, read_every_chunk, warn_unchecked
from .runtime import progress_bar, resolve_device
from .shards import pick_image
from .store import (
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    TokenizerInfo,
    decode_block,
    list_tokenizers,
    open_root,
    shard_ids,
    tokenizer_info,
)
from .teachers import build_teacher, load_fitted
from .views import AugConfig, plan_fingerprint, plan_shard, replay_view

# Minimum mean per-token cosine similarity between cached and recomputed tokens, by storage form.
COSINE_FLOOR = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.99}
CODE_AGREEMENT_FLOOR = 0.98
# A cache extracted under CUDA autocast is recomputed under the same autocast on CUDA (the storage floor
# holds). Recomputed anywhere else (a CPU), the forward runs in float32 and the cached tokens carry the
# reduced-precision forward's error as well: the floor is then the lower of the two.
AUTOCAST_FLOOR = {"bf16": 0.99, "fp16": 0.995}


@dataclass(frozen=True)
class VerifyConfig:
    """``digpt verify``."""

    shards: str
    """Prepared dataset directory the cache should have been made from."""
    cache: str
    """Cache location."""
    tokenizers: tuple[str, ...] = ()
    """Tokenizer groups to check; empty: all."""
    spot_checks: int = 8
    """Random stored views to recompute with the teacher (0 disables the alignment check)."""
    seed: int = 0
    """Seed for picking the spot-check views."""
    device: str = "auto"
    """Device for the recomputation."""
    full: bool = False
    """Decode every chunk of every array (each checksum verified); the default reads the target arrays
    (for the finite check), lists every chunk and reads the small ones."""

    def __post_init__(self) -> None:
        if self.spot_checks < 0:
            raise ValueError(f"spot_checks must be >= 0, got {self.spot_checks}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class Check:
    scope: str
    name: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    cache: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, scope: str, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(scope, name, bool(ok), detail))
        return bool(ok)

    def table(self) -> str:
        w = max([len(c.scope) for c in self.checks] + [5])
        lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.scope:{w}s}  {c.name:22s} {c.detail}" for c in self.checks]
        verdict = "cache OK" if self.ok else f"{sum(not c.ok for c in self.checks)} check(s) FAILED"
        return "\n".join([*lines, f"{verdict}: {self.cache}"])


def run_verify(cfg: VerifyConfig, progress: bool = True) -> VerifyReport:
    report = VerifyReport(cfg.cache)
    ds = load_dataset(cfg.shards)
    root = open_root(cfg.cache)
    unknown = [n for n in cfg.tokenizers if n not in list_tokenizers(root)]
    if unknown:  # a configuration error, named before any check runs
        raise ValueError(f"tokenizer {unknown} not in cache {cfg.cache}; it has {list_tokenizers(root)}")
    meta = root.attrs.get("digpt_cache")
    if not report.add("cache", "is a digpt cache", meta is not None, "" if meta else "no digpt_cache attribute"):
        return report
    report.add(
        "cache",
        "schema version",
        meta["schema_version"] in READABLE_SCHEMAS,
        f"cache {meta['schema_version']}, this version writes {SCHEMA_VERSION} and reads {list(READABLE_SCHEMAS)}",
    )
    have_fp = meta["dataset"]["manifest_fingerprint"]
    if not report.add(
        "cache", "same shards", have_fp == ds.fingerprint, f"manifest {have_fp[:12]} vs shards {ds.fingerprint[:12]}"
    ):
        return report
    aug = AugConfig.from_json(meta["aug"])
    report.add(
        "cache",
        "view plan fingerprint",
        aug.fingerprint() == meta["aug_fingerprint"]
        and plan_fingerprint(aug, ds.fingerprint) == meta["plan_fingerprint"],
        f"plan {meta['plan_fingerprint'][:12]}",
    )
    names = list(cfg.tokenizers) or list_tokenizers(root)
    report.add(
        "cache",
        "tokenizers present",
        bool(names) and all(n in list_tokenizers(root) for n in names),
        f"{names} (cache has {list_tokenizers(root)})",
    )
    for name in names:
        if name in list_tokenizers(root):
            _verify_tokenizer(cfg, report, root, tokenizer_info(root, name), ds, aug, meta, progress)
    return report


def _verify_tokenizer(
    cfg: VerifyConfig,
    report: VerifyReport,
    root: zarr.Group,
    info: TokenizerInfo,
    ds,
    aug: AugConfig,
    meta: dict,
    progress: bool,
) -> None:
    """Every check of one tokenizer group: provenance, then each shard's group, then (when every shard is
    there and readable) the teacher rebuilt and re-run on a few stored views."""
    name, tok, a = info.name, root[info.name], info.attrs
    report.add(
        name,
        "provenance",
        a["manifest_fingerprint"] == ds.fingerprint and a["plan_fingerprint"] == meta["plan_fingerprint"],
        f"teacher {a['resolved_name']}, weights {a['fingerprint'][:12]}, {a['storage']['dtype']}, "
        f"grid {a['spec']['grid']}x{a['spec']['dim']}",
    )
    sids = shard_ids(ds.shards)
    found = _Findings()
    for shard in progress_bar(ds.shards, desc=f"verify {name}", unit="shard", disable=not progress):
        _check_shard(cfg, found, tok, sids[shard], shard, ds, info, aug)
    _report_findings(cfg, report, info, found, len(ds.shards), aug.views)
    if cfg.spot_checks and not found.blocks_spot_check:
        _spot_check(cfg, report, tok, info, ds, sids, aug)


@dataclass
class _Findings:
    """What the per-shard checks of one tokenizer found: shard names, or problems as text."""

    missing: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    bad_keys: list[str] = field(default_factory=list)
    bad_plan: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    """Corrupt or missing chunks, swapped groups, valid counts off the record."""
    unchecked: list[zarr.Group] = field(default_factory=list)
    """Shard groups written without checksums."""
    valid: int = 0
    rows: int = 0
    chunks_read: int = 0

    @property
    def blocks_spot_check(self) -> bool:
        """A shard is absent or unreadable: re-running the teacher on stored views would read garbage."""
        return bool(self.missing or self.incomplete or self.bad_keys or self.bad_shape or self.damaged)


def _check_shard(
    cfg: VerifyConfig, found: _Findings, tok: zarr.Group, sid: str, shard: str, ds, info: TokenizerInfo, aug: AugConfig
) -> None:
    """Check one shard's group (present, complete, intact, keys, views, shapes, finite) into ``found``."""
    if sid not in tok:
        found.missing.append(shard)
        return
    g = tok[sid]
    if "complete" not in g.attrs:
        found.incomplete.append(shard)
        return
    mrows = ds.rows(shard)
    if not has_integrity(g):
        found.unchecked.append(g)
    try:
        problems = check_shard_group(g, shard, list(mrows["key"]))
        if any(p.startswith("stored keys") for p in problems):
            found.bad_keys.append(shard)
        problems = [p for p in problems if not p.startswith("stored keys")]
        if problems:
            found.damaged += [f"{shard}: {p}" for p in problems]
            return
        if shard in found.bad_keys:
            return
        plan = plan_shard(shard, mrows["key"], mrows["width"], mrows["height"], aug)
        stored = {n: checked(g, n, lambda g=g, n=n: g[n][:]) for n in ("seeds", "boxes", "flips")}
        if not (
            np.array_equal(plan.seeds, stored["seeds"])
            and np.array_equal(plan.boxes, stored["boxes"])
            and np.array_equal(plan.flips, stored["flips"])
        ):
            found.bad_plan.append(shard)
        shape_problem = _shape_problem(g, info, aug.views, len(mrows["key"]))
        if shape_problem:
            found.bad_shape.append(f"{shard}: {shape_problem}")
            return
        if cfg.full:
            found.chunks_read += read_every_chunk(g)
        if not info.codes and not _finite(g, info.dtype):
            found.nonfinite.append(shard)
    except CacheIntegrityError as e:
        found.damaged.append(str(e))
        return
    except Exception as e:  # a damaged chunk in the plan arrays: zarr/Blosc's own error types
        found.damaged.append(f"{shard}: {type(e).__name__}: {e}")
        return
    found.valid += int(g["valid"][:].sum())
    found.rows += len(mrows["key"])


def _report_findings(
    cfg: VerifyConfig, report: VerifyReport, info: TokenizerInfo, found: _Findings, shards: int, views: int
) -> None:
    """One report line per per-shard check of tokenizer ``info`` over its ``shards`` shards."""
    name, f = info.name, found
    report.add(
        name,
        "complete",
        not f.missing and not f.incomplete,
        f"{shards - len(f.missing) - len(f.incomplete)}/{shards} shards"
        + (f"; missing {f.missing[:3]}" if f.missing else "")
        + (f"; incomplete {f.incomplete[:3]}" if f.incomplete else ""),
    )
    report.add(
        name,
        "keys match manifest",
        not f.bad_keys,
        f"mismatched shards {f.bad_keys[:3]}" if f.bad_keys else f"{f.rows} rows, {f.valid} valid",
    )
    report.add(
        name,
        "views re-derive",
        not f.bad_plan,
        f"differ in {f.bad_plan[:3]}" if f.bad_plan else "seeds, boxes, flips equal",
    )
    spec = info.spec
    report.add(
        name,
        "shapes match spec",
        not f.bad_shape,
        "; ".join(f.bad_shape[:3])
        if f.bad_shape
        else f"{views} views x {spec['grid'][0]}x{spec['grid'][1]} tokens x {spec['dim']}",
    )
    if f.unchecked:
        warn_unchecked(cfg.cache, f.unchecked)
    intact = "every chunk present; " + (
        f"{f.chunks_read} chunks decoded, every checksum matches"
        if cfg.full
        else "target chunks decoded with their checksums (--full: every chunk)"
    )
    report.add(
        name,
        "chunks intact",
        not f.damaged,
        "; ".join(f.damaged[:3])
        if f.damaged
        else f"{len(f.unchecked)} shard(s) written without checksums: not checkable"
        if f.unchecked
        else intact,
    )
    report.add(name, "finite", not f.nonfinite, f"NaN/Inf in {f.nonfinite[:3]}" if f.nonfinite else "no NaN/Inf")


def _shape_problem(g: zarr.Group, info: TokenizerInfo, views: int, rows: int) -> str:
    """Why the shard's target arrays do not have the shapes the recorded spec and plan imply ('' if they do)."""
    spec = info.spec
    t, d = spec["grid"][0] * spec["grid"][1], spec["dim"]
    want = {"tokens": (rows, views, t) if info.codes else (rows, views, t, d)}
    if spec.get("has_cls") and not info.codes:
        want["cls"] = (rows, views, d)
    for arr, shape in want.items():
        have = tuple(g[arr].shape) if arr in g else None
        if have != shape:
            return f"{arr} {have} != {shape} (spec grid {spec['grid']}, dim {d}, {views} views)"
    return ""


def token_agreement(fresh: torch.Tensor, cached: torch.Tensor) -> float:
    """Mean per-token cosine between recomputed and cached ``[T, D]`` tokens.

    A token that is (numerically) zero in both — a flat patch under norm-pix targets, a dead feature
    map region — has no direction; it agrees when both are zero and scores 0 when only one is.
    """
    nf, nc = fresh.norm(dim=-1), cached.norm(dim=-1)
    tiny = 1e-4 * torch.maximum(nf.max(), nc.max()).clamp_min(1e-12)  # relative to this view's scale
    cos = F.cosine_similarity(fresh, cached, dim=-1)
    both_zero = (nf <= tiny) & (nc <= tiny)
    one_zero = (nf <= tiny) ^ (nc <= tiny)
    cos = torch.where(both_zero, torch.ones_like(cos), torch.where(one_zero, torch.zeros_like(cos), cos))
    return float(cos.mean())


def _finite(g: zarr.Group, dtype: str) -> bool:
    for name in ("tokens", "cls"):
        if name not in g:
            continue
        arr = g[name]
        step = 64 if arr.shards else arr.chunks[0]  # sharded: rows of one inner chunk each; read 64 at a time
        for lo in range(0, arr.shape[0], step):
            x = decode_block(
                checked(g, name, lambda a=arr, lo=lo, step=step: a[lo : lo + step]),
                dtype,
                np.ones(arr.shape[:-1], np.float32)[lo : lo + step] if dtype == "int8" else None,
            )
            if not torch.isfinite(x).all():
                return False
        scale = f"{'token' if name == 'tokens' else 'cls'}_scale"
        if scale in g and not np.isfinite(g[scale][:]).all():
            return False
    return True


def _spot_check(
    cfg: VerifyConfig, report: VerifyReport, tok: zarr.Group, info: TokenizerInfo, ds, sids, aug: AugConfig
) -> None:
    name, a = info.name, info.attrs
    tc_fields = dict(a["teacher_config"])
    try:
        teacher = build_teacher(TeacherConfig(**tc_fields), **load_fitted(tok))  # codebook / PCA basis
    except Exception as e:  # a missing weights file, a hub name without --allow-hub, ...
        report.add(name, "teacher rebuilds", False, f"{type(e).__name__}: {e}")
        return
    fp = teacher.fingerprint()
    if not report.add(
        name, "teacher fingerprint", fp == a["fingerprint"], f"recorded {a['fingerprint'][:12]}, rebuilt {fp[:12]}"
    ):
        return
    rebuilt = json.loads(json.dumps(teacher.spec.to_json()))
    diff = {k: (a["spec"].get(k), v) for k, v in rebuilt.items() if a["spec"].get(k) != v}
    if not report.add(
        name,
        "teacher spec",
        not diff,
        f"differs (recorded, rebuilt): {diff}" if diff else "recorded spec equals the rebuilt teacher's",
    ):
        return
    device = resolve_device(cfg.device)
    teacher = teacher.to(device)
    rng = np.random.default_rng(cfg.seed)
    candidates = [(shard, i) for shard in ds.shards for i in np.flatnonzero(tok[sids[shard]]["valid"][:])]
    if not candidates:
        report.add(name, "alignment", False, "no valid samples to check")
        return
    picks = [
        candidates[j] for j in rng.choice(len(candidates), size=min(cfg.spot_checks, len(candidates)), replace=False)
    ]
    autocast = a.get("autocast", "none")
    same_precision = autocast == "none" or device.type == "cuda"
    precision = (
        torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])
        if autocast != "none" and device.type == "cuda"
        else contextlib.nullcontext()
    )
    scores = []
    for shard, i in picks:
        g = tok[sids[shard]]
        v = int(rng.integers(aug.views))
        raw = next(r for row, r in iter_dataset_samples(ds, shard) if row["index"] == i)
        img = torch.from_numpy(to_uint8_chw(decode_image(pick_image(raw)[1])))
        pixels = replay_view(img, g["boxes"][i, v], bool(g["flips"][i, v]), teacher.spec.input_size)
        with precision:
            fresh = teacher(pixels.unsqueeze(0).to(device)).tokens[0].cpu()
        if info.codes:
            scores.append(float((fresh == torch.from_numpy(g["tokens"][i, v].astype(np.int64))).float().mean()))
        else:
            scale = g["token_scale"][i, v] if info.dtype == "int8" else None
            cached = decode_block(g["tokens"][i, v], info.dtype, scale)
            scores.append(token_agreement(fresh.float(), cached))
    floor = CODE_AGREEMENT_FLOOR if info.codes else COSINE_FLOOR[info.dtype]
    if not same_precision:
        floor = min(floor, AUTOCAST_FLOOR[autocast])
    what = "code agreement" if info.codes else "mean token cosine"
    how = (
        ""
        if autocast == "none"
        else (
            f"; recomputed under {autocast} autocast, as extracted"
            if same_precision
            else f"; cache extracted under {autocast} autocast, recomputed in float32 on {device.type}"
        )
    )
    report.add(
        name,
        "alignment",
        min(scores) >= floor,
        f"{len(scores)} views recomputed; worst {what} {min(scores):.5f} (floor {floor}){how}",
    )
