"""Every option of every config group composes with every primary config that uses it."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from qa_lab.config import PROJECT_ROOT, redact, variant_name
from tests.conftest import compose_cfg

CONF = PROJECT_ROOT / "conf"
PRIMARY = {"build_dataset": ["dataset", "embedder", "tracking", "paths"]}
PRIMARY["train"] = PRIMARY["build_dataset"] + ["llm", "model", "retriever", "prompt"]
PRIMARY["evaluate"] = PRIMARY["train"] + ["metrics"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("primary", "group", "option"),
    [(p, g, o) for p, groups in PRIMARY.items() for g in groups for o in _options(g)],
)
def test_every_option_composes(primary: str, group: str, option: str):
    cfg = compose_cfg(primary, [f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert group in resolved
    assert Path(cfg.paths.root) == PROJECT_ROOT


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment: str):
    overrides = [f"+experiment={experiment}"]
    primary = "build_dataset" if experiment == "reproduce_original" else "evaluate"
    if experiment == "reproduce_original":
        overrides.append("dataset.source=/tmp/x.jsonl")
    cfg = compose_cfg(primary, overrides)
    assert cfg.dataset.source


def test_no_yaml_booleans_as_option_names():
    for path in CONF.rglob("*.yaml"):
        assert path.stem.lower() not in {"on", "off", "yes", "no", "true", "false"}, path


def test_unknown_option_is_a_hydra_error():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("evaluate", ["model=bogus"])


def test_variant_is_derived():
    assert variant_name(compose_cfg("evaluate")) == "vanilla"
    assert variant_name(compose_cfg("evaluate", ["retriever=faiss"])) == "rag"
    assert variant_name(compose_cfg("evaluate", ["model=lora"])) == "lora"
    assert variant_name(compose_cfg("evaluate", ["model=lora", "retriever=faiss"])) == "rag_lora"
    assert variant_name(compose_cfg("evaluate", ["retriever=faiss", "retriever.k=0"])) == "vanilla"


def test_secrets_are_redacted_but_env_names_kept():
    out = redact(
        {"synthesis": {"api_key": "sk-123", "api_key_env": "OPENAI_API_KEY"}, "hf_token": "t"}
    )
    assert out == {
        "synthesis": {"api_key": "***", "api_key_env": "OPENAI_API_KEY"},
        "hf_token": "***",
    }
