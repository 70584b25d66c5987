import numpy as np
import pytest

from qa_lab import replicates, stats


def _study(rng, k=30, size=2, seeds=3, seed_sd=0.025, effect=0.05):
    """A paired study: vanilla (1, n) and a LoRA cell (seeds, n) that leads by `effect`.

    Items share a difficulty per cluster; each seed shifts all its items by one draw of sd
    `seed_sd` (the training noise) and adds per-item noise of sd 0.1.
    """
    n = k * size
    difficulty = np.repeat(rng.normal(0.0, 0.2, size=k), size) + rng.normal(0.0, 0.05, size=n)
    vanilla = difficulty + rng.normal(0.0, 0.1, size=n)
    shift = rng.normal(0.0, seed_sd, size=(seeds, 1))
    lora = difficulty[None] + effect + shift + rng.normal(0.0, 0.1, size=(seeds, n))
    return vanilla[None], lora, np.repeat(np.arange(k), size)


def test_one_seed_matches_the_item_bootstrap():
    rng = np.random.default_rng(3)
    cells = [rng.uniform(size=(1, 40)) for _ in range(4)]
    clusters = np.repeat(np.arange(20), 2)
    ci = replicates.replicate_ci(cells[0], clusters=clusters, resamples=300, seed=5)
    ref = stats.bootstrap_ci(cells[0][0], clusters=clusters, resamples=300, seed=5)
    assert (ci.mean, ci.low, ci.high) == pytest.approx((ref.mean, ref.low, ref.high))
    assert (ci.n, ci.n_clusters, ci.method) == (ref.n, ref.n_clusters, ref.method)

    got = replicates.paired_replicates(cells[0], cells[1], clusters=clusters, resamples=300)
    want = stats.paired_test(cells[0][0], cells[1][0], clusters=clusters, resamples=300)
    assert got.p_method == "sign_flip" and got.method == "cluster_bootstrap"
    assert (got.estimate, got.ci_low, got.ci_high, got.p_value, got.effect_size) == pytest.approx(
        (want["diff"], want["ci_low"], want["ci_high"], want["p_value"], want["effect_size"])
    )

    eff = replicates.effects_2x2_replicates(*cells, clusters=clusters, resamples=300, seed=2)
    ref2 = stats.effects_2x2(*(c[0] for c in cells), clusters=clusters, resamples=300, seed=2)
    assert eff.means == pytest.approx(ref2["means"])
    for name in ("rag", "ft", "interaction"):
        mine, theirs = getattr(eff, name), ref2[name]
        assert (mine.estimate, mine.ci_low, mine.ci_high, mine.p_value) == pytest.approx(
            (theirs["estimate"], theirs["ci_low"], theirs["ci_high"], theirs["p_value"])
        )


def test_identical_seeds_give_the_item_only_ci_and_disagreeing_seeds_widen_it():
    vanilla, lora, clusters = _study(np.random.default_rng(4), seed_sd=0.0)
    same = np.repeat(lora[:1], 3, axis=0)  # three seeds that trained the same adapter
    two_level = replicates.paired_replicates(vanilla, same, clusters=clusters, resamples=500)
    item_only = stats.paired_test(vanilla[0], same[0], clusters=clusters, resamples=500)
    assert two_level.method == "two_level_bootstrap" and two_level.n_seeds == (1, 3)
    assert (two_level.ci_low, two_level.ci_high) == pytest.approx(
        (item_only["ci_low"], item_only["ci_high"])
    )
    # Seeds that disagree by +-0.05 on every item: the item-only CI of the seed means ignores it.
    apart = same + np.array([[-0.05], [0.0], [0.05]])
    wide = replicates.paired_replicates(vanilla, apart, clusters=clusters, resamples=500)
    narrow = stats.paired_test(vanilla[0], apart.mean(axis=0), clusters=clusters, resamples=500)
    assert wide.estimate == pytest.approx(narrow["diff"])
    # Seed se sqrt(2/3 x 0.05^2 / 3) = 0.024 on top of the item se ~0.02: ~1.5x wider.
    assert wide.ci_high - wide.ci_low > 1.3 * (narrow["ci_high"] - narrow["ci_low"])
    assert wide.se > two_level.se


def test_two_level_ci_covers_the_true_effect_at_about_the_nominal_rate():
    """200 seeded studies (30 clusters x 2 items, 3 seeds, seed sd 0.025), 500 resamples each.

    Tolerance 0.04 around 0.95: 200 studies carry a sampling sd of 1.5 points, and 3 seeds
    resampled shrink the seed variance by 2/3 (a point or two low). Measured: 0.95 two-level,
    0.795 item-only, which leaves out the training noise.
    """
    rng = np.random.default_rng(2)
    effect, sims = 0.05, 200
    cover_two = cover_item = 0
    for sim in range(sims):
        vanilla, lora, clusters = _study(rng, effect=effect)
        two = replicates.paired_replicates(
            vanilla, lora, clusters=clusters, resamples=500, seed=sim
        )
        item = stats.paired_test(
            vanilla[0], lora.mean(axis=0), clusters=clusters, resamples=500, seed=sim
        )
        cover_two += two.ci_low <= effect <= two.ci_high
        cover_item += item["ci_low"] <= effect <= item["ci_high"]
    assert abs(cover_two / sims - 0.95) <= 0.04
    assert cover_item / sims < 0.88


def test_shared_seeds_cancel_a_seed_effect_common_to_both_cells():
    rng = np.random.default_rng(6)
    base = rng.uniform(size=40)
    shift = np.array([[-0.1], [0.0], [0.1]])  # each adapter moves every item by its shift
    lora = base[None] + shift
    rag_lora = base[None] + 0.05 + shift + rng.normal(0.0, 0.02, size=(3, 40))
    shared = replicates.paired_replicates(lora, rag_lora, shared_seeds=True, resamples=400)
    apart = replicates.paired_replicates(lora, rag_lora, resamples=400)
    assert shared.estimate == pytest.approx(apart.estimate)
    assert shared.estimate == pytest.approx(float((rag_lora - lora).mean()))
    assert shared.ci_high - shared.ci_low < 0.5 * (apart.ci_high - apart.ci_low)
    assert shared.ci_low > 0 and shared.p_value < 0.01 and shared.p_method == "bootstrap"


def test_effects_2x2_with_replicated_lora_cells():
    rng = np.random.default_rng(8)
    n = 60
    base = rng.uniform(0.2, 0.6, size=n)
    shift = rng.normal(0.0, 0.05, size=(3, 1))
    vanilla = base + rng.normal(0.0, 0.02, size=n)
    rag = base + 0.10 + rng.normal(0.0, 0.02, size=n)
    lora = base[None] + 0.05 + shift + rng.normal(0.0, 0.02, size=(3, n))
    rag_lora = base[None] + 0.15 + shift + rng.normal(0.0, 0.02, size=(3, n))
    kw = {"resamples": 400, "seed": 1}
    eff = replicates.effects_2x2_replicates(vanilla, rag, lora, rag_lora, shared_seeds=True, **kw)
    means = {"vanilla": vanilla.mean(), "rag": rag.mean(), "lora": lora.mean()}
    means["rag_lora"] = rag_lora.mean()
    assert eff.means == pytest.approx(means)
    ft = ((means["lora"] - means["vanilla"]) + (means["rag_lora"] - means["rag"])) / 2
    assert eff.ft.estimate == pytest.approx(ft)
    assert eff.ft.n_seeds == (1, 1, 3, 3) and eff.rag.method == "two_level_bootstrap"
    # The seed shift enters the fine-tuning effect, not RAG's effect or the interaction.
    seed_means = stats.effects_2x2(vanilla, rag, lora.mean(0), rag_lora.mean(0), **kw)
    ft_item = seed_means["ft"]["ci_high"] - seed_means["ft"]["ci_low"]
    assert eff.ft.ci_high - eff.ft.ci_low > 2 * ft_item
    inter = eff.interaction
    assert inter.ci_low < 0.0 < inter.ci_high and inter.ci_high - inter.ci_low < 0.03
    assert eff.rag.ci_low < 0.10 < eff.rag.ci_high and eff.rag.ci_low > 0.05


def test_seed_spread_by_hand_and_nan_items_dropped():
    scores = np.array([[0.1, 0.3, np.nan], [0.3, 0.5, 0.9], [0.5, 0.7, 0.9]])
    spread = replicates.seed_spread(scores)
    assert spread.means == pytest.approx((0.2, 0.4, 0.6))
    assert spread.sd == pytest.approx(0.2)
    assert np.isnan(replicates.seed_spread([[0.1, 0.2]]).sd)
    ci = replicates.replicate_ci(scores, clusters=["a", "a", "b"], resamples=100)
    assert (ci.n, ci.n_clusters, ci.mean) == (2, 1, pytest.approx(0.4))


def test_chunked_resamples_are_seeded_and_agree(monkeypatch):
    vanilla, lora, clusters = _study(np.random.default_rng(9), seed_sd=0.03)
    whole = replicates.paired_replicates(vanilla, lora, clusters=clusters, resamples=2000)
    monkeypatch.setattr(replicates, "_MAX_CELLS", 30 * 7)  # 7 resamples per chunk
    first = replicates.paired_replicates(vanilla, lora, clusters=clusters, resamples=2000)
    again = replicates.paired_replicates(vanilla, lora, clusters=clusters, resamples=2000)
    assert first == again
    assert first.ci_low == pytest.approx(whole.ci_low, abs=0.01)
    assert first.ci_high == pytest.approx(whole.ci_high, abs=0.01)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="item count"):
        replicates.paired_replicates(np.zeros((1, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="seed counts"):
        replicates.paired_replicates(np.zeros((2, 4)), np.zeros((3, 4)), shared_seeds=True)
    with pytest.raises(ValueError, match="labels"):
        replicates.replicate_ci(np.zeros((2, 4)), clusters=["a", "b"])
