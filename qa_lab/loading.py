"""Loading a QA file (jsonl, json, csv, tsv, parquet, a saved HF dataset): columns, rows, errors.

A user's file meets the project here, so every problem is reported as one line naming the
file and line (or row) and the setting to change. Which column became which field is
returned, never silent; rows without a usable question or answer stop the load or are
counted by reason (`dataset.on_bad_row`).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Number
from pathlib import Path
from typing import Any

from qa_lab.errors import QaLabError, require_choice
from qa_lab.jsonl import read_jsonl
from qa_lab.records import EvalRow, QAItem
from qa_lab.topics import clean_topics

FIELDS = ("id", "question", "answer", "topic", "difficulty", "seed_id", "evidence")
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
    # where the answer is written in the corpus (`source` already names who wrote a row)
    "evidence": ("evidence", "source_document", "document", "doc_id"),
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

Row = dict[str, Any]


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
    encoding: str,
    fmt: str,
    columns: Mapping[str, str | None] | None,
    on_bad_row: str,
    similar_labels: float,
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
        if fld not in ("answer", "evidence"):
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
        evidence=parse_evidence(row.get(mapping["evidence"] or ""), loc),
    )


def parse_evidence(value: Any, loc: str) -> dict[str, str] | None:
    """A row's evidence: "doc", "doc#Section" or {document, section?, quote?, chunk?}.

    Returned as a dict of non-empty strings with `document` always present (None: no evidence).
    """
    value = _cell(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        document, _, section = value.strip().partition("#")
        value = {"document": document, "section": section}
    if not isinstance(value, dict) or not str(value.get("document") or "").strip():
        raise BadRow(
            f'{loc}: evidence must be "document", "document#section" or an object with a '
            f"document (got {str(value)[:60]!r})",
            "bad_evidence",
        )
    known = ("document", "section", "quote", "chunk")
    return {k: str(value[k]).strip() for k in known if str(value.get(k) or "").strip()}


def _check_unique_ids(items: Sequence[QAItem], where: Sequence[str]) -> None:
    first: dict[str, str] = {}
    for item, loc in zip(items, where):
        if item.id in first:
            raise QaLabError(
                f"{loc}: duplicate id {item.id!r} (first at {first[item.id]}); ids must be unique"
            )
        first[item.id] = loc


def read_predictions(path: Path) -> list[EvalRow]:
    """Rows of a predictions file (`{question, prediction, reference}` per line) to score.

    An id comes from `id` or `item_id`, else the line number; other columns are kept.
    """
    raw = read_jsonl(path)
    if not raw:
        raise QaLabError(f"{path}: no rows")
    rows = []
    for lineno, row in enumerate(raw, start=1):
        for field in ("question", "prediction", "reference"):
            if not isinstance(row.get(field), str):
                raise QaLabError(f"{path}:{lineno}: missing or non-string field {field!r}")
        item_id = str(row.get("id", row.get("item_id", lineno)))
        rows.append(EvalRow.from_dict({**row, "item_id": item_id}, where=f"{path}:{lineno}"))
    return rows
