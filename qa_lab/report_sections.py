"""The report's result sections as blocks: grid, effects, comparisons, topics, diagnostics.

Retrieval quality and ranking against the gold chunks are here too. Details are folded per
metric with the headline metric's group open; a metric constant across every config is stated
in one line instead of a table of zeros; significant differences after Holm carry
`report_blocks.SIG_MARK`.
"""

from __future__ import annotations

from typing import Any

from qa_lab.report_blocks import (
    SIG_MARK,
    SIGNIFICANCE,
    Beside,
    Block,
    Figure,
    Fold,
    Heading,
    Text,
    arrow,
    fmt_ci,
    fmt_diff,
    fmt_p,
    table,
    to_markdown,
)
from qa_lab.report_stats import constant_value

HEADLINE = ("bleu", "rougeL_f1", "bertscore_f1", "exact_match", "token_f1")
DIAGNOSTICS = (
    "runaway_rate",
    "truncation_rate",
    "unfinished_rate",
    "empty_rate",
    "repetition_rate",
    "markup_echo_rate",
    "length_ratio",
    "idk_rate",
)
RETRIEVAL = (
    "retrieval_top1_score",
    "retrieval_best_rougeL",
    "retrieval_best_cosine",
    "copy_rate",
)
# Ranking against the gold chunks and answer words in context (run names), as the report says.
RANKING = {
    "retrieval/recall_at_k": "recall@k",
    "retrieval/mrr": "MRR",
    "retrieval/ndcg_at_k": "nDCG@k",
    "retrieval/answer_in_context": "answer in context",
}
TOPIC_METRICS = ("rougeL_f1", "bertscore_f1")


def headline_columns(runs: list[dict[str, Any]]) -> list[str]:
    """The grid's metrics: the `HEADLINE` ones every run logged."""
    return [m for m in HEADLINE if all(m in r["ci"] for r in runs)]


def _same_everywhere(runs: list[dict[str, Any]], metric: str) -> float | None:
    """A run-level metric's value when every run has it with a zero-width CI, else None."""
    values = {
        (r["ci"][metric]["mean"], r["ci"][metric]["low"], r["ci"][metric]["high"]) for r in runs
    }
    if len(values) != 1:
        return None
    mean, low, high = values.pop()
    return mean if mean == low == high else None


def grid_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Each run's headline metrics, mean [95% CI]; constant metrics said in one line."""
    columns = headline_columns(runs)
    constant = {m: v for m in columns if (v := _same_everywhere(runs, m)) is not None}
    shown = [m for m in columns if m not in constant]
    notes = [
        Text(f"{m} is {v:.4f} in every config (zero-width CI): left out of the grid.")
        for m, v in constant.items()
    ]
    return [
        Heading("Grid (mean [95% CI])"),
        table(
            ["config", *(f"{m} {arrow(m)}" for m in shown)],
            [[r["label"], *(fmt_ci(r["ci"][m]) for m in shown)] for r in runs],
        ),
        *notes,
    ]


def grid_plain(runs: list[dict[str, Any]]) -> str:
    """The grid as a markdown table, printed at the end of a sweep."""
    return to_markdown(grid_section(runs)[1:2])


def _by_metric(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["metric"], []).append(row)
    return out


def _constant_note(runs: list[dict[str, Any]], metric: str) -> Text | None:
    value = constant_value(runs, metric)
    if value is None:
        return None
    return Text(f"{metric}: {value:.3f} on every item of every config, no differences to test.")


def _folds(
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    headline: str | None,
    columns: tuple[str, ...],
    cells: Any,
) -> list[Block]:
    """One fold per metric of `rows` (the headline's open), or a line for a constant metric.

    `cells(row)` gives a row's cells under `columns`; rows significant after Holm are marked.
    """
    blocks: list[Block] = []
    for metric, group in _by_metric(rows).items():
        note = _constant_note(runs, metric)
        if note is not None:
            blocks.append(note)
            continue
        body = table(
            columns,
            [cells(row) for row in group],
            marked=[i for i, row in enumerate(group) if row["p_holm"] < SIGNIFICANCE],
        )
        blocks.append(Fold(f"{metric} {arrow(metric)}", (body,), open=metric == headline))
    return blocks


def _power_columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The MDE and underpowered columns, when the rows carry their power (`report_stats`)."""
    return ("MDE", "power") if rows and "mde" in rows[0] else ()


def _power_cells(row: dict[str, Any]) -> list[str]:
    if "mde" not in row:
        return []
    return [f"{row['mde']:.4f}", "underpowered" if row["underpowered"] else ""]


def _power_note(rows: list[dict[str, Any]]) -> list[Block]:
    """How to read the MDE column, with the power and level it is stated at."""
    if not rows or "power" not in rows[0]:
        return []
    return [
        Text(
            f"MDE: the smallest true difference this design detects with {rows[0]['power']:.0%} "
            f"power at α = {rows[0]['alpha']:g} (normal approximation over the seed clusters' "
            "mean differences). **underpowered**: the CI includes 0 and the MDE exceeds the "
            "metric's smallest effect of interest (`metrics.decision.min_effect`): this null "
            "result cannot rule out an effect worth having."
        )
    ]


def comparisons_section(
    runs: list[dict[str, Any]], comparisons: list[dict[str, Any]], headline: str | None
) -> list[Block]:
    """Every pair of configs, one folded table per metric (the headline's open)."""
    if not comparisons:
        return []
    return [
        Heading("Paired comparisons (b − a; p Holm-adjusted per metric)"),
        Text(f"{SIG_MARK} marks a difference whose Holm-adjusted p is below {SIGNIFICANCE}."),
        *_power_note(comparisons),
        *_folds(
            runs,
            comparisons,
            headline,
            (
                "a",
                "b",
                "diff [95% CI]",
                "p",
                "p (Holm)",
                "effect size dz",
                *_power_columns(comparisons),
            ),
            lambda c: [
                c["a"],
                c["b"],
                fmt_diff(c["diff"], c["ci_low"], c["ci_high"]),
                f"{c['p_value']:.4f}",
                fmt_p(c["p_holm"]),
                f"{c['effect_size']:+.3f}",
                *_power_cells(c),
            ],
        ),
    ]


def effects_section(
    runs: list[dict[str, Any]], eff: list[dict[str, Any]], headline: str | None
) -> list[Block]:
    """The 2x2 decomposition, one folded table per metric (the headline's open)."""
    if not eff:
        return []
    return [
        Heading("2×2 decomposition"),
        Text(
            "RAG = mean over fine-tuning levels of (with − without retrieval); "
            "FT = mean over retrieval levels of (LoRA − vanilla); "
            "interaction = (rag_lora − lora) − (rag − vanilla). p is Holm-adjusted over each "
            f"metric's three effects; {SIG_MARK} marks p below {SIGNIFICANCE}; MDE and "
            "underpowered as under the paired comparisons."
        ),
        *_folds(
            runs,
            eff,
            headline,
            ("effect", "estimate [95% CI]", "p", "p (Holm)", *_power_columns(eff)),
            lambda e: [
                e["effect"],
                fmt_diff(e["estimate"], e["ci_low"], e["ci_high"]),
                f"{e['p_value']:.4f}",
                fmt_p(e["p_holm"]),
                *_power_cells(e),
            ],
        ),
    ]


def topic_names(runs: list[dict[str, Any]]) -> list[str]:
    """The topics of the eval set, sorted (an item without one is `unknown`)."""
    return sorted({it.topic or "unknown" for it in runs[0]["items"]})


def topic_mean(run: dict[str, Any], topic: str, metric: str) -> float | None:
    """A run's mean of `metric` over one topic's items (None when none is scored)."""
    values = [
        it.scores[metric]
        for it in run["items"]
        if (it.topic or "unknown") == topic and metric in it.scores
    ]
    return sum(values) / len(values) if values else None


def _topic_cell(run: dict[str, Any], topic: str) -> str:
    n = sum((it.topic or "unknown") == topic for it in run["items"])
    if not n:
        return "–"
    cells = [topic_mean(run, topic, m) for m in TOPIC_METRICS]
    return " / ".join("–" if v is None else f"{v:.3f}" for v in cells) + f" (n={n})"


def topic_section(runs: list[dict[str, Any]], figures: dict[str, Any]) -> list[Block]:
    """Per-topic means as a table, with the headline's per-topic heatmap beside it."""
    topics = topic_names(runs)
    body = table(
        ["config", *topics], [[r["label"]] + [_topic_cell(r, t) for t in topics] for r in runs]
    )
    heading = Heading(f"Per topic (mean {' / '.join(TOPIC_METRICS)})")
    if "topics" not in figures:
        return [heading, body]
    return [heading, Beside((Figure("topics", "per-topic heatmap"), body))]


def _speed(run: dict[str, Any], key: str) -> str:
    value = run["metrics"].get(key)
    return f"{value:.2f}" if value is not None else "cached"


def diagnostics_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Each config's failure rates with 95% CIs, and its decoding speed."""
    diag = [m for m in DIAGNOSTICS if m in runs[0]["ci"]]
    return [
        Heading("Diagnostics"),
        Text(
            "Rates of answers flagged per item, mean [95% CI]: repetition = a 4-gram thrice "
            "and 30% of 4-grams repeated (a loop); markup echo = the prompt's `<passage n>` "
            "tags or Q:/A: turns copied into the answer (`qa_lab/diagnostics.py`)."
        ),
        table(
            ["config"] + [f"{m} {arrow(m)}" for m in diag] + ["answers/s", "tokens/s"],
            [
                [r["label"]]
                + [fmt_ci(r["ci"][m], 3) if m in r["ci"] else "–" for m in diag]
                + [_speed(r, "answers_per_s"), _speed(r, "tokens_per_s")]
                for r in runs
            ],
        ),
    ]


def retrieval_section(runs: list[dict[str, Any]]) -> list[Block]:
    """How close the retrieved passages were to the question and the reference, per config."""
    retr = [m for m in RETRIEVAL if any(m in r["ci"] for r in runs)]
    if not retr:
        return []
    return [
        Heading("Retrieval quality"),
        table(
            ["config", *retr],
            [
                [r["label"]] + [f"{r['ci'][m]['mean']:.3f}" if m in r["ci"] else "–" for m in retr]
                for r in runs
                if any(m in r["ci"] for m in retr)
            ],
        ),
    ]


def ranking_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Recall@k, MRR, nDCG@k against the gold chunks and answer-in-context, per RAG config."""
    shown = [r for r in runs if any(m in r["ci"] for m in RANKING)]
    if not shown:
        return []
    ks = [r["params"].get("retriever.k", "") for r in shown]
    k_column = len(set(ks)) > 1
    return [
        Heading("Retrieval (against the gold chunks)"),
        Text(
            "k is the number of passages retrieved; answer in context is the share of the "
            "reference's content words found in them (it needs no gold)."
        ),
        table(
            [
                "config",
                *(["k"] if k_column else []),
                *(f"{v} {arrow(m)}" for m, v in RANKING.items()),
            ],
            [
                [r["label"], *([k] if k_column else [])]
                + [fmt_ci(r["ci"][m]) if m in r["ci"] else "–" for m in RANKING]
                for r, k in zip(shown, ks)
            ],
        ),
    ]


def repeats_section(runs: list[dict[str, Any]], headline: str | None) -> list[Block]:
    """Configs answered several times per item (`generation.repeats`): the sampling spread.

    Next to the CI over items, the within-item sd says how much one item's score moves from
    one sampled answer to the next (a config's mean moves by about sd / sqrt(items x repeats)).
    """
    sampled = [r for r in runs if r.get("metrics", {}).get("repeats/n", 1) > 1]
    if not sampled or headline is None:
        return []
    shown = list(dict.fromkeys([headline, "token_f1"]))
    rows = [
        [r["label"], f"{r['metrics']['repeats/n']:.0f}"]
        + [_spread(r, m) for m in shown]
        + [fmt_ci(r["ci"][headline]) if headline in r["ci"] else "–"]
        for r in sampled
    ]
    return [
        Heading("Sampling repeats"),
        Text(
            "Configs that sampled several answers per item: each item's score is the mean over "
            "its answers (the CIs resample items with all their answers); the within-item sd "
            "is the mean over items of the sd across one item's answers."
        ),
        table(
            ["config", "answers per item", *(f"within-item sd {m}" for m in shown),
             f"{headline} mean [95% CI]"],
            rows,
        ),
    ]  # fmt: skip


def _spread(run: dict[str, Any], metric: str) -> str:
    value = run["metrics"].get(f"repeats/{metric}_sd")
    return "–" if value is None else f"{value:.4f}"
