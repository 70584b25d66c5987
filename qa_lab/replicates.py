"""Two-level bootstrap for training-seed replicates: item clusters and training seeds.

One LoRA run is one draw: fine-tuning outcomes move with the seed, so a CI over items alone
leaves the training noise out. A cell's per-item scores come as an array of shape
(seeds, items), row s scored by the adapter trained with seed s; a config without replicates
is (1, items). Each resample draws item clusters (the draws of `stats.bootstrap_ci` with the
same seed) and, independently per resample, each replicated cell's seeds with replacement; the
cell's per-item score in that resample is the mean over its drawn seeds. Every contrast of one
call shares the same resamples, as in `stats.effects_2x2`.

Items and seeds are crossed (every seed scores every item), for which no bootstrap is exact
(McCullagh 2000): resampling both levels counts the seed-by-item noise twice (wider), while
resampling S seeds shrinks their variance by (S - 1) / S (narrower). Measured coverage of
the true effect by the 95% CI of a paired contrast (30 clusters x 2 items, seed-by-item noise
sd 0.1, 200 studies x 500 resamples), 3 seeds with seed sd 0 / 0.02 / 0.025 / 0.04: two-level
0.985 / 0.955 / 0.915-0.95 / 0.87, item-only 0.96 / 0.865 / 0.795-0.83 / 0.70 (5 seeds at
0.04: 0.905). Conservative when seeds agree, short when 3 seeds carry most of the noise.

With one seed per cell the CI, p-value and dz equal `stats.bootstrap_ci`, `stats.paired_test`
and `stats.effects_2x2` whenever the draws fit in one chunk (resamples x clusters <= `_MAX_CELLS`).

Items with a non-finite score in any seed of any cell are dropped, with their cluster label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qa_lab.stats import (
    CI,
    EFFECT_WEIGHTS,
    _check,
    _interval,
    _sign_matrix,
    _Units,
    cohen_dz,
    sign_flip_p,
)

# Resamples x clusters per chunk of cluster counts: 2**20 float64 = 8 MiB per array; a chunk
# holds about four such arrays (draws, offsets, counts, products), so ~32 MiB at most.
_MAX_CELLS = 2**20


@dataclass(frozen=True)
class Contrast:
    """A linear contrast of cells (e.g. mean(b - a)) with its two-level bootstrap interval.

    `se` is the sd of the bootstrap distribution (for `power.mde_from_se`). `p_value` is the
    sign-flip p of `stats.paired_test` when no cell has replicates ("sign_flip"), else the
    two-sided bootstrap p from inverting the percentile interval ("bootstrap").
    """

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    p_value: float
    p_method: str
    effect_size: float  # Cohen's dz of per-cluster mean differences (seed-averaged items)
    n: int
    n_clusters: int
    n_seeds: tuple[int, ...]  # seeds per cell in the contrast
    method: str  # "two_level_bootstrap" | "cluster_bootstrap" | "bootstrap"
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logging and the report (JSON types: `n_seeds` a list)."""
        return {**asdict(self), "n_seeds": list(self.n_seeds)}


@dataclass(frozen=True)
class Effects2x2:
    """RAG and fine-tuning main effects and their interaction, on shared resamples."""

    means: dict[str, float]  # cell means over items and seeds
    rag: Contrast
    ft: Contrast
    interaction: Contrast


@dataclass(frozen=True)
class SeedSpread:
    """Per-seed mean scores of a cell and their sd (ddof=1; NaN with one seed)."""

    means: tuple[float, ...]
    sd: float


class _Boot:
    """Shared resamples of several cells: point means and bootstrap means per cell."""

    def __init__(
        self,
        cells: Sequence[Any],
        groups: Sequence[int],
        clusters: Sequence[Any] | np.ndarray | None,
        resamples: int,
        seed: int,
    ) -> None:
        self.cells, clusters = _prepare(cells, clusters)
        n = self.cells[0].shape[1]
        self.units = _Units(n, clusters)
        self.n_seeds = tuple(c.shape[0] for c in self.cells)
        for g in set(groups):
            sizes = {self.n_seeds[i] for i, gi in enumerate(groups) if gi == g}
            if len(sizes) > 1:
                raise ValueError(f"cells sharing seed draws have different seed counts {sizes}")
        self.replicated = any(s > 1 for s in self.n_seeds)
        self.resamples = resamples
        self.point = np.array([c.mean() for c in self.cells])
        if n == 0:
            self.boot = np.full((len(self.cells), resamples), np.nan)
            return
        rng = np.random.default_rng(seed)
        seed_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        self.boot = _resample(self.cells, groups, self.units, resamples, rng, seed_rng)
        if not self.replicated:  # after the cluster draws, as in stats.paired_test
            self.signs, self.exact = _sign_matrix(self.units.k, resamples, rng)

    @property
    def method(self) -> str:
        return "two_level_bootstrap" if self.replicated else self.units.method

    def contrast(self, coef: Sequence[float], confidence: float) -> Contrast:
        """The contrast sum_c coef[c] * cell[c] on the shared resamples."""
        w = np.asarray(coef, dtype=float)
        used = tuple(s for s, c in zip(self.n_seeds, w) if c != 0)
        n, k = self.cells[0].shape[1], self.units.n_clusters
        if n == 0:
            nan = float("nan")
            return Contrast(nan, nan, nan, nan, nan, "none", nan, 0, 0, used, self.method, 0)
        d = sum(c * x.mean(axis=0) for c, x in zip(w, self.cells))  # seed-averaged per item
        sums, counts = self.units.sums(np.asarray(d, dtype=float))
        estimate = float(sums.sum() / counts.sum())
        boot = w @ self.boot
        low, high = _interval(boot, confidence)
        if self.replicated:
            p, p_method = _inversion_p(boot, self.resamples), "bootstrap"
        else:
            p, p_method = sign_flip_p(sums, counts, estimate, self.signs, self.exact), "sign_flip"
        return Contrast(
            estimate=estimate,
            ci_low=low,
            ci_high=high,
            se=float(np.std(boot, ddof=1)) if len(boot) > 1 else 0.0,
            p_value=p,
            p_method=p_method,
            effect_size=cohen_dz(sums, counts, estimate),
            n=n,
            n_clusters=k,
            n_seeds=used,
            method=self.method,
            resamples=self.resamples,
        )


def _prepare(cells: Sequence[Any], clusters: Any) -> tuple[list[np.ndarray], Any]:
    """(seeds, items) float arrays, items non-finite anywhere dropped, clusters to match."""
    arrays = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    if any(a.ndim != 2 for a in arrays):
        raise ValueError("cell scores must have shape (seeds, items)")
    n = arrays[0].shape[1]
    if any(a.shape[1] != n for a in arrays):
        raise ValueError(f"cells differ in item count: {[a.shape[1] for a in arrays]}")
    if any(a.shape[0] == 0 for a in arrays):
        raise ValueError("a cell has no seed rows")
    keep = np.logical_and.reduce([np.isfinite(a).all(axis=0) for a in arrays])
    if clusters is not None:
        labels = list(clusters)
        if len(labels) != n:
            raise ValueError(f"clusters has {len(labels)} labels for {n} items")
        clusters = [c for c, k in zip(labels, keep) if k]
    return [a[:, keep] for a in arrays], clusters


def _unit_sums(x: np.ndarray, units: _Units) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums (seeds, units) of a (seeds, items) array, and item counts per unit."""
    if units.groups is None:
        return x, np.ones(x.shape[1])
    unit_of = np.empty(x.shape[1], dtype=int)
    for j, members in enumerate(units.groups):
        unit_of[members] = j
    sums = np.zeros((units.k, x.shape[0]))
    np.add.at(sums, unit_of, x.T)
    return sums.T, np.bincount(unit_of, minlength=units.k).astype(float)


def _counts(draws: np.ndarray, k: int) -> np.ndarray:
    """How often each of k units is drawn in each row of `draws` (rows, k) -> (rows, k)."""
    rows = draws.shape[0]
    flat = (draws + k * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * k).reshape(rows, k).astype(float)


def _resample(
    cells: list[np.ndarray],
    groups: Sequence[int],
    units: _Units,
    resamples: int,
    rng: np.random.Generator,
    seed_rng: np.random.Generator,
) -> np.ndarray:
    """Bootstrap means (cells, resamples): cluster draws shared, seed draws per group.

    The mean is linear, so a resample's cell mean is (C @ U.T) . W / (C @ sizes), with C the
    cluster counts, U the per-cluster sums per seed and W the seed weights (draw counts / S);
    no (resamples, items) array is ever built.
    """
    k = units.k
    sums = [_unit_sums(x, units) for x in cells]
    sizes = sums[0][1]
    rows = max(1, _MAX_CELLS // k)
    out = np.empty((len(cells), resamples))
    for start in range(0, resamples, rows):
        m = min(rows, resamples - start)
        c = _counts(rng.integers(0, k, size=(m, k)), k)
        den = c @ sizes
        weights: dict[int, np.ndarray] = {}
        for i, (x, (u, _)) in enumerate(zip(cells, sums)):
            s = x.shape[0]
            if s == 1:
                out[i, start : start + m] = (c @ u[0]) / den
                continue
            if groups[i] not in weights:
                weights[groups[i]] = _counts(seed_rng.integers(0, s, size=(m, s)), s) / s
            out[i, start : start + m] = ((c @ u.T) * weights[groups[i]]).sum(axis=1) / den
    return out


def _inversion_p(boot: np.ndarray, resamples: int) -> float:
    """Two-sided bootstrap p of H0 effect = 0: twice the smaller tail of the draws at 0."""
    tail = min(np.count_nonzero(boot <= 0), np.count_nonzero(boot >= 0))
    return float(min(1.0, 2 * (tail + 1) / (resamples + 1)))


def replicate_ci(
    scores: Sequence[Any] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """CI of a cell's mean score over items and seeds; `scores` is (seeds, items).

    With one seed row it equals `stats.bootstrap_ci(scores[0], ...)`.
    """
    _check(resamples, confidence)
    b = _Boot([scores], [0], clusters, resamples, seed)
    n = b.cells[0].shape[1]
    if n == 0:
        return CI(np.nan, np.nan, np.nan, 0, 0, b.method, resamples)
    low, high = _interval(b.boot[0], confidence)
    return CI(float(b.point[0]), low, high, n, b.units.n_clusters, b.method, resamples)


def paired_replicates(
    a: Sequence[Any] | np.ndarray,
    b: Sequence[Any] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    shared_seeds: bool = False,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Contrast:
    """mean(b - a) over items and seeds, either side (seeds, items) or (1, items).

    `shared_seeds`: row s of a and b came from the same adapter (e.g. lora and rag_lora), so
    one seed draw serves both and the seed effect cancels in the difference; otherwise each
    side's seeds are drawn independently.
    """
    _check(resamples, confidence)
    groups = [0, 0] if shared_seeds else [0, 1]
    return _Boot([a, b], groups, clusters, resamples, seed).contrast([-1.0, 1.0], confidence)


def effects_2x2_replicates(
    vanilla: Sequence[Any] | np.ndarray,
    rag: Sequence[Any] | np.ndarray,
    lora: Sequence[Any] | np.ndarray,
    rag_lora: Sequence[Any] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    shared_seeds: bool = False,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Effects2x2:
    """`stats.effects_2x2` with seed replicates in any cell, all on the same resamples.

    `shared_seeds`: lora and rag_lora rows come from the same adapters (the default study:
    RAG only changes the prompt), so their seeds are drawn together.
    """
    _check(resamples, confidence)
    groups = [0, 1, 2, 2] if shared_seeds else [0, 1, 2, 3]
    b = _Boot([vanilla, rag, lora, rag_lora], groups, clusters, resamples, seed)
    names = ("vanilla", "rag", "lora", "rag_lora")
    contrasts = {name: b.contrast(list(w), confidence) for name, w in EFFECT_WEIGHTS.items()}
    return Effects2x2(means={name: float(m) for name, m in zip(names, b.point)}, **contrasts)


def seed_spread(scores: Sequence[Any] | np.ndarray) -> SeedSpread:
    """Each seed's mean score (items finite in every seed) and the between-seed sd."""
    (x,), _ = _prepare([scores], None)
    means = tuple(float(m) for m in x.mean(axis=1)) if x.shape[1] else ()
    sd = float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")
    return SeedSpread(means, sd)
