"""Semantic dedup: the original's greedy pairwise loop versus qa-lab's blockwise one.

    .venv/bin/python bench/dedup.py [--sizes 10000,100000] [--naive-limit 10000]

On the reference dataset (2019 questions, real MiniLM embeddings) and on synthetic
paraphrase-heavy sets (random unit vectors with noisy near-copies). Embedding time is reported
apart. Kept sets must be identical wherever the naive loop runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REFERENCE, machine  # noqa: E402


def synthetic(n: int, dim: int = 384, dup_share: float = 0.2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((int(n * (1 - dup_share)), dim)).astype(np.float32)
    src = base[rng.integers(0, len(base), n - len(base))]
    noisy = src + rng.standard_normal(src.shape).astype(np.float32) * rng.uniform(
        0.05, 0.5, (len(src), 1)
    ).astype(np.float32)
    x = np.concatenate([base, noisy])[rng.permutation(n)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(name: str, x: np.ndarray, naive_limit: int) -> None:
    from qa_lab.similarity import naive_semantic_dedup, semantic_dedup

    t = time.perf_counter()
    kept, _ = semantic_dedup(x, 0.9)
    fast = time.perf_counter() - t
    line = f"{name}: n={len(x)} kept={len(kept)} qa-lab {fast:.2f}s"
    if len(x) <= naive_limit:
        t = time.perf_counter()
        naive_kept, _ = naive_semantic_dedup(x, 0.9)
        naive = time.perf_counter() - t
        assert naive_kept == kept, "kept sets differ"
        line += f", naive {naive:.2f}s, ratio {naive / fast:.1f}x, identical kept sets"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--naive-limit", type=int, default=10000)
    args = parser.parse_args()
    print(machine())
    path = REFERENCE / "dataset_no_duplicates.jsonl"
    if path.is_file():
        from qa_lab.retrieval import embed

        questions = [json.loads(x)["question"] for x in path.read_text().splitlines() if x.strip()]
        t = time.perf_counter()
        x = embed(questions, "all-MiniLM-L6-v2")
        print(
            f"reference: embedding {len(questions)} questions took {time.perf_counter() - t:.1f}s"
        )
        run("reference", x, args.naive_limit)
    for n in (int(s) for s in args.sizes.split(",")):
        run(f"synthetic-{n}", synthetic(n), args.naive_limit)


if __name__ == "__main__":
    main()
