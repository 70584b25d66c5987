"""End to end on a small slice: real embedded models, real FAISS, a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from qa_lab import datastore, stages
from qa_lab.errors import QaLabError
from qa_lab.jsonl import read_jsonl, write_jsonl
from tests.conftest import TINY_RUN, compose_cfg


def _data_overrides(store: list[str], source: Path) -> list[str]:
    return [*store, f"dataset.source={source}", "dataset.synthesis.backend=none"]


def _overrides(store: list[str], source: Path, *extra: str) -> list[str]:
    return [
        *store,
        f"dataset.source={source}",
        *TINY_RUN,
        "eval.train_sample=4",
        "metrics.bertscore.baseline_pairs=100",
        *extra,
    ]


def _runs(cfg, stage: str):
    mlflow.set_tracking_uri(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    return mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`qa_lab.stage` = '{stage}'", output_format="list"
    )


def test_dataset_stage_builds_once_and_logs(store, small_source, capsys):
    cfg = compose_cfg("build_dataset", _data_overrides(store, small_source))
    stages.build_dataset_main(cfg)
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((folder / "manifest.json").read_text())
    n = sum(manifest["counts"][s] for s in ("train", "val", "test"))
    assert n == manifest["counts"]["after_semantic_dedup"] == 50
    train_ids = {r["id"] for r in read_jsonl(folder / "train.jsonl")}
    test_ids = {r["id"] for r in read_jsonl(folder / "test.jsonl")}
    assert not train_ids & test_ids
    mtime = (folder / "manifest.json").stat().st_mtime
    stages.build_dataset_main(cfg)  # reuse: nothing rebuilt, no second run
    assert (folder / "manifest.json").stat().st_mtime == mtime
    runs = _runs(cfg, "dataset")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["count/loaded"] == 50
    assert {i.dataset.name.split("-")[0] for i in run.inputs.dataset_inputs} == {
        "train",
        "val",
        "test",
    }
    assert run.data.tags["qa_lab.key"] == manifest["key"]
    assert "dataset.source" in run.data.params


def test_evaluate_vanilla_and_rag(store, small_source):
    cfg = compose_cfg("evaluate", _overrides(store, small_source))
    stages.evaluate(cfg)
    rag = compose_cfg(
        "evaluate", _overrides(store, small_source, "retriever=faiss", "retriever.k=2")
    )
    stages.evaluate(rag)
    runs = {r.data.tags["qa_lab.variant"]: r for r in _runs(cfg, "evaluate")}
    assert set(runs) == {"vanilla", "rag"}
    for run in runs.values():
        m = run.data.metrics
        for name in (
            "bleu",
            "rougeL_f1",
            "bertscore_f1",
            "bertscore_f1_raw",
            "exact_match",
            "token_f1",
        ):
            assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
        assert 0 <= m["runaway_rate"] <= 1 and 0 <= m["truncation_rate"] <= 1
        assert any(k.startswith("topic/") for k in m)
        items = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/per_item.jsonl").splitlines()
        assert len(items) == 6
    rag_items = [
        json.loads(x)
        for x in mlflow.artifacts.load_text(
            f"runs:/{runs['rag'].info.run_id}/per_item.jsonl"
        ).splitlines()
    ]
    assert all(len(it["retrieved"]) == 2 for it in rag_items)
    assert all("<passage 1>" in it["prompt"] for it in rag_items)
    assert "retrieval_best_rougeL" in runs["rag"].data.metrics
    tags = runs["rag"].data.tags
    assert tags["qa_lab.git_sha"] and tags["qa_lab.version.torch"] and tags["qa_lab.version.trl"]
    assert runs["rag"].data.params["retriever.k"] == "2"
    config = json.loads(
        mlflow.artifacts.load_text(f"runs:/{runs['rag'].info.run_id}/config/config.json")
    )
    assert config["retriever"]["k"] == 2
    assert (
        runs["rag"].data.tags["qa_lab.eval_set_hash"]
        == runs["vanilla"].data.tags["qa_lab.eval_set_hash"]
    )


def _artifact_rows(run, path: str) -> list[dict]:
    return [
        json.loads(x)
        for x in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{path}").splitlines()
    ]


def test_evaluate_scores_train_sample_copy_rate_and_near_duplicates(store, small_source):
    """Issue 12's evidence: closed-book train sample, copy rate, near-dup split, leakage audit."""
    for extra in ((), ("retriever=faiss", "retriever.k=2")):
        cfg = compose_cfg("evaluate", _overrides(store, small_source, *extra))
        stages.evaluate(cfg)
    runs = {r.data.tags["qa_lab.variant"]: r for r in _runs(cfg, "evaluate")}
    folder, _ = stages.dataset_folder(cfg)
    train_ids = {r["id"] for r in read_jsonl(folder / "train.jsonl")}
    samples = {v: _artifact_rows(run, "train_sample/per_item.jsonl") for v, run in runs.items()}
    for variant, run in runs.items():
        m = run.data.metrics
        assert m["train_sample/n"] == 4
        low, mean, high = (m[f"train_sample/rougeL_f1{s}"] for s in ("_ci_low", "", "_ci_high"))
        assert low <= mean <= high
        # closed-book: no passages, even in the RAG run, and only training items
        assert all(not r["retrieved"] and "<passage" not in r["prompt"] for r in samples[variant])
        assert {r["item_id"] for r in samples[variant]} <= train_ids
        items = _artifact_rows(run, "per_item.jsonl")
        assert all(0 <= it["nearest_train_cosine"] <= 1.0001 for it in items)
        assert all(it["near_dup"] == (it["nearest_train_cosine"] >= 0.8) for it in items)
        split_n = m.get("near_dup/n", 0) + m.get("not_near_dup/n", 0)
        assert split_n == 6
        assert m["leakage/n_test"] == len(read_jsonl(folder / "test.jsonl"))
    # same seeded sample, same closed-book prompts: the RAG run reuses the vanilla answers
    assert [r["item_id"] for r in samples["rag"]] == [r["item_id"] for r in samples["vanilla"]]
    assert [r["prediction"] for r in samples["rag"]] == [
        r["prediction"] for r in samples["vanilla"]
    ]
    assert all(r["cached"] for r in samples["rag"])
    assert 0 <= runs["rag"].data.metrics["copy_rate"] <= 1
    assert "copy_rate" not in runs["vanilla"].data.metrics


def test_retriever_k_zero_builds_the_no_retrieval_prompt(store, small_source):
    from qa_lab import models, prompts

    none_cfg = compose_cfg("evaluate", _overrides(store, small_source))
    zero_cfg = compose_cfg(
        "evaluate", _overrides(store, small_source, "retriever=faiss", "retriever.k=0")
    )
    folder = stages.build_dataset(none_cfg)
    items = datastore.read_split(folder, "test")[:3]
    tok = models.load_tokenizer(none_cfg.llm, none_cfg.paths.models)
    texts = []
    for cfg in (none_cfg, zero_cfg):
        kb = stages.corpus_for(cfg, folder)
        passages = stages.corpus.retriever_for(cfg, kb).search([it.question for it in items])
        texts.append(
            [
                prompts.render_prompt(
                    tok,
                    prompts.build_messages(
                        it.question,
                        ps,
                        system=cfg.prompt.system,
                        context_header=cfg.prompt.context_header,
                    ),
                )
                for it, ps in zip(items, passages)
            ]
        )
    assert texts[0] == texts[1]


def test_retriever_k_larger_than_index_is_one_line_error(store, small_source):
    cfg = compose_cfg(
        "evaluate", _overrides(store, small_source, "retriever=faiss", "retriever.k=5000")
    )
    with pytest.raises(QaLabError, match="retriever.k=5000"):
        stages.evaluate(cfg)


def test_unknown_metric_group_is_one_line_error(store, small_source):
    cfg = compose_cfg("evaluate", _overrides(store, small_source, "metrics.groups=[lexical,bogus]"))
    with pytest.raises(QaLabError, match="metrics.groups"):
        stages.evaluate(cfg)


def test_score_predictions_file_and_bad_rows(store, tmp_path):
    good = tmp_path / "preds.jsonl"
    write_jsonl(
        good,
        [
            {
                "question": "What is a stack?",
                "prediction": "A LIFO structure.",
                "reference": "A LIFO structure.",
            },
            {
                "question": "What is TCP?",
                "prediction": "A protocol.\nQuestion: what is UDP?",
                "reference": "A reliable transport protocol.",
            },
        ],
    )
    cfg = compose_cfg("evaluate", [*store, f"predictions={good}", "metrics=original"])
    stages.evaluate_main(cfg)
    run = _runs(cfg, "evaluate")[0]
    assert run.data.metrics["exact_match"] == pytest.approx(0.5)
    assert run.data.metrics["runaway_rate"] == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "prediction": "p", "reference": "r"}\n{"question": "q"}\n')
    cfg = compose_cfg("evaluate", [*store, f"predictions={bad}", "metrics=lexical"])
    with pytest.raises(QaLabError, match=r"bad.jsonl:2: .*prediction"):
        stages.evaluate_main(cfg)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "prediction": "p", "reference": "r"}\n{not json\n')
    cfg = compose_cfg("evaluate", [*store, f"predictions={broken}", "metrics=lexical"])
    with pytest.raises(QaLabError, match=r"broken.jsonl:2: malformed JSON"):
        stages.evaluate_main(cfg)


def test_output_dir_and_mismatch(store, small_source, tmp_path, capsys):
    out = tmp_path / "my_dataset"
    cfg = compose_cfg("build_dataset", [*_data_overrides(store, small_source), f"output_dir={out}"])
    stages.build_dataset_main(cfg)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "manifest.json").is_file() and (out / "test.jsonl").is_file()
    other = compose_cfg(
        "build_dataset",
        [*_data_overrides(store, small_source), f"output_dir={out}", "dataset.split.seed=7"],
    )
    with pytest.raises(QaLabError, match="another config"):
        stages.build_dataset_main(other)


def test_missing_adapter_and_wrong_model_are_one_line_errors(store, small_source, tmp_path):
    cfg = compose_cfg(
        "evaluate",
        _overrides(store, small_source, "model=lora", f"model.adapter={tmp_path / 'nothing'}"),
    )
    with pytest.raises(QaLabError, match=r"model.adapter=.*adapter_config.json"):
        stages.evaluate(cfg)
    with pytest.raises(QaLabError, match="train.py trains model=lora"):
        stages.train_main(
            compose_cfg("train", [*_data_overrides(store, small_source), "model=vanilla"])
        )
