"""Per-item answer scores and corpus metrics: lexical, semantic, diagnostics, retrieval.

Per-item outputs are the product: every metric here yields one float per item, in item order,
so that CIs, paired tests and the 2x2 decomposition can be derived from them later. Corpus-level
metrics (corpus BLEU) also return their per-item sufficient statistics for the same reason.

Conventions that follow the original study (HF `evaluate`'s "bleu" and "rouge"):
- BLEU is reported on a 0-1 scale (sacrebleu's 0-100 divided by 100).
- Corpus BLEU-4 with sacrebleu's 13a tokenizer and no smoothing equals HF's `bleu` (tensorflow
  nmt `compute_bleu`) for single-reference data; the one tokenizer difference (a hyphen
  followed by a segment-final newline) is removed before scoring, see `_hf_13a_compat`.
- ROUGE-L is the plain mean of per-item F1. HF's `rouge` reports the median of 1000 unseeded
  bootstrap means instead, which moves the 4th decimal from run to run.

Items with several references (a list answer): BLEU uses them all (sacrebleu's multi-reference
n-gram clipping and closest reference length), ROUGE-L F1, EM and token F1 take the best
reference, as SQuAD does. BERTScore, length ratio and retrieval compare with the first reference.

BERTScore is loaded lazily (torch/transformers only when the semantic group is asked for).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab.cache import stable_hash
from qa_lab.errors import QaLabError, require_choice

METRICS_VERSION = 1
# `judge` asks an LLM server (qa_lab.judge); stages.score_rows runs it next to score_items.
METRIC_GROUPS = ("lexical", "semantic", "diagnostics", "retrieval", "judge")
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

# A new turn the model invented after (or instead of) its answer, matched at the start of any
# line. Fine-tuned models trained on "Question:/Answer:" text keep going with
# "\n\nQuestion:\n..." until the token limit; chat models emit their role markers.
RUNAWAY_PATTERNS: tuple[str, ...] = (
    r"^[ \t]*(?:\*\*)?Question[ \t]*:",
    r"^[ \t]*(?:\*\*)?Q[ \t]*:",
    r"^[ \t]*#{1,6}[ \t]*Question\b",
    r"^[ \t]*(?:\*\*)?User[ \t]*:",
    r"^[ \t]*<\|im_start\|>",
    r"^[ \t]*\[INST\]",
)
# "Answer:" only counts after the first line: an answer that opens with "Answer:" merely echoes
# the prompt's cue, one that has it on a later line has started a second exchange.
RUNAWAY_AFTER_FIRST_LINE: tuple[str, ...] = (r"^[ \t]*(?:\*\*)?Answer[ \t]*:",)
_RUNAWAY_RE = re.compile("|".join(RUNAWAY_PATTERNS), re.MULTILINE)
_RUNAWAY_LATER_RE = re.compile("|".join(RUNAWAY_AFTER_FIRST_LINE), re.MULTILINE)

# Abstentions: "I don't know", "cannot answer", "not sure", "no information" (any case, straight
# or curly apostrophe).
IDK_PATTERN = (
    r"\b(?:don['\u2019]?t\s+know|do\s+not\s+know|can(?:not|['\u2019]t|\s+not)\s+answer"
    r"|not\s+sure|no\s+information)\b"
)
_IDK_RE = re.compile(IDK_PATTERN, re.IGNORECASE)

# Retrieved answers are compared with the reference in the embedded MiniLM's space (the same
# model the FAISS retriever uses by default).
RETRIEVAL_EMBEDDER = "all-MiniLM-L6-v2"
BERTSCORE_BASELINE_SEED = 0

# Per-item 0/1 flags whose corpus value is a rate, under the name the MLflow runs use.
SENTENCE_END = ".!?)]}\"'`*:;"
RATE_NAMES = {
    "unfinished": "unfinished_rate",
    "empty": "empty_rate",
    "truncated": "truncation_rate",
    "runaway": "runaway_rate",
    "idk": "idk_rate",
    "copied": "copy_rate",
}
# Direction of each corpus metric, for tables (True: higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "bleu": True,
    "sentence_bleu": True,
    "rougeL_f1": True,
    "exact_match": True,
    "token_f1": True,
    "bertscore_f1": True,
    "bertscore_f1_raw": True,
    "bertscore_precision": True,
    "bertscore_recall": True,
    "bertscore_precision_raw": True,
    "bertscore_recall_raw": True,
    "empty_rate": False,
    "truncation_rate": False,
    "runaway_rate": False,
    "unfinished_rate": False,
    "idk_rate": False,
    "retrieval_top1_score": True,
    "retrieval_best_rougeL": True,
    "retrieval_best_cosine": True,
    "answers_per_s": True,
    "tokens_per_s": True,
    "judge_correct": True,
    "judge_partially_correct": True,
    "judge_incorrect": False,
    "judge_unparseable": False,
    "judge_score": True,
}


# --------------------------------------------------------------------------------------------
# config


def validate_groups(groups: str | Iterable[str]) -> tuple[str, ...]:
    """Check `metrics.groups` against the known groups (a comma string or a list).

    Raises a one-line `QaLabError` naming the key and the allowed names, so a typo in a sweep
    override fails before any scoring work starts.
    """
    if isinstance(groups, str):
        groups = [g for g in (part.strip() for part in groups.split(",")) if g]
    out: list[str] = []
    for group in groups:
        require_choice("metrics.groups", group, METRIC_GROUPS)
        if group not in out:
            out.append(str(group))
    return tuple(out)


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    from qa_lab.config import to_dict

    return to_dict(cfg)


def _need(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            raise QaLabError(f"metrics.{dotted} is missing; set it in conf/metrics/")
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# lexical


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


# --------------------------------------------------------------------------------------------
# semantic (BERTScore)


@dataclass(frozen=True)
class BertScoreResult:
    """Raw and rescaled BERTScore per item, and the baseline that did the rescaling."""

    precision_raw: list[float]
    recall_raw: list[float]
    f1_raw: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    baseline: tuple[float, float, float]  # (P, R, F) of unrelated pairs
    baseline_source: str  # "official" (bert_score's table) | "computed" (unrelated references)
    model: str
    num_layers: int


def official_baseline_path(model: str, lang: str = "en") -> Path | None:
    """bert_score's shipped rescaling table for `model`, or None when it has none.

    Only hub names such as "roberta-large" have one; a local folder never does, and
    `bert_score.score(..., rescale_with_baseline=True)` then only prints a warning and returns
    raw scores.
    """
    import bert_score

    path = Path(bert_score.__file__).parent / "rescale_baseline" / lang / f"{model}.tsv"
    return path if path.is_file() else None


@lru_cache(maxsize=2)
def _bert_scorer(
    model_type: str, num_layers: int, official: bool, device: str, batch_size: int
) -> Any:
    from bert_score import BERTScorer

    try:
        # lang only tells bert_score where its official table is (read via `baseline_vals`);
        # rescaling is applied in `bertscore`, the same formula for both baseline sources.
        return BERTScorer(
            model_type=model_type,
            num_layers=num_layers,
            batch_size=batch_size,
            device=device,
            lang="en" if official else None,
            rescale_with_baseline=False,
        )
    except OSError as err:
        raise QaLabError(
            f"metrics.bertscore.model={model_type!r} could not be loaded ({type(err).__name__}); "
            "use all-MiniLM-L6-v2 or a local folder"
        ) from None


def _raw_bertscore(scorer: Any, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Raw (P, R, F) rows, shape (3, n); blank candidate or reference scores 0 (bert_score's rule).

    bert_score 0.3.13 encodes a blank string with `build_inputs_with_special_tokens`, which
    transformers 5 tokenizers no longer have, so blanks never reach it.
    """
    out = np.zeros((3, len(candidates)))
    keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
    if keep:
        p, r, f = scorer.score([candidates[i] for i in keep], [references[i] for i in keep])
        out[:, keep] = np.stack([t.detach().cpu().numpy() for t in (p, r, f)])
    return out


_BASELINES: dict[str, tuple[float, float, float]] = {}


def unrelated_pairs(n: int, pairs: int, seed: int = BERTSCORE_BASELINE_SEED) -> np.ndarray:
    """`pairs` random (i, j) index pairs with i != j, from a fixed seed."""
    if n < 2:
        raise QaLabError("metrics.bertscore: rescaling needs at least 2 non-blank references")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = (first + rng.integers(1, n, size=pairs)) % n
    return np.stack([first, second], axis=1)


def bertscore_baseline(
    references: Sequence[str],
    scorer: Any,
    *,
    model: str,
    pairs: int,
    seed: int = BERTSCORE_BASELINE_SEED,
) -> tuple[float, float, float]:
    """Mean raw BERTScore (P, R, F) of random unrelated reference pairs: the rescaling floor.

    This is how BERTScore's official baselines were made (random sentence pairs), computed on
    this evaluation set's references because no table exists for a local model: candidate and
    reference come from two different items. Blank references and pairs of identical texts
    (duplicate references) are left out. Cached in memory by
    (model, layer, references hash, pairs, seed).
    """
    key = stable_hash([model, int(scorer.num_layers), list(references), int(pairs), int(seed)])
    if key in _BASELINES:
        return _BASELINES[key]
    if int(pairs) < 1:
        raise QaLabError(f"metrics.bertscore.baseline_pairs={pairs} must be >= 1")
    texts = [t for t in references if t.strip()]
    index = unrelated_pairs(len(texts), int(pairs), seed)
    index = index[[texts[i] != texts[j] for i, j in index]]
    if len(index) == 0:
        raise QaLabError("metrics.bertscore: all references are identical; cannot rescale")
    raw = _raw_bertscore(scorer, [texts[i] for i in index[:, 0]], [texts[j] for j in index[:, 1]])
    baseline = (float(raw[0].mean()), float(raw[1].mean()), float(raw[2].mean()))
    _BASELINES[key] = baseline
    return baseline


def _rescale(values: Iterable[float], base: float) -> list[float]:
    return [(float(v) - base) / (1.0 - base) for v in values]


def bertscore(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    model: str = RETRIEVAL_EMBEDDER,
    num_layers: int = 6,
    baseline_pairs: int = 1000,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = BERTSCORE_BASELINE_SEED,
) -> BertScoreResult:
    """BERTScore P/R/F1 per item, raw and rescaled with a baseline.

    Raw BERTScore sits in a narrow band (with MiniLM layer 6, unrelated answers score ~0.2-0.3
    and identical ones 1.0), so raw differences look small and are not comparable across
    models. Rescaling `(raw - b) / (1 - b)` with b = the score of unrelated pairs puts
    "unrelated" at ~0. Models with an official bert_score table (e.g. roberta-large) use its
    row for `num_layers`; others get b computed on unrelated reference pairs
    (`bertscore_baseline`), because `rescale_with_baseline=True` on a local model only prints
    a warning and returns raw scores.
    """
    from qa_lab.models import resolve_embedder_path

    official = official_baseline_path(model) is not None
    model_type = model if official else resolve_embedder_path(model)
    scorer = _bert_scorer(str(model_type), int(num_layers), official, device, int(batch_size))
    raw = _raw_bertscore(scorer, list(predictions), list(references))
    if official:
        b = tuple(float(x) for x in scorer.baseline_vals)
        source = "official"
    else:
        b = bertscore_baseline(references, scorer, model=model, pairs=baseline_pairs, seed=seed)
        source = "computed"
    rescaled = [_rescale(col, base) for col, base in zip(raw, b)]
    return BertScoreResult(
        precision_raw=raw[0].tolist(),
        recall_raw=raw[1].tolist(),
        f1_raw=raw[2].tolist(),
        precision=rescaled[0],
        recall=rescaled[1],
        f1=rescaled[2],
        baseline=(float(b[0]), float(b[1]), float(b[2])),
        baseline_source=source,
        model=model,
        num_layers=int(num_layers),
    )


# --------------------------------------------------------------------------------------------
# diagnostics


def is_empty(prediction: str) -> float:
    """1.0 when the answer is blank after stripping whitespace."""
    return float(not prediction.strip())


def is_truncated(
    stop_reason: str | None = None,
    generated_tokens: int | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """1.0 when generation hit the token limit; NaN when nothing says how it stopped.

    The recorded `stop_reason` wins; without it, reaching `max_new_tokens` counts as cut off.
    NaN (not 0) for unknown keeps imported prediction files from reporting a 0% rate.
    """
    if stop_reason is not None and stop_reason != "":
        return float(stop_reason == "length")
    if generated_tokens is not None and max_new_tokens is not None:
        return float(int(generated_tokens) >= int(max_new_tokens))
    return math.nan


def is_runaway(prediction: str) -> float:
    """1.0 when the answer goes on to invent a new turn (see `RUNAWAY_PATTERNS`)."""
    if _RUNAWAY_RE.search(prediction):
        return 1.0
    _, newline, rest = prediction.lstrip().partition("\n")
    return float(bool(newline) and _RUNAWAY_LATER_RE.search(rest) is not None)


def length_ratio(prediction: str, reference: str) -> float:
    """Whitespace words in the prediction per word in the reference (reference floored at 1)."""
    return len(prediction.split()) / max(len(reference.split()), 1)


def is_unfinished(prediction: str) -> float:
    """1.0 when a non-empty answer stops mid-sentence (no closing punctuation).

    Files scored without token counts cannot say whether generation hit its limit; an answer
    cut mid-sentence is the visible trace of that, so this stands in for the truncation rate.
    """
    text = prediction.rstrip()
    return float(bool(text) and text[-1] not in SENTENCE_END)


def is_idk(prediction: str) -> float:
    """1.0 when the answer abstains ("I don't know", "cannot answer", ...; `IDK_PATTERN`)."""
    return float(_IDK_RE.search(prediction) is not None)


def throughput(n_answers: int, generated_tokens: int, seconds: float) -> dict[str, float]:
    """Answers and generated tokens per second of wall time (NaN when no time was measured)."""
    if seconds <= 0:
        return {"answers_per_s": math.nan, "tokens_per_s": math.nan}
    return {"answers_per_s": n_answers / seconds, "tokens_per_s": generated_tokens / seconds}


# --------------------------------------------------------------------------------------------
# retrieval


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def retrieval_scores(
    retrieved: Sequence[Sequence[Any]],
    references: Sequence[str],
    predictions: Sequence[str],
    *,
    copy_threshold: float = 0.9,
    stemmer: bool = True,
    embedder: str = RETRIEVAL_EMBEDDER,
    cache_dir: str | Path | None = None,
) -> dict[str, list[float]]:
    """How good the retrieved context was, per item, independently of the generator.

    `retrieved[i]` holds {answer, score} passages (dicts or `Passage`s). Returns the top-1
    similarity the retriever reported, and the best ROUGE-L F1 and best cosine (embedded
    MiniLM) of any retrieved answer against the reference. Items without passages get NaN.

    It also says whether the generator *copied*: `copy_rougeL` is the prediction's best
    ROUGE-L F1 against a retrieved answer and `copied` flags it at `copy_threshold` or more.
    A RAG win made of copies of near-duplicate training answers is leakage, not reasoning.
    """
    from qa_lab.retrieval import embed

    top1: list[float] = []
    best_rouge: list[float] = []
    copy_rouge: list[float] = []
    flat_answers: list[str] = []
    owners: list[int] = []
    scorer = _rouge_scorer(bool(stemmer))
    for item, (passages, ref) in enumerate(zip(retrieved, references)):
        passages = list(passages or [])
        if not passages:
            top1.append(math.nan)
            best_rouge.append(math.nan)
            copy_rouge.append(math.nan)
            continue
        top1.append(max(float(_get(p, "score")) for p in passages))
        answers = [str(_get(p, "answer") or "") for p in passages]
        best_rouge.append(max(scorer.score(ref, a)["rougeL"].fmeasure for a in answers))
        pred = predictions[item]
        copy_rouge.append(max(scorer.score(a, pred)["rougeL"].fmeasure for a in answers))
        flat_answers.extend(answers)
        owners.extend([item] * len(answers))
    best_cos = np.full(len(references), np.nan)
    if flat_answers:
        ref_vecs = embed(list(references), embedder, cache_dir=cache_dir)
        ans_vecs = embed(flat_answers, embedder, cache_dir=cache_dir)
        owner_idx = np.asarray(owners)
        # Both sides are unit-normalised, so the row-wise dot product is the cosine.
        sims = np.einsum("ij,ij->i", ans_vecs, ref_vecs[owner_idx]).astype(float)
        np.fmax.at(best_cos, owner_idx, sims)  # fmax: NaN (no value yet) loses to any number
    return {
        "retrieval_top1_score": top1,
        "retrieval_best_rougeL": [float(v) for v in best_rouge],
        "retrieval_best_cosine": best_cos.tolist(),
        "copy_rougeL": copy_rouge,
        "copied": [v if math.isnan(v) else float(v >= copy_threshold) for v in copy_rouge],
    }


# --------------------------------------------------------------------------------------------
# everything at once


@dataclass
class ScoreResult:
    """Per-item scores (one dict per row, in row order) and corpus-level values.

    `corpus` holds the corpus metrics (bleu, bleu_signature, BERTScore model/layer/baseline)
    and the mean of every per-item metric under its run-level name (`runaway` ->
    `runaway_rate`; NaN items ignored). `bleu_stats` lets a bootstrap recompute corpus BLEU.
    """

    per_item: list[dict[str, float]]
    corpus: dict[str, Any]
    ids: list[str | None] = field(default_factory=list)
    topics: list[str | None] = field(default_factory=list)
    seed_ids: list[str | None] = field(default_factory=list)
    bleu_stats: np.ndarray | None = None
    bleu_smooth: str = "none"

    def metric_names(self) -> list[str]:
        """Per-item metric names, in first-seen order."""
        names: dict[str, None] = {}
        for row in self.per_item:
            names.update(dict.fromkeys(row))
        return list(names)

    def column(self, metric: str) -> np.ndarray:
        """One per-item metric as a float array in item order (NaN where an item lacks it)."""
        return np.array([row.get(metric, math.nan) for row in self.per_item], dtype=float)

    def corpus_bleu(self, indices: Sequence[int] | np.ndarray) -> float:
        """Corpus BLEU over a subset or resample of items (for `stats.bootstrap_corpus_ci`)."""
        if self.bleu_stats is None:
            raise ValueError("no BLEU statistics: the lexical group was not scored")
        return corpus_bleu_from_stats(
            self.bleu_stats[np.asarray(indices, dtype=int)], smooth=self.bleu_smooth
        )

    def topic_means(self) -> dict[str, dict[str, float]]:
        """Per-topic means of every per-item metric, plus corpus BLEU and n per topic."""
        return self.group_means(self.topics or [None] * len(self.per_item))

    def group_means(self, labels: Sequence[str | None]) -> dict[str, dict[str, float]]:
        """Means of every per-item metric, corpus BLEU and n within each label's items.

        Items labelled None or "" belong to no group.
        """
        out: dict[str, dict[str, float]] = {}
        topics = np.array([t if t else "" for t in labels])
        for topic in sorted(set(topics.tolist()) - {""}):
            idx = np.flatnonzero(topics == topic)
            means = _means([self.per_item[i] for i in idx])
            if self.bleu_stats is not None:
                means["bleu"] = self.corpus_bleu(idx)
            means["n"] = float(len(idx))
            out[topic] = means
        return out


def _means(per_item: list[dict[str, float]]) -> dict[str, float]:
    names: dict[str, None] = {}
    for row in per_item:
        names.update(dict.fromkeys(row))
    out: dict[str, float] = {}
    for name in names:
        values = np.array([row.get(name, math.nan) for row in per_item], dtype=float)
        if np.isfinite(values).any():
            out[RATE_NAMES.get(name, name)] = float(np.nanmean(values))
    return out


def _row_references(row: Mapping[str, Any], index: int) -> list[str]:
    """`references` (a list) when the row has several, else its one `reference`."""
    refs = row.get("references")
    if isinstance(refs, list | tuple) and refs:
        return [str(r) for r in refs]
    reference = row.get("reference")
    if isinstance(reference, list | tuple) and reference:
        return [str(r) for r in reference]
    return [_row_text(row, "reference", index)]


def _row_text(row: Mapping[str, Any], key: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        raise QaLabError(
            f"item {index}: missing {key!r} (rows need question, prediction, reference)"
        )
    return str(value)


def _put(per_item: list[dict[str, float]], name: str, values: Iterable[float]) -> None:
    for row, value in zip(per_item, values):
        row[name] = float(value)


def score_items(
    rows: Sequence[Mapping[str, Any]],
    metrics_cfg: Any,
    *,
    embedder_cache_dir: str | Path | None = None,
) -> ScoreResult:
    """Score predictions against references with the metric groups named in the config.

    `rows` carry question, prediction and reference, and optionally id, topic, seed_id,
    stop_reason, generated_tokens, max_new_tokens and retrieved ([{answer, score}, ...]).
    `metrics_cfg` is the `metrics` config node (conf/metrics/*.yaml). The retrieval group is
    skipped when no row carries retrieved passages (vanilla and LoRA runs).
    """
    cfg = _plain(metrics_cfg)
    groups = validate_groups(_need(cfg, "groups"))
    if not rows:
        raise QaLabError("metrics: no items to score")
    predictions = [_row_text(r, "prediction", i) for i, r in enumerate(rows)]
    ref_lists = [_row_references(r, i) for i, r in enumerate(rows)]
    references = [refs[0] for refs in ref_lists]  # the first: BERTScore, length, retrieval
    for i, r in enumerate(rows):
        _row_text(r, "question", i)
    per_item: list[dict[str, float]] = [{} for _ in rows]
    corpus: dict[str, Any] = {"metrics_version": METRICS_VERSION, "n_items": len(rows)}
    result = ScoreResult(
        per_item=per_item,
        corpus=corpus,
        ids=[(r.get("id") or r.get("item_id")) for r in rows],
        topics=[r.get("topic") for r in rows],
        seed_ids=[r.get("seed_id") for r in rows],
    )

    if "lexical" in groups:
        smooth = str(_need(cfg, "bleu_smooth"))
        bleu = bleu_scores(
            predictions, ref_lists, tokenize=str(_need(cfg, "bleu_tokenize")), smooth=smooth
        )
        corpus["bleu"] = bleu.corpus
        corpus["bleu_signature"] = bleu.signature
        result.bleu_stats, result.bleu_smooth = bleu.stats, smooth
        _put(per_item, "sentence_bleu", bleu.sentence)
        stemmer = bool(_need(cfg, "rouge_stemmer"))
        _put(per_item, "rougeL_f1", rouge_l_f1(predictions, ref_lists, stemmer=stemmer))
        mode = require_choice("metrics.exact_match", _need(cfg, "exact_match"), EXACT_MATCH_MODES)
        _put(
            per_item,
            "exact_match",
            (exact_match(p, r, mode) for p, r in zip(predictions, ref_lists)),
        )
        _put(per_item, "token_f1", (token_f1(p, r) for p, r in zip(predictions, ref_lists)))

    if "semantic" in groups:
        bs_cfg = _need(cfg, "bertscore")
        from qa_lab.models import pick_device

        bs = bertscore(
            predictions,
            references,
            model=str(_need(cfg, "bertscore.model")),
            num_layers=int(_need(cfg, "bertscore.num_layers")),
            baseline_pairs=int(_need(cfg, "bertscore.baseline_pairs")),
            batch_size=int(bs_cfg.get("batch_size") or 64),
            device=pick_device(str(bs_cfg.get("device") or "cpu")),
        )
        _put(per_item, "bertscore_f1", bs.f1)
        _put(per_item, "bertscore_f1_raw", bs.f1_raw)
        _put(per_item, "bertscore_precision", bs.precision)
        _put(per_item, "bertscore_recall", bs.recall)
        _put(per_item, "bertscore_precision_raw", bs.precision_raw)
        _put(per_item, "bertscore_recall_raw", bs.recall_raw)
        corpus.update(
            bertscore_model=bs.model,
            bertscore_num_layers=bs.num_layers,
            bertscore_baseline_precision=bs.baseline[0],
            bertscore_baseline_recall=bs.baseline[1],
            bertscore_baseline_f1=bs.baseline[2],
            bertscore_baseline_source=bs.baseline_source,
        )

    if "diagnostics" in groups:
        _put(per_item, "empty", (is_empty(p) for p in predictions))
        _put(
            per_item,
            "truncated",
            (
                is_truncated(
                    r.get("stop_reason"), r.get("generated_tokens"), r.get("max_new_tokens")
                )
                for r in rows
            ),
        )
        _put(per_item, "runaway", (is_runaway(p) for p in predictions))
        _put(per_item, "unfinished", (is_unfinished(p) for p in predictions))
        _put(
            per_item, "length_ratio", (length_ratio(p, r) for p, r in zip(predictions, references))
        )
        _put(per_item, "idk", (is_idk(p) for p in predictions))

    if "retrieval" in groups and any(r.get("retrieved") for r in rows):
        scores = retrieval_scores(
            [r.get("retrieved") or [] for r in rows],
            references,
            predictions,
            copy_threshold=float(cfg.get("copy_threshold", 0.9)),
            stemmer=bool(cfg.get("rouge_stemmer", True)),
            cache_dir=embedder_cache_dir,
        )
        for name, values in scores.items():
            _put(per_item, name, values)

    corpus.update({k: v for k, v in _means(per_item).items() if k not in corpus})
    return result
