"""The run directory: what may be written where, what a run records about itself, what ``--resume`` accepts.

A run directory is never overwritten or mixed with other files; its ``config.json`` records the resolved
config (the objective's own knobs included) and the cache it was trained against, and ``--resume``
refuses any other configuration, naming every field that differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from teacher_cache.config_io import from_dict
from teacher_cache.io import atomic_write_text

from .config import TrainConfig
from .objectives import Objective, TargetSpec, objective_config

if TYPE_CHECKING:
    from .data import CacheJoin
    from .targets import TargetNorm, TokenNorm

MISMATCH_LOG = "skipped-mismatch.jsonl"

# Fields of a run's config.json ``train`` section that ``--resume`` may change: how long, how often it
# logs, where it runs, where the (fingerprint-checked) inputs now live. Any other difference is refused.
RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "epochs",
        "log_every",
        "ckpt_every",
        "amp",
        "device",
        "resume",
        "out",
        "data.shards",
        "data.cache",
        "data.num_workers",
        "data.on_mismatch",
        "data.mismatch_log",
    }
)


def check_out(out: str) -> None:
    """Refuse a run directory that would mix a run with other files: a file, or a non-empty directory
    that is not a run (every run directory holds config.json from its first write on)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out {out} exists and is not a directory; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "config.json")):
        raise ValueError(
            f"out {out} exists and is not a digpt run directory (no config.json, not empty); choose another --out"
        )


def guard_run_dir(cfg: TrainConfig) -> None:
    """A run directory is never overwritten: an existing run needs ``--resume`` (today's metrics.csv,
    checkpoints and ``latest`` would otherwise mix two runs)."""
    if os.path.exists(os.path.join(cfg.out, "config.json")) and not cfg.resume:
        raise ValueError(f"out {cfg.out} already holds a run; pass --resume to continue it, or choose another --out")


def with_mismatch_log(cfg: TrainConfig) -> TrainConfig:
    """``--on-mismatch skip``: samples skipped by the loader are appended to ``RUN/skipped-mismatch.jsonl``."""
    if cfg.data.on_mismatch != "skip" or cfg.data.mismatch_log:
        return cfg
    os.makedirs(cfg.out, exist_ok=True)
    log = os.path.join(cfg.out, MISMATCH_LOG)
    if not cfg.resume and os.path.exists(log):
        os.remove(log)
    return replace(cfg, data=replace(cfg.data, mismatch_log=log))


def open_run(cfg: TrainConfig) -> TrainConfig:
    """Check the run directory and resolve what the config leaves to defaults that the run must record:
    the objective's knobs (so config.json and ``--resume`` compare them) and the mismatch log."""
    check_out(cfg.out)
    guard_run_dir(cfg)
    return with_mismatch_log(with_resolved_knobs(cfg))


def with_resolved_knobs(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its objective's knobs resolved (its defaults when left None): the form a run records."""
    return replace(cfg, objective_knobs=objective_config(cfg.objective, cfg.objective_knobs))


def report_mismatches(cfg: TrainConfig) -> int:
    """Count (and say) the samples skipped because the shard changed after prepare (an image that differs,
    a sample gone or added); 0 when none or not skipping."""
    log = cfg.data.mismatch_log
    n = 0
    if log and os.path.exists(log):
        with open(log) as f:
            n = sum(1 for _ in f)
    if n:
        print(f"skipped {n} sample read(s) of shards that changed after prepare (--on-mismatch skip); see {log}")
    return n


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cache_record(join: CacheJoin) -> dict:
    """What identifies the cache a run trains against (recorded in config.json, compared on resume)."""
    return {
        "tokenizer": join.info.name,
        "fingerprint": join.info.attrs["fingerprint"],
        "manifest_fingerprint": join.ds.fingerprint,
        "plan_fingerprint": join.info.attrs["plan_fingerprint"],
    }


def recorded_diff(cfg: TrainConfig, have: dict, may_change: frozenset[str] = frozenset({"resume"})) -> dict[str, tuple]:
    """Where ``cfg`` departs from the ``train`` section of a run's recorded ``config.json`` ``have``, as
    ``{dotted field: (recorded, now)}``, leaving out the fields in ``may_change`` (``--resume`` passes
    :data:`RESUME_MAY_CHANGE`; an ablation reusing a finished run, only ``resume``). The objective's knobs
    are compared resolved, as :func:`open_run` records them: knobs left to defaults equal the defaults."""
    now = _flat(json.loads(json.dumps(asdict(with_resolved_knobs(cfg)), default=str)))
    before = _flat(have.get("train", {}))
    # Runs written before each objective owned its knobs kept ``mask_ratio`` in the student config.
    legacy = before.pop("student.mask_ratio", None)
    if legacy is not None and before.get("objective") == "masked":
        before.setdefault("objective_knobs.mask_ratio", legacy)
        before.pop("objective_knobs", None)
    return {
        k: (before.get(k), now.get(k))
        for k in sorted(set(now) | set(before))
        if k not in may_change and before.get(k) != now.get(k)
    }


def cache_diff(have: dict, join: CacheJoin) -> dict[str, tuple]:
    """Where the cache ``join`` opens departs from the one a run's ``config.json`` ``have`` recorded."""
    was = have.get("cache", {})
    return {f"cache.{k}": (was.get(k), v) for k, v in cache_record(join).items() if was.get(k) != v}


def check_resume_config(cfg: TrainConfig, join: CacheJoin) -> None:
    """``--resume`` continues the same run: refuse another cache (teacher fingerprint, shards, view plan,
    tokenizer), student, objective (and its knobs), optimizer or data config, naming every differing field."""
    path = os.path.join(cfg.out, "config.json")
    if not cfg.resume or not os.path.exists(path):
        return
    with open(path) as f:
        have = json.load(f)
    diff = recorded_diff(cfg, have, RESUME_MAY_CHANGE) | cache_diff(have, join)
    if diff:
        shown = "; ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise ValueError(
            f"--resume: {cfg.out} was trained with another configuration ({len(diff)} field(s) differ: "
            f"{shown}); resume with the run's settings, or start a new run with another --out"
        )


def write_json(path: str, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def write_config(
    cfg: TrainConfig,
    join: CacheJoin,
    objective: Objective,
    total: int,
    peak: float,
    norm: TargetNorm | TokenNorm | None = None,
) -> None:
    """The resolved config, plus what the run was trained against: enough to rebuild and check it."""
    os.makedirs(cfg.out, exist_ok=True)
    resolved = {
        "train": asdict(cfg),
        "resolved": {"total_steps": total, "peak_lr": peak, "order": getattr(objective, "order_name", None)},
        "target": asdict(TargetSpec.from_spec(join.spec)),
        "cache": cache_record(join),
        "encoder": asdict(objective.encoder.cfg),
        "target_norm": {
            "kind": cfg.target_norm if norm is not None else "none",
            **(norm.summary() if norm is not None else {}),
        },
    }
    write_json(os.path.join(cfg.out, "config.json"), resolved)


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from its ``asdict`` form: the ``train`` section of a run's ``config.json``
    (or a whole ``config.json``). Unknown keys are refused by name; the objective's knobs come back as
    the config type that objective registers."""
    d = dict(d.get("train", d))
    knobs = d.pop("objective_knobs", None)
    cfg = from_dict(TrainConfig, d, where="train")
    if knobs is not None:
        kind = type(objective_config(cfg.objective))
        cfg = replace(cfg, objective_knobs=from_dict(kind, knobs, where="train.objective_knobs"))
    return cfg
