"""Lexical answer metrics: SQuAD exact match and token F1, ROUGE-L F1, corpus and sentence BLEU.

Conventions that follow the original study (HF `evaluate`'s "bleu" and "rouge"):
- BLEU is reported on a 0-1 scale (sacrebleu's 0-100 divided by 100).
- Corpus BLEU-4 with sacrebleu's 13a tokenizer and no smoothing equals HF's `bleu` (tensorflow
  nmt `compute_bleu`) for single-reference data; the one tokenizer difference (a hyphen
  followed by a segment-final newline) is removed before scoring, see `_hf_13a_compat`.
- ROUGE-L is the plain mean of per-item F1. HF's `rouge` reports the median of 1000 unseeded
  bootstrap means instead, which moves the 4th decimal from run to run.

Items with several references (a list answer): BLEU uses them all (sacrebleu's multi-reference
n-gram clipping and closest reference length), ROUGE-L F1, EM and token F1 take the best
reference, as SQuAD does. Corpus BLEU also returns its per-item sufficient statistics, so a
bootstrap can recompute it on resampled items.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from qa_lab.errors import require_choice

EXACT_MATCH_MODES = ("squad", "strip_lower")
BLEU_SMOOTH_METHODS = ("none", "exp", "floor", "add-k")
BLEU_MAX_ORDER = 4
# Columns of the per-item BLEU statistics: hypothesis length, reference length, then matched
# and total n-grams for n = 1..4. Summing rows and scoring the sum gives corpus BLEU exactly.
BLEU_STATS_COLUMNS = (
    ("sys_len", "ref_len")
    + tuple(f"correct_{n}" for n in range(1, BLEU_MAX_ORDER + 1))
    + tuple(f"total_{n}" for n in range(1, BLEU_MAX_ORDER + 1))
)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official `normalize_answer`: lowercase, drop punctuation and articles.

    Kept byte-for-byte in behaviour with the official script so EM/F1 are comparable with
    published SQuAD-style numbers.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)

# One reference, or several (the item is scored against the best / all of them).
Reference = str | Sequence[str]


def _ref_list(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: Reference, mode: str = "squad") -> float:
    """1.0 when the prediction equals the (or any) reference after normalisation, else 0.0.

    `mode="squad"` uses `normalize_answer`; `mode="strip_lower"` only strips and lowercases,
    which is what the original study did (so its EM is stricter about punctuation).
    """
    require_choice("metrics.exact_match", mode, EXACT_MATCH_MODES)
    if mode == "strip_lower":
        key = prediction.strip().lower()
        return float(any(key == r.strip().lower() for r in _ref_list(reference)))
    key = normalize_answer(prediction)
    return float(any(key == normalize_answer(r) for r in _ref_list(reference)))


def token_f1(prediction: str, reference: Reference) -> float:
    """SQuAD v1.1 token F1, the best over several references (0 when nothing overlaps).

    As in the official script, two empty strings score 0, not 1.
    """
    return max(_token_f1(prediction, r) for r in _ref_list(reference))


def _token_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=4)
def _rouge_scorer(stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)


def rouge_l_f1(
    predictions: Sequence[str], references: Sequence[Reference], *, stemmer: bool = True
) -> list[float]:
    """ROUGE-L F1 per item (the best reference) with rouge_score's tokenizer.

    rouge_score keeps lowercase ASCII alphanumerics only, so text in other scripts scores 0;
    `stemmer` applies Porter stemming to tokens longer than 3 characters.
    """
    scorer = _rouge_scorer(bool(stemmer))
    return [
        max(float(scorer.score(r, pred)["rougeL"].fmeasure) for r in _ref_list(ref))
        for pred, ref in zip(predictions, references)
    ]


def _hf_13a_compat(text: str) -> str:
    # HF's Tokenizer13a deletes "-\n" before anything else; sacrebleu rstrips the segment
    # first, so a segment ending in "-\n" keeps its hyphen there. Deleting it up front is a
    # no-op for sacrebleu everywhere else and makes the two tokenizations identical.
    return text.replace("-\n", "")


@dataclass(frozen=True)
class BleuScores:
    """Corpus BLEU (0-1), its sacrebleu signature, sentence BLEU and per-item statistics."""

    corpus: float
    signature: str
    sentence: list[float]
    stats: np.ndarray  # shape (n_items, 10), columns BLEU_STATS_COLUMNS
    smooth: str


def bleu_scores(
    predictions: Sequence[str],
    references: Sequence[Reference],
    *,
    tokenize: str = "13a",
    smooth: str = "none",
) -> BleuScores:
    """Corpus BLEU-4 (sacrebleu, one or several references per item) plus sentence BLEU per item.

    Corpus BLEU uses the configured smoothing (`none` reproduces HF `evaluate`'s bleu).
    Sentence BLEU always uses sacrebleu's sentence defaults (exp smoothing, effective order):
    unsmoothed, almost every short answer would score exactly 0 and the mean would say nothing.
    The per-item n-gram statistics let a bootstrap recompute corpus BLEU on resampled items
    without re-tokenising (`corpus_bleu_from_stats`).
    """
    from sacrebleu.metrics import BLEU

    require_choice("metrics.bleu_smooth", smooth, BLEU_SMOOTH_METHODS)
    require_choice("metrics.bleu_tokenize", tokenize, tuple(BLEU.TOKENIZERS))
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    ref_lists = [_ref_list(r) for r in references]
    if tokenize == "13a":
        predictions = [_hf_13a_compat(p) for p in predictions]
        ref_lists = [[_hf_13a_compat(r) for r in refs] for refs in ref_lists]
    # sacrebleu takes one stream per reference position; None pads items with fewer.
    width = max((len(refs) for refs in ref_lists), default=1)
    streams = [[refs[j] if j < len(refs) else None for refs in ref_lists] for j in range(width)]
    corpus_metric = BLEU(tokenize=tokenize, smooth_method=smooth)
    corpus = corpus_metric.corpus_score(list(predictions), streams)
    sentence_metric = BLEU(tokenize=tokenize, smooth_method="exp", effective_order=True)
    sentence: list[float] = []
    stats = np.zeros((len(predictions), len(BLEU_STATS_COLUMNS)), dtype=np.int64)
    for row, (pred, refs) in enumerate(zip(predictions, ref_lists)):
        score = sentence_metric.sentence_score(pred, refs)
        sentence.append(score.score / 100.0)
        stats[row] = [score.sys_len, score.ref_len, *score.counts, *score.totals]
    return BleuScores(
        corpus=corpus.score / 100.0,
        signature=str(corpus_metric.get_signature()),
        sentence=sentence,
        stats=stats,
        smooth=smooth,
    )


def corpus_bleu_from_stats(stats: np.ndarray, *, smooth: str = "none") -> float:
    """Corpus BLEU (0-1) from summed per-item statistics (rows of `BleuScores.stats`).

    Equal to sacrebleu's corpus score on the same items; used for bootstrap CIs of corpus BLEU.
    """
    from sacrebleu.metrics import BLEU

    total = np.asarray(stats, dtype=np.int64).reshape(-1, len(BLEU_STATS_COLUMNS)).sum(axis=0)
    k = BLEU_MAX_ORDER
    score = BLEU.compute_bleu(
        correct=[int(x) for x in total[2 : 2 + k]],
        total=[int(x) for x in total[2 + k : 2 + 2 * k]],
        sys_len=int(total[0]),
        ref_len=int(total[1]),
        smooth_method=smooth,
    )
    return score.score / 100.0
