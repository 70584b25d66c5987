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


def test_adapter_stays_unmerged_on_a_quantized_base(llm_cfg, tmp_path):
    """Merging would round the LoRA delta away in 4-bit weights: the wrapper runs as is."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(models.load_llm(llm_cfg, MODELS_DIR), lora).save_pretrained(tmp_path)
    flagged = models.load_llm(llm_cfg, MODELS_DIR)
    flagged.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets
    kept = models.with_adapter(flagged, tmp_path)
    assert isinstance(kept, PeftModel) and any("lora_" in n for n, _ in kept.named_parameters())
    merged = models.with_adapter(models.load_llm(llm_cfg, MODELS_DIR), tmp_path)
    assert not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert models.merges_adapter(_llm()) and not models.merges_adapter(_llm(load_in_4bit=True))


def test_cuda_device_without_cuda_is_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(QaLabError, match=r"llm.device=cuda:1 but no CUDA device"):
        models.pick_device("cuda:1")
    assert models.pick_device("cpu") == "cpu"
