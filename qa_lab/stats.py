"""Seeded bootstrap CIs, paired tests and the 2x2 (RAG x fine-tuning) decomposition.

Everything works on per-item scores in item order. Synthetic items expanded from one seed
question are not independent: when `clusters` (e.g. each item's seed_id) groups items, whole
clusters are resampled (cluster bootstrap) and signs are flipped per cluster, so CIs and
p-values are not overconfident. Items whose cluster label is None count as their own cluster.
NaN scores (a metric that does not apply to an item) are dropped, together with their item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Below this many units, sign flips are enumerated exactly instead of sampled.
_EXACT_FLIP_LIMIT = 2**12


@dataclass(frozen=True)
class CI:
    """A point estimate with its percentile-bootstrap interval and how it was made."""

    mean: float
    low: float
    high: float
    n: int
    n_clusters: int
    method: str  # "bootstrap" (items resampled) | "cluster_bootstrap" (clusters resampled)
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logging."""
        return asdict(self)


class _Units:
    """The resampling units: single items, or clusters of items sharing a label."""

    def __init__(self, n: int, clusters: Sequence[Any] | np.ndarray | None) -> None:
        self.n = n
        self.n_clusters = n
        self.groups: list[np.ndarray] | None = None  # None: every item is its own unit
        if clusters is None:
            return
        labels = list(clusters)
        if len(labels) != n:
            raise ValueError(f"clusters has {len(labels)} labels for {n} values")
        index: dict[Any, list[int]] = {}
        for i, label in enumerate(labels):
            index.setdefault(("item", i) if label is None else ("label", label), []).append(i)
        self.n_clusters = len(index)
        if self.n_clusters < n:
            self.groups = [np.asarray(members) for members in index.values()]

    @property
    def k(self) -> int:
        return self.n if self.groups is None else len(self.groups)

    @property
    def method(self) -> str:
        return "bootstrap" if self.groups is None else "cluster_bootstrap"

    def sums(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit sums and item counts of `x`."""
        if self.groups is None:
            return x, np.ones(self.n)
        return (
            np.array([x[g].sum() for g in self.groups]),
            np.array([len(g) for g in self.groups], dtype=float),
        )

    def items(self, draw: np.ndarray) -> np.ndarray:
        """Item indices of one resample of units."""
        if self.groups is None:
            return draw
        return np.concatenate([self.groups[j] for j in draw])


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")


def _finite(*arrays: Any, clusters: Any = None) -> tuple[list[np.ndarray], Any]:
    xs = [np.asarray(a, dtype=float).ravel() for a in arrays]
    n = len(xs[0])
    if any(len(x) != n for x in xs):
        raise ValueError("paired inputs differ in length")
    keep = np.logical_and.reduce([np.isfinite(x) for x in xs])
    if clusters is not None:
        clusters = (
            [c for c, k in zip(list(clusters), keep) if k] if len(clusters) == n else clusters
        )
    return [x[keep] for x in xs], clusters


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> CI:
    """Percentile-bootstrap CI of `statistic` over per-item values.

    With `clusters` and fewer clusters than items, whole clusters are resampled: items that
    share a seed question are correlated, and resampling them one by one would make the
    interval too narrow.
    """
    _check(resamples, confidence)
    (x,), clusters = _finite(values, clusters=clusters)
    units = _Units(len(x), clusters)
    if len(x) == 0:
        return CI(np.nan, np.nan, np.nan, 0, 0, units.method, resamples)
    draws = np.random.default_rng(seed).integers(0, units.k, size=(resamples, units.k))
    if statistic is np.mean:
        sums, counts = units.sums(x)
        boot = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    else:
        boot = np.array([float(statistic(x[units.items(draw)])) for draw in draws])
    low, high = _interval(boot, confidence)
    return CI(float(statistic(x)), low, high, len(x), units.n_clusters, units.method, resamples)


def bootstrap_corpus_ci(
    n_items: int,
    corpus_fn: Callable[[np.ndarray], float],
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI:
    """Bootstrap CI of a corpus-level metric: `corpus_fn(item_indices)` on each resample.

    Corpus BLEU is not a mean of per-item scores, so it is recomputed on every resample of
    items (e.g. `ScoreResult.corpus_bleu`). The draws match `bootstrap_ci` with the same seed.
    """
    _check(resamples, confidence)
    units = _Units(int(n_items), clusters)
    if n_items == 0:
        return CI(np.nan, np.nan, np.nan, 0, 0, units.method, resamples)
    draws = np.random.default_rng(seed).integers(0, units.k, size=(resamples, units.k))
    boot = np.array([float(corpus_fn(units.items(draw))) for draw in draws])
    low, high = _interval(boot, confidence)
    point = float(corpus_fn(np.arange(n_items)))
    return CI(point, low, high, int(n_items), units.n_clusters, units.method, resamples)


def _sign_matrix(k: int, resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if 2**k <= min(resamples, _EXACT_FLIP_LIMIT):
        codes = np.arange(2**k)[:, None] >> np.arange(k)[None, :]
        return (codes & 1) * 2.0 - 1.0, True
    return rng.integers(0, 2, size=(resamples, k)) * 2.0 - 1.0, False


def sign_flip_p(
    sums: np.ndarray, counts: np.ndarray, diff: float, signs: np.ndarray, exact: bool
) -> float:
    """Two-sided sign-flip p-value of a mean difference from its per-unit sums and counts.

    Under H0 (no difference) each unit's total difference is symmetric around 0, so flipping
    its sign gives an equally likely outcome; the item count per unit never changes.
    """
    flipped = np.abs(signs @ sums) / counts.sum()
    tol = 1e-12 * max(1.0, abs(diff))
    hits = int(np.count_nonzero(flipped >= abs(diff) - tol))
    p = hits / len(signs) if exact else (hits + 1) / (len(signs) + 1)
    return float(min(p, 1.0))


def cohen_dz(sums: np.ndarray, counts: np.ndarray, diff: float) -> float:
    """Cohen's dz: `diff` over the sd of per-unit mean differences (0 when that sd is 0)."""
    unit_means = sums / counts
    sd = float(np.std(unit_means, ddof=1)) if len(unit_means) > 1 else 0.0
    return float(diff / sd) if sd > 0 else 0.0


def _paired_core(
    d: np.ndarray,
    units: _Units,
    draws: np.ndarray,
    signs: np.ndarray,
    exact: bool,
    confidence: float,
) -> dict[str, float]:
    """Mean of per-item differences `d` with bootstrap CI, sign-flip p-value and Cohen's dz."""
    sums, counts = units.sums(d)
    diff = float(sums.sum() / counts.sum())
    low, high = _interval(sums[draws].sum(axis=1) / counts[draws].sum(axis=1), confidence)
    return {
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        "p_value": sign_flip_p(sums, counts, diff, signs, exact),
        "effect_size": cohen_dz(sums, counts, diff),
    }


def paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare two variants on the same items: is mean(b - a) different from 0?

    Returns diff = mean(b - a), its paired (cluster) bootstrap CI, a two-sided paired
    permutation p-value (signs of per-item, or per-cluster, differences flipped; exact when
    there are few units) and Cohen's dz = diff / sd of per-item (per-cluster mean)
    differences, 0 when that sd is 0. Identical inputs give diff 0 and p = 1 exactly.
    """
    _check(resamples, confidence)
    (xa, xb), clusters = _finite(a, b, clusters=clusters)
    units = _Units(len(xa), clusters)
    out: dict[str, Any] = {"n": len(xa), "n_clusters": units.n_clusters, "method": units.method}
    if len(xa) == 0:
        nan = float("nan")
        return {
            "diff": nan,
            "ci_low": nan,
            "ci_high": nan,
            "p_value": nan,
            "effect_size": nan,
            **out,
        }
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, units.k, size=(resamples, units.k))
    signs, exact = _sign_matrix(units.k, resamples, rng)
    return {**_paired_core(xb - xa, units, draws, signs, exact, confidence), **out}


def holm(pvalues: Sequence[float] | np.ndarray) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in input order.

    NaN p-values stay NaN and do not count towards the number of tests.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out.tolist()


# Each 2x2 effect as weights on the per-item scores of (vanilla, rag, lora, rag_lora): rag and
# ft average a main effect over the other factor's levels, interaction is a difference of
# differences. `effects_2x2`, the replicated `replicates.effects_2x2_replicates` and the
# report's power analysis all read the contrasts from here.
EFFECT_WEIGHTS = {
    "rag": (-0.5, 0.5, -0.5, 0.5),
    "ft": (-0.5, -0.5, 0.5, 0.5),
    "interaction": (1.0, -1.0, -1.0, 1.0),
}


def effects_2x2(
    vanilla: Sequence[float] | np.ndarray,
    rag: Sequence[float] | np.ndarray,
    lora: Sequence[float] | np.ndarray,
    rag_lora: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Main effects and interaction of RAG and fine-tuning from the four per-item score lists.

    - rag: mean over fine-tuning levels of (with RAG - without): ((rag-vanilla)+(rag_lora-lora))/2
    - ft: mean over RAG levels of (LoRA - base): ((lora-vanilla)+(rag_lora-rag))/2
    - interaction: (rag_lora - lora) - (rag - vanilla); > 0 means RAG helps more after LoRA.

    Each comes from per-item contrasts, with a paired (cluster) bootstrap CI, a sign-flip
    p-value and Cohen's dz; the three contrasts share the same resamples, so their CIs are
    jointly consistent. Items must be the same, in the same order, in all four lists.
    """
    _check(resamples, confidence)
    (v, r, f, rf), clusters = _finite(vanilla, rag, lora, rag_lora, clusters=clusters)
    units = _Units(len(v), clusters)
    contrasts = {
        name: sum(w * x for w, x in zip(weights, (v, r, f, rf)))
        for name, weights in EFFECT_WEIGHTS.items()
    }
    out: dict[str, Any] = {
        "means": {
            name: float(x.mean()) if len(x) else float("nan")
            for name, x in (("vanilla", v), ("rag", r), ("lora", f), ("rag_lora", rf))
        },
        "n": len(v),
        "n_clusters": units.n_clusters,
        "method": units.method,
    }
    if len(v) == 0:
        return out
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, units.k, size=(resamples, units.k))
    signs, exact = _sign_matrix(units.k, resamples, rng)
    for name, d in contrasts.items():
        result = _paired_core(d, units, draws, signs, exact, confidence)
        result["estimate"] = result.pop("diff")
        out[name] = result
    return out
