import json

import pytest

from qa_lab import loading
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from tests.qa_files import load, load_items, write_format, write_jsonl


def test_load_jsonl_defaults_ids_lineage_and_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "What is TCP?", "answer": "A protocol.", "topic": "net"},
            {
                "question": "Define TCP.",
                "answer": "A protocol.",
                "source": "paraphrase",
                "seed_id": "row-00001",
                "generator": "smol",
            },
        ],
    )
    items, mapping = load(path)
    assert mapping == {
        "id": None,
        "question": "question",
        "answer": "answer",
        "topic": "topic",
        "difficulty": None,
        "seed_id": "seed_id",
        "evidence": None,
    }
    assert [it.id for it in items] == ["row-00001", "row-00002"]
    assert items[0].seed_id == "row-00001" and items[0].source == "seed"
    assert items[0].topic == "net"
    assert (items[1].source, items[1].seed_id, items[1].generator) == (
        "paraphrase",
        "row-00001",
        "smol",
    )


def test_column_auto_mapping_query_response(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"Query": "What is DNS?", "response": "Names."}])
    items, mapping = load(path)
    assert mapping["question"] == "Query" and mapping["answer"] == "response"
    assert (items[0].question, items[0].answer) == ("What is DNS?", "Names.")


def test_explicit_columns(tmp_path):
    rows = [{"uid": "a", "q": "x?", "ans": "y", "cat": "t", "reference": "other"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    items, mapping = load(path, columns={"id": "uid", "answer": "ans", "topic": "cat"})
    assert mapping == {
        "id": "uid",
        "question": "q",
        "answer": "ans",
        "topic": "cat",
        "difficulty": None,
        "seed_id": None,
        "evidence": None,
    }
    assert items[0] == QAItem("a", "x?", "y", topic="t", seed_id="a", topic_source="mapped")


def test_unknown_mapped_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "x?", "answer": "y"}])
    with pytest.raises(QaLabError, match=r"dataset.columns.question='prompt'.*question, answer"):
        load(path, columns={"question": "prompt"})
    with pytest.raises(QaLabError, match=r"no answer column found; its columns are: q"):
        loading.resolve_columns(["q"], source=path)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a?", "answer": "b"}\n\n{"question": "c?", "answer"\n')
    with pytest.raises(QaLabError, match=r"d\.jsonl:3: malformed JSON"):
        load(path)


def test_invalid_utf8_names_encoding_option(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"question": "ok?", "answer": "b"}\n{"question": "caf\xe9?", "answer": "b"}\n'
    )
    with pytest.raises(QaLabError, match=r"d\.jsonl:2: .*dataset\.encoding="):
        load(path)
    items, _ = load(path, encoding="latin-1")
    assert items[1].question == "café?"


def test_missing_and_empty_fields_name_line(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "a?", "answer": "b"}, {"question": "c?"}]
    )
    with pytest.raises(QaLabError, match=r"d\.jsonl:2: missing answer"):
        load(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "a?", "answer": "b"}] * 2)
    path.write_text(path.read_text() + json.dumps({"question": "  ", "answer": "b"}) + "\n")
    with pytest.raises(QaLabError, match=r"e\.jsonl:3: empty question"):
        load(path)


def test_duplicate_ids(tmp_path):
    rows = [
        {"id": "x", "question": "a?", "answer": "b"},
        {"id": "x", "question": "c?", "answer": "d"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(QaLabError, match=r"d\.jsonl:2: duplicate id 'x' \(first at .*d\.jsonl:1\)"):
        load(path)


@pytest.mark.parametrize("name,text", [("d.jsonl", "\n\n"), ("d.csv", "question,answer\n")])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(QaLabError, match=r"no data rows \(empty file\)"):
        load(path)


def test_csv_cp1252_with_encoding(tmp_path):
    path = tmp_path / "d.csv"
    text = 'question,answer,category\n"What’s a “closure”?","A function, with state – née",js\n'
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(QaLabError, match=r"d\.csv:2: not valid utf-8.*dataset\.encoding="):
        load(path)
    items, mapping = load(path, encoding="cp1252")
    assert items[0].question == "What’s a “closure”?"
    assert items[0].answer == "A function, with state – née"
    assert items[0].topic == "js" and mapping["topic"] == "category"


def test_csv_row_line_numbers_and_malformed_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"multi\nline?",yes\n\n"q2?",\n')
    with pytest.raises(QaLabError, match=r"d\.csv:5: empty answer"):
        load(path)
    path.write_text('question,answer\n"multi\nline?",\n')
    with pytest.raises(QaLabError, match=r"d\.csv:2: empty answer"):  # where the row starts
        load(path)
    path.write_text("question,answer\na?,b,c\n")
    with pytest.raises(QaLabError, match=r"d\.csv:2: malformed row"):
        load(path)


def test_tsv_json_parquet_and_hf_formats(tmp_path):
    rows = [
        {"id": "1", "prompt": "a?", "completion": "b"},
        {"id": "2", "prompt": "c?", "completion": "d"},
    ]
    expected = [QAItem("1", "a?", "b", seed_id="1"), QAItem("2", "c?", "d", seed_id="2")]
    (tmp_path / "d.tsv").write_text("id\tprompt\tcompletion\n1\ta?\tb\n2\tc?\td\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pandas as pd
    from datasets import Dataset

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for name in ("d.tsv", "d.json", "lines.json", "d.parquet", "hf"):
        assert load(tmp_path / name)[0] == expected, name


def test_bad_format_and_encoding_options(tmp_path):
    path = write_jsonl(tmp_path / "d.txt", [{"question": "a?", "answer": "b"}])
    with pytest.raises(QaLabError, match=r"dataset\.format="):
        load(path)
    assert load(path, fmt="jsonl")[0][0].question == "a?"
    with pytest.raises(QaLabError, match=r"dataset\.encoding='nope'"):
        load(path, fmt="jsonl", encoding="nope")
    with pytest.raises(QaLabError, match=r"file not found"):
        load(tmp_path / "missing.jsonl")


ALL_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "hf")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_with_mapped_and_recognised_columns(tmp_path, fmt):
    odd = [
        {"Nr": "7", "Frage": "Was ist TCP?", "Antwort": "Ein Protokoll.", "Bereich": "net"},
        {"Nr": "8", "Frage": "Was ist SQL?", "Antwort": "Eine Sprache.", "Bereich": "db"},
    ]
    path = write_format(tmp_path / f"odd.{fmt}", fmt, odd)
    columns = {"id": "Nr", "question": "Frage", "answer": "Antwort", "topic": "Bereich"}
    items, mapping = load(path, fmt=fmt, columns=columns)
    assert mapping == {**columns, "difficulty": None, "seed_id": None, "evidence": None}
    assert [(it.id, it.question, it.answer, it.topic) for it in items] == [
        ("7", "Was ist TCP?", "Ein Protokoll.", "net"),
        ("8", "Was ist SQL?", "Eine Sprache.", "db"),
    ]
    with pytest.raises(QaLabError, match=r"dataset\.columns\.question='Question'.*Nr, Frage"):
        load(path, fmt=fmt, columns={"question": "Question"})
    common = [
        {"query": r["Frage"], "response": r["Antwort"], "Category": r["Bereich"]} for r in odd
    ]
    path = write_format(tmp_path / f"common.{fmt}", fmt, common)
    items, mapping = load(path)  # format from the extension (or the folder)
    assert (mapping["question"], mapping["answer"], mapping["topic"]) == (
        "query",
        "response",
        "Category",
    )
    assert [(it.id, it.answer, it.topic_source) for it in items] == [
        ("row-00001", "Ein Protokoll.", "mapped"),
        ("row-00002", "Eine Sprache.", "mapped"),
    ]


def test_cp1252_csv_with_crlf(tmp_path):
    text = (
        "Question;Answer;Category\n"
        '"What’s a “closure”?";"A function, with state – née";js\n'
        '"Two\nlines?";"€5";py\n'
        "Third?;x\u00e9;py\n"
    ).replace("\n", "\r\n")
    path = tmp_path / "export.csv"
    path.write_bytes(text.encode("cp1252"))  # Excel "CSV (;)" on Windows
    items, mapping = load(path, encoding="cp1252")
    assert [(it.question, it.answer, it.topic) for it in items] == [
        ("What’s a “closure”?", "A function, with state – née", "js"),
        ("Two\r\nlines?", "€5", "py"),
        ("Third?", "xé", "py"),
    ]
    assert mapping["question"] == "Question"
    with pytest.raises(
        QaLabError, match=r"export\.csv:2: not valid utf-8 .*dataset\.encoding=cp1252"
    ) as err:
        load(path)
    assert "\n" not in str(err.value)
    path.write_bytes(text.encode("utf-8"))  # the same text saved as UTF-8: cp1252 would mangle it
    with pytest.raises(QaLabError, match=r"export\.csv:2: the file is UTF-8.*dataset\.encoding="):
        load(path, encoding="cp1252")
    assert load(path)[0][0].question == "What’s a “closure”?"


def test_jsonl_stray_lines_rejected_at_their_line(tmp_path):
    good = json.dumps({"question": "a?", "answer": "b"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\r\n\r\n{good}\r\nExported 2 rows\r\n{good}\r\n", encoding="utf-8")
    with pytest.raises(QaLabError, match=r"d\.jsonl:4: malformed JSON .*one JSON object"):
        load(path)
    path.write_text(f"// comment\n{good}\n", encoding="utf-8")
    with pytest.raises(QaLabError, match=r"d\.jsonl:1: malformed JSON"):
        load(path)
    path.write_text(f"{good}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(QaLabError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        load(path)


def test_on_bad_row_skip_counts_reasons(tmp_path):
    rows = [
        {"question": "a?", "answer": "b"},
        {"question": "c?"},
        {"question": " ", "answer": "d"},
        {"question": "e?", "answer": ""},
        {"question": "f?", "answer": "g"},
        {"question": {"x": 1}, "answer": "h"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(QaLabError, match=r"d\.jsonl:2: missing answer.*dataset\.on_bad_row=skip"):
        load_items(path)
    loaded = load_items(path, on_bad_row="skip")
    assert [it.id for it in loaded.items] == ["row-00001", "row-00005"]  # ids keep file rows
    assert loaded.skipped == {
        "empty_answer": 1,
        "empty_question": 1,
        "missing_answer": 1,
        "not_text_question": 1,
    }
    with pytest.raises(QaLabError, match=r"dataset\.on_bad_row='drop' is not one of"):
        load_items(path, on_bad_row="drop")


def test_list_answers_become_references(tmp_path):
    rows = [
        {"question": "a?", "answer": ["first", " ", "second"]},
        {"question": "c?", "answer": ["only"]},
        {"question": "e?", "answer": []},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(QaLabError, match=r"d\.jsonl:3: empty answer"):
        load_items(path)
    items = load_items(path, on_bad_row="skip").items
    assert (items[0].answer, items[0].references) == ("first", ("first", "second"))
    assert (items[1].answer, items[1].references) == ("only", None)
    assert QAItem.from_dict(json.loads(json.dumps(items[0].to_dict()))) == items[0]
    import pandas as pd

    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "d.parquet")
    assert load(tmp_path / "d.parquet")[0][0].references == ("first", "second")


def test_mapped_topics_cleaned_and_look_alikes_reported(tmp_path):
    topics = ["Networking", "networking ", "Networking", "NETWORKING", "data structures"]
    topics += ["data_structures", "algorithm", "algorithms", "os"]
    rows = [{"question": f"q{i}?", "answer": "a", "topic": t} for i, t in enumerate(topics)]
    loaded = load_items(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [it.topic for it in loaded.items[:4]] == ["Networking"] * 4
    assert loaded.topics["merged"] == {"networking": "Networking", "NETWORKING": "Networking"}
    assert [pair[:2] for pair in loaded.topics["similar"]] == [
        ["data structures", "data_structures"],
        ["algorithm", "algorithms"],
    ]
    assert loaded.topics["labels"]["Networking"] == 4 and loaded.topics["source"] == "mapped"
    assert {it.topic for it in loaded.items} >= {"data structures", "data_structures"}  # kept


def test_evidence_as_text_or_object_and_bad_evidence(tmp_path):
    rows = [
        {"question": "a?", "answer": "x", "evidence": "db/indexing.md#B-Trees"},
        {"question": "b?", "answer": "y", "evidence": "db/indexing.md"},
        {"question": "c?", "answer": "z", "evidence": {"document": "os/vm.md", "quote": " q "}},
        {"question": "d?", "answer": "w"},
    ]
    items, mapping = load(write_jsonl(tmp_path / "e.jsonl", rows))
    assert mapping["evidence"] == "evidence"
    assert [it.evidence for it in items] == [
        {"document": "db/indexing.md", "section": "B-Trees"},
        {"document": "db/indexing.md"},
        {"document": "os/vm.md", "quote": "q"},
        None,
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:1], {**rows[0], "evidence": {"q": "x"}}])
    with pytest.raises(QaLabError, match=r"bad.jsonl:2: evidence must be"):
        load(bad)
