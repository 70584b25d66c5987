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
    corpus,
    dataset,
    datastore,
    evidence,
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
        return synthesis.synthesize_from_corpus(opts.synthesis, chunks, **where)
    return synthesis.synthesize(opts.synthesis, items, embed, **where)


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


# --------------------------------------------------------------------------- corpus


def corpus_for(cfg: DictConfig, data_folder: Path) -> corpus.Corpus:
    """This config's corpus: the chunked documents (`corpus=folder`) or the training pairs."""
    if corpus.CorpusOptions.from_cfg(cfg.corpus).kind == "train_qa":
        train_hash = read_manifest(data_folder)["files"]["train.jsonl"]
        return corpus.from_train(datastore.read_split(data_folder, "train"), train_hash)
    return build_corpus(cfg)


def corpus_key(cfg: DictConfig) -> str:
    """The corpus folder's key, from its files' bytes and the config (nothing is built)."""
    opts = corpus.CorpusOptions.from_cfg(cfg.corpus)
    if opts.kind != "folder":
        raise QaLabError(
            f"corpus={opts.kind} has no documents to read (its passages are the training "
            "pairs); synthesis from the corpus and continued pretraining need corpus=folder"
        )
    return keys.corpus_key(
        to_dict(cfg.corpus),
        to_dict(cfg.chunking),
        files_hash=corpus.files_hash(opts),
        tokenizer=cfg.embedder.name,
    )


def build_corpus(cfg: DictConfig) -> corpus.Corpus:
    """Read and chunk the corpus folder once per key, log it as a corpus run once."""
    opts = corpus.CorpusOptions.from_cfg(cfg.corpus)
    key = corpus_key(cfg)
    folder = Path(cfg.paths.cache) / "corpus" / key
    if not is_finished(folder):
        _build_corpus_folder(cfg, opts, key, folder)
    with lock(folder, "mlflow"):
        if tracking.find_finished_run("corpus", key, tracking.configure(cfg.tracking)) is None:
            with tracking.start_run(cfg, stage="corpus", key=key, tags={"corpus_key": key}):
                run_logging.log_corpus(folder, key)
    return corpus.load_folder(folder, key)


def _build_corpus_folder(
    cfg: DictConfig, opts: corpus.CorpusOptions, key: str, folder: Path
) -> None:
    """Chunk sizes checked against the embedder, then read -> chunk -> write, once."""
    from qa_lab.retrieval import embedder_max_tokens, embedder_tokenizer

    chunk_opts = corpus.ChunkingOptions.from_cfg(cfg.chunking)
    limit = embedder_max_tokens(cfg.embedder.name)
    if chunk_opts.size > limit:  # the embedder would silently cut every longer chunk
        raise QaLabError(
            f"chunking.size={chunk_opts.size} is more than {cfg.embedder.name} reads "
            f"({limit} tokens); choose at most {limit}"
        )
    tokenizer = embedder_tokenizer(cfg.embedder.name)
    build_once(
        folder,
        lambda tmp: {
            "key": key,
            **corpus.build_into(opts, chunk_opts, tokenizer, tmp),
            "config": to_dict(cfg.corpus),
            "version": keys.VERSIONS["corpus"],
        },
    )


def _gold(cfg: DictConfig, items: list[QAItem], kb: corpus.Corpus) -> list[evidence.Gold | None]:
    """The items' gold passages in this corpus (named evidence, else inferred)."""
    threshold = corpus.CorpusOptions.from_cfg(cfg.corpus).gold_threshold
    return evidence.gold_for(items, kb, _question_embedder(cfg), threshold)


# --------------------------------------------------------------------------- training


def train_key(cfg: DictConfig, data_key: str, cpt_key: str | None = None) -> str:
    """Adapter identity: base model, dataset, training config, prompt (and retrieval if used).

    `cpt_key`: the continued pretraining this SFT continues (`model.knowledge` corpus/both).
    """
    context = require_choice("model.context", cfg.model.context, ("none", "retrieved"))
    retrieval = None
    if context == "retrieved":
        retrieval = {"embedder": cfg.embedder.name, "document": cfg.retriever.document}
        if cfg.retriever.kind != "faiss":  # faiss keys stay as they were before other kinds
            retrieval["retriever"] = keys.without(to_dict(cfg.retriever), ("k",))
    return keys.train_key(
        to_dict(cfg.model),
        prompt=to_dict(cfg.prompt),
        template_version=prompts.TEMPLATE_VERSION,
        data_key=data_key,
        model=keys.model_id(to_dict(cfg.llm)),
        retrieval=retrieval,
        cpt=cpt_key,
    )


def _knowledge(cfg: DictConfig) -> str:
    """`model.knowledge`, refused when it asks to learn a corpus there is none of."""
    from qa_lab.training import KNOWLEDGE

    knowledge = require_choice("model.knowledge", cfg.model.get("knowledge") or "qa", KNOWLEDGE)
    if knowledge != "qa" and cfg.corpus.kind != "folder":
        raise QaLabError(
            f"model.knowledge={knowledge} learns a document corpus, but corpus={cfg.corpus.kind} "
            "has none (its passages are the SFT's own training pairs); use corpus=folder or "
            "model.knowledge=qa"
        )
    return knowledge


def cpt_key(cfg: DictConfig, data_key: str) -> str | None:
    """The continued pretraining's key (None for `model.knowledge=qa`)."""
    knowledge = _knowledge(cfg)
    if knowledge == "qa":
        return None
    return keys.cpt_key(
        to_dict(cfg.model),
        knowledge=knowledge,
        corpus=corpus_key(cfg),
        data_key=data_key if knowledge == "both" else None,
        model=keys.model_id(to_dict(cfg.llm)),
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
    data_key = read_manifest(data_folder)["key"]
    upstream = cpt_key(cfg, data_key)
    key = train_key(cfg, data_key, upstream)
    folder = Path(cfg.paths.cache) / "adapters" / key
    if not is_finished(folder):
        init = _cpt_adapter(cfg, data_folder, upstream) if upstream else None
        _train_adapter(cfg, data_folder, key, folder, init)
    return folder, key


def _require_trained_adapter(cfg: DictConfig) -> None:
    """Refuse `model=lora` on the openai backend when this config's adapter is not trained.

    Training it here would put a second model on a GPU that the server already fills.
    """
    data_folder, data_key = dataset_folder(cfg)
    adapter = Path(cfg.paths.cache) / "adapters" / train_key(cfg, data_key, cpt_key(cfg, data_key))
    if not (is_finished(data_folder) and is_finished(adapter)):
        raise QaLabError(
            "model=lora with llm.backend=openai: this config's adapter is not trained; run "
            "train.py with the same overrides first, or set model.adapter=FOLDER"
        )


def _cpt_adapter(cfg: DictConfig, data_folder: Path, key: str) -> Path:
    """The continued-pretraining adapter of `key`, trained under a cpt run when missing."""
    from qa_lab import training

    folder = Path(cfg.paths.cache) / "adapters" / key
    if is_finished(folder):
        return folder
    kb = build_corpus(cfg)
    texts = training.cpt_texts(
        _knowledge(cfg), kb.texts, datastore.read_split(data_folder, "train")
    )
    tags = {"cpt_key": key, "corpus_key": kb.key}
    with tracking.start_run(cfg, stage="cpt", key=key, variant="lora", tags=tags):
        folder, built = build_once(
            folder,
            lambda tmp: {"key": key, "summary": _fit_cpt(cfg, texts, tmp)},
        )
        _log_training(folder, built, "cpt_adapter")
    return folder


def _log_training(folder: Path, built: bool, artifact: str) -> None:
    """A training run's summary numbers, whether it reused a twin's folder, the adapter."""
    summary = read_manifest(folder)["summary"]
    tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    tracking.set_tags({"reused": str(not built).lower()})
    tracking.log_artifacts(folder, artifact)


def _train_adapter(
    cfg: DictConfig, data_folder: Path, key: str, folder: Path, init: Path | None
) -> None:
    """Train this config's adapter into `folder` under a train run (or reuse a twin's).

    `init`: the continued-pretraining adapter the SFT continues (None: a fresh adapter).
    """
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
                "summary": _fit(cfg, examples(train_items), examples(val_items), tmp, init),
            },
        )
        _log_training(folder, built, "adapter")


def _context_retriever(cfg: DictConfig, data_folder: Path) -> Any:
    """The retriever whose neighbours go into training prompts (`model.context=retrieved`)."""
    if cfg.model.context != "retrieved":
        return None
    return _retriever(cfg, corpus_for(cfg, data_folder), k=int(cfg.model.context_k))


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
    cfg: DictConfig,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    out: Path,
    init: Path | None,
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
        log_metrics=_log_step,
        init_adapter=init,
    )


def _fit_cpt(cfg: DictConfig, texts: list[str], out: Path) -> dict[str, Any]:
    """Load the base model, run the continued pretraining into `out`; returns its summary."""
    from qa_lab import models, training

    return training.train_cpt(
        model=models.load_llm(cfg.llm, cfg.paths.models, for_training=True),
        tokenizer=models.load_tokenizer(cfg.llm, cfg.paths.models),
        texts=texts,
        lora_cfg=cfg.model,
        out_dir=out,
        log_metrics=_log_step,
    )


def _log_step(metrics: dict[str, float], step: int) -> None:
    tracking.log_metrics(metrics, step=step)


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


def _retriever(cfg: DictConfig, kb: corpus.Corpus, *, k: int | None = None) -> Any:
    """The configured retriever over this corpus (`k`: another depth, for training context)."""
    from qa_lab.retrieval import make_retriever

    return make_retriever(
        cfg.retriever,
        kb,
        embedder=cfg.embedder.name,
        cache_dir=cfg.paths.cache,
        batch_size=int(cfg.embedder.batch_size),
        k=k,
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
    kb = corpus_for(cfg, data_folder)
    evidence.check_documents(items, kb, where=str(data_folder / f"{opts.split}.jsonl"))
    adapter, model_key = _model(cfg)
    retriever = _retriever(cfg, kb)
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
        "corpus_key": kb.key,
        "eval_set_hash": keys.eval_set_hash(items),
        "split": opts.split,
        "retriever": retriever.kind,
        "retriever_k": str(retriever.k),
    }
    key = _predict_key(cfg, backend.model_key, items)
    detail = f"{retriever.kind}-k{retriever.k}" if retriever.k else None
    with tracking.start_run(
        cfg, stage="evaluate", key=key, variant=variant_name(cfg), tags=tags, detail=detail
    ) as run_id:
        rows, speed = answer(items, passages, prompts_of_items)
        train = datastore.read_split(data_folder, "train")
        rows = _with_gold_and_nearest(cfg, opts, rows, (items, train), kb, data_folder)
        if retriever.kind != "none":
            tracking.log_metrics({f"retrieval/{k}": v for k, v in retriever.stats().items()})
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


def _with_gold_and_nearest(
    cfg: DictConfig,
    opts: EvalOptions,
    rows: list[EvalRow],
    items_and_train: tuple[list[QAItem], list[QAItem]],
    kb: corpus.Corpus,
    data_folder: Path,
) -> list[EvalRow]:
    """Rows with their gold passages and nearest training question; logs the leakage audit.

    The audit puts question leakage (the split's) next to evidence overlap (the corpus's).
    """
    items, train = items_and_train
    gold = _gold(cfg, items, kb)
    overlap = evidence.evidence_overlap(gold, _gold(cfg, train, kb))
    tracking.log_metrics(
        {**datastore.leakage_metrics(data_folder), "leakage/evidence_overlap": overlap}
    )
    return _with_nearest_train(cfg, opts, evidence.mark(rows, gold), train)


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
