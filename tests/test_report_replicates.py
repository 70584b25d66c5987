"""Seed replicates in the report: pooling seed runs, two-level intervals, the seeds table."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from qa_lab import report_replicates as rr
from qa_lab import stats
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow

BOOT = SimpleNamespace(resamples=400, seed=0)
N = 40
CLUSTERS = [f"c{j // 2}" for j in range(N)]  # 20 clusters of 2 items


def _run(label: str, scores, seed: int | None = None, model: str = "m") -> dict:
    items = [
        EvalRow(
            item_id=f"i{j}",
            question="q",
            reference="r",
            prediction=f"p{j}",
            seed_id=CLUSTERS[j],
            scores={"rougeL_f1": float(s), "truncated": float(j % 3 == 0)},
        )
        for j, s in enumerate(scores)
    ]
    tags = {"qa_lab.model_key": model if seed is None else f"{model}:{seed}"}
    if seed is not None:
        tags["qa_lab.seed"] = str(seed)
    ci = {
        "rougeL_f1": {"mean": float(np.mean(scores)), "low": 0.0, "high": 1.0},
        "bleu": {"mean": 0.1 if seed is None else seed / 100, "low": 0.0, "high": 1.0},
        "truncation_rate": {"mean": 0.5, "low": 0.0, "high": 1.0},
    }
    return {"label": label, "name": f"{label}-{seed}", "tags": tags, "items": items, "ci": ci}


def _width(text: str) -> float:
    """The width of a `mean [low, high]` cell."""
    low, high = text.split("[")[1].rstrip("]").split(",")
    return float(high) - float(low)


def _base(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 0.5, N)


def test_pool_groups_a_label_in_seed_order_and_averages_scores_per_item():
    rng = np.random.default_rng(0)
    vanilla = _run("vanilla", _base(rng))
    s2, s1 = _run("lora", np.full(N, 0.4), seed=2), _run("lora", np.full(N, 0.2), seed=1)
    cells = rr.pool([vanilla, s2, s1])
    assert [c["label"] for c in cells] == ["vanilla", "lora"]
    assert cells[0]["items"] is vanilla["items"]  # one run: its rows as they were
    lora = cells[1]
    assert [rr.seed_of(r) for r in lora["replicates"]] == [1, 2]
    assert [it.scores["rougeL_f1"] for it in lora["items"]] == pytest.approx([0.3] * N)
    assert lora["items"][5].prediction == "p5"  # text from the first seed's run
    assert rr.replicated(cells) and not rr.replicated(rr.pool([vanilla]))
    assert rr.matrix(lora, "rougeL_f1").shape == (2, N)


def test_pool_refuses_replicates_over_different_items():
    a, b = _run("lora", np.zeros(N), seed=1), _run("lora", np.zeros(N), seed=2)
    b["items"] = list(reversed(b["items"]))
    with pytest.raises(QaLabError, match="replicate runs of lora differ in items"):
        rr.pool([a, b])


def test_paired_without_replicates_is_the_plain_paired_test():
    rng = np.random.default_rng(1)
    a, b = _base(rng), _base(rng) + 0.05
    got = rr.paired(_run("a", a), _run("b", b), "rougeL_f1", CLUSTERS, BOOT)
    want = stats.paired_test(a, b, clusters=CLUSTERS, resamples=400, seed=0)
    for key in ("diff", "ci_low", "ci_high", "p_value", "effect_size"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["n_seeds"] == [1, 1] and got["se"] > 0


def test_seeds_that_disagree_widen_the_interval_beyond_the_item_only_one():
    rng = np.random.default_rng(2)
    base = _base(rng)
    vanilla = _run("vanilla", base)
    # three seeds whose adapters differ by a whole-run shift of +-0.06 around +0.05
    seeds = [
        _run("lora", base + 0.05 + shift, seed=s) for s, shift in ((1, -0.06), (2, 0), (3, 0.06))
    ]
    noise = rng.normal(0, 0.02, (3, N))
    for run, row in zip(seeds, noise):
        run["items"] = [
            replace(it, scores={"rougeL_f1": it.scores["rougeL_f1"] + e})
            for it, e in zip(run["items"], row)
        ]
    v_cell, lora = rr.pool([vanilla, *seeds])
    two_level = rr.paired(v_cell, lora, "rougeL_f1", CLUSTERS, BOOT)
    item_only = stats.paired_test(
        [it.scores["rougeL_f1"] for it in v_cell["items"]],
        [it.scores["rougeL_f1"] for it in lora["items"]],
        clusters=CLUSTERS,
        resamples=400,
        seed=0,
    )
    assert two_level["diff"] == pytest.approx(item_only["diff"])
    width = two_level["ci_high"] - two_level["ci_low"]
    assert width > 2 * (item_only["ci_high"] - item_only["ci_low"])
    assert two_level["method"] == "two_level_bootstrap" and two_level["n_seeds"] == [1, 3]


def test_lora_and_rag_lora_share_their_seeds_vanilla_does_not():
    lora = rr.pool([_run("lora", np.zeros(N), seed=s) for s in (1, 2)])[0]
    rag_lora = rr.pool([_run("rag_lora", np.zeros(N), seed=s) for s in (1, 2)])[0]
    other = rr.pool([_run("x", np.zeros(N), seed=s, model="other") for s in (1, 2)])[0]
    assert rr.shared_seeds(lora, rag_lora)
    assert not rr.shared_seeds(lora, other)
    assert not rr.shared_seeds(rr.pool([_run("vanilla", np.zeros(N))])[0], lora)


def test_effects_without_replicates_equal_the_plain_2x2():
    rng = np.random.default_rng(3)
    scores = {v: _base(rng) for v in ("vanilla", "rag", "lora", "rag_lora")}
    cells = {v: rr.pool([_run(v, s)])[0] for v, s in scores.items()}
    got = rr.effects(cells, "rougeL_f1", CLUSTERS, BOOT)
    want = stats.effects_2x2(*scores.values(), clusters=CLUSTERS, resamples=400, seed=0)
    for name in ("rag", "ft", "interaction"):
        for key in ("estimate", "ci_low", "ci_high", "p_value"):
            assert got[name][key] == pytest.approx(want[name][key]), (name, key)


def test_pooled_ci_resamples_seeds_for_item_metrics_and_averages_run_metrics():
    rng = np.random.default_rng(4)
    base = _base(rng)
    cell = rr.pool([_run("lora", base + d, seed=s) for s, d in ((1, 0.0), (3, 0.1))])[0]
    rr.pooled_ci([cell], BOOT)
    ci = cell["ci"]["rougeL_f1"]
    assert ci["mean"] == pytest.approx(float(np.mean(base)) + 0.05)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["method"] == "two_level_bootstrap"
    rate = cell["ci"]["truncation_rate"]  # the mean of the per-item `truncated` flags
    share = np.mean([j % 3 == 0 for j in range(N)])
    assert rate["mean"] == pytest.approx(share) and rate["low"] < share < rate["high"]
    bleu = cell["ci"]["bleu"]  # no per-item score: the seeds' mean, no interval
    assert bleu["mean"] == pytest.approx(0.02) and math.isnan(bleu["low"])


def test_seeds_section_lists_each_seed_and_both_intervals():
    rng = np.random.default_rng(5)
    base = _base(rng)
    cells = rr.pool(
        [_run("vanilla", base), *(_run("lora", base + d, seed=s) for s, d in ((7, 0.0), (9, 0.1)))]
    )
    rr.pooled_ci(cells, BOOT)
    blocks = rr.seeds_section(cells, "rougeL_f1", BOOT)
    table = blocks[-1]
    assert [row[0] for row in table.rows] == ["lora"]  # vanilla has one run: no row
    label, seeds, sd, item_only, two_level = table.rows[0]
    m7, m9 = float(np.mean(base)), float(np.mean(base)) + 0.1
    assert seeds == f"7: {m7:.4f}, 9: {m9:.4f}"
    assert float(sd) == pytest.approx(np.std([m7, m9], ddof=1), abs=1e-4)
    assert _width(two_level) > _width(item_only)
    assert rr.seeds_section(rr.pool([_run("vanilla", base)]), "rougeL_f1", BOOT) == []
