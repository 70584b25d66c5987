"""Comparison reports built from MLflow runs alone: tables, paired tests, 2x2 effects, figures.

`report_sweep` reads a sweep's child runs (their per-item scores artifact, tags and params),
so any finished sweep can be re-reported later with `evaluate.py report=<parent run id>`.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from itertools import combinations
from typing import Any

from qa_lab import figures, report_html, tracking
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.retrieval_metrics import ATTRIBUTION_CELLS

HEADLINE = ("bleu", "rougeL_f1", "bertscore_f1", "exact_match", "token_f1")
PAIRED = ("rougeL_f1", "bertscore_f1", "token_f1", "sentence_bleu", "exact_match")
DIAGNOSTICS = (
    "runaway_rate",
    "truncation_rate",
    "unfinished_rate",
    "empty_rate",
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
# A fine-tune's closed-book or RAG run and the base-model run it is compared with.
FINE_TUNE_BASE = {"lora": "vanilla", "rag_lora": "rag"}
SWEPT_PARAMS = (
    "retriever.kind",
    "retriever.k",
    "model.learning_rate",
    "model.epochs",
    "model.r",
    "llm.name",
)
TOPIC_METRICS = ("rougeL_f1", "bertscore_f1")
VARIANTS_2X2 = ("vanilla", "rag", "lora", "rag_lora")


def arrow(metric: str) -> str:
    """Direction of a metric for readers: up is better unless it is a failure rate."""
    from qa_lab.metrics import HIGHER_IS_BETTER

    if metric == "length_ratio":
        return "→1"
    return "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"


def fmt_ci(c: dict[str, Any]) -> str:
    """`mean [low, high]` with 4 decimals."""
    return f"{c['mean']:.4f} [{c['low']:.4f}, {c['high']:.4f}]"


def metric_table_md(ci: dict[str, dict[str, Any]]) -> str:
    """One run's metrics with n, 95% CI, the resampling method and direction."""
    lines = ["| metric | | mean [95% CI] | n | clusters | method |", "|---|---|---|---|---|---|"]
    for name, c in ci.items():
        lines.append(
            f"| {name} | {arrow(name)} | {fmt_ci(c)} | {c['n']} | {c.get('n_clusters', '')} "
            f"| {c.get('method', '')} |"
        )
    return "\n".join(lines) + "\n"


def sample_ids(item_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """The same qualitative samples for every run on one eval set (chosen by id, seeded)."""
    ordered = sorted(item_ids)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))))


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

    `scored` is the run's `metrics.RunScores`; the metric table is printed too.
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
    return runs


def _items(run_id: str) -> list[EvalRow]:
    """A run's scored rows, read back from its per_item.jsonl artifact."""
    where = f"runs:/{run_id}/per_item.jsonl"
    lines = tracking.run_artifact_text(run_id, "per_item.jsonl").splitlines()
    return [
        EvalRow.from_dict(json.loads(line), where=f"{where}:{n}")
        for n, line in enumerate(lines, start=1)
        if line.strip()
    ]


def paired_comparisons(runs: list[dict[str, Any]], boot: Any) -> list[dict[str, Any]]:
    """Every pair of runs on every paired metric, Holm-adjusted within each metric."""
    from qa_lab import stats

    out = []
    clusters = _clusters(runs[0])
    for metric in _paired_metrics(runs):
        rows = []
        for a, b in combinations(runs, 2):
            va = [it.scores[metric] for it in a["items"]]
            vb = [it.scores[metric] for it in b["items"]]
            test = stats.paired_test(
                va, vb, clusters=clusters, resamples=int(boot.resamples), seed=int(boot.seed)
            )
            rows.append({"a": a["label"], "b": b["label"], "metric": metric, **test})
        for row, adj in zip(rows, stats.holm([r["p_value"] for r in rows])):
            row["p_holm"] = adj
        out.extend(rows)
    return out


def effects(runs: list[dict[str, Any]], boot: Any) -> list[dict[str, Any]]:
    """The 2x2 decomposition (RAG, fine-tuning, interaction) when the sweep is that grid."""
    from qa_lab import stats

    by_variant = {r["tags"].get("qa_lab.variant"): r for r in runs}
    if len(runs) != 4 or set(by_variant) != set(VARIANTS_2X2):
        return []
    clusters = _clusters(runs[0])
    out = []
    for metric in _paired_metrics(runs):
        cells = [[it.scores[metric] for it in by_variant[v]["items"]] for v in VARIANTS_2X2]
        result = stats.effects_2x2(
            *cells, clusters=clusters, resamples=int(boot.resamples), seed=int(boot.seed)
        )
        for name in ("rag", "ft", "interaction"):
            out.append({"effect": name, "metric": metric, **result[name]})
    return out


def _clusters(run: dict[str, Any]) -> list[str]:
    """Bootstrap clusters of a run's items: seed lineages (an item without one is its own)."""
    return [it.seed_id or it.item_id for it in run["items"]]


def _paired_metrics(runs: list[dict[str, Any]]) -> list[str]:
    """The paired metrics the runs scored (read off the first item)."""
    return [m for m in PAIRED if m in runs[0]["items"][0].scores]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def build_report(
    runs: list[dict[str, Any]], boot: Any
) -> tuple[str, dict[str, Any], dict[str, float]]:
    """Markdown report, its figures, and the comparison metrics to log on the parent.

    `boot` holds the bootstrap's `resamples` and `seed` (`metrics.BootstrapOptions`).
    """
    comparisons = paired_comparisons(runs, boot)
    eff = effects(runs, boot)
    md = [
        *_summary_section(runs),
        *_comparisons_section(comparisons),
        *_effects_section(eff),
        *_topic_section(runs),
        *_diagnostics_section(runs),
        *_ranking_section(runs),
        *_retrieval_section(runs),
        *_attribution_section(runs),
        *_fine_tune_only_section(runs),
        # why a config won: train vs test, near-duplicates, the split's leakage
        *_train_vs_test(runs),
        *_near_dup_split(runs),
        *_leakage_audit(runs),
        *_side_by_side_section(runs),
    ]
    logged = {**_comparison_metrics(comparisons), **_effect_metrics(eff)}
    return "\n".join(md) + "\n", _figures(runs), logged


def _headline(runs: list[dict[str, Any]]) -> list[str]:
    return [m for m in HEADLINE if m in runs[0]["ci"]]


def _grid_table(runs: list[dict[str, Any]], header: list[str]) -> str:
    """Each run's headline metrics, mean [95% CI] (`header`: the metric columns' titles)."""
    headline = _headline(runs)
    return _table(
        ["config", *header], [[r["label"]] + [fmt_ci(r["ci"][m]) for m in headline] for r in runs]
    )


def _summary_section(runs: list[dict[str, Any]]) -> list[str]:
    """What was compared (configs, items, clusters, the eval set) and the headline grid."""
    n = len(runs[0]["items"])
    clusters = len(set(_clusters(runs[0])))
    return [
        f"# qa-lab comparison report\n\n{len(runs)} configurations, {n} items "
        f"({clusters} seed clusters; CIs resample clusters), eval set "
        f"`{runs[0]['tags'].get('qa_lab.eval_set_hash')}`.\n",
        "## Grid (mean [95% CI])\n",
        _grid_table(runs, [f"{m} {arrow(m)}" for m in _headline(runs)]),
    ]


def _comparisons_section(comparisons: list[dict[str, Any]]) -> list[str]:
    if not comparisons:
        return []
    return [
        "\n## Paired comparisons (b − a; p Holm-adjusted per metric)\n",
        _table(
            ["a", "b", "metric", "diff [95% CI]", "p", "p (Holm)", "effect size dz"],
            [
                [
                    c["a"],
                    c["b"],
                    c["metric"],
                    f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                    f"{c['p_value']:.4f}",
                    f"{c['p_holm']:.4f}",
                    f"{c['effect_size']:+.3f}",
                ]
                for c in comparisons
            ],
        ),
    ]


def _comparison_metrics(comparisons: list[dict[str, Any]]) -> dict[str, float]:
    """`compare/<a>_vs_<b>/<metric>/{diff,ci_low,ci_high,p_value}` (p Holm-adjusted)."""
    logged: dict[str, float] = {}
    for c in comparisons:
        base = f"compare/{metric_key(c['a'])}_vs_{metric_key(c['b'])}/{c['metric']}"
        logged.update(
            {
                f"{base}/diff": c["diff"],
                f"{base}/ci_low": c["ci_low"],
                f"{base}/ci_high": c["ci_high"],
                f"{base}/p_value": c["p_holm"],
            }
        )
    return logged


def _effects_section(eff: list[dict[str, Any]]) -> list[str]:
    if not eff:
        return []
    return [
        "\n## 2×2 decomposition\n",
        "RAG = mean over fine-tuning levels of (with − without retrieval); "
        "FT = mean over retrieval levels of (LoRA − vanilla); "
        "interaction = (rag_lora − lora) − (rag − vanilla).\n",
        _table(
            ["effect", "metric", "estimate [95% CI]", "p"],
            [
                [
                    e["effect"],
                    e["metric"],
                    f"{e['estimate']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]",
                    f"{e['p_value']:.4f}",
                ]
                for e in eff
            ],
        ),
    ]


def _effect_metrics(eff: list[dict[str, Any]]) -> dict[str, float]:
    """`effect/{rag,ft,interaction}/<metric>`: the estimates."""
    return {f"effect/{e['effect']}/{e['metric']}": e["estimate"] for e in eff}


def _topic_section(runs: list[dict[str, Any]]) -> list[str]:
    topics = sorted({it.topic or "unknown" for it in runs[0]["items"]})
    return [
        f"\n## Per topic (mean {' / '.join(TOPIC_METRICS)})\n",
        _table(
            ["config"] + topics, [[r["label"]] + [_topic_cell(r, t) for t in topics] for r in runs]
        ),
    ]


def _diagnostics_section(runs: list[dict[str, Any]]) -> list[str]:
    diag = [m for m in DIAGNOSTICS if m in runs[0]["ci"]]
    return [
        "\n## Diagnostics\n",
        _table(
            ["config"] + [f"{m} {arrow(m)}" for m in diag] + ["answers/s", "tokens/s"],
            [
                [r["label"]]
                + [f"{r['ci'][m]['mean']:.3f}" for m in diag]
                + [_speed(r, "answers_per_s"), _speed(r, "tokens_per_s")]
                for r in runs
            ],
        ),
    ]


def _retrieval_section(runs: list[dict[str, Any]]) -> list[str]:
    retr = [m for m in RETRIEVAL if any(m in r["ci"] for r in runs)]
    if not retr:
        return []
    return [
        "\n## Retrieval quality\n",
        _table(
            ["config"] + retr,
            [
                [r["label"]] + [f"{r['ci'][m]['mean']:.3f}" if m in r["ci"] else "–" for m in retr]
                for r in runs
                if any(m in r["ci"] for m in retr)
            ],
        ),
    ]


def _ranking_section(runs: list[dict[str, Any]]) -> list[str]:
    """Recall@k, MRR, nDCG@k against the gold chunks and answer-in-context, per RAG config."""
    shown = [r for r in runs if any(m in r["ci"] for m in RANKING)]
    if not shown:
        return []
    ks = [r["params"].get("retriever.k", "") for r in shown]
    k_column = len(set(ks)) > 1
    return [
        "\n## Retrieval (against the gold chunks)\n",
        "k is the number of passages retrieved; answer in context is the share of the "
        "reference's content words found in them (it needs no gold).\n",
        _table(
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


def _cell_counts(run: dict[str, Any]) -> dict[str, int]:
    """How many of a run's items fall in each attribution cell (items with gold only)."""
    return {
        cell: sum(int(it.scores.get(cell) == 1.0) for it in run["items"])
        for cell in ATTRIBUTION_CELLS.values()
    }


def _attribution_section(runs: list[dict[str, Any]]) -> list[str]:
    """The 2x2 of gold retrieved x answer right per RAG config, and which miss dominates."""
    shown = [(r, _cell_counts(r)) for r in runs if "retriever_miss" in r["items"][0].scores]
    if not shown:
        return []
    table, verdicts = [], []
    for run, counts in shown:
        n = sum(counts.values())
        for gold in (True, False):
            cells = [counts[ATTRIBUTION_CELLS[(gold, right)]] for right in (True, False)]
            table.append(
                [run["label"], "yes" if gold else "no"]
                + [f"{c} ({c / n:.0%})" if n else "0" for c in cells]
            )
        verdicts.append(f"- **{run['label']}:** {_dominant_miss(counts)}")
    return [
        "\n## Where RAG's misses come from\n",
        "Items with known gold chunks: was one retrieved, was the answer right "
        "(`metrics.attribution`)? A wrong answer without the gold chunk is the retriever's "
        "miss, one with it the generator's.\n",
        _table(["config", "gold retrieved", "answer right", "answer wrong"], table),
        "",
        *verdicts,
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


def _fine_tune_only_section(runs: list[dict[str, Any]]) -> list[str]:
    """Items right only under LoRA, only under the base model, both, neither, and examples."""
    table, examples = [], []
    for lora in runs:
        base = _base_run(lora, runs)
        if base is None or not all("correct" in r["items"][0].scores for r in (lora, base)):
            continue
        counts, only_lora = _paired_correct(lora, base)
        table.append([lora["label"], base["label"], *counts.values()])
        examples += [f"- {lora['label']}: {it.question}" for it in only_lora[:3]]
    if not table:
        return []
    return [
        "\n## What only the fine-tune got right\n",
        "Each LoRA run against the base model's run with the same retriever (vanilla for "
        "lora, rag for rag_lora), item by item on `correct` (`metrics.attribution`).\n",
        _table(["LoRA run", "base run", "only LoRA", "only base", "both", "neither"], table),
        *(["", "Questions only the fine-tune got right:", *examples] if examples else []),
    ]


def _side_by_side_section(runs: list[dict[str, Any]]) -> list[str]:
    """Six fixed items (seeded by id): every config's answer under the question."""
    md = ["\n## Side by side\n"]
    by_id = [{it.item_id: it for it in r["items"]} for r in runs]
    for item_id in sample_ids(list(by_id[0]), 6, 0):
        first = by_id[0][item_id]
        md.append(f"### {item_id}\n**Q:** {first.question}\n\n**Reference:** {first.reference}\n")
        for r, items in zip(runs, by_id):
            md.append(f"- **{r['label']}:** {items[item_id].prediction[:600]}")
        md.append("")
    return md


def _figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures by name: headline bars always, loss and sweep curves when they apply."""
    out = {"metrics": figures.bars(runs, {m: f"{m} {arrow(m)}" for m in _headline(runs)})}
    for name, fig in (("loss", figures.loss_curves(runs)), ("sweep", figures.sweep_curves(runs))):
        if fig is not None:
            out[name] = fig
    return out


def _mean_n(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} (n={len(values)})" if values else "–"


def _train_vs_test(runs: list[dict[str, Any]]) -> list[str]:
    """Closed-book scores on a seeded training sample next to the eval split's.

    A fine-tune far better on training items than on test ones memorised; one no better than
    the base model on its own training items learned nothing. Only closed-book runs are shown:
    a RAG run's test score had context that its train-sample answers did not.
    """
    closed_book = [
        r
        for r in runs
        if f"train_sample/{TOPIC_METRICS[0]}" in r["metrics"]
        and (r["params"].get("retriever.kind") == "none" or r["params"].get("retriever.k") == "0")
    ]
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
    table = []
    for r in closed_book:
        cells = [r["label"]]
        for m in shown:
            train = {
                k: r["metrics"][f"train_sample/{m}{suffix}"]
                for k, suffix in (("mean", ""), ("low", "_ci_low"), ("high", "_ci_high"))
            }
            gap = train["mean"] - r["ci"][m]["mean"]
            cells += [fmt_ci(r["ci"][m]), fmt_ci(train), f"{gap:+.3f}"]
        table.append(cells)
    n_train = int(closed_book[0]["metrics"].get("train_sample/n", 0))
    return [
        f"\n## Did fine-tuning learn? (closed-book: {n_train} seeded training items vs the "
        "eval split)\n",
        "How to read it: a fine-tune far better on train than on test memorised; one no better "
        "than the base model on its own training items learned nothing.\n",
        _table(header, table),
    ]


def _near_dup_split(runs: list[dict[str, Any]]) -> list[str]:
    """Scores on items with a near-duplicate training question against the rest."""
    if not all(it.near_dup is not None for it in runs[0]["items"]):
        return []
    header = ["config"] + [f"{m} {part}" for m in TOPIC_METRICS for part in ("near-dup", "rest")]
    table = []
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
        table.append(cells)
    return [
        "\n## Near-duplicate split\n",
        "Items whose nearest training question is a near-duplicate (cosine ≥ "
        "`eval.near_dup_threshold`) against the rest: a win that lives in the near-dup columns "
        "comes from leakage into the index or the fine-tune.\n",
        _table(header, table),
    ]


def _leakage_audit(runs: list[dict[str, Any]]) -> list[str]:
    """The split's leakage audit (logged by the dataset build, carried by each evaluate run)."""
    metrics = runs[0]["metrics"]
    audit = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("leakage/")}
    overlap = audit.pop("evidence_overlap", None)
    if not audit:
        return []
    rows = [[k, f"{v:.3f}" if k.endswith("rate") else f"{v:.0f}"] for k, v in sorted(audit.items())]
    shared = []
    if overlap is not None and not math.isnan(overlap):
        shared = [
            "",
            f"Evidence overlap {overlap:.3f}: the share of test items whose gold chunk also holds "
            "a training item's answer. Facts shared through the corpus are the design (the "
            "fine-tune is meant to learn them); the question leakage above is what must stay low.",
        ]
    return [
        "\n## Leakage audit of the split (test vs train, from the dataset build)\n",
        _table(["measure", "value"], rows),
        *shared,
    ]


def _topic_cell(run: dict[str, Any], topic: str) -> str:
    items = [it for it in run["items"] if (it.topic or "unknown") == topic]
    if not items:
        return "–"
    cells = []
    for metric in TOPIC_METRICS:
        values = [it.scores[metric] for it in items if metric in it.scores]
        cells.append(f"{sum(values) / len(values):.3f}" if values else "–")
    return " / ".join(cells) + f" (n={len(items)})"


def _speed(run: dict[str, Any], key: str) -> str:
    value = run["metrics"].get(key)
    return f"{value:.2f}" if value is not None else "cached"


def report_sweep(cfg: Any, parent_run_id: str) -> str:
    """Build the report of a finished sweep from MLflow and log it on the parent run."""
    from qa_lab.metrics import MetricsOptions

    runs = _load_runs(parent_run_id)
    md, figs, logged = build_report(runs, MetricsOptions.from_cfg(cfg.metrics).bootstrap)
    with tracking.resume_run(parent_run_id):
        tracking.log_text(md, "report/report.md")
        tracking.log_text(report_html.page(md, figs), "report/report.html")
        for name, fig in figs.items():
            tracking.log_figure(fig, f"report/{name}.png")
        tracking.log_metrics(logged)
    print(_grid_table(runs, _headline(runs)))
    print(f"report: runs:/{parent_run_id}/report/report.html — {tracking.ui_command(cfg.tracking)}")
    return md
