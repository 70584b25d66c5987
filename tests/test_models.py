from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qa_lab import models
from qa_lab.errors import QaLabError
from tests.conftest import MODELS_DIR


def _llm(**kw):
    base = {
        "name": "SmolLM2-135M-Instruct",
        "revision": None,
        "dtype": "float32",
        "device": "cpu",
        "load_in_4bit": False,
    }
    return OmegaConf.create({**base, **kw})


def test_embedded_models_resolve_to_local_folders():
    path = Path(models.resolve_llm_path("SmolLM2-135M-Instruct", MODELS_DIR))
    assert (path / "model.safetensors").is_file() and (path / "manifest.json").is_file()
    assert Path(models.resolve_embedder_path("all-MiniLM-L6-v2")).is_dir()


def test_materialised_model_has_no_quantizer_flag(base_model):
    assert not getattr(base_model, "is_quantized", False)
    assert getattr(base_model.config, "quantization_config", None) is None


def test_unavailable_hub_model_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QaLabError, match=r"no-such-org/no-such-model.*local folder"):
        models.load_tokenizer(_llm(name="no-such-org/no-such-model"), MODELS_DIR)


def test_missing_local_folder_and_bad_dtype():
    with pytest.raises(QaLabError, match="folder not found"):
        models.resolve_llm_path("/nonexistent/model", MODELS_DIR)
    with pytest.raises(QaLabError, match="llm.dtype"):
        models.load_llm(_llm(dtype="float99"), MODELS_DIR)


def test_missing_adapter_is_one_line_error(base_model, tmp_path):
    with pytest.raises(QaLabError, match="adapter_config.json"):
        models.load_adapter(base_model, tmp_path)
