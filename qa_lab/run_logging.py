"""What a stage's MLflow run holds: a dataset run's counts and inputs; an evaluate run's scores.

The shapes are fixed: the report reads per_item.jsonl and metrics.json back (`reporting`),
and people read the eval_items table in the MLflow UI. So that a run page explains itself, each
run says what its config is in its description and names the splits (and corpus) it read as
MLflow dataset inputs with their digests, the same entries the dataset and corpus runs log; a
sweep parent's description ranks its configs. Logged through `tracking`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qa_lab import datastore
from qa_lab.cache import read_manifest
from qa_lab.jsonl import read_jsonl
from qa_lab.records import EvalRow
from qa_lab.tracking import (
    child_runs,
    copy_dataset_inputs,
    log_artifacts,
    log_dict,
    log_figure,
    log_input,
    log_metrics,
    log_params,
    log_table,
    log_text,
    metric_history,
    set_description,
)

EFFECTS = ("rag", "ft", "interaction")  # the 2x2 effects the report logs as effect/<e>/<metric>

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


def reset_peak_memory() -> None:
    """Start this process's peak-memory counters afresh, so `peak_memory` is one run's peak.

    In a sweep run in one process (the basic launcher) a process-wide peak would carry an
    earlier job's training into a later evaluation (6.8 GiB measured for an evaluation that
    needs 1.2). Linux resets the resident peak (VmHWM) on writing 5 to /proc/self/clear_refs;
    elsewhere, or where that is refused, the peak stays process-wide.
    """
    import sys

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    torch = sys.modules.get("torch")  # never imported here: a CPU-only run must not load it
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak memory since `reset_peak_memory`, in MiB: resident (`peak_rss_mib`), and on a GPU.

    Resident: VmHWM of /proc/self/status (kB), else `ru_maxrss` (the process's lifetime peak:
    KiB on Linux, bytes on macOS). `peak_gpu_mib` (torch's peak allocation) only when torch
    has initialised CUDA in this process; the report reads its presence as "this config ran
    on a GPU".
    """
    import resource
    import sys

    status = Path("/proc/self/status")
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M) if status.exists() else None
    if hwm:
        out = {"peak_rss_mib": int(hwm.group(1)) / 2**10}
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = {"peak_rss_mib": rss / 2**20 if sys.platform == "darwin" else rss / 2**10}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def log_scores(scored: RunScores, speed: Mapping[str, float]) -> None:
    """An evaluate run's scores: metrics, speed and peak memory, corpus values, items, CIs."""
    log_metrics(scored.summary)
    log_metrics({**speed, **peak_memory()})
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
    log_data_inputs(folder, datastore.SPLITS)
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
    log_input(chunks, _corpus_input_name(key), "corpus", manifest["files"]["chunks.jsonl"])
    log_artifacts(folder / "manifest.json")
    size = int(manifest["chunking"]["size"])
    log_figure(figures.chunk_lengths([c["tokens"] for c in chunks], size), "chunk_lengths.png")


def _corpus_input_name(key: str) -> str:
    return f"corpus-{key[:8]}"


def log_data_inputs(
    data_folder: Path, splits: Sequence[str], corpus_folder: Path | None = None
) -> None:
    """The splits a run read (and a corpus folder's chunks) as MLflow dataset inputs.

    Named `<split>-<data_key[:8]>` / `corpus-<corpus_key[:8]>` with the file's sha256 as digest,
    so they are the dataset and corpus runs' own entries in the experiment's Datasets list.
    """
    manifest = read_manifest(data_folder)
    for name in splits:
        rows = read_jsonl(data_folder / f"{name}.jsonl")
        log_input(rows, f"{name}-{manifest['key'][:8]}", name, manifest["files"][f"{name}.jsonl"])
    if corpus_folder is not None:
        corpus = read_manifest(corpus_folder)
        chunks = read_jsonl(corpus_folder / "chunks.jsonl")
        name = _corpus_input_name(corpus["key"])
        log_input(chunks, name, "corpus", corpus["files"]["chunks.jsonl"])


def evaluate_description(
    variant: str, llm: str, adapter_key: str | None, knowledge: str | None, tags: Mapping[str, str]
) -> str:
    """An evaluate run's description: its config in a line (model, retrieval, knowledge, data).

    `tags`: the run's tags (data, corpus keys, retriever and k, split); `adapter_key`: the LoRA
    adapter's key (None: the base model).
    """
    model = f"{llm} + LoRA {adapter_key} (knowledge={knowledge or 'qa'})" if adapter_key else llm
    retrieval = (
        f"retriever {tags['retriever']} k={tags['retriever_k']} over corpus "
        f"{tags['corpus_key'][:8]}"
        if tags["retriever"] != "none" and str(tags["retriever_k"]) != "0"
        else "closed-book"
    )
    return f"{variant}: {model}; {retrieval}; dataset {tags['data_key'][:8]} ({tags['split']})"


def describe_sweep(parent_run_id: str, metric: str) -> str:
    """The sweep parent's description and dataset inputs, from its finished evaluate runs.

    The description ranks the configs by `metric` (`tracking.rank_by`), mean [95% CI], best
    first, with the 2x2 effects on it when the report logged them; the parent lists every
    dataset input its children read. Returns the description.
    """
    from qa_lab.metrics import HIGHER_IS_BETTER

    runs = [
        r
        for r in child_runs(parent_run_id)
        if r["status"] == "FINISHED" and r["tags"].get("qa_lab.stage") == "evaluate"
    ]
    scored = [r for r in runs if metric in r["metrics"]]
    sign = -1 if HIGHER_IS_BETTER.get(metric, True) else 1
    scored.sort(key=lambda r: sign * r["metrics"][metric])
    lines = [f"{len(runs)} configs by {metric} (mean [95% CI]), best first:"]
    lines += [f"- {_sweep_label(r)}: {_mean_ci(r['metrics'], metric)}" for r in scored]
    effects = _effects(parent_run_id, metric)
    if effects:
        lines.append(f"2x2 effects on {metric}: {effects}")
    lines.append("Full report: report/report.html in this run's artifacts.")
    text = "\n".join(lines)
    set_description(text, run_id=parent_run_id)
    copy_dataset_inputs([r["run_id"] for r in runs], parent_run_id)
    return text


def _sweep_label(run: Mapping[str, Any]) -> str:
    """A child run as the runs table names it, without the stage prefix."""
    return str(run["name"]).removeprefix("evaluate-")


def _mean_ci(metrics: Mapping[str, float], name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
    return f"{metrics[name]:.4f}{ci}"


def _effects(parent_run_id: str, metric: str) -> str:
    """`rag +0.0123, ft ..., interaction ...` from the parent's `effect/*/<metric>` metrics."""
    found = [(e, metric_history(parent_run_id, f"effect/{e}/{metric}")) for e in EFFECTS]
    return ", ".join(f"{e} {history[-1][1]:+.4f}" for e, history in found if history)
