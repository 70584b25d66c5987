"""The report's "why" sections as blocks: misses, fine-tune-only wins, train vs test, leakage.

Where RAG's misses come from, what only the fine-tune got right, train vs test, the
near-duplicate split and the split's leakage audit. They explain a winner rather than rank it,
so they come after the results.
"""

from __future__ import annotations

import math
from typing import Any

from qa_lab.records import EvalRow
from qa_lab.report_blocks import Block, Bullets, Heading, Text, fmt_ci, table
from qa_lab.report_sections import TOPIC_METRICS
from qa_lab.retrieval_metrics import ATTRIBUTION_CELLS

# A fine-tune's closed-book or RAG run and the base-model run it is compared with.
FINE_TUNE_BASE = {"lora": "vanilla", "rag_lora": "rag"}


def _cell_counts(run: dict[str, Any]) -> dict[str, int]:
    """How many of a run's items fall in each attribution cell (items with gold only)."""
    return {
        cell: sum(int(it.scores.get(cell) == 1.0) for it in run["items"])
        for cell in ATTRIBUTION_CELLS.values()
    }


def attribution_section(runs: list[dict[str, Any]]) -> list[Block]:
    """The 2x2 of gold retrieved x answer right per RAG config, and which miss dominates."""
    shown = [(r, _cell_counts(r)) for r in runs if "retriever_miss" in r["items"][0].scores]
    if not shown:
        return []
    rows, verdicts = [], []
    for run, counts in shown:
        n = sum(counts.values())
        for gold in (True, False):
            cells = [counts[ATTRIBUTION_CELLS[(gold, right)]] for right in (True, False)]
            rows.append(
                [run["label"], "yes" if gold else "no"]
                + [f"{c} ({c / n:.0%})" if n else "0" for c in cells]
            )
        verdicts.append(f"**{run['label']}:** {_dominant_miss(counts)}")
    return [
        Heading("Where RAG's misses come from"),
        Text(
            "Items with known gold chunks: was one retrieved, was the answer right "
            "(`metrics.attribution`)? A wrong answer without the gold chunk is the retriever's "
            "miss, one with it the generator's."
        ),
        table(["config", "gold retrieved", "answer right", "answer wrong"], rows),
        Bullets(tuple(verdicts)),
    ]


def _dominant_miss(counts: dict[str, int]) -> str:
    """One line: which of the retriever's and the generator's misses is the larger."""
    retriever, generator = counts["retriever_miss"], counts["generator_miss"]
    misses = retriever + generator
    if not misses:
        return "no misses."
    split = f"{retriever} of {misses} misses had no gold chunk retrieved, {generator} had one"
    if retriever == generator:
        return f"{split}: neither dominates."
    return f"{split}: the {'retriever' if retriever > generator else 'generator'} dominates."


def _base_run(lora: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The base-model run a fine-tune's run is compared with: same retriever, same LLM."""
    base = FINE_TUNE_BASE.get(lora["tags"].get("qa_lab.variant", ""))

    def setup(run: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v for k, v in run["params"].items() if k.startswith("retriever.") or k == "llm.name"
        }

    return next(
        (r for r in runs if r["tags"].get("qa_lab.variant") == base and setup(r) == setup(lora)),
        None,
    )


def _paired_correct(
    lora: dict[str, Any], base: dict[str, Any]
) -> tuple[dict[str, int], list[EvalRow]]:
    """Counts of (LoRA right?, base right?) by item id, and the items only LoRA got right.

    Items unscored on either side (an unparseable judge verdict: NaN) are left out.
    """
    right = {it.item_id: it.scores.get("correct") for it in base["items"]}
    names = {(1.0, 1.0): "both", (1.0, 0.0): "only LoRA", (0.0, 1.0): "only base"}
    counts = dict.fromkeys(("only LoRA", "only base", "both", "neither"), 0)
    only_lora: list[EvalRow] = []
    for it in lora["items"]:
        pair = (it.scores.get("correct"), right.get(it.item_id))
        if all(v in (0.0, 1.0) for v in pair):
            counts[names.get(pair, "neither")] += 1
            if pair == (1.0, 0.0):
                only_lora.append(it)
    return counts, only_lora


def fine_tune_only_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Items right only under LoRA, only under the base model, both, neither, and examples."""
    rows, examples = [], []
    for lora in runs:
        base = _base_run(lora, runs)
        if base is None or not all("correct" in r["items"][0].scores for r in (lora, base)):
            continue
        counts, only_lora = _paired_correct(lora, base)
        rows.append([lora["label"], base["label"], *counts.values()])
        examples += [f"{lora['label']}: {it.question}" for it in only_lora[:3]]
    if not rows:
        return []
    return [
        Heading("What only the fine-tune got right"),
        Text(
            "Each LoRA run against the base model's run with the same retriever (vanilla for "
            "lora, rag for rag_lora), item by item on `correct` (`metrics.attribution`)."
        ),
        table(["LoRA run", "base run", "only LoRA", "only base", "both", "neither"], rows),
        *(
            [Text("Questions only the fine-tune got right:"), Bullets(tuple(examples))]
            if examples
            else []
        ),
    ]


def _closed_book(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs without retrieval that scored the seeded training sample."""
    return [
        r
        for r in runs
        if f"train_sample/{TOPIC_METRICS[0]}" in r["metrics"]
        and (r["params"].get("retriever.kind") == "none" or r["params"].get("retriever.k") == "0")
    ]


def train_vs_test_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Closed-book scores on a seeded training sample next to the eval split's.

    A fine-tune far better on training items than on test ones memorised; one no better than
    the base model on its own training items learned nothing. Only closed-book runs are shown:
    a RAG run's test score had context that its train-sample answers did not.
    """
    closed_book = _closed_book(runs)
    shown = [
        m
        for m in TOPIC_METRICS
        if all(m in r["ci"] and f"train_sample/{m}" in r["metrics"] for r in closed_book)
    ]
    if not closed_book or not shown:
        return []
    header = ["config"]
    for m in shown:
        header += [f"{m} test", f"{m} train", "train − test"]
    rows = []
    for r in closed_book:
        cells = [r["label"]]
        for m in shown:
            train = {
                k: r["metrics"][f"train_sample/{m}{suffix}"]
                for k, suffix in (("mean", ""), ("low", "_ci_low"), ("high", "_ci_high"))
            }
            gap = train["mean"] - r["ci"][m]["mean"]
            cells += [fmt_ci(r["ci"][m]), fmt_ci(train), f"{gap:+.3f}"]
        rows.append(cells)
    n_train = int(closed_book[0]["metrics"].get("train_sample/n", 0))
    return [
        Heading(
            f"Did fine-tuning learn? (closed-book: {n_train} seeded training items vs the "
            "eval split)"
        ),
        Text(
            "How to read it: a fine-tune far better on train than on test memorised; one no "
            "better than the base model on its own training items learned nothing."
        ),
        table(header, rows),
    ]


def _mean_n(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} (n={len(values)})" if values else "–"


def near_dup_section(runs: list[dict[str, Any]]) -> list[Block]:
    """Scores on items with a near-duplicate training question against the rest."""
    if not all(it.near_dup is not None for it in runs[0]["items"]):
        return []
    header = ["config"] + [f"{m} {part}" for m in TOPIC_METRICS for part in ("near-dup", "rest")]
    rows = []
    for r in runs:
        cells = [r["label"]]
        for m in TOPIC_METRICS:
            for near in (True, False):
                values = [
                    it.scores[m]
                    for it in r["items"]
                    if bool(it.near_dup) is near and m in it.scores
                ]
                cells.append(_mean_n(values))
        rows.append(cells)
    return [
        Heading("Near-duplicate split"),
        Text(
            "Items whose nearest training question is a near-duplicate (cosine ≥ "
            "`eval.near_dup_threshold`) against the rest: a win that lives in the near-dup "
            "columns comes from leakage into the index or the fine-tune."
        ),
        table(header, rows),
    ]


def leakage_section(runs: list[dict[str, Any]]) -> list[Block]:
    """The split's leakage audit (logged by the dataset build, carried by each evaluate run)."""
    metrics = runs[0]["metrics"]
    audit = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("leakage/")}
    overlap = audit.pop("evidence_overlap", None)
    if not audit:
        return []
    rows = [[k, f"{v:.3f}" if k.endswith("rate") else f"{v:.0f}"] for k, v in sorted(audit.items())]
    shared: list[Block] = []
    if overlap is not None and not math.isnan(overlap):
        shared.append(
            Text(
                f"Evidence overlap {overlap:.3f}: the share of test items whose gold chunk also "
                "holds a training item's answer. Facts shared through the corpus are the design "
                "(the fine-tune is meant to learn them); the question leakage above is what "
                "must stay low."
            )
        )
    return [
        Heading("Leakage audit of the split (test vs train, from the dataset build)"),
        table(["measure", "value"], rows),
        *shared,
    ]
