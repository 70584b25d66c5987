"""Minimum detectable effect of a paired contrast, and when a null result is underpowered.

A CI that includes zero says "not shown", not "no difference": with 46 clusters a study may be
unable to see an effect the reader cares about. The MDE says how large a true effect this
design would detect with the stated power; `underpowered` flags the null results it could not
have resolved. Normal quantiles (`statistics.NormalDist`, stdlib): at 46 clusters the t
quantiles would make the MDE 2.2% larger (t_{0.975,45} + t_{0.8,45} = 2.864 vs 2.802).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from qa_lab.stats import _Units


def _check(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    if not 0 < power < 1:
        raise ValueError(f"power={power} must be in (0, 1)")


def mde_from_se(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """MDE = (z_{1-alpha/2} + z_{power}) * se, from an estimate's standard error.

    The true effect that a two-sided level-alpha test on an estimate with standard error `se`
    rejects with probability `power` (normal approximation, the far tail ignored). Pass the
    two-level bootstrap's `Contrast.se` to include training-seed noise.
    """
    _check(alpha, power)
    z = NormalDist()
    return float((z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se)


def mde(
    differences: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """MDE of a paired contrast from its observed per-item differences (b - a).

    MDE = (z_{1-alpha/2} + z_{power}) * sd(cluster mean differences) / sqrt(n_clusters), the
    normal approximation to a paired test on cluster means (sd with ddof=1; NaN items dropped;
    items without a cluster count as their own). At alpha 0.05 and power 0.8 the factor is
    1.960 + 0.842 = 2.802. NaN with fewer than two clusters.
    """
    _check(alpha, power)
    d = np.asarray(differences, dtype=float).ravel()
    keep = np.isfinite(d)
    if clusters is not None:
        labels = list(clusters)
        if len(labels) != len(d):
            raise ValueError(f"clusters has {len(labels)} labels for {len(d)} differences")
        clusters = [c for c, k in zip(labels, keep) if k]
    units = _Units(int(keep.sum()), clusters)
    if units.k < 2:
        return float("nan")
    sums, counts = units.sums(d[keep])
    sd = float(np.std(sums / counts, ddof=1))
    return mde_from_se(sd / np.sqrt(units.k), alpha=alpha, power=power)


def underpowered(ci_low: float, ci_high: float, mde: float, min_effect: float) -> bool:
    """A null result this design could not resolve: the CI includes 0 and MDE > min_effect.

    `min_effect` is the smallest effect of interest (`report.min_effect`, per metric); a CI
    that excludes 0 is a detection and never underpowered.
    """
    return bool(ci_low <= 0.0 <= ci_high and mde > min_effect)
