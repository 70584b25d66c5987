"""The sweep report's numbers: paired comparisons, 2x2 effects and tables, checked by hand.

Runs are built in memory with known per-item scores (what `reporting._load_runs` reads back
from MLflow), so every expected number below is computed here, independently of `stats`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qa_lab import reporting
from qa_lab.metrics import BootstrapOptions
from qa_lab.records import EvalRow

BOOT = BootstrapOptions(resamples=1000, confidence=0.95, seed=0)
BASE = [0.1, 0.4, 0.3, 0.6, 0.2, 0.5]  # vanilla's rougeL_f1 on six items, six seed clusters
TOPICS = ["os", "os", "db", "db", "db", "net"]
NEAR_DUP = [True, False, False, True, False, False]


def _items(rouge: list[float], token: list[float]) -> list[EvalRow]:
    return [
        EvalRow(
            item_id=f"i{n}",
            question=f"q{n}",
            reference=f"r{n}",
            prediction=f"p{n}",
            topic=TOPICS[n],
            seed_id=f"s{n}",
            near_dup=NEAR_DUP[n],
            scores={"rougeL_f1": rouge[n], "token_f1": token[n]},
        )
        for n in range(len(rouge))
    ]


def _run(variant: str, rouge: list[float], token: list[float], **metrics: float) -> dict:
    ci = {
        m: {"mean": float(np.mean(v)), "low": min(v), "high": max(v), "n": len(v)}
        for m, v in (("rougeL_f1", rouge), ("token_f1", token))
    }
    return {
        "run_id": variant,
        "name": variant,
        "label": variant,
        "tags": {"qa_lab.variant": variant, "qa_lab.eval_set_hash": "h"},
        "params": {"retriever.kind": "faiss" if "rag" in variant else "none"},
        "metrics": metrics,
        "ci": ci,
        "items": _items(rouge, token),
    }


def _shifted(shift: float) -> list[float]:
    return [x + shift for x in BASE]


def _exact_sign_flip_p(d: list[float]) -> float:
    """Two-sided p of mean(d) != 0: the share of all 2^n sign patterns at least as extreme."""
    observed = abs(sum(d))
    hits = sum(
        abs(sum(s * x for s, x in zip(signs, d))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    return hits / 2 ** len(d)


def _table(md: str, heading: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table under a `## heading`."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _fold(md: str, heading: str, metric: str) -> list[list[str]]:
    """The body rows of one metric's folded table (`### <metric> <arrow>`) under a heading."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    fold = section.split(f"\n### {metric} ", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in fold.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def _numbers(cell: str) -> list[float]:
    """`+0.1000 [+0.0500, +0.2000]` -> [0.1, 0.05, 0.2]."""
    return [float(x) for x in cell.replace("[", " ").replace("]", " ").replace(",", " ").split()]


def test_paired_comparison_diff_ci_p_and_effect_size_by_hand():
    d = [0.1, 0.2, -0.05, 0.3, 0.0, 0.15]
    vanilla = _run("vanilla", BASE, BASE)
    rag = _run("rag", [a + x for a, x in zip(BASE, d)], _shifted(0.1))
    rows = reporting.paired_comparisons([vanilla, rag], BOOT)
    by_metric = {r["metric"]: r for r in rows}
    assert list(by_metric) == ["rougeL_f1", "token_f1"]  # PAIRED order, only scored metrics
    rouge = by_metric["rougeL_f1"]
    assert (rouge["a"], rouge["b"]) == ("vanilla", "rag")
    assert rouge["diff"] == pytest.approx(np.mean(d))
    assert rouge["p_value"] == pytest.approx(_exact_sign_flip_p(d))  # 2^6 = 64 patterns, exact
    assert rouge["effect_size"] == pytest.approx(np.mean(d) / np.std(d, ddof=1))
    assert min(d) <= rouge["ci_low"] < rouge["diff"] < rouge["ci_high"] <= max(d)
    assert rouge["p_holm"] == rouge["p_value"]  # one contrast per metric: nothing to adjust
    # A constant shift: every resample has the same mean, only the all-same signs reach it.
    token = by_metric["token_f1"]
    assert [token["diff"], token["ci_low"], token["ci_high"]] == pytest.approx([0.1] * 3)
    assert token["p_value"] == pytest.approx(2 / 64)


def test_holm_adjusts_the_pairs_of_each_metric():
    runs = [
        _run("vanilla", BASE, BASE),
        _run("rag k=1", _shifted(0.1), BASE),
        _run("rag k=3", [x + s for x, s in zip(BASE, [0.3, -0.3, 0.3, -0.3, 0.3, 0.0])], BASE),
    ]
    rouge = [r for r in reporting.paired_comparisons(runs, BOOT) if r["metric"] == "rougeL_f1"]
    assert [(r["a"], r["b"]) for r in rouge] == [
        ("vanilla", "rag k=1"),
        ("vanilla", "rag k=3"),
        ("rag k=1", "rag k=3"),
    ]
    p = [r["p_value"] for r in rouge]
    order = np.argsort(p, kind="stable")
    expected = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):  # Holm step-down: (m - rank) * p, kept monotone, cap 1
        running = max(running, min(1.0, (3 - rank) * p[i]))
        expected[i] = running
    assert [r["p_holm"] for r in rouge] == pytest.approx(expected.tolist())
    assert p[0] == pytest.approx(2 / 64)


def _grid() -> list[dict]:
    # vanilla x; rag x + 0.2; lora x + 0.1; rag_lora x + 0.35: RAG helps 0.05 more after LoRA.
    return [
        _run("vanilla", BASE, BASE, answers_per_s=2.0),
        _run("rag", _shifted(0.2), _shifted(0.2)),
        _run("lora", _shifted(0.1), _shifted(0.1)),
        _run("rag_lora", _shifted(0.35), _shifted(0.1)),
    ]


def test_2x2_effects_by_hand():
    eff = {(e["effect"], e["metric"]): e for e in reporting.effects(_grid(), BOOT)}
    rouge_expected = {
        "rag": ((0.2 - 0.0) + (0.35 - 0.1)) / 2,  # 0.225
        "ft": ((0.1 - 0.0) + (0.35 - 0.2)) / 2,  # 0.125
        "interaction": (0.35 - 0.1) - (0.2 - 0.0),  # 0.05
    }
    for name, value in rouge_expected.items():
        e = eff[(name, "rougeL_f1")]
        assert [e["estimate"], e["ci_low"], e["ci_high"]] == pytest.approx([value] * 3)
        assert e["p_value"] == pytest.approx(2 / 64)
    # token_f1: rag_lora = lora, so RAG's gain vanishes after LoRA (interaction -0.2).
    assert eff[("rag", "token_f1")]["estimate"] == pytest.approx(0.1)
    assert eff[("ft", "token_f1")]["estimate"] == pytest.approx(0.0)
    assert eff[("interaction", "token_f1")]["estimate"] == pytest.approx(-0.2)
    assert reporting.effects(_grid()[:3], BOOT) == []  # not the 2x2 grid: no decomposition


def test_report_tables_and_logged_metrics_carry_those_numbers():
    runs = _grid()
    report = reporting.build_report(runs, BOOT)
    md, logged = report.markdown, report.logged
    assert set(report.figures) == {"interaction", "metrics", "topics"}
    grid = _table(md, "Grid (mean [95% CI])")
    assert [row[0] for row in grid] == ["vanilla", "rag", "lora", "rag_lora"]
    for row, run in zip(grid, runs):
        c = run["ci"]["rougeL_f1"]
        assert _numbers(row[1]) == pytest.approx([c["mean"], c["low"], c["high"]], abs=5e-5)
    paired = {(r[0], r[1]): r for r in _fold(md, "Paired comparisons", "rougeL_f1")}
    row = paired[("vanilla", "rag_lora")]
    assert _numbers(row[2]) == pytest.approx([0.35] * 3, abs=5e-5)
    assert float(row[3]) == pytest.approx(2 / 64, abs=1e-4)  # printed with 4 decimals
    assert row[4] == f"{6 * 2 / 64:.4f}"  # Holm over the 6 pairs: not significant, no mark
    effects = {r[0]: r for r in _fold(md, "2×2 decomposition", "rougeL_f1")}
    assert _numbers(effects["interaction"][1]) == pytest.approx([0.05] * 3, abs=5e-5)
    assert effects["rag"][3] == f"{3 * 2 / 64:.4f}"  # Holm over the metric's three effects
    assert logged["effect/rag/rougeL_f1"] == pytest.approx(0.225)
    assert logged["compare/vanilla_vs_rag/rougeL_f1/diff"] == pytest.approx(0.2)
    assert logged["compare/lora_vs_rag_lora/token_f1/ci_high"] == pytest.approx(0.0)
    # 6 pairs x 2 metrics x 5 numbers (diff, CI, p, MDE), 3 effects x 2 metrics x 2 (and MDE)
    assert len(logged) == 6 * 2 * 5 + 3 * 2 * 2
    assert logged["compare/vanilla_vs_rag/rougeL_f1/mde"] == pytest.approx(0.0)  # d constant


def test_topic_near_dup_and_diagnostics_tables_by_hand():
    runs = _grid()
    md = reporting.build_report(runs, BOOT).markdown
    topics = _table(md, "Per topic")
    header = next(line for line in md.split("## Per topic", 1)[1].splitlines() if "|" in line)
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["db", "net", "os"]
    rag = topics[1]
    # rag on db: items 2, 3, 4 -> rougeL_f1 (0.5 + 0.8 + 0.4) / 3; no bertscore_f1 scored
    rouge, bertscore = rag[1].split(" (")[0].split(" / ")
    assert float(rouge) == pytest.approx((0.5 + 0.8 + 0.4) / 3, abs=5e-4) and bertscore == "–"
    assert rag[1].endswith("(n=3)") and rag[2].endswith("(n=1)")
    near = _table(md, "Near-duplicate split")
    vanilla = near[0]
    # vanilla rougeL_f1: near-dups are items 0 and 3 (0.1, 0.6), the rest 0.4, 0.3, 0.2, 0.5
    assert vanilla[1] == f"{(0.1 + 0.6) / 2:.3f} (n=2)"
    assert vanilla[2] == f"{(0.4 + 0.3 + 0.2 + 0.5) / 4:.3f} (n=4)"
    diagnostics = _table(md, "Diagnostics")
    assert [row[-2] for row in diagnostics] == ["2.00", "cached", "cached", "cached"]


def test_train_vs_test_and_leakage_tables_by_hand():
    train = {
        "train_sample/rougeL_f1": 0.9,
        "train_sample/rougeL_f1_ci_low": 0.8,
        "train_sample/rougeL_f1_ci_high": 0.95,
        "train_sample/n": 4.0,
        "leakage/near_dup_rate": 0.125,
        "leakage/near_dup": 3.0,
    }
    runs = [_run("vanilla", BASE, BASE, **train), _run("rag", _shifted(0.2), BASE, **train)]
    md = reporting.build_report(runs, BOOT).markdown
    assert "closed-book: 4 seeded training items" in md
    rows = _table(md, "Did fine-tuning learn?")
    assert [row[0] for row in rows] == ["vanilla"]  # a RAG run had context at test time
    test, sample, gap = rows[0][1:]
    assert _numbers(sample) == pytest.approx([0.9, 0.8, 0.95])
    assert float(gap) == pytest.approx(0.9 - np.mean(BASE), abs=5e-4)
    assert _numbers(test)[0] == pytest.approx(np.mean(BASE), abs=5e-5)
    leakage = dict(_table(md, "Leakage audit"))
    assert (leakage["near_dup"], leakage["near_dup_rate"]) == ("3", "0.125")


# ---------------------------------------------------------------- retrieval, attribution, LoRA

NAN = float("nan")
GOLD_HIT = [1.0, 1.0, 0.0, 0.0, 1.0, NAN]  # item 5 has no gold chunks
CORRECT = {
    "vanilla": [0.0, 0.0, 1.0, 1.0, 0.0, 1.0],
    "lora": [1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
    "rag": [1.0, 0.0, 0.0, 1.0, 0.0, 1.0],
    "rag_lora": [1.0, 1.0, 1.0, 1.0, 0.0, NAN],  # item 5: an unparseable verdict
}


def _scored_grid(rag_k: str = "3", rag_lora_k: str = "5") -> list[dict]:
    """The 2x2 grid with `correct` on every run, cells on rag, ranking CIs on both RAG runs."""
    from dataclasses import replace

    from qa_lab.retrieval_metrics import attribution

    runs = _grid()
    for run in runs:
        variant = run["name"]
        columns = {"correct": CORRECT[variant]}
        if variant == "rag":
            columns.update(attribution(CORRECT[variant], GOLD_HIT))
        run["items"] = [
            replace(it, scores={**it.scores, **{k: v[n] for k, v in columns.items()}})
            for n, it in enumerate(run["items"])
        ]
    for run, k, recall in ((runs[1], rag_k, 0.6), (runs[3], rag_lora_k, 0.8)):
        run["params"]["retriever.k"] = k
        run["ci"]["retrieval/recall_at_k"] = {"mean": recall, "low": 0.2, "high": 1.0, "n": 5}
        run["ci"]["retrieval/mrr"] = {"mean": 0.5, "low": 0.25, "high": 0.75, "n": 5}
    return runs


def test_retrieval_ranking_table_with_k_when_runs_differ():
    md = reporting.build_report(_scored_grid(), BOOT).markdown
    header = md.split("## Retrieval (against the gold chunks)", 1)[1].split("\n|")[1]
    assert [c.strip() for c in header.split("|")][:4] == ["config", "k", "recall@k ↑", "MRR ↑"]
    rows = _table(md, "Retrieval (against the gold chunks)")
    assert [(r[0], r[1]) for r in rows] == [("rag", "3"), ("rag_lora", "5")]  # RAG runs only
    assert _numbers(rows[0][2]) == pytest.approx([0.6, 0.2, 1.0])
    assert _numbers(rows[1][3]) == pytest.approx([0.5, 0.25, 0.75])
    assert rows[0][4:] == ["–", "–"]  # nDCG@k, answer in context: not scored in this run
    same_k = reporting.build_report(_scored_grid("3", "3"), BOOT).markdown
    header = same_k.split("## Retrieval (against the gold chunks)", 1)[1].split("\n|")[1]
    assert [c.strip() for c in header.split("|")][:2] == ["config", "recall@k ↑"]  # no k


def test_where_misses_come_from_by_hand():
    md = reporting.build_report(_scored_grid(), BOOT).markdown
    rows = _table(md, "Where RAG's misses come from")
    # rag (gold hit, right): i0 (1,1) both; i1 (1,0), i4 (1,0) generator; i2 (0,0) retriever;
    # i3 (0,1) parametric; i5 no gold. n = 5.
    assert rows == [
        ["rag", "yes", "1 (20%)", "2 (40%)"],
        ["rag", "no", "1 (20%)", "1 (20%)"],
    ]
    section = md.split("## Where RAG's misses come from", 1)[1].split("\n## ", 1)[0]
    assert "1 of 3 misses had no gold chunk retrieved, 2 had one: the generator dominates." in (
        section
    )


def test_what_only_the_fine_tune_got_right_by_hand():
    md = reporting.build_report(_scored_grid("3", "3"), BOOT).markdown  # the same retriever
    rows = _table(md, "What only the fine-tune got right")
    # lora vs vanilla: only LoRA i0, i4; only vanilla i3; both i2, i5; neither i1
    # rag_lora vs rag: only LoRA i1, i2; both i0, i3; neither i4; i5 unscored (left out)
    assert rows == [
        ["lora", "vanilla", "2", "1", "2", "1"],
        ["rag_lora", "rag", "2", "0", "2", "1"],
    ]
    section = md.split("## What only the fine-tune got right", 1)[1].split("\n## ", 1)[0]
    examples = [line for line in section.splitlines() if line.startswith("- ")]
    assert examples == ["- lora: q0", "- lora: q4", "- rag_lora: q1", "- rag_lora: q2"]
    # rag_lora retrieving k=5 has no base run with its retriever: only lora vs vanilla remains
    other_k = reporting.build_report(_scored_grid("3", "5"), BOOT).markdown
    assert [r[0] for r in _table(other_k, "What only the fine-tune got right")] == ["lora"]


def test_runs_without_the_new_columns_render_without_the_new_sections():
    md = reporting.build_report(_grid(), BOOT).markdown
    assert "## Grid" in md and "## Side by side" in md
    for heading in (
        "Retrieval (against the gold chunks)",
        "Where RAG's misses come from",
        "What only the fine-tune got right",
    ):
        assert f"## {heading}" not in md


def test_retriever_sweep_figure_draws_a_line_per_retriever_with_recall():
    from qa_lab import figures

    def run(kind: str, k: int, quality: float, recall: float | None) -> dict:
        ci = {"rougeL_f1": {"mean": quality, "low": quality - 0.01, "high": quality + 0.01}}
        if recall is not None:
            ci["retrieval/recall_at_k"] = {"mean": recall, "low": recall, "high": recall}
        variant = "vanilla" if kind == "none" else "rag"
        return {
            "tags": {"qa_lab.variant": variant},
            "params": {"retriever.kind": kind, "retriever.k": str(k)},
            "ci": ci,
        }

    runs = [run("none", 0, 0.10, None)] + [
        run(kind, k, 0.1 + k / 100, k / 10) for kind in ("faiss", "bm25") for k in (1, 3, 5)
    ]
    fig = figures.sweep_curves(runs)
    quality, recall = fig.axes
    assert [line.get_label() for line in quality.lines] == ["faiss rougeL_f1", "bm25 rougeL_f1"]
    faiss = quality.lines[0]
    assert list(faiss.get_xdata()) == [0.0, 1.0, 3.0, 5.0]  # the closed-book point starts it
    assert list(faiss.get_ydata()) == pytest.approx([0.10, 0.11, 0.13, 0.15])
    assert list(recall.lines[1].get_ydata()) == pytest.approx([0.1, 0.3, 0.5])


# ---------------------------------------------------------------- the page: summary, folds, cards


def test_summary_sentences_carry_the_numbers():
    md = reporting.build_report(_grid(), BOOT).markdown
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    holm_pairs, holm_effects = 6 * 2 / 64, 3 * 2 / 64  # every p is 2/64 (constant shifts)
    assert (
        "- **rag_lora** scores best on rougeL_f1 ↑ (the headline metric): 0.700 [0.450, 0.950]. "
        f"Its lead over rag (0.550): +0.150 [+0.150, +0.150], Holm p = {holm_pairs:.4f}: not "
        "distinguishable from chance on these items." in summary
    )
    assert (
        "- Retrieval: no distinguishable change in rougeL_f1 (+0.225 [+0.225, +0.225], "
        f"Holm p = {holm_effects:.4f})." in summary
    )
    assert "- Fine-tuning: no distinguishable change in rougeL_f1 (+0.125 [+0.125, +0.125]" in (
        summary
    )
    assert "retrieval's gain is about the same with and without fine-tuning (+0.050" in summary
    # the summary comes before the first table of the page
    assert md.index("## Summary") < md.index("\n|")


def test_significant_difference_is_marked_and_said():
    runs = [_run("vanilla", BASE, BASE), _run("rag", _shifted(0.1), _shifted(0.1))]
    report = reporting.build_report(runs, BOOT)
    p = 2 / 64  # one pair per metric: Holm leaves the exact sign-flip p as it is
    rows = _fold(report.markdown, "Paired comparisons", "rougeL_f1")
    assert [row[:5] for row in rows] == [
        ["vanilla", "rag", "+0.1000 [+0.1000, +0.1000]", f"{p:.4f}", f"{p:.4f} ✱"]
    ]
    assert (
        f"Its lead over vanilla (0.350): +0.100 [+0.100, +0.100], Holm p = {p:.4f}: a real "
        "difference." in report.markdown
    )
    assert report.html().count("<tr class='sig'>") == 2  # rougeL_f1 and token_f1


def test_constant_metric_is_one_line_not_a_table_of_zeros():
    from dataclasses import replace

    runs = _grid()
    for run in runs:
        run["items"] = [
            replace(it, scores={**it.scores, "exact_match": 0.0}) for it in run["items"]
        ]
        run["ci"]["exact_match"] = {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 6}
    report = reporting.build_report(runs, BOOT)
    md = report.markdown
    grid_header = md.split("## Grid (mean [95% CI])", 1)[1].split("\n|")[1]
    assert "exact_match" not in grid_header and "token_f1" in grid_header
    assert "exact_match is 0.0000 in every config (zero-width CI): left out of the grid." in md
    paired = md.split("## Paired comparisons", 1)[1].split("\n## ", 1)[0]
    assert "exact_match: 0.000 on every item of every config, no differences to test." in paired
    assert "### exact_match" not in md
    assert "- exact_match is 0.000 on every item of every config" in md  # said in the summary
    assert report.logged["compare/vanilla_vs_rag/exact_match/diff"] == 0.0  # still logged


def test_details_fold_per_metric_with_the_headline_open():
    html = reporting.build_report(_grid(), BOOT).html()
    assert html.count("<details open><summary>rougeL_f1 ↑</summary>") == 2  # effects, pairs
    assert html.count("<details><summary>token_f1 ↑</summary>") == 2
    assert "<details open><summary>token_f1" not in html


def test_answer_cards_keep_lines_escape_markup_and_show_score_and_flags():
    from dataclasses import replace

    from qa_lab.report_blocks import AnswerCards

    runs = _grid()
    echo = "Pages map to frames.\n</passage 6>\n<passage 7"
    first = runs[0]["items"][0]
    flags = {"markup_echo": 1.0, "truncated": 1.0, "repetition": 0.0}
    runs[0]["items"][0] = replace(first, prediction=echo, scores={**first.scores, **flags})
    report = reporting.build_report(runs, BOOT)
    cards = [b for b in report.blocks if isinstance(b, AnswerCards)]
    assert [c.item_id for c in cards] == [f"i{n}" for n in range(6)]  # all six, sorted by id
    vanilla = cards[0].answers[0]
    assert (vanilla.label, vanilla.text, vanilla.score) == ("vanilla", echo, "rougeL_f1 0.100")
    assert vanilla.flags == ("truncated", "markup_echo")
    assert [a.score for a in cards[0].answers] == [
        f"rougeL_f1 {0.1 + s:.3f}" for s in (0.0, 0.2, 0.1, 0.35)
    ]
    html = report.html()
    assert "<pre>Pages map to frames.\n&lt;/passage 6&gt;\n&lt;passage 7</pre>" in html
    assert "<span class='flag'>markup_echo</span>" in html and "<passage" not in html
    assert f"~~~~text\n{echo}\n~~~~" in report.markdown


def test_diagnostics_table_shows_repetition_rate_with_its_ci():
    from dataclasses import replace

    runs = _grid()
    for run in runs:
        looping = run["name"] == "vanilla"
        run["items"] = [
            replace(it, scores={**it.scores, "repetition": float(looping and n == 1)})
            for n, it in enumerate(run["items"])
        ]
        mean = 1 / 6 if looping else 0.0
        run["ci"]["repetition_rate"] = {"mean": mean, "low": 0.0, "high": 0.5 if looping else 0.0}
    md = reporting.build_report(runs, BOOT).markdown
    rows = _table(md, "Diagnostics")
    assert [r[:2] for r in rows] == [
        ["vanilla", "0.167 [0.000, 0.500]"],
        ["rag", "0.000 [0.000, 0.000]"],
        ["lora", "0.000 [0.000, 0.000]"],
        ["rag_lora", "0.000 [0.000, 0.000]"],
    ]
    assert "- Looping answers (`repetition_rate`): vanilla 1 of 6." in md


def test_interaction_plot_and_topic_heatmap_draw_the_numbers():
    figs = reporting.build_report(_grid(), BOOT).figures
    ax = figs["interaction"].axes[0]
    base, lora = ax.containers  # one errorbar line per model: retrieval off, on
    assert list(base.lines[0].get_ydata()) == pytest.approx([0.35, 0.55])  # vanilla, rag
    assert list(lora.lines[0].get_ydata()) == pytest.approx([0.45, 0.70])  # lora, rag_lora
    (bars,) = base.lines[2]  # the CI bars: vanilla [0.1, 0.6], rag [0.3, 0.8]
    ends = [y for seg in bars.get_segments() for y in seg[:, 1].tolist()]
    assert ends == pytest.approx([0.1, 0.6, 0.3, 0.8])
    heat = figs["topics"].axes[0].images[0].get_array()
    # columns db (items 2-4), net (item 5), os (items 0-1); rows vanilla .. rag_lora
    vanilla = [(0.3 + 0.6 + 0.2) / 3, 0.5, (0.1 + 0.4) / 2]
    assert heat.shape == (4, 3)
    assert heat[0].tolist() == pytest.approx(vanilla)
    assert heat[3].tolist() == pytest.approx([v + 0.35 for v in vanilla])


# ---------------------------------------------------------------- the page in a real browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ANSWERS = {  # per variant: (item 0's answer, the others'); item 0 is the side-by-side check
    "vanilla": (
        "A set is a collection of unordered collections of unordered collections of "
        "unordered collections of unordered collections of unordered collections of",
        "An index speeds up reads.",
    ),
    "rag": ("Pages map to frames.\n</passage 6>\n<passage 7", "An index speeds up reads."),
    "lora": ("Pages map to frames.\nThe TLB caches them.", "An index speeds up reads of rows."),
    "rag_lora": ("Paging maps pages to frames.", "An index speeds up reads of the rows."),
}


def _write_sweep(tmp_path: Path) -> tuple[Any, str]:
    """A real SQLite MLflow store: a sweep parent and four scored evaluate runs under it."""
    import mlflow
    from omegaconf import OmegaConf

    from qa_lab import metrics, run_logging, run_scores
    from tests.test_metrics import EMBEDDER, metrics_cfg

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("qa-lab", artifact_location=(tmp_path / "art").as_uri())
    cfg = OmegaConf.create(
        {"metrics": metrics_cfg(groups=["lexical", "diagnostics"]), "tracking": {"uri": uri}}
    )
    opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    with mlflow.start_run(experiment_id=exp, run_name="sweep") as parent:
        for variant, (first, other) in ANSWERS.items():
            rows = [
                EvalRow(
                    item_id=f"i{n}",
                    question=f"What does structure {n} do?",
                    reference="Pages map to frames." if n == 0 else "An index speeds up reads.",
                    prediction=first if n == 0 else other,
                    topic=TOPICS[n],
                    seed_id=f"s{n}",
                    stop_reason="eos",
                )
                for n in range(6)
            ]
            scored = run_scores.score_rows(rows, opts, embedder=EMBEDDER, cache_dir=tmp_path)
            tags = {"qa_lab.stage": "evaluate", "qa_lab.variant": variant}
            with mlflow.start_run(experiment_id=exp, nested=True, run_name=variant, tags=tags):
                mlflow.set_tag("qa_lab.eval_set_hash", "h")
                mlflow.log_param("retriever.kind", "faiss" if "rag" in variant else "none")
                run_logging.log_scores(scored, {"answers_per_s": 2.0, "tokens_per_s": 40.0})
    return cfg, parent.info.run_id


@pytest.mark.slow
def test_report_page_reads_well_in_chromium_at_1280_px(tmp_path):
    import shutil

    import mlflow
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: sudo apt-get install -y chromium")
    cfg, parent = _write_sweep(tmp_path)
    md = reporting.report_sweep(cfg, parent)  # from MLflow alone, logged on the parent
    assert "vanilla 1 of 6" in md  # the looping answer, counted by repetition_rate
    page_file = tmp_path / "report.html"
    page_file.write_text(mlflow.artifacts.load_text(f"runs:/{parent}/report/report.html"))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(page_file.as_uri())
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) == 3 and all(w > 0 for w in widths)  # interaction, topics, bars
        summary = page.locator("#summary").bounding_box()
        assert summary["y"] < page.locator("table").first.bounding_box()["y"]
        echoed = page.locator(".card pre", has_text="</passage 6>")
        assert echoed.count() == 1 and echoed.inner_text() == ANSWERS["rag"][0]
        assert page.locator("passage").count() == 0  # the markup stayed text
        header = page.locator("th").first
        assert header.evaluate("e => getComputedStyle(e).position") == "sticky"
        page.screenshot(path=str(ARTIFACTS / "report_top.png"))
        browser.close()
