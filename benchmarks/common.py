"""Shared plumbing of the benchmarks: timing, machine facts and the results file format.

Every benchmark writes ``benchmarks/results/NAME.json`` as ``{"rows": [{"method": ..., metric: value,
"<metric>_ci": [lo, hi], "p50_ms": ..., "p99_ms": ...}], "meta": {...}}`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.io import atomic_write_json, library_versions
from pipeline.report import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = "ml-latest-small"


def latency_ms(fn: Callable[[int], Any], n: int, warmup: int = 20) -> dict[str, float]:
    """Call ``fn(i)`` ``n`` times after ``warmup`` calls; p50/p95/p99 and mean wall time in ms."""
    for i in range(warmup):
        fn(i)
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times[i] = (time.perf_counter() - start) * 1000
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": float(times.mean()),
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "versions": library_versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                  columns: Sequence[str] | None = None, out_dir: Path = RESULTS) -> Path:
    """Write the JSON results file atomically and print the Markdown table."""
    path = atomic_write_json(Path(out_dir) / f"{name}.json", {"rows": list(rows), "meta": {**meta,
                                                                                           "machine": machine()}})
    if columns:
        print(markdown_table(rows, columns))
    return path


def round_row(row: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def ml_benchmark_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every ml-latest-small quality benchmark shares: ``--data-path``, ``--artifacts``,
    ``--threads``, ``--seed``, ``--out`` (results name, default ``name``), ``--results-dir``, ``--quiet``;
    the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--artifacts", default="artifacts/rerank", help="folder of the saved rankers and retriever")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=name, help="results file name (without .json)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser
