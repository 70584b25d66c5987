"""The training stages: continued pretraining on the corpus (`cpt`), then the LoRA SFT (`train`).

Each is cached by its key (`adapters/<key>/`) and logged as its own run with its loss curve;
the SFT continues the continued-pretraining adapter when `model.knowledge` is corpus or both.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import datastore, keys, logged_models, prompts, run_logging, tracking, training
from qa_lab.cache import build_once, file_sha256, is_finished, read_manifest
from qa_lab.config import to_dict
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import QAItem
from qa_lab.stages.corpus import build_corpus, corpus_for, corpus_key, retriever_for
from qa_lab.stages.dataset import build_dataset, dataset_folder


def train_key(cfg: DictConfig, data_key: str, cpt_key: str | None = None) -> str:
    """Adapter identity: base model, dataset, training config, prompt (and retrieval if used).

    `cpt_key`: the continued pretraining this SFT continues (`model.knowledge` corpus/both).
    """
    context = require_choice("model.context", cfg.model.context, training.CONTEXTS)
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
    knowledge = training.lora_options(cfg.model).knowledge
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


def replicates(cfg: DictConfig) -> list[DictConfig]:
    """One config per training-seed replicate (`model.seeds`), its `model.seed` set to that seed.

    A vanilla model, or a LoRA one without `seeds`, is its own single replicate. Each replicate
    trains (or reuses) its own adapter, since the seed is in the training keys, and is evaluated
    as its own run; the report pools a config's replicates.

    Raises:
        QaLabError: seeds are asked for with a given adapter, which has no training seed.
    """
    if cfg.model.kind != "lora":
        return [cfg]
    seeds = training.lora_options(cfg.model).seeds
    if not seeds:
        return [cfg]
    if cfg.model.get("adapter"):
        raise QaLabError("model.seeds with model.adapter: a given adapter has no training seed")
    out = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.model.seed = seed
        out.append(one)
    return out


def adapter_for(cfg: DictConfig) -> tuple[Path, str]:
    """The adapter for `model=lora`: the one given, or the cached one (trained if missing)."""
    given = cfg.model.get("adapter")
    if given:
        folder = Path(given) if not str(given).startswith(("runs:/", "models:/")) else None
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


def require_trained_adapter(cfg: DictConfig) -> None:
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
    from qa_lab import cpt

    folder = Path(cfg.paths.cache) / "adapters" / key
    if is_finished(folder):
        return folder
    kb = build_corpus(cfg)
    knowledge = _knowledge(cfg)
    texts = cpt.cpt_texts(knowledge, kb.texts, datastore.read_split(data_folder, "train"))
    tags = {"cpt_key": key, "corpus_key": kb.key}
    both = knowledge == "both"
    data_key = read_manifest(data_folder)["key"] if both else None
    about = f"continued pretraining of {cfg.llm.name} on corpus {kb.key[:8]}"
    with tracking.start_run(
        cfg, stage="cpt", key=key, variant="lora", tags=tags, description=about
    ):
        folder, built = build_once(
            folder,
            lambda tmp: {"key": key, "summary": _fit_cpt(cfg, texts, tmp)},
        )
        entry = logged_models.adapter_entry(
            folder, key, to_dict(cfg.llm), "cpt_adapter", corpus_key=kb.key, data_key=data_key
        )
        _log_training(cfg, folder, built, entry)
        corpus_folder = Path(cfg.paths.cache) / "corpus" / kb.key
        run_logging.log_data_inputs(data_folder, ("train",) if both else (), corpus_folder)
    return folder


def _log_training(cfg: DictConfig, folder: Path, built: bool, entry: Any) -> None:
    """A training run's summary numbers, whether it reused a twin's folder, the adapter.

    The adapter goes up as the run's artifacts (`adapter/` or `cpt_adapter/`, `entry.kind`) and
    as an MLflow logged model (`entry`, a `logged_models.ModelEntry`; a reused adapter's
    existing one), to which the summary numbers (final losses, ...) are linked.
    """
    summary = read_manifest(folder)["summary"]
    model_id = logged_models.log_trained(entry, cfg.paths.cache)
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    tracking.log_metrics(numbers, model_id=model_id)
    tracking.set_tags({"reused": str(not built).lower()})
    tracking.log_artifacts(folder, entry.kind)


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
    about = (
        f"LoRA SFT of {cfg.llm.name} on dataset {data_key[:8]} ({len(train_items)} train rows"
        + (f", continuing cpt {init.name[:8]})" if init else ")")
    )
    with tracking.start_run(
        cfg, stage="train", key=key, variant="lora", tags=tags, description=about
    ):
        manifest = {"key": key, "data_key": data_key, "model": keys.model_id(to_dict(cfg.llm))}
        folder, built = build_once(
            folder,
            lambda tmp: {
                **manifest,
                "summary": _fit(cfg, examples(train_items), examples(val_items), tmp, init),
            },
        )
        upstream = {"data_key": data_key, "cpt_key": init.name if init else None}
        entry = logged_models.adapter_entry(folder, key, to_dict(cfg.llm), **upstream)
        _log_training(cfg, folder, built, entry)
        retrieved = cfg.model.context == "retrieved" and cfg.corpus.kind == "folder"
        kb_folder = Path(cfg.paths.cache) / "corpus" / corpus_key(cfg) if retrieved else None
        run_logging.log_data_inputs(data_folder, ("train", "val"), kb_folder)


def _context_retriever(cfg: DictConfig, data_folder: Path) -> Any:
    """The retriever whose neighbours go into training prompts (`model.context=retrieved`)."""
    if cfg.model.context != "retrieved":
        return None
    return retriever_for(cfg, corpus_for(cfg, data_folder), k=int(cfg.model.context_k))


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
    from qa_lab import models

    lora = training.lora_options(cfg.model)  # checked before the model loads
    return training.train_lora(
        model=models.load_llm(cfg.llm, cfg.paths.models, for_training=True),
        tokenizer=models.load_tokenizer(cfg.llm, cfg.paths.models),
        train_examples=train,
        val_examples=val,
        lora=lora,
        out_dir=out,
        log_metrics=_log_step,
        init_adapter=init,
    )


def _fit_cpt(cfg: DictConfig, texts: list[str], out: Path) -> dict[str, Any]:
    """Load the base model, run the continued pretraining into `out`; returns its summary."""
    from qa_lab import cpt, models

    lora, schedule = training.lora_options(cfg.model), cpt.cpt_options(cfg.model)
    return cpt.train_cpt(
        model=models.load_llm(cfg.llm, cfg.paths.models, for_training=True),
        tokenizer=models.load_tokenizer(cfg.llm, cfg.paths.models),
        texts=texts,
        lora=lora,
        cpt=schedule,
        out_dir=out,
        log_metrics=_log_step,
    )


def _log_step(metrics: dict[str, float], step: int) -> None:
    tracking.log_metrics(metrics, step=step)


def train_main(cfg: DictConfig) -> None:
    """train.py: train (or reuse) the adapter of this config; the last line is its folder."""
    if cfg.model.kind != "lora":
        raise QaLabError(f"model={cfg.model.kind}: train.py trains model=lora")
    for one in replicates(cfg):  # one adapter per training seed of `model.seeds`
        folder, _ = adapter_for(one)
        summary = read_manifest(folder).get("summary", {})
        if summary:
            print(", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int | float)))
        print(folder)
