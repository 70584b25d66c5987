"""The script boundary: every config value a script reads is checked before any stage work.

`train.py model=lora model.learning_rate=abc` used to build the whole dataset and then end in a
`ValueError` traceback from inside the trainer. Each script now calls `check(cfg, script)` right
after Hydra composes the config: it builds the typed options of every group that script (or its
mode) reads, through `qa_lab.checks`, so a bad number, choice or path is one line naming the
dotted key (exit 2 through `errors.cli_errors`) and nothing has been read, built or logged yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from qa_lab import checks
from qa_lab.errors import QaLabError, require_choice

# --------------------------------------------------------------------------- groups


def _seed(cfg: DictConfig) -> None:
    checks.whole(cfg.seed, "seed")


def _paths(cfg: DictConfig) -> None:
    for name in ("root", "cache", "models", "mlruns"):
        checks.text(cfg.paths[name], f"paths.{name}")


def _dataset(cfg: DictConfig) -> None:
    from qa_lab.dataset import DatasetOptions

    DatasetOptions.from_cfg(cfg.dataset)
    checks.text(cfg.get("output_dir"), "output_dir", optional=True)


def _embedder(cfg: DictConfig) -> None:
    checks.text(cfg.embedder.name, "embedder.name")
    checks.whole(cfg.embedder.batch_size, "embedder.batch_size", low=1)


def _corpus(cfg: DictConfig) -> None:
    from qa_lab.corpus import CorpusOptions

    CorpusOptions.from_cfg(cfg.corpus)


def _chunking(cfg: DictConfig) -> None:
    from qa_lab.corpus import ChunkingOptions

    ChunkingOptions.from_cfg(cfg.chunking)


def _tracking(cfg: DictConfig) -> None:
    """The store's keys; a server's reachability is checked by `tracking.check_server`."""
    node = cfg.tracking
    checks.text(node.uri, "tracking.uri")
    checks.text(node.experiment, "tracking.experiment")
    checks.flag(node.traces, "tracking.traces")
    for name in ("rank_by", "register"):  # a metric name; a registered model's name
        checks.text(node.get(name), f"tracking.{name}", optional=True)
    for name, value in (node.get("retry") or {}).items():
        checks.whole(value, f"tracking.retry.{name}", low=0)


def _llm(cfg: DictConfig) -> None:
    from qa_lab.generation import LlmOptions

    LlmOptions.from_cfg(cfg.llm)


def _model(cfg: DictConfig) -> None:
    """`model.kind`; for model=lora every training key, and `model.cpt` when it is read."""
    if require_choice("model.kind", cfg.model.kind, ("vanilla", "lora")) == "vanilla":
        return
    from qa_lab.cpt import cpt_options
    from qa_lab.training import lora_options

    if lora_options(cfg.model).knowledge != "qa":
        cpt_options(cfg.model)


def _retriever(cfg: DictConfig) -> None:
    """What `retrieval.make_retriever` reads, before any index is built (and `k` >= 0)."""
    from qa_lab import retrieval

    retrieval.retriever_settings(cfg.retriever)


def _prompt(cfg: DictConfig) -> None:
    from qa_lab.prompts import PromptOptions

    PromptOptions.from_cfg(cfg.prompt)


def _generation(cfg: DictConfig) -> None:
    from qa_lab.generation import GenerationOptions

    GenerationOptions.from_cfg(cfg.generation, checks.whole(cfg.seed, "seed"))


def _eval(cfg: DictConfig) -> None:
    from qa_lab.stages.evaluate import EvalOptions

    EvalOptions.from_cfg(cfg.eval)


def _metrics(cfg: DictConfig) -> None:
    """`metrics` (and `metrics.judge` when the judge group runs)."""
    from qa_lab.judge import JudgeOptions
    from qa_lab.metrics import MetricsOptions

    opts = MetricsOptions.from_cfg(cfg.metrics)
    if "judge" in opts.groups:
        JudgeOptions.from_cfg(cfg.metrics.get("judge"))


def _predictions(cfg: DictConfig) -> None:
    checks.existing_path(cfg.predictions, "predictions")


GROUPS: dict[str, Callable[[DictConfig], None]] = {
    "seed": _seed,
    "paths": _paths,
    "dataset": _dataset,
    "embedder": _embedder,
    "corpus": _corpus,
    "chunking": _chunking,
    "tracking": _tracking,
    "llm": _llm,
    "model": _model,
    "retriever": _retriever,
    "prompt": _prompt,
    "generation": _generation,
    "eval": _eval,
    "metrics": _metrics,
    "predictions": _predictions,
}
_DATASET = ("seed", "paths", "dataset", "embedder", "corpus", "chunking", "tracking")
_TRAIN = (*_DATASET, "llm", "model", "retriever", "prompt")
# What each script reads, by mode: `evaluate.py report=ID` reads the store and the bootstrap
# settings only; `evaluate.py predictions=FILE` scores a file, with no dataset, LLM or index.
READS: dict[str, tuple[str, ...]] = {
    "build_dataset": _DATASET,
    "train": _TRAIN,
    "evaluate": (*_TRAIN, "generation", "eval", "metrics"),
    "evaluate:predictions": ("seed", "paths", "embedder", "tracking", "metrics", "predictions"),
    "evaluate:report": ("paths", "tracking", "metrics"),
}


def mode(cfg: DictConfig, script: str) -> str:
    """The entry of `READS` a script's config runs as (evaluate.py has three modes)."""
    if script not in ("build_dataset", "train", "evaluate"):
        raise ValueError(f"unknown script {script!r}")
    if script == "evaluate" and cfg.get("report"):
        return "evaluate:report"
    if script == "evaluate" and cfg.get("predictions"):
        return "evaluate:predictions"
    return script


def _sources(cfg: DictConfig, run: str) -> None:
    """The inputs a run reads exist: the QA file, the corpus files, a given adapter folder."""
    if run.startswith("evaluate:"):
        return
    lora = run != "build_dataset" and cfg.model.kind == "lora"
    adapter = cfg.model.get("adapter") if lora else None
    if cfg.dataset.source and not (run == "train" and adapter):
        checks.existing_path(cfg.dataset.source, "dataset.source")
    if adapter and ":/" not in str(adapter):  # runs:/ and models:/ URIs are resolved by MLflow
        checks.existing_path(adapter, "model.adapter")
    if cfg.corpus.kind == "folder" and _reads_corpus(cfg, run, trains=lora and not adapter):
        checks.existing_path(cfg.corpus.source, "corpus.source", pattern=True)


def _reads_corpus(cfg: DictConfig, run: str, *, trains: bool) -> bool:
    """Whether this run reads the corpus folder (evaluation always retrieves from it)."""
    synthesis = cfg.dataset.synthesis
    if synthesis.backend != "none" and synthesis.mode == "from_corpus":
        return True
    if run != "train":
        return run == "evaluate"
    learns = (cfg.model.get("knowledge") or "qa") != "qa" or cfg.model.context == "retrieved"
    return trains and learns


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """OmegaConf's own errors (a `???` left unset, a missing key) as one line naming the key."""
    try:
        yield
    except MissingMandatoryValue as err:
        raise QaLabError(f"{err.full_key} is not set (it is ??? in the config)") from None
    except OmegaConfBaseException as err:  # an interpolation that fails, a key not there
        raise QaLabError(f"{err.full_key}: {str(err).splitlines()[0]}") from None


def check(cfg: DictConfig, script: str) -> None:
    """Refuse a bad value of any key `script` reads, in one line naming it, before any work.

    Args:
        cfg: The config Hydra composed for the script.
        script: `build_dataset`, `train` or `evaluate` (its mode follows from `cfg`).

    Raises:
        QaLabError: the first bad value, e.g. `model.learning_rate='abc' is not a number`.
    """
    run = mode(cfg, script)
    with _config_errors():
        for group in READS[run]:
            GROUPS[group](cfg)
        _sources(cfg, run)
