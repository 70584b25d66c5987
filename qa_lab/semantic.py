"""BERTScore per item, raw and rescaled by a baseline of unrelated pairs (the semantic group).

bert_score (torch, transformers) is imported only inside functions: scoring without the
semantic group never loads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab.cache import stable_hash
from qa_lab.errors import QaLabError

BERTSCORE_BASELINE_SEED = 0


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
    model: str,
    num_layers: int,
    baseline_pairs: int,
    batch_size: int,
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
