"""Co-visitation retrieval cost as the catalogue grows: the sparse path against scoring every item.

    python -m benchmarks.covisit_scale [--sizes 3650,50000,200000,1000000] [--k 200]

Per synthetic catalogue (``data.synthetic``, 10 events per item on average, sessions with a sequential
pattern), a ``covisit`` retriever (window 3, recent 5: the config ml-latest-small's validation chose) is
fitted, then one ``retrieve_history`` call for a top-``k`` list is timed over 300 users' histories:

* ``sparse``: the retriever as it serves (the items the recent items point at, then the popularity order);
* ``dense``: the same list from every catalogue item scored and sorted by a partial sort (how it served
  before, kept here as the baseline).

Both give the same list (checked on every timed call). Rows: p50/p99 ms, the dense/sparse p50 ratio, the
number of items with a non-zero score (mean per call), the counts' non-zeros and the fit time. Writes
``benchmarks/results/covisit_scale.json``. About 3 minutes with the default sizes.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.common import latency_ms, round_row, write_results
from data.synthetic import SyntheticConfig, generate
from pipeline.report import markdown_table
from retrieval.base import known_rows
from retrieval.covisit import CovisitConfig
from retrieval.covisit_retriever import CovisitRetriever

COLUMNS = ["items", "method", "p50_ms", "p99_ms", "dense_vs_sparse_p50", "scored_items", "counts_nnz", "fit_s"]
N_CALLS = 300


def dense_top(model: CovisitRetriever, history: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The list scored over the whole catalogue (history excluded; ties by popularity, then row)."""
    rows = known_rows(model.items, history)
    scores = model.covisit.score_catalogue([rows])[0]
    scores[rows] = -np.inf
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    candidates = np.flatnonzero(np.isfinite(scores) & (scores >= kth))
    chosen = candidates[np.lexsort((candidates, -model.popularity[candidates], -scores[candidates]))][:k]
    return model.items.external(chosen), scores[chosen].astype(np.float32)


def size_rows(n_items: int, k: int, seed: int = 0) -> list[dict[str, Any]]:
    config = SyntheticConfig(n_users=max(1_000, n_items // 2), n_items=n_items, n_clusters=200, mean_history=20,
                             seed=seed)
    data = generate(config, progress=False)
    start = time.perf_counter()
    model = CovisitRetriever(CovisitConfig(window=3, recent=5)).fit(data)
    fit_s = time.perf_counter() - start
    users = model.users.ids[np.random.default_rng(seed).choice(len(model.users), N_CALLS, replace=False)]
    histories = [model.stored_history(int(u)) for u in users]
    for history in histories:  # the same list either way
        sparse_ids, sparse_scores = model.retrieve_history(history, k)
        dense_ids, dense_scores = dense_top(model, history, k)
        if not np.array_equal(sparse_ids, dense_ids) or not np.allclose(sparse_scores, dense_scores, rtol=1e-6):
            raise AssertionError(f"{n_items} items: the sparse and dense lists differ")
    scored = float(np.mean([model.covisit.score_rows([known_rows(model.items, h)]).nnz for h in histories]))
    sparse = latency_ms(lambda i: model.retrieve_history(histories[i % N_CALLS], k), N_CALLS)
    dense = latency_ms(lambda i: dense_top(model, histories[i % N_CALLS], k), N_CALLS)
    common = {"items": n_items, "scored_items": scored, "counts_nnz": int(model.covisit.counts.nnz), "fit_s": fit_s}
    return [round_row({**common, "method": "sparse (served)", **sparse,
                       "dense_vs_sparse_p50": dense["p50_ms"] / sparse["p50_ms"]}, 3),
            round_row({**common, "method": "dense (every item scored)", **dense}, 3)]


def run(sizes: tuple[int, ...] = (3_650, 50_000, 200_000, 1_000_000), k: int = 200, seed: int = 0) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for n_items in sizes:
        rows += size_rows(n_items, k, seed)
        print(markdown_table(rows[-2:], COLUMNS), flush=True)
    print(f"\n## covisit retrieve_history, top-{k}, one call at a time ({N_CALLS} histories)\n")
    print(markdown_table(rows, COLUMNS))
    path = write_results("covisit_scale", rows, {"k": k, "seed": seed, "calls": N_CALLS, "config": {"window": 3,
                                                                                                    "recent": 5},
                                                 "data": "data.synthetic, n_users = n_items / 2, mean_history 20"})
    print(f"\nwrote {path}")
    return {"rows": rows, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3650,50000,200000,1000000", help="catalogue sizes, comma-separated")
    parser.add_argument("--k", type=int, default=200, help="list length (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(tuple(int(s) for s in args.sizes.split(",")), args.k, args.seed)


if __name__ == "__main__":
    main()
