import numpy as np
import pytest

from qa_lab import stats


def test_ci_of_known_distribution_covers_the_mean():
    values = np.random.default_rng(1).normal(5.0, 1.0, size=400)
    ci = stats.bootstrap_ci(values, resamples=1000, seed=0)
    assert ci.low < 5.0 < ci.high
    assert ci.mean == pytest.approx(values.mean())
    # Width close to the normal theory 2 * 1.96 / sqrt(400) = 0.196.
    assert ci.high - ci.low == pytest.approx(0.196, rel=0.15)
    assert (ci.n, ci.n_clusters, ci.method, ci.resamples) == (400, 400, "bootstrap", 1000)


def test_ci_is_deterministic_and_skips_nan():
    values = [0.1, 0.5, np.nan, 0.9, 0.3]
    first = stats.bootstrap_ci(values, resamples=200, seed=3)
    assert first == stats.bootstrap_ci(values, resamples=200, seed=3)
    assert first.n == 4 and first.mean == pytest.approx(0.45)


def test_corpus_ci_uses_the_same_draws_as_bootstrap_ci():
    rng = np.random.default_rng(2)
    values = rng.normal(size=60)
    clusters = np.repeat(np.arange(20), 3)
    for cl in (None, clusters):
        per_item = stats.bootstrap_ci(values, clusters=cl, resamples=300, seed=4)
        corpus = stats.bootstrap_corpus_ci(
            60, lambda idx: values[idx].mean(), clusters=cl, resamples=300, seed=4
        )
        assert (corpus.low, corpus.high) == pytest.approx((per_item.low, per_item.high))
        assert corpus.method == per_item.method


def test_cluster_bootstrap_keeps_coverage_where_item_bootstrap_fails():
    """40 seeds x 5 items, ICC ~ 0.92: items of one seed are nearly copies of each other.

    Over 4000 simulations the cluster CI covers 93% (a percentile bootstrap on 40 clusters runs
    a little narrow) and the item CI 62%; 200 simulations carry a sampling sd of ~1.8 points.
    """
    rng = np.random.default_rng(1)
    n_clusters, size, sims = 40, 5, 200
    clusters = np.repeat(np.arange(n_clusters), size)
    cover_cluster = cover_item = 0
    for sim in range(sims):
        seed_effect = rng.normal(0.0, 1.0, size=n_clusters)
        values = np.repeat(seed_effect, size) + rng.normal(0.0, 0.3, size=n_clusters * size)
        by_cluster = stats.bootstrap_ci(values, clusters=clusters, resamples=400, seed=sim)
        by_item = stats.bootstrap_ci(values, resamples=400, seed=sim)
        assert by_cluster.method == "cluster_bootstrap" and by_cluster.n_clusters == n_clusters
        cover_cluster += by_cluster.low <= 0.0 <= by_cluster.high
        cover_item += by_item.low <= 0.0 <= by_item.high
    assert 0.90 <= cover_cluster / sims <= 0.98
    assert cover_item / sims < 0.85


def test_one_item_per_cluster_is_a_plain_bootstrap():
    ci = stats.bootstrap_ci([1.0, 2.0, 3.0], clusters=["a", "b", None], resamples=50)
    assert ci.method == "bootstrap" and ci.n_clusters == 3


def test_identical_configs_give_zero_difference_and_p_one():
    scores = np.random.default_rng(5).uniform(size=50)
    for clusters in (None, np.repeat(np.arange(10), 5), np.repeat(np.arange(25), 2)):
        result = stats.paired_test(scores, scores.copy(), clusters=clusters, resamples=400)
        assert result["diff"] == 0.0
        assert result["p_value"] == 1.0
        assert result["ci_low"] == 0.0 and result["ci_high"] == 0.0
        assert result["effect_size"] == 0.0


def test_paired_test_false_positive_rate_without_a_difference():
    rng = np.random.default_rng(11)
    rejections = 0
    for sim in range(200):
        item_difficulty = rng.uniform(0.0, 1.0, size=50)
        a = item_difficulty + rng.normal(0.0, 0.2, size=50)
        b = item_difficulty + rng.normal(0.0, 0.2, size=50)
        rejections += stats.paired_test(a, b, resamples=400, seed=sim)["p_value"] < 0.05
    assert rejections / 200 <= 0.08


def test_paired_test_detects_a_real_difference():
    rng = np.random.default_rng(12)
    a = rng.uniform(size=80)
    b = a + 0.1 + rng.normal(0.0, 0.1, size=80)
    result = stats.paired_test(a, b, clusters=np.repeat(np.arange(40), 2), resamples=400)
    assert result["p_value"] < 0.01
    assert result["ci_low"] < result["diff"] < result["ci_high"]
    assert result["ci_low"] > 0
    assert result["diff"] == pytest.approx(float(np.mean(b - a)))
    assert result["effect_size"] > 0.8
    assert result["method"] == "cluster_bootstrap" and result["n_clusters"] == 40


def test_paired_test_exact_sign_flip_with_few_units():
    # 3 units, all differences +1: of the 8 sign patterns only all-plus and all-minus reach
    # |mean| = 1, so the exact two-sided p-value is 2/8.
    result = stats.paired_test([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], resamples=400)
    assert result["p_value"] == pytest.approx(0.25)
    assert result["effect_size"] == 0.0  # sd of the differences is 0


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.02]) == pytest.approx([0.02])
    adjusted = stats.holm([0.01, np.nan, 0.02])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)


def test_effects_2x2_by_hand():
    vanilla, rag = [0.1, 0.2], [0.3, 0.4]
    lora, rag_lora = [0.2, 0.2], [0.6, 0.5]
    # cell means: vanilla .15, rag .35, lora .20, rag_lora .55
    out = stats.effects_2x2(vanilla, rag, lora, rag_lora, resamples=400)
    assert out["rag"]["estimate"] == pytest.approx(((0.35 - 0.15) + (0.55 - 0.20)) / 2)  # .275
    assert out["ft"]["estimate"] == pytest.approx(((0.20 - 0.15) + (0.55 - 0.35)) / 2)  # .125
    assert out["interaction"]["estimate"] == pytest.approx((0.55 - 0.20) - (0.35 - 0.15))  # .15
    assert out["means"] == pytest.approx(
        {"vanilla": 0.15, "rag": 0.35, "lora": 0.20, "rag_lora": 0.55}
    )
    for name in ("rag", "ft", "interaction"):
        assert {"estimate", "ci_low", "ci_high", "p_value", "effect_size"} <= set(out[name])


def test_effects_2x2_recovers_simulated_effects():
    rng = np.random.default_rng(7)
    n = 300
    base = rng.uniform(0.2, 0.6, size=n)

    def noise():
        return rng.normal(0.0, 0.05, size=n)

    vanilla = base + noise()
    rag = base + 0.10 + noise()
    lora = base + 0.05 + noise()
    rag_lora = base + 0.10 + 0.05 + 0.0 + noise()  # additive: no interaction
    out = stats.effects_2x2(vanilla, rag, lora, rag_lora, resamples=400, seed=1)
    assert out["rag"]["ci_low"] < 0.10 < out["rag"]["ci_high"]
    assert out["ft"]["ci_low"] < 0.05 < out["ft"]["ci_high"]
    assert out["rag"]["p_value"] < 0.01 and out["ft"]["p_value"] < 0.01
    assert out["interaction"]["ci_low"] < 0.0 < out["interaction"]["ci_high"]
    assert out["interaction"]["p_value"] > 0.05


def test_sign_flip_p_and_cohen_dz_by_hand():
    # Units with sums 1, 1, 1 (one item each): the exact flips give p = 2/8; sd 0 gives dz 0.
    sums, counts = np.ones(3), np.ones(3)
    signs, exact = stats._sign_matrix(3, 400, np.random.default_rng(0))
    assert exact and stats.sign_flip_p(sums, counts, 1.0, signs, exact) == pytest.approx(0.25)
    assert stats.cohen_dz(sums, counts, 1.0) == 0.0
    # Unit means 1, 2, 3 (sd 1) with mean difference 2: dz = 2.
    assert stats.cohen_dz(np.array([1.0, 4.0, 3.0]), np.array([1.0, 2.0, 1.0]), 2.0) == 2.0
