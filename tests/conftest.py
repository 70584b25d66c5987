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
