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


@pytest.mark.parametrize("launcher", ["submitit_slurm_cluster", "submitit_slurm_local"])
def test_slurm_launchers_compose_to_the_resumable_launcher(launcher: str):
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    conf = cfg.hydra.launcher
    # the class Hydra instantiates: qa-lab's, importable, and still the plugin's SLURM launcher
    # (by name: Hydra's plugin scan re-executes plugin modules, so class objects can differ)
    plugin = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert plugin in {f"{c.__module__}.{c.__qualname__}" for c in get_class(conf._target_).mro()}
    assert conf._target_ == "hydra_plugins.qa_lab_launcher.ResumableSlurmLauncher"
    assert conf.submitit_folder.endswith("/.submitit/%j")  # job logs in the sweep folder
    assert conf.max_num_timeout == 0 and conf.setup == ["export HF_HUB_OFFLINE=1"]
    local = launcher == "submitit_slurm_local"
    assert (conf.gpus_per_node, conf.cpus_per_task) == ((None, 1) if local else (1, 8))


@pytest.mark.parametrize("option", _options("llm"))
def test_llm_options_take_the_server_keys_from_one_file(option: str):
    shared = OmegaConf.load(CONF / "llm_server" / "openai.yaml")
    own = OmegaConf.load(CONF / "llm" / f"{option}.yaml")
    llm = compose_cfg("evaluate", [f"llm={option}"]).llm
    assert set(shared) <= set(llm)
    # an option restates only what differs for it (mistral: a larger concurrency)
    assert all(own[k] != shared[k] for k in set(own) & set(shared))
