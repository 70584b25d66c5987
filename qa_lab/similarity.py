"""The blockwise cosine-similarity kernel: greedy dedup, all close pairs, nearest neighbours.

Semantic dedup keeps the original study's greedy semantics (file order, compare with every
kept row, drop above the threshold) but runs blockwise so it scales to 100k rows; the lineage
groups need every close pair, and the leakage audit and seed assignment each row's nearest
neighbour. Dedup and the close pairs walk the same tiles, so that walk is written once
(`_block_pairs`); they differ only in the columns a block meets (kept rows, or all earlier).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from qa_lab.errors import QaLabError

#
# Every keep/drop decision uses one similarity: the float64 sum of the exact float64
# products of two float32 rows, computed by `_dot64` in both the naive reference and the
# blockwise version, so the two agree bit for bit. The blockwise version only uses fast
# float32 matrix products to find *candidate* pairs, with a safety margin far above float32
# rounding, so it never misses a pair the exact similarity would flag.
#
# Candidates come from a Cauchy-Schwarz bound with a quarter of the full product's work:
# rotate into principal axes, keep the first k coordinates z_P, and append the norm of the
# rest r. Then x.y = zx_P.zy_P + zx_R.zy_R <= zx_P.zy_P + rx*ry = [zx_P, rx].[zy_P, ry],
# one matrix product over k+1 dims. Where the bound is loose (too many candidates in a tile)
# the full float32 product of the affected rows is computed instead.

_ROW_BLOCK = 1024  # rows resolved together (greedy within the block)
_COL_CHUNK = 8192  # kept rows per matrix product (bounds memory to ~32 MB per tile)
_REFINE_CHUNK = 16384  # candidate pairs per exact float64 batch
_MARGIN = 1e-3  # candidate slack, >> float32 rounding of a 384-d unit dot product (~1e-5)
_LOOSE = 8  # candidates per row above which a tile falls back to the full float32 product


def as_matrix(vectors: np.ndarray) -> np.ndarray:
    """Contiguous float32 rows: the layout every product and `_dot64` here expects."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {matrix.shape}")
    return matrix


def _dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of float32 rows in float64: the similarity every decision uses.

    The products of float32 values are exact in float64 and each row is summed by the same
    numpy reduction whatever the batch, so the naive and blockwise paths get identical bits.
    """
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


def _single_blas_thread() -> Any:
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _bound_vectors(x: np.ndarray, k: int | None = None) -> np.ndarray:
    """Rows [z_P, |z_R|] whose dot products bound the true ones from above (see above)."""
    n, d = x.shape
    k = d // 4 if k is None else k
    if d <= 32 or k >= d:
        return x
    # Principal axes of an evenly spaced sample: any orthonormal basis keeps the bound valid,
    # the sample only has to make it tight.
    sample = x[:: max(1, n // _COL_CHUNK)][:_COL_CHUNK].astype(np.float64)
    gram = sample.T @ sample
    with _single_blas_thread():  # multi-threaded LAPACK on a 384x384 matrix is pure overhead
        _, eigvecs = np.linalg.eigh(gram)
    top = np.ascontiguousarray(eigvecs[:, ::-1][:, :k])  # largest second moment first
    out = np.empty((n, k + 1), dtype=np.float32)
    for start in range(0, n, _COL_CHUNK):
        chunk = x[start : start + _COL_CHUNK].astype(np.float64)
        z = chunk @ top
        rest = np.einsum("ij,ij->i", chunk, chunk) - np.einsum("ij,ij->i", z, z)
        out[start : start + len(z), :k] = z
        out[start : start + len(z), k] = np.sqrt(np.maximum(rest, 0.0))
    return out


_LOWER_MASKS: dict[int, np.ndarray] = {}


def _not_lower(m: int) -> np.ndarray:
    """Boolean mask of the diagonal and upper triangle (pairs that are not j < i)."""
    if m not in _LOWER_MASKS:
        _LOWER_MASKS.clear()
        _LOWER_MASKS[m] = ~np.tri(m, m, -1, dtype=bool)
    return _LOWER_MASKS[m]


def _candidates(
    x: np.ndarray,
    bound_rows: np.ndarray,
    bound_cols: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    floor: float,
    *,
    lower: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Global (i, j) pairs of one tile whose similarity may exceed `floor + margin`."""
    sims = bound_rows @ bound_cols.T
    if lower:
        sims[_not_lower(len(rows))] = -np.inf
    # A row maximum first: one cheap pass, then `nonzero` only over rows with candidates.
    hit_rows = np.flatnonzero(sims.max(axis=1) > floor) if sims.size else np.zeros(0, int)
    r2, cj = np.nonzero(sims[hit_rows] > floor)
    if bound_cols.shape[1] < x.shape[1] and r2.size > _LOOSE * len(rows):
        # The bound is loose here: the full float32 product of the rows involved is cheaper
        # than refining every candidate in float64.
        sims = x[rows[hit_rows]] @ x[cols].T
        if lower:
            sims[rows[hit_rows][:, None] <= cols[None, :]] = -np.inf
        r2, cj = np.nonzero(sims > floor)
    return rows[hit_rows[r2]], cols[cj]


def _refine(x: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Exact (float64) similarities of candidate pairs, in bounded-memory batches."""
    out = np.empty(len(ii), dtype=np.float64)
    for start in range(0, len(ii), _REFINE_CHUNK):
        stop = start + _REFINE_CHUNK
        out[start:stop] = _dot64(x[ii[start:stop]], x[jj[start:stop]])
    return out


def _margin(x: np.ndarray) -> float:
    norms = np.einsum("ij,ij->i", x, x) if len(x) else np.zeros(1)
    return _MARGIN * max(1.0, float(norms.max()))


def check_threshold(threshold: float, key: str) -> float:
    """A cosine threshold as a float, or a one-line error naming its config key."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise QaLabError(f"{key}={threshold} must be a cosine similarity in [-1, 1]")
    return float(threshold)


def _block_pairs(
    x: np.ndarray,
    bound: np.ndarray,
    floor: float,
    start: int,
    stop: int,
    earlier: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs of rows [start, stop) with exact similarities, one tile walk for all.

    Candidates are taken against `earlier` (bound rows and their global indices, in chunks
    of `_COL_CHUNK`: the kept rows for dedup, every earlier row for `similar_pairs`) and
    against earlier rows of the same block; every pair's similarity is then computed exactly.

    Returns:
        (row i, column j, float64 similarity) arrays, unordered, with j < i.
    """
    earlier_bound, earlier_idx = earlier
    rows = np.arange(start, stop)
    block = bound[start:stop]
    pairs = [
        _candidates(
            x,
            block,
            earlier_bound[c : c + _COL_CHUNK],
            rows,
            earlier_idx[c : c + _COL_CHUNK],
            floor,
            lower=False,
        )
        for c in range(0, len(earlier_idx), _COL_CHUNK)
    ]
    pairs.append(_candidates(x, block, block, rows, rows, floor, lower=True))
    ii = np.concatenate([p[0] for p in pairs])
    jj = np.concatenate([p[1] for p in pairs])
    return ii, jj, _refine(x, ii, jj)


def _resolve_block(
    ii: np.ndarray, jj: np.ndarray, sims: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Greedy keep-first within one block, given its above-threshold pairs.

    Row i is dropped iff one of its pairs points at a row that is still alive: a kept row of
    an earlier block, or an earlier row of this block that was not dropped itself.

    Returns:
        Dropped mask over the block, and (removed, most similar alive kept row, similarity).
    """
    dropped = np.zeros(stop - start, dtype=bool)
    removed: list[tuple[int, int, float]] = []
    if not len(ii):
        return dropped, removed
    order = np.lexsort((jj, -sims, ii))  # by row, then most similar, then lowest j
    ii, jj, sims = ii[order], jj[order], sims[order]
    (firsts,) = np.nonzero(np.r_[True, ii[1:] != ii[:-1]])
    for lo, hi in zip(firsts, np.r_[firsts[1:], len(ii)]):
        js = jj[lo:hi]
        alive = (js < start) | ~dropped[np.maximum(js - start, 0)]
        if alive.any():
            best = lo + int(np.argmax(alive))
            dropped[ii[lo] - start] = True
            removed.append((int(ii[lo]), int(jj[best]), float(sims[best])))
    return dropped, removed


def semantic_dedup(
    vectors: np.ndarray, threshold: float
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Greedy keep-first paraphrase removal: exactly `naive_semantic_dedup`, blockwise.

    Row i is dropped iff some earlier *kept* row has cosine strictly above `threshold`. Rows
    are resolved in blocks of 1024: candidates against the kept rows of earlier blocks and
    against earlier rows of the same block come from cheap bounded matrix products, are
    checked with the exact similarity, and the block is then resolved in file order.

    Args:
        vectors: (n, d) unit-normalised embeddings in file order (cosine = dot product).
        threshold: Cosine above which a row counts as a paraphrase of a kept row.

    Returns:
        Kept row indices (ascending), and for each removed row (removed index, index of the
        most similar earlier kept row (lowest index on ties), that similarity).
    """
    threshold = check_threshold(threshold, "dataset.semantic_dedup.threshold")
    x = as_matrix(vectors)
    n = len(x)
    if n == 0:
        return [], []
    bound = _bound_vectors(x)
    floor = threshold - _margin(x)
    kept_bound = np.empty_like(bound)
    kept_idx = np.empty(n, dtype=np.int64)
    n_kept = 0
    removed: list[tuple[int, int, float]] = []
    for start in range(0, n, _ROW_BLOCK):
        stop = min(n, start + _ROW_BLOCK)
        earlier = (kept_bound[:n_kept], kept_idx[:n_kept])
        ii, jj, sims = _block_pairs(x, bound, floor, start, stop, earlier)
        hit = sims > threshold
        dropped, block_removed = _resolve_block(ii[hit], jj[hit], sims[hit], start, stop)
        removed.extend(block_removed)
        keep_rows = np.arange(start, stop)[~dropped]
        kept_bound[n_kept : n_kept + len(keep_rows)] = bound[keep_rows]
        kept_idx[n_kept : n_kept + len(keep_rows)] = keep_rows
        n_kept += len(keep_rows)
    return kept_idx[:n_kept].tolist(), removed


def naive_semantic_dedup(
    vectors: np.ndarray, threshold: float
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Reference greedy loop (the original study's procedure), for tests and benchmarks.

    For each row in file order, compare with every kept row; drop it if the best similarity
    is strictly above `threshold`. O(n^2) with a Python loop: fine for a few thousand rows.

    Args:
        vectors: (n, d) unit-normalised embeddings in file order.
        threshold: Cosine above which a row counts as a paraphrase of a kept row.

    Returns:
        Same as `semantic_dedup`.
    """
    threshold = check_threshold(threshold, "dataset.semantic_dedup.threshold")
    x = as_matrix(vectors)
    kept_rows = np.empty_like(x)
    kept: list[int] = []
    removed: list[tuple[int, int, float]] = []
    for i in range(len(x)):
        if kept:
            sims = _dot64(kept_rows[: len(kept)], x[i : i + 1])
            best = int(np.argmax(sims))
            if sims[best] > threshold:
                removed.append((i, kept[best], float(sims[best])))
                continue
        kept_rows[len(kept)] = x[i]
        kept.append(i)
    return kept, removed


def similar_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """All pairs (i, j), j < i, with cosine >= `threshold` (inclusive), exact in float64.

    Args:
        vectors: (n, d) unit-normalised embeddings.
        threshold: Minimum cosine of a reported pair.

    Returns:
        (i, j, similarity) triples sorted by i then j.
    """
    threshold = check_threshold(threshold, "threshold")
    x = as_matrix(vectors)
    n = len(x)
    if n == 0:
        return []
    bound = _bound_vectors(x)
    floor = threshold - _margin(x)
    everything = np.arange(n)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, n, _ROW_BLOCK):
        earlier = (bound[:start], everything[:start])
        ii, jj, sims = _block_pairs(x, bound, floor, start, min(n, start + _ROW_BLOCK), earlier)
        hit = sims >= threshold
        found.append((ii[hit], jj[hit], sims[hit]))
    ii, jj, ss = (np.concatenate(a) for a in zip(*found))
    order = np.lexsort((jj, ii))
    return [(int(ii[k]), int(jj[k]), float(ss[k])) for k in order]


def nearest_neighbours(queries: np.ndarray, corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine of each query's nearest corpus row (unit-normalised rows).

    Blocked so that 100k queries never build a 100k x N similarity matrix at once. With an
    empty corpus every query gets index -1 and cosine -inf (nothing is near).
    """
    q, c = as_matrix(queries), as_matrix(corpus)
    nearest = np.full(len(q), -1, dtype=np.int64)
    best = np.full(len(q), -np.inf)
    if len(c) and len(q):
        for start in range(0, len(q), _ROW_BLOCK):
            sims = q[start : start + _ROW_BLOCK] @ c.T
            nearest[start : start + len(sims)] = sims.argmax(axis=1)
            best[start : start + len(sims)] = sims.max(axis=1)
    return nearest, best
