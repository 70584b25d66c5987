"""How good the retrieved context was per item, whether the answer copied it, who missed.

Scored from the passages the run logged, independently of the generator. A passage is a corpus
chunk (`text`) or a training pair (`answer`); its `content` is whichever it has. The retrieved
content is compared with the reference in the `embedder` group's space (the model the FAISS
retriever uses), so "best cosine" means the same as the retriever's own similarity.

Items whose gold chunks are known (`EvalRow.gold`) also get ranking metrics (recall@k, nDCG@k,
reciprocal rank) and a failure attribution: a wrong answer is the retriever's miss when no gold
chunk was retrieved, the generator's when one was.

Ranking metrics come from `ir_measures` (pytrec_eval backend, ~0.2 s on its first call). Not
ranx: its numba JIT took 70 s on its first call on the 2-core dev machine (10 s after that).

`retrieval_columns` is the `retrieval` metric group and `attribution_columns` the attribution
`run_scores.score_rows` adds (`AttributionOptions`: when an answer counts as right); both take
rows and plain values and return named per-item columns, so this module needs nothing of
`metrics`, which composes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import checks
from qa_lab.errors import QaLabError, require_choice
from qa_lab.lexical import rouge_l_f1
from qa_lab.records import EvalRow

# Per-item ranking columns (NaN for items without gold or without retrieved passages).
RANKING_COLUMNS = ("recall_at_k", "ndcg_at_k", "mrr", "gold_retrieved")
# The failure-attribution cells: (gold chunk retrieved?, answer right?) -> cell.
ATTRIBUTION_CELLS = {
    (False, False): "retriever_miss",
    (True, False): "generator_miss",
    (False, True): "parametric_hit",
    (True, True): "both_right",
}
_WORD = re.compile(r"[a-z0-9]+")


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def content(passage: Any) -> str:
    """What a passage (a dict or a `Passage`) gives the generator: chunk text, else pair answer."""
    return str(_get(passage, "text") or _get(passage, "answer") or "")


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

    `retrieved[i]` holds passages with a score (dicts or `Passage`s). Returns the top-1
    similarity the retriever reported, and the best ROUGE-L F1 and best cosine (`embedder`)
    of any retrieved `content` against the reference.

    It also says whether the generator *copied*: `copy_rougeL` is the prediction's best
    ROUGE-L F1 against a retrieved content and `copied` flags it at `copy_threshold` or more.
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
        answers = [content(p) for p in passages]
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


def retrieval_columns(
    rows: Sequence[EvalRow],
    references: Sequence[str],
    predictions: Sequence[str],
    *,
    copy_threshold: float,
    stemmer: bool,
    embedder: str,
    cache_dir: str | Path | None = None,
) -> dict[str, list[float]]:
    """The `retrieval` group's per-item columns; none when no row carries retrieved passages.

    Vanilla and LoRA runs retrieve nothing. The ranking columns need gold chunks: they are left
    out when no row has any (old runs, `corpus=train_qa`), rather than filled with NaN.
    """
    if not any(r.retrieved for r in rows):
        return {}
    scores = retrieval_scores(
        [list(r.retrieved or []) for r in rows],
        references,
        predictions,
        copy_threshold=copy_threshold,
        stemmer=stemmer,
        embedder=embedder,
        cache_dir=cache_dir,
    )
    if any(r.gold for r in rows):
        scores.update(ranking_scores([r.retrieved for r in rows], [r.gold for r in rows]))
    scores["answer_in_context"] = [
        answer_in_context(r.retrieved, ref) for r, ref in zip(rows, references)
    ]
    return scores


# --------------------------------------------------------------------------------------------
# ranking against the gold chunks


def gold_retrieved(passages: Sequence[Any] | None, gold: Sequence[str] | None) -> float:
    """1.0 when any retrieved passage is a gold chunk, 0.0 when none is; NaN when unknown.

    Unknown: the item has no gold (None or empty) or nothing was retrieved.
    """
    if not gold or not passages:
        return math.nan
    gold_ids = set(gold)
    return float(any(str(_get(p, "item_id")) in gold_ids for p in passages))


def _ranked(passages: Sequence[Any]) -> dict[str, float]:
    """The retriever's ranking as an ir_measures run: {passage id: len - rank}, best first.

    The retriever's own scores can tie, and trec_eval breaks ties by document id, not by the
    order the generator saw; strictly decreasing scores make the library rank exactly as the
    tuple does. A passage listed twice keeps its best rank.
    """
    run: dict[str, float] = {}
    for rank, passage in enumerate(passages):
        run.setdefault(str(_get(passage, "item_id")), float(len(passages) - rank))
    return run


def ranking_scores(
    retrieved: Sequence[Sequence[Any] | None], gold: Sequence[Sequence[str] | None]
) -> dict[str, list[float]]:
    """Per-item recall@k, nDCG@k (binary relevance), reciprocal rank and `gold_retrieved`.

    k is the number of passages retrieved for the item (the run's `retriever.k`), so items
    are scored in groups of equal k. Qrels are {item: {gold id: 1}}, the run is `_ranked`.
    Items without gold or without passages get NaN (left out of means and CIs).
    """
    import ir_measures
    from ir_measures import RR, R, nDCG

    out = {name: [math.nan] * len(retrieved) for name in RANKING_COLUMNS}
    by_k: dict[int, list[int]] = {}
    for item, (passages, ids) in enumerate(zip(retrieved, gold)):
        out["gold_retrieved"][item] = gold_retrieved(passages, ids)
        if ids and passages:
            by_k.setdefault(len(passages), []).append(item)
    for k, items in by_k.items():
        measures = {R @ k: "recall_at_k", nDCG @ k: "ndcg_at_k", RR: "mrr"}
        qrels = {str(i): dict.fromkeys(map(str, gold[i] or ()), 1) for i in items}
        run = {str(i): _ranked(retrieved[i] or ()) for i in items}
        for metric in ir_measures.iter_calc(list(measures), qrels, run):
            out[measures[metric.measure]][int(metric.query_id)] = float(metric.value)
    return out


# --------------------------------------------------------------------------------------------
# answer in context


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    """scikit-learn's English stop words: the list `topics` names TF-IDF clusters with.

    (sentence-transformers imports scikit-learn already, so this costs no extra import.)
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def content_words(text: str) -> set[str]:
    """Lowercased alphanumeric tokens of `text`, stop words dropped."""
    stop = _stopwords()
    return {w for w in _WORD.findall(text.lower()) if w not in stop}


def answer_in_context(passages: Sequence[Any] | None, reference: str) -> float:
    """Share of the reference's distinct content words found in the retrieved content.

    How much of the answer the context spells out, word by word; it needs no gold, so it
    also scores `corpus=train_qa` runs. NaN without passages or when the reference has
    no content words (nothing to find).
    """
    words = content_words(reference)
    if not passages or not words:
        return math.nan
    found = content_words(" ".join(content(p) for p in passages))
    return len(words & found) / len(words)


# --------------------------------------------------------------------------------------------
# failure attribution


def attribution(correct: Sequence[float], gold_hit: Sequence[float]) -> dict[str, list[float]]:
    """One-hot `ATTRIBUTION_CELLS` columns per item from answer correctness and gold retrieval.

    `correct` and `gold_hit` are 1.0/0.0 per item; an item where either is NaN (no gold, no
    retrieval, no verdict) gets NaN in every cell, so cell counts add up to the items with both.
    """
    out: dict[str, list[float]] = {cell: [] for cell in ATTRIBUTION_CELLS.values()}
    for ok, hit in zip(correct, gold_hit):
        known = not (math.isnan(ok) or math.isnan(hit))
        cell = ATTRIBUTION_CELLS[(bool(hit), bool(ok))] if known else None
        for name, values in out.items():
            values.append(float(name == cell) if known else math.nan)
    return out


@dataclass(frozen=True)
class AttributionOptions:
    """`metrics.attribution`: when an answer counts as right, for the miss attribution.

    Right means `metric >= threshold`, or the judge's verdict is `correct` when `use_judge`
    is set and the judge group runs. `metric` is None when no configured group scores it
    (`metrics.groups=[diagnostics]`): such a run has no `correct` column.
    """

    metric: str | None
    threshold: float
    use_judge: bool

    @classmethod
    def from_cfg(
        cls,
        node: Mapping[str, Any] | None,
        groups: tuple[str, ...],
        answer_scores: Mapping[str, Sequence[str]],
    ) -> AttributionOptions:
        """Check the node; an unknown metric or a threshold that is no number is refused.

        `answer_scores` holds the columns that may decide right, by group
        (`metrics.ANSWER_SCORES`); `groups` are the configured ones.
        """

        def need(key: str) -> Any:
            if not isinstance(node, Mapping) or node.get(key) is None:
                raise QaLabError(f"metrics.attribution.{key} is missing; set it in conf/metrics/")
            return node[key]

        metric = str(need("metric"))
        require_choice(
            "metrics.attribution.metric", metric, [m for c in answer_scores.values() for m in c]
        )
        threshold = checks.number(need("threshold"), "metrics.attribution.threshold")
        group = next(g for g, columns in answer_scores.items() if metric in columns)
        return cls(
            metric=metric if group in groups else None,
            threshold=threshold,
            use_judge=checks.flag(need("use_judge"), "metrics.attribution.use_judge")
            and "judge" in groups,
        )


def attribution_columns(
    rows: Sequence[EvalRow], column: Callable[[str], Sequence[float]], opts: AttributionOptions
) -> dict[str, list[float]]:
    """`correct` per item, and the `attribution` cells when some row has gold and passages.

    `column(name)` is an already scored per-item column (NaN where an item lacks it). `correct`
    is the judge's verdict == correct (NaN when its reply was unparseable: no made-up verdict)
    or `opts.metric >= opts.threshold`. Runs are compared item by item on it, so it is added in
    every run, closed-book ones too; nothing is added when no configured group scores the metric.
    """
    if not opts.use_judge and opts.metric is None:
        return {}
    if opts.use_judge:
        judged = zip(column("judge_correct"), column("judge_unparseable"))
        correct = [math.nan if bad == 1.0 else v for v, bad in judged]
    else:
        correct = [v if math.isnan(v) else float(v >= opts.threshold) for v in column(opts.metric)]
    out = {"correct": correct}
    if any(r.gold and r.retrieved for r in rows):
        out.update(attribution(correct, [gold_retrieved(r.retrieved, r.gold) for r in rows]))
    return out
