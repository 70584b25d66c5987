"""The report's decision parts, end to end: verdict, power, cost and latency per config.

A 2x2 sweep is logged into a real SQLite MLflow store through the project's own logging
(`run_logging.log_scores` with `generation.speed` on the rows, a train run behind the LoRA
adapter), then reported from MLflow alone by `reporting.report_sweep`. The per-item scores are
chosen so that one contrast is underpowered and others are not, and every expected number
(MDE, costs, the Pareto front) is computed here by hand.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest

from qa_lab import generation, metrics, reporting, run_logging, stats, tracking
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow, Prediction, QAItem
from qa_lab.report_options import DecisionOptions
from qa_lab.run_scores import RunScores
from tests.test_metrics import metrics_cfg
from tests.test_reporting import _fold, _numbers, _table

N = 12  # items, each its own seed cluster
BASE = [0.30, 0.55, 0.42, 0.61, 0.38, 0.47, 0.52, 0.35, 0.58, 0.44, 0.40, 0.50]
NOISE = [0.3 if n % 2 == 0 else -0.28 for n in range(N)]  # mean +0.01, sd 0.30: a noisy null
TINY = [0.002 if n % 2 == 0 else -0.001 for n in range(N)]  # mean +0.0005: a precise null
# Generation seconds per answer: vanilla 0.4/0.6 (mean 0.5), lora 0.5/0.6 (0.55), rag 0.8
# flat, rag_lora 0.7/0.8 (0.75, cheaper than rag); RAG prompts are longer.
SECONDS = {
    "vanilla": [0.4, 0.6] * 6,
    "rag": [0.8] * N,
    "lora": [0.5, 0.6] * 6,
    "rag_lora": [0.7, 0.8] * 6,
}
PROMPT_TOKENS = {"vanilla": 60, "rag": 400, "lora": 60, "rag_lora": 400}
# The adapter's training: its SFT run and the continued pretraining the SFT continued, 0.1
# device-hours together (the CPT found through the adapter's logged model's `cpt_key`)
SFT_WALL_S, CPT_WALL_S = 240.0, 120.0
TRAIN_WALL_S = SFT_WALL_S + CPT_WALL_S
Z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)  # 2.802


def _scores(rag_lora_shift: float) -> dict[str, dict[str, list[float]]]:
    """Per-item rougeL_f1 and token_f1 of each config; rag_lora's rougeL lead is the knob."""

    def plus(xs: list[float]) -> list[float]:
        return [b + x for b, x in zip(BASE, xs)]

    return {
        "vanilla": {"rougeL_f1": BASE, "token_f1": BASE},
        "rag": {"rougeL_f1": plus([0.2] * N), "token_f1": BASE},
        "lora": {"rougeL_f1": plus(NOISE), "token_f1": plus(TINY)},
        "rag_lora": {"rougeL_f1": plus([rag_lora_shift] * N), "token_f1": BASE},
    }


def _rows(variant: str, scores: dict[str, list[float]]) -> list[EvalRow]:
    """The config's answered rows (as the evaluate stage builds them), with their scores."""
    rows = []
    for n in range(N):
        item = QAItem(id=f"i{n}", question=f"q{n}?", answer=f"r{n}", seed_id=f"s{n}")
        pred = Prediction(
            item.id,
            f"p{n}",
            prompt_tokens=PROMPT_TOKENS[variant],
            generated_tokens=20,
            seconds=SECONDS[variant][n],
        )
        row = EvalRow.answered(item, pred, [], [], f"prompt {n}", 64)
        rows.append(replace(row, scores={m: v[n] for m, v in scores.items()}))
    return rows


def _run_scores(rows: list[EvalRow]) -> RunScores:
    """What `run_scores.score_rows` returns, for rows whose scores are given."""
    clusters = [r.seed_id for r in rows]
    ci = {
        m: stats.bootstrap_ci([r.scores[m] for r in rows], clusters=clusters, seed=0).as_dict()
        for m in ("rougeL_f1", "token_f1")
    }
    summary = {m: c["mean"] for m, c in ci.items()}
    return RunScores(rows=rows, corpus={}, ci=ci, summary=summary, topics={})


def _log_sweep(tmp_path: Path, rag_lora_shift: float) -> str:
    """A real SQLite store: a train run, a sweep parent and the 2x2's evaluate runs under it."""
    import mlflow

    tmp_path.mkdir(exist_ok=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("qa-lab", artifact_location=(tmp_path / "art").as_uri())
    for stage, key, wall_s in (("train", "ad1", SFT_WALL_S), ("cpt", "cp1", CPT_WALL_S)):
        with mlflow.start_run(experiment_id=exp, tags={"qa_lab.stage": stage, "qa_lab.key": key}):
            tracking.log_metrics({"wall_s": wall_s, "train_tokens": 5000.0})
    adapter = mlflow.initialize_logged_model(
        name="lora-ad1", params={"train_key": "ad1", "cpt_key": "cp1"}, experiment_id=exp
    ).model_id
    with mlflow.start_run(experiment_id=exp, run_name="sweep") as parent:
        for variant, scores in _scores(rag_lora_shift).items():
            tags = {"qa_lab.stage": "evaluate", "qa_lab.variant": variant}
            tags["qa_lab.eval_set_hash"] = "h"
            tags["qa_lab.model_key"] = "lora:ad1" if "lora" in variant else "smollm2"
            if "lora" in variant:
                tags["qa_lab.logged_model"] = adapter
            with mlflow.start_run(experiment_id=exp, nested=True, run_name=variant, tags=tags):
                mlflow.log_param("retriever.kind", "faiss" if "rag" in variant else "none")
                rows = _rows(variant, scores)
                if "rag" in variant:
                    tracking.log_metrics(
                        {"retrieval/index_build_s": 2.5, "retrieval/index_bytes": 3 * 2**20}
                    )
                run_logging.log_scores(_run_scores(rows), generation.speed(rows, wall_s=9.0))
    return parent.info.run_id


def _cfg(tmp_path: Path, **decision: Any) -> Any:
    from omegaconf import OmegaConf

    node = metrics_cfg(groups=["lexical"], decision=decision)
    return OmegaConf.create({"metrics": node, "tracking": {"uri": f"sqlite:///{tmp_path}/x"}})


def _report(cfg: Any, parent: str) -> reporting.Report:
    opts = metrics.MetricsOptions.from_cfg(cfg.metrics)
    return reporting.build_report(reporting._load_runs(parent), opts.bootstrap, opts.decision)


def _mde(d: list[float]) -> float:
    """The closed form: (z_0.975 + z_0.8) * sd(d) / sqrt(n), one item per cluster."""
    return Z * float(np.std(d, ddof=1)) / math.sqrt(len(d))


def _verdict_numbers(text: str, metric: str) -> list[float]:
    """best mean [low, high] and lead [low, high] from a verdict sentence on `metric`."""
    sentence = next(s for s in re.split(r"(?<=\.)\s(?=[A-Z])", text) if f"on {metric}" in s)
    return [float(x) for x in re.findall(r"-?\d+\.\d{3}", sentence)[:6]]


def test_report_from_a_logged_sweep_states_verdict_power_and_cost(tmp_path):
    import mlflow

    parent = _log_sweep(tmp_path, rag_lora_shift=0.25)
    cfg = _cfg(tmp_path)
    md = reporting.report_sweep(cfg, parent)
    report = _report(cfg, parent)
    assert md == report.markdown  # report=<id> rebuilds the same page from MLflow alone
    # The verdict is the first block after the intro, and the parent's tag.
    assert report.blocks[2].text == "Verdict"
    tag = mlflow.MlflowClient().get_run(parent).data.tags["qa_lab.verdict"]
    assert tag == report.verdict and tag.startswith("rag_lora leads on rougeL_f1")
    mean = float(np.mean(BASE)) + 0.25
    assert _verdict_numbers(tag, "rougeL_f1")[:1] == pytest.approx([mean], abs=5e-4)
    assert _verdict_numbers(tag, "rougeL_f1")[3:6] == pytest.approx([0.05] * 3, abs=5e-4)
    assert "rag_lora costs 0.94x as much per 1,000 answers as rag" in tag  # 0.75 s / 0.8 s
    # token_f1: lora leads vanilla by +0.0005, CI across 0, but the design sees 0.02 easily.
    assert "No decisive winner on token_f1: lora" in tag
    stated = re.search(r"detects a lead of (\d\.\d{3}) or more, within", tag)
    assert float(stated.group(1)) == pytest.approx(_mde(TINY), abs=5e-4)

    # Power: lora vs vanilla on rougeL_f1 is a noisy null (underpowered), vanilla vs rag a
    # detection, lora vs vanilla on token_f1 a precise null (not underpowered).
    rouge = {(r[0], r[1]): r for r in _fold(md, "Paired comparisons", "rougeL_f1")}
    noisy, detected = rouge[("vanilla", "lora")], rouge[("vanilla", "rag")]
    assert _numbers(noisy[2])[1] < 0 < _numbers(noisy[2])[2]
    assert float(noisy[6]) == pytest.approx(_mde(NOISE), abs=5e-5) and noisy[7] == "underpowered"
    assert float(detected[6]) == pytest.approx(0.0, abs=5e-5) and detected[7] == ""
    token = {(r[0], r[1]): r for r in _fold(md, "Paired comparisons", "token_f1")}
    precise = token[("vanilla", "lora")]
    assert float(precise[6]) == pytest.approx(_mde(TINY), abs=5e-5) and precise[7] == ""
    assert report.logged["compare/vanilla_vs_lora/rougeL_f1/mde"] == pytest.approx(_mde(NOISE))
    # 2x2 effects on rougeL_f1: FT's per-item contrast is (NOISE + 0.05) / 2, a noisy null;
    # RAG's is (0.2 + 0.25 - NOISE) / 2, all positive: detected.
    effects = {r[0]: r for r in _fold(md, "2×2 decomposition", "rougeL_f1")}
    ft = [(x + 0.05) / 2 for x in NOISE]
    assert float(effects["ft"][4]) == pytest.approx(_mde(ft), abs=5e-5)
    assert effects["ft"][5] == "underpowered" and effects["rag"][5] == ""

    # Cost table: tokens and seconds per answer, training, index, peak memory, device hours.
    cost = {row[0]: row for row in _table(md, "Cost and latency per config")}
    vanilla, rag_lora = cost["vanilla"], cost["rag_lora"]
    assert [float(c) for c in vanilla[1:6]] == pytest.approx([60, 20, 0.5, 0.6, 0.0])
    assert vanilla[6] == vanilla[7] == "–"  # no retriever, no index
    assert [float(c) for c in rag_lora[5:8]] == pytest.approx([TRAIN_WALL_S, 2.5, 3.0])
    assert float(vanilla[8]) > 50  # this Python process's peak resident memory, MiB
    assert float(vanilla[9]) == pytest.approx(1000 * 0.5 / 3600, rel=1e-3)  # device-hours
    assert float(rag_lora[9]) == pytest.approx(1000 * 0.75 / 3600, rel=1e-3)
    assert float(rag_lora[10]) == pytest.approx(TRAIN_WALL_S / 3600, rel=1e-3)
    assert "per 1,000 answers (device-hours)" in md

    # The figure: rag is dominated (rag_lora is better and cheaper); the front joins the rest.
    assert {"cost", "interaction"} <= set(report.figures)
    ax = report.figures["cost"].axes[0]
    front = next(line for line in ax.get_lines() if line.get_label() == "Pareto front")
    means = {v: float(np.mean(s["rougeL_f1"])) for v, s in _scores(0.25).items()}
    order = ("vanilla", "lora", "rag_lora")
    assert list(front.get_xdata()) == pytest.approx([1000 * s / 3600 for s in (0.5, 0.55, 0.75)])
    assert list(front.get_ydata()) == pytest.approx([means[v] for v in order])
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent, "report")}
    assert "report/cost.png" in artifacts


def test_prices_turn_the_costs_into_money(tmp_path):
    parent = _log_sweep(tmp_path, rag_lora_shift=0.25)
    prices = {"prompt_per_1k": 0.01, "completion_per_1k": 0.03, "cpu_hour": 2.0}
    md = _report(_cfg(tmp_path, prices=prices), parent).markdown
    cost = {row[0]: row for row in _table(md, "Cost and latency per config")}
    per_answer = 60 / 1000 * 0.01 + 20 / 1000 * 0.03 + 0.5 / 3600 * 2.0
    assert float(cost["vanilla"][9]) == pytest.approx(1000 * per_answer, rel=1e-3)
    assert float(cost["lora"][10]) == pytest.approx(TRAIN_WALL_S / 3600 * 2.0, rel=1e-3)
    assert "per 1,000 answers (USD)" in md


def test_the_verdict_changes_with_the_data(tmp_path):
    first = _report(_cfg(tmp_path), _log_sweep(tmp_path / "a", rag_lora_shift=0.25)).verdict
    second = _report(_cfg(tmp_path), _log_sweep(tmp_path / "b", rag_lora_shift=0.15)).verdict
    assert first.startswith("rag_lora leads on rougeL_f1") and "over rag by 0.050" in first
    assert second.startswith("rag leads on rougeL_f1") and "over rag_lora by 0.050" in second
    assert "rag costs 1.1x as much per 1,000 answers as rag_lora" in second  # 0.8 s / 0.75 s


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        ({"alpha": 2}, "metrics.decision.alpha=2 must be <= 1"),
        ({"power": 1}, "metrics.decision.power=1 must be < 1"),
        ({"alpha": "often"}, "metrics.decision.alpha='often' is not a number"),
        ({"min_effect": {"rougeL_f1": -1}}, "metrics.decision.min_effect.rougeL_f1=-1 must be > 0"),
        ({"min_effect": {"rouge": 0.1}}, "metrics.decision.min_effect.rouge is not a known key"),
        ({"prices": {"cpu_hour": "cheap"}}, "metrics.decision.prices.cpu_hour='cheap'"),
        ({"prices": {"cpu_hour": -1}}, "metrics.decision.prices.cpu_hour=-1"),
        ({"colour": 1}, "metrics.decision.colour is not a known key"),
    ],
)
def test_a_bad_decision_value_is_a_one_line_error_naming_the_key(decision, message):
    with pytest.raises(QaLabError) as err:
        metrics.MetricsOptions.from_cfg(metrics_cfg(decision=decision))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_every_metrics_preset_has_the_decision_node():
    expected = DecisionOptions(
        alpha=0.05,
        power=0.8,
        min_effect={
            "rougeL_f1": 0.02,
            "bertscore_f1": 0.02,
            "token_f1": 0.02,
            "sentence_bleu": 0.02,
            "exact_match": 0.05,
        },
        prices=None,  # every price null: device hours
    )
    for preset in ("default", "lexical", "judge", "original"):
        assert metrics.MetricsOptions.from_cfg(metrics_cfg(preset)).decision == expected
    node = metrics_cfg()
    del node["decision"]
    with pytest.raises(QaLabError, match=r"^metrics\.decision is not set"):
        metrics.MetricsOptions.from_cfg(node)


def test_speed_gives_tokens_and_seconds_per_answer_over_fresh_answers():
    seconds = [0.1, 0.2, 0.3, 0.4, 1.0]  # fresh; the cached one's 9.0 s is not this run's
    rows = []
    for n, s in enumerate([*seconds, 9.0]):
        item = QAItem(id=f"i{n}", question=f"q{n}?", answer="a")
        pred = Prediction(
            item.id,
            "p",
            prompt_tokens=50 + 10 * n,
            generated_tokens=n,
            seconds=s,
            extra={"cached": n == 5},
        )
        rows.append(EvalRow.answered(item, pred, [], [], "prompt", 64))
    out = generation.speed(rows, wall_s=2.5)
    assert out["answers_generated"] == 5
    assert out["seconds_per_answer"] == pytest.approx(2.0 / 5)
    assert out["seconds_per_answer_p50"] == pytest.approx(0.3)
    assert out["seconds_per_answer_p95"] == pytest.approx(0.4 + 0.8 * (1.0 - 0.4))  # rank 3.8
    assert out["prompt_tokens_per_answer"] == pytest.approx(
        np.mean([50 + 10 * n for n in range(6)])
    )
    assert out["completion_tokens_per_answer"] == pytest.approx(2.5)  # 0..5, cached included


def test_peak_memory_is_this_process_high_water_mark():
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc here")
    peak = run_logging.peak_memory()["peak_rss_mib"]
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1))
    assert peak == pytest.approx(hwm_kib / 1024, rel=0.05)
    # a sweep job's own peak: an earlier job's 256 MiB, freed, no longer counts after the reset
    block = np.ones(2**25)  # 256 MiB of float64
    block[::512] = 2.0  # touch every page
    assert run_logging.peak_memory()["peak_rss_mib"] >= 256
    del block
    before = run_logging.peak_memory()["peak_rss_mib"]
    run_logging.reset_peak_memory()
    assert run_logging.peak_memory()["peak_rss_mib"] < before - 200


def test_a_sweep_whose_answers_carry_no_seconds_has_tokens_but_no_costs():
    """A predictions file's rows have no generation seconds (a cached answer keeps its own)."""
    from tests.test_reporting import BOOT, _grid

    runs = _grid()
    for r in runs:  # tokens known, no generation seconds
        r["metrics"] = {"prompt_tokens_per_answer": 80.0, "completion_tokens_per_answer": 12.0}
    report = reporting.build_report(runs, BOOT)
    cost = {row[0]: row for row in _table(report.markdown, "Cost and latency per config")}
    assert [float(c) for c in cost["rag"][1:3]] == [80.0, 12.0]
    assert cost["rag"][3] == cost["rag"][9] == "–"
    assert "cost" not in report.figures
    assert report.verdict.startswith("No decisive winner on rougeL_f1: rag_lora")
    assert "costs" not in report.verdict  # no cost ratio without costs
