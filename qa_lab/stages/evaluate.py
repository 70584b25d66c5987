"""The evaluate stage: answer the eval split under one config, score it, log one run.

Answers are cached per item (`answers.sqlite`, by the predict key), so a rerun, another metric
set or a report rebuild never generates again; `evaluate.py predictions=FILE` scores a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import (
    checks,
    corpus,
    datastore,
    evidence,
    keys,
    loading,
    logged_models,
    prompts,
    run_logging,
    similarity,
    tracking,
)
from qa_lab.cache import ItemCache, file_sha256, read_manifest
from qa_lab.config import to_dict, variant_name
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import EvalRow, Passage, QAItem
from qa_lab.stages.corpus import corpus_for, gold_passages, question_embedder, retriever_for
from qa_lab.stages.dataset import build_dataset
from qa_lab.stages.train import adapter_for, replicates, require_trained_adapter


@dataclass(frozen=True)
class EvalOptions:
    """The `eval` node: which split, how much of it, the train sample, the near-dup cut."""

    split: str
    limit: int | None  # first N items only (smoke runs)
    train_sample: int  # closed-book training items answered too (0 = none)
    near_dup_threshold: float  # cosine to the nearest training question

    @classmethod
    def from_cfg(cls, node: Any) -> EvalOptions:
        """Read `eval`, each key checked (one line naming it) before any work."""
        return cls(
            split=require_choice("eval.split", node.split, ("test", "val")),
            # 0 or null: every item
            limit=checks.maybe_whole(node.limit, "eval.limit", low=0) or None,
            train_sample=checks.maybe_whole(node.train_sample, "eval.train_sample", low=0) or 0,
            near_dup_threshold=checks.number(
                node.near_dup_threshold, "eval.near_dup_threshold", low=-1, high=1
            ),  # a cosine
        )


def evaluate(cfg: DictConfig) -> str:
    """Answer the eval split under this config, score the answers, log one evaluate run."""
    from qa_lab import generation, metrics, models

    run_logging.reset_peak_memory()  # the run's own peak, not an earlier sweep job's
    metric_opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    opts = EvalOptions.from_cfg(cfg.eval)
    _check_backend(cfg)
    data_folder = build_dataset(cfg)
    items = _eval_items(opts, data_folder)
    kb = corpus_for(cfg, data_folder)
    evidence.check_documents(items, kb, where=str(data_folder / f"{opts.split}.jsonl"))
    adapter, model_key = _model(cfg)
    retriever = retriever_for(cfg, kb)
    passages = retriever.search([it.question for it in items])
    gen = generation.GenerationOptions.from_cfg(cfg.generation, int(cfg.seed))
    backend = generation.backend(cfg, gen.params, adapter, model_key)
    cache = ItemCache(Path(cfg.paths.cache) / "answers.sqlite")
    answer = generation.Answerer(backend, gen.params, cache, cfg.prompt, gen.repeats)
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
        **_seed_tags(cfg),
    }
    key = _predict_key(cfg, backend.model_key, items)
    detail = "-".join(filter(None, (_retrieval_detail(retriever), _seed_detail(cfg)))) or None
    with _evaluate_run(cfg, key, tags, detail, (adapter, model_key)) as run_id:
        kb_folder = Path(cfg.paths.cache) / "corpus" / kb.key if kb.kind == "folder" else None
        run_logging.log_data_inputs(data_folder, (opts.split,), kb_folder)
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


def _seed_tags(cfg: DictConfig) -> dict[str, str]:
    """A LoRA run's training seed, and how many replicates its config has (`model.seeds`)."""
    if cfg.model.kind != "lora" or cfg.model.get("adapter"):
        return {}
    return {"seed": str(cfg.model.seed), "replicates": str(len(cfg.model.get("seeds") or [1]))}


def _retrieval_detail(retriever: Any) -> str | None:
    return f"{retriever.kind}-k{retriever.k}" if retriever.k else None


def _seed_detail(cfg: DictConfig) -> str | None:
    """`seed43` in a replicate's run name, so replicates tell apart in the runs table."""
    replicated = cfg.model.kind == "lora" and len(cfg.model.get("seeds") or []) > 1
    return f"seed{cfg.model.seed}" if replicated else None


@contextlib.contextmanager
def _evaluate_run(
    cfg: DictConfig,
    key: str,
    tags: dict[str, str],
    detail: str | None,
    model: tuple[Path | None, str],
) -> Iterator[str]:
    """The evaluate run, described in a line, its metrics and traces linked to its model.

    `model`: the adapter (None: vanilla) and the model key, as `_model` returns them; the
    logged model is the adapter's, or the base model's entry.
    """
    adapter, model_key = model
    lora = model_key.removeprefix("lora:") if adapter else None
    about = run_logging.evaluate_description(
        variant_name(cfg), str(cfg.llm.name), lora, cfg.model.get("knowledge"), tags
    )
    given = cfg.model.get("adapter")
    with (
        tracking.start_run(
            cfg,
            stage="evaluate",
            key=key,
            variant=variant_name(cfg),
            tags=tags,
            detail=detail,
            description=about,
        ) as run_id,
        logged_models.evaluating(to_dict(cfg.llm), adapter, model_key, given, cfg.paths.cache),
    ):
        yield run_id


def _check_backend(cfg: DictConfig) -> None:
    """Refuse, before any work, what the configured backend cannot do."""
    kind = require_choice("llm.backend", cfg.llm.backend, ("local", "openai"))
    require_choice("model", cfg.model.kind, ("vanilla", "lora"))
    if kind == "openai" and cfg.model.kind == "lora" and not cfg.model.get("adapter"):
        require_trained_adapter(cfg)


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
    gold = gold_passages(cfg, items, kb)
    overlap = evidence.evidence_overlap(gold, gold_passages(cfg, train, kb))
    tracking.log_metrics(
        {**datastore.leakage_metrics(data_folder), "leakage/evidence_overlap": overlap}
    )
    repeats = len(rows) // len(items)  # rows come repeat by repeat (`generation.Answerer`)
    return _with_nearest_train(cfg, opts, evidence.mark(rows, gold * repeats), train)


def _with_nearest_train(
    cfg: DictConfig, opts: EvalOptions, rows: list[EvalRow], train: list[QAItem]
) -> list[EvalRow]:
    """Rows with the cosine of their question to the nearest training question, and the flag.

    Scores on items with a near-duplicate in the training split measure recall of seen
    questions, not answering: the report splits every score on this.
    """
    embed = question_embedder(cfg)
    queries, keys_ = embed([r.question for r in rows]), embed([it.question for it in train])
    _, best = similarity.nearest_neighbours(queries, keys_)
    threshold = opts.near_dup_threshold
    return [
        replace(row, nearest_train_cosine=round(float(c), 4), near_dup=float(c) >= threshold)
        for row, c in zip(rows, best)
    ]


def _log_train_sample(cfg: DictConfig, opts: Any, rows: list[EvalRow]) -> None:
    """Score the closed-book training sample and log it under `train_sample/`."""
    from qa_lab import run_scores

    scored = run_scores.score_rows(
        rows, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )
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
    from qa_lab import reporting, run_scores, traces

    scored = run_scores.score_rows(
        rows, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )
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
        for one in replicates(cfg):  # one evaluate run per training seed of `model.seeds`
            evaluate(one)
