"""The corpus stage: the documents read and chunked once per key, and what searches them.

`corpus=folder` is a cached stage of its own (`corpus/<corpus_key>/`, a `corpus` run);
`corpus=train_qa` is the training pairs as passages, built from the dataset folder. The
embedder and retriever over the cache live here because the dataset, training and evaluation
stages all embed questions and search this corpus.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qa_lab import corpus, datastore, evidence, keys, run_logging, tracking
from qa_lab.cache import build_once, is_finished, lock, read_manifest
from qa_lab.config import to_dict
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem


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


def gold_passages(
    cfg: DictConfig, items: list[QAItem], kb: corpus.Corpus
) -> list[evidence.Gold | None]:
    """The items' gold passages in this corpus (named evidence, else inferred)."""
    threshold = corpus.CorpusOptions.from_cfg(cfg.corpus).gold_threshold
    return evidence.gold_for(items, kb, question_embedder(cfg), threshold)


def question_embedder(cfg: DictConfig) -> Callable[..., Any]:
    """The configured embedder over the embedding cache: texts -> unit vectors."""
    from qa_lab.retrieval import embed

    return functools.partial(
        embed,
        embedder=cfg.embedder.name,
        cache_dir=Path(cfg.paths.cache),
        batch_size=int(cfg.embedder.batch_size),
    )


def retriever_for(cfg: DictConfig, kb: corpus.Corpus, *, k: int | None = None) -> Any:
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
