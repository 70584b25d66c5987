"""Every config value a script reads is refused, in one line naming its key, before any work.

The sweep walks the composed default configs of the three scripts (and a variant holding the
optional groups: LoRA, the hybrid retriever, the judge, a tracking server), so a new numeric key
that no builder checks fails here. The script tests run the real entry points and check that
nothing was built or logged before the refusal.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from qa_lab import checks, validate
from qa_lab.config import PROJECT_ROOT, flatten
from qa_lab.errors import QaLabError
from qa_lab.report_stats import PAIRED
from tests.conftest import compose_cfg

# script -> override sets; the last holds every optional group whose keys a default lacks
CONFIGS = {
    "build_dataset": [[]],
    "train": [[]],
    "evaluate": [
        [],
        [
            "model=lora",
            "retriever=hybrid",
            "metrics=judge",
            "metrics.judge.model=judge",
            "tracking=server",
        ],
    ],
}
PRICES = [f"metrics.decision.prices.{k}" for k in ("prompt_per_1k", "completion_per_1k")]
PRICES += [f"metrics.decision.prices.{k}" for k in ("cpu_hour", "gpu_hour")]
# Numeric keys whose default is null (no number to find in the walk), and the script reading them.
NULL_NUMBERS = {
    "dataset.seeds": "build_dataset",
    "generation.threads": "evaluate",
    "eval.limit": "evaluate",
    "model.max_train_rows": "train",  # train.py composes model=lora
    "model.early_stopping_patience": "train",
    **dict.fromkeys(PRICES, "evaluate"),
}
# A value outside each numeric key's range. Every number the walk finds must be listed here or
# in NO_RANGE, so a new key gets a range decision.
OUT_OF_RANGE = {
    "seed": 1.5,
    "chunking.size": 4,
    "chunking.overlap": -1,
    "corpus.gold_threshold": 2,
    "dataset.seeds": 0,
    "dataset.semantic_dedup.threshold": 1.5,
    "dataset.split.group_threshold": -0.1,
    "dataset.split.seed": 0.5,
    "dataset.split.train": 1.5,
    "dataset.split.val": -0.1,
    "dataset.synthesis.batch_size": 0,
    "dataset.synthesis.max_chars": 0,
    "dataset.synthesis.max_new_tokens": 0,
    "dataset.synthesis.max_seed_similarity": 1.5,
    "dataset.synthesis.min_chars": -1,
    "dataset.synthesis.min_support": 1.5,
    "dataset.synthesis.min_topic_similarity": -2,
    "dataset.synthesis.per_seed": 0,
    "dataset.synthesis.seed": 0.5,
    "dataset.synthesis.temperature": -1,
    "dataset.topics.max_k": 1,
    "dataset.topics.min_k": 1,
    "dataset.topics.seed": 0.5,
    "dataset.topics.similar_labels": 1.5,
    "dataset.topics.terms": 0,
    "embedder.batch_size": 0,
    "eval.limit": -1,
    "eval.near_dup_threshold": 1.5,
    "eval.train_sample": -1,
    "generation.batch_size": 0,
    "generation.batch_tokens": 0,
    "generation.max_new_tokens": 0,
    "generation.repeats": 0,
    "generation.temperature": 0,
    "generation.threads": 0,
    "llm.backoff_s": -1,
    "llm.concurrency": 0,
    "llm.retries": -1,
    "llm.timeout": 0,
    "metrics.bertscore.baseline_pairs": 0,
    "metrics.bertscore.batch_size": 0,
    "metrics.bertscore.num_layers": 0,
    "metrics.bootstrap.confidence": 1.5,
    "metrics.bootstrap.resamples": 0,
    "metrics.bootstrap.seed": 0.5,
    "metrics.copy_threshold": 1.5,
    "metrics.judge.backoff_s": -1,
    "metrics.judge.concurrency": 0,
    "metrics.judge.repeats": 0,
    "metrics.judge.max_tokens": 0,
    "metrics.judge.retries": -1,
    "metrics.judge.temperature": -1,
    "metrics.judge.timeout": 0,
    "metrics.samples.count": -1,
    "metrics.samples.seed": 0.5,
    "model.alpha": 0,
    "model.batch_size": 0,
    "model.context_k": 0,
    "model.cpt.batch_size": 0,
    "model.cpt.epochs": 0,
    "model.cpt.learning_rate": 0,
    "model.cpt.max_length": 1,
    "model.dropout": 1.0,
    "model.early_stopping_patience": 0,
    "model.epochs": 0,
    "model.grad_accum": 0,
    "model.learning_rate": -1e-4,
    "model.max_length": 0,
    "model.max_train_rows": 0,
    "model.r": 0,
    "model.seed": -1,
    "model.warmup_ratio": 1.5,
    "model.weight_decay": -1,
    "retriever.b": 2,
    "retriever.depth": 0,
    "retriever.k": -1,
    "retriever.k1": -1,
    "retriever.rerank.batch_size": 0,
    "retriever.rrf_k": -1,
    "retriever.weights.bm25": -1,
    "retriever.weights.dense": -1,
    "tracking.retry.backoff_factor": -1,
    "tracking.retry.max_retries": -1,
    "tracking.retry.timeout_s": -1,
    "metrics.decision.alpha": 2,
    "metrics.decision.power": 0,
    **{f"metrics.decision.min_effect.{m}": -1 for m in PAIRED},
    **dict.fromkeys(PRICES, -1),
}
# Numbers with no range to break beyond "a number": a threshold on any score scale.
NO_RANGE = {"metrics.attribution.threshold", "retriever.rerank.top_n"}
# Messages that name the node holding the key (the weights are checked together).
NAMED_AS = {
    "retriever.weights.bm25": "retriever.weights",
    "retriever.weights.dense": "retriever.weights",
}
# A wrong value of every choice key, with the script (and overrides) that read it.
WRONG_CHOICES = {
    "dataset.format": ("build_dataset", []),
    "dataset.on_bad_row": ("build_dataset", []),
    "dataset.normalize": ("build_dataset", []),
    "dataset.split.strategy": ("build_dataset", []),
    "dataset.split.stratify": ("build_dataset", []),
    "dataset.synthesis.backend": ("build_dataset", []),
    "dataset.synthesis.mode": ("build_dataset", ["dataset.synthesis.backend=local"]),
    "corpus.kind": ("build_dataset", []),
    "corpus.on_bad_file": ("build_dataset", []),
    "chunking.strategy": ("build_dataset", []),
    "llm.backend": ("train", []),
    "llm.dtype": ("train", []),
    "llm.device": ("train", []),
    "llm.system_turn": ("train", []),
    "model.kind": ("evaluate", []),
    "model.context": ("train", []),
    "model.knowledge": ("train", []),
    "model.lr_scheduler": ("train", []),
    "retriever.kind": ("evaluate", []),
    "retriever.document": ("evaluate", ["retriever=faiss"]),
    "retriever.method": ("evaluate", ["retriever=bm25"]),
    "retriever.stopwords": ("evaluate", ["retriever=bm25"]),
    "retriever.stemmer": ("evaluate", ["retriever=bm25"]),
    "eval.split": ("evaluate", []),
    "metrics.groups": ("evaluate", []),
    "metrics.bleu_smooth": ("evaluate", []),
    "metrics.exact_match": ("evaluate", []),
    "metrics.attribution.metric": ("evaluate", []),
    "metrics.judge.system_turn": ("evaluate", ["metrics=judge", "metrics.judge.model=judge"]),
}


@functools.cache
def _composed(script: str, overrides: tuple[str, ...]) -> DictConfig:
    return compose_cfg(script, list(overrides))  # composing costs ~50 ms; the sweep reuses it


def _leaves(script: str, overrides: list[str]) -> dict[str, object]:
    return flatten(OmegaConf.to_container(_composed(script, tuple(overrides)), resolve=True))


def _refusal(script: str, overrides: list[str], key: str, value: object) -> str:
    """The message `validate.check` refuses `key=value` with (fails when it accepts it)."""
    cfg = copy.deepcopy(_composed(script, tuple(overrides)))
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(QaLabError) as err:
        validate.check(cfg, script)
    return str(err.value)


def _numbers() -> list[tuple[str, list[str], str]]:
    """(script, overrides, key) of every int/float leaf of the composed configs, once per key."""
    seen: dict[str, tuple[str, list[str], str]] = {}
    for script, variants in CONFIGS.items():
        for overrides in variants:
            for key, value in _leaves(script, overrides).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    seen.setdefault(key, (script, overrides, key))
    for key, script in NULL_NUMBERS.items():
        seen.setdefault(key, (script, [], key))
    return sorted(seen.values(), key=lambda row: row[2])


NUMBERS = _numbers()


def test_the_default_configs_pass():
    for script, variants in CONFIGS.items():
        for overrides in variants:
            validate.check(compose_cfg(script, overrides), script)


def test_every_number_has_a_range_decision():
    found = {key for _, _, key in NUMBERS}
    assert found - set(OUT_OF_RANGE) - NO_RANGE == set()
    assert set(OUT_OF_RANGE) - found == set()  # no stale entries


@pytest.mark.parametrize(("script", "overrides", "key"), NUMBERS, ids=[k for *_, k in NUMBERS])
def test_a_non_number_is_refused_naming_its_key(script, overrides, key):
    assert _refusal(script, overrides, key, "abc") == f"{key}='abc' is not a number"


@pytest.mark.parametrize(("script", "overrides", "key"), NUMBERS, ids=[k for *_, k in NUMBERS])
def test_an_out_of_range_number_is_refused_naming_its_key(script, overrides, key):
    if key in NO_RANGE:
        pytest.skip("no range beyond being a number")
    message = _refusal(script, overrides, key, OUT_OF_RANGE[key])
    assert message.startswith(f"{NAMED_AS.get(key, key)}=") and "\n" not in message


@pytest.mark.parametrize("key", sorted(WRONG_CHOICES))
def test_a_wrong_choice_is_refused_naming_its_key(key):
    script, overrides = WRONG_CHOICES[key]
    assert key in _leaves(script, overrides)  # the key exists where the test looks for it
    message = _refusal(script, overrides, key, "bogus")
    assert f"{key}='bogus' is not one of" in message


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("abc", "model.seeds='abc' is not a list of seeds, e.g. [42,43,44]"),
        ([], "model.seeds=[] is not a list of seeds, e.g. [42,43,44]"),
        ([42, -1], "model.seeds[1]=-1 must be >= 0"),
        ([42, 42], "model.seeds=[42, 42] repeats a seed: each replicate needs its own"),
    ],
)
def test_training_seeds_are_distinct_whole_numbers(value, line):
    assert _refusal("train", [], "model.seeds", value) == line


def test_flags_are_refused_when_not_true_or_false():
    overrides = CONFIGS["evaluate"][1]
    flags = [k for k, v in _leaves("evaluate", overrides).items() if isinstance(v, bool)]
    assert "model.group_by_length" in flags and "tracking.traces" in flags
    for key in flags:
        assert f"{key}='abc' is not true or false" in _refusal("evaluate", overrides, key, "abc")


def test_paths_are_checked_only_where_the_run_reads_them(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    message = _refusal("build_dataset", [], "dataset.source", missing)
    assert message == f"dataset.source={missing!r} does not exist"
    assert "predictions=" in _refusal("evaluate", [], "predictions", missing)
    assert "corpus.source=" in _refusal("evaluate", [], "corpus.source", str(tmp_path / "*.md"))
    assert "model.adapter=" in _refusal("evaluate", ["model=lora"], "model.adapter", missing)
    # a report rebuild reads the store only; a given adapter means train.py reads no dataset
    validate.check(compose_cfg("evaluate", ["report=abc", f"dataset.source={missing}"]), "evaluate")
    adapter = ["model.adapter=runs:/abc/adapter", f"dataset.source={missing}"]
    validate.check(compose_cfg("train", adapter), "train")


def test_an_unset_mandatory_value_names_its_key():
    cfg = compose_cfg("build_dataset")
    OmegaConf.update(cfg, "dataset.source", "???", merge=False)
    with pytest.raises(QaLabError, match=r"^dataset\.source is not set"):
        validate.check(cfg, "build_dataset")


def test_the_shared_conversions():
    assert checks.number("1e-4", "k") == 1e-4
    assert checks.whole(3.0, "k", low=1) == 3
    assert checks.maybe_whole(None, "k", low=1) is None
    for bad, why in [(True, "not a number"), ("nan", "finite"), (2.5, "whole"), (None, "not set")]:
        with pytest.raises(QaLabError, match=why):
            checks.whole(bad, "k")
    with pytest.raises(QaLabError, match=r"^k=0 must be > 0$"):
        checks.number(0, "k", low=0, above=True)
    with pytest.raises(QaLabError, match=r"^k=2 must be <= 1$"):
        checks.number(2, "k", high=1)


def _script(name: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run a script with its caches, store and Hydra folder under tmp_path."""
    cache, mlruns = tmp_path / "cache", tmp_path / "mlruns"
    command = [sys.executable, str(PROJECT_ROOT / f"{name}.py"), *overrides]
    command += [
        f"paths.cache={cache}",
        f"paths.mlruns={mlruns}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert not cache.exists() and not mlruns.exists()  # refused before any work
    return done


@pytest.mark.parametrize(
    ("name", "overrides", "line"),
    [
        (
            "train",
            ["model=lora", "model.learning_rate=abc"],
            "model.learning_rate='abc' is not a number",
        ),
        ("evaluate", ["retriever=faiss", "retriever.k=-1"], "retriever.k=-1 must be >= 0"),
        (
            "build_dataset",
            ["chunking.strategy=foo"],
            "chunking.strategy='foo' is not one of: sections, fixed",
        ),
    ],
    ids=["train", "evaluate", "build_dataset"],
)
def test_scripts_refuse_a_bad_value_in_one_line_before_any_work(name, overrides, line, tmp_path):
    done = _script(name, tmp_path, *overrides)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {line}"]
