"""Hydra/OmegaConf glue: the project root resolver, plain-dict views, variant names, redaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "password")

if not OmegaConf.has_resolver("qa_lab_root"):
    OmegaConf.register_new_resolver("qa_lab_root", lambda: str(PROJECT_ROOT))


def to_dict(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolve interpolations and return plain Python containers (the hashable view)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def variant_name(cfg: DictConfig) -> str:
    """The variant is derived, never set by hand: vanilla, rag, lora or rag_lora."""
    tuned = cfg.model.kind == "lora"
    rag = cfg.retriever.kind != "none" and int(cfg.retriever.k) > 0
    return {(False, False): "vanilla", (True, False): "rag", (False, True): "lora"}.get(
        (rag, tuned), "rag_lora"
    )


def is_secret_key(key: str) -> bool:
    """Keys that hold secrets; `*_env` keys only name an environment variable and stay."""
    low = key.lower()
    return not low.endswith("_env") and any(marker in low for marker in SECRET_MARKERS)


def redact(obj: Any) -> Any:
    """Copy of a config tree with every secret-looking value replaced, for logging."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a nested config, for MLflow params."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}
