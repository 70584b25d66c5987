"""Orchestration of the three stages; each reads its config, reuses or builds, and logs a run.

Stages are cached by key (`cache.stage_key`): a dataset by its config and source bytes, an
adapter by the base model, dataset and training config, predictions per item by model, prompt
and generation settings. Nothing else imports this module.
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import data, prompts, synthesis, tracking
from qa_lab.cache import (
    ItemCache,
    build_once,
    file_sha256,
    is_finished,
    lock,
    read_manifest,
    stage_key,
    tree_sha256,
)
from qa_lab.config import to_dict, variant_name
from qa_lab.errors import QaLabError, require_choice
from qa_lab.jsonl import read_jsonl, write_json, write_jsonl
from qa_lab.records import QAItem

DATA_VERSION = 2  # 2: topic_source, references, seed lineage in the rows
TRAIN_VERSION = 1
SPLITS = ("train", "val", "test")
COUNT_ORDER = (
    "loaded",
    "synthetic_kept",
    "synthetic_rejected",
    "before_dedup",
    "after_exact_dedup",
    "after_semantic_dedup",
    "train",
    "val",
    "test",
)


# --------------------------------------------------------------------------- dataset


def _source_hash(source: Path) -> str:
    if source.is_dir():
        return tree_sha256(source)
    if not source.is_file():
        raise QaLabError(f"dataset.source={source}: file not found")
    return file_sha256(source)


def file_sha256_tree(folder: Path) -> str:
    """Hash of a folder's files (a saved HF dataset), by relative path and content."""
    from qa_lab.cache import stable_hash

    return stable_hash(
        {
            str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    )


def dataset_key(cfg: DictConfig) -> str:
    """Key over what changes the dataset: its config (not where it goes), source, embedder."""
    ds = to_dict(cfg.dataset)
    ds.pop("output_dir", None)
    syn = ds.pop("synthesis")
    if syn["backend"] != "none":
        for unimportant in ("batch_size", "base_url", "api_key_env"):
            syn.pop(unimportant, None)
        ds["synthesis"] = syn
    upstream = {"source": _source_hash(Path(cfg.dataset.source)), "embedder": cfg.embedder.name}
    return stage_key(ds, version=DATA_VERSION, exclude=("source",), upstream=upstream)


def dataset_folder(cfg: DictConfig) -> tuple[Path, str]:
    """Where this config's dataset lives (built or not) and its key."""
    key = dataset_key(cfg)
    output_dir = cfg.get("output_dir") or cfg.dataset.output_dir
    if output_dir:
        folder = Path(output_dir).expanduser().resolve()
        if is_finished(folder) and read_manifest(folder).get("key") != key:
            raise QaLabError(
                f"output_dir={folder} holds a dataset built from another config; "
                "choose an empty folder"
            )
        return folder, key
    return Path(cfg.paths.cache) / "data" / key, key


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


def _build_dataset_into(cfg: DictConfig, key: str, out: Path) -> dict[str, Any]:
    from qa_lab.retrieval import embed

    ds = cfg.dataset
    require_choice("dataset.split.strategy", ds.split.strategy, ("group", "random"))
    require_choice("dataset.synthesis.backend", ds.synthesis.backend, ("none", "local", "openai"))
    columns = {k: v for k, v in to_dict(ds.columns).items() if v}
    loaded = data.load_items(
        ds.source,
        encoding=ds.encoding,
        fmt=ds.format,
        columns=columns or None,
        on_bad_row=ds.on_bad_row,
        similar_labels=float(ds.topics.similar_labels),
    )
    items, mapping = loaded.items, loaded.mapping
    print(f"dataset: {len(items)} rows from {ds.source} (columns: {mapping})", flush=True)
    if loaded.skipped:
        print(f"dataset: skipped {sum(loaded.skipped.values())} bad rows {loaded.skipped}")
    for a, b, ratio in loaded.topics.get("similar", []):
        print(f"dataset: topics {a!r} and {b!r} look alike ({ratio}); not merged")
    cache_dir = Path(cfg.paths.cache)
    lineage = "seed_id column" if mapping["seed_id"] else "near-duplicate clusters"
    if ds.seeds:
        questions = [it.question for it in items]
        items = data.assign_seeds(
            items, embed(questions, cfg.embedder.name, cache_dir=cache_dir), ds.seeds
        )
        lineage = f"dataset.seeds={ds.seeds}"
    counts: dict[str, int] = {"loaded": len(items)}
    rejects: Counter[str] = Counter()
    if ds.synthesis.backend != "none":
        generated, rejects = synthesize(cfg, items)
        items = items + generated
        counts["synthetic_kept"] = len(generated)
        counts["synthetic_rejected"] = sum(rejects.values())
    counts["before_dedup"] = len(items)
    items, exact_pairs = data.exact_dedup(items, ds.normalize)
    counts["after_exact_dedup"] = len(items)
    vectors = embed(
        [it.question for it in items],
        cfg.embedder.name,
        cache_dir=cache_dir,
        batch_size=cfg.embedder.batch_size,
        progress=True,
    )
    kept, semantic_pairs = data.semantic_dedup(vectors, float(ds.semantic_dedup.threshold))
    report = [
        {
            "stage": "exact",
            "removed_id": r.id,
            "removed": r.question,
            "kept_id": k.id,
            "kept": k.question,
            "similarity": 1.0,
        }
        for r, k in exact_pairs
    ] + [
        {
            "stage": "semantic",
            "removed_id": items[r].id,
            "removed": items[r].question,
            "kept_id": items[k].id,
            "kept": items[k].question,
            "similarity": round(float(s), 4),
        }
        for r, k, s in semantic_pairs
    ]
    items = [items[i] for i in kept]
    vectors = vectors[kept]
    counts["after_semantic_dedup"] = len(items)
    topics = loaded.topics
    if not mapping["topic"] and ds.topics.infer:
        opts = {k: int(ds.topics[k]) for k in ("min_k", "max_k", "seed", "terms")}
        items, topics = data.infer_topics(items, vectors, **opts)
        print(f"dataset: {topics['k']} topics inferred: {', '.join(topics['labels'])}")
    groups = None
    if ds.split.strategy == "group":
        groups = data.lineage_groups(items, vectors, float(ds.split.group_threshold))
    splits = data.split_items(
        items,
        ds.split.strategy,
        train=float(ds.split.train),
        val=float(ds.split.val),
        seed=int(ds.split.seed),
        groups=groups,
        stratify=ds.split.stratify if ds.split.strategy == "group" else None,
    )
    position = {it.id: i for i, it in enumerate(items)}
    audit = data.leakage_audit(
        splits["train"],
        splits["test"],
        vectors[[position[it.id] for it in splits["train"]]],
        vectors[[position[it.id] for it in splits["test"]]],
    )
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", [it.to_dict() for it in splits[name]])
        counts[name] = len(splits[name])
    write_jsonl(out / "dedup_report.jsonl", report)
    write_json(out / "leakage_audit.json", audit)
    return {
        "key": key,
        "counts": counts,
        "rejects": dict(rejects),
        "skipped": loaded.skipped,
        "columns": mapping,
        "topics": topics,
        "lineage": lineage,
        "config": to_dict(ds),
        "embedder": cfg.embedder.name,
        "version": DATA_VERSION,
    }


def synthesize(cfg: DictConfig, seeds: list[QAItem]) -> tuple[list[QAItem], Counter[str]]:
    """Grow the seeds with the configured generator; returns valid rows and reject counts."""
    from qa_lab.generation import GenParams, LocalGenerator, OpenAIGenerator, generate_cached
    from qa_lab.retrieval import embed

    syn = cfg.dataset.synthesis
    mode = synthesis.check_mode(syn.mode)
    params = GenParams(
        max_new_tokens=int(syn.max_new_tokens),
        do_sample=True,
        temperature=float(syn.temperature),
        # a paraphrase is one line: stopping there saves most of the generation time
        stop_strings=("\n",) if mode == "paraphrase" else (),
        seed=int(syn.seed),
    )
    per_seed = int(syn.per_seed)
    jobs = [(seed, j) for seed in seeds for j in range(per_seed)]
    messages = [synthesis.messages_for(seed, mode) for seed, _ in jobs]
    llm_cfg = DictConfig(
        {
            "name": syn.model,
            "revision": None,
            "dtype": "float32",
            "device": "auto",
            "load_in_4bit": False,
        }
    )
    if syn.backend == "openai":
        from qa_lab.generation import chat_request

        # one seed per sample: the server would otherwise return one answer per seed row
        prompt_texts = [chat_request(m, params.seed + j) for m, (_, j) in zip(messages, jobs)]
        model_key = f"openai:{syn.model}"

        def make() -> Any:
            return OpenAIGenerator.from_cfg(syn, "dataset.synthesis", params, syn.model)
    else:
        from qa_lab import models

        tokenizer = models.load_tokenizer(llm_cfg, cfg.paths.models)
        prompt_texts = [prompts.render_prompt(tokenizer, m) for m in messages]
        model_key = syn.model

        def make() -> Any:
            model = models.load_llm(llm_cfg, cfg.paths.models)
            return LocalGenerator(model, tokenizer, params, int(syn.batch_size))

    outputs = generate_cached(
        [f"{seed.id}#{j}" for seed, j in jobs],
        prompt_texts,
        params,
        make,
        ItemCache(Path(cfg.paths.cache) / "answers.sqlite"),
        model_key,
        salts=[str(j) for _, j in jobs],
    )
    candidates = [
        synthesis.parse(seed, out.prediction, mode) for (seed, _), out in zip(jobs, outputs)
    ]
    cache_dir = Path(cfg.paths.cache)
    cand_vecs = embed(
        [c.question or "-" for c in candidates], cfg.embedder.name, cache_dir=cache_dir
    )
    seed_vecs = embed([s.question for s, _ in jobs], cfg.embedder.name, cache_dir=cache_dir)
    kept, rejects = synthesis.validate(
        candidates,
        cand_vecs,
        seed_vecs,
        min_chars=int(syn.min_chars),
        max_chars=int(syn.max_chars),
        min_topic_similarity=float(syn.min_topic_similarity),
        max_seed_similarity=float(syn.max_seed_similarity),
    )
    print(f"synthesis: {len(kept)}/{len(candidates)} candidates kept, rejects {dict(rejects)}")
    return synthesis.to_items(candidates, kept, syn.model), rejects


def read_split(folder: Path, name: str) -> list[QAItem]:
    """One split of a finished dataset folder."""
    return [QAItem.from_dict(row) for row in read_jsonl(folder / f"{name}.jsonl")]


def _log_dataset_run(cfg: DictConfig, folder: Path, key: str) -> None:
    manifest = read_manifest(folder)
    topics = manifest.get("topics") or {}
    tags = {
        "data_key": key,
        "topic_source": topics.get("source", "none"),
        "lineage": manifest.get("lineage", ""),
    }
    with tracking.start_run(cfg, stage="dataset", key=key, tags=tags):
        tracking.log_metrics({f"count/{k}": v for k, v in manifest["counts"].items()})
        tracking.log_metrics({f"rejects/{k}": v for k, v in manifest["rejects"].items()})
        tracking.log_metrics({f"skipped/{k}": v for k, v in manifest.get("skipped", {}).items()})
        tracking.log_params({f"mapping.{k}": v for k, v in manifest["columns"].items()})
        tracking.log_dict(topics, "topics.json")
        silhouettes = topics.get("silhouette", {})
        tracking.log_metrics({f"topics/silhouette_k{k}": v for k, v in silhouettes.items()})
        tracking.log_metrics({"topics/k": topics["k"]} if "k" in topics else {})
        for name in SPLITS:
            rows = read_jsonl(folder / f"{name}.jsonl")
            tracking.log_input(rows, f"{name}-{key[:8]}", name, manifest["files"][f"{name}.jsonl"])
        report = read_jsonl(folder / "dedup_report.jsonl")
        tracking.log_table(report or [{"stage": "none"}], "dedup_pairs.json")
        tracking.log_artifacts(folder / "leakage_audit.json")
        tracking.log_metrics(_leakage_metrics(folder))
        tracking.log_artifacts(folder / "manifest.json")
        tracking.log_figure(_topic_figure(folder, topics.get("source")), "topic_distribution.png")


def _topic_figure(folder: Path, source: str | None) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {
        name: Counter(it.topic or "unknown" for it in read_split(folder, name)) for name in SPLITS
    }
    topics = sorted(set().union(*counts.values()))
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0] * len(topics)
    for name in SPLITS:
        values = [counts[name][t] for t in topics]
        ax.bar(topics, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("rows")
    ax.set_title(f"Topic distribution per split ({source or 'no'} topics)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    return fig


def build_dataset_main(cfg: DictConfig) -> None:
    """build_dataset.py: the last printed line is the dataset folder."""
    folder = build_dataset(cfg)
    counts = read_manifest(folder)["counts"]
    print(" -> ".join(f"{k} {counts[k]}" for k in COUNT_ORDER if k in counts))
    print(folder)


# --------------------------------------------------------------------------- training


def model_id(cfg: DictConfig) -> str:
    """Identity of the base model: name, revision and quantisation (part of every key)."""
    llm = cfg.llm
    rev = f"@{llm.revision}" if llm.get("revision") else ""
    return f"{llm.name}{rev}:{llm.dtype}{':nf4' if llm.load_in_4bit else ''}"


def train_key(cfg: DictConfig, data_key: str) -> str:
    """Adapter identity: base model, dataset, training config, prompt (and retrieval if used)."""
    lora = to_dict(cfg.model)
    require_choice("model.context", lora["context"], ("none", "retrieved"))
    if lora["context"] == "retrieved":
        lora["retrieval"] = {"embedder": cfg.embedder.name, "document": cfg.retriever.document}
    else:
        lora.pop("context_k", None)
    lora["prompt"] = to_dict(cfg.prompt)
    lora["template_version"] = prompts.TEMPLATE_VERSION
    return stage_key(
        lora,
        version=TRAIN_VERSION,
        exclude=("adapter", "kind"),
        upstream={"data": data_key, "model": model_id(cfg)},
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


def _train_adapter(cfg: DictConfig, data_folder: Path, key: str, folder: Path) -> None:
    from qa_lab import models, training

    lora = cfg.model
    train_items = read_split(data_folder, "train")
    if lora.max_train_rows:
        train_items = train_items[: int(lora.max_train_rows)]
    val_items = read_split(data_folder, "val")
    retriever = (
        _retriever(cfg, data_folder, k=int(lora.context_k)) if lora.context == "retrieved" else None
    )

    def examples(items: list[QAItem]) -> list[dict[str, Any]]:
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

    data_key = read_manifest(data_folder)["key"]
    with tracking.start_run(
        cfg, stage="train", key=key, variant="lora", tags={"data_key": data_key, "train_key": key}
    ):

        def build(tmp: Path) -> dict[str, Any]:
            tokenizer = models.load_tokenizer(cfg.llm, cfg.paths.models)
            model = models.load_llm(cfg.llm, cfg.paths.models, for_training=True)
            summary = training.train_lora(
                model=model,
                tokenizer=tokenizer,
                train_examples=examples(train_items),
                val_examples=examples(val_items),
                lora_cfg=lora,
                out_dir=tmp,
                log_metrics=lambda metrics, step: tracking.log_metrics(metrics, step=step),
            )
            return {"key": key, "data_key": data_key, "model": model_id(cfg), "summary": summary}

        folder, built = build_once(folder, build)
        summary = read_manifest(folder)["summary"]
        tracking.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        tracking.set_tags({"reused": str(not built).lower()})
        tracking.log_artifacts(folder, "adapter")


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
        read_split(data_folder, "train"),
        train_hash=manifest["files"]["train.jsonl"],
        embedder=cfg.embedder.name,
        document=cfg.retriever.document,
        cache_dir=cfg.paths.cache,
        batch_size=int(cfg.embedder.batch_size),
    )


def eval_set_hash(items: list[QAItem]) -> str:
    """Identity of an evaluation set: item ids, questions and references, in order."""
    from qa_lab.cache import stable_hash

    return stable_hash([[it.id, it.question, it.answer, *(it.references or ())] for it in items])


def evaluate(cfg: DictConfig) -> str:
    """Generate answers for the eval split under this config, score them, log one run."""
    from qa_lab import metrics, models
    from qa_lab.generation import GenParams, OpenAIGenerator, chat_request, generate_cached

    metrics.validate_groups(list(cfg.metrics.groups))
    require_choice("eval.split", cfg.eval.split, ("test", "val"))
    data_folder = build_dataset(cfg)
    data_key = read_manifest(data_folder)["key"]
    items = read_split(data_folder, cfg.eval.split)
    if cfg.eval.limit:
        items = items[: int(cfg.eval.limit)]
    if not items:
        raise QaLabError(f"{data_folder / (cfg.eval.split + '.jsonl')}: the eval split is empty")
    require_choice("model", cfg.model.kind, ("vanilla", "lora"))
    adapter, model_key = None, model_id(cfg)
    if cfg.model.kind == "lora":
        adapter, train_key_ = adapter_for(cfg)
        model_key = f"lora:{train_key_}"
    retriever = _retriever(cfg, data_folder)
    passages = retriever.search([it.question for it in items])
    params = GenParams.from_cfg(cfg.generation, int(cfg.seed))
    cache = ItemCache(Path(cfg.paths.cache) / "answers.sqlite")
    backend = require_choice("llm.backend", cfg.llm.get("backend", "local"), ("local", "openai"))
    render: Callable[[list[dict[str, str]]], str]
    if backend == "openai":
        served = served_model(cfg, adapter)
        model_key = f"openai:{served}:{model_key}"
        render = chat_request
        make_generator: Callable[[], Any] = functools.cache(
            functools.partial(OpenAIGenerator.from_cfg, cfg.llm, "llm", params, served)
        )
    else:
        tokenizer = models.load_tokenizer(cfg.llm, cfg.paths.models)
        render = functools.partial(prompts.render_prompt, tokenizer)
        make_generator = functools.cache(
            functools.partial(_local_generator, cfg, tokenizer, params, adapter)
        )
    messages = _messages(cfg, items, passages)
    prompt_texts = [render(m) for m in messages]

    variant = variant_name(cfg)
    tags = {
        "data_key": data_key,
        "model_key": model_key,
        "index_key": retriever.key,
        "eval_set_hash": eval_set_hash(items),
        "split": cfg.eval.split,
    }
    with tracking.start_run(
        cfg, stage="evaluate", key=_predict_key(cfg, model_key, items), variant=variant, tags=tags
    ) as run_id:
        started = time.perf_counter()
        preds = generate_cached(
            [it.id for it in items], prompt_texts, params, make_generator, cache, model_key
        )
        wall = time.perf_counter() - started
        rows = _answer_rows(items, preds, passages, messages, prompt_texts, params.max_new_tokens)
        train_items = read_split(data_folder, "train")
        nearest = _nearest_train_cosine(cfg, items, train_items)
        threshold = float(cfg.eval.near_dup_threshold)
        for row, cosine in zip(rows, nearest):
            row.update(nearest_train_cosine=round(cosine, 4), near_dup=cosine >= threshold)
        fresh = [r for r in rows if not r["cached"]]
        speed = {"generation_wall_s": wall, "answers_generated": len(fresh)}
        if fresh:
            gen_s = sum(r["seconds"] for r in fresh)
            speed["answers_per_s"] = len(fresh) / gen_s if gen_s else 0.0
            speed["tokens_per_s"] = (
                sum(r["generated_tokens"] for r in fresh) / gen_s if gen_s else 0.0
            )
        tracking.log_metrics(_leakage_metrics(data_folder))
        score_and_log(cfg, rows, speed)
        sample = train_sample(cfg, train_items)
        if sample:
            closed_book: list[list[Any]] = [[] for _ in sample]
            sample_messages = _messages(cfg, sample, closed_book)
            sample_prompts = [render(m) for m in sample_messages]
            sample_preds = generate_cached(
                [it.id for it in sample], sample_prompts, params, make_generator, cache, model_key
            )
            _log_train_sample(
                cfg,
                _answer_rows(
                    sample,
                    sample_preds,
                    closed_book,
                    sample_messages,
                    sample_prompts,
                    params.max_new_tokens,
                ),
            )
    return run_id


def _local_generator(cfg: DictConfig, tokenizer: Any, params: Any, adapter: Path | None) -> Any:
    """The in-process generator: the base model, with the LoRA adapter merged in if any."""
    import torch

    from qa_lab import models
    from qa_lab.generation import LocalGenerator

    if cfg.generation.threads:
        torch.set_num_threads(int(cfg.generation.threads))
    torch.manual_seed(int(cfg.seed))
    model = models.load_llm(cfg.llm, cfg.paths.models)
    if adapter is not None:
        # merged for generation: same answers as the PEFT wrapper (tested), less overhead
        model = models.load_adapter(model, adapter).merge_and_unload()
    gen = cfg.generation
    return LocalGenerator(model, tokenizer, params, int(gen.batch_size), gen.get("batch_tokens"))


def _messages(
    cfg: DictConfig, items: list[QAItem], passages: list[list[Any]]
) -> list[list[dict[str, str]]]:
    """Each item's chat messages: the configured system prompt, its context, its question."""
    return [
        prompts.build_messages(
            it.question, ps, system=cfg.prompt.system, context_header=cfg.prompt.context_header
        )
        for it, ps in zip(items, passages)
    ]


def _answer_rows(
    items: list[QAItem],
    preds: list[Any],
    passages: list[list[Any]],
    messages: list[list[dict[str, str]]],
    prompt_texts: list[str],
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """One row per item: what was asked, what came back, how, and from which context."""
    return [
        {
            "item_id": it.id,
            "question": it.question,
            "reference": it.answer,
            **({"references": list(it.references)} if it.references else {}),
            "prediction": p.prediction,
            "topic": it.topic,
            "difficulty": it.difficulty,
            "seed_id": it.seed_id or it.id,
            "stop_reason": p.stop_reason,
            "prompt_tokens": p.prompt_tokens,
            "generated_tokens": p.generated_tokens,
            "max_new_tokens": max_new_tokens,
            "seconds": p.seconds,
            "cached": p.extra.get("cached", False),
            "retrieved": [
                {
                    "item_id": x.item_id,
                    "question": x.question,
                    "answer": x.answer,
                    "score": round(x.score, 4),
                }
                for x in ps
            ],
            "prompt": text,
            "messages": m,
        }
        for it, p, ps, m, text in zip(items, preds, passages, messages, prompt_texts)
    ]


def _nearest_train_cosine(cfg: DictConfig, items: list[QAItem], train: list[QAItem]) -> list[float]:
    """Cosine of each eval question to its nearest training question (embedded MiniLM).

    Scores on items with a near-duplicate in the training split measure recall of seen
    questions, not answering: the report splits every score on this.
    """
    from qa_lab.retrieval import embed

    def vectors(batch: list[QAItem]) -> Any:
        return embed(
            [it.question for it in batch],
            cfg.embedder.name,
            cache_dir=cfg.paths.cache,
            batch_size=int(cfg.embedder.batch_size),
        )

    _, best = data.nearest_neighbours(vectors(items), vectors(train))
    return [float(b) for b in best]


def train_sample(cfg: DictConfig, train: list[QAItem]) -> list[QAItem]:
    """A fixed, seeded sample of training items (`eval.train_sample` of them, 0 = none).

    Answered closed-book by every evaluate run: a fine-tune far better on these than on the
    test split memorised; one no better than the base model learned nothing.
    """
    n = int(cfg.eval.train_sample or 0)
    if n <= 0:
        return []
    return random.Random(int(cfg.seed)).sample(train, min(n, len(train)))


def _log_train_sample(cfg: DictConfig, rows: list[dict[str, Any]]) -> None:
    result = score_rows(cfg, rows)
    tracking.log_metrics(
        {f"train_sample/{k}": v for k, v in result["summary"].items() if "/" not in k}
    )
    tracking.log_metrics({"train_sample/n": float(len(rows))})
    tracking.log_dict(result["ci"], "train_sample/metrics.json")
    tracking.log_text(
        "".join(
            json.dumps({**r, "scores": s}, ensure_ascii=False) + "\n"
            for r, s in zip(rows, result["per_item"])
        ),
        "train_sample/per_item.jsonl",
    )


def _leakage_metrics(data_folder: Path) -> dict[str, float]:
    """The split's leakage audit (test vs train) as `leakage/*` metrics."""
    audit = json.loads((data_folder / "leakage_audit.json").read_text(encoding="utf-8"))
    return {f"leakage/{k}": float(v) for k, v in audit.items() if isinstance(v, int | float)}


def served_model(cfg: DictConfig, adapter: Path | None) -> str:
    """The model name sent to an OpenAI-compatible server.

    For `model=lora` it is the adapter's served name, as vLLM serves LoRA adapters
    (`--lora-modules NAME=FOLDER`): `llm.served_adapter`, or the adapter folder's name.
    """
    if adapter is None:
        return str(cfg.llm.get("served_model") or cfg.llm.name)
    name = str(cfg.llm.get("served_adapter") or adapter.name)
    print(
        f"openai backend: requesting adapter {name!r}; serve it with: vllm serve {cfg.llm.name} "
        f"--enable-lora --max-lora-rank {cfg.model.r} --lora-modules {name}={adapter}",
        flush=True,
    )
    return name


def _predict_key(cfg: DictConfig, model_key: str, items: list[QAItem]) -> str:
    return stage_key(
        {
            "generation": to_dict(cfg.generation),
            "prompt": to_dict(cfg.prompt),
            "retriever": to_dict(cfg.retriever),
            "template_version": prompts.TEMPLATE_VERSION,
        },
        version=1,
        exclude=(),
        upstream={"model": model_key, "eval_set": eval_set_hash(items)},
    )


def score_and_log(cfg: DictConfig, rows: list[dict[str, Any]], speed: dict[str, float]) -> None:
    """Score per item, add bootstrap CIs and per-topic breakdowns, log it all on the run."""
    from qa_lab import reporting

    result = score_rows(cfg, rows)
    summary = result["summary"]
    tracking.log_metrics(summary)
    tracking.log_metrics(speed)
    tracking.log_params({k: v for k, v in result["corpus"].items() if isinstance(v, str)})
    tracking.log_metrics({k: v for k, v in result["corpus"].items() if isinstance(v, float)})
    table = [
        {
            **{k: v for k, v in r.items() if k not in ("retrieved", "prompt", "messages")},
            "retrieved": "\n\n".join(
                f"[{x['score']}] {x['question']} -> {x['answer']}" for x in r.get("retrieved", [])
            ),
            **s,
        }
        for r, s in zip(rows, result["per_item"])
    ]
    tracking.log_table(table, "eval_items.json")
    tracking.log_text(
        "".join(
            json.dumps({**r, "scores": s}, ensure_ascii=False) + "\n"
            for r, s in zip(rows, result["per_item"])
        ),
        "per_item.jsonl",
    )
    tracking.log_dict(result["ci"], "metrics.json")
    tracking.log_text(reporting.metric_table_md(result["ci"]), "metrics.md")
    tracking.log_text(reporting.samples_md(rows, cfg.metrics.samples), "samples.md")
    tracking.log_figure(reporting.topic_figure(result["topics"]), "per_topic.png")
    print(reporting.metric_table_md(result["ci"]))
    if cfg.tracking.traces:
        tracking.publish_item_traces(
            rows,
            result["per_item"],
            model=f"{cfg.llm.name}+lora" if cfg.model.kind == "lora" else str(cfg.llm.name),
            metrics_version=int(result["corpus"]["metrics_version"]),
        )


def score_rows(cfg: DictConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item scores, corpus values, CIs (cluster bootstrap by seed) and per-topic means."""
    from qa_lab import metrics, stats

    boot = cfg.metrics.bootstrap
    opts = {
        "resamples": int(boot.resamples),
        "confidence": float(boot.confidence),
        "seed": int(boot.seed),
    }
    scored = metrics.score_items(rows, cfg.metrics, embedder_cache_dir=cfg.paths.cache)
    if "judge" in metrics.validate_groups(list(cfg.metrics.groups)):
        from qa_lab import judge

        judged, replies, info = judge.judge_rows(rows, cfg.metrics.get("judge"), cfg.paths.cache)
        for row, scores, extra, reply in zip(rows, scored.per_item, judged, replies):
            scores.update(extra)
            row["judge_reply"] = reply  # shown in the per-item table next to the verdict
        scored.corpus.update(info)
    clusters = [r.get("seed_id") or r.get("item_id") or str(i) for i, r in enumerate(rows)]
    ci: dict[str, dict[str, Any]] = {}
    if scored.bleu_stats is not None:
        ci["bleu"] = stats.bootstrap_corpus_ci(
            len(rows), scored.corpus_bleu, clusters=clusters, **opts
        ).as_dict()
    for name in scored.metric_names():
        run_name = metrics.RATE_NAMES.get(name, name)
        ci[run_name] = stats.bootstrap_ci(scored.column(name), clusters=clusters, **opts).as_dict()
    summary: dict[str, float] = {}
    for name, c in ci.items():
        summary.update({name: c["mean"], f"{name}_ci_low": c["low"], f"{name}_ci_high": c["high"]})
    topics = scored.topic_means()
    for topic, means in topics.items():
        summary.update({f"topic/{topic}/{name}": v for name, v in means.items()})
    if rows and all("near_dup" in r for r in rows):
        labels = ["near_dup" if r["near_dup"] else "not_near_dup" for r in rows]
        for group, means in scored.group_means(labels).items():
            summary.update({f"{group}/{name}": v for name, v in means.items()})
    return {
        "per_item": scored.per_item,
        "corpus": scored.corpus,
        "ci": ci,
        "summary": summary,
        "topics": topics,
    }


def score_predictions_file(cfg: DictConfig) -> None:
    """`evaluate.py predictions=FILE`: score rows {question, prediction, reference}, no LLM."""
    from qa_lab import metrics

    metrics.validate_groups(list(cfg.metrics.groups))
    path = Path(cfg.predictions)
    raw = read_jsonl(path)
    if not raw:
        raise QaLabError(f"{path}: no rows")
    rows = []
    for lineno, row in enumerate(raw, start=1):
        for field in ("question", "prediction", "reference"):
            if not isinstance(row.get(field), str):
                raise QaLabError(f"{path}:{lineno}: missing or non-string field {field!r}")
        rows.append({**row, "item_id": str(row.get("id", row.get("item_id", lineno)))})
    items = [QAItem(r["item_id"], r["question"], r["reference"]) for r in rows]
    key = stage_key({"file": file_sha256(path)}, version=1)
    tags = {"eval_set_hash": eval_set_hash(items), "predictions_file": str(path)}
    with tracking.start_run(cfg, stage="evaluate", key=key, variant=path.stem, tags=tags):
        score_and_log(cfg, rows, {})


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
