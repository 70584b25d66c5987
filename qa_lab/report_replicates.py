"""Training-seed replicates in the report: a config's seed runs pooled into one cell.

With `model.seeds=[42,43,44]` a LoRA config is evaluated once per seed, each its own run under
the same label. The report treats the config as one cell: its per-item score is the mean over
its seeds (the rows every other section reads), and the CIs, paired tests and 2x2 effects of
a sweep with a replicated cell come from the two-level bootstrap (`qa_lab.replicates`:
resampled item clusters, and seeds within each resample), so training noise is inside them.
A sweep without replicates goes through `qa_lab.stats` exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.report_blocks import Block, Heading, Text, fmt_ci, table


def seed_of(run: dict[str, Any]) -> int | None:
    """The training seed a run's adapter was trained with (`qa_lab.seed`), if any."""
    seed = run["tags"].get("qa_lab.seed")
    return int(seed) if seed not in (None, "") else None


def pool(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per label: a label's runs (its seed replicates) pooled, in seed order.

    A cell is its first replicate's run dict with `replicates` (the runs) and, when there are
    several, `items` holding the seed-mean rows and `ci` the two-level intervals.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(run["label"], []).append(run)
    cells = []
    for group in by_label.values():
        group.sort(key=lambda r: (seed_of(r) is None, seed_of(r) or 0))
        cell = {**group[0], "replicates": group}
        if len(group) > 1:
            cell["items"] = _mean_rows(group)
        cells.append(cell)
    return cells


def _mean_rows(group: list[dict[str, Any]]) -> list[EvalRow]:
    """The first replicate's rows with each score the mean over the replicates' scores."""
    ids = [it.item_id for it in group[0]["items"]]
    for run in group[1:]:
        if [it.item_id for it in run["items"]] != ids:
            raise QaLabError(f"{run['name']}: replicate runs of {run['label']} differ in items")
    rows = []
    for j, first in enumerate(group[0]["items"]):
        values: dict[str, list[float]] = {}
        for run in group:
            for metric, value in (run["items"][j].scores or {}).items():
                values.setdefault(metric, []).append(float(value))
        rows.append(replace(first, scores={m: _mean(v) for m, v in values.items()}))
    return rows


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def replicated(cells: list[dict[str, Any]]) -> bool:
    """Whether any cell holds more than one training seed."""
    return any(len(c.get("replicates", ())) > 1 for c in cells)


def matrix(cell: dict[str, Any], metric: str) -> np.ndarray:
    """A cell's (seeds, items) scores on `metric` (one row without replicates)."""
    runs = cell.get("replicates") or [cell]
    return np.array([[float(it.scores[metric]) for it in r["items"]] for r in runs])


def shared_seeds(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether row s of both cells was answered by one adapter (e.g. lora and rag_lora).

    RAG changes only the prompt, so both cells' seed-s runs carry the same model key: one seed
    draw then serves both, and the seed effect cancels in their difference.
    """
    runs_a, runs_b = a.get("replicates", [a]), b.get("replicates", [b])
    models_a = [r["tags"].get("qa_lab.model_key") for r in runs_a]
    models_b = [r["tags"].get("qa_lab.model_key") for r in runs_b]
    return len(runs_a) > 1 and None not in models_a and models_a == models_b


def paired(
    a: dict[str, Any], b: dict[str, Any], metric: str, clusters: list[str], boot: Any
) -> dict[str, Any]:
    """`stats.paired_test`'s dict for mean(b - a), from the two-level bootstrap."""
    from qa_lab.replicates import paired_replicates

    c = paired_replicates(
        matrix(a, metric),
        matrix(b, metric),
        clusters=clusters,
        shared_seeds=shared_seeds(a, b),
        resamples=int(boot.resamples),
        seed=int(boot.seed),
    )
    return {"diff": c.estimate, **c.as_dict()}


def effects(
    cells: dict[str, dict[str, Any]], metric: str, clusters: list[str], boot: Any
) -> dict[str, Any]:
    """`stats.effects_2x2`'s dict (rag, ft, interaction, means) from the two-level bootstrap."""
    from qa_lab.replicates import effects_2x2_replicates

    names = ("vanilla", "rag", "lora", "rag_lora")
    result = effects_2x2_replicates(
        *(matrix(cells[v], metric) for v in names),
        clusters=clusters,
        shared_seeds=shared_seeds(cells["lora"], cells["rag_lora"]),
        resamples=int(boot.resamples),
        seed=int(boot.seed),
    )
    out: dict[str, Any] = {"means": result.means}
    for name in ("rag", "ft", "interaction"):
        c = getattr(result, name)
        out[name] = c.as_dict()
    out.update(n=result.rag.n, n_clusters=result.rag.n_clusters, method=result.rag.method)
    return out


def pooled_ci(cells: list[dict[str, Any]], boot: Any) -> None:
    """Give each replicated cell two-level CIs (`ci`) for every metric its items carry.

    Run-level metrics no item carries (corpus BLEU) become the mean of the seeds' values with
    no interval (NaN bounds): there is no per-item score to resample.
    """
    from qa_lab.replicates import replicate_ci

    for cell in cells:
        runs = cell.get("replicates", [])
        if len(runs) < 2:
            continue
        ci = {}
        columns = _columns(cell)
        for metric in runs[0]["ci"]:
            if metric in columns:
                c = replicate_ci(
                    matrix(cell, columns[metric]),
                    clusters=[it.seed_id or it.item_id for it in cell["items"]],
                    resamples=int(boot.resamples),
                    seed=int(boot.seed),
                )
                ci[metric] = {"mean": c.mean, "low": c.low, "high": c.high, "method": c.method}
            else:
                mean = _mean([float(r["ci"][metric]["mean"]) for r in runs if metric in r["ci"]])
                ci[metric] = {"mean": mean, "low": math.nan, "high": math.nan, "method": "seeds"}
        cell["ci"] = ci


def _columns(cell: dict[str, Any]) -> dict[str, str]:
    """Run-level metric name -> the per-item column it is the mean of (rates, prefixed ones)."""
    from qa_lab.metrics import RUN_NAMES

    scored = set(cell["items"][0].scores or {}) if cell["items"] else set()
    return {RUN_NAMES.get(column, column): column for column in scored}


def seeds_section(cells: list[dict[str, Any]], headline: str | None, boot: Any) -> list[Block]:
    """Each replicated cell's per-seed scores, their spread, and both CIs of the mean.

    The item-only CI resamples items of the seed-mean rows (training noise left out); the
    two-level CI also resamples seeds, so the gap between them is what one seed would hide.
    """
    from qa_lab.replicates import seed_spread
    from qa_lab.stats import bootstrap_ci

    rows = []
    for cell in cells:
        runs = cell.get("replicates", [])
        if len(runs) < 2 or headline is None:
            continue
        spread = seed_spread(matrix(cell, headline))
        groups = [it.seed_id or it.item_id for it in cell["items"]]
        item_only = bootstrap_ci(
            [it.scores[headline] for it in cell["items"]],
            clusters=groups,
            resamples=int(boot.resamples),
            seed=int(boot.seed),
        )
        seeds = ", ".join(f"{seed_of(r)}: {m:.4f}" for r, m in zip(runs, spread.means))
        rows.append(
            [
                cell["label"],
                seeds,
                f"{spread.sd:.4f}",
                fmt_ci({"mean": item_only.mean, "low": item_only.low, "high": item_only.high}),
                fmt_ci(cell["ci"][headline]),
            ]
        )
    if not rows:
        return []
    return [
        Heading("Training seeds"),
        Text(
            f"Each replicated config was trained once per seed; its {headline} per seed, the "
            "between-seed sd, and its mean with the item-only CI (items resampled, one seed's "
            "noise left out) next to the two-level CI (items and seeds resampled) that every "
            "comparison and effect in this report uses."
        ),
        table(["config", "per seed", "between-seed sd", "item-only CI", "two-level CI"], rows),
    ]
