"""The report's cost and latency per config: what each config's answers and training cost.

RAG makes every prompt longer; fine-tuning costs training time. The numbers are the runs' own
measurements: an evaluate run's usage metrics (`generation.speed`, `run_logging.peak_memory`),
its retriever's `retrieval/index_*` metrics, and for a LoRA config the training runs behind its
adapter (the SFT found by the `qa_lab.model_key` tag, as the loss figure finds it, and the
continued pretraining it continued). `cost.cost` turns
them into cost per 1,000 answers plus training: money with `metrics.decision.prices`, device
hours without. Shown only when the runs carry usage metrics (runs logged before them do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qa_lab import cost
from qa_lab.report_blocks import Block, Figure, Heading, Text, table

NAN = float("nan")
# The evaluate run's usage metrics (`generation.speed`), read back by the report.
USAGE = (
    "prompt_tokens_per_answer",
    "completion_tokens_per_answer",
    "seconds_per_answer",
    "seconds_per_answer_p50",
    "seconds_per_answer_p95",
)
CAPTION = "Headline metric (95% CI) against cost per 1,000 answers; the Pareto front joined"


@dataclass(frozen=True)
class ConfigCost:
    """One config's measured usage and what it costs (NaN: not measured, e.g. all cached)."""

    label: str
    prompt_tokens: float  # mean per answer
    completion_tokens: float  # mean per answer
    seconds_p50: float  # generation seconds per answer (freshly generated answers)
    seconds_p95: float
    train_s: float  # the adapter's training wall seconds, CPT + SFT (0: none; NaN: not found)
    index_build_s: float  # 0 when the index was loaded from the cache
    index_mib: float
    peak_mib: float  # peak resident memory of the evaluating process
    cost: cost.Cost


def has_usage(runs: list[dict[str, Any]]) -> bool:
    """Whether every run logged its usage metrics (the section needs them all)."""
    return all(USAGE[0] in r["metrics"] for r in runs)


def _training(run: dict[str, Any]) -> float:
    """Training wall seconds of a LoRA run's adapter: 0 for the base model, NaN if not found.

    The SFT's run, found by the adapter key, plus the continued pretraining it continued
    (`model.knowledge=corpus|both`), found through the `cpt_key` of the adapter's logged model:
    the fine-tuning arm pays for both.
    """
    from qa_lab import logged_models

    key = run["tags"].get("qa_lab.model_key", "")
    if not key.startswith("lora:"):
        return 0.0
    model_id = run["tags"].get(f"qa_lab.{logged_models.RUN_TAG}")
    cpt_key = logged_models.param(model_id, "cpt_key")
    return _wall_s("train", key.removeprefix("lora:")) + (_wall_s("cpt", cpt_key) if cpt_key else 0)


def _wall_s(stage: str, key: str) -> float:
    """The `wall_s` a finished training run of this stage and key logged (NaN: none found)."""
    from qa_lab import tracking

    found = tracking.find_finished_run(stage, key)
    history = tracking.metric_history(found, "wall_s") if found else []
    return history[-1][1] if history else NAN


def config_cost(run: dict[str, Any], prices: cost.Prices | None) -> ConfigCost:
    """A run's usage and cost; a run on a GPU (`peak_gpu_mib` logged) pays the GPU hour."""
    import numpy as np

    m = run["metrics"]
    seconds = _answer_seconds(run)
    usage = cost.Usage(
        prompt_tokens=m.get("prompt_tokens_per_answer", NAN),
        completion_tokens=m.get("completion_tokens_per_answer", NAN),
        seconds_per_answer=seconds.mean() if len(seconds) else NAN,
        train_seconds=_training(run),
        device="gpu" if "peak_gpu_mib" in m else "cpu",
    )
    return ConfigCost(
        label=run["label"],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        seconds_p50=float(np.percentile(seconds, 50)) if len(seconds) else NAN,
        seconds_p95=float(np.percentile(seconds, 95)) if len(seconds) else NAN,
        train_s=usage.train_seconds,
        index_build_s=m.get("retrieval/index_build_s", NAN),
        index_mib=m.get("retrieval/index_bytes", NAN) / 2**20,
        peak_mib=m.get("peak_rss_mib", NAN),
        cost=cost.cost(usage, prices),
    )


def _answer_seconds(run: dict[str, Any]) -> Any:
    """Generation seconds of each of the run's answers, as measured when it was generated.

    A cached answer keeps the seconds of the run that generated it, so a warm rerun (or a
    replicate sharing answers) is costed as the answers cost, not as zero or unknown.
    """
    import numpy as np

    return np.array([it.seconds for it in run["items"] if it.seconds is not None], dtype=float)


def config_costs(runs: list[dict[str, Any]], prices: cost.Prices | None) -> list[ConfigCost]:
    """Each run's `config_cost`, or none when a run lacks the usage metrics."""
    return [config_cost(r, prices) for r in runs] if has_usage(runs) else []


def _cell(value: float, fmt: str = ".3g") -> str:
    return "–" if math.isnan(value) else format(value, fmt)


def cost_section(costs: list[ConfigCost], has_figure: bool) -> list[Block]:
    """The cost table per config, and the quality-cost figure under it."""
    if not costs:
        return []
    unit = costs[0].cost.unit
    rows = [
        [
            c.label,
            _cell(c.prompt_tokens, ".1f"),
            _cell(c.completion_tokens, ".1f"),
            _cell(c.seconds_p50),
            _cell(c.seconds_p95),
            _cell(c.train_s, ".1f"),
            _cell(c.index_build_s),
            _cell(c.index_mib),
            _cell(c.peak_mib, ".0f"),
            _cell(c.cost.per_1k_answers, ".4g"),
            _cell(c.cost.training, ".4g"),
        ]
        for c in costs
    ]
    header = ["config", "prompt tok/answer", "completion tok/answer", "s/answer p50"]
    header += ["s/answer p95", "training wall s", "index build s", "index MiB", "peak RSS MiB"]
    header += [f"per 1,000 answers ({unit})", f"training ({unit})"]
    return [
        Heading("Cost and latency per config"),
        Text(
            "Measured by each run: tokens per answer (mean), generation seconds per answer "
            "(its share of its batch, as measured when it was generated: a cached answer keeps "
            "its seconds), the adapter's training wall time (its continued pretraining "
            "included), the index build (0: loaded from the cache) and the run's peak memory. "
            f"Costs are in {unit}"
            + (" (`metrics.decision.prices` unset)." if unit == "device-hours" else ".")
            + " – : not measured (no training run found)."
        ),
        table(header, rows),
        *([Figure("cost", CAPTION)] if has_figure else []),
    ]


def points(costs: list[ConfigCost], cis: dict[str, dict[str, Any]]) -> list[cost.Point]:
    """Each config on the quality-cost plane: headline mean against cost per 1,000 answers."""
    return [cost.Point(c.label, cis[c.label]["mean"], c.cost.per_1k_answers) for c in costs]
