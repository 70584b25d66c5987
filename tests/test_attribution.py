"""Failure attribution: `correct` per item, the four cells, the judge path and bad options.

Answers are chosen so their token F1 is known by hand (the reference verbatim: 1; unrelated
words: 0), and gold chunks are retrieved or not by construction.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from qa_lab import metrics, prompts, run_scores
from qa_lab import retrieval_metrics as rm
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from tests.conftest import compose_cfg
from tests.test_metrics import EMBEDDER, metrics_cfg
from tests.test_openai import Scripted, _reply

CELLS = ("retriever_miss", "generator_miss", "parametric_hit", "both_right")
REFERENCE = "A deadlock is a cycle of threads waiting on each other."


def _chunk(chunk_id: str, gold: bool) -> dict:
    return {"item_id": chunk_id, "document": "d.md", "heading": "", "text": "t", "score": 0.5,
            "gold": gold}  # fmt: skip


def _rows(retrieval: bool = True) -> list[EvalRow]:
    """(gold retrieved, right): both, generator miss, parametric hit, retriever miss; no gold."""
    right, wrong = REFERENCE, "Bananas grow in bunches."
    cases = [(True, right), (True, wrong), (False, right), (False, wrong)]
    rows = [
        EvalRow(
            item_id=f"i{n}",
            question=f"Question {n}?",
            reference=REFERENCE,
            prediction=answer,
            seed_id=f"s{n}",
            retrieved=(_chunk("g", True), _chunk("x", False)) if hit else (_chunk("x", False),),
            gold=("g",),
        )
        for n, (hit, answer) in enumerate(cases)
    ]
    rows.append(
        EvalRow(item_id="i4", question="Q4?", reference=REFERENCE, prediction=right,
                retrieved=(_chunk("x", False),))
    )  # fmt: skip
    if not retrieval:  # the closed-book run of the same items
        rows = [replace(r, retrieved=None, gold=None) for r in rows]
    return rows


def _score(rows: list[EvalRow], cfg: dict, tmp_path) -> run_scores.RunScores:
    opts = metrics.MetricsOptions.from_cfg(cfg)
    return run_scores.score_rows(rows, opts, embedder=EMBEDDER, cache_dir=tmp_path)


def test_cells_are_one_hot_and_add_up_to_the_items_with_gold(tmp_path):
    scored = _score(_rows(), metrics_cfg(groups=["lexical"]), tmp_path)
    per_item = [r.scores for r in scored.rows]
    assert [s["correct"] for s in per_item] == [1.0, 0.0, 1.0, 0.0, 1.0]
    expected = ["both_right", "generator_miss", "parametric_hit", "retriever_miss"]
    for scores, cell in zip(per_item[:4], expected):
        assert {c: scores[c] for c in CELLS} == {c: float(c == cell) for c in CELLS}
    assert all(math.isnan(per_item[4][c]) for c in CELLS)  # no gold: in no cell
    counts = {c: sum(s[c] == 1.0 for s in per_item) for c in CELLS}
    assert sum(counts.values()) == 4  # the items with gold
    ci = scored.ci
    assert ci["attribution/retriever_miss"]["mean"] == 0.25
    assert ci["attribution/retriever_miss"]["n"] == 4
    assert ci["attribution/correct"]["mean"] == pytest.approx(3 / 5)
    assert scored.summary["attribution/both_right"] == 0.25


def test_threshold_decides_right(tmp_path):
    rows = _rows()[:1]
    # SQuAD normalisation drops articles: the reference has 9 tokens ("deadlock is cycle of
    # threads waiting on each other"), the answer 5, all in it: P = 1, R = 5/9, F1 = 10/14
    rows = [replace(rows[0], prediction="A deadlock is a cycle of threads")]
    lenient = _score(rows, metrics_cfg(groups=["lexical"]), tmp_path).rows[0].scores
    assert lenient["token_f1"] == pytest.approx(10 / 14)
    assert (lenient["correct"], lenient["both_right"]) == (1.0, 1.0)
    strict_cfg = metrics_cfg(groups=["lexical"], attribution={"threshold": 0.8})
    strict = _score(rows, strict_cfg, tmp_path).rows[0].scores
    assert (strict["correct"], strict["generator_miss"]) == (0.0, 1.0)
    by_em = metrics_cfg(groups=["lexical"], attribution={"metric": "exact_match"})
    assert _score(rows, by_em, tmp_path).rows[0].scores["correct"] == 0.0


def test_closed_book_runs_get_correct_but_no_cells(tmp_path):
    scored = _score(_rows(retrieval=False), metrics_cfg(groups=["lexical"]), tmp_path)
    assert [r.scores["correct"] for r in scored.rows] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert not any(c in scored.rows[0].scores for c in CELLS)
    assert not any(name.startswith("attribution/r") for name in scored.ci)
    # no group scores the metric: no `correct` either (nothing to guess it from)
    diag = _score(_rows(), metrics_cfg(groups=["diagnostics"]), tmp_path)
    assert "correct" not in diag.rows[0].scores


def test_bad_options_name_their_key():
    with pytest.raises(QaLabError, match=r"metrics\.attribution\.metric='bleu' is not one of"):
        metrics.MetricsOptions.from_cfg(metrics_cfg(attribution={"metric": "bleu"}))
    with pytest.raises(QaLabError, match=r"metrics\.attribution\.threshold='high' is not a number"):
        metrics.MetricsOptions.from_cfg(metrics_cfg(attribution={"threshold": "high"}))
    cfg = metrics_cfg()
    del cfg["attribution"]["use_judge"]
    with pytest.raises(QaLabError, match=r"metrics\.attribution\.use_judge is missing"):
        metrics.MetricsOptions.from_cfg(cfg)
    del cfg["attribution"]  # no node at all: its first key is named
    with pytest.raises(QaLabError, match=r"metrics\.attribution\.metric is missing"):
        metrics.MetricsOptions.from_cfg(cfg)
    opts = metrics.MetricsOptions.from_cfg(metrics_cfg()).attribution
    assert (opts.metric, opts.threshold, opts.use_judge) == ("token_f1", 0.5, False)
    assert metrics.MetricsOptions.from_cfg(metrics_cfg("judge")).attribution.use_judge


def test_attribution_columns_from_plain_columns():
    """Rows (gold retrieved, right?) and a token F1 column given by hand, NaN for a lost item."""
    rows = _rows()[:3]  # gold retrieved, gold retrieved, gold not retrieved
    f1 = {"token_f1": [0.9, 0.1, math.nan]}
    opts = rm.AttributionOptions(metric="token_f1", threshold=0.5, use_judge=False)
    out = rm.attribution_columns(rows, f1.__getitem__, opts)
    assert out["correct"][:2] == [1.0, 0.0] and math.isnan(out["correct"][2])
    assert [out[c][:2] for c in ("both_right", "generator_miss")] == [[1.0, 0.0], [0.0, 1.0]]
    assert all(math.isnan(out[c][2]) for c in CELLS)  # no verdict: in no cell
    assert rm.attribution_columns(rows, f1.__getitem__, replace(opts, metric=None)) == {}
    closed = rm.attribution_columns(_rows(retrieval=False)[:3], f1.__getitem__, opts)
    assert list(closed) == ["correct"]


def test_judge_verdict_decides_right(store, tmp_path):
    """A scripted judge: correct for i1 and i2, incorrect for i0, never parseable for i3."""

    def respond(body: dict) -> tuple[int, dict, dict]:
        repair = body["messages"][-1]["content"] == prompts.JUDGE_REPAIR
        user = body["messages"][-3 if repair else -1]["content"]
        verdict = next((v for q, v in VERDICTS.items() if q in user), "garbage")
        text = f'{{"verdict": "{verdict}", "score": 3}}' if verdict != "garbage" else "hmm"
        return 200, _reply(text), {}

    VERDICTS = {"Question 0?": "incorrect", "Question 1?": "correct", "Question 2?": "correct"}
    server = Scripted(respond)
    try:
        cfg = compose_cfg(
            "evaluate",
            [*store, "metrics=judge", "metrics.groups=[lexical,judge]",
             "metrics.judge.model=judge-m", f"metrics.judge.base_url={server.url}",
             "metrics.bootstrap.resamples=200"],
        )  # fmt: skip
        opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
        scored = run_scores.score_rows(
            _rows()[:4], opts, embedder=EMBEDDER, cache_dir=cfg.paths.cache
        )
    finally:
        server.close()
    per_item = [r.scores for r in scored.rows]
    # token F1 says right, wrong, right, wrong; the judge's verdict wins
    assert [s["token_f1"] for s in per_item] == [1.0, 0.0, 1.0, 0.0]
    assert [s["correct"] for s in per_item[:3]] == [0.0, 1.0, 1.0]
    assert math.isnan(per_item[3]["correct"])  # unparseable: no made-up verdict
    assert [s["generator_miss"] for s in per_item[:3]] == [1.0, 0.0, 0.0]
    assert [s["both_right"] for s in per_item[:3]] == [0.0, 1.0, 0.0]
    assert per_item[2]["parametric_hit"] == 1.0
    assert all(math.isnan(per_item[3][c]) for c in CELLS)
    assert scored.ci["attribution/generator_miss"]["n"] == 3  # the items with gold and a verdict
