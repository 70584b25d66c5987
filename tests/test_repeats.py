"""Sampling repeats (`generation.repeats`): each item answered N times, its scores their mean.

The pooling runs on hand-made rows with known scores; the end-to-end test samples real
answers from the embedded SmolLM2 into a real MLflow store and reads the run back.
"""

from __future__ import annotations

import json
import math

import mlflow
import pytest
from omegaconf import OmegaConf

from qa_lab import generation, metrics, run_scores, stages
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.report_blocks import to_markdown
from qa_lab.report_sections import repeats_section
from tests.conftest import TINY_RUN, compose_cfg
from tests.test_keys import _predict_key


def _row(item: str, prediction: str, repeat: int) -> EvalRow:
    return EvalRow(
        item_id=item,
        question=f"What is {item}?",
        reference="a hash table maps keys to values",
        prediction=prediction,
        seed_id=item,
        repeat=repeat,
    )


def test_repeats_pool_into_one_row_per_item_with_the_mean_and_the_spread(store):
    """Item a: one exact answer, one unrelated (token F1 1 and 0); b: two exact; c: none."""
    exact, off = "a hash table maps keys to values", "no idea"
    first = [_row("a", exact, 0), _row("b", exact, 0), _row("c", off, 0)]
    second = [_row("a", off, 1), _row("b", exact, 1), _row("c", off, 1)]
    cfg = compose_cfg("evaluate", [*store, "metrics.groups=[lexical]"])
    opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    scored = run_scores.score_rows(
        first + second, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )
    assert [r.item_id for r in scored.rows] == ["a", "b", "c"]
    assert [r.scores["token_f1"] for r in scored.rows] == pytest.approx([0.5, 1.0, 0.0])
    assert [r.repeat_answers for r in scored.rows] == [(off,), (exact,), (off,)]
    assert scored.ci["token_f1"]["n"] == 3 and scored.ci["token_f1"]["mean"] == pytest.approx(0.5)
    # sd across an item's two answers: sqrt(0.5) for a, 0 for b and c; their mean
    assert scored.summary["repeats/token_f1_sd"] == pytest.approx(math.sqrt(0.5) / 3)
    assert scored.summary["repeats/n"] == 2
    # corpus BLEU pools both answers of an item: the same as BLEU over all six answers
    every = run_scores.score_rows(
        [*first, *(_row(f"{r.item_id}2", r.prediction, 0) for r in second)],
        opts,
        embedder=cfg.embedder.name,
        cache_dir=cfg.paths.cache,
    )
    assert scored.ci["bleu"]["mean"] == pytest.approx(every.ci["bleu"]["mean"])
    with pytest.raises(QaLabError, match=r"^row 4 \(a, repeat 1\): sampled repeats must come"):
        run_scores.score_rows(
            [*first, second[0], _row("b", exact, 0), second[2]],
            opts,
            embedder=cfg.embedder.name,
            cache_dir=cfg.paths.cache,
        )
    single = run_scores.score_rows(
        first, opts, embedder=cfg.embedder.name, cache_dir=cfg.paths.cache
    )
    assert not any(k.startswith("repeats/") for k in single.summary)


def test_repeats_need_sampling_and_one_repeat_keeps_the_predict_key():
    base = compose_cfg("evaluate").generation
    with pytest.raises(QaLabError, match=r"^generation.repeats=3 needs generation.do_sample"):
        generation.GenerationOptions.from_cfg(OmegaConf.merge(base, {"repeats": 3}), 42)
    with pytest.raises(QaLabError, match=r"^generation.repeats="):
        generation.GenerationOptions.from_cfg(OmegaConf.merge(base, {"repeats": 0}), 42)
    assert _predict_key(["~generation.repeats"]) == _predict_key()  # caches made before repeats
    sampled = ["generation.do_sample=true"]
    assert _predict_key([*sampled, "generation.repeats=2"]) != _predict_key(sampled)


def test_evaluate_samples_each_item_repeats_times_and_reuses_repeat_zero(store, small_source):
    sampled = [
        *store,
        f"dataset.source={small_source}",
        *TINY_RUN,
        "eval.limit=4",
        "metrics=lexical",
        "generation.do_sample=true",
    ]
    run_id = stages.evaluate(compose_cfg("evaluate", [*sampled, "generation.repeats=3"]))
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert m["answers_generated"] == 12 and m["repeats/n"] == 3
    assert 0 <= m["repeats/token_f1_sd"] <= 1
    items = [
        json.loads(line)
        for line in mlflow.artifacts.load_text(f"runs:/{run_id}/per_item.jsonl").splitlines()
    ]
    assert len(items) == 4 and all(len(it["repeat_answers"]) == 2 for it in items)
    answers = [[it["prediction"], *it["repeat_answers"]] for it in items]
    assert any(len(set(a)) > 1 for a in answers)  # temperature 1: the samples differ
    # one repeat is repeat 0 of the three: every answer from the cache, none generated
    again = mlflow.get_run(stages.evaluate(compose_cfg("evaluate", sampled)))
    assert again.data.metrics["answers_generated"] == 0
    assert "repeats/n" not in again.data.metrics
    rows = [
        json.loads(line)
        for line in mlflow.artifacts.load_text(
            f"runs:/{again.info.run_id}/per_item.jsonl"
        ).splitlines()
    ]
    assert [r["prediction"] for r in rows] == [a[0] for a in answers]


def test_report_shows_the_within_item_spread_of_sampled_configs():
    ci = {"rougeL_f1": {"mean": 0.21, "low": 0.18, "high": 0.24}}
    runs = [
        {"label": "vanilla", "metrics": {"rougeL_f1": 0.2}, "ci": ci},
        {
            "label": "rag",
            "metrics": {
                "repeats/n": 3.0,
                "repeats/rougeL_f1_sd": 0.0512,
                "repeats/token_f1_sd": 0.07,
            },
            "ci": ci,
        },
    ]
    text = to_markdown(repeats_section(runs, "rougeL_f1"))
    assert "Sampling repeats" in text
    assert "| rag | 3 | 0.0512 | 0.0700 | 0.2100 [0.1800, 0.2400] |" in text
    assert "vanilla" not in text
    assert repeats_section(runs[:1], "rougeL_f1") == []


def test_predictions_rows_round_trip_their_repeat_fields():
    row = EvalRow(item_id="a", question="q", reference="r", prediction="p", repeat=0)
    pooled = EvalRow.from_dict({**row.to_dict(), "repeat_answers": ["p2", "p3"]})
    assert pooled.repeat == 0 and pooled.repeat_answers == ("p2", "p3")
