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
    """Metrics against k or learning rate, for sweeps over one variant (not the 2x2 grid)."""
    if len({r["tags"].get("qa_lab.variant") for r in runs}) > 1 and not all(
        r["tags"].get("qa_lab.variant") in ("vanilla", "rag") for r in runs
    ):
        return None
    for param in ("retriever.k", "model.learning_rate"):
        values = {r["params"].get(param) for r in runs}
        if len(values) > 1 and None not in values:
            plt = _pyplot()
            ordered = sorted(runs, key=lambda r: float(r["params"][param]))
            xs = [float(r["params"][param]) for r in ordered]
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for m in ("rougeL_f1", "bertscore_f1", "token_f1"):
                if m in ordered[0]["ci"]:
                    ys = [r["ci"][m]["mean"] for r in ordered]
                    lo = [r["ci"][m]["low"] for r in ordered]
                    hi = [r["ci"][m]["high"] for r in ordered]
                    ax.plot(xs, ys, marker="o", label=m)
                    ax.fill_between(xs, lo, hi, alpha=0.2)
            if param == "model.learning_rate":
                ax.set_xscale("log")
            ax.set_xlabel(param)
            ax.set_title(f"Metrics against {param}")
            ax.legend()
            fig.tight_layout()
            return fig
    return None
