"""Dataset building blocks: load+validate, normalise, exact and semantic dedup, split, audit.

Every function here is plain library code (no MLflow, no Hydra) so `stages.build_dataset` can
compose them and tests can check each one alone. Two procedures are kept bit-for-bit as the
original study ran them, because its published splits must be reproducible: the
`strip_lower` normalisation and the `random` split (`random.seed(seed); random.shuffle`).
Semantic dedup keeps the original's greedy semantics (file order, compare with every kept
row, drop above the threshold) but runs blockwise so it scales to 100k rows.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import random
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import QAItem

FIELDS = ("id", "question", "answer", "topic", "difficulty", "seed_id")
# Lineage fields are carried over by their exact name when a file has them.
LINEAGE_FIELDS = ("source", "generator")
# Recognised column names, in order of preference. `instruction` comes before `input`
# because in Alpaca-style files `input` is optional extra context, not the question.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "item_id", "qid", "uid"),
    "question": ("question", "query", "prompt", "instruction", "input", "q"),
    "answer": ("answer", "response", "output", "completion", "target", "reference", "a"),
    "topic": ("topic", "category", "subject"),
    "difficulty": ("difficulty", "level"),
    "seed_id": ("seed_id",),
}
BAD_ROW_ACTIONS = ("error", "skip")
FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "hf")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
NORMALIZE_MODES = ("robust", "strip_lower")
SPLIT_STRATEGIES = ("group", "random")
SPLIT_NAMES = ("train", "val", "test")
# Characters dropped from the end of a question by the robust normalisation: "What is X?"
# and "what is x" are the same question.
TRAILING_PUNCTUATION = "?.!;:,…"

Row = dict[str, Any]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Loaded:
    """What `load_items` read, with what the caller must report about it."""

    items: list[QAItem]
    mapping: dict[str, str | None]  # field -> file column (None: not in the file)
    skipped: dict[str, int]  # reason -> rows dropped under dataset.on_bad_row=skip
    topics: dict[str, Any]  # mapped topics: spellings merged, near-identical labels


def load_items(
    path: str | Path,
    *,
    encoding: str = "utf-8",
    fmt: str = "auto",
    columns: Mapping[str, str | None] | None = None,
    on_bad_row: str = "error",
    similar_labels: float = 0.85,
) -> Loaded:
    """Load and validate a QA file: its items, the column mapping used, skips and topic notes.

    The mapping is returned so the caller can print and log which column became which field:
    auto-recognition is convenient but must never be silent. So are skipped rows and topic
    labels that look like typos of each other.

    Args:
        path: A .jsonl/.json/.csv/.tsv/.parquet file or a `datasets.save_to_disk` folder.
        encoding: Text encoding of text formats (`dataset.encoding`).
        fmt: `auto` (from the extension) or one of jsonl, json, csv, tsv, parquet, hf.
        columns: Field -> column name for id, question, answer, topic, difficulty, seed_id; a
            missing or `None` entry means "recognise a common name".
        on_bad_row: `error` stops at the first row without a usable question or answer;
            `skip` drops such rows and counts them by reason.
        similar_labels: Topic labels at least this similar (difflib ratio) are reported.

    Returns:
        The items in file order with the mapping, skip counts and topic report.

    Raises:
        QaLabError: One line naming the file and line (or row) for any bad input.
    """
    require_choice("dataset.on_bad_row", on_bad_row, BAD_ROW_ACTIONS)
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt != "hf" and path.is_dir():
        raise QaLabError(f"{path}: is a folder; set dataset.format=hf for a saved HF dataset")
    if fmt not in ("parquet", "hf"):
        _check_encoding(encoding)
    rows, where, fieldnames = _read_rows(path, fmt, encoding)
    if not rows:
        raise QaLabError(f"{path}: no data rows (empty file); point dataset.source= at a QA file")
    mapping = resolve_columns(fieldnames, columns, source=path)
    items: list[QAItem] = []
    kept_where: list[str] = []
    skipped: Counter[str] = Counter()
    for n, (row, loc) in enumerate(zip(rows, where), 1):
        try:
            items.append(_make_item(row, loc, n, mapping))
        except BadRow as err:
            if on_bad_row == "error":
                raise
            skipped[err.reason] += 1
            continue
        kept_where.append(loc)
    if not items:
        raise QaLabError(f"{path}: every row was skipped ({dict(skipped)}); check dataset.columns")
    _check_unique_ids(items, kept_where)
    items, topics = clean_topics(items, similar_labels) if mapping["topic"] else (items, {})
    return Loaded(items, mapping, dict(sorted(skipped.items())), topics)


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    """Resolve `dataset.format=auto` from the path; an explicit format is only validated."""
    require_choice("dataset.format", fmt, FORMATS)
    path = Path(path)
    if not path.exists():
        raise QaLabError(f"{path}: file not found; set dataset.source= to an existing file")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf"
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise QaLabError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"set dataset.format= to one of {', '.join(FORMATS[1:])}"
        )
    return found


def resolve_columns(
    fieldnames: Sequence[str],
    columns: Mapping[str, str | None] | None = None,
    *,
    source: str | Path = "",
) -> dict[str, str | None]:
    """Decide which file column feeds each field: explicit mapping first, then common names.

    Matching of common names ignores case and surrounding spaces, so `Question` and
    ` query ` are found; an explicit mapping must name a column exactly.

    Args:
        fieldnames: The file's columns in file order.
        columns: Explicit field -> column entries (None values fall back to recognition).
        source: The file, for error messages.

    Returns:
        Field -> column (None when the optional field is not in the file).

    Raises:
        QaLabError: An unknown field, a mapped column missing from the file, or no column
            for question/answer; the message lists the file's columns.
    """
    present = list(fieldnames)
    listing = ", ".join(present) if present else "(none)"
    explicit = dict(columns or {})
    for key in explicit:
        if key not in FIELDS:
            raise QaLabError(f"dataset.columns.{key} is not a field; fields: {', '.join(FIELDS)}")
    by_lower: dict[str, str] = {}
    for name in present:
        by_lower.setdefault(str(name).strip().lower(), name)
    mapping: dict[str, str | None] = {}
    for fld in FIELDS:
        wanted = explicit.get(fld)
        if wanted is not None:
            if wanted not in present:
                raise QaLabError(
                    f"{source}: dataset.columns.{fld}={wanted!r} is not a column of the file; "
                    f"its columns are: {listing}"
                )
            mapping[fld] = wanted
            continue
        mapping[fld] = next(
            (by_lower[a] for a in COLUMN_ALIASES[fld] if a in by_lower and by_lower[a]), None
        )
    taken = [c for c in mapping.values() if c is not None]
    if len(taken) != len(set(taken)):
        raise QaLabError(
            f"{source}: one column is mapped to two fields ({mapping}); fix dataset.columns"
        )
    for fld in ("question", "answer"):
        if mapping[fld] is None:
            raise QaLabError(
                f"{source}: no {fld} column found; its columns are: {listing}; "
                f"set dataset.columns.{fld}= to one of them"
            )
    return mapping


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise QaLabError(
            f"dataset.encoding={encoding!r} is not a known text encoding (e.g. utf-8, cp1252)"
        ) from None


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def _decode(path: Path, encoding: str) -> str:
    """Decode a whole text file, naming the line of the first bad byte.

    A UTF-8 file read as a single-byte Windows encoding would decode without error into
    mojibake ("café" -> "cafÃ©"), so a non-UTF-8 encoding is refused for text that is valid
    UTF-8 with non-ASCII characters: real cp1252 text practically never is.
    """
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8) and _is_utf8(encoding):
        data = data[len(codecs.BOM_UTF8) :]  # Excel writes one; it is not part of the header
    if not _is_utf8(encoding) and not data.isascii():
        with contextlib.suppress(UnicodeDecodeError):
            data.decode("utf-8")
            first = next(i for i, byte in enumerate(data) if byte > 0x7F)
            line = data[:first].count(b"\n") + 1
            raise QaLabError(
                f"{path}:{line}: the file is UTF-8; reading it as {encoding} would mangle "
                "its accented characters; drop dataset.encoding= (the default is utf-8)"
            )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise QaLabError(
            f"{path}:{line}: not valid {encoding} (byte {err.start} of the file); "
            "set dataset.encoding= to the file's encoding (e.g. dataset.encoding=cp1252)"
        ) from None


def _read_rows(path: Path, fmt: str, encoding: str) -> tuple[list[Row], list[str], list[str]]:
    """Rows as dicts, a location string per row for messages, and the ordered column names."""
    if fmt == "jsonl":
        return _read_jsonl_rows(path, encoding)
    if fmt == "json":
        return _read_json_rows(path, encoding)
    if fmt in ("csv", "tsv"):
        return _read_csv_rows(path, encoding, "\t" if fmt == "tsv" else ",")
    if fmt == "parquet":
        return _read_parquet_rows(path)
    return _read_hf_rows(path)


def _fieldnames(rows: Sequence[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _read_jsonl_rows(path: Path, encoding: str) -> tuple[list[Row], list[str], list[str]]:
    text = _decode(path, encoding)
    rows: list[Row] = []
    where: list[str] = []
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise QaLabError(
                f"{path}:{n}: malformed JSON ({err.msg}); every line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise QaLabError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path}:{n}")
    return rows, where, _fieldnames(rows)


def _read_json_rows(path: Path, encoding: str) -> tuple[list[Row], list[str], list[str]]:
    text = _decode(path, encoding)
    if not text.strip():
        return [], [], []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several documents: a .json file holding JSON lines
            return _read_jsonl_rows(path, encoding)
        raise QaLabError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise QaLabError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
    for n, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            raise QaLabError(f"{path}: item {n}: expected a JSON object, got {type(row).__name__}")
    return doc, [f"{path}: item {n}" for n in range(1, len(doc) + 1)], _fieldnames(doc)


def _read_csv_rows(
    path: Path, encoding: str, delimiter: str
) -> tuple[list[Row], list[str], list[str]]:
    text = _decode(path, encoding)
    header_line = text.lstrip().split("\n", 1)[0]
    if delimiter == "," and "," not in header_line and ";" in header_line:
        delimiter = ";"  # spreadsheets in many locales export CSV with semicolons
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[Row] = []
    where: list[str] = []
    header: list[str] | None = None
    last = 0  # the physical line the previous record ended on
    try:
        for cells in reader:
            start, last = last + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                dupes = sorted({c for c in header if header.count(c) > 1})
                if dupes:
                    raise QaLabError(f"{path}:{start}: duplicate column name(s) {dupes}")
                continue
            if len(cells) != len(header):
                raise QaLabError(
                    f"{path}:{start}: malformed row ({len(cells)} fields, "
                    f"the header has {len(header)}); check quoting and dataset.format="
                )
            rows.append(dict(zip(header, cells)))
            where.append(f"{path}:{start}")
    except csv.Error as err:
        raise QaLabError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return rows, where, header or []


def _read_parquet_rows(path: Path) -> tuple[list[Row], list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise QaLabError(f"{path}: not a readable parquet file ({err})") from None
    rows = table.to_pylist()
    return rows, [f"{path}: row {n}" for n in range(1, len(rows) + 1)], list(table.column_names)


def _read_hf_rows(path: Path) -> tuple[list[Row], list[str], list[str]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise QaLabError(
            f"{path}: not a dataset saved with datasets.save_to_disk ({type(err).__name__}); "
            "set dataset.format= to the file's format"
        ) from None
    parts: list[tuple[str, Dataset]] = (
        list(loaded.items()) if isinstance(loaded, DatasetDict) else [("", loaded)]
    )
    rows: list[Row] = []
    where: list[str] = []
    names: list[str] = []
    for split, part in parts:
        part_rows = part.to_list()
        rows.extend(part_rows)
        label = f"{split} row" if split else "row"
        where.extend(f"{path}: {label} {n}" for n in range(1, len(part_rows) + 1))
        names.extend(c for c in part.column_names if c not in names)
    return rows, where, names


class BadRow(QaLabError):
    """A row without a usable question or answer; `reason` counts it under on_bad_row=skip."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(f"{message}; fix the row or set dataset.on_bad_row=skip")
        self.reason = reason


def _cell(value: Any) -> Any:
    """Missing cells (None, NaN, empty CSV cell) become None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _as_text(value: Any, fld: str, loc: str) -> str | None:
    value = _cell(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Number) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"{loc}: {fld} must be text, got {type(value).__name__}", f"not_text_{fld}")


def _answers(value: Any, loc: str) -> list[str] | None:
    """One answer, or several references when the cell holds a list (JSON, Parquet, HF)."""
    if not isinstance(value, list | tuple):
        text = _as_text(value, "answer", loc)
        return None if text is None else [text]
    texts = [_as_text(v, "answer", loc) for v in value]
    return [t for t in texts if t is not None and t.strip()] or [""]


def _make_item(row: Row, loc: str, n: int, mapping: Mapping[str, str | None]) -> QAItem:
    values: dict[str, str | None] = {}
    for fld, column in mapping.items():
        if fld != "answer":
            values[fld] = None if column is None else _as_text(row.get(column), fld, loc)
    answers = _answers(row.get(mapping["answer"] or ""), loc)
    for fld, text in (("question", values["question"]), ("answer", answers and answers[0])):
        if text is None:
            raise BadRow(f"{loc}: missing {fld} (column {mapping[fld]!r})", f"missing_{fld}")
        if not text.strip():
            raise BadRow(f"{loc}: empty {fld} (column {mapping[fld]!r})", f"empty_{fld}")
    assert answers is not None  # checked above
    item_id = (values["id"] or "").strip() or f"row-{n:05d}"
    lineage = {k: _as_text(row.get(k), k, loc) for k in LINEAGE_FIELDS}
    seed_id = (values["seed_id"] or "").strip() or None
    # A row whose seed is another row was expanded from it; any other row is its own seed.
    source = (lineage["source"] or "").strip() or (
        "seed" if seed_id in (None, item_id) else "expanded"
    )
    return QAItem(
        id=item_id,
        question=values["question"],  # type: ignore[arg-type]  # checked above
        answer=answers[0],
        topic=" ".join((values["topic"] or "").split()),
        difficulty=(values["difficulty"] or "").strip(),
        seed_id=seed_id or (item_id if source == "seed" else None),
        source=source,
        generator=(lineage["generator"] or "").strip() or None,
        references=tuple(answers) if len(answers) > 1 else None,
    )


def _check_unique_ids(items: Sequence[QAItem], where: Sequence[str]) -> None:
    first: dict[str, str] = {}
    for item, loc in zip(items, where):
        if item.id in first:
            raise QaLabError(
                f"{loc}: duplicate id {item.id!r} (first at {first[item.id]}); ids must be unique"
            )
        first[item.id] = loc


# --------------------------------------------------------------------------- topics, lineage


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def clean_topics(
    items: Sequence[QAItem], similar: float = 0.85
) -> tuple[list[QAItem], dict[str, Any]]:
    """Unify spellings of mapped topics that differ only in case or spacing; report look-alikes.

    "Networking", "networking " and "NETWORKING" are one topic (the most frequent spelling
    wins, then the first seen), because a per-topic breakdown split three ways by a
    spreadsheet's typing says nothing. Labels that are merely similar ("network" and
    "networks", "data structures" and "data_structures") may be different topics, so they
    are reported for the user to fix in the file, never merged.

    Args:
        items: Loaded items with their topic cells (whitespace already collapsed).
        similar: difflib ratio at or above which two distinct labels are reported.

    Returns:
        Items with `topic_source="mapped"` where they have a topic, and a JSON-ready report:
        `source`, `merged` (spelling -> label used), `similar` ([a, b, ratio] pairs), `labels`
        (label -> rows).
    """
    spellings: dict[str, Counter[str]] = {}
    for item in items:
        if item.topic:
            spellings.setdefault(_label_key(item.topic), Counter())[item.topic] += 1
    chosen = {key: counts.most_common(1)[0][0] for key, counts in spellings.items()}
    merged = {
        spelling: chosen[key]
        for key, counts in spellings.items()
        for spelling in counts
        if spelling != chosen[key]
    }
    out = [
        replace(it, topic=chosen[_label_key(it.topic)], topic_source="mapped") if it.topic else it
        for it in items
    ]
    labels = Counter(it.topic for it in out if it.topic)
    report = {
        "source": "mapped",
        "merged": merged,
        "similar": similar_labels(list(labels), similar),
        "labels": dict(labels.most_common()),
    }
    return out, report


def similar_labels(labels: Sequence[str], threshold: float = 0.85) -> list[list[Any]]:
    """Pairs of distinct labels that look like one label typed two ways.

    Two labels are flagged when they are equal once spaces, underscores, hyphens and other
    punctuation are removed, or when their difflib ratio is at least `threshold`.

    Returns:
        [label_a, label_b, ratio] rows, in label order.
    """
    squashed = ["".join(ch for ch in _label_key(lab) if ch.isalnum()) for lab in labels]
    pairs: list[list[Any]] = []
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            matcher = SequenceMatcher(None, _label_key(a), _label_key(labels[j]))
            if squashed[i] == squashed[j] or (
                matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
            ):
                pairs.append([a, labels[j], round(matcher.ratio(), 3)])
    return pairs


def infer_topics(
    items: Sequence[QAItem],
    vectors: np.ndarray,
    *,
    min_k: int = 2,
    max_k: int = 12,
    seed: int = 42,
    terms: int = 3,
) -> tuple[list[QAItem], dict[str, Any]]:
    """Topics for data without a topic column: k-means on the question embeddings.

    Per-topic breakdowns are a headline result, so they must exist for any file. k is the
    value in [min_k, max_k] with the best silhouette (seeded k-means, so the same data
    gives the same topics); each topic is named by the TF-IDF terms that are most
    characteristic of its questions (cluster mean minus corpus mean), joined with `-` so the
    name is a valid MLflow metric path segment.

    Args:
        items: Items in file order.
        vectors: (n, d) unit-normalised question embeddings, row for row.
        min_k: Fewest topics tried (`dataset.topics.min_k`, >= 2).
        max_k: Most topics tried (`dataset.topics.max_k`); capped at n - 1.
        seed: k-means and silhouette sampling seed.
        terms: Terms in each topic's name.

    Returns:
        Items with `topic` and `topic_source="inferred"`, and a JSON-ready report: `source`,
        `k`, `silhouette` (k -> score), `labels` (name -> rows), `terms` (name -> terms).
    """
    if not 2 <= int(min_k) <= int(max_k):
        raise QaLabError(
            f"dataset.topics.min_k={min_k} and dataset.topics.max_k={max_k} must satisfy "
            "2 <= min_k <= max_k"
        )
    if int(terms) < 1:
        raise QaLabError(f"dataset.topics.terms={terms} must be at least 1")
    x = _as_matrix(vectors)
    if len(x) != len(items):
        raise ValueError(f"{len(x)} vectors for {len(items)} items")
    scores, labels = _best_kmeans(x, int(min_k), min(int(max_k), len(items) - 1), int(seed))
    names = _topic_names([it.question for it in items], labels, int(terms))
    out = [
        replace(it, topic=names[label], topic_source="inferred") for it, label in zip(items, labels)
    ]
    counts = Counter(it.topic for it in out)
    report = {
        "source": "inferred",
        "k": len(names),
        "silhouette": {str(k): round(v, 4) for k, v in scores.items()},
        "labels": dict(counts.most_common()),
        "terms": {name: name.split("-") for name in names},
    }
    return out, report


def _best_kmeans(
    x: np.ndarray, min_k: int, max_k: int, seed: int
) -> tuple[dict[int, float], np.ndarray]:
    """Silhouette per k and the labels of the best k, renumbered by first appearance."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    scores: dict[int, float] = {}
    best = np.zeros(len(x), dtype=np.int64)  # too few distinct questions: one topic
    best_k = 0
    distinct = len(np.unique(x.round(6), axis=0))
    for k in range(min_k, min(max_k, distinct - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        sample = min(len(x), 4000)  # silhouette is O(n^2): a seeded sample bounds it
        try:
            scores[k] = float(silhouette_score(x, labels, sample_size=sample, random_state=seed))
        except ValueError:  # the sample fell into one cluster
            continue
        if not best_k or scores[k] > scores[best_k]:  # ties: the fewer topics
            best_k, best = k, labels
    order = {label: i for i, label in enumerate(dict.fromkeys(best.tolist()))}
    return scores, np.array([order[label] for label in best.tolist()], dtype=np.int64)


def _topic_names(questions: Sequence[str], labels: np.ndarray, terms: int) -> list[str]:
    """Name each cluster by its most characteristic TF-IDF terms; names are unique."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = int(labels.max()) + 1
    try:
        tfidf = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit(questions)
        matrix = tfidf.transform(questions)
    except ValueError:  # no usable words at all (numbers, stop words only)
        return [f"topic-{c + 1}" for c in range(k)]
    vocab = tfidf.get_feature_names_out()
    overall = np.asarray(matrix.mean(axis=0)).ravel()
    names: list[str] = []
    for c in range(k):
        lift = np.asarray(matrix[labels == c].mean(axis=0)).ravel() - overall
        top = [vocab[t] for t in np.argsort(-lift, kind="stable")[:terms] if lift[t] > 0]
        name = "-".join(top) or f"topic-{c + 1}"
        names.append(name if name not in names else f"{name}-{c + 1}")
    return names


def assign_seeds(items: Sequence[QAItem], vectors: np.ndarray, n_seeds: int) -> list[QAItem]:
    """`dataset.seeds=N`: the first N rows are seeds; every later row joins its nearest seed.

    A dataset expanded elsewhere (seeds first, then their paraphrases) carries no lineage;
    the most similar seed question is the best evidence of which seed a row came from, and
    it makes the group split and the seed-clustered statistics treat a seed's family as one.

    Args:
        items: Loaded items in file order.
        vectors: (n, d) unit-normalised question embeddings, row for row.
        n_seeds: How many leading rows are seeds.

    Returns:
        Items with `seed_id` set (seeds: their own id) and `source` seed / expanded.
    """
    if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or not 1 <= n_seeds <= len(items):
        raise QaLabError(f"dataset.seeds={n_seeds} must be a row count between 1 and {len(items)}")
    if any(it.seed_id not in (None, it.id) for it in items):
        raise QaLabError(
            "dataset.seeds and a seed_id column both give lineage; set only one "
            "(dataset.seeds=null or drop dataset.columns.seed_id)"
        )
    x = _as_matrix(vectors)
    if len(x) != len(items):
        raise ValueError(f"{len(x)} vectors for {len(items)} items")
    seeds = [replace(it, seed_id=it.id, source="seed") for it in items[:n_seeds]]
    rest = items[n_seeds:]
    nearest = np.concatenate(
        [
            np.argmax(x[start : start + _ROW_BLOCK] @ x[:n_seeds].T, axis=1)
            for start in range(n_seeds, len(items), _ROW_BLOCK)
        ]
        or [np.zeros(0, dtype=np.int64)]
    )
    expanded = [
        replace(it, seed_id=seeds[j].id, source="expanded" if it.source == "seed" else it.source)
        for it, j in zip(rest, nearest.tolist())
    ]
    return seeds + expanded


# --------------------------------------------------------------------------- normalisation


def normalize_question(text: str, mode: str) -> str:
    """The key two questions must share to count as exact duplicates.

    Args:
        text: A question.
        mode: `robust` (NFKC, casefold, collapsed whitespace, no trailing ?.!;:) so that
            trivial variants collapse; or `strip_lower`, exactly `text.strip().lower()`, the
            original study's key, kept for reproducing its 2070 -> 2019 step.

    Returns:
        The normalised question.
    """
    require_choice("dataset.normalize", mode, NORMALIZE_MODES)
    if mode == "strip_lower":
        return text.strip().lower()
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return folded.rstrip(TRAILING_PUNCTUATION + " ")


def exact_dedup(
    items: Sequence[QAItem], mode: str
) -> tuple[list[QAItem], list[tuple[QAItem, QAItem]]]:
    """Drop repeated questions, keeping the first occurrence in file order.

    Keep-first makes the result depend only on file order, like the original study.

    Args:
        items: Items in file order.
        mode: Normalisation mode for the comparison key (see `normalize_question`).

    Returns:
        The kept items, and (removed item, the kept item it repeats) pairs.
    """
    first: dict[str, QAItem] = {}
    kept: list[QAItem] = []
    removed: list[tuple[QAItem, QAItem]] = []
    for item in items:
        key = normalize_question(item.question, mode)
        if key in first:
            removed.append((item, first[key]))
        else:
            first[key] = item
            kept.append(item)
    return kept, removed


# --------------------------------------------------------------------------- semantic dedup
#
# Every keep/drop decision uses one similarity: the float64 sum of the exact float64
# products of two float32 rows, computed by `_dot64` in both the naive reference and the
# blockwise version, so the two agree bit for bit. The blockwise version only uses fast
# float32 matrix products to find *candidate* pairs, with a safety margin far above float32
# rounding, so it never misses a pair the exact similarity would flag.
#
# Candidates come from a Cauchy-Schwarz bound with a quarter of the full product's work:
# rotate into principal axes, keep the first k coordinates z_P, and append the norm of the
# rest r. Then x.y = zx_P.zy_P + zx_R.zy_R <= zx_P.zy_P + rx*ry = [zx_P, rx].[zy_P, ry],
# one matrix product over k+1 dims. Where the bound is loose (too many candidates in a tile)
# the full float32 product of the affected rows is computed instead.

_ROW_BLOCK = 1024  # rows resolved together (greedy within the block)
_COL_CHUNK = 8192  # kept rows per matrix product (bounds memory to ~32 MB per tile)
_REFINE_CHUNK = 16384  # candidate pairs per exact float64 batch
_MARGIN = 1e-3  # candidate slack, >> float32 rounding of a 384-d unit dot product (~1e-5)
_LOOSE = 8  # candidates per row above which a tile falls back to the full float32 product


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {matrix.shape}")
    return matrix


def _dot64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of float32 rows in float64: the similarity every decision uses.

    The products of float32 values are exact in float64 and each row is summed by the same
    numpy reduction whatever the batch, so the naive and blockwise paths get identical bits.
    """
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


def _single_blas_thread() -> Any:
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _bound_vectors(x: np.ndarray, k: int | None = None) -> np.ndarray:
    """Rows [z_P, |z_R|] whose dot products bound the true ones from above (see above)."""
    n, d = x.shape
    k = d // 4 if k is None else k
    if d <= 32 or k >= d:
        return x
    # Principal axes of an evenly spaced sample: any orthonormal basis keeps the bound valid,
    # the sample only has to make it tight.
    sample = x[:: max(1, n // _COL_CHUNK)][:_COL_CHUNK].astype(np.float64)
    gram = sample.T @ sample
    with _single_blas_thread():  # multi-threaded LAPACK on a 384x384 matrix is pure overhead
        _, eigvecs = np.linalg.eigh(gram)
    top = np.ascontiguousarray(eigvecs[:, ::-1][:, :k])  # largest second moment first
    out = np.empty((n, k + 1), dtype=np.float32)
    for start in range(0, n, _COL_CHUNK):
        chunk = x[start : start + _COL_CHUNK].astype(np.float64)
        z = chunk @ top
        rest = np.einsum("ij,ij->i", chunk, chunk) - np.einsum("ij,ij->i", z, z)
        out[start : start + len(z), :k] = z
        out[start : start + len(z), k] = np.sqrt(np.maximum(rest, 0.0))
    return out


_LOWER_MASKS: dict[int, np.ndarray] = {}


def _not_lower(m: int) -> np.ndarray:
    """Boolean mask of the diagonal and upper triangle (pairs that are not j < i)."""
    if m not in _LOWER_MASKS:
        _LOWER_MASKS.clear()
        _LOWER_MASKS[m] = ~np.tri(m, m, -1, dtype=bool)
    return _LOWER_MASKS[m]


def _candidates(
    x: np.ndarray,
    bound_rows: np.ndarray,
    bound_cols: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    floor: float,
    *,
    lower: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Global (i, j) pairs of one tile whose similarity may exceed `floor + margin`."""
    sims = bound_rows @ bound_cols.T
    if lower:
        sims[_not_lower(len(rows))] = -np.inf
    # A row maximum first: one cheap pass, then `nonzero` only over rows with candidates.
    hit_rows = np.flatnonzero(sims.max(axis=1) > floor) if sims.size else np.zeros(0, int)
    r2, cj = np.nonzero(sims[hit_rows] > floor)
    if bound_cols.shape[1] < x.shape[1] and r2.size > _LOOSE * len(rows):
        # The bound is loose here: the full float32 product of the rows involved is cheaper
        # than refining every candidate in float64.
        sims = x[rows[hit_rows]] @ x[cols].T
        if lower:
            sims[rows[hit_rows][:, None] <= cols[None, :]] = -np.inf
        r2, cj = np.nonzero(sims > floor)
    return rows[hit_rows[r2]], cols[cj]


def _refine(x: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Exact (float64) similarities of candidate pairs, in bounded-memory batches."""
    out = np.empty(len(ii), dtype=np.float64)
    for start in range(0, len(ii), _REFINE_CHUNK):
        stop = start + _REFINE_CHUNK
        out[start:stop] = _dot64(x[ii[start:stop]], x[jj[start:stop]])
    return out


def _margin(x: np.ndarray) -> float:
    norms = np.einsum("ij,ij->i", x, x) if len(x) else np.zeros(1)
    return _MARGIN * max(1.0, float(norms.max()))


def _check_threshold(threshold: float, key: str) -> float:
    if not -1.0 <= float(threshold) <= 1.0:
        raise QaLabError(f"{key}={threshold} must be a cosine similarity in [-1, 1]")
    return float(threshold)


def semantic_dedup(
    vectors: np.ndarray, threshold: float
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Greedy keep-first paraphrase removal: exactly `naive_semantic_dedup`, blockwise.

    Row i is dropped iff some earlier *kept* row has cosine strictly above `threshold`. Rows
    are resolved in blocks of 1024: candidates against the kept rows of earlier blocks and
    against earlier rows of the same block come from cheap bounded matrix products, are
    checked with the exact similarity, and the block is then resolved in file order.

    Args:
        vectors: (n, d) unit-normalised embeddings in file order (cosine = dot product).
        threshold: Cosine above which a row counts as a paraphrase of a kept row.

    Returns:
        Kept row indices (ascending), and for each removed row (removed index, index of the
        most similar earlier kept row (lowest index on ties), that similarity).
    """
    threshold = _check_threshold(threshold, "dataset.semantic_dedup.threshold")
    x = _as_matrix(vectors)
    n = len(x)
    if n == 0:
        return [], []
    bound = _bound_vectors(x)
    floor = threshold - _margin(x)
    kept_bound = np.empty_like(bound)
    kept_idx = np.empty(n, dtype=np.int64)
    n_kept = 0
    removed: list[tuple[int, int, float]] = []
    for start in range(0, n, _ROW_BLOCK):
        stop = min(n, start + _ROW_BLOCK)
        rows = np.arange(start, stop)
        block = bound[start:stop]
        pairs = []
        for c in range(0, n_kept, _COL_CHUNK):
            hi = min(n_kept, c + _COL_CHUNK)
            pairs.append(
                _candidates(x, block, kept_bound[c:hi], rows, kept_idx[c:hi], floor, lower=False)
            )
        pairs.append(_candidates(x, block, block, rows, rows, floor, lower=True))
        ii = np.concatenate([p[0] for p in pairs])
        jj = np.concatenate([p[1] for p in pairs])
        sims = _refine(x, ii, jj)
        hit = sims > threshold
        ii, jj, sims = ii[hit], jj[hit], sims[hit]
        dropped = np.zeros(stop - start, dtype=bool)
        if len(ii):
            order = np.lexsort((jj, -sims, ii))  # by row, then most similar, then lowest j
            ii, jj, sims = ii[order], jj[order], sims[order]
            (firsts,) = np.nonzero(np.r_[True, ii[1:] != ii[:-1]])
            for lo, hi in zip(firsts, np.r_[firsts[1:], len(ii)]):
                js = jj[lo:hi]
                alive = (js < start) | ~dropped[np.maximum(js - start, 0)]
                if alive.any():
                    best = lo + int(np.argmax(alive))
                    dropped[ii[lo] - start] = True
                    removed.append((int(ii[lo]), int(jj[best]), float(sims[best])))
        keep_rows = rows[~dropped]
        kept_bound[n_kept : n_kept + len(keep_rows)] = bound[keep_rows]
        kept_idx[n_kept : n_kept + len(keep_rows)] = keep_rows
        n_kept += len(keep_rows)
    return kept_idx[:n_kept].tolist(), removed


def naive_semantic_dedup(
    vectors: np.ndarray, threshold: float
) -> tuple[list[int], list[tuple[int, int, float]]]:
    """Reference greedy loop (the original study's procedure), for tests and benchmarks.

    For each row in file order, compare with every kept row; drop it if the best similarity
    is strictly above `threshold`. O(n^2) with a Python loop: fine for a few thousand rows.

    Args:
        vectors: (n, d) unit-normalised embeddings in file order.
        threshold: Cosine above which a row counts as a paraphrase of a kept row.

    Returns:
        Same as `semantic_dedup`.
    """
    threshold = _check_threshold(threshold, "dataset.semantic_dedup.threshold")
    x = _as_matrix(vectors)
    kept_rows = np.empty_like(x)
    kept: list[int] = []
    removed: list[tuple[int, int, float]] = []
    for i in range(len(x)):
        if kept:
            sims = _dot64(kept_rows[: len(kept)], x[i : i + 1])
            best = int(np.argmax(sims))
            if sims[best] > threshold:
                removed.append((i, kept[best], float(sims[best])))
                continue
        kept_rows[len(kept)] = x[i]
        kept.append(i)
    return kept, removed


def similar_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """All pairs (i, j), j < i, with cosine >= `threshold` (inclusive), exact in float64.

    Args:
        vectors: (n, d) unit-normalised embeddings.
        threshold: Minimum cosine of a reported pair.

    Returns:
        (i, j, similarity) triples sorted by i then j.
    """
    threshold = _check_threshold(threshold, "threshold")
    x = _as_matrix(vectors)
    n = len(x)
    if n == 0:
        return []
    bound = _bound_vectors(x)
    floor = threshold - _margin(x)
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    found_s: list[np.ndarray] = []
    for start in range(0, n, _ROW_BLOCK):
        stop = min(n, start + _ROW_BLOCK)
        rows = np.arange(start, stop)
        block = bound[start:stop]
        pairs = []
        for c in range(0, start, _COL_CHUNK):
            hi = min(start, c + _COL_CHUNK)
            cols = np.arange(c, hi)
            pairs.append(_candidates(x, block, bound[c:hi], rows, cols, floor, lower=False))
        pairs.append(_candidates(x, block, block, rows, rows, floor, lower=True))
        ii = np.concatenate([p[0] for p in pairs])
        jj = np.concatenate([p[1] for p in pairs])
        sims = _refine(x, ii, jj)
        hit = sims >= threshold
        found_i.append(ii[hit])
        found_j.append(jj[hit])
        found_s.append(sims[hit])
    ii, jj, ss = (np.concatenate(a) for a in (found_i, found_j, found_s))
    order = np.lexsort((jj, ii))
    return [(int(ii[k]), int(jj[k]), float(ss[k])) for k in order]


# --------------------------------------------------------------------------- splits


def lineage_groups(
    items: Sequence[QAItem], vectors: np.ndarray | None, threshold: float = 0.8
) -> list[str]:
    """Label each item with its lineage group, so a split never separates relatives.

    Items are linked when they share a `seed_id` (a seed and its paraphrases), when one's
    `seed_id` is another's id, or when their questions have cosine >= `threshold`; groups
    are the connected components. Near-duplicates across train and test would otherwise
    make test scores measure memorisation.

    Args:
        items: Items in file order.
        vectors: (n, d) unit-normalised question embeddings, or None to link by seed only.
        threshold: Cosine at which two questions belong together.

    Returns:
        Per item, the id of the first item (in file order) of its group.
    """
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is always the earliest member

    by_id = {item.id: i for i, item in enumerate(items)}
    by_seed: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.seed_id is None:
            continue
        union(i, by_seed.setdefault(item.seed_id, i))
        if item.seed_id in by_id:
            union(i, by_id[item.seed_id])
    if vectors is not None and len(items):
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors for {len(items)} items")
        for i, j, _ in similar_pairs(
            vectors, _check_threshold(threshold, "dataset.split.group_threshold")
        ):
            union(i, j)
    return [items[find(i)].id for i in range(len(items))]


def split_items(
    items: Sequence[QAItem],
    strategy: str,
    *,
    train: float = 0.7,
    val: float = 0.15,
    seed: int = 42,
    groups: Sequence[str] | None = None,
    stratify: str | None = None,
) -> dict[str, list[QAItem]]:
    """Split items into train/val/test (test gets the rest).

    Args:
        items: Items in file order.
        strategy: `random`, exactly the original study's shuffle-and-cut (for reproducing
            its splits), or `group`, which keeps each lineage group in one split.
        train: Fraction for training.
        val: Fraction for validation.
        seed: Seed of the shuffle; the same seed gives the same split.
        groups: Group label per item (see `lineage_groups`); for `group` without it, items
            are grouped by `seed_id` (or their own id).
        stratify: `topic` to balance each topic across splits (group strategy), or None.

    Returns:
        {"train": [...], "val": [...], "test": [...]}.
    """
    require_choice("dataset.split.strategy", strategy, SPLIT_STRATEGIES)
    if not (0.0 <= train <= 1.0 and 0.0 <= val <= 1.0 and train + val <= 1.0 + 1e-9):
        raise QaLabError(
            f"dataset.split.train={train} and dataset.split.val={val} must be fractions "
            "with train + val <= 1"
        )
    if strategy == "random":
        return _random_split(items, train, val, seed)
    if stratify is not None:
        require_choice("dataset.split.stratify", stratify, ("topic",))
    if groups is None:
        groups = [item.seed_id or item.id for item in items]
    if len(groups) != len(items):
        raise ValueError(f"{len(groups)} group labels for {len(items)} items")
    return _group_split(items, groups, (train, val, 1.0 - train - val), seed, stratify)


def _random_split(
    items: Sequence[QAItem], train: float, val: float, seed: int
) -> dict[str, list[QAItem]]:
    # The original: random.seed(seed); random.shuffle(rows). A private Random(seed) yields
    # the same permutation without touching the global generator.
    rows = list(items)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    n_train = int(train * n)
    n_val = int(val * n)
    return {
        "train": rows[:n_train],
        "val": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }


def _group_split(
    items: Sequence[QAItem],
    groups: Sequence[str],
    ratios: tuple[float, float, float],
    seed: int,
    stratify: str | None,
) -> dict[str, list[QAItem]]:
    """Whole groups to splits, keeping every prefix of the group order near the ratios.

    Groups are shuffled with the seed (and, when stratifying, ordered by majority topic);
    each goes to the split furthest below its share of the items seen so far. Each split
    then ends within one group's size of its target, and so does each topic's share.
    """
    members: dict[str, list[int]] = {}
    for i, label in enumerate(groups):
        members.setdefault(label, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    if stratify == "topic":
        order.sort(key=lambda g: _majority_topic(items, members[g]))  # stable: keeps shuffle
    counts = [0, 0, 0]
    seen = 0
    split_of: dict[str, int] = {}
    for label in order:
        seen += len(members[label])
        need = [ratio * seen - count for ratio, count in zip(ratios, counts)]
        best = max(range(3), key=lambda s: need[s])  # ties: train, then val, then test
        split_of[label] = best
        counts[best] += len(members[label])
    out: dict[str, list[QAItem]] = {name: [] for name in SPLIT_NAMES}
    for item, label in zip(items, groups):  # file order within each split
        out[SPLIT_NAMES[split_of[label]]].append(item)
    return out


def _majority_topic(items: Sequence[QAItem], members: Sequence[int]) -> str:
    counts = Counter(items[i].topic for i in members)
    return min(counts, key=lambda t: (-counts[t], t))


# --------------------------------------------------------------------------- audit


def nearest_neighbours(queries: np.ndarray, corpus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine of each query's nearest corpus row (unit-normalised rows).

    Blocked so that 100k queries never build a 100k x N similarity matrix at once. With an
    empty corpus every query gets index -1 and cosine -inf (nothing is near).
    """
    q, c = _as_matrix(queries), _as_matrix(corpus)
    nearest = np.full(len(q), -1, dtype=np.int64)
    best = np.full(len(q), -np.inf)
    if len(c) and len(q):
        for start in range(0, len(q), _ROW_BLOCK):
            sims = q[start : start + _ROW_BLOCK] @ c.T
            nearest[start : start + len(sims)] = sims.argmax(axis=1)
            best[start : start + len(sims)] = sims.max(axis=1)
    return nearest, best


def leakage_audit(
    train: Sequence[QAItem],
    test: Sequence[QAItem],
    train_vecs: np.ndarray,
    test_vecs: np.ndarray,
    *,
    thresholds: tuple[float, ...] = (0.8, 0.9),
) -> dict[str, Any]:
    """Measure how much of the test set is (nearly) in the training set.

    A test question whose nearest training question is a paraphrase rewards memorisation,
    so these numbers go next to every score computed on the split.

    Args:
        train: Training items.
        test: Test items.
        train_vecs: Unit-normalised question embeddings of `train`, row for row.
        test_vecs: Unit-normalised question embeddings of `test`, row for row.
        thresholds: Cosines at which a test question counts as near a training one.

    Returns:
        JSON-ready dict: `n_train`, `n_test`; per threshold t (as `near_dup_<100t>`) the
        count and `_rate` of test questions whose nearest training question has cosine >=
        t; `verbatim_answers` (+ `_rate`): test answers equal, after strip, to a training
        answer; `pairs`: one row per test question at or above the lowest threshold, as
        {test_id, train_id, similarity}, most similar first.
    """
    if len(test_vecs) != len(test) or len(train_vecs) != len(train):
        raise ValueError("vectors must match the items row for row")
    n_test = len(test)
    nearest, best = nearest_neighbours(test_vecs, train_vecs)
    report: dict[str, Any] = {"n_train": len(train), "n_test": n_test}
    for t in thresholds:
        count = int((best >= t).sum())
        name = f"near_dup_{round(t * 100)}"
        report[name] = count
        report[f"{name}_rate"] = count / n_test if n_test else 0.0
    train_answers = {item.answer.strip() for item in train}
    verbatim = sum(item.answer.strip() in train_answers for item in test)
    report["verbatim_answers"] = verbatim
    report["verbatim_answer_rate"] = verbatim / n_test if n_test else 0.0
    low = min(thresholds) if thresholds else math.inf
    flagged = [i for i in np.argsort(-best, kind="stable") if best[i] >= low]
    report["pairs"] = [
        {
            "test_id": test[i].id,
            "train_id": train[nearest[i]].id,
            "similarity": round(float(best[i]), 6),
        }
        for i in flagged
    ]
    return report
