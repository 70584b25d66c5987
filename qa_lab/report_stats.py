"""The report's statistics over a sweep's runs: paired comparisons, 2x2 effects, the headline.

Runs are the dicts `reporting` reads back from MLflow (label, tags, params, ci, items). Every
number here comes from the runs' per-item scores, compared item by item on the same item set.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np

from qa_lab import report_replicates

# The per-item metrics compared pair by pair, in this order; the first that varies across the
# configs is the report's headline metric (ROUGE-L F1 is scored by every metrics preset).
PAIRED = ("rougeL_f1", "bertscore_f1", "token_f1", "sentence_bleu", "exact_match")
VARIANTS_2X2 = ("vanilla", "rag", "lora", "rag_lora")
EFFECTS = ("rag", "ft", "interaction")


def clusters(run: dict[str, Any]) -> list[str]:
    """Bootstrap clusters of a run's items: seed lineages (an item without one is its own)."""
    return [it.seed_id or it.item_id for it in run["items"]]


def paired_metrics(runs: list[dict[str, Any]]) -> list[str]:
    """The paired metrics the runs scored (read off the first item)."""
    return [m for m in PAIRED if m in runs[0]["items"][0].scores]


def constant_value(runs: list[dict[str, Any]], metric: str) -> float | None:
    """The one value a metric takes on every scored item of every run, else None.

    Such a metric (exact match at 0 for free-text answers) has nothing to compare: the report
    says so in one line instead of a table of zero differences.
    """
    values = {
        float(it.scores[metric])
        for r in runs
        for it in r["items"]
        if metric in (it.scores or {}) and not math.isnan(float(it.scores[metric]))
    }
    return values.pop() if len(values) == 1 else None


def headline_metric(runs: list[dict[str, Any]]) -> str | None:
    """The first paired metric (`PAIRED` order) that is not constant across the runs."""
    return next((m for m in paired_metrics(runs) if constant_value(runs, m) is None), None)


def paired_comparisons(runs: list[dict[str, Any]], boot: Any) -> list[dict[str, Any]]:
    """Every pair of runs on every paired metric, Holm-adjusted within each metric."""
    from qa_lab import stats

    out = []
    groups = clusters(runs[0])
    replicated = report_replicates.replicated(runs)
    for metric in paired_metrics(runs):
        rows = []
        for a, b in combinations(runs, 2):
            va = [it.scores[metric] for it in a["items"]]
            vb = [it.scores[metric] for it in b["items"]]
            test = (
                report_replicates.paired(a, b, metric, groups, boot)
                if replicated
                else stats.paired_test(
                    va, vb, clusters=groups, resamples=int(boot.resamples), seed=int(boot.seed)
                )
            )
            rows.append({"a": a["label"], "b": b["label"], "metric": metric, **test})
        for row, adj in zip(rows, stats.holm([r["p_value"] for r in rows])):
            row["p_holm"] = adj
        out.extend(rows)
    return out


def grid_2x2(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """The runs by variant when the sweep is exactly the 2x2 grid, else None."""
    by_variant = {r["tags"].get("qa_lab.variant"): r for r in runs}
    if len(runs) != 4 or set(by_variant) != set(VARIANTS_2X2):
        return None
    return by_variant


def effects(runs: list[dict[str, Any]], boot: Any) -> list[dict[str, Any]]:
    """The 2x2 decomposition (RAG, fine-tuning, interaction) when the sweep is that grid.

    Each metric's three effects are Holm-adjusted together (`p_holm`), like the pairs.
    """
    from qa_lab import stats

    by_variant = grid_2x2(runs)
    if by_variant is None:
        return []
    groups = clusters(runs[0])
    replicated = report_replicates.replicated(runs)
    out = []
    for metric in paired_metrics(runs):
        cells = [[it.scores[metric] for it in by_variant[v]["items"]] for v in VARIANTS_2X2]
        result = (
            report_replicates.effects(by_variant, metric, groups, boot)
            if replicated
            else stats.effects_2x2(
                *cells, clusters=groups, resamples=int(boot.resamples), seed=int(boot.seed)
            )
        )
        rows = [{"effect": name, "metric": metric, **result[name]} for name in EFFECTS]
        for row, adj in zip(rows, stats.holm([r["p_value"] for r in rows])):
            row["p_holm"] = adj
        out.extend(rows)
    return out


def _scores(run: dict[str, Any], metric: str) -> np.ndarray:
    return np.array([it.scores[metric] for it in run["items"]], dtype=float)


def _with_power(
    row: dict[str, Any], d: np.ndarray, groups: list[str], decision: Any
) -> dict[str, Any]:
    """`row` plus its MDE, the metric's smallest effect of interest and the underpowered flag.

    The MDE is `power.mde` on the per-item contrasts `d` over the seed clusters: the normal
    approximation to the paired test on cluster means at `decision.alpha` and `.power`.
    """
    from qa_lab import power

    mde = (
        power.mde_from_se(row["se"], alpha=decision.alpha, power=decision.power)
        if "se" in row  # a replicated contrast: seeds' noise is in its standard error
        else power.mde(d, clusters=groups, alpha=decision.alpha, power=decision.power)
    )
    least = decision.min_effect.get(row["metric"])
    flagged = least is not None and power.underpowered(row["ci_low"], row["ci_high"], mde, least)
    stated = {"alpha": decision.alpha, "power": decision.power}
    return {**row, "mde": mde, "min_effect": least, "underpowered": flagged, **stated}


def comparisons_with_power(
    runs: list[dict[str, Any]], comparisons: list[dict[str, Any]], decision: Any
) -> list[dict[str, Any]]:
    """The paired comparisons, each with its MDE and underpowered flag (`_with_power`)."""
    by_label = {r["label"]: r for r in runs}
    groups = clusters(runs[0])
    return [
        _with_power(
            c,
            _scores(by_label[c["b"]], c["metric"]) - _scores(by_label[c["a"]], c["metric"]),
            groups,
            decision,
        )
        for c in comparisons
    ]


def effects_with_power(
    runs: list[dict[str, Any]], eff: list[dict[str, Any]], decision: Any
) -> list[dict[str, Any]]:
    """The 2x2 effects, each with its MDE and underpowered flag (`_with_power`)."""
    from qa_lab import stats

    by_variant = grid_2x2(runs)
    if by_variant is None:
        return eff
    groups = clusters(runs[0])
    out = []
    for e in eff:
        cells = [_scores(by_variant[v], e["metric"]) for v in VARIANTS_2X2]
        d = sum(w * x for w, x in zip(stats.EFFECT_WEIGHTS[e["effect"]], cells))
        out.append(_with_power(e, np.asarray(d), groups, decision))
    return out
