"""Every stage's key in one place, with what each key leaves out listed once.

A key is a hash of exactly the config that changes a stage's output, plus its upstream keys
and the stage's version (`cache.stage_key`). What provably does not change an output (where a
file goes, batch sizes and threads of greedy decoding, how to reach a server) is excluded by
the tables below, not by `pop` calls scattered through the stages: to ask "does setting X
rerun stage Y?", read `EXCLUDE[Y]`. Tests (`tests/test_keys.py`) check each entry both ways.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qa_lab.cache import stable_hash, stage_key
from qa_lab.records import QAItem

# Bump a stage's version when its code changes what it writes for the same config.
VERSIONS = {
    "dataset": 2,  # 2: topic_source, references, seed lineage in the rows
    "train": 1,
    "index": 1,
    "predict": 2,  # 2: speed-only generation keys left out of the key
    "predictions_file": 1,
    "corpus": 1,
    "cpt": 1,
}

# Dotted paths into each stage's hashed config that do not change its output.
EXCLUDE: dict[str, tuple[str, ...]] = {
    # where the dataset is written; the source enters as its content hash instead
    "dataset": (
        "output_dir",
        "source",
        "synthesis.batch_size",
        "synthesis.base_url",
        "synthesis.api_key_env",
    ),
    # the files enter as their content hashes; gold mapping and the prompt header are read
    # downstream of the chunks; the kind is implied by this stage running at all
    "corpus": ("source", "gold_threshold", "context_header", "kind"),
    # `adapter` bypasses training altogether; `kind` is always lora here; what the continued
    # pretraining read and how enter through its own key, the SFT's upstream (`knowledge=qa`:
    # none, so those keys stay as they were before continued pretraining existed); `seeds`
    # lists replicates, each trained under its own `seed` (which is in the key)
    "train": ("adapter", "kind", "cpt", "knowledge", "seeds"),
    # greedy answers do not depend on batch width or threads (the per-item cache key never
    # had them, tests/test_generation.py checks batched == one-at-a-time answers)
    "predict": ("generation.batch_size", "generation.batch_tokens", "generation.threads"),
}


def without(tree: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """A deep copy of `tree` with each dotted path removed (missing paths are ignored)."""
    out = copy.deepcopy(dict(tree))
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def base_name(llm: Mapping[str, Any]) -> str:
    """The base model's name and revision, without the local precision."""
    return f"{llm['name']}{'@' + llm['revision'] if llm.get('revision') else ''}"


def model_id(llm: Mapping[str, Any]) -> str:
    """Identity of the base model: name, revision and quantisation (part of every key)."""
    return f"{base_name(llm)}:{llm['dtype']}{':nf4' if llm.get('load_in_4bit') else ''}"


def local_model_key(model_key: str, *, device: str, merged: bool | None) -> str:
    """The model key of in-process answers: where they were decoded and how the adapter ran.

    CUDA kernels round differently from CPU ones, so answers decoded there are not the CPU's;
    an adapter left unmerged (on a quantized base) answers differently from a merged one.
    Each field is added only when it differs from the CPU default, so CPU keys stay as they were.
    """
    if not device.startswith("cpu"):
        model_key += f":{device.split(':')[0]}"
    return model_key + (":unmerged" if merged is False else "")


def served_model_key(served: str, precision: str | None, upstream: str, *, fold: bool) -> str:
    """The model key of answers from an OpenAI-compatible server.

    The server, not `llm.dtype`/`llm.load_in_4bit`, decides the precision it runs in, so the
    key carries `llm.served_precision` (null: "served") instead of the local precision.
    `llm.system_turn=fold` sends other messages than `auto`/`keep` to a server that accepts
    system turns (`auto` folds only where the server refuses them, so no answer is shared).
    """
    return f"openai:{served}:{precision or 'served'}:{upstream}" + (":fold" if fold else "")


def dataset_key(
    dataset: Mapping[str, Any],
    *,
    source_hash: str,
    embedder: str,
    synthesis_device: str = "cpu",
    corpus: str | None = None,
) -> str:
    """Key over what changes the dataset: its config, its source's bytes and the embedder.

    Without a synthesis backend the whole synthesis block is inert, so it is left out. Local
    synthesis samples differently on CUDA than on CPU under the same seed, so a CUDA device
    enters the key (a CPU one does not: CPU keys stay as they were). `corpus` is the corpus key
    when QA pairs are synthesised from its chunks.
    """
    semantic = without(dataset, EXCLUDE["dataset"])
    if dataset["synthesis"]["backend"] == "none":
        semantic.pop("synthesis")
    elif dataset["synthesis"]["backend"] == "local" and not synthesis_device.startswith("cpu"):
        semantic["synthesis"]["device"] = synthesis_device.split(":")[0]
    return stage_key(
        semantic,
        version=VERSIONS["dataset"],
        upstream={
            "source": source_hash,
            "embedder": embedder,
            **({"corpus": corpus} if corpus else {}),
        },
    )


def train_key(
    lora: Mapping[str, Any],
    *,
    prompt: Mapping[str, Any],
    template_version: int,
    data_key: str,
    model: str,
    retrieval: Mapping[str, Any] | None,
    cpt: str | None = None,
) -> str:
    """Adapter identity: base model, dataset, LoRA config, prompt (and retrieval if used).

    `retrieval` is the embedder and document form when training prompts carry retrieved
    neighbours (`model.context=retrieved`); otherwise `context_k` is inert and left out.
    `cpt` is the continued pretraining's key when the SFT continues its adapter.
    """
    semantic = without(lora, EXCLUDE["train"])
    if retrieval is None:
        semantic.pop("context_k", None)
    else:
        semantic["retrieval"] = dict(retrieval)
    semantic.update(prompt=dict(prompt), template_version=template_version)
    upstream = {"data": data_key, "model": model, **({"cpt": cpt} if cpt else {})}
    return stage_key(semantic, version=VERSIONS["train"], upstream=upstream)


def corpus_key(
    corpus: Mapping[str, Any], chunking: Mapping[str, Any], *, files_hash: str, tokenizer: str
) -> str:
    """Corpus identity: the files' bytes, how they are read and chunked, the token counter.

    Chunk sizes are counted in the embedder's tokens, so the embedder enters as `tokenizer`.
    """
    semantic = without(corpus, EXCLUDE["corpus"])
    semantic["chunking"] = dict(chunking)
    return stage_key(
        semantic,
        version=VERSIONS["corpus"],
        upstream={"files": files_hash, "tokenizer": tokenizer},
    )


def cpt_key(
    lora: Mapping[str, Any], *, knowledge: str, corpus: str, data_key: str | None, model: str
) -> str:
    """Key of the continued pretraining: the base model, the texts it reads, LoRA and CPT options.

    `data_key` is the dataset's key when the train QA pairs are part of the texts
    (`model.knowledge=both`), None when only the corpus is.
    """
    semantic = {
        "lora": {k: lora.get(k) for k in ("r", "alpha", "dropout", "target_modules", "seed")},
        "cpt": dict(lora["cpt"]),
        "knowledge": knowledge,
        "schedule": {k: lora.get(k) for k in ("lr_scheduler", "warmup_ratio", "weight_decay")},
        # which windows share a step (the CPT reads these from the model node too)
        "batching": {k: lora.get(k) for k in ("grad_accum", "group_by_length")},
    }
    upstream = {"corpus": corpus, "model": model, **({"data": data_key} if data_key else {})}
    return stage_key(semantic, version=VERSIONS["cpt"], upstream=upstream)


def index_key(
    train_hash: str,
    embedder: str | None,
    document: str,
    *,
    kind: str = "faiss",
    settings: Mapping[str, Any] | None = None,
) -> str:
    """Index identity: the indexed passages, the document form and the kind's settings (never k).

    `train_hash` is the corpus's identity: the training split's file hash for `corpus=train_qa`
    (so that corpus keeps the index it always had), the corpus key for a folder. `embedder` is
    None for an index that embeds nothing (bm25). A faiss key is the formula it always was, so
    existing indexes stay valid; other kinds add their name and settings (e.g. bm25's k1, b).
    """
    body: dict[str, Any] = {
        "train": train_hash,
        "embedder": embedder,
        "document": document,
        "v": VERSIONS["index"],
    }
    if kind != "faiss":
        body.update(kind=kind, settings=dict(settings or {}))
    return stable_hash(body)


def eval_set_hash(items: Sequence[QAItem]) -> str:
    """Identity of an evaluation set: item ids, questions and references, in order."""
    return stable_hash([[it.id, it.question, it.answer, *(it.references or ())] for it in items])


def predict_key(
    evaluation: Mapping[str, Any], *, template_version: int, model_key: str, eval_set: str
) -> str:
    """Key of an evaluate run's answers: generation, prompt and retriever config, model, items.

    `evaluation` holds the `generation`, `prompt` and `retriever` config nodes. Reranking that
    is off (`retriever.rerank.model` null) is inert, so it is left out, and so is `k` with
    `retriever=none` (it retrieves nothing at any k): a preset's `retriever.k` then leaves the
    closed-book runs of its sweep alone. One sampling repeat (`generation.repeats: 1`) is a
    run as it was before repeats existed, so it is left out too.
    """
    semantic = without(evaluation, EXCLUDE["predict"])
    generation = semantic.get("generation") or {}
    if generation.get("repeats", 1) == 1:
        generation.pop("repeats", None)
    retriever = semantic.get("retriever") or {}
    rerank = retriever.get("rerank")
    if isinstance(rerank, Mapping) and not rerank.get("model"):
        retriever.pop("rerank")
    if retriever.get("kind") == "none":
        retriever.pop("k", None)
    semantic["template_version"] = template_version
    return stage_key(
        semantic,
        version=VERSIONS["predict"],
        upstream={"model": model_key, "eval_set": eval_set},
    )


def predictions_file_key(file_hash: str) -> str:
    """Key of scoring a predictions file (`evaluate.py predictions=FILE`): its bytes alone."""
    return stage_key({"file": file_hash}, version=VERSIONS["predictions_file"])
