"""The dataset stage: load -> lineage -> synthesise -> dedup -> split, once per key, one run.

Keyed by the dataset config, the source file's bytes and the embedder (and the corpus key when
the QA pairs are synthesised from the corpus); `build_dataset.py` runs it alone, training and
evaluation build it on demand.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import (
    corpus_synthesis,
    dataset,
    datastore,
    evidence,
    keys,
    lineage,
    loading,
    run_logging,
    synthesis,
    tracking,
)
from qa_lab.cache import build_once, is_finished, lock, read_manifest
from qa_lab.config import to_dict
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from qa_lab.stages.corpus import build_corpus, corpus_key, question_embedder


def dataset_key(cfg: DictConfig) -> str:
    """Key over what changes the dataset: its config (not where it goes), source, embedder."""
    device = "cpu"
    if cfg.dataset.synthesis.backend == "local":  # samples differ between CUDA and CPU
        from qa_lab.models import pick_device

        device = pick_device("auto")
    source = cfg.dataset.source
    if not source and not _from_corpus(cfg):
        raise QaLabError(
            "dataset.source is not set: a QA file is needed unless "
            "dataset.synthesis.mode=from_corpus writes the QA pairs from the corpus"
        )
    return keys.dataset_key(
        to_dict(cfg.dataset),
        source_hash=datastore.source_hash(Path(source)) if source else "none",
        embedder=cfg.embedder.name,
        synthesis_device=device,
        corpus=corpus_key(cfg) if _from_corpus(cfg) else None,
    )


def _from_corpus(cfg: DictConfig) -> bool:
    """Whether the QA pairs are synthesised from the corpus's chunks."""
    synthesis = cfg.dataset.synthesis
    return synthesis.backend != "none" and synthesis.mode == "from_corpus"


def dataset_folder(cfg: DictConfig) -> tuple[Path, str]:
    """Where this config's dataset lives (built or not) and its key."""
    key = dataset_key(cfg)
    output_dir = cfg.get("output_dir") or cfg.dataset.output_dir
    return datastore.folder_for(key, Path(cfg.paths.cache), output_dir), key


def build_dataset(cfg: DictConfig) -> Path:
    """Build (or reuse) the dataset folder for this config and log it to MLflow once."""
    folder, key = dataset_folder(cfg)
    if not is_finished(folder):
        folder, built = build_once(folder, lambda tmp: _build_dataset_into(cfg, key, tmp))
    # Locked so that parallel sweep jobs reaching this together log one dataset run, not two.
    with lock(folder, "mlflow"):
        if tracking.find_finished_run("dataset", key, tracking.configure(cfg.tracking)) is None:
            _log_dataset_run(cfg, folder, key)
    return folder


def _log_dataset_run(cfg: DictConfig, folder: Path, key: str) -> None:
    manifest = read_manifest(folder)
    tags = {
        "data_key": key,
        "topic_source": (manifest.get("topics") or {}).get("source", "none"),
        "lineage": manifest.get("lineage", ""),
    }
    with tracking.start_run(cfg, stage="dataset", key=key, tags=tags):
        run_logging.log_dataset(folder, key)


def _build_dataset_into(cfg: DictConfig, key: str, out: Path) -> dict[str, Any]:
    """Load -> synthesise -> build -> write; returns the manifest's own fields."""
    opts = dataset.DatasetOptions.from_cfg(cfg.dataset)
    embed = question_embedder(cfg)
    loaded, items, lineage_note = _load_items(opts, embed)
    if cfg.corpus.kind == "folder" and any(it.evidence for it in items):
        evidence.check_documents(items, build_corpus(cfg), where=str(opts.source))
    counts: dict[str, int] = {"loaded": len(items)}
    rejects: Counter[str] = Counter()
    if opts.synthesis.backend != "none":
        generated, rejects = _synthesize(cfg, opts, items, embed)
        items = items + generated
        counts["synthetic_kept"] = len(generated)
        counts["synthetic_rejected"] = sum(rejects.values())
    infer = not loaded.mapping["topic"] and opts.topics.infer
    built = dataset.build(items, functools.partial(embed, progress=True), opts, infer=infer)
    if built.topics is not None:
        print(f"dataset: {built.topics['k']} topics inferred: {', '.join(built.topics['labels'])}")
    datastore.write(out, built)
    return {
        "key": key,
        "counts": counts | built.counts,
        "rejects": dict(rejects),
        "skipped": loaded.skipped,
        "columns": loaded.mapping,
        "topics": loaded.topics if built.topics is None else built.topics,
        "lineage": lineage_note,
        "config": to_dict(cfg.dataset),
        "embedder": cfg.embedder.name,
        "version": keys.VERSIONS["dataset"],
    }


def _synthesize(
    cfg: DictConfig, opts: dataset.DatasetOptions, items: list[QAItem], embed: Any
) -> tuple[list[QAItem], Counter[str]]:
    """Synthetic QA pairs: from the corpus's chunks, or grown from the loaded seed rows."""
    where = {"cache_dir": cfg.paths.cache, "models_dir": cfg.paths.models}
    if opts.synthesis.mode == "from_corpus":
        chunks = build_corpus(cfg).chunks
        return corpus_synthesis.synthesize_from_corpus(opts.synthesis, chunks, **where)
    return synthesis.synthesize(opts.synthesis, items, embed, **where)


def _load_items(
    opts: dataset.DatasetOptions, embed: Callable[..., Any]
) -> tuple[loading.Loaded, list[QAItem], str]:
    """Load the source (printing what was recognised) and give it lineage; names the lineage."""
    if opts.source is None:  # from_corpus without a QA file
        empty = loading.Loaded(
            items=[], mapping=dict.fromkeys(loading.FIELDS), skipped={}, topics={}
        )
        return empty, [], "chunk of each synthesised pair"
    loaded = loading.load_items(
        opts.source,
        encoding=opts.encoding,
        fmt=opts.format,
        columns=opts.columns,
        on_bad_row=opts.on_bad_row,
        similar_labels=opts.topics.similar_labels,
    )
    n, mapping = len(loaded.items), loaded.mapping
    print(f"dataset: {n} rows from {opts.source} (columns: {mapping})", flush=True)
    if loaded.skipped:
        print(f"dataset: skipped {sum(loaded.skipped.values())} bad rows {loaded.skipped}")
    for a, b, ratio in loaded.topics.get("similar", []):
        print(f"dataset: topics {a!r} and {b!r} look alike ({ratio}); not merged")
    if not opts.seeds:
        note = "seed_id column" if loaded.mapping["seed_id"] else "near-duplicate clusters"
        return loaded, loaded.items, note
    vectors = embed([it.question for it in loaded.items])
    items = lineage.assign_seeds(loaded.items, vectors, opts.seeds)
    return loaded, items, f"dataset.seeds={opts.seeds}"


def build_dataset_main(cfg: DictConfig) -> None:
    """build_dataset.py: the last printed line is the dataset folder."""
    folder = build_dataset(cfg)
    counts = read_manifest(folder)["counts"]
    print(" -> ".join(f"{k} {counts[k]}" for k in datastore.COUNT_ORDER if k in counts))
    print(folder)
