"""What a stage's MLflow run holds: a dataset run's counts and inputs; an evaluate run's scores.

The shapes are fixed: the report reads per_item.jsonl and metrics.json back (`reporting`),
and people read the eval_items table in the MLflow UI. Logged through `tracking`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qa_lab import datastore
from qa_lab.cache import read_manifest
from qa_lab.jsonl import read_jsonl
from qa_lab.records import EvalRow
from qa_lab.tracking import (
    log_artifacts,
    log_dict,
    log_figure,
    log_input,
    log_metrics,
    log_params,
    log_table,
    log_text,
)

if TYPE_CHECKING:
    from qa_lab.metrics import RunScores


def per_item_jsonl(rows: list[EvalRow]) -> str:
    """`per_item.jsonl`: one scored `EvalRow` per line, as the report reads it back."""
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows)


def _table_row(row: EvalRow) -> dict[str, Any]:
    """A row of the run's eval_items table: the row, its passages as text, then its scores.

    Prompts and chat messages stay in per_item.jsonl and the traces: they would make the table
    too wide to read in the UI.
    """
    cells = row.to_dict()
    scores = cells.pop("scores", None) or {}
    if "gold" in cells:
        cells["gold"] = " ".join(cells["gold"])
    for bulky in ("prompt", "messages"):
        cells.pop(bulky, None)
    passages = cells.pop("retrieved", [])
    cells["retrieved"] = "\n\n".join(
        f"[{x['score']}{' gold' if x.get('gold') else ''}] "
        + (x["text"] if "text" in x else f"{x['question']} -> {x['answer']}")
        for x in passages
    )
    return {**cells, **scores}


def log_scores(scored: RunScores, speed: Mapping[str, float]) -> None:
    """An evaluate run's scores: metrics, speed, corpus values, the item table and file, CIs."""
    log_metrics(scored.summary)
    log_metrics(speed)
    log_params({k: v for k, v in scored.corpus.items() if isinstance(v, str)})
    log_metrics({k: v for k, v in scored.corpus.items() if isinstance(v, float)})
    log_table([_table_row(r) for r in scored.rows], "eval_items.json")
    log_text(per_item_jsonl(scored.rows), "per_item.jsonl")
    log_dict(scored.ci, "metrics.json")


def log_train_sample(scored: RunScores) -> None:
    """The closed-book training sample's scores under `train_sample/` (no per-topic metrics)."""
    log_metrics({f"train_sample/{k}": v for k, v in scored.summary.items() if "/" not in k})
    log_metrics({"train_sample/n": float(len(scored.rows))})
    log_dict(scored.ci, "train_sample/metrics.json")
    log_text(per_item_jsonl(scored.rows), "train_sample/per_item.jsonl")


def log_dataset(folder: Path, key: str) -> None:
    """A dataset run: counts, rejects, the column mapping, topics, splits as inputs, audits."""
    from qa_lab import figures

    manifest = read_manifest(folder)
    topics = manifest.get("topics") or {}
    log_metrics({f"count/{k}": v for k, v in manifest["counts"].items()})
    log_metrics({f"rejects/{k}": v for k, v in manifest["rejects"].items()})
    log_metrics({f"skipped/{k}": v for k, v in manifest.get("skipped", {}).items()})
    log_params({f"mapping.{k}": v for k, v in manifest["columns"].items()})
    log_dict(topics, "topics.json")
    log_metrics({f"topics/silhouette_k{k}": v for k, v in topics.get("silhouette", {}).items()})
    log_metrics({"topics/k": topics["k"]} if "k" in topics else {})
    for name in datastore.SPLITS:
        rows = read_jsonl(folder / f"{name}.jsonl")
        log_input(rows, f"{name}-{key[:8]}", name, manifest["files"][f"{name}.jsonl"])
    report = read_jsonl(folder / "dedup_report.jsonl")
    log_table(report or [{"stage": "none"}], "dedup_pairs.json")
    log_artifacts(folder / "leakage_audit.json")
    log_metrics(datastore.leakage_metrics(folder))
    log_artifacts(folder / "manifest.json")
    splits = {name: datastore.read_split(folder, name) for name in datastore.SPLITS}
    log_figure(figures.split_topics(splits, topics.get("source")), "topic_distribution.png")


def log_corpus(folder: Path, key: str) -> None:
    """A corpus run: counts, skipped files, token statistics, the chunks as an input, a figure."""
    from qa_lab import figures

    manifest = read_manifest(folder)
    chunks = read_jsonl(folder / "chunks.jsonl")
    log_metrics({f"count/{k}": v for k, v in manifest["counts"].items()})
    log_metrics({f"skipped/{k}": v for k, v in manifest.get("skipped", {}).items()})
    log_metrics({f"tokens/{k}": v for k, v in manifest["tokens"].items()})
    log_params({f"chunking.{k}": v for k, v in manifest["chunking"].items()})
    log_input(chunks, f"corpus-{key[:8]}", "corpus", manifest["files"]["chunks.jsonl"])
    log_artifacts(folder / "manifest.json")
    size = int(manifest["chunking"]["size"])
    log_figure(figures.chunk_lengths([c["tokens"] for c in chunks], size), "chunk_lengths.png")
