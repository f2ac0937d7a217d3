"""Error bars of the ablation's comparisons: paired on the same report samples where the per-sample
correctness is there (LEARNING.md §6), binomial otherwise."""

from __future__ import annotations

import statistics


def paired_margin(a: dict[str, list[int]] | None, b: dict[str, list[int]] | None) -> float | None:
    """Two standard errors of the difference of two variants' accuracies, paired on the *same* report samples
    (seed by seed: runs of one seed are probed on one split). Within a seed the standard error is
    ``sd(a_i - b_i) / sqrt(n)`` over samples ``i`` — the binomial one (:func:`noise_margin`) treats the
    two probes as independent samples, which they are not. Over several seeds: the larger of the pooled
    per-sample error of the mean difference and the spread of the per-seed differences (run-to-run noise);
    one seed cannot show the latter. None when either side lacks the vectors."""
    if not a or not b:
        return None
    per = []
    for seed in sorted(set(a) & set(b)):
        va, vb = a[seed], b[seed]
        if len(va) != len(vb) or len(va) < 2:
            return None
        d = [x - y for x, y in zip(va, vb)]
        per.append((statistics.fmean(d), statistics.variance(d) / len(d)))
    if not per:
        return None
    se = sum(v for _, v in per) ** 0.5 / len(per)
    if len(per) > 1:
        se = max(se, statistics.stdev(m for m, _ in per) / len(per) ** 0.5)
    return 2 * se


def margin(a: dict, b: dict, n: int | None) -> float | None:
    """The error bar of ``a``'s top-1 minus ``b``'s (two result rows): paired when both rows carry their
    per-sample correctness, else binomial on ``n`` samples."""
    paired = paired_margin(a.get("report_correct"), b.get("report_correct"))
    return paired if paired is not None else noise_margin(a["linear_top1"], b["linear_top1"], n)


def noise_margin(a: float, b: float, n: int | None) -> float | None:
    """Two standard errors of the difference of two accuracies, each on ``n`` samples (binomial,
    at their mean): a gap smaller than this is not evidence of a difference. None without ``n``."""
    if not n:
        return None
    p = min(max((a + b) / 2, 1.0 / n), 1 - 1.0 / n)
    return 2 * (2 * p * (1 - p) / n) ** 0.5


def how(a: dict, b: dict, n: int | None) -> str:
    """Which bar :func:`margin` gave: paired only where the vectors pair up (same seeds, same length)."""
    paired = paired_margin(a.get("report_correct"), b.get("report_correct")) is not None
    return f", paired over the same {n} report samples" if paired else f" on {n} report samples, binomial"
