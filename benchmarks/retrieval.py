"""Retrieval benchmark on ml-latest-small under the LlamaRec protocol.

    python -m benchmarks.retrieval [--data-path DIR] [--ann-items 200000]

In one run:
1. Recall@{10,20,50,100,200}, NDCG@10 and MRR@10 (95% bootstrap intervals) on the test split for the
   baselines popularity, ALS and BPR (each tuned on the validation split with a small seeded grid), the
   two-tower model (early-stopped on validation) and the hybrid merge of two-tower + ALS + popularity
   (fusion chosen on validation); training time, and the query tower's per-user latency p50/p99.
2. FAISS Flat vs HNSW vs IVF, keyed by ``factory|search_params``: ANN Recall@100 against exact search and
   single-query p50/p99 latency, on the ALS item factors of ml-latest-small and on a synthetic catalogue
   large enough for ANN to matter.
3. Batch candidate throughput (top-200 for every user) through ``pipeline.batch.generate_candidates``.

Writes ``benchmarks/results/retrieval.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, latency_ms, round_row, write_results
from data.vocab import IdVocab
from pipeline.batch import generate_candidates
from pipeline.config import TrainConfig
from pipeline.report import markdown_table
from pipeline.train import GRIDS, base_config, fit_for_test, load_dataset, prepare_split
from retrieval.evaluate import evaluate_retriever
from retrieval.index import IndexConfig, ItemIndex
from retrieval.registry import make_retriever
from retrieval.tuning import grid_search

KS = (10, 20, 50, 100, 200)
QUALITY_COLUMNS = ["method", "Recall@10", "Recall@20", "Recall@50", "Recall@100", "Recall@200", "NDCG@10",
                   "MRR@10", "fit_s"]
ANN_COLUMNS = ["method", "catalogue", "ANN_Recall@100", "p50_ms", "p99_ms", "build_s", "speedup_vs_flat_p50"]


def quality_rows(split, config: TrainConfig, models=("popularity", "als", "bpr")) -> tuple[list[dict], dict]:
    """Tune each model on validation, refit on train+val, score the test items."""
    rows, fitted = [], {}
    for name in models:
        model_config = base_config(name, config)
        if GRIDS[name]:
            model_config = grid_search(lambda c, n=name: make_retriever(n, c), model_config, GRIDS[name],
                                       split).best_config
        start = time.perf_counter()
        model = make_retriever(name, model_config).fit(split.history("test"), items=split.items)
        fit_s = time.perf_counter() - start
        report = evaluate_retriever(model, split, "test", ks=KS, seed=config.seed)
        rows.append(round_row(report.row(name, fit_s=fit_s), 5))
        fitted[name] = model
    return rows, fitted


def sequential_rows(split, config: TrainConfig) -> tuple[list[dict], Any]:
    """Two-tower alone and the hybrid, fitted as ``shortlist train --model hybrid`` fits them."""
    start = time.perf_counter()
    hybrid, _, components = fit_for_test("hybrid", config, split)
    total_s = time.perf_counter() - start
    two_tower = components["two_tower"]
    log = two_tower.training_log
    latency = two_tower.query_latency_ms(n_users=300, seed=config.seed)
    rows = []
    for name, model in (("two_tower", two_tower), ("hybrid", hybrid)):
        report = evaluate_retriever(model, split, "test", ks=KS, seed=config.seed)
        extra: dict[str, Any] = {"fit_s": log.seconds} if name == "two_tower" else {"fit_s": total_s}
        if name == "two_tower":
            extra.update(p50_ms=latency["p50"], p99_ms=latency["p99"], epochs=log.epochs,
                         best_epoch=log.best_epoch, events_per_s=log.events_per_s, device=log.device,
                         history_len_mean=latency["history_len"])
        else:
            c = hybrid.config
            extra.update(fusion={"method": c.method, "rrf_k": c.rrf_k, "weights": list(c.weights),
                                 "components": list(components)})
        rows.append(round_row(report.row(name, **extra), 5))
    return rows, two_tower


def ann_configs(n_items: int) -> list[IndexConfig]:
    """Flat, HNSW at two efSearch values, IVF at two nprobe values.

    nlist is the power of two at or below min(4 sqrt(n), n / 39): FAISS wants >= 39 training points per
    centroid, and 4 sqrt(n) is its usual starting point for large catalogues.
    """
    nlist = int(2 ** np.floor(np.log2(max(16, min(4 * np.sqrt(n_items), n_items / 39)))))
    return [
        IndexConfig(factory="Flat"),
        IndexConfig(factory="HNSW32", search_params="efSearch=64"),
        IndexConfig(factory="HNSW32", search_params="efSearch=256"),
        IndexConfig(factory=f"IVF{nlist},Flat", search_params="nprobe=8"),
        IndexConfig(factory=f"IVF{nlist},Flat", search_params="nprobe=32"),
    ]


def ann_rows(vectors: np.ndarray, queries: np.ndarray, catalogue: str, k: int = 100,
             n_latency: int = 500) -> list[dict[str, Any]]:
    """ANN recall@k against exact Flat search and single-query latency, per index config."""
    items = IdVocab(np.arange(vectors.shape[0], dtype=np.int64), name="item")
    rows, exact_ids, flat_p50 = [], None, None
    for config in ann_configs(vectors.shape[0]):
        start = time.perf_counter()
        index = ItemIndex(config).build(vectors, items)
        build_s = time.perf_counter() - start
        ids, _ = index.search(queries, k)
        if exact_ids is None:
            exact_ids = ids
        recall = np.mean([np.intersect1d(a, b).size / k for a, b in zip(ids, exact_ids)])
        lat = latency_ms(lambda i, index=index: index.search(queries[i % len(queries)], k), n_latency)
        flat_p50 = flat_p50 or lat["p50_ms"]
        rows.append(round_row({"method": index.describe(), "catalogue": catalogue, "ANN_Recall@100": recall,
                               **lat, "build_s": build_s, "speedup_vs_flat_p50": flat_p50 / lat["p50_ms"]}))
    return rows


def synthetic_vectors(n_items: int, n_queries: int = 1000, dim: int = 64, clusters: int = 256,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered item and query vectors (a Gaussian mixture), the shape learned embeddings take."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    items = centers[rng.integers(0, clusters, n_items)] + 0.5 * rng.normal(size=(n_items, dim)).astype(np.float32)
    queries = centers[rng.integers(0, clusters, n_queries)] + 0.5 * rng.normal(size=(n_queries, dim)).astype(
        np.float32)
    return items, queries


def throughput_rows(model, k: int = 200) -> list[dict[str, Any]]:
    rows = []
    for config in (IndexConfig(factory="Flat", threads=2), IndexConfig(factory="HNSW32",
                                                                       search_params="efSearch=256", threads=2)):
        model.reindex(config)
        with tempfile.TemporaryDirectory() as tmp:
            stats = generate_candidates(model, Path(tmp) / "candidates.parquet", k=k, progress=False)
        rows.append(round_row({"method": f"{model.name} {config.factory}|{config.search_params}",
                               "users": stats.users, "k": k, "seconds": stats.seconds,
                               "users_per_s": stats.users_per_second}, 2))
    return rows


def run(data_path: str | None = None, ann_items: int = 200_000, seed: int = 0) -> dict[str, Any]:
    config = TrainConfig(data_path=data_path, seed=seed)
    raw = load_dataset(config.dataset, data_path)
    split = prepare_split(raw, config)
    print("## Dataset after filtering\n")
    print(markdown_table([split.stats()], ["users", "items", "interactions", "train", "val", "test"]))

    print("\n## Test quality (95% bootstrap intervals)\n")
    quality, fitted = quality_rows(split, config)
    seq_rows, _ = sequential_rows(split, config)
    quality += seq_rows
    print(markdown_table(quality, QUALITY_COLUMNS + ["p50_ms", "p99_ms"]))
    print("\n(fit_s: training time; the hybrid's covers the two-tower, the ALS grid and the fusion search. "
          "p50/p99: the query tower's per-user latency, one user at a time.)")

    print("\n## FAISS: ANN Recall@100 vs exact and single-query latency\n")
    als = fitted["als"]
    test_users = split.targets("test")["user_id"].to_numpy()
    ann = ann_rows(als.item_factors, als.user_vectors(als.users.rows(test_users)), f"{DEFAULT_DATA} ALS")
    if ann_items:
        items, queries = synthetic_vectors(ann_items, seed=seed)
        ann += ann_rows(items, queries, f"synthetic {ann_items:,}x64")
    print(markdown_table(ann, ANN_COLUMNS))

    print("\n## Batch candidates (top-200, all users)\n")
    batch = throughput_rows(als)
    print(markdown_table(batch, ["method", "users", "k", "seconds", "users_per_s"]))

    rows = [{**r, "section": "quality"} for r in quality] + [{**r, "section": "ann"} for r in ann] + [
        {**r, "section": "batch"} for r in batch]
    path = write_results("retrieval", rows, {
        "dataset": DEFAULT_DATA, "protocol": "LlamaRec leave-one-out, 5-core", "split": split.stats(),
        "grids": GRIDS, "seed": seed, "ks": KS,
        "paper_reference": {"SASRec": {"NDCG@10": 0.0522, "Recall@10": 0.0993},
                            "LRURec": {"NDCG@10": 0.0705, "Recall@10": 0.1426}},
    })
    print(f"\nwrote {path}")
    return {"rows": rows, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--ann-items", type=int, default=200_000, help="synthetic ANN catalogue size (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.data_path, args.ann_items, args.seed)


if __name__ == "__main__":
    main()
