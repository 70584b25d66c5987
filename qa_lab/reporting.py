"""Comparison reports built from MLflow runs alone: the page's order, its figures, what is logged.

`report_sweep` reads a sweep's child runs (their per-item scores artifact, tags and params),
so any finished sweep can be re-reported later with `evaluate.py report=<parent run id>`. The
page reads top down the way people decide: the summary in sentences, the 2x2's interaction
plot, the grid, then the details folded per metric (`report_sections`, `report_why`) and the
answers side by side (`report_answers`). Blocks (`report_blocks`) render as report.md and as
the self-contained report.html (`report_html`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qa_lab import (
    cost,
    figures,
    report_cost,
    report_html,
    report_replicates,
    report_sections,
    report_why,
    tracking,
)
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.report_answers import sample_ids, side_by_side_section
from qa_lab.report_blocks import Block, Figure, Heading, Text, arrow, fmt_ci, to_markdown
from qa_lab.report_options import DecisionOptions
from qa_lab.report_stats import (
    clusters,
    comparisons_with_power,
    effects,
    effects_with_power,
    grid_2x2,
    headline_metric,
    paired_comparisons,
)
from qa_lab.report_summary import summary
from qa_lab.report_verdict import verdict_lines, verdict_section, verdict_tag, verdicts

SWEPT_PARAMS = (
    "retriever.kind",
    "retriever.k",
    "model.learning_rate",
    "model.epochs",
    "model.r",
    "llm.name",
)
# Figure names and captions, in the order the "More figures" section lists those not shown above.
CAPTIONS = {
    "interaction": "The 2×2: the headline metric against retrieval, one line per model (95% CIs)",
    "sweep": "Answer quality against the swept parameter",
    "metrics": "Headline metrics with 95% CIs",
    "loss": "LoRA training and validation loss",
    "cost": report_cost.CAPTION,
}


@dataclass(frozen=True)
class Report:
    """A built report: its blocks, the figures they name, the parent run's metrics and verdict."""

    blocks: tuple[Block, ...]
    figures: dict[str, Any]
    logged: dict[str, float]
    verdict: str = ""  # the parent run's qa_lab.verdict tag

    @property
    def markdown(self) -> str:
        """report.md."""
        return to_markdown(self.blocks)

    def html(self) -> str:
        """report.html: the same blocks, styled, figures inline."""
        return report_html.page(self.blocks, self.figures)


def metric_table_md(ci: dict[str, dict[str, Any]]) -> str:
    """One run's metrics with n, 95% CI, the resampling method and direction."""
    lines = ["| metric | | mean [95% CI] | n | clusters | method |", "|---|---|---|---|---|---|"]
    for name, c in ci.items():
        lines.append(
            f"| {name} | {arrow(name)} | {fmt_ci(c)} | {c['n']} | {c.get('n_clusters', '')} "
            f"| {c.get('method', '')} |"
        )
    return "\n".join(lines) + "\n"


def samples_md(rows: Sequence[EvalRow], count: int, seed: int) -> str:
    """Qualitative samples: question, reference and prediction for fixed ids."""
    chosen = set(sample_ids([r.item_id for r in rows], count, seed))
    parts = []
    for r in rows:
        if r.item_id in chosen:
            parts.append(
                f"### {r.item_id}\n**Q:** {r.question}\n\n**Reference:** {r.reference}\n\n"
                f"**Prediction:** {r.prediction}\n"
            )
    return "\n".join(parts)


def log_run_summary(scored: Any, sample_count: int, sample_seed: int) -> None:
    """An evaluate run's readable artifacts: metric table, fixed samples, per-topic figure.

    `scored` is the run's `run_scores.RunScores`; the metric table is printed too.
    """
    table = metric_table_md(scored.ci)
    tracking.log_text(table, "metrics.md")
    tracking.log_text(samples_md(scored.rows, sample_count, sample_seed), "samples.md")
    tracking.log_figure(figures.topic_figure(scored.topics), "per_topic.png")
    print(table)


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Variant names, plus the swept params that tell apart runs of one variant (k=3, lr=…)."""
    variants = [r["tags"].get("qa_lab.variant", r["name"]) for r in runs]
    labels = []
    for run, variant in zip(runs, variants):
        same = [r for r, v in zip(runs, variants) if v == variant]
        varying = [p for p in SWEPT_PARAMS if len({r["params"].get(p) for r in same}) > 1]
        extra = " ".join(f"{p.split('.')[-1]}={run['params'].get(p)}" for p in varying)
        labels.append(f"{variant} {extra}".strip())
    return labels


def metric_key(text: str) -> str:
    """A label made safe for an MLflow metric name."""
    return re.sub(r"[^A-Za-z0-9_.\-/:]", "_", text.replace("=", "-").replace(" ", "_"))


def _load_runs(parent_run_id: str) -> list[dict[str, Any]]:
    """The sweep's finished evaluate runs with labels, CIs and per-item rows, from MLflow."""
    runs = [
        r
        for r in tracking.child_runs(parent_run_id)
        if r["tags"].get("qa_lab.stage") == "evaluate" and r["status"] == "FINISHED"
    ]
    if not runs:
        raise QaLabError(f"report={parent_run_id}: no finished evaluate runs under this run")
    hashes = {r["tags"].get("qa_lab.eval_set_hash") for r in runs}
    if len(hashes) > 1:
        names = ", ".join(f"{r['name']}={r['tags'].get('qa_lab.eval_set_hash')}" for r in runs)
        raise QaLabError(
            f"report={parent_run_id}: runs were evaluated on different item sets ({names})"
        )
    for r, label in zip(runs, _labels(runs)):
        r["label"] = label
        r["ci"] = json.loads(tracking.run_artifact_text(r["run_id"], "metrics.json"))
        r["items"] = _items(r["run_id"])
    return report_replicates.pool(runs)


def _items(run_id: str) -> list[EvalRow]:
    """A run's scored rows, read back from its per_item.jsonl artifact."""
    where = f"runs:/{run_id}/per_item.jsonl"
    lines = tracking.run_artifact_text(run_id, "per_item.jsonl").splitlines()
    return [
        EvalRow.from_dict(json.loads(line), where=f"{where}:{n}")
        for n, line in enumerate(lines, start=1)
        if line.strip()
    ]


def _comparison_metrics(comparisons: list[dict[str, Any]]) -> dict[str, float]:
    """`compare/<a>_vs_<b>/<metric>/{diff,ci_low,ci_high,p_value,mde}` (p Holm-adjusted)."""
    logged: dict[str, float] = {}
    for c in comparisons:
        base = f"compare/{metric_key(c['a'])}_vs_{metric_key(c['b'])}/{c['metric']}"
        logged.update(
            {
                f"{base}/diff": c["diff"],
                f"{base}/ci_low": c["ci_low"],
                f"{base}/ci_high": c["ci_high"],
                f"{base}/p_value": c["p_holm"],
                f"{base}/mde": c["mde"],
            }
        )
    return logged


def _effect_metrics(eff: list[dict[str, Any]]) -> dict[str, float]:
    """`effect/{rag,ft,interaction}/<metric>`: the estimates, and `.../mde` their MDEs."""
    logged = {f"effect/{e['effect']}/{e['metric']}": e["estimate"] for e in eff}
    logged.update({f"effect/{e['effect']}/{e['metric']}/mde": e["mde"] for e in eff})
    return logged


def _figures(
    runs: list[dict[str, Any]], headline: str | None, costs: list[report_cost.ConfigCost]
) -> dict[str, Any]:
    """The report's figures by name; each only where it applies."""
    columns = report_sections.headline_columns(runs)
    out: dict[str, Any] = {}
    by_variant = grid_2x2(runs)
    if by_variant is not None and headline is not None and headline in runs[0]["ci"]:
        out["interaction"] = figures.interaction(by_variant, headline)
    if columns:
        out["metrics"] = figures.bars(runs, {m: f"{m} {arrow(m)}" for m in columns})
    topic_metric = headline if headline in report_sections.TOPIC_METRICS else None
    topic_metric = topic_metric or next(
        (m for m in report_sections.TOPIC_METRICS if m in runs[0]["items"][0].scores), None
    )
    if topic_metric is not None:
        topics = report_sections.topic_names(runs)
        values = [[report_sections.topic_mean(r, t, topic_metric) for t in topics] for r in runs]
        grid = [[float("nan") if v is None else v for v in row] for row in values]
        out["topics"] = figures.topic_heatmap(
            [r["label"] for r in runs], topics, grid, topic_metric
        )
    for name, fig in (("loss", figures.loss_curves(runs)), ("sweep", figures.sweep_curves(runs))):
        if fig is not None:
            out[name] = fig
    if headline is not None and any(math.isfinite(c.cost.per_1k_answers) for c in costs):
        cis = {r["label"]: r["ci"][headline] for r in runs}
        points = report_cost.points(costs, cis)
        unit = costs[0].cost.unit
        out["cost"] = figures.quality_cost(points, cis, cost.pareto_front(points), (headline, unit))
    return out


def _intro(runs: list[dict[str, Any]]) -> list[Block]:
    n = len(runs[0]["items"])
    return [
        Heading("qa-lab comparison report", 1),
        Text(
            f"{len(runs)} configurations, {n} items ({len(set(clusters(runs[0])))} seed "
            "clusters; CIs resample clusters), eval set "
            f"`{runs[0]['tags'].get('qa_lab.eval_set_hash')}`."
        ),
    ]


def _top_figure(figs: dict[str, Any]) -> list[Block]:
    """The one picture under the summary: the interaction plot, else the sweep or the bars."""
    name = next((n for n in ("interaction", "sweep", "metrics") if n in figs), None)
    return [Figure(name, CAPTIONS[name])] if name else []


def _more_figures(figs: dict[str, Any], shown: list[Block]) -> list[Block]:
    used = {b.name for b in shown if isinstance(b, Figure)} | {"topics", "cost"}
    rest = [Figure(n, CAPTIONS[n]) for n in CAPTIONS if n in figs and n not in used]
    return [Heading("More figures"), *rest] if rest else []


def build_report(
    runs: list[dict[str, Any]], boot: Any, decision: DecisionOptions | None = None
) -> Report:
    """The report of a sweep's runs: blocks, their figures, the metrics and verdict to log.

    `boot` holds the bootstrap's `resamples` and `seed` (`metrics.BootstrapOptions`);
    `decision` the power, smallest effects of interest and prices (`metrics.MetricsOptions.
    decision`; None: `DecisionOptions()`, no smallest effects, costs in device hours).
    """
    decision = decision or DecisionOptions()
    report_replicates.pooled_ci(runs, boot)
    comparisons = comparisons_with_power(runs, paired_comparisons(runs, boot), decision)
    eff = effects_with_power(runs, effects(runs, boot), decision)
    headline = headline_metric(runs)
    costs = report_cost.config_costs(runs, decision.prices)
    figs = _figures(runs, headline, costs)
    per_1k = {c.label: c.cost.per_1k_answers for c in costs}
    found = verdicts(runs, comparisons, per_1k, decision.alpha)
    lines = verdict_lines(found, comparisons, decision.power)
    top = _top_figure(figs)
    blocks = [
        *_intro(runs),
        *verdict_section(lines),
        *summary(runs, comparisons, eff),
        *top,
        *report_sections.grid_section(runs),
        *report_replicates.seeds_section(runs, headline, boot),
        *report_sections.repeats_section(runs, headline),
        *report_sections.effects_section(runs, eff, headline),
        *report_sections.comparisons_section(runs, comparisons, headline),
        *report_sections.topic_section(runs, figs),
        *report_sections.diagnostics_section(runs),
        *report_cost.cost_section(costs, "cost" in figs),
        *report_sections.ranking_section(runs),
        *report_sections.retrieval_section(runs),
        *report_why.attribution_section(runs),
        *report_why.fine_tune_only_section(runs),
        # why a config won: train vs test, near-duplicates, the split's leakage
        *report_why.train_vs_test_section(runs),
        *report_why.near_dup_section(runs),
        *report_why.leakage_section(runs),
        *side_by_side_section(runs, headline),
        *_more_figures(figs, top),
    ]
    logged = {**_comparison_metrics(comparisons), **_effect_metrics(eff)}
    return Report(tuple(blocks), figs, logged, verdict_tag(lines))


def report_sweep(cfg: Any, parent_run_id: str) -> str:
    """Build the report of a finished sweep from MLflow and log it on the parent run."""
    from qa_lab.metrics import MetricsOptions

    runs = _load_runs(parent_run_id)
    opts = MetricsOptions.from_cfg(cfg.metrics)
    report = build_report(runs, opts.bootstrap, opts.decision)
    md = report.markdown
    with tracking.resume_run(parent_run_id):
        tracking.set_tags({"verdict": report.verdict})
        tracking.log_text(md, "report/report.md")
        tracking.log_text(report.html(), "report/report.html")
        for name, fig in report.figures.items():
            tracking.log_figure(fig, f"report/{name}.png")
        tracking.log_metrics(report.logged)
    print(report_sections.grid_plain(runs))
    print(f"report: runs:/{parent_run_id}/report/report.html — {tracking.ui_command(cfg.tracking)}")
    return md
