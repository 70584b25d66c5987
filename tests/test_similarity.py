import numpy as np
import pytest

from qa_lab import similarity
from tests.qa_files import embed


def planted(n_base, n_copies, d=384, seed=0, cluster=0):
    """Random unit vectors plus noisy copies whose cosine to their source spans ~0.8-1.0."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_copies)
    noise = rng.standard_normal((n_copies, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = base[src] + rng.uniform(0.0, 0.75, (n_copies, 1)) * noise
    parts = [base, copies]
    if cluster:  # many near-identical rows: exercises the loose-bound fallback
        parts.append(base[:1] + 0.05 * rng.standard_normal((cluster, d)) / np.sqrt(d))
    x = np.concatenate(parts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[rng.permutation(len(x))], dtype=np.float32)


def test_semantic_dedup_equals_naive_with_planted_duplicates():
    x = planted(2000, 900, cluster=300)
    fast = similarity.semantic_dedup(x, 0.9)
    naive = similarity.naive_semantic_dedup(x, 0.9)
    assert fast == naive
    kept, removed = fast
    sims = np.array([s for _, _, s in removed])
    assert 700 < len(removed) < 1200  # real work done, on both sides of the threshold
    assert (sims > 0.9).all() and (sims < 0.92).any()
    assert all(j < i and j in set(kept) for i, j, _ in removed)


@pytest.mark.parametrize("loose", [8, 0])
def test_semantic_dedup_equals_naive_small_tiles(monkeypatch, loose):
    # Small tiles: many row blocks and kept-row chunks; loose=0 forces the full-product
    # fallback on every tile with a candidate.
    monkeypatch.setattr(similarity, "_ROW_BLOCK", 128)
    monkeypatch.setattr(similarity, "_COL_CHUNK", 256)
    monkeypatch.setattr(similarity, "_REFINE_CHUNK", 100)
    monkeypatch.setattr(similarity, "_LOOSE", loose)
    x = planted(700, 400, seed=2, cluster=60)
    assert similarity.semantic_dedup(x, 0.9) == similarity.naive_semantic_dedup(x, 0.9)
    pairs = similarity.similar_pairs(x, 0.8)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.nonzero(np.tril(sims >= 0.8, -1))
    assert [(a, b) for a, b, _ in pairs] == sorted(zip(i.tolist(), j.tolist()))


def test_semantic_dedup_tie_at_threshold_is_not_a_duplicate():
    x = planted(300, 200, seed=1)
    _, removed = similarity.naive_semantic_dedup(x, 0.9)
    tie_pair = removed[len(removed) // 2]
    tie = tie_pair[2]  # exactly one pair's similarity, as a threshold
    fast = similarity.semantic_dedup(x, tie)
    assert fast == similarity.naive_semantic_dedup(x, tie)
    assert all(s > tie for _, _, s in fast[1])
    assert tie_pair[0] not in {i for i, _, _ in fast[1]}  # strict: equal is not above


def test_semantic_dedup_small_dimension_and_exact_copies():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x = np.concatenate([x, x[:50]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert similarity.semantic_dedup(x, 0.95) == similarity.naive_semantic_dedup(x, 0.95)
    assert similarity.semantic_dedup(x[:0], 0.9) == ([], [])


def test_semantic_dedup_on_real_embeddings():
    questions = [
        "What is a closure in JavaScript?",
        "How does garbage collection work in Java?",
        "What is a JavaScript closure?",
        "Explain closures in JavaScript.",
        "Explain garbage collection in Java.",
        "What is the CAP theorem?",
    ]
    kept, removed = similarity.semantic_dedup(embed(questions), 0.9)
    assert kept == [0, 1, 5]
    assert [(i, j) for i, j, _ in removed] == [(2, 0), (3, 0), (4, 1)]
