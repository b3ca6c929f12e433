"""Summaries of result rows: ROC-AUC between two prompt sets, per-layer means, the table ``analyze`` prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..errors import InputError
from ..io.results import ResultRow


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the ROC-AUC."""
    if not positive or not negative:
        raise InputError("ROC-AUC needs at least one prompt in each set.")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def mean_per_layer(rows: Sequence[ResultRow], name: str) -> list[float]:
    """The mean over ``rows`` of a per-layer field (``ptc_l1``, ``ftc_l1``, ``cumulative_tuco``), layer by layer."""
    return [statistics.fmean(values) for values in zip(*(getattr(row, name) for row in rows))]


def summary_table(rows: Sequence[ResultRow]) -> str:
    """Count, mean and median TuCo, then the mean per-layer norms and cumulative TuCo."""
    values = [row.tuco for row in rows]
    lines = [
        f"prompts: {len(values)}   TuCo mean {statistics.fmean(values):.4f}   median {statistics.median(values):.4f}"
    ]
    lines.append(f"{'layer':>5}  {'mean |PTC|_1':>13}  {'mean |FTC|_1':>13}  {'cumulative TuCo':>15}")
    columns = (mean_per_layer(rows, field) for field in ("ptc_l1", "ftc_l1", "cumulative_tuco"))
    for layer, (ptc, ftc, share) in enumerate(zip(*columns)):
        lines.append(f"{layer:>5}  {ptc:>13.4f}  {ftc:>13.4f}  {share:>15.4f}")
    return "\n".join(lines)
