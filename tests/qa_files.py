"""Shared helpers of the dataset tests: QA files in every format, items, real embeddings.

The loader's option defaults come from the real `conf/dataset/default.yaml`, so the tests run
with what users get and no default is typed twice.
"""

import json
from pathlib import Path

from omegaconf import OmegaConf

from qa_lab import loading
from qa_lab.records import QAItem

EMBEDDER = "all-MiniLM-L6-v2"
REPO_ROOT = Path(__file__).resolve().parents[1]
_DEFAULTS = OmegaConf.load(REPO_ROOT / "conf" / "dataset" / "default.yaml")
LOAD_DEFAULTS = {
    "encoding": _DEFAULTS.encoding,
    "fmt": _DEFAULTS.format,
    "columns": None,
    "on_bad_row": _DEFAULTS.on_bad_row,
    "similar_labels": _DEFAULTS.topics.similar_labels,
}


def embed(texts):
    from qa_lab.retrieval import embed as real_embed

    return real_embed(texts, EMBEDDER)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_items(path, **kwargs):
    """`loading.load_items` with the config's defaults for the options not given."""
    return loading.load_items(path, **{**LOAD_DEFAULTS, **kwargs})


def load(path, **kwargs):
    loaded = load_items(path, **kwargs)
    return loaded.items, loaded.mapping


def item(i, question=None, topic="", seed_id=None, answer=None):
    return QAItem(
        id=f"q{i}",
        question=question or f"question {i}",
        answer=answer or f"answer {i}",
        topic=topic,
        seed_id=seed_id,
    )


# Four seeds in four unrelated areas, then two rewordings of each (file order: seeds first,
# like the original study's expanded file).
FAMILIES = [
    (
        "How does TCP guarantee reliable delivery of packets?",
        "In what way does the TCP protocol make packet delivery reliable?",
        "Explain how TCP ensures network packets are delivered reliably.",
    ),
    (
        "What is a SQL join and when do you use an inner join?",
        "Explain SQL joins and when an inner join is appropriate.",
        "When should I use an inner join in a SQL query?",
    ),
    (
        "How does Python's garbage collector free memory?",
        "How is memory freed by the garbage collector in Python?",
        "Explain how Python garbage collection reclaims unused memory.",
    ),
    (
        "What is the time complexity of binary search?",
        "How fast is binary search on a sorted array, in big-O terms?",
        "Why does binary search run in logarithmic time?",
    ),
]


def family_rows():
    """Rows with ids and a seed_id column: seeds s0..s3 first, then their rewordings."""
    rows = [
        {"id": f"s{f}", "q": fam[0], "a": f"answer {f}", "seed_id": f"s{f}"}
        for f, fam in enumerate(FAMILIES)
    ]
    for f, fam in enumerate(FAMILIES):
        for j, question in enumerate(fam[1:], 1):
            rows.append({"id": f"s{f}-p{j}", "q": question, "a": f"answer {f}", "seed_id": f"s{f}"})
    return rows


def write_format(path, fmt, rows):
    """The same rows in each supported format, written the way users' tools write them."""
    import pandas as pd
    from datasets import Dataset

    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        pd.DataFrame(rows).to_csv(path, index=False, sep="," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    return path
