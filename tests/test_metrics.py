import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from qa_lab import diagnostics, lexical, metrics, semantic
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.stats import bootstrap_corpus_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "rag-technical-qa"
VARIANTS = ("vanilla", "rag_vanilla", "finetuned", "rag_finetuned")
# BLEU-4 / ROUGE-L as printed in the original study's logs/<variant>.txt.
LOGGED = {
    "vanilla": (0.0274, 0.1620),
    "rag_vanilla": (0.0515, 0.2269),
    "finetuned": (0.0561, 0.1795),
    "rag_finetuned": (0.0451, 0.1534),
}


def metrics_cfg(preset: str = "default", **overrides) -> dict:
    """The real conf/metrics preset, composed the way Hydra does (default, then the preset)."""
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "metrics" / "default.yaml")
    if preset != "default":
        extra = OmegaConf.load(REPO_ROOT / "conf" / "metrics" / f"{preset}.yaml")
        extra.pop("defaults", None)
        cfg = OmegaConf.merge(cfg, extra)
    return OmegaConf.to_container(OmegaConf.merge(cfg, overrides))


# The `embedder` group's model: the retrieval group embeds retrieved answers with it.
EMBEDDER = OmegaConf.load(REPO_ROOT / "conf" / "embedder" / "all_minilm_l6_v2.yaml").name


def score(rows: list[dict], cfg: dict) -> metrics.ScoreResult:
    """score_items on plain rows, read the way a predictions file is (one error per bad row)."""
    records = [EvalRow.from_dict(r, where=f"item {i}") for i, r in enumerate(rows)]
    return metrics.score_items(records, metrics.MetricsOptions.from_cfg(cfg), embedder=EMBEDDER)


def predictions(variant: str) -> list[dict]:
    path = REFERENCE / "predictions" / f"{variant}.jsonl"
    if not path.is_file():
        pytest.skip(f"original study's predictions not here ({path})")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------- lexical


def test_squad_normalisation_and_exact_match():
    assert lexical.normalize_answer("The  Cat, sat!") == "cat sat"
    assert lexical.normalize_answer("An apple a day") == "apple day"
    assert lexical.exact_match("The cat.", "cat", "squad") == 1.0
    assert lexical.exact_match("The cat.", "cat", "strip_lower") == 0.0
    assert lexical.exact_match("  The Cat. ", "the cat.", "strip_lower") == 1.0
    assert lexical.exact_match("dog", "cat", "squad") == 0.0
    with pytest.raises(QaLabError, match="metrics.exact_match"):
        lexical.exact_match("a", "a", "fuzzy")


def test_token_f1_by_hand():
    # pred -> [cat, sat]; ref -> [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3.
    assert lexical.token_f1("the cat sat", "the cat sat on a mat") == pytest.approx(2 / 3)
    assert lexical.token_f1("Paris", "paris.") == 1.0
    assert lexical.token_f1("dog", "cat") == 0.0
    assert lexical.token_f1("", "") == 0.0  # SQuAD v1.1: no overlap -> 0


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on the mat sat") = "the cat on the mat" = 5 of 6.
    # LCS("the cat sat", "cat the") = 1: P = 1/2, R = 1/3, F = 2PR/(P+R) = 0.4.
    scores = lexical.rouge_l_f1(
        ["the cat on the mat sat", "cat the"],
        ["the cat sat on the mat", "the cat sat"],
        stemmer=False,
    )
    assert scores == pytest.approx([5 / 6, 0.4])


def test_rouge_stemmer_switch():
    assert lexical.rouge_l_f1(["running"], ["runs"], stemmer=True) == [1.0]
    assert lexical.rouge_l_f1(["running"], ["runs"], stemmer=False) == [0.0]


def test_corpus_bleu_by_hand():
    # 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3, equal lengths (BP = 1).
    bleu = lexical.bleu_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert bleu.corpus == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # A 4-token hypothesis inside a 6-token reference: precisions 1, BP = exp(1 - 6/4).
    short = lexical.bleu_scores(["the cat sat on"], ["the cat sat on the mat"])
    assert short.corpus == pytest.approx(math.exp(1 - 6 / 4))
    # Longer hypothesis: BP = 1 (HF evaluate and sacrebleu agree here).
    refs = ["the cat sat on the mat", "a dog lay on a log today"]
    same = lexical.bleu_scores(refs, refs)
    assert same.corpus == pytest.approx(1.0)
    assert same.sentence == pytest.approx([1.0, 1.0])
    assert same.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:none")


def test_bleu_stats_rebuild_corpus_bleu():
    preds = ["the cat sat on the mat", "a quick brown fox", "nothing in common here at all"]
    refs = ["the cat sat on a mat", "the quick brown fox jumps", "totally different words used"]
    for smooth in ("none", "exp"):
        bleu = lexical.bleu_scores(preds, refs, smooth=smooth)
        assert lexical.corpus_bleu_from_stats(bleu.stats, smooth=smooth) == pytest.approx(
            bleu.corpus
        )
        first = lexical.corpus_bleu_from_stats(bleu.stats[:1], smooth=smooth)
        assert first == pytest.approx(
            lexical.bleu_scores(preds[:1], refs[:1], smooth=smooth).corpus
        )


def test_bleu_matches_hf_tokenizer_on_segment_final_hyphen():
    # HF's Tokenizer13a deletes "-\n" before sacrebleu would rstrip it away from the hyphen.
    ref = "the cat sat on the mat"
    assert lexical.bleu_scores([ref + "-\n"], [ref]).corpus == pytest.approx(1.0)


def test_bleu_config_is_validated():
    with pytest.raises(QaLabError, match="metrics.bleu_smooth"):
        lexical.bleu_scores(["a"], ["a"], smooth="laplace")
    with pytest.raises(QaLabError, match="metrics.bleu_tokenize"):
        lexical.bleu_scores(["a"], ["a"], tokenize="moses")


# ---------------------------------------------------------------- diagnostics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A stack is LIFO.\n\nQuestion:\nWhat is a queue?", 1.0),
        ("A stack is LIFO.\nQ: what else?", 1.0),
        ("A stack is LIFO.\n### Question 2\nWhat is a heap?", 1.0),
        ("A stack is LIFO.\nUser: thanks", 1.0),
        ("A stack is LIFO.<|im_end|>\n<|im_start|>user\nmore", 1.0),
        ("A stack is LIFO.\n[INST] next [/INST]", 1.0),
        ("A stack is LIFO.\n\nAnswer: a queue is FIFO", 1.0),
        ("Answer: a stack is LIFO.", 0.0),  # echoing the cue on the first line is fine
        ("\n Answer: a stack is LIFO.", 0.0),  # ... also after leading blank lines
        ("The question: is it LIFO? Yes.", 0.0),
        ("Answer the question first.\nThen explain.", 0.0),
        ("Use a Queue: FIFO order.\nQueues help.", 0.0),
    ],
)
def test_runaway_patterns(text, expected):
    assert diagnostics.is_runaway(text) == expected


def test_runaway_on_original_finetuned_predictions():
    rows = predictions("finetuned")
    flags = [diagnostics.is_runaway(r["prediction"]) for r in rows]
    continued = [i for i, r in enumerate(rows) if "\n\nQuestion:" in r["prediction"]]
    assert len(continued) >= 40  # the file is full of invented follow-up questions
    assert all(flags[i] == 1.0 for i in continued)
    vanilla = [diagnostics.is_runaway(r["prediction"]) for r in predictions("vanilla")]
    assert sum(vanilla) == 0  # prose answers with "1. Consistency:" lists are not runaways


def test_other_diagnostics():
    assert diagnostics.is_empty("  \n ") == 1.0 and diagnostics.is_empty(" x ") == 0.0
    assert diagnostics.is_truncated("length") == 1.0
    assert diagnostics.is_truncated("eos", 64, 64) == 0.0  # the recorded reason wins
    assert diagnostics.is_truncated(None, 64, 64) == 1.0
    assert diagnostics.is_truncated(None, 10, 64) == 0.0
    assert math.isnan(diagnostics.is_truncated())
    assert diagnostics.length_ratio("one two three four", "one two") == 2.0
    assert diagnostics.length_ratio("one", "") == 1.0
    for text in (
        "I don't know.",
        "I DO NOT KNOW",
        "I cannot answer that",
        "Not sure.",
        "There is no information about it",
        "I don\u2019t know",
    ):
        assert diagnostics.is_idk(text) == 1.0, text
    for text in ("Make sure the key is known.", "Knowledge graphs store facts."):
        assert diagnostics.is_idk(text) == 0.0, text
    assert diagnostics.throughput(10, 500, 2.0) == {"answers_per_s": 5.0, "tokens_per_s": 250.0}
    assert math.isnan(diagnostics.throughput(10, 500, 0.0)["answers_per_s"])


# ---------------------------------------------------------------- groups and score_items


def test_unknown_metric_group_names_the_key():
    with pytest.raises(QaLabError, match=r"metrics\.groups='fluency'.*lexical, semantic"):
        score(
            [{"question": "q", "prediction": "a", "reference": "a"}],
            metrics_cfg(groups=["lexical", "fluency"]),
        )
    assert metrics.validate_groups("lexical, diagnostics") == ("lexical", "diagnostics")


def test_missing_row_field_and_config_key():
    with pytest.raises(QaLabError, match="item 0: missing 'reference'"):
        score([{"question": "q", "prediction": "a"}], metrics_cfg())
    cfg = metrics_cfg(groups=["lexical"])
    del cfg["bleu_smooth"]
    with pytest.raises(QaLabError, match="metrics.bleu_smooth is missing"):
        score([{"question": "q", "prediction": "a", "reference": "a"}], cfg)


def test_score_items_lexical_and_diagnostics():
    rows = [
        {
            "id": "a",
            "topic": "os",
            "seed_id": "s1",
            "question": "q1",
            "prediction": "the cat sat on the mat",
            "reference": "the cat sat on the mat",
            "stop_reason": "eos",
        },
        {
            "id": "b",
            "topic": "os",
            "seed_id": "s1",
            "question": "q2",
            "prediction": "A dog.\n\nQuestion:\nmore?",
            "reference": "a dog lay on a log",
            "stop_reason": "length",
        },
        {
            "id": "c",
            "topic": "db",
            "seed_id": "s2",
            "question": "q3",
            "prediction": "  ",
            "reference": "an index speeds up reads",
            "generated_tokens": 3,
            "max_new_tokens": 64,
        },
    ]
    result = score(rows, metrics_cfg(groups=["lexical", "diagnostics"]))
    assert result.per_item[0]["exact_match"] == 1.0 and result.per_item[0]["rougeL_f1"] == 1.0
    assert [r["runaway"] for r in result.per_item] == [0.0, 1.0, 0.0]
    assert [r["truncated"] for r in result.per_item] == [0.0, 1.0, 0.0]
    assert [r["empty"] for r in result.per_item] == [0.0, 0.0, 1.0]
    corpus = result.corpus
    for name in (
        "bleu",
        "bleu_signature",
        "sentence_bleu",
        "rougeL_f1",
        "exact_match",
        "token_f1",
        "runaway_rate",
        "truncation_rate",
        "empty_rate",
        "length_ratio",
        "idk_rate",
    ):
        assert name in corpus, name
    assert corpus["runaway_rate"] == pytest.approx(1 / 3)
    assert corpus["exact_match"] == pytest.approx(1 / 3)
    assert result.corpus_bleu(np.arange(3)) == pytest.approx(corpus["bleu"])
    assert result.column("empty").tolist() == [0.0, 0.0, 1.0]
    by_topic = result.topic_means()
    assert by_topic["os"]["n"] == 2 and by_topic["db"]["empty_rate"] == 1.0
    seeds = [r["seed_id"] for r in rows]
    ci = bootstrap_corpus_ci(3, result.corpus_bleu, clusters=seeds, resamples=50)
    assert ci.method == "cluster_bootstrap" and ci.mean == pytest.approx(corpus["bleu"])


def test_truncation_rate_absent_when_unknown():
    rows = [{"question": "q", "prediction": "x y", "reference": "x y z"}]
    result = score(rows, metrics_cfg(groups=["diagnostics"]))
    assert math.isnan(result.per_item[0]["truncated"])
    assert "truncation_rate" not in result.corpus


def test_retrieval_scores():
    rows = [
        {
            "question": "q1",
            "prediction": "p",
            "reference": "A process is a running program.",
            "retrieved": [
                {"answer": "Unrelated text about cooking pasta.", "score": 0.4},
                {"answer": "A process is a running program.", "score": 0.7},
            ],
        },
        {
            "question": "q2",
            "prediction": "p",
            "reference": "B-trees keep data sorted.",
            "retrieved": [],
        },
    ]
    result = score(rows, metrics_cfg(groups=["retrieval"]))
    first, second = result.per_item
    assert first["retrieval_top1_score"] == pytest.approx(0.7)
    assert first["retrieval_best_rougeL"] == pytest.approx(1.0)
    assert first["retrieval_best_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert math.isnan(second["retrieval_best_cosine"])
    assert result.corpus["retrieval_best_rougeL"] == pytest.approx(1.0)
    # No retrieved passages anywhere (vanilla, LoRA): the group is skipped, not NaN-filled.
    plain = score(
        [{k: v for k, v in rows[1].items() if k != "retrieved"}], metrics_cfg(groups=["retrieval"])
    )
    assert plain.per_item == [{}]


# ---------------------------------------------------------------- semantic

REFS = [
    "A process is an instance of a program that is being executed.",
    "TCP provides reliable, ordered delivery of a byte stream between hosts.",
    "A hash table maps keys to values using a hash function.",
    "Docker containers package an application with its dependencies.",
    "Gradient descent updates parameters in the direction of the negative gradient.",
    "An index speeds up database reads at the cost of slower writes.",
    "Kubernetes schedules containers across a cluster of machines.",
    "Binary search halves the search interval on every step of a sorted array.",
    "HTTPS encrypts web traffic with TLS.",
    "A mutex lets only one thread enter a critical section at a time.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The French Revolution began in 1789.",
]
PARAPHRASES = [
    "A process is a program instance that is currently running.",
    "TCP delivers a stream of bytes reliably and in order between two hosts.",
    "Hash tables use a hash function to map keys onto values.",
    "A Docker container bundles an app together with all its dependencies.",
    "Gradient descent moves the parameters along the negative gradient.",
    "Indexes make database reads faster but writes slower.",
    "Kubernetes places containers on the machines of a cluster.",
    "Binary search cuts the interval in half each step on a sorted array.",
    "HTTPS uses TLS to encrypt traffic on the web.",
    "A mutex allows a single thread at a time into a critical section.",
    "Plants turn light energy into chemical energy through photosynthesis.",
    "The French Revolution started in 1789.",
]


@pytest.fixture(scope="module")
def bs_kwargs():
    return {"model": "all-MiniLM-L6-v2", "num_layers": 6, "baseline_pairs": 200, "batch_size": 64}


def test_bertscore_identical_unrelated_and_paraphrases(bs_kwargs):
    same = semantic.bertscore(REFS, REFS, **bs_kwargs)
    assert same.baseline_source == "computed" and same.num_layers == 6
    assert min(same.f1_raw) > 0.999
    assert min(same.f1) > 0.99
    unrelated = semantic.bertscore(REFS[1:] + REFS[:1], REFS, **bs_kwargs)
    assert unrelated.baseline == same.baseline  # same references: cached baseline
    assert abs(float(np.mean(unrelated.f1))) < 0.1  # rescaled: unrelated lands near 0
    para = semantic.bertscore(PARAPHRASES, REFS, **bs_kwargs)
    base_f = same.baseline[2]
    assert 0.0 < base_f < min(para.f1_raw)
    assert float(np.mean(para.f1)) > 0.4
    # Rescaling is (raw - b) / (1 - b), item by item.
    assert para.f1[0] == pytest.approx((para.f1_raw[0] - base_f) / (1 - base_f))


def test_bertscore_blank_candidate_scores_zero(bs_kwargs):
    result = semantic.bertscore(["", PARAPHRASES[1]], REFS[:2], **bs_kwargs)
    assert result.f1_raw[0] == 0.0 and result.f1_raw[1] > 0.5


def test_bertscore_in_score_items(bs_kwargs):
    rows = [{"question": "q", "prediction": p, "reference": r} for p, r in zip(PARAPHRASES, REFS)]
    cfg = metrics_cfg(groups=["semantic"], bertscore={"baseline_pairs": 200})
    result = score(rows, cfg)
    corpus = result.corpus
    assert corpus["bertscore_model"] == "all-MiniLM-L6-v2"
    assert corpus["bertscore_num_layers"] == 6
    assert corpus["bertscore_baseline_f1"] < corpus["bertscore_f1_raw"]
    for name in ("bertscore_f1", "bertscore_precision", "bertscore_recall"):
        assert name in result.per_item[0]


def test_official_baseline_only_for_known_hub_models():
    assert semantic.official_baseline_path("roberta-large") is not None
    assert semantic.official_baseline_path("all-MiniLM-L6-v2") is None


# ---------------------------------------------------------------- the original study


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_preset_reproduces_logged_bleu_and_rouge(variant):
    rows = predictions(variant)
    result = score(rows, metrics_cfg("original"))
    logged_bleu, logged_rouge = LOGGED[variant]
    assert len(rows) == 272
    assert round(result.corpus["bleu"], 4) == logged_bleu
    # HF's rouge logs the median of 1000 unseeded bootstrap means (sd ~3e-4 here), so only the
    # 3rd decimal is reproducible; our number is the plain mean.
    assert abs(result.corpus["rougeL_f1"] - logged_rouge) < 5e-4


def test_unfinished_flags_answers_cut_mid_sentence():
    from qa_lab.diagnostics import is_unfinished

    assert is_unfinished("The new version is monitored closely for any signs of inst") == 1.0
    assert is_unfinished("A stack is LIFO.") == 0.0
    assert is_unfinished("Is it O(n)?") == 0.0
    assert is_unfinished("   ") == 0.0


def test_copy_rate_flags_answers_lifted_from_the_retrieved_passages():
    passage = {"answer": "A mutex lets one thread at a time into a critical section.", "score": 0.9}
    rows = [
        {  # verbatim copy of the retrieved answer
            "question": "q1",
            "prediction": "A mutex lets one thread at a time into a critical section.",
            "reference": "Mutual exclusion for a critical section.",
            "retrieved": [passage],
        },
        {  # its own words
            "question": "q2",
            "prediction": "It is a lock; only the holder may run the protected code.",
            "reference": "Mutual exclusion for a critical section.",
            "retrieved": [passage],
        },
    ]
    result = score(rows, metrics_cfg(groups=["retrieval"]))
    copied, own = result.per_item
    assert copied["copy_rougeL"] == pytest.approx(1.0)
    assert copied["copied"] == 1.0
    assert own["copy_rougeL"] < 0.5
    assert own["copied"] == 0.0
    assert result.corpus["copy_rate"] == pytest.approx(0.5)
    loose = score(rows, metrics_cfg(groups=["retrieval"], copy_threshold=0.0))
    assert loose.corpus["copy_rate"] == 1.0  # every answer overlaps its passage somewhat


def test_several_references_use_the_best_or_all():
    preds = ["the cat sat on the mat", "a dog barked"]
    refs = [["a completely different text here", "the cat sat on the mat"], "a dog barked"]
    assert lexical.exact_match(preds[0], refs[0]) == 1.0
    assert lexical.exact_match(preds[0], refs[0][0]) == 0.0
    assert lexical.token_f1(preds[0], refs[0]) == 1.0
    assert lexical.rouge_l_f1(preds, refs) == [1.0, 1.0]
    both = lexical.bleu_scores(preds, refs)
    first_only = lexical.bleu_scores(preds, [refs[0][0], refs[1]])
    assert both.corpus == pytest.approx(1.0) and first_only.corpus < 0.5
    assert both.sentence[0] == pytest.approx(1.0)
    assert lexical.corpus_bleu_from_stats(both.stats) == pytest.approx(both.corpus)
    rows = [
        {"question": "q1", "prediction": preds[0], "reference": refs[0][0], "references": refs[0]},
        {"question": "q2", "prediction": preds[1], "reference": refs[1]},
    ]
    scored = score(rows, metrics_cfg(groups=["lexical", "diagnostics"]))
    assert scored.column("exact_match").tolist() == [1.0, 1.0]
    assert scored.per_item[0]["length_ratio"] == pytest.approx(6 / 5)  # the first reference


def test_group_scorers_run_in_one_order_whatever_the_config_order():
    rows = [{"question": "q", "prediction": "a b.", "reference": "a b c"}]
    forward = score(rows, metrics_cfg(groups=["lexical", "diagnostics"]))
    backward = score(rows, metrics_cfg(groups=["diagnostics", "lexical"]))
    assert list(backward.per_item[0]) == list(forward.per_item[0])
    assert list(forward.per_item[0])[:2] == ["sentence_bleu", "rougeL_f1"]
    assert set(metrics.GROUP_SCORERS) | {"judge"} == set(metrics.METRIC_GROUPS)


def test_options_check_choices_before_any_scoring():
    with pytest.raises(QaLabError, match="metrics.exact_match"):
        metrics.MetricsOptions.from_cfg(metrics_cfg(exact_match="fuzzy"))
    with pytest.raises(QaLabError, match="metrics.bleu_smooth"):
        metrics.MetricsOptions.from_cfg(metrics_cfg(bleu_smooth="laplace"))
    opts = metrics.MetricsOptions.from_cfg(metrics_cfg("original"))
    assert (opts.groups, opts.rouge_stemmer, opts.exact_match) == (
        ("lexical", "diagnostics"),
        False,
        "strip_lower",
    )
