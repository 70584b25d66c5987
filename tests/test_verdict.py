import math
from itertools import combinations

import numpy as np
import pytest

from qa_lab import cost, stats
from qa_lab.errors import QaLabError
from qa_lab.verdict import Comparison, compute_verdict, verdict_text


def _ci(mean, low, high):
    return stats.CI(mean, low, high, 56, 46, "cluster_bootstrap", 1000)


CIS = {
    "vanilla": _ci(0.150, 0.120, 0.180),
    "lora": _ci(0.199, 0.170, 0.230),
    "rag_lora": _ci(0.248, 0.213, 0.286),
}


def _comparisons(lead_p, lead_low=0.010, others_p=0.5):
    return [
        Comparison("vanilla", "lora", 0.049, 0.005, 0.09, others_p),
        Comparison("vanilla", "rag_lora", 0.098, 0.05, 0.14, others_p),
        Comparison("lora", "rag_lora", 0.049, lead_low, 0.090, lead_p),
    ]


def test_a_decisive_lead_with_cost():
    # Holm over 3 comparisons: the smallest p (0.001) x 3 = 0.003.
    v = compute_verdict("rougeL", CIS, _comparisons(0.001), costs={"rag_lora": 1.4, "lora": 1.0})
    assert (v.best, v.runner_up, v.survives_holm, v.decisive) == ("rag_lora", "lora", True, True)
    assert v.lead.p_holm == pytest.approx(0.003) and v.cost_ratio == pytest.approx(1.4)
    assert verdict_text(v) == (
        "rag_lora leads on rougeL (0.248 [0.213, 0.286]) over lora by 0.049 [0.010, 0.090], "
        "which survives Holm (p=0.003). rag_lora costs 1.4x as much per 1,000 answers as lora."
    )
    without_cost = verdict_text(compute_verdict("rougeL", CIS, _comparisons(0.001)))
    assert without_cost == verdict_text(v).split(" rag_lora costs")[0]


def test_the_text_changes_when_holm_or_the_interval_says_no():
    # Raw p 0.02 passes alone, but Holm over 3 comparisons makes it 0.06.
    v = compute_verdict("rougeL", CIS, _comparisons(0.02, others_p=0.6))
    assert v.lead.p_holm == pytest.approx(0.06) and not v.survives_holm and not v.decisive
    assert verdict_text(v) == (
        "No decisive winner on rougeL: rag_lora (0.248 [0.213, 0.286]) leads lora by 0.049 "
        "[0.010, 0.090], which does not survive Holm (p=0.06)."
    )
    # Survives Holm but the bootstrap interval reaches below zero: still not decisive.
    v = compute_verdict("rougeL", CIS, _comparisons(0.001, lead_low=-0.002))
    assert v.survives_holm and not v.decisive
    assert verdict_text(v).endswith("which survives Holm (p=0.003) but its interval includes zero.")


def test_lead_is_oriented_from_best_over_runner_up():
    flipped = [Comparison("rag_lora", "lora", -0.049, -0.09, -0.01, 0.001)]
    v = compute_verdict("rougeL", CIS, flipped)
    assert (v.lead.diff, v.lead.ci_low, v.lead.ci_high) == pytest.approx((0.049, 0.01, 0.09))
    assert v.lead.p_holm == pytest.approx(0.001) and v.decisive
    with pytest.raises(ValueError, match="no paired comparison"):
        compute_verdict("rougeL", CIS, flipped[:0])
    alone = compute_verdict("rougeL", {"lora": CIS["lora"]}, [])
    assert alone.runner_up is None and not alone.decisive
    assert verdict_text(alone) == (
        "Only one config scored rougeL: lora (0.199 [0.170, 0.230]); there is nothing to compare."
    )


def test_verdict_from_real_paired_tests_follows_the_data():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.4, size=60)
    clusters = np.repeat(np.arange(30), 2)

    def verdict(lead):
        scores = {"vanilla": base, "lora": base + 0.02, "rag_lora": base + 0.02 + lead}
        scores = {k: v + rng.normal(0.0, 0.05, size=60) for k, v in scores.items()}
        cis = {
            k: stats.bootstrap_ci(v, clusters=clusters, resamples=400) for k, v in scores.items()
        }
        rows = [
            {"a": a, "b": b, **stats.paired_test(scores[a], scores[b], clusters=clusters)}
            for a, b in combinations(scores, 2)
        ]
        return compute_verdict("token_f1", cis, [Comparison.from_row(r) for r in rows])

    strong, none = verdict(0.10), verdict(0.0)
    assert strong.best == "rag_lora" and strong.decisive
    assert verdict_text(strong).startswith("rag_lora leads on token_f1")
    assert not none.decisive and verdict_text(none).startswith("No decisive winner on token_f1")


def test_cost_by_hand():
    prices = cost.Prices(prompt_per_1k=0.5, completion_per_1k=1.5, cpu_hour=0.1, gpu_hour=2.0)
    rag = cost.Usage(prompt_tokens=800, completion_tokens=40, seconds_per_answer=1.8)
    # per answer: 0.8 x 0.5 + 0.04 x 1.5 + 1.8 / 3600 x 0.1 = 0.4 + 0.06 + 0.00005 = 0.46005
    c = cost.cost(rag, prices)
    assert c.per_1k_answers == pytest.approx(460.05) and c.training == 0.0 and c.unit == "USD"
    lora = cost.Usage(200, 40, 0.9, train_seconds=5400, device="gpu")
    # per answer: 0.1 + 0.06 + 0.9 / 3600 x 2.0 = 0.1605; training 1.5 h x 2.0 = 3.0
    c = cost.cost(lora, prices)
    assert (c.per_1k_answers, c.training, c.total) == pytest.approx((160.5, 3.0, 163.5))
    hours = cost.cost(lora)  # no price table: device hours
    assert (hours.per_1k_answers, hours.training) == pytest.approx((0.25, 1.5))
    assert hours.unit == "device-hours"


def test_prices_from_config_name_the_bad_key():
    assert cost.Prices.from_mapping({"gpu_hour": "2.5"}, "report.prices").gpu_hour == 2.5
    with pytest.raises(QaLabError, match=r"report\.prices\.cpu_hour=-1"):
        cost.Prices.from_mapping({"cpu_hour": -1}, "report.prices")
    with pytest.raises(QaLabError, match="unknown price 'per_token'"):
        cost.Prices.from_mapping({"per_token": 1}, "report.prices")
    with pytest.raises(QaLabError, match="not a number"):
        cost.Prices.from_mapping({"prompt_per_1k": "cheap"}, "report.prices")


def test_pareto_front_on_a_hand_made_set():
    points = [
        cost.Point("vanilla", 0.15, 1.0),  # cheapest: on the front
        cost.Point("rag", 0.22, 3.0),  # on the front
        cost.Point("lora", 0.20, 3.5),  # rag is better and cheaper: dominated
        cost.Point("rag_lora", 0.25, 4.0),  # best: on the front
        cost.Point("rag_k10", 0.22, 5.0),  # ties rag on quality, costs more: dominated
        cost.Point("broken", math.nan, 0.5),  # NaN: left out
    ]
    assert cost.pareto_front(points) == ["vanilla", "rag", "rag_lora"]
    assert cost.pareto_front([cost.Point("a", 0.2, 1.0), cost.Point("b", 0.2, 1.0)]) == ["a", "b"]
