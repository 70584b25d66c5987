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
    """CPU model, cores, torch threads, the fp32 matmul peak and the date: every result's header.

    The peak is there because this machine's speed drifts between days (157-171 GFLOP/s on
    2026-11-26, 70 on 2026-12-01, same CPU model and core count): minutes measured on
    different days compare only through it.
    """
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
        f"({torch.get_num_threads()} threads), fp32 matmul peak {matmul_peak_gflops():.0f} "
        f"GFLOP/s, {time.strftime('%Y-%m-%d')}"
    )


def usable_cpus() -> int:
    """CPUs this process may run on (a container may see more cores than it is allowed)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions(*packages: str) -> str:
    """Installed versions of the packages that decide a benchmark's speed."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in packages:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


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


def reference_rows(split: str, limit: int) -> list[dict[str, str]]:
    """Question/answer rows of the original study's split (shared reference data), else seeds."""
    path = REFERENCE / f"{split}.jsonl"
    if not path.is_file():
        path = PROJECT_ROOT / "data" / "seed" / "cs_interview.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit]


def reference_questions(limit: int) -> list[str]:
    """Test questions of the original study, the prompts every generation side answers."""
    return [row["question"] for row in reference_rows("test", limit)]
