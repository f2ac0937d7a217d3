"""What a run reports: per-tokenizer totals over the whole cache (read back from completion records), the
shards that failed and why, and the reports written beside the cache (``CACHE/reports``)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import zarr

from ..config import ExtractConfig, TeacherConfig
from ..store import REPORTS_DIR
from .plan import ShardResult


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


def summarize(
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
