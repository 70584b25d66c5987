"""How good the retrieved context was per item, and whether the answer copied it.

Scored from the passages the run logged, independently of the generator. The retrieved answers
are compared with the reference in the `embedder` group's space (the model the FAISS retriever
uses), so "best cosine" means the same as the retriever's own similarity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab.lexical import rouge_l_f1


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def retrieval_scores(
    retrieved: Sequence[Sequence[Any]],
    references: Sequence[str],
    predictions: Sequence[str],
    *,
    copy_threshold: float,
    stemmer: bool,
    embedder: str,
    cache_dir: str | Path | None = None,
) -> dict[str, list[float]]:
    """Per-item retrieval quality and copying; items without passages get NaN.

    `retrieved[i]` holds {answer, score} passages (dicts or `Passage`s). Returns the top-1
    similarity the retriever reported, and the best ROUGE-L F1 and best cosine (`embedder`)
    of any retrieved answer against the reference.

    It also says whether the generator *copied*: `copy_rougeL` is the prediction's best
    ROUGE-L F1 against a retrieved answer and `copied` flags it at `copy_threshold` or more.
    A RAG win made of copies of near-duplicate training answers is leakage, not reasoning.
    """
    top1: list[float] = []
    best_rouge: list[float] = []
    copy_rouge: list[float] = []
    flat_answers: list[str] = []
    owners: list[int] = []
    for item, (passages, ref) in enumerate(zip(retrieved, references)):
        passages = list(passages or [])
        if not passages:
            top1.append(math.nan)
            best_rouge.append(math.nan)
            copy_rouge.append(math.nan)
            continue
        top1.append(max(float(_get(p, "score")) for p in passages))
        answers = [str(_get(p, "answer") or "") for p in passages]
        # each answer as a prediction against the reference; the prediction against them all
        best_rouge.append(max(rouge_l_f1(answers, [ref] * len(answers), stemmer=stemmer)))
        copy_rouge.append(rouge_l_f1([predictions[item]], [answers], stemmer=stemmer)[0])
        flat_answers.extend(answers)
        owners.extend([item] * len(answers))
    return {
        "retrieval_top1_score": top1,
        "retrieval_best_rougeL": best_rouge,
        "retrieval_best_cosine": _best_cosine(
            references, flat_answers, owners, embedder, cache_dir
        ),
        "copy_rougeL": copy_rouge,
        "copied": [v if math.isnan(v) else float(v >= copy_threshold) for v in copy_rouge],
    }


def _best_cosine(
    references: Sequence[str],
    answers: list[str],
    owners: list[int],
    embedder: str,
    cache_dir: str | Path | None,
) -> list[float]:
    """Each item's best cosine between its reference and its retrieved answers (NaN: none)."""
    from qa_lab.retrieval import embed

    best = np.full(len(references), np.nan)
    if answers:
        ref_vecs = embed(list(references), embedder, cache_dir=cache_dir)
        ans_vecs = embed(answers, embedder, cache_dir=cache_dir)
        owner_idx = np.asarray(owners)
        # Both sides are unit-normalised, so the row-wise dot product is the cosine.
        sims = np.einsum("ij,ij->i", ans_vecs, ref_vecs[owner_idx]).astype(float)
        np.fmax.at(best, owner_idx, sims)  # fmax: NaN (no value yet) loses to any number
    return best.tolist()
