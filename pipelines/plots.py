"""PNG plots for ablation reports: accuracy per variant (error bars over seeds), accuracy against
bytes per view (the storage trade-off), and training loss curves."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(results: dict, out: str) -> list[str]:
    paths = [
        _accuracy(results, out),
        _storage(results, out),
        _views(results, out),
        _losses(results, out),
        _vs_blind(results, out),
    ]
    return [p for p in paths if p]


def _accuracy(results: dict, out: str) -> str:
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 3.6))
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    ax.bar(
        [i - 0.2 for i in x],
        [r["linear_top1"] for r in rows],
        0.4,
        yerr=[r["linear_top1_std"] for r in rows],
        capsize=3,
        label="linear (best layer)",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [r["knn_top1"] for r in rows],
        0.4,
        yerr=[r["knn_top1_std"] for r in rows],
        capsize=3,
        label="k-NN",
    )
    ax.axhline(results["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("top-1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"probe accuracy — {results['config']['recipe']}")
    return _save(fig, out, "accuracy.png")


def _storage(results: dict, out: str) -> str | None:
    rows = [r for r in results["rows"] if r["bytes_per_view"] > 0]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for r in rows:
        ax.errorbar(r["bytes_per_view"], r["linear_top1"], yerr=r["linear_top1_std"], fmt="o", capsize=3)
        ax.annotate(
            r["variant"], (r["bytes_per_view"], r["linear_top1"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per view (compressed)")
    ax.set_ylabel("linear top-1")
    ax.set_title("accuracy vs storage")
    return _save(fig, out, "storage.png")


def _two_se(r: dict, n: int | None) -> float:
    """Two standard errors of one row's top-1: report-sample noise (binomial on ``n``), and the seeds' spread."""
    p = r["linear_top1"]
    sample = (p * (1 - p) / n) ** 0.5 if n else 0.0
    seeds = r["linear_top1_std"] / max(1, r.get("seeds", 1)) ** 0.5
    return 2 * (sample**2 + seeds**2) ** 0.5


def _views(results: dict, out: str) -> str | None:
    """Linear top-1 against the number of stored views trained on, the online teacher on fresh views as a
    band: how many views a cache should store (the ``views`` recipe)."""
    rows = [r for r in results["rows"] if r.get("max_views")]
    fresh = [r for r in results["rows"] if r.get("fresh_views")]
    if len(rows) < 2:
        return None
    n = results.get("n_report")
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    rows.sort(key=lambda r: r["max_views"])
    ax.errorbar(
        [r["max_views"] for r in rows],
        [r["linear_top1"] for r in rows],
        yerr=[_two_se(r, n) for r in rows],
        fmt="o-",
        capsize=3,
        label="cached targets, first K stored views",
    )
    for r in fresh:
        lo, hi = r["linear_top1"] - _two_se(r, n), r["linear_top1"] + _two_se(r, n)
        ax.axhspan(lo, hi, color="tab:orange", alpha=0.2)
        ax.axhline(r["linear_top1"], color="tab:orange", label="online teacher, a fresh view each epoch")
    floor = next((r for r in results["rows"] if r["variant"] == "random-init (floor)"), None)
    if floor:
        ax.axhline(floor["linear_top1"], color="grey", ls="--", lw=1, label="random-init floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["max_views"] for r in rows], [str(r["max_views"]) for r in rows])
    ax.set_xlabel("views per sample in the cache (K)")
    ax.set_ylabel("linear top-1 (± 2 SE)")
    ax.legend(fontsize=7)
    ax.set_title("how many views to store")
    return _save(fig, out, "views.png")


def _losses(results: dict, out: str) -> str | None:
    runs = [r for r in results["runs"] if r["losses"]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in runs:
        steps = r.get("loss_steps") or []
        x = (
            steps if len(steps) == len(r["losses"]) else range(1, len(r["losses"]) + 1)
        )  # reports from before steps were kept
        ax.plot(x, r["losses"], label=f"{r['variant']} s{r['seed']}", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    ax.set_title("training loss")
    return _save(fig, out, "losses.png")


def _vs_blind(results: dict, out: str) -> str | None:
    """Each run's loss divided by its input-blind baseline: below 1 is what needed the image."""
    runs = [r for r in results["runs"] if r["losses"] and r.get("blind_loss")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in runs:
        steps = r.get("loss_steps") or list(range(1, len(r["losses"]) + 1))
        ax.plot(steps, [x / r["blind_loss"] for x in r["losses"]], label=f"{r['variant']} s{r['seed']}", lw=1)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="input-blind baseline")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss / blind baseline")
    ax.legend(fontsize=7)
    ax.set_title("training loss relative to the per-position mean")
    return _save(fig, out, "loss_vs_blind.png")


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
