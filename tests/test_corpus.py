"""The corpus stage end to end: real files, the real MiniLM tokenizer and embedder, real MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from qa_lab import corpus, datastore, evidence, keys, stages
from qa_lab.config import PROJECT_ROOT, to_dict
from qa_lab.errors import QaLabError
from qa_lab.jsonl import write_jsonl
from qa_lab.records import QAItem
from tests.conftest import compose_cfg

PAGE = """# Caching

Caches keep recent results close to the reader.

## Eviction

An LRU cache evicts the least recently used entry when it is full. It keeps a hash map
from key to node and a doubly linked list ordered by recency.

## Write Policies

A write-through cache writes to the cache and the backing store at once; a write-back cache
marks the line dirty and writes it out only when it is evicted.
"""
NOTES = "Bloom filters answer set membership with no false negatives and tunable false positives."


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "storage").mkdir(parents=True)
    (folder / "storage" / "caching.md").write_text(PAGE, encoding="utf-8")
    (folder / "notes.txt").write_text(NOTES, encoding="utf-8")
    return folder


def _cfg(store: list[str], docs: Path, *extra: str):
    return compose_cfg("evaluate", [*store, f"corpus.source={docs}", "chunking.size=48", *extra])


def _build_dataset_fails(store: list[str], *overrides: str) -> str:
    """Run build_dataset.py as a user does; it must exit 2 with one line: that line."""
    proc = subprocess.run(
        [sys.executable, "build_dataset.py", *store, "dataset.synthesis.backend=none", *overrides],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def _runs(cfg, stage: str):
    mlflow.set_tracking_uri(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    return mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`qa_lab.stage` = '{stage}'", output_format="list"
    )


def test_corpus_stage_builds_once_and_logs_a_run(store, docs):
    cfg = _cfg(store, docs)
    kb = stages.build_corpus(cfg)
    folder = Path(cfg.paths.cache) / "corpus" / kb.key
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["documents"] == 2
    assert manifest["counts"]["chunks"] == len(kb.chunks) >= 3
    assert {c.document for c in kb.chunks} == {"storage/caching.md", "notes.txt"}
    for chunk in kb.chunks:  # every chunk maps back to its exact source text
        assert kb.documents[chunk.document][chunk.start : chunk.end] == chunk.text
    mtime = (folder / "manifest.json").stat().st_mtime
    assert stages.build_corpus(cfg).key == kb.key  # reused: not rebuilt, no second run
    assert (folder / "manifest.json").stat().st_mtime == mtime
    (run,) = _runs(cfg, "corpus")
    assert run.data.metrics["count/chunks"] == len(kb.chunks)
    assert run.data.metrics["tokens/max"] <= 48
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [f"corpus-{kb.key[:8]}"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"chunk_lengths.png", "manifest.json"} <= artifacts


def test_corpus_key_follows_content_and_chunking_only(store, docs):
    def key(*extra: str) -> str:
        cfg = _cfg(store, docs, *extra)
        opts = corpus.CorpusOptions.from_cfg(cfg.corpus)
        return keys.corpus_key(
            to_dict(cfg.corpus),
            to_dict(cfg.chunking),
            files_hash=corpus.files_hash(opts),
            tokenizer=cfg.embedder.name,
        )

    base = key()
    assert key("corpus.gold_threshold=0.9") == base
    assert key("chunking.size=64") != base
    assert key("chunking=fixed", "chunking.size=48") != base
    (docs / "notes.txt").write_text(NOTES + " Counting filters allow deletes.", encoding="utf-8")
    assert key() != base


def test_gold_from_named_evidence_and_inferred(store, docs):
    kb = stages.build_corpus(_cfg(store, docs))
    eviction = [c.id for c in kb.chunks if "Eviction" in c.heading]
    assert eviction
    quote = "a write-back cache\nmarks the line dirty"  # the quote spans a line break
    items = [
        QAItem(
            "q1",
            "What does LRU evict?",
            "The least recently used entry.",
            evidence={"document": "storage/caching.md", "section": "Eviction"},
        ),
        QAItem(
            "q2",
            "What is write-back?",
            "Dirty lines are written on eviction.",
            evidence={"document": "storage/caching.md", "quote": " ".join(quote.split())},
        ),
        QAItem("q3", "Bloom filters?", "No false negatives.", evidence={"document": "notes.txt"}),
        QAItem("q4", "What do Bloom filters answer?", NOTES),
        QAItem("q5", "Capital of France?", "Paris is the capital of France."),
    ]
    embed = stages.corpus.question_embedder(_cfg(store, docs))
    gold = evidence.gold_for(items, kb, embed, threshold=0.8)
    assert gold[0] == ("evidence", tuple(eviction))
    write_back = [c for c in kb.chunks if c.id in gold[1][1]]
    assert write_back and all("Write Policies" in c.heading for c in write_back)
    notes = tuple(c.id for c in kb.chunks if c.document == "notes.txt")
    assert gold[2] == ("evidence", notes)
    assert gold[3] == ("inferred", notes[:1])  # the reference is the note's own sentence
    assert gold[4] is None  # nothing in the corpus is that similar


def test_evidence_naming_no_document_is_one_line_error(store, docs):
    kb = stages.build_corpus(_cfg(store, docs))
    bad = [QAItem("r7", "q?", "a.", evidence={"document": "storage/cachin.md"})]
    with pytest.raises(
        QaLabError,
        match=r"qa.jsonl: row 'r7' names evidence document "
        r"'storage/cachin.md'.*did you mean 'storage/caching.md'",
    ):
        evidence.check_documents(bad, kb, where="qa.jsonl")


def test_build_dataset_refuses_unknown_evidence_before_any_work(store, docs, tmp_path):
    source = tmp_path / "qa.jsonl"
    rows = [
        {
            "id": f"r{i}",
            "question": f"Question number {i} about caches?",
            "answer": f"Answer {i}.",
            "evidence": {"document": "storage/caching.md"},
        }
        for i in range(6)
    ]
    rows[3]["evidence"] = "nowhere/missing.md#Intro"
    write_jsonl(source, rows)
    last = _build_dataset_fails(store, f"dataset.source={source}", f"corpus.source={docs}")
    assert last.startswith(
        f"error: {source}: row 'r3' names evidence document 'nowhere/missing.md'"
    ), last
    cache = Path(store[0].split("=", 1)[1])
    assert not list(cache.glob("data/*/manifest.json"))  # nothing half-written


def test_train_qa_corpus_is_the_training_pairs(store, small_source):
    cfg = compose_cfg(
        "evaluate",
        [
            *store,
            f"dataset.source={small_source}",
            "dataset.synthesis.backend=none",
            "corpus=train_qa",
        ],
    )
    data = stages.build_dataset(cfg)
    kb = stages.corpus_for(cfg, data)
    train = datastore.read_split(data, "train")
    assert [p.item_id for p in kb.passages] == [it.id for it in train]
    assert kb.texts == [] and kb.kind == "train_qa"
    manifest = json.loads((data / "manifest.json").read_text())
    assert kb.key == manifest["files"]["train.jsonl"]  # the index key it always had


def test_rag_over_the_shipped_corpus_scores_retrieval_and_attribution(store, small_source):
    """The default corpus end to end: chunks retrieved, gold flagged, metrics, cells, traces."""
    from tests.conftest import TINY_RUN

    cfg = compose_cfg(
        "evaluate",
        [
            *store,
            f"dataset.source={small_source}",
            *TINY_RUN,
            "corpus=folder",
            "retriever=faiss",
            "retriever.k=3",
            "metrics.groups=[lexical,diagnostics,retrieval]",
        ],
    )
    stages.evaluate(cfg)
    (run,) = _runs(cfg, "evaluate")
    m = run.data.metrics
    for name in (
        "retrieval/recall_at_k",
        "retrieval/mrr",
        "retrieval/ndcg_at_k",
        "retrieval/answer_in_context",
        "leakage/evidence_overlap",
    ):
        assert 0.0 <= m[name] <= 1.0, name
    assert m["retrieval/recall_at_k_ci_low"] <= m["retrieval/recall_at_k"]
    cells = [
        m[f"attribution/{c}"]
        for c in ("retriever_miss", "generator_miss", "parametric_hit", "both_right")
    ]
    assert sum(cells) == pytest.approx(1.0)
    rows = [
        json.loads(line)
        for line in mlflow.artifacts.load_text(
            f"runs:/{run.info.run_id}/per_item.jsonl"
        ).splitlines()
    ]
    assert len(rows) == 6
    for row in rows:  # every seed row names its section: gold comes from evidence
        assert row["gold_source"] == "evidence" and row["gold"]
        assert len(row["retrieved"]) == 3
        flags = [p["gold"] for p in row["retrieved"]]
        assert flags == [p["item_id"] in row["gold"] for p in row["retrieved"]]
        hit = float(any(flags))
        assert row["scores"]["gold_retrieved"] == hit
        assert "<passage 1>" in row["prompt"] and row["retrieved"][0]["text"] in row["prompt"]
    assert run.data.tags["qa_lab.corpus_key"] == stages.build_corpus(cfg).key
    # the variant stays derived; the retriever and k name the run and tag it
    assert run.data.tags["qa_lab.variant"] == "rag"
    assert run.info.run_name.startswith("evaluate-rag-faiss-k3-")
    assert (run.data.tags["qa_lab.retriever"], run.data.tags["qa_lab.retriever_k"]) == (
        "faiss",
        "3",
    )
    assert m["retrieval/index_documents"] == len(stages.build_corpus(cfg).chunks)
    assert m["retrieval/query_ms_p95"] >= m["retrieval/query_ms_p50"] > 0


def test_lora_learns_the_corpus_then_the_qa_pairs(store, docs, small_source, tmp_path):
    """knowledge=corpus: a cpt run (its own loss curve), then the SFT continuing its adapter."""
    from qa_lab.jsonl import read_jsonl
    from tests.conftest import TINY_RUN

    source = tmp_path / "no_evidence.jsonl"  # these docs are not the pages the seeds cite
    write_jsonl(
        source, [{k: v for k, v in r.items() if k != "evidence"} for r in read_jsonl(small_source)]
    )
    cfg = _cfg(
        store,
        docs,
        f"dataset.source={source}",
        *TINY_RUN,
        "corpus=folder",
        "model=lora",
        "model.knowledge=corpus",
        "model.cpt.batch_size=2",
    )
    folder, key = stages.adapter_for(cfg)
    (cpt,) = _runs(cfg, "cpt")
    (sft,) = _runs(cfg, "train")
    history = mlflow.MlflowClient().get_metric_history(cpt.info.run_id, "cpt/loss")
    assert history and all(h.value > 0 for h in history)
    assert "train/loss" not in cpt.data.metrics and "cpt/loss" not in sft.data.metrics
    assert cpt.data.metrics["texts"] == len(stages.build_corpus(cfg).chunks)
    data_key = json.loads((stages.build_dataset(cfg) / "manifest.json").read_text())["key"]
    assert sft.data.tags["qa_lab.key"] == key
    assert key == stages.train_key(cfg, data_key, cpt.data.tags["qa_lab.key"])
    assert key != stages.train_key(cfg, data_key)  # the SFT's key names its upstream
    assert (folder / "adapter_config.json").is_file()


def test_knowledge_corpus_needs_a_document_corpus(store, small_source):
    cfg = compose_cfg(
        "evaluate",
        [
            *store,
            f"dataset.source={small_source}",
            "model=lora",
            "corpus=train_qa",
            "model.knowledge=corpus",
        ],
    )
    with pytest.raises(QaLabError, match="model.knowledge=corpus learns a document corpus"):
        stages.cpt_key(cfg, "d")


def test_chunks_longer_than_the_embedder_reads_are_refused(store, docs):
    with pytest.raises(
        QaLabError,
        match=r"chunking.size=300 is more than all-MiniLM-L6-v2 reads "
        r"\(254 tokens\)",
    ):
        stages.build_corpus(_cfg(store, docs, "chunking.size=300"))


@pytest.mark.parametrize("bad", ["empty", "undecodable"])
def test_bad_corpus_is_one_line_error_from_the_script(store, small_source, tmp_path, bad):
    folder = tmp_path / "bad_docs"
    folder.mkdir()
    if bad == "undecodable":
        (folder / "ok.md").write_text("# Fine\n\nSome text.\n", encoding="utf-8")
        (folder / "latin.md").write_bytes("# Caf\xe9\n\nna\xefve text\n".encode("latin-1"))
    last = _build_dataset_fails(store, f"dataset.source={small_source}", f"corpus.source={folder}")
    if bad == "empty":
        assert last.startswith(f"error: {folder}: no documents"), last
    else:
        assert last.startswith(f"error: {folder / 'latin.md'}: not valid utf-8 at byte"), last
    cache = Path(store[0].split("=", 1)[1])
    assert not list(cache.glob("corpus/*/manifest.json"))  # nothing half-written


def test_dataset_synthesised_from_the_corpus_without_a_qa_file(store, docs):
    """dataset.source=null + from_corpus: QA pairs written from each chunk, each knowing it."""
    cfg = compose_cfg(
        "build_dataset",
        [
            *store,
            f"corpus.source={docs}",
            "chunking.size=48",
            "dataset.source=null",
            "dataset.synthesis.backend=local",
            "dataset.synthesis.mode=from_corpus",
            "dataset.synthesis.per_seed=2",
            "dataset.synthesis.max_new_tokens=48",
            "dataset.synthesis.min_support=0.0",  # a 135M generator: keep what parses (checked)
            "dataset.topics.infer=false",
        ],
    )
    folder = stages.build_dataset(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    kb = stages.build_corpus(cfg)
    counts = manifest["counts"]
    assert counts["synthetic_kept"] + counts["synthetic_rejected"] == 2 * len(kb.chunks)
    assert manifest["key"] == stages.dataset_key(cfg)
    rows = [r for split in ("train", "val", "test") for r in datastore.read_split(folder, split)]
    chunk_ids = {c.id for c in kb.chunks}
    assert rows and all(
        r.evidence["chunk"] in chunk_ids and r.seed_id == r.evidence["chunk"] for r in rows
    )
    # another chunking is another corpus, so another dataset
    cfg.chunking.size = 64
    assert stages.dataset_key(cfg) != manifest["key"]
