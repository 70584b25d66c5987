import numpy as np
import pytest

from qa_lab import power, stats


def test_mde_by_hand_with_clusters():
    # Cluster means 0.1, 0.3, 0.2, 0.4: mean 0.25, squared deviations sum 0.05, sd =
    # sqrt(0.05 / 3) = 0.129099; MDE = (1.959964 + 0.841621) * 0.129099 / sqrt(4) = 0.180842.
    diffs = [0.0, 0.2, 0.3, 0.1, 0.3, 0.4]
    clusters = ["a", "a", "b", "c", "c", "d"]
    assert power.mde(diffs, clusters=clusters) == pytest.approx(0.180842, abs=1e-6)
    # Without clusters: 6 items, sd of the items = 0.147196, MDE = 2.801585 * 0.147196 / sqrt(6).
    assert power.mde(diffs) == pytest.approx(2.801585 * 0.147196 / np.sqrt(6), rel=1e-5)
    # A NaN item is dropped with its label: cluster d goes, 3 clusters remain.
    with_nan = [*diffs[:5], np.nan]
    sd3 = float(np.std([0.1, 0.3, 0.2], ddof=1))
    assert power.mde(with_nan, clusters=clusters) == pytest.approx(2.801585 * sd3 / np.sqrt(3))


def test_mde_from_se_and_its_quantiles():
    assert power.mde_from_se(0.01) == pytest.approx(0.028016, abs=1e-6)
    # Power 0.5 puts the effect on the critical value: the factor is z_0.975 alone.
    assert power.mde_from_se(1.0, power=0.5) == pytest.approx(1.959964, abs=1e-6)
    assert power.mde_from_se(1.0, alpha=0.01, power=0.9) == pytest.approx(2.575829 + 1.281552)
    assert np.isnan(power.mde([0.1, 0.2], clusters=["a", "a"]))
    with pytest.raises(ValueError, match="alpha"):
        power.mde_from_se(0.1, alpha=1.5)


def test_a_true_effect_of_one_mde_is_detected_about_80_percent_of_the_time():
    """200 studies of 60 clusters; the sign-flip test on cluster means should reject ~0.8.

    Normal quantiles understate the t-based MDE by ~2% at 60 clusters (power a point or two
    under 0.8); 200 studies carry a sampling sd of 2.8 points. Measured: 0.82.
    """
    rng = np.random.default_rng(3)
    k, sd = 60, 0.2
    effect = power.mde_from_se(sd / np.sqrt(k))
    rejections = 0
    for sim in range(200):
        d = rng.normal(effect, sd, size=k)
        rejections += stats.paired_test(np.zeros(k), d, resamples=500, seed=sim)["p_value"] < 0.05
    assert 0.72 <= rejections / 200 <= 0.88


def test_underpowered_both_ways():
    assert power.underpowered(-0.01, 0.05, mde=0.08, min_effect=0.05)
    assert not power.underpowered(0.01, 0.05, mde=0.08, min_effect=0.05)  # CI excludes 0
    assert not power.underpowered(-0.01, 0.05, mde=0.03, min_effect=0.05)  # could have seen it
    assert not power.underpowered(-0.08, -0.01, mde=0.08, min_effect=0.05)
