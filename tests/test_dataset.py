import json
import random

import pytest

from qa_lab import dataset
from qa_lab.errors import QaLabError
from tests.qa_files import embed, family_rows, item, write_format


def split(items, strategy, **kwargs):
    """`dataset.split_items` at the original study's ratios unless told otherwise."""
    return dataset.split_items(items, strategy, **{"train": 0.7, "val": 0.15, "seed": 42, **kwargs})


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
    assert dataset.normalize_question(text, "robust") == robust
    assert dataset.normalize_question(text, "strip_lower") == strip_lower == text.strip().lower()


def test_normalize_unknown_mode():
    with pytest.raises(QaLabError, match=r"dataset\.normalize='fuzzy'"):
        dataset.normalize_question("x", "fuzzy")


def test_exact_dedup_keeps_first():
    items = [
        item(1, "What is TCP?"),
        item(2, "what is tcp"),
        item(3, "What is UDP?"),
        item(4, " WHAT IS TCP? "),
    ]
    kept, removed = dataset.exact_dedup(items, "robust")
    assert [it.id for it in kept] == ["q1", "q3"]
    assert [(r.id, k.id) for r, k in removed] == [("q2", "q1"), ("q4", "q1")]
    kept, removed = dataset.exact_dedup(items, "strip_lower")
    assert [it.id for it in kept] == ["q1", "q2", "q3"]
    assert [(r.id, k.id) for r, k in removed] == [("q4", "q1")]


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
    assert split(items, "random", seed=7) == expected
    assert [len(v) for v in expected.values()] == [70, 15, 16]


@pytest.mark.parametrize("strategy", ["random", "group"])
def test_split_determinism(strategy):
    items = [item(i, topic=f"t{i % 3}") for i in range(200)]
    groups = [f"g{i // 3}" for i in range(200)]
    a = split(items, strategy, seed=1, groups=groups, stratify=None)
    assert a == split(items, strategy, seed=1, groups=groups)
    assert a != split(items, strategy, seed=2, groups=groups)
    assert sorted(it.id for part in a.values() for it in part) == sorted(it.id for it in items)


@pytest.mark.parametrize("stratify", [None, "topic"])
def test_group_split_integrity_and_ratios(stratify):
    rng = random.Random(0)
    groups = [f"g{g}" for g in range(400) for _ in range(rng.randint(1, 5))]
    items = [item(i, topic=f"t{int(g[1:]) % 4}") for i, g in enumerate(groups)]
    parts = split(items, "group", seed=3, groups=groups, stratify=stratify)
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
        split(items, "stratified")
    with pytest.raises(QaLabError, match=r"dataset\.split\.train=0\.9"):
        split(items, "random", train=0.9, val=0.2)
    with pytest.raises(QaLabError, match=r"dataset\.split\.stratify='answer'"):
        split(items, "group", stratify="answer")


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
    audit = dataset.leakage_audit(train, test, vecs[:2], vecs[2:])
    assert audit["n_test"] == 3 and audit["n_train"] == 2
    assert audit["near_dup_80"] == 2 and audit["near_dup_90"] == 2
    assert audit["near_dup_80_rate"] == pytest.approx(2 / 3)
    assert audit["verbatim_answers"] == 1
    assert [(p["test_id"], p["train_id"]) for p in audit["pairs"]] == [("q3", "q1"), ("q2", "q0")]
    json.dumps(audit)  # goes to a JSON file and MLflow as is


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


# --------------------------------------------------------------------------- options and build


def options(overrides=()):
    from tests.conftest import compose_cfg

    return dataset.DatasetOptions.from_cfg(compose_cfg("build_dataset", list(overrides)).dataset)


def test_options_come_from_the_config_and_refuse_bad_choices_up_front():
    opts = options(["dataset.columns.question=q", "dataset.split.seed=7"])
    assert opts.columns == {"question": "q"}  # only the mapped fields
    assert options().columns is None
    assert (opts.split.strategy, opts.split.seed, opts.split.train) == ("group", 7, 0.7)
    assert (opts.topics.min_k, opts.topics.max_k, opts.topics.similar_labels) == (2, 12, 0.85)
    assert (opts.synthesis.backend, opts.synthesis.per_seed) == ("none", 2)
    assert opts.semantic_dedup_threshold == 0.9 and opts.seeds is None
    with pytest.raises(QaLabError, match=r"dataset\.split\.strategy='stratified'"):
        options(["dataset.split.strategy=stratified"])
    with pytest.raises(QaLabError, match=r"dataset\.synthesis\.backend='vllm'"):
        options(["dataset.synthesis.backend=vllm"])
    with pytest.raises(QaLabError, match=r"dataset\.synthesis\.mode='rewrite'"):
        options(["dataset.synthesis.backend=local", "dataset.synthesis.mode=rewrite"])
    # an unused generator's mode is not checked (as before the options existed)
    assert options(["dataset.synthesis.backend=none", "dataset.synthesis.mode=x"]).synthesis


def test_build_dedups_splits_and_audits_without_side_effects():
    questions = [
        "What is a closure in JavaScript?",
        "what is a closure in javascript",  # exact duplicate of row 0 (robust normalisation)
        "How does garbage collection work in Java?",
        "What is a JavaScript closure?",  # paraphrase of row 0
        "What is the difference between TCP and UDP?",
        "What is a deadlock?",
        "What is the CAP theorem?",
        "What is a B-tree?",
    ]
    items = [item(i, q) for i, q in enumerate(questions)]
    calls = []

    def embed_questions(texts):
        calls.append(list(texts))
        return embed(texts)

    opts = options(["dataset.split.train=0.5", "dataset.split.val=0.25"])
    built = dataset.build(items, embed_questions, opts, infer=False)
    assert calls == [[q for i, q in enumerate(questions) if i != 1]]  # embedded after exact dedup
    assert built.counts == {
        "before_dedup": 8,
        "after_exact_dedup": 7,
        "after_semantic_dedup": 6,
        "train": 3,
        "val": 2,  # six singleton groups: ties go to train, then val, then test
        "test": 1,
    }
    assert [(r["stage"], r["removed_id"], r["kept_id"]) for r in built.dedup_report] == [
        ("exact", "q1", "q0"),
        ("semantic", "q3", "q0"),
    ]
    assert built.dedup_report[0]["similarity"] == 1.0
    assert 0.9 < built.dedup_report[1]["similarity"] <= 1.0
    kept = sorted(it.id for part in built.splits.values() for it in part)
    assert kept == ["q0", "q2", "q4", "q5", "q6", "q7"]
    assert (built.audit["n_train"], built.audit["n_test"]) == (3, 1)
    assert built.topics is None and {it.topic for it in items} == {""}  # inputs untouched
    again = dataset.build(items, embed, opts, infer=True)
    assert again.splits.keys() == built.splits.keys() and again.topics["source"] == "inferred"
    assert {it.topic_source for part in again.splits.values() for it in part} == {"inferred"}
