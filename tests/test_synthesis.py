from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qa_lab import corpus_synthesis, synthesis
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem

SEED = QAItem("ds-001", "What is a stack?", "A LIFO collection.", "data_structures", "easy")


def test_parse_paraphrase_strips_labels_and_quotes():
    cand = synthesis.parse(
        SEED, 'Rewritten question: "How does a stack work?"\nextra', "paraphrase"
    )
    assert cand.question == "How does a stack work?" and cand.answer is None


def test_parse_qa_mode():
    cand = synthesis.parse(SEED, "Question: What is a queue?\nAnswer: A FIFO collection.", "qa")
    assert (cand.question, cand.answer) == ("What is a queue?", "A FIFO collection.")
    assert synthesis.parse(SEED, "no format at all", "qa").question == ""


def test_validate_counts_rejects_by_reason():
    texts = [
        ("", None),  # empty
        ("Why?", None),  # length
        ("Stacks are nice things to have around", None),  # not a question
        ("What is a stack?", None),  # copy of the seed
        ("What is the capital of France?", None),  # off topic (low similarity below)
        ("How does a LIFO stack behave?", None),  # kept
    ]
    cands = [synthesis.Candidate(SEED, q, a) for q, a in texts]
    vecs = np.eye(len(cands), 8, dtype=np.float32)
    seed_vecs = vecs.copy()
    seed_vecs[4] = np.eye(8, dtype=np.float32)[7]  # unrelated to candidate 4
    seed_vecs[5] = vecs[5] * 0.8 + np.eye(8, dtype=np.float32)[6] * 0.6  # cosine 0.8
    kept, rejects = synthesis.validate(
        cands,
        vecs,
        seed_vecs,
        min_chars=12,
        max_chars=300,
        min_topic_similarity=0.6,
        max_seed_similarity=0.98,
    )
    assert kept == [5]
    assert rejects == {
        "empty": 1,
        "length": 1,
        "not_a_question": 1,
        "copy_of_seed": 1,
        "off_topic": 1,
    }


def test_to_items_keeps_lineage():
    cands = [synthesis.Candidate(SEED, "How does a LIFO stack behave?", None)]
    (item,) = synthesis.to_items(cands, [0], "SmolLM2-135M-Instruct")
    assert item.id == "ds-001-syn1" and item.seed_id == "ds-001" and item.source == "synthetic"
    assert item.answer == SEED.answer and item.generator == "SmolLM2-135M-Instruct"


def test_unknown_mode():
    with pytest.raises(QaLabError, match="dataset.synthesis.mode"):
        synthesis.check_mode("rewrite")


@pytest.mark.slow
def test_synthesize_with_the_embedded_model_caches_and_keeps_lineage(tmp_path):
    """The real local generator on two seeds: counted candidates, lineage, answers cached."""
    import functools

    from qa_lab.dataset import DatasetOptions
    from qa_lab.retrieval import embed
    from tests.conftest import MODELS_DIR, compose_cfg

    cfg = compose_cfg("build_dataset", ["dataset.synthesis.per_seed=2"])
    opts = DatasetOptions.from_cfg(cfg.dataset).synthesis
    seeds = [SEED, QAItem("os-001", "What is a process?", "A running program.", "os")]
    vectors = functools.partial(embed, embedder=cfg.embedder.name, cache_dir=tmp_path)

    def run():
        return synthesis.synthesize(opts, seeds, vectors, cache_dir=tmp_path, models_dir=MODELS_DIR)

    items, rejects = run()
    assert len(items) + sum(rejects.values()) == 4  # every candidate kept or counted
    assert all(it.source == "synthetic" and it.generator == opts.model for it in items)
    assert all(it.seed_id in {"ds-001", "os-001"} for it in items)
    assert all(it.id.startswith(f"{it.seed_id}-syn") for it in items)
    assert (tmp_path / "answers.sqlite").is_file()
    assert run() == (items, rejects)  # the second run reads the same answers from the cache


# --------------------------------------------------------------------------- from a corpus

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


@dataclass(frozen=True)
class Chunk:
    """The fields of `qa_lab.chunking.Chunk` that corpus synthesis reads."""

    id: str
    document: str
    title: str
    heading: str
    text: str


def shipped_section(document: str, heading: str) -> Chunk:
    """One `## heading` section of a shipped corpus page, cut by hand as a chunk."""
    page = (CORPUS / document).read_text(encoding="utf-8")
    title = page.splitlines()[0].removeprefix("# ")
    text = page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0].strip()
    return Chunk(f"{document}#{heading.lower().replace(' ', '-')}", document, title, heading, text)


COVERING = shipped_section("databases/indexing.md", "Covering Indexes")


def test_parse_pair_cuts_the_answer_at_the_next_pair():
    reply = "Question: What is a covering index?\nAnswer: One that holds\nall.\nQuestion: x"
    assert corpus_synthesis.parse_pair(reply) == (
        "What is a covering index?",
        "One that holds all.",
    )
    assert corpus_synthesis.parse_pair("question: Why?\n\nANSWER: Yes.\n\nMore") == ("Why?", "Yes.")
    assert corpus_synthesis.parse_pair("Question: What is an index?") == ("", "")  # no answer
    assert corpus_synthesis.parse_pair("This passage is about indexes.") == ("", "")


def test_support_and_copied_runs_on_a_shipped_section():
    text = COVERING.text
    assert corpus_synthesis.support("It contains every column a query needs.", text) == 1.0
    # content words: index, shards, tables, data, centers -> only "index" is in the section
    assert corpus_synthesis.support("An index shards tables across data centers.", text) == 0.2
    assert corpus_synthesis.support("It is what it is.", text) == 0.0  # stopwords only
    assert corpus_synthesis.longest_common_run("Does the visibility map matter here?", text) == 3
    question = "Why does a covering index contain every column a query needs, in its key?"
    assert corpus_synthesis.longest_common_run(question, text) == 5  # "every column a query needs"


def test_validate_corpus_keeps_supported_pairs_and_counts_rejects_by_reason():
    replies = [
        "Question: What does a covering index hold?\n"
        "Answer: Every column a query needs, so the query is answered from the index alone.",
        "Question: Why are covering indexes popular?\n"
        "Answer: They shard tables across data centers with a fixed-size window.",
        "Question: Is it true that a covering index contains every column a query needs, either "
        "in its key or as included columns?\nAnswer: Yes, every column a query needs.",
        "Question: what does a covering index hold\nAnswer: Every column a query needs.",
        "The passage explains covering indexes.",
        "Question: Why?\nAnswer: Because every column a query needs is in the index.",
        "Question: What " + "exactly " * 50 + "is it?\nAnswer: Every column a query needs.",
        "Question: Covering indexes avoid row lookups.\nAnswer: Row lookups are avoided.",
    ]
    pairs = [corpus_synthesis.parse_pair(r) for r in replies]
    kept, rejects = corpus_synthesis.validate_corpus(
        COVERING, pairs, min_chars=12, max_chars=300, min_support=0.7
    )
    assert kept == [0]
    assert rejects == {
        "unsupported": 1,
        "copied_question": 1,
        "duplicate": 1,
        "unparseable": 1,
        "too_short": 1,
        "too_long": 1,
        "not_a_question": 1,
    }
    assert len(kept) + sum(rejects.values()) == len(replies)


def test_a_rejected_question_does_not_make_its_repeat_a_duplicate():
    pairs = [
        ("What does a covering index hold?", "Shards of data centers."),
        ("What does a covering index hold?", "Every column a query needs."),
    ]
    kept, rejects = corpus_synthesis.validate_corpus(
        COVERING, pairs, min_chars=12, max_chars=300, min_support=0.7
    )
    assert (kept, rejects) == ([1], {"unsupported": 1})


def test_corpus_item_carries_topic_lineage_and_evidence():
    item = corpus_synthesis.corpus_item(COVERING, 1, "What does it hold?", "Every column.", "gen")
    assert item.id == f"{COVERING.id}~q1" and item.seed_id == COVERING.id
    assert (item.topic, item.source, item.generator) == ("databases", "synthetic", "gen")
    assert item.evidence == {
        "document": "databases/indexing.md",
        "section": "Covering Indexes",
        "chunk": COVERING.id,
    }
    top = Chunk("readme#0", "README.md", "Readme", "", "Some text.")
    item = corpus_synthesis.corpus_item(top, 0, "What?", "Text.", "gen")
    assert item.topic == "" and item.evidence == {"document": "README.md", "chunk": "readme#0"}


def test_from_corpus_options_and_the_seed_path_refuses_the_mode(tmp_path):
    from qa_lab.dataset import DatasetOptions
    from tests.conftest import MODELS_DIR, compose_cfg

    overrides = ["dataset.synthesis.mode=from_corpus", "dataset.synthesis.min_support=0.5"]
    opts = DatasetOptions.from_cfg(compose_cfg("build_dataset", overrides).dataset).synthesis
    assert (opts.mode, opts.min_support) == ("from_corpus", 0.5)
    assert compose_cfg("build_dataset").dataset.synthesis.min_support == 0.7
    with pytest.raises(QaLabError, match="synthesize_from_corpus"):
        synthesis.synthesize(opts, [SEED], np.ones, cache_dir=tmp_path, models_dir=MODELS_DIR)


@pytest.mark.slow
def test_synthesize_from_corpus_with_the_embedded_model(tmp_path):
    """The real local generator on two shipped sections: counted, supported, with evidence."""
    from qa_lab.dataset import DatasetOptions
    from tests.conftest import MODELS_DIR, compose_cfg

    overrides = [
        "dataset.synthesis.mode=from_corpus",
        "dataset.synthesis.per_seed=2",
        "dataset.synthesis.max_new_tokens=80",
        # SmolLM2-135M's answers are mostly its own inventions (support 0.2-0.5 measured on 11
        # sections): at the default 0.7 nothing would be kept and the kept rows go unchecked
        "dataset.synthesis.min_support=0.3",
    ]
    opts = DatasetOptions.from_cfg(compose_cfg("build_dataset", overrides).dataset).synthesis
    chunks = [COVERING, shipped_section("databases/replication.md", "Eventual Consistency")]
    by_id = {c.id: c for c in chunks}

    def run():
        return corpus_synthesis.synthesize_from_corpus(
            opts, chunks, cache_dir=tmp_path, models_dir=MODELS_DIR
        )

    items, rejects = run()
    assert len(items) + sum(rejects.values()) == 4  # every candidate kept or counted
    assert set(rejects) <= {
        "unparseable",
        "too_short",
        "too_long",
        "not_a_question",
        "copied_question",
        "unsupported",
        "duplicate",
    }
    for item in items:
        chunk = by_id[item.seed_id]
        assert item.evidence["chunk"] == chunk.id and item.id.startswith(f"{chunk.id}~q")
        assert corpus_synthesis.support(item.answer, chunk.text) >= opts.min_support
        assert synthesis.reads_as_question(item.question) and item.topic == "databases"
    assert run() == (items, rejects)  # the same rows again, read from the answer cache
