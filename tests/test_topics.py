import pytest

from qa_lab import topics
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from tests.qa_files import embed, family_rows


def test_inferred_topics_follow_the_question_families():
    rows = family_rows()
    items = [QAItem(r["id"], r["q"], r["a"]) for r in rows]
    vectors = embed([it.question for it in items])
    labelled, report = topics.infer_topics(items, vectors, min_k=2, max_k=6, seed=0, terms=3)
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
    again, _ = topics.infer_topics(items, vectors, min_k=2, max_k=6, seed=0, terms=3)
    assert again == labelled  # seeded
    with pytest.raises(QaLabError, match=r"dataset\.topics\.min_k=1"):
        topics.infer_topics(items, vectors, min_k=1, max_k=6, seed=0, terms=3)
