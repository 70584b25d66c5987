"""Publishing item traces: seconds for N items (the study's test split has 272) on SQLite.

    .venv/bin/python bench/traces.py [--items 272] [--passages 5]

Rows shaped like a RAG evaluate run's (chat messages, k passages, token counts) with the
lexical and diagnostic per-item scores, published into a fresh temp SQLite store; the count
of traces, spans and assessments that arrived is checked, then the time is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from qa_lab import traces, tracking  # noqa: E402
from qa_lab.records import EvalRow  # noqa: E402

SCORES = [
    "sentence_bleu",
    "rougeL_f1",
    "exact_match",
    "token_f1",
    "empty",
    "truncated",
    "runaway",
    "unfinished",
    "length_ratio",
    "idk",
    "retrieval_top1_score",
    "retrieval_best_rougeL",
    "retrieval_best_cosine",
]


def rows(n: int, k: int) -> tuple[list[dict], list[dict]]:
    """Synthetic evaluate rows and per-item scores."""
    out, scores = [], []
    for i in range(n):
        question = f"How does mechanism {i} behave when the cache is cold and the load is high?"
        out.append(
            {
                "item_id": f"item-{i:04d}",
                "question": question,
                "reference": f"Mechanism {i} falls back to the slow path until the cache warms.",
                "prediction": f"It is slower at first: mechanism {i} has to fill its cache.",
                "topic": ("os", "db", "net")[i % 3],
                "difficulty": ("easy", "medium", "hard")[i % 3],
                "seed_id": f"seed-{i // 3}",
                "stop_reason": "eos",
                "prompt_tokens": 310,
                "generated_tokens": 42,
                "seconds": 0.8,
                "retrieved": [
                    {
                        "item_id": f"train-{i}-{j}",
                        "question": f"What happens to mechanism {j} on a cold cache?",
                        "answer": "It takes the slow path first. " * 3,
                        "score": 0.8 - 0.05 * j,
                    }
                    for j in range(k)
                ],
                "messages": [
                    {"role": "system", "content": "Answer the technical question briefly."},
                    {"role": "user", "content": "Context: ... " * 40 + question},
                ],
            }
        )
        scores.append({name: (i % 7) / 7 for name in SCORES})
    return out, scores


def main() -> None:
    """Publish once into a fresh store and print the time."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=272)
    parser.add_argument("--passages", type=int, default=5)
    args = parser.parse_args()
    items, scores = rows(args.items, args.passages)
    scored = [EvalRow.from_dict({**r, "scores": s}) for r, s in zip(items, scores)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(
            {
                "tracking": {
                    "uri": f"sqlite:///{tmp}/mlflow.db",
                    "artifact_location": f"{tmp}/artifacts",
                    "experiment": "bench",
                }
            }
        )
        with tracking.start_run(
            cfg, stage="evaluate", key="bench-traces", variant="rag", log_config=False
        ):
            started = time.perf_counter()
            traces.publish_item_traces(scored, model="bench", metrics_version=1)
            seconds = time.perf_counter() - started
    print(f"{machine()}")
    print(
        f"{args.items} items x ({len(SCORES)} feedback + 1 expectation, 3 spans, "
        f"{args.passages} passages): {seconds:.1f} s ({1000 * seconds / args.items:.0f} ms/item)"
    )


if __name__ == "__main__":
    main()
