"""Shared bits of the benchmarks: machine description, matmul peak, reference questions."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from qa_lab.config import PROJECT_ROOT

REFERENCE = PROJECT_ROOT.parent / "shared" / "reference" / "rag-technical-qa"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}"
    )


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 GEMM rate of this machine, the compute bound for generation."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def reference_questions(limit: int) -> list[str]:
    """Test questions of the original study (the shared reference data), else the seeds."""
    path = REFERENCE / "test.jsonl"
    if not path.is_file():
        path = PROJECT_ROOT / "data" / "seed" / "cs_interview.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows[:limit]]
