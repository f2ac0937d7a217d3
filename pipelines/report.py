"""The ablation's report: per-variant rows (mean ± std over seeds, beside the random-init floor), the
table, the findings the numbers support (with noise margins), plots, ``report.md`` and ``results.json``."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .noise import how as _how
from .noise import margin, paired_margin

if TYPE_CHECKING:
    from .config import AblateConfig
    from .recipes import Variant


@dataclass
class RunRecord:
    variant: str
    seed: int
    run: str
    train_seconds: float
    final_loss: float
    losses: list[float]
    linear_top1: float
    linear_top5: float | None
    best_layer: int | str
    knn_top1: float | None
    blind_loss: float | None = None
    """The run's input-blind baseline (per-position mean target), on the loss's scale."""
    loss_steps: list[int] = field(default_factory=list)
    """The optimizer step of each entry of ``losses``."""
    report_correct: list[int] | None = None
    """The linear probe's per-report-sample correctness (1 right, 0 wrong), for paired comparisons with
    the other runs of the same seed (probed on the same split)."""
    knn_correct: list[int] | None = None
    """The same for the k-NN probe."""
    reused: bool = False
    """Trained by an earlier ablation in the same directory (same config, same cache) and read back:
    ``train_seconds`` is then that run's training time (``pipelines/rerun.py``)."""


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def results_table(
    cfg: AblateConfig,
    variants: list[Variant],
    records: list[RunRecord],
    floors: list[RunRecord],
    bytes_per_view: dict[str, float],
    seconds: float,
    num_classes: int,
) -> dict:
    rows = []
    for v in variants:
        mine = [r for r in records if r.variant == v.name]
        top1, std = _mean_std([r.linear_top1 for r in mine])
        knn, knn_std = _mean_std([r.knn_top1 for r in mine if r.knn_top1 is not None])
        rows.append(
            {
                "variant": v.name,
                "teacher": v.teacher.name,
                "objective": v.train.objective,
                "order": v.train.order or "default",
                "storage": v.storage.dtype,
                "decoder_depth": v.train.student.decoder_depth,
                "max_views": v.train.data.max_views,
                "fresh_views": v.train.data.fresh_views,
                "bytes_per_view": bytes_per_view.get(v.tokenizer, float("nan")),
                "train_seconds": statistics.fmean(r.train_seconds for r in mine),
                "linear_top1": top1,
                "linear_top1_std": std,
                "knn_top1": knn,
                "knn_top1_std": knn_std,
                "best_layer": [r.best_layer for r in mine],
                "seeds": len(mine),
                "loss_vs_blind": _mean_std([r.final_loss / r.blind_loss for r in mine if r.blind_loss])[0],
                "report_correct": _per_sample(mine),
                "knn_correct": _per_sample(mine, "knn_correct"),
                "varies": list(v.varies),
                "target_norm": v.train.target_norm,
                "probe": probe_protocol(v.train.objective),
            }
        )
    f1, fstd = _mean_std([r.linear_top1 for r in floors])
    fk, fkstd = _mean_std([r.knn_top1 for r in floors if r.knn_top1 is not None])
    rows.append(
        {
            "variant": "random-init (floor)",
            "teacher": "-",
            "objective": "-",
            "order": "-",
            "storage": "-",
            "decoder_depth": "-",
            "bytes_per_view": 0.0,
            "train_seconds": 0.0,
            "linear_top1": f1,
            "linear_top1_std": fstd,
            "knn_top1": fk,
            "knn_top1_std": fkstd,
            "best_layer": [r.best_layer for r in floors],
            "seeds": len(floors),
            "loss_vs_blind": float("nan"),
            "report_correct": _per_sample(floors),
            "knn_correct": _per_sample(floors, "knn_correct"),
        }
    )
    return {
        "config": asdict(cfg),
        "rows": rows,
        "runs": [asdict(r) for r in records + floors],
        "chance": 1.0 / num_classes,
        "seconds": seconds,
    }


def format_table(results: dict) -> str:
    head = (
        "| variant | teacher | objective | order | storage | bytes/view | train s | loss / blind | linear top-1 "
        "| k-NN top-1 |\n|---|---|---|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in results["rows"]:
        pm = f" ± {r['linear_top1_std']:.3f}" if r["seeds"] > 1 else ""
        kpm = f" ± {r['knn_top1_std']:.3f}" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['variant']} | {r['teacher']} | {r['objective']} | {r['order']} | {r['storage']} | "
            f"{r['bytes_per_view']:.0f} | {r['train_seconds']:.0f} | {_fmt(r.get('loss_vs_blind'))} | "
            f"{r['linear_top1']:.3f}{pm} | "
            f"{r['knn_top1']:.3f}{kpm} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def probe_protocol(objective: str) -> str:
    """How the probe reads a student of ``objective`` (``pipelines/probe.py``): rows read differently are
    not compared as if they were read alike."""
    if objective == "digit":
        return "code GPT, causal mask, mean over positions (DiGIT's probe)"
    return "ViT, no attention mask, mean of patch tokens, best layer"


def _protocol_lines(results: dict) -> list[str]:
    """What every row shares and what each varies: the report's statement that the comparison is clean."""
    trained = [r for r in results["rows"] if r["variant"] != "random-init (floor)" and "varies" in r]
    if not trained:
        return []
    norms = sorted({r["target_norm"] for r in trained})
    probes = sorted({r["probe"] for r in trained})
    varied = sorted({a for r in trained for a in r["varies"]})
    lines = [
        f"Every row shares the budget, the student, the target normalisation (`{'`, `'.join(norms)}`) and the probe"
        f" ({'; '.join(probes)}); rows differ from the recipe's base only in: {', '.join(varied) or 'nothing'}.",
        "",
    ]
    if len(probes) > 1 or len(norms) > 1:
        lines[0] = (
            f"NOTE: rows differ in target normalisation ({', '.join(norms)}) or probe ({'; '.join(probes)}): "
            "compare them with that in mind."
        )
    return lines


def _per_sample(records: list[RunRecord], attr: str = "report_correct") -> dict[str, list[int]] | None:
    """Each seed's per-report-sample correctness (``{seed: [0/1, ...]}``; None unless every run recorded
    it). Kept per seed: the probe's splits are seeded, so two seeds score different report samples."""
    if not records or any(getattr(r, attr) is None for r in records):
        return None
    return {str(r.seed): list(getattr(r, attr)) for r in records}


# What a row records besides its teacher; two rows equal in all of these differ only in the targets.
_NOT_TEACHER = ("objective", "order", "storage", "decoder_depth", "max_views", "fresh_views", "target_norm", "probe")
_DERIVED = ("pixel:", "kmeans:", "pca:")


def teacher_pair(rows: list[dict]) -> tuple[dict, dict] | None:
    """The (semantic teacher, pixel) rows to compare targets by: equal in everything but the teacher, so the
    gap is the tokenizer's alone (the best semantic row against the best pixel row would set, say, feature
    distillation against D-iGPT on pixels). Among such pairs the semantic row that varies least from its
    recipe's base (the base itself, where it has a pixel twin). None when no pair differs only in the teacher."""
    pixel = [r for r in rows if r["teacher"].startswith("pixel:")]
    semantic = [r for r in rows if r["teacher"] != "-" and not r["teacher"].startswith(_DERIVED)]
    pairs = [(s, p) for s in semantic for p in pixel if all(s.get(k) == p.get(k) for k in _NOT_TEACHER)]
    return min(pairs, key=lambda sp: len(sp[0].get("varies") or [])) if pairs else None


def findings(results: dict) -> list[str]:
    """Plain statements the numbers support (or contradict), for the report."""
    rows = {r["variant"]: r for r in results["rows"]}
    floor = rows["random-init (floor)"]["linear_top1"]
    out = [f"Chance is {results['chance']:.3f}; the random-init floor reaches {floor:.3f}."]
    best = max((r for r in results["rows"] if r["variant"] != "random-init (floor)"), key=lambda r: r["linear_top1"])
    out.append(f"Best variant: {best['variant']} at {best['linear_top1']:.3f} linear top-1.")
    pair = teacher_pair(results["rows"])
    n = results.get("n_report")
    if pair:
        sr, pr = pair
        p, s = pr["linear_top1"], sr["linear_top1"]
        names = f"`{sr['variant']}` vs `{pr['variant']}`, which differ only in the teacher"
        m = margin(sr, pr, n)
        if m is not None and abs(s - p) <= m:
            out.append(
                f"Semantic vs pixel targets ({names}): {s:.3f} vs {p:.3f}, a difference within noise (±{m:.3f}: "
                f"two standard errors{_how(sr, pr, n)}); this run does not separate them."
            )
        else:
            verdict = "beat" if s > p else "did NOT beat"
            beyond = f"; beyond noise, two standard errors ±{m:.3f}{_how(sr, pr, n)}" if m is not None else ""
            out.append(f"Semantic teacher targets {verdict} pixel targets ({s:.3f} vs {p:.3f}{beyond}; {names}).")
    out += _teacher_findings(results, rows["random-init (floor)"], n)
    trained = [r for r in results["rows"] if r["variant"] != "random-init (floor)"]
    blindish = [r["variant"] for r in trained if (x := r.get("loss_vs_blind")) is not None and x == x and x > 0.97]
    if blindish:
        out.append(
            f"Final loss within 3% of the input-blind baseline (per-position mean target): "
            f"{', '.join(blindish)} — the loss fell, but almost nothing of that needed the image."
        )
    frow = rows["random-init (floor)"]
    near = [
        r["variant"]
        for r in trained
        if r["linear_top1"] > floor and (m := margin(r, frow, n)) is not None and r["linear_top1"] - floor <= m
    ]
    if near:
        out.append(f"Above the floor only within noise: {', '.join(near)}.")
    clear = [
        f"{r['variant']} (+{r['linear_top1'] - floor:.3f}, ±{m:.3f})"
        for r in trained
        if (m := margin(r, frow, n)) is not None and r["linear_top1"] - floor > m
    ]
    if clear:
        how = _how(trained[0], frow, n)
        out.append(f"Above the floor beyond noise (gap, two standard errors{how}): {', '.join(clear)}.")
    out += _knn_findings(trained, frow, pair)
    worse = [
        f"{r['variant']} ({r['linear_top1'] - floor:+.3f}, ±{m:.3f})"
        for r in trained
        if (m := margin(r, frow, n)) is not None and floor - r["linear_top1"] > m
    ]
    if worse:
        out.append(
            f"BELOW the random-init floor beyond noise: {', '.join(worse)} — pretraining on these targets left "
            "features that carry less of this label than an untrained network's at this budget; whether "
            "more steps lift them is not measured here (on Fashion-MNIST 4x the steps left the base row below "
            "the floor: LEARNING.md §15)."
        )
    below = [
        r["variant"]
        for r in trained
        if r["linear_top1"] <= floor and not any(w.startswith(r["variant"] + " (") for w in worse)
    ]
    if below:
        out.append(f"At or below the random-init floor (by less than its error bar): {', '.join(below)}.")
    return out


def _teacher_findings(results: dict, frow: dict, n: int | None) -> list[str]:
    """What the teachers' own features say, against the floor on the same probe set: a teacher that does not
    beat a random network here cannot be expected to teach a student this label (nothing else measured
    here says a longer schedule would help)."""
    out = []
    ceilings = results.get("ceilings", {})
    for name, c in ceilings.items():
        row = {"linear_top1": c["linear_top1"], "report_correct": c.get("report_correct")}
        # One teacher stored two ways (fp16 and int8) is two ceilings: name the storage, or the lines read alike.
        twin = sum(x["teacher"] == c["teacher"] for x in ceilings.values()) > 1
        who = f"{c['teacher']} ({c['storage']})" if twin else c["teacher"]
        if not c.get("same_probe_set", False):
            out.append(
                f"{c['teacher']} ({name}): its own features reach {c['linear_top1']:.3f} linear top-1 on a held-out "
                "quarter of the pretraining images (it is fitted to them, so it is not run on the probe set): "
                "not comparable with the students' probe."
            )
            continue
        gap, m = c["linear_top1"] - frow["linear_top1"], margin(row, frow, n)
        bar = f"{gap:+.3f} ± {m:.3f}{_how(row, frow, n)}" if m is not None else f"{gap:+.3f}"
        if c["teacher"].startswith("pixel:"):
            # Each token is its patch normalised to zero mean and unit variance (MAE's norm-pix): their mean
            # pool is near zero for every image, so its probe says nothing about what the targets carry.
            out.append(
                f"{c['teacher']}: its pooled tokens reach {c['linear_top1']:.3f} ({bar} over the floor), which is "
                "no ceiling: per-patch normalised pixels pool to about zero whatever the image. The floor is the "
                "pixel students' baseline."
            )
        elif m is not None and gap <= m:
            out.append(
                f"TEACHER AT THE FLOOR: {who}'s own pooled features reach {c['linear_top1']:.3f} on the "
                f"students' probe set, not above the random-init floor beyond noise ({bar}). This teacher, at "
                "this input resolution, carries no more of this label than a random network does: students "
                "trained on its targets are not expected to beat the floor here. Try another teacher or "
                "resolution before a longer schedule."
            )
        else:
            best = max(
                (
                    r["linear_top1"]
                    for r in results["rows"]
                    if r["teacher"] == c["teacher"] and r.get("storage", c["storage"]) == c["storage"]
                ),
                default=float("nan"),
            )
            out.append(
                f"{who}'s own pooled features reach {c['linear_top1']:.3f} on the students' probe set "
                f"({bar} over the floor); its best student {best:.3f}. The gap is what the students have not "
                "learned of their targets at this budget; whether more steps close it is not measured here."
            )
    return out


def _knn_findings(trained: list[dict], frow: dict, pair: tuple[dict, dict] | None) -> list[str]:
    """The second probe's view of the same comparisons (k-NN on the same report samples, paired bars):
    where the linear probe and k-NN agree, a ranking is firmer than either alone."""

    def gap(a: dict, b: dict) -> str | None:
        m = paired_margin(a.get("knn_correct"), b.get("knn_correct"))
        if m is None:
            return None
        d = a["knn_top1"] - b["knn_top1"]
        return f"{d:+.3f} ± {m:.3f}, {'beyond' if abs(d) > m else 'within'} noise"

    parts = [f"{r['variant']} {g}" for r in trained if (g := gap(r, frow))]
    if not parts:
        return []
    out = [f"k-NN, gap to the floor on the same report samples (paired two standard errors): {'; '.join(parts)}."]
    if pair and (g := gap(*pair)):
        out.append(f"k-NN, semantic minus pixel targets (`{pair[0]['variant']}` − `{pair[1]['variant']}`): {g}.")
    return out


def comparison_sections(results: dict) -> list[str]:
    """One table per comparison of the ``all`` recipe: each row's linear and k-NN top-1 and its gap to the
    base row (``digpt``) with the paired two-standard-error bar, marked beyond or within noise, beside the
    paper's direction."""
    comps = results.get("comparisons")
    if not comps:
        return []
    rows = {r["variant"]: r for r in results["rows"]}
    base, n = rows.get("digpt"), results.get("n_report")
    out = ["## The paper's comparisons", ""]
    for title, c in comps.items():
        out += [f"### {title}", "", f"Paper: {c['paper']}.", ""]
        out += [
            "| row | varies | linear top-1 | gap to `digpt` | k-NN top-1 | k-NN gap |",
            "|---|---|---:|---|---:|---|",
        ]
        for name in c["rows"]:
            r = rows[name]
            gap = knn_gap = "—"
            if base is not None and r is not base:
                d, m = r["linear_top1"] - base["linear_top1"], margin(r, base, n)
                gap = f"{d:+.3f}" + (
                    f" ± {m:.3f}, {'beyond' if abs(d) > m else 'within'} noise" if m is not None else ""
                )
                km = paired_margin(r.get("knn_correct"), base.get("knn_correct"))
                if r.get("knn_top1") is not None and base.get("knn_top1") is not None:
                    kd = r["knn_top1"] - base["knn_top1"]
                    knn_gap = f"{kd:+.3f}" + (
                        f" ± {km:.3f}, {'beyond' if abs(kd) > km else 'within'} noise" if km is not None else ""
                    )
            varies = ", ".join(r.get("varies") or []) or "the base"
            knn = f"{r['knn_top1']:.3f}" if r.get("knn_top1") is not None else "—"
            out.append(f"| {name} | {varies} | {r['linear_top1']:.3f} | {gap} | {knn} | {knn_gap} |")
        out.append("")
    return out


def _ceiling_table(results: dict) -> list[str]:
    ceil = results.get("ceilings", {})
    if not ceil:
        return []
    lines = [
        "Teacher features (the targets' own pooled features, one whole-image view per probe image, the "
        "students' linear protocol and split; a fitted tokenizer — k-means, PCA — on a held-out quarter of the "
        "pretraining images instead):",
        "",
        "| tokenizer | teacher | storage | probed on | linear top-1 |",
        "|---|---|---|---|---:|",
    ]
    for k, c in ceil.items():
        where = "the students' probe set" if c.get("same_probe_set") else "pretraining images"
        lines.append(f"| {k} | {c['teacher']} | {c['storage']} | {where} | {c['linear_top1']:.3f} |")
    return lines + [""]


def _probe_data_line(results: dict) -> list[str]:
    pd, n = results.get("probe_data"), results.get("n_report")
    if not pd:
        return []
    where = (
        f"{pd['samples']} labelled images held out from pretraining (`{pd['shards']}`)"
        if pd["held_out"]
        else f"a held-out quarter of the pretraining set (`{pd['shards']}`)"
    )
    return [f"Probes fit and report on {where}: {n} report samples.", ""]


def _reused_line(results: dict) -> list[str]:
    reused = [r for r in results["runs"] if r.get("reused")]
    if not reused:
        return []
    names = ", ".join(f"`{r['variant']}` seed {r['seed']}" for r in reused)
    return [
        f"{len(reused)} of {len(results['runs']) - results['config']['seeds']} training runs were finished by an "
        f"earlier ablation in this directory with the same config and cache, and read back, not retrained "
        f"({names}); the total time above does not include their training.",
        "",
    ]


def write_report(cfg: AblateConfig, results: dict) -> None:
    from . import plots

    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    figs = plots.write_plots(results, cfg.out)
    c = results["config"]
    md = [
        f"# Ablation `{cfg.recipe}`",
        "",
        f"Student `{c['student']}`, {c['steps']} steps x batch {c['batch_size']}, {c['seeds']} seed(s); "
        f"linear probe (best layer, selected without the report split) and k-NN; total {results['seconds']:.0f}s.",
        "",
        *_reused_line(results),
        *_probe_data_line(results),
        *_protocol_lines(results),
        format_table(results),
        "",
        *_ceiling_table(results),
        *comparison_sections(results),
        "## Findings",
        "",
        *[f"- {x}" for x in findings(results)],
        "",
        "## Plots",
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figs],
        "",
    ]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(format_table(results))
    print("\n".join(_ceiling_table(results)))
    print("\n".join(findings(results)))
    print(f"report: {os.path.join(cfg.out, 'report.md')}")
