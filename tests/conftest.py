"""Shared fixtures: real configs composed from conf/, real embedded models, temp stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from qa_lab.config import PROJECT_ROOT

SHARED_REFERENCE = PROJECT_ROOT.parent / "shared" / "reference" / "rag-technical-qa"
# Materialised embedded models are shared across test sessions (the same folder `make run`
# uses): materialising SmolLM2 from its GGUF takes ~40 s and the result is keyed by version.
MODELS_DIR = PROJECT_ROOT / ".cache" / "models"
SEEDS = PROJECT_ROOT / "data" / "seed" / "cs_interview.jsonl"
# The tiny end-to-end run the slow tests share: no synthesis, 6 test items, short answers,
# a one-epoch adapter on 16 rows, RAG over the training pairs and an SFT without continued
# pretraining (embedding the shipped corpus's ~580 chunks and a pass over them would be most of
# each test's time; tests/test_corpus.py runs those). Tests append their own deltas (the last
# value of a key wins in Hydra's override list).
TINY_RUN = [
    "corpus=train_qa",
    "++model.knowledge=qa",
    "dataset.synthesis.backend=none",
    "eval.limit=6",
    "eval.train_sample=0",
    "generation.max_new_tokens=24",
    "metrics.bootstrap.resamples=200",
    "++model.max_train_rows=16",
    "++model.epochs=1",
]


def compose_cfg(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a primary config exactly as the script would, with overrides."""
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


@pytest.fixture
def store(tmp_path: Path) -> list[str]:
    """Overrides that send caches and the MLflow store to a temp dir (models stay shared)."""
    return [
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.models={MODELS_DIR}",
        f"paths.mlruns={tmp_path / 'mlruns'}",
    ]


def write_small_source(path: Path) -> Path:
    """Every fifth shipped seed row, 50 in all: five topics, distinct questions, no synthesis."""
    from qa_lab.jsonl import read_jsonl, write_jsonl

    write_jsonl(path, [r for i, r in enumerate(read_jsonl(SEEDS)) if i % 5 == 0][:50])
    return path


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    """A 50-row slice of the shipped seeds as a dataset source file."""
    return write_small_source(tmp_path / "small.jsonl")


@pytest.fixture(scope="session")
def llm_cfg() -> DictConfig:
    """The default (embedded) LLM config."""
    return compose_cfg("evaluate").llm


@pytest.fixture(scope="session")
def tokenizer(llm_cfg: DictConfig):
    from qa_lab import models

    return models.load_tokenizer(llm_cfg, MODELS_DIR)


@pytest.fixture(scope="session")
def base_model(llm_cfg: DictConfig):
    from qa_lab import models

    return models.load_llm(llm_cfg, MODELS_DIR)


# Fixtures whose tests load the embedded LLM, run a stage end to end or serve a model: such a
# test takes 5-90 s on 2 cores (the full suite's --durations), so `make test-fast` (-m "not
# slow": 2.4 min without them on 2 cores, measured) leaves them to `make test`, which runs all.
HEAVY_FIXTURES = {"base_model", "tokenizer", "small_source", "served", "docs", "trained"}
# Heavy tests without those fixtures (each measured over 3 s in the full suite or the tier).
HEAVY_TESTS = {
    "test_report_from_a_logged_sweep_states_verdict_power_and_cost",
    "test_the_verdict_changes_with_the_data",
    "test_index_keys_follow_settings_and_corpus_never_k",
    "test_semantic_dedup_equals_naive_with_planted_duplicates",
    "test_score_predictions_file_and_bad_rows",
    "test_leakage_audit",
    "test_traces_carry_gold_flags_and_chunk_metadata",
    "test_adapter_stays_unmerged_on_a_quantized_base",
    "test_reranking_reorders_by_cross_encoder_scores",
    "test_train_key_follows_upstream_prompt_and_retrieval",
    "test_unavailable_hub_model_is_one_line_error",
    "test_train_run_logs_its_adapter_as_one_logged_model",
    "test_reproduce_original_preset_matches_the_reference",
    "test_each_preprocessing_step_matches_the_reference",
    "test_bad_corpus_is_one_line_error_from_the_script",
    "test_two_evaluate_runs_publish_paired_item_traces",
    "test_report_page_reads_well_in_chromium_at_1280_px",
    "test_synthesize_from_corpus_with_the_embedded_model",
    "test_synthesize_with_the_embedded_model_caches_and_keeps_lineage",
    "test_dataset_synthesised_from_the_corpus_without_a_qa_file",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the heavy tests slow (see HEAVY_FIXTURES, HEAVY_TESTS)."""
    for item in items:
        name = getattr(item, "originalname", item.name)
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or name in HEAVY_TESTS:
            item.add_marker(pytest.mark.slow)
