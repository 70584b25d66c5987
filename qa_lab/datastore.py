"""A finished dataset folder: where a config's dataset lives, its files, reading it back.

The dataset stage writes `train/val/test.jsonl`, `dedup_report.jsonl`, `leakage_audit.json`
and, last, `manifest.json` (`cache.build_once`); everything downstream (retrieval, training,
evaluation, the report) reads the folder through these functions, never by its own paths.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qa_lab.cache import file_sha256, is_finished, read_manifest, tree_sha256
from qa_lab.dataset import Built
from qa_lab.errors import QaLabError
from qa_lab.jsonl import read_jsonl, write_json, write_jsonl
from qa_lab.records import QAItem

SPLITS = ("train", "val", "test")
# The order build_dataset.py prints the counts in (a row count after each step).
COUNT_ORDER = (
    "loaded",
    "synthetic_kept",
    "synthetic_rejected",
    "before_dedup",
    "after_exact_dedup",
    "after_semantic_dedup",
    *SPLITS,
)


def source_hash(source: Path) -> str:
    """Content hash of a dataset source: a file, or a folder saved by HF `datasets`."""
    if source.is_dir():
        return tree_sha256(source)
    if not source.is_file():
        raise QaLabError(f"dataset.source={source}: file not found")
    return file_sha256(source)


def folder_for(key: str, cache: Path, output_dir: str | None) -> Path:
    """Where the dataset of `key` lives: `output_dir` when given, else `<cache>/data/<key>`.

    An `output_dir` that already holds another config's dataset is refused rather than mixed.
    """
    if not output_dir:
        return cache / "data" / key
    folder = Path(output_dir).expanduser().resolve()
    if is_finished(folder) and read_manifest(folder).get("key") != key:
        raise QaLabError(
            f"output_dir={folder} holds a dataset built from another config; choose an empty folder"
        )
    return folder


def write(out: Path, built: Built) -> None:
    """The splits, the dedup report and the leakage audit (the manifest comes after)."""
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", [it.to_dict() for it in built.splits[name]])
    write_jsonl(out / "dedup_report.jsonl", built.dedup_report)
    write_json(out / "leakage_audit.json", built.audit)


def read_split(folder: Path, name: str) -> list[QAItem]:
    """One split of a finished dataset folder."""
    return [QAItem.from_dict(row) for row in read_jsonl(folder / f"{name}.jsonl")]


def leakage_metrics(folder: Path) -> dict[str, float]:
    """The split's leakage audit (test vs train) as `leakage/*` metrics."""
    audit = json.loads((folder / "leakage_audit.json").read_text(encoding="utf-8"))
    return {f"leakage/{k}": float(v) for k, v in audit.items() if isinstance(v, int | float)}


def train_sample(train: list[QAItem], n: int, seed: int) -> list[QAItem]:
    """A fixed, seeded sample of `n` training items (0 = none).

    Answered closed-book by every evaluate run: a fine-tune far better on these than on the
    test split memorised; one no better than the base model learned nothing.
    """
    if n <= 0:
        return []
    return random.Random(seed).sample(train, min(n, len(train)))
