"""A run's scores: per-item scores, the judge, the attribution cells, CIs and breakdowns.

`metrics.score_items` scores answers item by item; this module turns those columns into what
one evaluate run logs (`RunScores`): the judge's verdicts when it runs, the failure-attribution
cells (they need every other column first), one cluster-bootstrap CI per metric and the flat
run metrics with per-topic and near-duplicate splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qa_lab import retrieval_metrics as rm
from qa_lab.errors import QaLabError
from qa_lab.metrics import (
    RUN_NAMES,
    BootstrapOptions,
    MetricsOptions,
    ScoreResult,
    put_columns,
    score_items,
)
from qa_lab.records import EvalRow


@dataclass(frozen=True)
class RunScores:
    """Everything an evaluate run logs about its answers.

    `rows` carry their per-item `scores` (and judge replies); `corpus` the corpus values and
    per-item means; `ci` one CI per metric (mean, low, high, n, method); `summary` the flat
    run metrics (headline with `_ci_low`/`_ci_high`, `topic/<t>/<m>`, near-dup splits);
    `topics` the per-topic means.
    """

    rows: list[EvalRow]
    corpus: dict[str, Any]
    ci: dict[str, dict[str, Any]]
    summary: dict[str, float]
    topics: dict[str, dict[str, float]]


def score_rows(
    rows: Sequence[EvalRow],
    opts: MetricsOptions,
    *,
    embedder: str,
    cache_dir: str | Path,
) -> RunScores:
    """Per-item scores, the judge if asked, CIs (cluster bootstrap by seed) and breakdowns."""
    scored = score_items(rows, opts, embedder=embedder, cache_dir=cache_dir)
    replies: list[str | None] = [None] * len(rows)
    if "judge" in opts.groups:
        replies = _judge(rows, scored, opts, cache_dir)
    put_columns(scored.per_item, rm.attribution_columns(rows, scored.column, opts.attribution))
    rows, scored, spread = _pool_repeats(rows, scored)
    ci = _cis(rows, scored, opts.bootstrap)
    topics = scored.topic_means()
    return RunScores(
        rows=[
            replace(r, scores=s, **({"judge_reply": j} if j is not None else {}))
            for r, s, j in zip(rows, scored.per_item, replies)
        ],
        corpus=scored.corpus,
        ci=ci,
        summary={**_summary(rows, scored, ci, topics), **spread},
        topics=topics,
    )


def _pool_repeats(
    rows: Sequence[EvalRow], scored: ScoreResult
) -> tuple[list[EvalRow], ScoreResult, dict[str, float]]:
    """Sampled repeats (`generation.repeats`) pooled: one row per item, its scores the mean.

    The CIs and paired tests then resample items, each carrying the mean over its answers
    (the sampling noise averaged in, not counted as extra items). Returns the items' first
    rows (with the other answers in `repeat_answers`), the pooled scores, and the spread:
    `repeats/<metric>_sd`, the mean over items of the SD across their answers, and
    `repeats/n`. Without repeats, the rows and scores as they were, and no spread.
    """
    n = sum(1 for r in rows if not r.repeat)  # repeat 0, or None without repeats
    if n == len(rows):
        return list(rows), scored, {}
    repeats = len(rows) // n
    for j, row in enumerate(rows):  # e.g. a predictions file with a `repeat` column of its own
        if j >= n * repeats or row.item_id != rows[j % n].item_id or (row.repeat or 0) != j // n:
            raise QaLabError(
                f"row {j + 1} ({row.item_id}, repeat {row.repeat}): sampled repeats must come "
                "repeat by repeat, every item once in each"
            )
    first = [
        replace(row, repeat_answers=tuple(rows[r * n + i].prediction for r in range(1, repeats)))
        for i, row in enumerate(rows[:n])
    ]
    spread = {f"repeats/{name}_sd": sd for name, sd in scored.repeat_spread(n).items()}
    return first, scored.pooled(n), {**spread, "repeats/n": float(repeats)}


def _judge(
    rows: Sequence[EvalRow], scored: ScoreResult, opts: MetricsOptions, cache_dir: str | Path
) -> list[str | None]:
    """Add the judge's per-item columns and run info; return its replies (row order)."""
    from qa_lab import judge

    judged, replies, info = judge.judge_rows(rows, opts.judge, cache_dir)
    for scores, extra in zip(scored.per_item, judged):
        scores.update(extra)
    scored.corpus.update(info)
    return list(replies)


def _cis(
    rows: Sequence[EvalRow], scored: ScoreResult, boot: BootstrapOptions
) -> dict[str, dict[str, Any]]:
    """One CI per metric; corpus BLEU resampled from its per-item statistics."""
    from qa_lab import stats

    opts = {"resamples": boot.resamples, "confidence": boot.confidence, "seed": boot.seed}
    clusters = [r.seed_id or r.item_id or str(i) for i, r in enumerate(rows)]
    ci: dict[str, dict[str, Any]] = {}
    if scored.bleu_stats is not None:
        ci["bleu"] = stats.bootstrap_corpus_ci(
            len(rows), scored.corpus_bleu, clusters=clusters, **opts
        ).as_dict()
    for name in scored.metric_names():
        run_name = RUN_NAMES.get(name, name)
        ci[run_name] = stats.bootstrap_ci(scored.column(name), clusters=clusters, **opts).as_dict()
    return ci


def _summary(
    rows: Sequence[EvalRow],
    scored: ScoreResult,
    ci: dict[str, dict[str, Any]],
    topics: dict[str, dict[str, float]],
) -> dict[str, float]:
    """The flat run metrics: each CI's mean and bounds, per-topic and near-dup means."""
    summary: dict[str, float] = {}
    for name, c in ci.items():
        summary.update({name: c["mean"], f"{name}_ci_low": c["low"], f"{name}_ci_high": c["high"]})
    for topic, means in topics.items():
        summary.update({f"topic/{topic}/{name}": v for name, v in means.items()})
    if rows and all(r.near_dup is not None for r in rows):
        labels = ["near_dup" if r.near_dup else "not_near_dup" for r in rows]
        for group, means in scored.group_means(labels).items():
            summary.update({f"{group}/{name}": v for name, v in means.items()})
    return summary
