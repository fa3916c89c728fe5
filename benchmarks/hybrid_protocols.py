"""The hybrid's served list against its components, under both protocols (leave-one-out and ``last-n``).

    python -m benchmarks.hybrid_protocols [--artifacts artifacts/rerank]

Per protocol: the two-tower the reranker reads (saved under ``ARTIFACTS/<protocol>/retriever-two_tower``
by ``benchmarks.rerank``; fitted and saved there when missing or stale), co-visitation (its grid searched
on validation), ALS (its grid) and popularity, all fitted on the validation history; the hybrid's two
fusions tuned on validation. Every test case is scored from its own history (``retrieve_history``), so a
``last-n`` user with five cases gets five lists. Rows: NDCG@10 and Recall@10 of the two-tower, of
co-visitation and of the hybrid's served list, and the paired differences with 95% bootstrap intervals
clustered by user; ``p50_ms``/``p99_ms``: one ``retrieve_history`` call for the top 200 of a test case's
history (300 cases, the retrievers' own threads), and ``p50_vs_two_tower`` the ratio in the same run.
Two minutes with saved two-towers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, latency_ms, ml_benchmark_parser, round_row, write_results
from data.metrics import paired_bootstrap_ci
from pipeline.report import markdown_table
from pipeline.train import load_dataset
from retrieval.evaluate import evaluate_cases, retrieve_cases
from retrieval.fitting import FitOptions, fit_retriever

log = logging.getLogger(__name__)

PROTOCOLS = ("leave_one_out", "last_n")
COLUMNS = ["protocol", "method", "NDCG@10", "Recall@10", "dNDCG@10_vs_two_tower", "dNDCG@10_vs_covisit", "p50_ms",
           "p99_ms", "p50_vs_two_tower"]
LATENCY_CASES, LATENCY_K = 300, 200


def default_hybrid(split: Any, two_tower: Any, *, seed: int = 0, progress: bool = True) -> Any:
    """The default hybrid as ``shortlist train`` builds it, around an already fitted ``two_tower`` (holding
    ``split.history("val")``): the other components' grids and both fusions tuned on validation, then every
    component moved to the test histories. A :class:`~retrieval.fitting.Fitted`."""
    options = FitOptions(progress=progress, seed=seed)
    return fit_retriever("hybrid", split, "test", options=options, fitted={"two_tower": two_tower})


def protocol_rows(raw: Any, protocol: str, artifacts: Path, *, threads: int = 2, seed: int = 0,
                  progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, meta)`` of one protocol: see the module docstring."""
    from pipeline.second_stage import RETRIEVER_DIR
    from pipeline.stages import candidate_retriever, protocol_split

    started = time.perf_counter()
    split = protocol_split(raw, protocol)
    two_tower = candidate_retriever(split, "two_tower", artifacts / protocol / RETRIEVER_DIR, threads=threads)
    fitted = default_hybrid(split, two_tower, seed=seed, progress=progress)
    hybrid, covisit = fitted.model, fitted.components["covisit"]
    cases = split.cases("test")
    clusters = None if cases.one_per_user else cases.users
    sample = cases.histories[:LATENCY_CASES]
    per_case, rows = {}, []
    for name, model in (("two_tower", two_tower), ("covisit", covisit), ("hybrid (served)", hybrid)):
        ids, _ = retrieve_cases(model, cases, 10, batch=False)
        report = evaluate_cases(ids, cases, len(split.items), n_boot=1000, seed=seed)
        per_case[name] = report.per_user["NDCG@10"]
        row: dict[str, Any] = {"protocol": protocol, "method": name, "cases": len(cases),
                               "NDCG@10": report.means["NDCG@10"], "NDCG@10_ci": list(report.ci["NDCG@10"]),
                               "Recall@10": report.means["Recall@10"]}
        for base in ("two_tower", "covisit"):
            if base in per_case and base != name:
                diff = per_case[name] - per_case[base]
                lo, hi = paired_bootstrap_ci(per_case[name], per_case[base], seed=seed, clusters=clusters)
                row[f"dNDCG@10_vs_{base}"] = float(np.mean(diff))
                row[f"dNDCG@10_vs_{base}_ci"] = [round(lo, 5), round(hi, 5)]
        row["NDCG@10_ci"] = [round(v, 5) for v in row["NDCG@10_ci"]]
        timing = latency_ms(lambda i, m=model: m.retrieve_history(sample[i % len(sample)], LATENCY_K), len(sample))
        row["p50_ms"], row["p99_ms"] = timing["p50_ms"], timing["p99_ms"]
        row["p50_vs_two_tower"] = timing["p50_ms"] / rows[0]["p50_ms"] if rows else 1.0
        rows.append(round_row(row, 5))
    meta = {"cases": len(cases), "users": int(np.unique(cases.users).size),
            "covisit_config": covisit.config.to_dict(), "served_source": hybrid.served_source,
            "served_fusion": hybrid.config.to_dict(), "val_served_NDCG@10": hybrid.tuning["served_best"],
            "two_tower_history_fingerprint": two_tower.history_fingerprint,
            "seconds": round(time.perf_counter() - started, 1)}
    return rows, meta


def run(data_path: str | None = None, artifacts: str | Path = "artifacts/rerank", *, threads: int = 2,
        seed: int = 0, out: str = "hybrid_protocols", results_dir: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    raw = load_dataset(DEFAULT_DATA, data_path)
    rows, meta = [], {"dataset": DEFAULT_DATA, "seed": seed, "protocols": {}}
    for protocol in PROTOCOLS:
        got, info = protocol_rows(raw, protocol, Path(artifacts), threads=threads, seed=seed, progress=progress)
        rows += got
        meta["protocols"][protocol] = info
    print("## The hybrid's served list against its components (test cases; paired 95% intervals)\n")
    print(markdown_table(rows, COLUMNS))
    kwargs = {"out_dir": Path(results_dir)} if results_dir else {}
    path = write_results(out, rows, meta, **kwargs)
    print(f"\nwrote {path}")
    return {"rows": rows, "meta": meta, "path": path}


def main(argv: list[str] | None = None) -> None:
    args = ml_benchmark_parser(__doc__, "hybrid_protocols").parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(args.data_path, args.artifacts, threads=args.threads, seed=args.seed, out=args.out,
        results_dir=args.results_dir, progress=not args.quiet)


if __name__ == "__main__":
    main()
