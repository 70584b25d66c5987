"""The computed verdict: which config wins a headline metric, and whether the data say so.

A table of means invites reading the top row as the winner. The verdict states the best config
with its CI, its paired lead over the runner-up with that CI, whether the lead survives Holm
over all the comparisons made, and the cost ratio between the two; "no decisive winner" when
the lead's interval includes zero or it does not survive Holm. Text comes from the numbers
alone, so `evaluate.py report=<id>` rebuilds the same sentence from the logged runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qa_lab.stats import CI, holm


@dataclass(frozen=True)
class Comparison:
    """A paired comparison as made: diff = mean(b - a) with its CI and raw p-value."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    p_value: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Comparison:
        """From a report row (`stats.paired_test` keys plus a, b; `estimate` also accepted)."""
        diff = row["diff"] if "diff" in row else row["estimate"]
        return cls(
            str(row["a"]),
            str(row["b"]),
            float(diff),
            float(row["ci_low"]),
            float(row["ci_high"]),
            float(row["p_value"]),
        )


@dataclass(frozen=True)
class Lead:
    """The best config's paired lead over the runner-up, with its Holm-adjusted p."""

    diff: float
    ci_low: float
    ci_high: float
    p_holm: float


@dataclass(frozen=True)
class Verdict:
    """The best config on one metric and whether its lead over the runner-up is decisive."""

    metric: str
    best: str
    best_ci: CI
    runner_up: str | None  # None: only one config was scored
    lead: Lead | None
    survives_holm: bool  # Holm-adjusted p of the lead < alpha
    cost_ratio: float | None  # best's cost / runner-up's cost per 1,000 answers
    decisive: bool  # survives Holm and the lead's CI excludes zero

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for logging."""
        return asdict(self)


def _lead(best: str, runner_up: str, comparisons: Sequence[Comparison]) -> Lead:
    """Lead of best over runner_up, in either compared orientation; Holm over all of them."""
    adjusted = holm([c.p_value for c in comparisons])
    for c, p_holm in zip(comparisons, adjusted):
        if (c.a, c.b) == (runner_up, best):
            return Lead(c.diff, c.ci_low, c.ci_high, p_holm)
        if (c.a, c.b) == (best, runner_up):
            return Lead(-c.diff, -c.ci_high, -c.ci_low, p_holm)
    raise ValueError(f"no paired comparison between {best!r} and {runner_up!r}")


def _ratio(best: str, runner_up: str, costs: Mapping[str, float] | None) -> float | None:
    if not costs or best not in costs or runner_up not in costs:
        return None
    num, den = float(costs[best]), float(costs[runner_up])
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def compute_verdict(
    metric: str,
    cis: Mapping[str, CI],
    comparisons: Sequence[Comparison],
    *,
    costs: Mapping[str, float] | None = None,
    alpha: float = 0.05,
) -> Verdict:
    """The verdict on `metric` (higher is better) from each config's CI and the comparisons.

    `comparisons` is the whole family the report made on this metric: Holm runs over all of
    them. `costs` (optional): cost per 1,000 answers per config. Configs with a NaN mean are
    left out; ties go to the config listed first.
    """
    ranked = sorted(
        (name for name, ci in cis.items() if math.isfinite(ci.mean)),
        key=lambda name: -cis[name].mean,
    )
    if not ranked:
        raise ValueError(f"no config has a finite mean on {metric}")
    best = ranked[0]
    if len(ranked) == 1:
        return Verdict(metric, best, cis[best], None, None, False, None, False)
    runner_up = ranked[1]
    lead = _lead(best, runner_up, comparisons)
    survives = bool(lead.p_holm < alpha)
    return Verdict(
        metric=metric,
        best=best,
        best_ci=cis[best],
        runner_up=runner_up,
        lead=lead,
        survives_holm=survives,
        cost_ratio=_ratio(best, runner_up, costs),
        decisive=survives and lead.ci_low > 0,
    )


def _num(x: float) -> str:
    text = f"{x:.3f}"
    return "0.000" if text == "-0.000" else text  # a bound just below zero rounds to zero


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def verdict_text(v: Verdict) -> str:
    """Two or three plain sentences stating the verdict, from its numbers only."""
    ci = f"{_num(v.best_ci.mean)} [{_num(v.best_ci.low)}, {_num(v.best_ci.high)}]"
    if v.runner_up is None or v.lead is None:
        return f"Only one config scored {v.metric}: {v.best} ({ci}); there is nothing to compare."
    lead = f"by {_num(v.lead.diff)} [{_num(v.lead.ci_low)}, {_num(v.lead.ci_high)}]"
    if v.decisive:
        text = (
            f"{v.best} leads on {v.metric} ({ci}) over {v.runner_up} "
            f"{lead}, which survives Holm ({_p(v.lead.p_holm)})."
        )
    else:
        why = (
            f"survives Holm ({_p(v.lead.p_holm)}) but its interval includes zero"
            if v.survives_holm
            else f"does not survive Holm ({_p(v.lead.p_holm)})"
        )
        text = (
            f"No decisive winner on {v.metric}: {v.best} ({ci}) leads {v.runner_up} {lead}, "
            f"which {why}."
        )
    if v.cost_ratio is not None:
        text += f" {v.best} costs {v.cost_ratio:.2g}x as much per 1,000 answers as {v.runner_up}."
    return text
