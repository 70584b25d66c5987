import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qa_lab import data
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem

EMBEDDER = "all-MiniLM-L6-v2"
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "rag-technical-qa"


def embed(texts):
    from qa_lab.retrieval import embed as real_embed

    return real_embed(texts, EMBEDDER)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path, **kwargs):
    loaded = data.load_items(path, **kwargs)
    return loaded.items, loaded.mapping


def item(i, question=None, topic="", seed_id=None, answer=None):
    return QAItem(
        id=f"q{i}",
        question=question or f"question {i}",
        answer=answer or f"answer {i}",
        topic=topic,
        seed_id=seed_id,
    )


# --------------------------------------------------------------------------- loading


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
    }
    assert items[0] == QAItem("a", "x?", "y", topic="t", seed_id="a", topic_source="mapped")


def test_unknown_mapped_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "x?", "answer": "y"}])
    with pytest.raises(QaLabError, match=r"dataset.columns.question='prompt'.*question, answer"):
        load(path, columns={"question": "prompt"})
    with pytest.raises(QaLabError, match=r"no answer column found; its columns are: q"):
        data.resolve_columns(["q"], source=path)


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


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "text,robust,strip_lower",
    [
        ("  What is TCP?  ", "what is tcp", "what is tcp?"),
        ("What  is\tTCP ?!", "what is tcp", "what  is\ttcp ?!"),
        ("ＷＨＡＴ is ﬁle I/O？", "what is file i/o", "ｗｈａｔ is ﬁle i/o？"),
        ("Straße: define it.", "strasse: define it", "straße: define it."),
        ("e.g. what is x", "e.g. what is x", "e.g. what is x"),
    ],
)
def test_normalize_question(text, robust, strip_lower):
    assert data.normalize_question(text, "robust") == robust
    assert data.normalize_question(text, "strip_lower") == strip_lower == text.strip().lower()


def test_normalize_unknown_mode():
    with pytest.raises(QaLabError, match=r"dataset\.normalize='fuzzy'"):
        data.normalize_question("x", "fuzzy")


def test_exact_dedup_keeps_first():
    items = [
        item(1, "What is TCP?"),
        item(2, "what is tcp"),
        item(3, "What is UDP?"),
        item(4, " WHAT IS TCP? "),
    ]
    kept, removed = data.exact_dedup(items, "robust")
    assert [it.id for it in kept] == ["q1", "q3"]
    assert [(r.id, k.id) for r, k in removed] == [("q2", "q1"), ("q4", "q1")]
    kept, removed = data.exact_dedup(items, "strip_lower")
    assert [it.id for it in kept] == ["q1", "q2", "q3"]
    assert [(r.id, k.id) for r, k in removed] == [("q4", "q1")]


# --------------------------------------------------------------------------- semantic dedup


def planted(n_base, n_copies, d=384, seed=0, cluster=0):
    """Random unit vectors plus noisy copies whose cosine to their source spans ~0.8-1.0."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.integers(0, n_base, n_copies)
    noise = rng.standard_normal((n_copies, d))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = base[src] + rng.uniform(0.0, 0.75, (n_copies, 1)) * noise
    parts = [base, copies]
    if cluster:  # many near-identical rows: exercises the loose-bound fallback
        parts.append(base[:1] + 0.05 * rng.standard_normal((cluster, d)) / np.sqrt(d))
    x = np.concatenate(parts)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x[rng.permutation(len(x))], dtype=np.float32)


def test_semantic_dedup_equals_naive_with_planted_duplicates():
    x = planted(2000, 900, cluster=300)
    fast = data.semantic_dedup(x, 0.9)
    naive = data.naive_semantic_dedup(x, 0.9)
    assert fast == naive
    kept, removed = fast
    sims = np.array([s for _, _, s in removed])
    assert 700 < len(removed) < 1200  # real work done, on both sides of the threshold
    assert (sims > 0.9).all() and (sims < 0.92).any()
    assert all(j < i and j in set(kept) for i, j, _ in removed)


@pytest.mark.parametrize("loose", [8, 0])
def test_semantic_dedup_equals_naive_small_tiles(monkeypatch, loose):
    # Small tiles: many row blocks and kept-row chunks; loose=0 forces the full-product
    # fallback on every tile with a candidate.
    monkeypatch.setattr(data, "_ROW_BLOCK", 128)
    monkeypatch.setattr(data, "_COL_CHUNK", 256)
    monkeypatch.setattr(data, "_REFINE_CHUNK", 100)
    monkeypatch.setattr(data, "_LOOSE", loose)
    x = planted(700, 400, seed=2, cluster=60)
    assert data.semantic_dedup(x, 0.9) == data.naive_semantic_dedup(x, 0.9)
    pairs = data.similar_pairs(x, 0.8)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.nonzero(np.tril(sims >= 0.8, -1))
    assert [(a, b) for a, b, _ in pairs] == sorted(zip(i.tolist(), j.tolist()))


def test_semantic_dedup_tie_at_threshold_is_not_a_duplicate():
    x = planted(300, 200, seed=1)
    _, removed = data.naive_semantic_dedup(x, 0.9)
    tie_pair = removed[len(removed) // 2]
    tie = tie_pair[2]  # exactly one pair's similarity, as a threshold
    fast = data.semantic_dedup(x, tie)
    assert fast == data.naive_semantic_dedup(x, tie)
    assert all(s > tie for _, _, s in fast[1])
    assert tie_pair[0] not in {i for i, _, _ in fast[1]}  # strict: equal is not above


def test_semantic_dedup_small_dimension_and_exact_copies():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    x = np.concatenate([x, x[:50]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert data.semantic_dedup(x, 0.95) == data.naive_semantic_dedup(x, 0.95)
    assert data.semantic_dedup(x[:0], 0.9) == ([], [])


def test_semantic_dedup_on_real_embeddings():
    questions = [
        "What is a closure in JavaScript?",
        "How does garbage collection work in Java?",
        "What is a JavaScript closure?",
        "Explain closures in JavaScript.",
        "Explain garbage collection in Java.",
        "What is the CAP theorem?",
    ]
    kept, removed = data.semantic_dedup(embed(questions), 0.9)
    assert kept == [0, 1, 5]
    assert [(i, j) for i, j, _ in removed] == [(2, 0), (3, 0), (4, 1)]


# --------------------------------------------------------------------------- splits


def test_random_split_is_the_original_procedure():
    items = [item(i) for i in range(101)]
    rows = list(items)
    random.seed(7)
    random.shuffle(rows)
    n_train, n_val = int(0.7 * 101), int(0.15 * 101)
    expected = {
        "train": rows[:n_train],
        "val": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }
    assert data.split_items(items, "random", seed=7) == expected
    assert [len(v) for v in expected.values()] == [70, 15, 16]


@pytest.mark.parametrize("strategy", ["random", "group"])
def test_split_determinism(strategy):
    items = [item(i, topic=f"t{i % 3}") for i in range(200)]
    groups = [f"g{i // 3}" for i in range(200)]
    a = data.split_items(items, strategy, seed=1, groups=groups, stratify=None)
    assert a == data.split_items(items, strategy, seed=1, groups=groups)
    assert a != data.split_items(items, strategy, seed=2, groups=groups)
    assert sorted(it.id for part in a.values() for it in part) == sorted(it.id for it in items)


@pytest.mark.parametrize("stratify", [None, "topic"])
def test_group_split_integrity_and_ratios(stratify):
    rng = random.Random(0)
    groups = [f"g{g}" for g in range(400) for _ in range(rng.randint(1, 5))]
    items = [item(i, topic=f"t{int(g[1:]) % 4}") for i, g in enumerate(groups)]
    parts = data.split_items(items, "group", seed=3, groups=groups, stratify=stratify)
    split_of = {it.id: name for name, part in parts.items() for it in part}
    by_group = {}
    for it, g in zip(items, groups):
        by_group.setdefault(g, set()).add(split_of[it.id])
    assert all(len(s) == 1 for s in by_group.values())
    n = len(items)
    for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(parts[name]) - ratio * n) <= 5
    if stratify:
        for topic in ("t0", "t1", "t2", "t3"):
            total = sum(it.topic == topic for it in items)
            in_test = sum(it.topic == topic for it in parts["test"])
            assert abs(in_test - 0.15 * total) <= 6


def test_split_errors():
    items = [item(i) for i in range(10)]
    with pytest.raises(QaLabError, match=r"dataset\.split\.strategy='stratified'"):
        data.split_items(items, "stratified")
    with pytest.raises(QaLabError, match=r"dataset\.split\.train=0\.9"):
        data.split_items(items, "random", train=0.9, val=0.2)
    with pytest.raises(QaLabError, match=r"dataset\.split\.stratify='answer'"):
        data.split_items(items, "group", stratify="answer")


def test_lineage_groups_and_group_split_with_real_embeddings():
    questions = [
        "What is a closure in JavaScript?",
        "How does garbage collection work in Java?",
        "What is the difference between TCP and UDP?",
        "Explain closures in JavaScript.",
        "What is polymorphism in object-oriented programming?",
        "Explain polymorphism in OOP.",  # 0.79 to the previous one: below 0.8
        "How do TCP and UDP differ?",
        "What is a deadlock?",
        "Deadlocks: give an example.",
        "What is the CAP theorem?",
        "What is a B-tree?",
        "How are B-tree nodes split?",
    ]
    items = [item(i, q, seed_id=f"q{i}") for i, q in enumerate(questions)]
    items[8] = QAItem("q8", questions[8], "a", seed_id="q7", source="paraphrase")
    # Two paraphrases of a seed that dedup removed still belong together.
    items[10] = QAItem("q10", questions[10], "a", seed_id="gone", source="paraphrase")
    items[11] = QAItem("q11", questions[11], "a", seed_id="gone", source="paraphrase")
    groups = data.lineage_groups(items, embed(questions), 0.8)
    assert groups == ["q0", "q1", "q2", "q0", "q4", "q5", "q2", "q7", "q7", "q9", "q10", "q10"]
    assert data.lineage_groups(items, None)[3] == "q3"
    for seed in range(5):
        parts = data.split_items(items, "group", train=0.5, val=0.25, seed=seed, groups=groups)
        where = {it.id: name for name, part in parts.items() for it in part}
        for a, b in (("q0", "q3"), ("q2", "q6"), ("q7", "q8"), ("q10", "q11")):
            assert where[a] == where[b]


# --------------------------------------------------------------------------- audit


def test_leakage_audit():
    train = [
        item(0, "What is a closure in JavaScript?", answer="A function with its scope."),
        item(1, "How does garbage collection work in Java?", answer="Tracing."),
    ]
    test = [
        item(2, "Explain closures in JavaScript.", answer="  A function with its scope. "),
        item(3, "Explain garbage collection in Java.", answer="Marks and sweeps."),
        item(4, "What is the CAP theorem?", answer="Consistency, availability, partitions."),
    ]
    vecs = embed([it.question for it in train + test])
    audit = data.leakage_audit(train, test, vecs[:2], vecs[2:])
    assert audit["n_test"] == 3 and audit["n_train"] == 2
    assert audit["near_dup_80"] == 2 and audit["near_dup_90"] == 2
    assert audit["near_dup_80_rate"] == pytest.approx(2 / 3)
    assert audit["verbatim_answers"] == 1
    assert [(p["test_id"], p["train_id"]) for p in audit["pairs"]] == [("q3", "q1"), ("q2", "q0")]
    json.dumps(audit)  # goes to a JSON file and MLflow as is


# --------------------------------------------------------------------------- reproduction


@pytest.mark.slow
def test_reproduces_original_study_preprocessing(tmp_path):
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE}")
    from qa_lab.retrieval import embed as real_embed

    def pairs(name):
        return [json.loads(line) for line in (REFERENCE / name).read_text().splitlines()]

    def plain(items):
        return [{"question": it.question, "answer": it.answer} for it in items]

    items, _ = load(REFERENCE / "dataset.jsonl")
    assert len(items) == 2070
    items, _ = data.exact_dedup(items, "strip_lower")
    assert plain(items) == pairs("dataset_no_duplicates.jsonl")
    vectors = real_embed([it.question for it in items], EMBEDDER, cache_dir=tmp_path)
    kept, _ = data.semantic_dedup(vectors, 0.9)
    items = [items[i] for i in kept]
    assert plain(items) == pairs("dataset_semantic_filtered.jsonl")
    splits = data.split_items(items, "random", seed=42)
    assert Counter({k: len(v) for k, v in splits.items()}) == Counter(train=1264, val=270, test=272)
    for name in ("train", "val", "test"):
        assert plain(splits[name]) == pairs(f"{name}.jsonl"), name


# --------------------------------------------------------------------------- user files

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
    assert mapping == {**columns, "difficulty": None, "seed_id": None}
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
        data.load_items(path)
    loaded = data.load_items(path, on_bad_row="skip")
    assert [it.id for it in loaded.items] == ["row-00001", "row-00005"]  # ids keep file rows
    assert loaded.skipped == {
        "empty_answer": 1,
        "empty_question": 1,
        "missing_answer": 1,
        "not_text_question": 1,
    }
    with pytest.raises(QaLabError, match=r"dataset\.on_bad_row='drop' is not one of"):
        data.load_items(path, on_bad_row="drop")


def test_list_answers_become_references(tmp_path):
    rows = [
        {"question": "a?", "answer": ["first", " ", "second"]},
        {"question": "c?", "answer": ["only"]},
        {"question": "e?", "answer": []},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(QaLabError, match=r"d\.jsonl:3: empty answer"):
        data.load_items(path)
    items = data.load_items(path, on_bad_row="skip").items
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
    loaded = data.load_items(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [it.topic for it in loaded.items[:4]] == ["Networking"] * 4
    assert loaded.topics["merged"] == {"networking": "Networking", "NETWORKING": "Networking"}
    assert [pair[:2] for pair in loaded.topics["similar"]] == [
        ["data structures", "data_structures"],
        ["algorithm", "algorithms"],
    ]
    assert loaded.topics["labels"]["Networking"] == 4 and loaded.topics["source"] == "mapped"
    assert {it.topic for it in loaded.items} >= {"data structures", "data_structures"}  # kept


def test_inferred_topics_follow_the_question_families():
    rows = family_rows()
    items = [QAItem(r["id"], r["q"], r["a"]) for r in rows]
    vectors = embed([it.question for it in items])
    labelled, report = data.infer_topics(items, vectors, min_k=2, max_k=6, seed=0)
    family = {r["id"]: r["seed_id"] for r in rows}
    by_family: dict[str, set[str]] = {}
    for it in labelled:
        by_family.setdefault(family[it.id], set()).add(it.topic)
    assert all(len(t) == 1 for t in by_family.values()), by_family
    assert len(set().union(*by_family.values())) == report["k"] == 4
    assert {it.topic_source for it in labelled} == {"inferred"}
    assert max(report["silhouette"].values()) == report["silhouette"]["4"]
    names = {family[it.id]: it.topic for it in labelled}
    assert "tcp" in names["s0"] and "sql" in names["s1"] and "binary" in names["s3"], names
    again, _ = data.infer_topics(items, vectors, min_k=2, max_k=6, seed=0)
    assert again == labelled  # seeded
    with pytest.raises(QaLabError, match=r"dataset\.topics\.min_k=1"):
        data.infer_topics(items, vectors, min_k=1, max_k=6)


def test_seeds_n_gives_the_seed_id_columns_lineage(tmp_path):
    rows = family_rows()
    with_col = load(
        write_jsonl(tmp_path / "a.jsonl", rows), columns={"question": "q", "answer": "a"}
    )[0]
    bare = [{k: v for k, v in r.items() if k != "seed_id"} for r in rows]
    without = load(
        write_jsonl(tmp_path / "b.jsonl", bare), columns={"question": "q", "answer": "a"}
    )[0]
    assert {it.seed_id for it in without} == {it.id for it in without}  # no lineage yet
    assigned = data.assign_seeds(without, embed([it.question for it in without]), len(FAMILIES))
    assert assigned == with_col
    assert data.lineage_groups(assigned, None) == data.lineage_groups(with_col, None)
    assert [it.source for it in with_col] == ["seed"] * 4 + ["expanded"] * 8
    with pytest.raises(QaLabError, match=r"dataset\.seeds and a seed_id column"):
        data.assign_seeds(with_col, embed([it.question for it in with_col]), 4)
    with pytest.raises(QaLabError, match=r"dataset\.seeds=13 must be a row count between 1 and 12"):
        data.assign_seeds(without, embed([it.question for it in without]), 13)


@pytest.mark.slow
def test_build_dataset_infers_topics_and_uses_seed_lineage(tmp_path):
    """Two real builds: a CSV with a seed_id column, and the same rows bare with seeds=N."""
    import mlflow

    from qa_lab import stages
    from tests.conftest import MODELS_DIR, compose_cfg

    rows = family_rows()
    bare = [{k: v for k, v in r.items() if k != "seed_id"} for r in rows]
    splits = {}
    for name, source, extra in [
        ("column", write_format(tmp_path / "col.csv", "csv", rows), []),
        ("seeds", write_format(tmp_path / "bare.parquet", "parquet", bare), ["dataset.seeds=4"]),
    ]:
        cfg = compose_cfg(
            "build_dataset",
            [
                f"paths.cache={tmp_path / 'cache'}",
                f"paths.models={MODELS_DIR}",
                f"paths.mlruns={tmp_path / 'mlruns'}",
                f"dataset.source={source}",
                "dataset.synthesis.backend=none",
                "dataset.columns.question=q",
                "dataset.columns.answer=a",
                "dataset.topics.max_k=6",
                "dataset.split.train=0.5",
                "dataset.split.val=0.25",
                *extra,
            ],
        )
        folder = stages.build_dataset(cfg)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["topics"]["source"] == "inferred" and manifest["topics"]["k"] >= 2
        assert manifest["lineage"] == ("seed_id column" if name == "column" else "dataset.seeds=4")
        splits[name] = {
            s: sorted(
                (r["id"], r["seed_id"], r["source"], r["topic"])
                for r in map(json.loads, (folder / f"{s}.jsonl").read_text().splitlines())
            )
            for s in ("train", "val", "test")
        }
        assert all(r[3] in manifest["topics"]["labels"] for rs in splits[name].values() for r in rs)
        mlflow.set_tracking_uri(cfg.tracking.uri)
        (run,) = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`qa_lab.key` = '{manifest['key']}'",
            output_format="list",
        )
        assert run.data.tags["qa_lab.topic_source"] == "inferred"
        assert run.data.params["mapping.question"] == "q"
    assert splits["seeds"] == splits["column"]  # same lineage, same groups, same split
    split_of_family = {}
    for split, split_rows in splits["column"].items():
        for _, seed_id, _, _ in split_rows:
            assert split_of_family.setdefault(seed_id, split) == split  # no family straddles
    assert sorted(split_of_family) == ["s0", "s1", "s2", "s3"]
