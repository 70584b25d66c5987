import pytest

from qa_lab import dataset, lineage
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from tests.qa_files import FAMILIES, embed, family_rows, item, load, write_jsonl


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
    groups = lineage.lineage_groups(items, embed(questions), 0.8)
    assert groups == ["q0", "q1", "q2", "q0", "q4", "q5", "q2", "q7", "q7", "q9", "q10", "q10"]
    assert lineage.lineage_groups(items, None, 0.8)[3] == "q3"
    for seed in range(5):
        parts = dataset.split_items(items, "group", train=0.5, val=0.25, seed=seed, groups=groups)
        where = {it.id: name for name, part in parts.items() for it in part}
        for a, b in (("q0", "q3"), ("q2", "q6"), ("q7", "q8"), ("q10", "q11")):
            assert where[a] == where[b]


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
    assigned = lineage.assign_seeds(without, embed([it.question for it in without]), len(FAMILIES))
    assert assigned == with_col
    assert lineage.lineage_groups(assigned, None, 0.8) == lineage.lineage_groups(
        with_col, None, 0.8
    )
    assert [it.source for it in with_col] == ["seed"] * 4 + ["expanded"] * 8
    with pytest.raises(QaLabError, match=r"dataset\.seeds and a seed_id column"):
        lineage.assign_seeds(with_col, embed([it.question for it in with_col]), 4)
    with pytest.raises(QaLabError, match=r"dataset\.seeds=13 must be a row count between 1 and 12"):
        lineage.assign_seeds(without, embed([it.question for it in without]), 13)
