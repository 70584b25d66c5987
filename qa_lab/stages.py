"""Orchestration of the three stages; each reads its config, reuses or builds, and logs a run.

Stages are cached by key (`cache.stage_key`): a dataset by its config and source bytes, an
adapter by the base model, dataset and training config, predictions per item by model, prompt
and generation settings. Nothing else imports this module.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import (
    dataset,
    datastore,
    keys,
    lineage,
    loading,
    prompts,
    run_logging,
    similarity,
    synthesis,
    tracking,
)
from qa_lab.cache import (
    ItemCache,
    build_once,
    file_sha256,
    is_finished,
    lock,
    read_manifest,
)
from qa_lab.config import to_dict, variant_name
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import EvalRow, Passage, QAItem

# --------------------------------------------------------------------------- keys of a config


def dataset_key(cfg: DictConfig) -> str:
    """Key over what changes the dataset: its config (not where it goes), source, embedder."""
    device = "cpu"
    if cfg.dataset.synthesis.backend == "local":  # samples differ between CUDA and CPU
        from qa_lab.models import pick_device

        device = pick_device("auto")
    return keys.dataset_key(
        to_dict(cfg.dataset),
        source_hash=datastore.source_hash(Path(cfg.dataset.source)),
        embedder=cfg.embedder.name,
        synthesis_device=device,
    )


def dataset_folder(cfg: DictConfig) -> tuple[Path, str]:
    """Where this config's dataset lives (built or not) and its key."""
    key = dataset_key(cfg)
    output_dir = cfg.get("output_dir") or cfg.dataset.output_dir
    return datastore.folder_for(key, Path(cfg.paths.cache), output_dir), key


# --------------------------------------------------------------------------- dataset


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
    embed = _question_embedder(cfg)
    loaded, items, lineage_note = _load_items(opts, embed)
    counts: dict[str, int] = {"loaded": len(items)}
    rejects: Counter[str] = Counter()
    if opts.synthesis.backend != "none":
        generated, rejects = synthesis.synthesize(
            opts.synthesis, items, embed, cache_dir=cfg.paths.cache, models_dir=cfg.paths.models
        )
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


def _question_embedder(cfg: DictConfig) -> Callable[..., Any]:
    """The configured embedder over the embedding cache: texts -> unit vectors."""
    from qa_lab.retrieval import embed

    return functools.partial(
        embed,
        embedder=cfg.embedder.name,
        cache_dir=Path(cfg.paths.cache),
        batch_size=int(cfg.embedder.batch_size),
    )


def _load_items(
    opts: dataset.DatasetOptions, embed: Callable[..., Any]
) -> tuple[loading.Loaded, list[QAItem], str]:
    """Load the source (printing what was recognised) and give it lineage; names the lineage."""
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


# --------------------------------------------------------------------------- training


def train_key(cfg: DictConfig, data_key: str) -> str:
    """Adapter identity: base model, dataset, training config, prompt (and retrieval if used)."""
    context = require_choice("model.context", cfg.model.context, ("none", "retrieved"))
    retrieval = (
        {"embedder": cfg.embedder.name, "document": cfg.retriever.document}
        if context == "retrieved"
        else None
    )
    return keys.train_key(
        to_dict(cfg.model),
        prompt=to_dict(cfg.prompt),
        template_version=prompts.TEMPLATE_VERSION,
        data_key=data_key,
        model=keys.model_id(to_dict(cfg.llm)),
        retrieval=retrieval,
    )


def adapter_for(cfg: DictConfig) -> tuple[Path, str]:
    """The adapter for `model=lora`: the one given, or the cached one (trained if missing)."""
    given = cfg.model.get("adapter")
    if given:
        folder = Path(given) if not str(given).startswith("runs:/") else None
        if folder is None:
            tracking.configure(cfg.tracking)
            folder = tracking.download_artifacts(str(given))
        if not (folder / "adapter_config.json").is_file():
            raise QaLabError(
                f"model.adapter={given}: no adapter there (adapter_config.json missing)"
            )
        return folder, f"given:{file_sha256(folder / 'adapter_config.json')[:16]}"
    data_folder = build_dataset(cfg)
    key = train_key(cfg, read_manifest(data_folder)["key"])
    folder = Path(cfg.paths.cache) / "adapters" / key
    if not is_finished(folder):
        _train_adapter(cfg, data_folder, key, folder)
    return folder, key


def _require_trained_adapter(cfg: DictConfig) -> None:
    """Refuse `model=lora` on the openai backend when this config's adapter is not trained.

    Training it here would put a second model on a GPU that the server already fills.
    """
    data_folder, data_key = dataset_folder(cfg)
    adapter = Path(cfg.paths.cache) / "adapters" / train_key(cfg, data_key)
    if not (is_finished(data_folder) and is_finished(adapter)):
        raise QaLabError(
            "model=lora with llm.backend=openai: this config's adapter is not trained; run "
            "train.py with the same overrides first, or set model.adapter=FOLDER"
        )


def _train_adapter(cfg: DictConfig, data_folder: Path, key: str, folder: Path) -> None:
    """Train this config's adapter into `folder` under a train run (or reuse a twin's)."""
    train_items = datastore.read_split(data_folder, "train")
    if cfg.model.max_train_rows:
        train_items = train_items[: int(cfg.model.max_train_rows)]
    val_items = datastore.read_split(data_folder, "val")
    examples = functools.partial(_sft_examples, cfg, _context_retriever(cfg, data_folder))
    data_key = read_manifest(data_folder)["key"]
    tags = {"data_key": data_key, "train_key": key}
    with tracking.start_run(cfg, stage="train", key=key, variant="lora", tags=tags):
        manifest = {"key": key, "data_key": data_key, "model": keys.model_id(to_dict(cfg.llm))}
        folder, built = build_once(
            folder,
            lambda tmp: {
                **manifest,
                "summary": _fit(cfg, examples(train_items), examples(val_items), tmp),
            },
        )
        summary = read_manifest(folder)["summary"]
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        tracking.set_tags({"reused": str(not built).lower()})
        tracking.log_artifacts(folder, "adapter")


def _context_retriever(cfg: DictConfig, data_folder: Path) -> Any:
    """The retriever whose neighbours go into training prompts (`model.context=retrieved`)."""
    if cfg.model.context != "retrieved":
        return None
    return _retriever(cfg, data_folder, k=int(cfg.model.context_k))


def _sft_examples(cfg: DictConfig, retriever: Any, items: list[QAItem]) -> list[dict[str, Any]]:
    """Training examples rendered by the same prompt builder as evaluation.

    With a retriever each item gets its neighbours, never itself (`exclude_ids`).
    """
    passages = (
        retriever.search([it.question for it in items], exclude_ids=[it.id for it in items])
        if retriever is not None
        else [[] for _ in items]
    )
    return [
        prompts.sft_example(
            it, ps, system=cfg.prompt.system, context_header=cfg.prompt.context_header
        )
        for it, ps in zip(items, passages)
    ]


def _fit(
    cfg: DictConfig, train: list[dict[str, Any]], val: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """Load the base model, train the LoRA adapter into `out`; returns the training summary."""
    from qa_lab import models, training

    return training.train_lora(
        model=models.load_llm(cfg.llm, cfg.paths.models, for_training=True),
        tokenizer=models.load_tokenizer(cfg.llm, cfg.paths.models),
        train_examples=train,
        val_examples=val,
        lora_cfg=cfg.model,
        out_dir=out,
        log_metrics=lambda metrics, step: tracking.log_metrics(metrics, step=step),
    )


def train_main(cfg: DictConfig) -> None:
    """train.py: train (or reuse) the adapter of this config; the last line is its folder."""
    if cfg.model.kind != "lora":
        raise QaLabError(f"model={cfg.model.kind}: train.py trains model=lora")
    folder, key = adapter_for(cfg)
    summary = read_manifest(folder).get("summary", {})
    if summary:
        print(", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int | float)))
    print(folder)


# --------------------------------------------------------------------------- evaluation


def _retriever(cfg: DictConfig, data_folder: Path, *, k: int | None = None) -> Any:
    from qa_lab.retrieval import Retriever

    kind = cfg.retriever.kind
    k = int(cfg.retriever.k if k is None else k)
    if kind == "none":
        return Retriever("none", 0)
    manifest = read_manifest(data_folder)
    return Retriever(
        kind,
        k,
        datastore.read_split(data_folder, "train"),
        train_hash=manifest["files"]["train.jsonl"],
        embedder=cfg.embedder.name,
        document=cfg.retriever.document,
        cache_dir=cfg.paths.cache,
        batch_size=int(cfg.embedder.batch_size),
    )


@dataclass(frozen=True)
class EvalOptions:
    """The `eval` node: which split, how much of it, the train sample, the near-dup cut."""

    split: str
    limit: int | None  # first N items only (smoke runs)
    train_sample: int  # closed-book training items answered too (0 = none)
    near_dup_threshold: float  # cosine to the nearest training question

    @classmethod
    def from_cfg(cls, node: Any) -> EvalOptions:
        """Read `eval`, refusing an unknown split before any work."""
        return cls(
            split=require_choice("eval.split", node.split, ("test", "val")),
            limit=int(node.limit) if node.limit else None,
            train_sample=int(node.train_sample or 0),
            near_dup_threshold=float(node.near_dup_threshold),
        )


def evaluate(cfg: DictConfig) -> str:
    """Answer the eval split under this config, score the answers, log one evaluate run."""
    from qa_lab import generation, metrics, models

    metric_opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    opts = EvalOptions.from_cfg(cfg.eval)
    _check_backend(cfg)
    data_folder = build_dataset(cfg)
    items = _eval_items(opts, data_folder)
    adapter, model_key = _model(cfg)
    retriever = _retriever(cfg, data_folder)
    passages = retriever.search([it.question for it in items])
    params = generation.GenParams.from_cfg(cfg.generation, int(cfg.seed))
    backend = generation.backend(cfg, params, adapter, model_key)
    answer = generation.Answerer(
        backend, params, ItemCache(Path(cfg.paths.cache) / "answers.sqlite"), cfg.prompt
    )
    prompts_of_items = answer.render(items, passages)
    tags = {
        "data_key": read_manifest(data_folder)["key"],
        "model_key": backend.model_key,
        "index_key": retriever.key,
        "eval_set_hash": keys.eval_set_hash(items),
        "split": opts.split,
    }
    key = _predict_key(cfg, backend.model_key, items)
    with tracking.start_run(
        cfg, stage="evaluate", key=key, variant=variant_name(cfg), tags=tags
    ) as run_id:
        rows, speed = answer(items, passages, prompts_of_items)
        train = datastore.read_split(data_folder, "train")
        rows = _with_nearest_train(cfg, opts, rows, train)
        tracking.log_metrics(datastore.leakage_metrics(data_folder))
        score_and_log(cfg, metric_opts, rows, speed)
        sample = datastore.train_sample(train, opts.train_sample, int(cfg.seed))
        if sample:
            closed_book: list[list[Passage]] = [[] for _ in sample]
            sample_rows, _ = answer(sample, closed_book, answer.render(sample, closed_book))
            _log_train_sample(cfg, metric_opts, sample_rows)
    del backend, answer  # the model: GPU memory the next sweep job in this process needs
    models.release()
    return run_id


def _check_backend(cfg: DictConfig) -> None:
    """Refuse, before any work, what the configured backend cannot do."""
    kind = require_choice("llm.backend", cfg.llm.backend, ("local", "openai"))
    require_choice("model", cfg.model.kind, ("vanilla", "lora"))
    if kind == "openai" and cfg.model.kind == "lora" and not cfg.model.get("adapter"):
        _require_trained_adapter(cfg)


def _eval_items(opts: EvalOptions, data_folder: Path) -> list[QAItem]:
    """The eval split (its first `eval.limit` items), refused when empty."""
    items = datastore.read_split(data_folder, opts.split)[: opts.limit]
    if not items:
        raise QaLabError(f"{data_folder / (opts.split + '.jsonl')}: the eval split is empty")
    return items


def _model(cfg: DictConfig) -> tuple[Path | None, str]:
    """The adapter (None for vanilla) and the model key every answer is cached under."""
    if cfg.model.kind != "lora":
        return None, keys.model_id(to_dict(cfg.llm))
    adapter, key = adapter_for(cfg)
    return adapter, f"lora:{key}"


def _with_nearest_train(
    cfg: DictConfig, opts: EvalOptions, rows: list[EvalRow], train: list[QAItem]
) -> list[EvalRow]:
    """Rows with the cosine of their question to the nearest training question, and the flag.

    Scores on items with a near-duplicate in the training split measure recall of seen
    questions, not answering: the report splits every score on this.
    """
    embed = _question_embedder(cfg)
    queries, keys_ = embed([r.question for r in rows]), embed([it.question for it in train])
    _, best = similarity.nearest_neighbours(queries, keys_)
    threshold = opts.near_dup_threshold
    return [
        replace(row, nearest_train_cosine=round(float(c), 4), near_dup=float(c) >= threshold)
        for row, c in zip(rows, best)
    ]


def _log_train_sample(cfg: DictConfig, opts: Any, rows: list[EvalRow]) -> None:
    """Score the closed-book training sample and log it under `train_sample/`."""
    from qa_lab import metrics

    scored = metrics.score_rows(rows, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache)
    run_logging.log_train_sample(scored)


def _predict_key(cfg: DictConfig, model_key: str, items: list[QAItem]) -> str:
    return keys.predict_key(
        {k: to_dict(cfg[k]) for k in ("generation", "prompt", "retriever")},
        template_version=prompts.TEMPLATE_VERSION,
        model_key=model_key,
        eval_set=keys.eval_set_hash(items),
    )


def score_and_log(cfg: DictConfig, opts: Any, rows: list[EvalRow], speed: dict[str, float]) -> None:
    """Score the rows (`opts`: `metrics.MetricsOptions`) and log them on the active run."""
    from qa_lab import metrics, reporting, traces

    scored = metrics.score_rows(rows, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache)
    run_logging.log_scores(scored, speed)
    reporting.log_run_summary(scored, opts.sample_count, opts.sample_seed)
    if cfg.tracking.traces:
        traces.publish_item_traces(
            scored.rows,
            model=f"{cfg.llm.name}+lora" if cfg.model.kind == "lora" else str(cfg.llm.name),
            metrics_version=int(scored.corpus["metrics_version"]),
        )


def score_predictions_file(cfg: DictConfig) -> None:
    """`evaluate.py predictions=FILE`: score rows {question, prediction, reference}, no LLM."""
    from qa_lab import metrics

    metric_opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    path = Path(cfg.predictions)
    rows = loading.read_predictions(path)
    items = [QAItem(r.item_id, r.question, r.reference) for r in rows]
    key = keys.predictions_file_key(file_sha256(path))
    tags = {"eval_set_hash": keys.eval_set_hash(items), "predictions_file": str(path)}
    with tracking.start_run(cfg, stage="evaluate", key=key, variant=path.stem, tags=tags):
        score_and_log(cfg, metric_opts, rows, {})


def evaluate_main(cfg: DictConfig) -> None:
    """evaluate.py: a report rebuild, a predictions file, or a full evaluation."""
    if cfg.report:
        from qa_lab import reporting

        tracking.configure(cfg.tracking)
        reporting.report_sweep(cfg, str(cfg.report))
    elif cfg.predictions:
        score_predictions_file(cfg)
    else:
        evaluate(cfg)
