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
