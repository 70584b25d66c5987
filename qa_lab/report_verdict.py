"""The report's computed verdict: per headline metric, the best config and whether the data say so.

The first block after the intro and the sweep parent's `qa_lab.verdict` tag. `verdict.
compute_verdict` runs on the report's own numbers: each config's CI, the paired comparisons of
that metric (Holm over all of them, as in the comparison tables) and the cost per 1,000
answers; where the lead's CI includes zero, the power of that contrast says whether the study
could have seen a lead as large as the smallest effect of interest. Nothing else goes in, so
`evaluate.py report=<id>` rebuilds the same sentences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qa_lab.report_blocks import Block, Bullets, Heading, Text
from qa_lab.report_sections import headline_columns
from qa_lab.report_stats import constant_value, headline_metric, paired_metrics
from qa_lab.stats import CI
from qa_lab.verdict import Comparison, Verdict, compute_verdict, verdict_text

TAG_LIMIT = 5000  # characters of the parent run's qa_lab.verdict tag (MLflow allows 8000)


def verdict_metrics(runs: list[dict[str, Any]]) -> list[str]:
    """The headline metric, then the grid's other paired metrics that vary across configs."""
    headline = headline_metric(runs)
    if headline is None:
        return []
    shown = headline_columns(runs)
    others = [
        m
        for m in paired_metrics(runs)
        if m != headline and m in shown and constant_value(runs, m) is None
    ]
    return [headline, *others]


def _ci(c: Mapping[str, Any]) -> CI:
    """A run's logged CI (metrics.json) as a `stats.CI`."""
    return CI(
        mean=float(c["mean"]),
        low=float(c["low"]),
        high=float(c["high"]),
        n=int(c.get("n", 0)),
        n_clusters=int(c.get("n_clusters", 0)),
        method=str(c.get("method", "")),
        resamples=int(c.get("resamples", 0)),
    )


def verdicts(
    runs: list[dict[str, Any]],
    comparisons: list[dict[str, Any]],
    costs: Mapping[str, float],
    alpha: float,
) -> list[Verdict]:
    """One verdict per `verdict_metrics` metric; `costs`: per 1,000 answers per config label."""
    out = []
    for metric in verdict_metrics(runs):
        cis = {r["label"]: _ci(r["ci"][metric]) for r in runs if metric in r["ci"]}
        family = [Comparison.from_row(c) for c in comparisons if c["metric"] == metric]
        out.append(compute_verdict(metric, cis, family, costs=costs or None, alpha=alpha))
    return out


def power_sentence(v: Verdict, powered: list[dict[str, Any]], power: float) -> str | None:
    """Whether a lead whose CI includes zero could have been seen (`report_stats` power rows)."""
    if v.lead is None or not v.lead.ci_low <= 0.0 <= v.lead.ci_high:
        return None
    row = next(
        c for c in powered if c["metric"] == v.metric and {c["a"], c["b"]} == {v.best, v.runner_up}
    )
    mde, least = f"{row['mde']:.3f}", row["min_effect"]
    detects = f"at {power:.0%} power this design detects a lead of {mde} or more"
    if least is None:
        return f"Power: {detects} (no smallest effect of interest is set for {v.metric})."
    if row["underpowered"]:
        return (
            f"Underpowered: {detects}, more than the smallest effect of interest ({least:g}); "
            "a real lead of that size could have gone unseen."
        )
    return (
        f"Power: {detects}, within the smallest effect of interest ({least:g}): a lead that "
        "large would likely have shown."
    )


def verdict_lines(
    found: list[Verdict], powered: list[dict[str, Any]], power: float
) -> tuple[str, ...]:
    """One line per verdict: its sentences, then the lead's power where the lead is unresolved."""
    lines = []
    for v in found:
        more = power_sentence(v, powered, power)
        lines.append(verdict_text(v) + (f" {more}" if more else ""))
    return tuple(lines)


def verdict_section(lines: tuple[str, ...]) -> list[Block]:
    """The verdict heading and its lines (a sentence when no metric separates the configs)."""
    if not lines:
        return [Heading("Verdict"), Text("No paired metric varies across the configs: no verdict.")]
    return [Heading("Verdict"), Bullets(lines)]


def verdict_tag(lines: tuple[str, ...]) -> str:
    """The parent run's `qa_lab.verdict` tag: the lines, cut to `TAG_LIMIT` characters."""
    text = " ".join(lines) or "No paired metric varies across the configs: no verdict."
    return text if len(text) <= TAG_LIMIT else text[: TAG_LIMIT - 1] + "…"
