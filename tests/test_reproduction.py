"""qa-lab's reproduction of the original study's preprocessing, step by step and as a preset.

Two references: a small fixture written for this project, whose expected files come from an
independent implementation of the original's procedure (`fixtures/original_style/
make_expected.py`: plain `strip().lower()`, numpy cosine, `random.seed(42)`), so both tests run
in every clone; and the original study's published data (2070 rows) where it sits beside the
repo (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qa_lab import dataset, similarity, stages
from tests.conftest import SHARED_REFERENCE, compose_cfg
from tests.qa_files import EMBEDDER, load

FIXTURE = Path(__file__).parent / "fixtures" / "original_style"
REFERENCES = [
    pytest.param(FIXTURE, id="fixture"),
    pytest.param(SHARED_REFERENCE, marks=pytest.mark.slow, id="published"),
]
STEPS = (
    ("dataset.jsonl", "loaded"),
    ("dataset_no_duplicates.jsonl", "after_exact_dedup"),
    ("dataset_semantic_filtered.jsonl", "after_semantic_dedup"),
)
SPLITS = ("train", "val", "test")


def _pairs(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [(r["question"], r["answer"]) for r in rows]


def _plain(items) -> list[tuple[str, str]]:
    return [(it.question, it.answer) for it in items]


def _need(reference: Path) -> None:
    if not (reference / "dataset.jsonl").is_file():
        pytest.skip(f"reference data not found at {reference}")


@pytest.mark.parametrize("reference", REFERENCES)
def test_each_preprocessing_step_matches_the_reference(reference, tmp_path):
    _need(reference)
    items, _ = load(reference / "dataset.jsonl")
    items, _ = dataset.exact_dedup(items, "strip_lower")
    assert _plain(items) == _pairs(reference / "dataset_no_duplicates.jsonl")
    from qa_lab.retrieval import embed

    vectors = embed([it.question for it in items], EMBEDDER, cache_dir=tmp_path)
    kept, _ = similarity.semantic_dedup(vectors, 0.9)
    items = [items[i] for i in kept]
    assert _plain(items) == _pairs(reference / "dataset_semantic_filtered.jsonl")
    splits = dataset.split_items(items, "random", train=0.7, val=0.15, seed=42)
    for name in SPLITS:
        assert _plain(splits[name]) == _pairs(reference / f"{name}.jsonl"), name


@pytest.mark.parametrize("reference", REFERENCES)
def test_reproduce_original_preset_matches_the_reference(reference, store):
    _need(reference)
    cfg = compose_cfg(
        "build_dataset",
        [*store, "+experiment=reproduce_original", f"dataset.source={reference / 'dataset.jsonl'}"],
    )
    folder = stages.build_dataset(cfg)
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    for name, count in STEPS:
        assert counts[count] == len(_pairs(reference / name)), count
    for split in SPLITS:
        assert _pairs(folder / f"{split}.jsonl") == _pairs(reference / f"{split}.jsonl"), split
