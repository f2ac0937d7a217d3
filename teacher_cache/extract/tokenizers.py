"""The cache root and its tokenizer groups: provenance, the check that an existing group was made by the
same teacher, and the one fit a fitted family (``kmeans:``, ``pca:``, any :class:`~teacher_cache.teachers.Fit`)
makes on the data before any shard is extracted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import zarr

from ..config import ExtractConfig, TeacherConfig
from ..dataset import PreparedDataset, iter_dataset_samples
from ..images import BadImage, decode_image, to_uint8_chw
from ..lock import foreign_out
from ..runtime import progress_bar
from ..shards import pick_image
from ..store import SCHEMA_VERSION, package_version, shard_ids
from ..teachers import Teacher, base_teacher, build_teacher, family_fit, resolve_name
from ..views import AugConfig, plan_fingerprint, plan_shard, replay_view
from .worker import run_teacher


def init_root(cfg: ExtractConfig, ds: PreparedDataset) -> zarr.Group:
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


def provenance(root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher) -> dict[str, Any]:
    """What a tokenizer group records about the teacher and storage that made it (DESIGN invariant 4)."""
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
        # Only when set, so that caches made before the field existed (float32 forwards) still match.
        **({"autocast": cfg.autocast} if cfg.autocast != "none" else {}),
    }


def check_tokenizer(root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher) -> None:
    """Refuse an existing tokenizer group that another teacher, layer, grid, storage form or forward
    precision (``autocast``) made."""
    name = tc.group_name
    if name not in root:
        return
    prov = provenance(root, cfg, tc, teacher)
    have = dict(root[name].attrs.get("tokenizer", {}))
    for field_ in ("fingerprint", "spec", "storage", "autocast"):
        was, now = have.get(field_, "none"), prov.get(field_, "none")
        if was != now:
            raise ValueError(
                f"cache group {name!r} holds a tokenizer with a different {field_} "
                f"({_short(was)} != {_short(now)}){_config_diff(have, tc)}; extract into another group "
                "(--group NAME) or another cache"
            )


def _config_diff(have: dict[str, Any], tc: TeacherConfig) -> str:
    """The config fields the group was made with that differ from ``tc``'s (a knob the record predates
    read as what made it: ``TeacherConfig.from_record``), e.g. `` (made with metric 'cosine', asked
    'euclidean')``; ``""`` when there is no record or nothing differs."""
    try:
        was = asdict(TeacherConfig.from_record(have["teacher_config"]))
    except (KeyError, TypeError, ValueError):
        return ""
    now = asdict(tc)
    diff = [f"{k} {was.get(k)!r}, asked {v!r}" for k, v in now.items() if k != "group" and was.get(k) != v]
    return f" (made with {'; '.join(diff)})" if diff else ""


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) < 120 else s[:117] + "..."


def build_configured(cfg: ExtractConfig) -> tuple[dict[str, Teacher], dict[str, Teacher]]:
    """``(teachers, bases)``: every teacher that needs no fit, and the base teacher of every fitted one.

    Built in the driver first, so a bad name, file or layer fails before any work, and the weights
    fingerprint goes into the provenance before a single token is written."""
    teachers = {tc.group_name: build_teacher(tc) for tc in cfg.teachers if family_fit(tc.name) is None}
    bases = {tc.group_name: base_teacher(tc) for tc in cfg.teachers if family_fit(tc.name) is not None}
    return teachers, bases


def init_tokenizers(
    cfg: ExtractConfig,
    root: zarr.Group,
    ds: PreparedDataset,
    device: torch.device,
    teachers: dict[str, Teacher],
    bases: dict[str, Teacher],
) -> dict[str, np.ndarray]:
    """Create (or check) every tokenizer group; fit what a fitted family fits, unless its group already
    stores it. Completes ``teachers`` in place; returns each fitted group's stored array."""
    fitted: dict[str, np.ndarray] = {}  # group -> its codebook / PCA basis / ...
    for tc in cfg.teachers:  # every existing group must match its config before anything is written or fit
        name, fit = tc.group_name, family_fit(tc.name)
        if name in root and "tokenizer" not in root[name].attrs:
            if any(True for _ in root[name].groups()):
                raise ValueError(
                    f"cache group {name!r} holds shards but no tokenizer record; "
                    "extract into another group (--group NAME) or another cache"
                )
            del root[name]  # left by a run that died while creating it (its record is written last)
        if fit is not None and name in root and fit.array in root[name]:
            fitted[name] = np.array(root[name][fit.array][:])
            teachers[name] = build_teacher(tc, fitted[name])
        if name in teachers:
            check_tokenizer(root, cfg, tc, teachers[name])
    for tc in cfg.teachers:
        name, fit = tc.group_name, family_fit(tc.name)
        if fit is not None and name not in teachers:
            if fit.given is not None and fit.given(tc):  # the config supplies the array (a codebook file)
                teachers[name] = build_teacher(tc)
                fitted[name] = fit.stored(teachers[name]).numpy()
            else:
                x = sample_base_tokens(tc, ds, cfg.aug, device, bases[name], fit.describe(tc))
                fitted[name] = fit.fit(x, tc)
                teachers[name] = build_teacher(tc, fitted[name])
        _init_tokenizer(root, cfg, tc, teachers[name], fitted.get(name))
    bases.clear()
    return fitted


def _init_tokenizer(
    root: zarr.Group, cfg: ExtractConfig, tc: TeacherConfig, teacher: Teacher, fitted: np.ndarray | None
) -> None:
    name = tc.group_name
    if name in root:
        check_tokenizer(root, cfg, tc, teacher)
        return
    prov = provenance(root, cfg, tc, teacher)
    g = root.create_group(name)
    if fitted is not None:  # the codebook / PCA basis, beside the tokens
        g.create_array(family_fit(tc.name).array, data=fitted.astype(np.float32))
    g.attrs["tokenizer"] = prov  # written last: a group without it is a leftover of a crash


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
    base = (base or base_teacher(tc)).to(device)
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
            feats.append(run_teacher(base, torch.stack(batch), 64, device)[0].flatten(0, 1))
        if seen >= tc.fit_samples:
            break
    bar.close()
    if not feats:
        raise ValueError(f"no decodable samples to fit the {tc.name} tokenizer on")
    return torch.cat(feats)
