"""Matplotlib figures for runs and reports: per-topic bars, headline CIs, loss, sweeps, splits.

matplotlib is imported inside `_pyplot` (Agg backend): scripts that draw nothing never load it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from qa_lab import tracking
from qa_lab.records import QAItem


def topic_figure(topics: dict[str, dict[str, float]]) -> Any:
    """Per-topic means of the headline per-item metrics."""
    plt = _pyplot()
    names = [
        m
        for m in ("rougeL_f1", "bertscore_f1", "token_f1")
        if topics and m in next(iter(topics.values()))
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(names))
    labels = list(topics)
    for j, name in enumerate(names):
        ax.bar(
            [i + j * width for i in range(len(labels))],
            [topics[t][name] for t in labels],
            width=width,
            label=name,
        )
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_title("Per-topic scores")
    ax.legend()
    fig.tight_layout()
    return fig


def split_topics(splits: Mapping[str, Sequence[QAItem]], source: str | None) -> Any:
    """Stacked bars: rows per topic in each split (a dataset run's topic distribution)."""
    plt = _pyplot()
    counts = {name: Counter(it.topic or "unknown" for it in rows) for name, rows in splits.items()}
    topics = sorted(set().union(*counts.values()))
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0] * len(topics)
    for name in splits:
        values = [counts[name][t] for t in topics]
        ax.bar(topics, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("rows")
    ax.set_title(f"Topic distribution per split ({source or 'no'} topics)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return fig


def chunk_lengths(tokens: Sequence[int], size: int) -> Any:
    """Histogram of chunk lengths in embedder tokens, with the configured size marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(tokens, bins=min(40, max(5, len(tokens) // 5)))
    ax.axvline(size, color="black", linestyle="--", label=f"chunking.size={size}")
    ax.set_xlabel("tokens per chunk (embedder tokenizer)")
    ax.set_ylabel("chunks")
    ax.set_title(f"Chunk lengths ({len(tokens)} chunks)")
    ax.legend()
    fig.tight_layout()
    return fig


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(runs: list[dict[str, Any]], titles: Mapping[str, str]) -> Any:
    """One panel per metric in `titles` (metric -> panel title): each run's mean and 95% CI."""
    plt = _pyplot()
    metrics = list(titles)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means = [r["ci"][m]["mean"] for r in runs]
        err = [
            [mu - r["ci"][m]["low"] for mu, r in zip(means, runs)],
            [r["ci"][m]["high"] - mu for mu, r in zip(means, runs)],
        ]
        ax.bar(range(len(runs)), means, yerr=err, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r["label"] for r in runs], rotation=30, ha="right", fontsize=8)
        ax.set_title(titles[m])
    fig.suptitle("Headline metrics with 95% CIs")
    fig.tight_layout()
    return fig


def loss_curves(runs: list[dict[str, Any]]) -> Any | None:
    """Train and validation loss of each LoRA run's adapter (None when no run has one)."""
    plt = _pyplot()
    curves = []
    for r in runs:
        key = r["tags"].get("qa_lab.model_key", "")
        if not key.startswith("lora:"):
            continue
        train_run = tracking.find_finished_run("train", key.removeprefix("lora:"))
        if train_run is None or any(c[0] == key for c in curves):
            continue
        curves.append(
            (
                key,
                r["label"],
                tracking.metric_history(train_run, "train/loss"),
                tracking.metric_history(train_run, "val/loss"),
            )
        )
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for _, label, train, val in curves:
        ax.plot([s for s, _ in train], [v for _, v in train], label=f"{label} train")
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], marker="o", label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("LoRA training and validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_curves(runs: list[dict[str, Any]]) -> Any | None:
    """Metrics against k or learning rate, for sweeps over one variant (not the 2x2 grid).

    A sweep over several retrievers draws one line per retriever (ROUGE-L), and recall@k of
    the gold chunks beside it when the runs have it: answer quality next to what the
    retriever found.
    """
    if len({r["tags"].get("qa_lab.variant") for r in runs}) > 1 and not all(
        r["tags"].get("qa_lab.variant") in ("vanilla", "rag") for r in runs
    ):
        return None
    for param in ("retriever.k", "model.learning_rate"):
        values = {r["params"].get(param) for r in runs}
        if len(values) > 1 and None not in values:
            return _curves(runs, param)
    return None


def _curves(runs: list[dict[str, Any]], param: str) -> Any:
    """One panel of answer quality (and one of recall@k) against `param`, a line per retriever."""
    plt = _pyplot()
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:  # k = 0 (closed book) has no retriever of its own: it joins every line
        kind = run["params"].get("retriever.kind", "")
        groups.setdefault("" if kind == "none" else kind, []).append(run)
    shared = groups.pop("", []) if len(groups) > 1 else []
    recall = "retrieval/recall_at_k"
    panels = 2 if any(recall in r["ci"] for r in runs) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    metrics = ("rougeL_f1",) if len(groups) > 1 else ("rougeL_f1", "bertscore_f1", "token_f1")
    for name, group in groups.items():
        ordered = sorted(group + shared, key=lambda r: float(r["params"][param]))
        for ax, names in zip(axes[0], (metrics, (recall,))):
            for m in names:
                points = [(float(r["params"][param]), r["ci"][m]) for r in ordered if m in r["ci"]]
                if not points:
                    continue
                xs = [x for x, _ in points]
                ax.plot(xs, [c["mean"] for _, c in points], marker="o", label=f"{name} {m}".strip())
                ax.fill_between(
                    xs, [c["low"] for _, c in points], [c["high"] for _, c in points], alpha=0.2
                )
    for ax, title in zip(axes[0], ("Answer quality", "Gold chunk retrieved (recall@k)")):
        if param == "model.learning_rate":
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_title(f"{title} against {param}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def interaction(by_variant: Mapping[str, dict[str, Any]], metric: str) -> Any:
    """The 2x2's standard picture: `metric` against retrieval off/on, one line per model.

    Parallel lines mean no interaction; the 95% CIs are error bars. `by_variant` maps
    vanilla, rag, lora and rag_lora to their runs.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for model, (off, on), marker, dodge in (  # dodged 0.03 so the two lines' CIs do not overlap
        ("base model", ("vanilla", "rag"), "o", -0.03),
        ("LoRA fine-tune", ("lora", "rag_lora"), "s", 0.03),
    ):
        cis = [by_variant[v]["ci"][metric] for v in (off, on)]
        means = [c["mean"] for c in cis]
        err = [
            [m - c["low"] for m, c in zip(means, cis)],
            [c["high"] - m for m, c in zip(means, cis)],
        ]
        ax.errorbar([dodge, 1 + dodge], means, yerr=err, marker=marker, capsize=5, label=model)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["retrieval off", "retrieval on"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(f"{metric}: retrieval x fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def topic_heatmap(labels: Sequence[str], topics: Sequence[str], values: Any, metric: str) -> Any:
    """Per-topic means of `metric`, a row per config and a column per topic, annotated.

    `values` is a configs x topics array (NaN where a topic has no item).
    """
    import numpy as np

    plt = _pyplot()
    grid = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(topics) + 2.2), 0.5 * len(labels) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(topics)))
    ax.set_xticklabels(topics, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    finite = grid[np.isfinite(grid)]
    middle = float(finite.mean()) if finite.size else 0.0
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            color = "black" if v > middle else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title(f"{metric} per topic")
    fig.tight_layout()
    return fig


def quality_cost(
    points: Sequence[Any],
    cis: Mapping[str, Mapping[str, float]],
    front: Sequence[str],
    labels: tuple[str, str],
) -> Any:
    """Answer quality against cost per 1,000 answers, a point per config, the Pareto front joined.

    `points` are `cost.Point`s (NaN costs left out), `cis` the headline metric's CI per config
    (error bars), `front` the configs `cost.pareto_front` keeps, in any order; `labels` the
    metric's name and the cost's unit.
    """
    import math

    plt = _pyplot()
    shown = [p for p in points if math.isfinite(p.cost) and math.isfinite(p.quality)]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for p in shown:
        c = cis[p.config]
        err = [[p.quality - c["low"]], [c["high"] - p.quality]]
        ax.errorbar([p.cost], [p.quality], yerr=err, marker="o", capsize=4, color="tab:blue")
        ax.annotate(p.config, (p.cost, p.quality), textcoords="offset points", xytext=(6, 4))
    on_front = sorted((p for p in shown if p.config in front), key=lambda p: p.cost)
    ax.plot(
        [p.cost for p in on_front],
        [p.quality for p in on_front],
        color="tab:red",
        linestyle="--",
        marker="*",
        markersize=12,
        label="Pareto front",
    )
    metric, unit = labels
    ax.set_xlabel(f"cost per 1,000 answers ({unit})")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(f"{metric} against cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
