"""Every retriever kind on small corpora built here: BM25 against rank_bm25, RRF by hand,
cross-encoder reranking with a tiny model trained here, index keys, exclusion, bad settings."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from rank_bm25 import BM25Okapi, BM25Plus

from qa_lab import keys, retrieval
from qa_lab.cache import stable_hash
from qa_lab.corpus import Corpus
from qa_lab.errors import QaLabError
from qa_lab.records import Passage
from qa_lab.retrieval import Retriever, make_retriever
from qa_lab.sparse import Bm25Options, FusionOptions, bm25_tokens, rrf
from tests.conftest import compose_cfg

TEXTS = (
    "A hash table maps keys to buckets through a hash function.",
    "Binary search halves a sorted array at every step.",
    "TCP retransmits lost segments, UDP does not retransmit.",
    "A mutex lets one thread at a time enter a critical section.",
    "Garbage collection frees memory that no reference reaches.",
    "Quicksort partitions an array around a pivot, then sorts each side.",
    "DNS resolves domain names to IP addresses.",
    "A deadlock happens when threads wait on each other's locks forever.",
)
QUERIES = ("how does a hash table use a hash function", "sorted array search", "thread locks")
EMBEDDER = "all-MiniLM-L6-v2"


def _chunks(key: str = "corpus-1") -> Corpus:
    passages = tuple(
        Passage(f"c{i}", text=t, document=f"doc{i}", heading="h") for i, t in enumerate(TEXTS)
    )
    return Corpus(key=key, kind="folder", passages=passages)


def _pairs() -> Corpus:
    passages = (
        Passage("q1", "What does a mutex do?", "It lets one thread at a time into a section."),
        Passage("q2", "What does DNS do?", "It resolves domain names to IP addresses."),
        Passage("q3", "What is quicksort?", "A sort that partitions around a pivot."),
    )
    return Corpus(key="train-hash", kind="train_qa", passages=passages)


def _node(option: str, **changes: Any) -> dict[str, Any]:
    """The node conf/retriever/<option>.yaml composes to, with changes."""
    node = OmegaConf.to_container(compose_cfg("evaluate", [f"retriever={option}"]).retriever)
    node.update(changes)
    return node


def _make(node: dict[str, Any], kb: Corpus, cache: Path, **kw: Any) -> Any:
    return make_retriever(node, kb, embedder=EMBEDDER, cache_dir=cache, batch_size=8, **kw)


def _ids(results: list[list[Passage]]) -> list[list[str]]:
    return [[p.item_id for p in row] for row in results]


# --------------------------------------------------------------------------- BM25


@pytest.mark.parametrize(
    ("method", "baseline", "scale"),
    [
        # Okapi = robertson's idf and tf saturation, times (k1 + 1); the variants agree while no
        # query term is in more than half the documents (then rank_bm25 floors idf at
        # 0.25 x its mean, bm25s at 0): true of this corpus and these queries. (rank_bm25's
        # BM25L multiplies by the term count once more than Lv & Zhai's, so bm25l has no twin.)
        ("robertson", lambda toks: BM25Okapi(toks, k1=1.5, b=0.75), 1 / 2.5),
        ("bm25+", lambda toks: BM25Plus(toks, k1=1.5, b=0.75, delta=0.5), 1.0),
    ],
)
def test_bm25_scores_agree_with_rank_bm25(tmp_path, method, baseline, scale):
    opts = Bm25Options(method=method)
    retriever = Retriever("bm25", len(TEXTS), _chunks(), cache_dir=tmp_path, bm25=opts)
    reference = baseline(bm25_tokens(TEXTS, opts))
    for query, found in zip(QUERIES, retriever.search(QUERIES)):
        expected = reference.get_scores(bm25_tokens([query], opts)[0]) * scale
        order = np.argsort(-expected, kind="stable")
        assert [p.item_id for p in found] == [f"c{i}" for i in order]
        np.testing.assert_allclose([p.score for p in found], expected[order], rtol=1e-5)
        assert expected[order[0]] > expected[order[-1]]  # a real ranking, not all ties


def test_bm25_lucene_is_okapi_tf_with_a_never_negative_idf(tmp_path):
    """The default variant, by its formula over rank_bm25's corpus statistics."""
    opts = Bm25Options()
    (found,) = Retriever("bm25", 3, _chunks(), cache_dir=tmp_path, bm25=opts).search(QUERIES[:1])
    stats = BM25Okapi(bm25_tokens(TEXTS, opts))
    n, k1, b = stats.corpus_size, opts.k1, opts.b
    df = {w: sum(w in doc for doc in stats.doc_freqs) for doc in stats.doc_freqs for w in doc}
    expected = np.zeros(n)
    for word in bm25_tokens(QUERIES[:1], opts)[0]:
        idf = math.log(1 + (n - df.get(word, 0) + 0.5) / (df.get(word, 0) + 0.5))
        for d, freqs in enumerate(stats.doc_freqs):
            tf = freqs.get(word, 0)
            expected[d] += idf * tf / (tf + k1 * (1 - b + b * stats.doc_len[d] / stats.avgdl))
    order = np.argsort(-expected, kind="stable")[:3]
    assert [p.item_id for p in found] == [f"c{i}" for i in order] and found[0].item_id == "c0"
    np.testing.assert_allclose([p.score for p in found], expected[order], rtol=1e-5)


def test_porter_stemming_matches_inflections_only_when_on(tmp_path):
    query = ["partitioning"]  # doc 5 says "partitions"
    plain = Retriever("bm25", 1, _chunks(), cache_dir=tmp_path).search(query)
    stemmed = Retriever(
        "bm25", 1, _chunks(), cache_dir=tmp_path, bm25=Bm25Options(stemmer="porter")
    ).search(query)
    assert plain[0][0].score == 0.0
    assert stemmed[0][0].item_id == "c5" and stemmed[0][0].score > 0


def test_a_train_qa_corpus_works_with_bm25(tmp_path):
    kb = _pairs()
    by_question = Retriever("bm25", 1, kb, document="question", cache_dir=tmp_path)
    by_answer = Retriever("bm25", 1, kb, document="answer", cache_dir=tmp_path)
    assert _ids(by_question.search(["quicksort", "mutex"])) == [["q3"], ["q1"]]
    # "addresses" is only in an answer: the question-only index has nothing to match
    assert by_answer.search(["addresses"])[0][0].item_id == "q2"
    assert by_question.search(["addresses"])[0][0].score == 0.0
    assert by_question.key != by_answer.key


# --------------------------------------------------------------------------- fusion


def test_rrf_equals_the_hand_computed_fusion():
    dense, bm25 = [3, 1, 2], [1, 4, 3]
    # rrf_k=1, equal weights: 1 -> 1/3 + 1/2, 3 -> 1/2 + 1/4, 4 -> 1/3, 2 -> 1/4
    fused = rrf({"dense": dense, "bm25": bm25}, {"dense": 1, "bm25": 1}, 1)
    assert [d for d, _ in fused] == [1, 3, 4, 2]
    np.testing.assert_allclose([s for _, s in fused], [5 / 6, 3 / 4, 1 / 3, 1 / 4])
    # rrf_k=60, bm25 weighted 2: 1 -> 1/62 + 2/61 = .04892, 3 -> 1/61 + 2/63 = .04814,
    # 4 -> 2/62 = .03226, 2 -> 1/63 = .01587
    fused = rrf({"dense": dense, "bm25": bm25}, {"dense": 1, "bm25": 2}, 60)
    assert [d for d, _ in fused] == [1, 3, 4, 2]
    np.testing.assert_allclose(
        [s for _, s in fused], [1 / 62 + 2 / 61, 1 / 61 + 2 / 63, 2 / 62, 1 / 63]
    )
    # a tie (1/61 + 1/62 each) keeps the dense list's order; weight 0 leaves a list out
    tie = rrf({"dense": [5, 6], "bm25": [6, 5]}, {"dense": 1, "bm25": 1}, 60)
    assert [d for d, _ in tie] == [5, 6] and tie[0][1] == tie[1][1]
    assert rrf({"dense": [5], "bm25": [6]}, {"dense": 0, "bm25": 1}, 60) == [(6, 1 / 61)]


def test_hybrid_fuses_the_dense_and_bm25_retrievers_own_rankings(tmp_path):
    kb, n = _chunks(), len(TEXTS)
    hybrid = Retriever("hybrid", 4, kb, cache_dir=tmp_path, fusion=FusionOptions(rrf_k=10))
    dense = Retriever("faiss", n, kb, cache_dir=tmp_path).search(QUERIES)
    sparse = Retriever("bm25", n, kb, cache_dir=tmp_path).search(QUERIES)
    for found, d, s in zip(hybrid.search(QUERIES), dense, sparse):
        rankings = {"dense": [p.item_id for p in d], "bm25": [p.item_id for p in s if p.score > 0]}
        expected = rrf(rankings, {"dense": 1.0, "bm25": 1.0}, 10)[:4]
        assert [(p.item_id, pytest.approx(p.score)) for p in found] == expected
    assert hybrid.stats()["index_bytes"] > 0


# --------------------------------------------------------------------------- reranking


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Path:
    """A 1-layer BERT cross-encoder trained for a few steps to prefer shared words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = retrieval.embedder_tokenizer(EMBEDDER)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    words = ["hash", "array", "thread", "memory", "pivot", "domain", "segments", "deadlock"]
    pairs, labels = [], []
    for i, word in enumerate(words):
        pairs += [(word, TEXTS[i]), (word, TEXTS[(i + 3) % len(TEXTS)])]
        labels += [1.0, 0.0]
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tokenizer(
        [q for q, _ in pairs], [p for _, p in pairs], padding=True, return_tensors="pt"
    )
    for _ in range(60):
        logits = model(**batch).logits.squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    folder = tmp_path_factory.mktemp("cross_encoder")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reranking_reorders_by_cross_encoder_scores(tmp_path, cross_encoder):
    from sentence_transformers import CrossEncoder

    rerank = {"model": str(cross_encoder), "top_n": len(TEXTS), "batch_size": 4}
    reranked = _make(_node("bm25", k=3, rerank=rerank), _chunks(), tmp_path)
    base = _make(_node("bm25", k=len(TEXTS)), _chunks(), tmp_path)
    queries = ["deadlock", "pivot"]
    candidates = base.search(queries)
    direct = CrossEncoder(str(cross_encoder), local_files_only=True)
    for query, found, pool in zip(queries, reranked.search(queries), candidates):
        scores = direct.predict([(query, p.content) for p in pool])
        order = np.argsort(-scores, kind="stable")[:3]
        assert [p.item_id for p in found] == [pool[i].item_id for i in order]
        np.testing.assert_allclose([p.score for p in found], scores[order], rtol=1e-5)
        assert [p.item_id for p in found] != [p.item_id for p in pool[:3]]  # it did reorder
    assert reranked.key == base.key and reranked.k == 3 and reranked.kind == "bm25"
    assert reranked.stats()["query_ms_p50"] > 0


def test_an_unavailable_rerank_model_is_one_line(tmp_path):
    node = _node("bm25", rerank={"model": "no-such-org/no-such-reranker", "top_n": 5})
    with pytest.raises(QaLabError) as err:
        _make(node, _chunks(), tmp_path)
    assert str(err.value) == (
        "retriever.rerank.model=no-such-org/no-such-reranker: not a local folder and not in "
        "the Hugging Face cache (no internet here)"
    )
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------- keys, exclusion


def test_index_keys_follow_settings_and_corpus_never_k(tmp_path):
    kb = _chunks()
    base = _make(_node("bm25", k=0), kb, tmp_path).key  # k=0 builds nothing, k=5 builds
    assert _make(_node("bm25", k=5), kb, tmp_path).key == base
    assert _make(_node("bm25", k=0), _chunks("corpus-2"), tmp_path).key != base
    changes = ({"k1": 1.2}, {"b": 0.5}, {"method": "atire"}, {"stopwords": "none"})
    for change in (*changes, {"stemmer": "porter"}):
        assert _make(_node("bm25", k=0, **change), kb, tmp_path).key != base, change
    # the key is the base index's: a reranker does not change it (the predict key hashes the node)
    reranked = {"model": "any", "top_n": 5}
    assert _make(_node("bm25", k=0, rerank=reranked), kb, tmp_path).key == base
    hybrid = _make(_node("hybrid", k=0), kb, tmp_path).key
    assert hybrid not in (base, _make(_node("hybrid", k=0, rrf_k=10), kb, tmp_path).key)
    assert _make(_node("hybrid", k=3), kb, tmp_path).key == hybrid


def test_faiss_keys_are_todays_formula(tmp_path):
    faiss = _make(_node("faiss", k=0), _chunks(), tmp_path)
    assert faiss.key == stable_hash(
        {"train": "corpus-1", "embedder": EMBEDDER, "document": "chunk", "v": 1}
    )
    assert keys.index_key("train", "emb", "question_answer") == "076f9aceb6a28a7c"  # HEAD's formula


@pytest.mark.parametrize("kind", ["none", "faiss", "bm25", "hybrid", "reranked"])
def test_exclude_ids_works_for_every_kind(tmp_path, kind, cross_encoder):
    node = _node(kind, k=3) if kind != "reranked" else _node("bm25", k=3)
    if kind == "reranked":
        node["rerank"] = {"model": str(cross_encoder), "top_n": 5, "batch_size": 4}
    retriever = _make(node, _chunks(), tmp_path)
    queries = [TEXTS[0], TEXTS[5]]  # each query is a document word for word
    kept, excluded = retriever.search(queries), retriever.search(queries, exclude_ids=["c0", "c5"])
    if kind == "none":
        assert kept == excluded == [[], []]
        return
    assert "c0" in _ids(kept)[0] and "c5" in _ids(kept)[1]
    assert "c0" not in _ids(excluded)[0] and "c5" not in _ids(excluded)[1]
    assert [len(row) for row in excluded] == [3, 3]


def test_stats_report_the_build_then_the_reuse(tmp_path):
    first = _make(_node("bm25", k=2), _chunks(), tmp_path)
    first.search(QUERIES)
    again = _make(_node("bm25", k=2), _chunks(), tmp_path)
    stats = first.stats()
    assert stats["index_build_s"] > 0 and again.stats()["index_build_s"] == 0
    assert stats["index_documents"] == len(TEXTS) and stats["index_bytes"] > 0
    assert 0 < stats["query_ms_p50"] <= stats["query_ms_p95"]
    assert again.stats()["query_ms_p50"] == 0  # no search yet


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("bm25", {"kind": "tfidf"}, "retriever.kind='tfidf' is not one of"),
        ("bm25", {"k": -1}, "retriever.k=-1 must be >= 0"),
        ("faiss", {"k": 9}, "retriever.k=9 is larger than the index (8 documents)"),
        ("bm25", {"k1": -1}, "retriever.k1=-1 must be >= 0"),
        ("bm25", {"b": 2}, "retriever.b=2 must be in"),
        ("bm25", {"method": "okapi"}, "retriever.method='okapi' is not one of"),
        ("bm25", {"stemmer": "snowball"}, "retriever.stemmer='snowball' is not one of"),
        ("hybrid", {"weights": {"dense": -1, "bm25": 1}}, "retriever.weights="),
        ("hybrid", {"weights": {"dense": 0, "bm25": 0}}, "retriever.weights="),
        ("hybrid", {"weights": {"sparse": 1}}, "retriever.weights="),
        ("hybrid", {"weights": {"dense": "heavy"}}, "retriever.weights.dense='heavy'"),
        ("hybrid", {"rrf_k": -5}, "retriever.rrf_k=-5 must be >= 0"),
        ("hybrid", {"depth": 0}, "retriever.depth=0 must be >= 1"),
        ("hybrid", {"depth": 2, "k": 3}, "retriever.depth=2 must be >= retriever.k=3"),
        ("faiss", {"rerank": {"model": "x", "top_n": 2}, "k": 3}, "retriever.rerank.top_n=2"),
        ("faiss", {"rerank": {"model": "x", "batch_size": 0}}, "retriever.rerank.batch_size=0"),
    ],
)
def test_bad_settings_are_one_line_before_any_index(tmp_path, kind, changes, message):
    with pytest.raises(QaLabError, match=re.escape(message)):
        _make(_node(kind, **changes), _chunks(), tmp_path)
    assert not (tmp_path / "index").exists()


def test_k_overrides_the_node_and_none_returns_nothing(tmp_path):
    node = compose_cfg("evaluate", ["retriever=hybrid", "retriever.k=1"]).retriever  # DictConfig
    hybrid = _make(node, _chunks(), tmp_path, k=4)
    assert hybrid.k == 4 and [len(row) for row in hybrid.search(QUERIES)] == [4, 4, 4]
    none = _make(_node("none"), _chunks(), tmp_path, k=3)
    assert (none.kind, none.k, none.key, none.search(QUERIES)) == ("none", 0, "none", [[]] * 3)
    assert none.stats()["index_documents"] == 0
