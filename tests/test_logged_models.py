"""Adapters as MLflow 3 logged models, read back from a real SQLite store through MLflow's client.

One tiny training (16 rows, one epoch) and three evaluations on the tiny slice: vanilla, LoRA
and RAG+LoRA over the same adapter. The three evaluate runs are then nested under a parent run
as a sweep's jobs are, and the sweep's end (`hydra_callbacks.finish_sweep`, what the multirun
callback calls after the report) describes the parent and registers the best adapter.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from qa_lab import hydra_callbacks, keys, logged_models, stages, tracking
from qa_lab.cache import read_manifest
from qa_lab.config import to_dict
from qa_lab.errors import QaLabError
from tests.conftest import MODELS_DIR, TINY_RUN, compose_cfg, write_small_source

pytestmark = pytest.mark.slow
REGISTERED = "qa-lab-test-best"
CONFIGS = {
    "vanilla": [],
    "lora": ["model=lora"],
    "rag_lora": ["model=lora", "retriever=faiss", "retriever.k=2"],
}


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return [
        f"paths.cache={tmp / 'cache'}",
        f"paths.models={MODELS_DIR}",
        f"paths.mlruns={tmp / 'mlruns'}",
        f"dataset.source={tmp / 'small.jsonl'}",
        *TINY_RUN,
        "metrics=lexical",
        *extra,
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> SimpleNamespace:
    """The store after one training, three evaluations and the sweep's end."""
    tmp = tmp_path_factory.mktemp("logged_models")
    write_small_source(tmp / "small.jsonl")
    cfgs = {
        name: compose_cfg("evaluate", _overrides(tmp, *extra)) for name, extra in CONFIGS.items()
    }
    runs = {name: stages.evaluate(cfg) for name, cfg in cfgs.items()}
    lora_cfg = cfgs["lora"]
    experiment_id = tracking.configure(lora_cfg.tracking)
    parent = tracking.create_parent_run(
        lora_cfg.tracking, "sweep-test", {"stage": "evaluate_sweep"}
    )
    client = MlflowClient()
    for run_id in runs.values():
        client.set_tag(run_id, "mlflow.parentRunId", parent)
    sweep_cfg = compose_cfg("evaluate", _overrides(tmp, f"tracking.register={REGISTERED}"))
    hydra_callbacks.finish_sweep(sweep_cfg, parent)
    adapter, train_key = stages.adapter_for(lora_cfg)
    trains = mlflow.search_runs(
        [experiment_id], filter_string="tags.`qa_lab.stage` = 'train'", output_format="list"
    )
    assert len(trains) == 1  # one training: the RAG+LoRA config reused the cached adapter
    data_folder, _ = stages.dataset_folder(lora_cfg)
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    return SimpleNamespace(
        tmp=tmp,
        cfgs=cfgs,
        runs={name: client.get_run(run_id) for name, run_id in runs.items()},
        parent=client.get_run(parent),
        train=client.get_run(trains[0].info.run_id),
        data=read_manifest(data_folder),
        adapter=adapter,
        train_key=train_key,
        models={m.tags[logged_models.KIND_TAG]: m for m in models},
        all_models=models,
    )


def test_train_run_logs_its_adapter_as_one_logged_model(study):
    assert sorted(m.tags[logged_models.KIND_TAG] for m in study.all_models) == ["adapter", "base"]
    model = study.models["adapter"]
    assert model.status == LoggedModelStatus.READY
    assert model.source_run_id == study.train.info.run_id
    assert model.tags[logged_models.KEY_TAG] == study.train_key
    assert model.model_type == "peft-lora-adapter"
    manifest = read_manifest(study.adapter)
    assert model.params == {
        "base_model": "SmolLM2-135M-Instruct",
        "base_model_key": manifest["model"],
        "train_key": study.train_key,
        "data_key": manifest["data_key"],
    }
    losses = {m.key: m for m in model.metrics if m.run_id == study.train.info.run_id}
    summary = manifest["summary"]
    assert losses["final_train_loss"].value == pytest.approx(summary["final_train_loss"])
    assert losses["final_val_loss"].value == pytest.approx(summary["final_val_loss"])
    outputs = study.train.outputs.model_outputs
    assert [o.model_id for o in outputs] == [model.model_id]


def test_logged_model_holds_the_adapter_folder_only(study):
    model = study.models["adapter"]
    files = {
        a.path: a.file_size for a in MlflowClient().list_logged_model_artifacts(model.model_id)
    }
    local = {p.name: p.stat().st_size for p in study.adapter.iterdir() if p.is_file()}
    assert files == local
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    # SmolLM2-135M's fp32 weights are ~540 MB; a rank-8 adapter is a few MB
    assert files["adapter_model.safetensors"] < 20e6


def test_lora_evaluate_runs_link_their_metrics_and_traces_to_the_adapter(study):
    model = study.models["adapter"]
    lora_runs = {study.runs[n].info.run_id for n in ("lora", "rag_lora")}
    linked = {m.run_id for m in model.metrics if m.key == "rougeL_f1"}
    assert linked == lora_runs
    for name in ("lora", "rag_lora"):
        run = study.runs[name]
        assert run.data.tags["qa_lab.logged_model"] == model.model_id
        by_run = {m.key: m.value for m in model.metrics if m.run_id == run.info.run_id}
        assert by_run["rougeL_f1"] == pytest.approx(run.data.metrics["rougeL_f1"])
        # the model is the run's input once, not once per metrics call
        assert [i.model_id for i in run.inputs.model_inputs] == [model.model_id]
    traces = mlflow.search_traces(
        locations=[study.train.info.experiment_id], model_id=model.model_id, return_type="list"
    )
    assert len(traces) == 12  # 6 items in each of the two LoRA runs


def test_vanilla_run_links_to_a_base_model_entry_without_weights(study):
    base = study.models["base"]
    run = study.runs["vanilla"]
    assert base.tags[logged_models.KEY_TAG] == keys.model_id(to_dict(study.cfgs["vanilla"].llm))
    assert base.params["base_model"] == "SmolLM2-135M-Instruct"
    assert base.params["dtype"] == str(study.cfgs["vanilla"].llm.dtype)
    assert {m.run_id for m in base.metrics} == {run.info.run_id}
    artifacts = [a.path for a in MlflowClient().list_logged_model_artifacts(base.model_id)]
    assert artifacts == ["MLmodel"]  # an external model: its spec file, no weights


def test_models_uris_load_the_same_adapter_and_bad_ones_are_one_line(study):
    model_id = study.models["adapter"].model_id
    for uri in (f"models:/{model_id}", f"models:/{REGISTERED}@best"):
        cfg = compose_cfg("evaluate", _overrides(study.tmp, "model=lora", f"model.adapter={uri}"))
        folder, key = stages.adapter_for(cfg)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (folder / name).read_bytes() == (study.adapter / name).read_bytes(), uri
        assert key.startswith("given:")
    for uri in ("models:/m-0000000000", f"models:/{REGISTERED}@nope"):
        cfg = compose_cfg("evaluate", _overrides(study.tmp, "model=lora", f"model.adapter={uri}"))
        with pytest.raises(QaLabError) as err:
            stages.adapter_for(cfg)
        assert str(err.value).startswith(f"{uri}: cannot download") and "\n" not in str(err.value)


def test_sweep_registers_its_best_adapter_with_alias_best(study):
    client = MlflowClient()
    version = client.get_model_version_by_alias(REGISTERED, "best")
    model_id = study.models["adapter"].model_id
    assert version.source == f"models:/{model_id}"  # the SQLite registry leaves model_id empty
    assert logged_models.resolve(f"models:/{REGISTERED}@best") == model_id
    scores = {n: study.runs[n].data.metrics["rougeL_f1"] for n in ("lora", "rag_lora")}
    best = study.runs[max(scores, key=scores.get)]
    assert best.info.run_name in version.description and "rougeL_f1" in version.description


def test_runs_describe_themselves_and_name_their_datasets(study):
    data = study.data
    key8 = data["key"][:8]
    notes = {n: r.data.tags["mlflow.note.content"] for n, r in study.runs.items()}
    assert notes["vanilla"] == f"vanilla: SmolLM2-135M-Instruct; closed-book; dataset {key8} (test)"
    assert notes["rag_lora"].startswith(
        f"rag_lora: SmolLM2-135M-Instruct + LoRA {study.train_key} (knowledge=qa); "
        "retriever faiss k=2 over corpus "
    )
    assert study.train.data.tags["mlflow.note.content"].startswith("LoRA SFT of SmolLM2-135M")

    def inputs(run) -> dict[str, str]:
        return {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}

    test_input = {f"test-{key8}": data["files"]["test.jsonl"][:36]}
    for run in study.runs.values():
        assert inputs(run) == test_input
    assert inputs(study.train) == {
        f"train-{key8}": data["files"]["train.jsonl"][:36],
        f"val-{key8}": data["files"]["val.jsonl"][:36],
    }
    assert inputs(study.parent) == test_input
    lines = study.parent.data.tags["mlflow.note.content"].splitlines()
    assert lines[0] == "3 configs by rougeL_f1 (mean [95% CI]), best first:"
    ranked = [float(line.split(": ")[1].split(" ")[0]) for line in lines[1:4]]
    assert ranked == sorted(ranked, reverse=True)
    labels = {line.split(": ")[0].removeprefix("- ") for line in lines[1:4]}
    assert labels == {r.info.run_name.removeprefix("evaluate-") for r in study.runs.values()}


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"register": "a/b"}, "tracking.register='a/b': expected a registered model name"),
        ({"register": ""}, "tracking.register='': expected a registered model name"),
        ({"rank_by": "rouge L"}, "tracking.rank_by='rouge L': expected a metric name"),
    ],
)
def test_bad_registration_settings_are_one_line_errors(node, message):
    with pytest.raises(QaLabError, match=message.replace("[", r"\[")):
        logged_models.check_registration(node)
