import numpy as np
import pytest

from qa_lab import synthesis
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
