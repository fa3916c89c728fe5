"""Retrieval benchmark on ml-latest-small under the LlamaRec protocol.

    python -m benchmarks.retrieval [--seeds 3] [--ann-items 200000] [--search-trials 4] [--search-budget 900]

In one run:
1. Test quality of every registered retriever as ``shortlist train`` selects it: each model's validation
   search runs once (seed 0: the CF grids, the two-tower's seeded search over loss, blocks, dropout,
   max_len, learning rate and epochs; the hybrid's two fusions), then the chosen config is trained with
   seeds 0, 1, 2. Each row is the mean over seeds, with the per-seed values, their standard deviation, and
   a 95% bootstrap interval over users of the seed-averaged per-user metric. The hybrid gets two rows: the
   list it serves without a reranker (fusion or one component, chosen on validation NDCG@10) and the
   candidate list a reranker reads (fusion tuned for Recall@50). The two-tower's search trials are listed,
   and its chosen config is trained again without the weight average (``ema_epochs=0``) on the same seeds,
   for a paired check of that default.
2. FAISS Flat vs HNSW vs IVF, keyed by ``factory|search_params``: ANN Recall@100 against exact search and
   single-query p50/p99 latency, on the ALS item factors of ml-latest-small and on a synthetic catalogue
   large enough for ANN to matter.
3. Batch candidate throughput (top-200 for every user) through ``pipeline.batch.generate_candidates``.

Writes ``benchmarks/results/retrieval.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, latency_ms, round_row, write_results
from data.metrics import MetricReport, bootstrap_ci, paired_bootstrap_ci
from data.vocab import IdVocab
from pipeline.batch import generate_candidates
from pipeline.config import TrainConfig
from pipeline.report import markdown_table
from pipeline.train import load_dataset, prepare_split
from retrieval.evaluate import evaluate_retriever
from retrieval.fitting import fit_retriever
from retrieval.hybrid import HybridRetriever
from retrieval.index import IndexConfig, ItemIndex
from retrieval.registry import SPECS
from retrieval.tuning import grid_search

KS = (10, 20, 50, 100, 200)
QUALITY_COLUMNS = ["method", "NDCG@10", "NDCG@10_sd", "NDCG@10_by_seed", "Recall@10", "Recall@50", "Recall@200",
                   "MRR@10", "fit_s"]
SEARCH_COLUMNS = ["trial", "loss", "n_blocks", "dropout", "max_len", "learning_rate", "max_epochs", "NDCG@10",
                  "Recall@50", "fit_s"]
ANN_COLUMNS = ["method", "catalogue", "ANN_Recall@100", "p50_ms", "p99_ms", "build_s", "speedup_vs_flat_p50"]
LRURec = 0.0705  # NDCG@10 of LRURec on this protocol (LlamaRec paper): the bar for the two-tower
#: paired comparisons (a, b): a's seed-averaged per-user NDCG@10 minus b's, over the same test users
NO_AVERAGE = "two_tower (no weight average)"
PAIRS = (("hybrid", "two_tower"), ("hybrid", "covisit"), ("covisit", "two_tower"), ("two_tower", NO_AVERAGE))
PAIRED_COLUMNS = ["method", "dNDCG@10"]  # markdown_table shows the _ci beside it


def _seed_row(method: str, reports: list[MetricReport], fit_s: list[float], seed: int, **extra: Any) -> dict:
    """Mean over seeds, per-seed values and sd, and a bootstrap interval of the seed-averaged per-user metric."""
    row: dict[str, Any] = {"method": method}
    for name in ("NDCG@10", "Recall@10", "Recall@50", "Recall@200", "MRR@10"):
        values = [r.means[name] for r in reports]
        row[name] = float(np.mean(values))
        row[f"{name}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row[f"{name}_by_seed"] = [round(v, 4) for v in values]
        per_user = np.mean([r.per_user[name] for r in reports], axis=0)
        row[f"{name}_ci"] = list(bootstrap_ci(per_user, seed=seed))
    row.update(seeds=len(reports), fit_s=float(np.mean(fit_s)), **extra)
    return round_row(row, 5)


def paired_rows(reports: dict[str, list[MetricReport]], seed: int) -> list[dict[str, Any]]:
    """One row per pair of :data:`PAIRS` present: the mean NDCG@10 difference of the seed-averaged per-user
    values and its paired 95% bootstrap interval (whether ``a`` beats ``b`` beyond user-sampling noise)."""
    per_user = {name: np.mean([r.per_user["NDCG@10"] for r in got], axis=0) for name, got in reports.items()}
    rows = []
    for a, b in PAIRS:
        if a in per_user and b in per_user:
            lo, hi = paired_bootstrap_ci(per_user[a], per_user[b], seed=seed)
            label = "hybrid (served)" if a == "hybrid" else a
            rows.append(round_row({"method": f"{label} vs {b}", "dNDCG@10": float(np.mean(per_user[a] - per_user[b])),
                                   "dNDCG@10_ci": [round(lo, 5), round(hi, 5)]}, 5))
    return rows


def quality_rows(split, config: TrainConfig, seeds: int = 3) -> tuple[list[dict], dict, dict[str, Any]]:
    """``(rows, search, models)``: every registered model searched once on validation (seed 0), then its
    chosen config trained with ``seeds`` seeds; ``search`` holds what each search tried and chose, and
    ``search["paired"]`` the :func:`paired_rows`."""
    configs = config.configs()
    reports: dict[str, list[MetricReport]] = {}
    fit_s: dict[str, list[float]] = {}
    chosen: dict[str, Any] = {}
    search: dict[str, Any] = {}
    models: dict[str, Any] = {}
    later: dict[str, dict[int, tuple[Any, float]]] = {}  # slow models' seeds 1.. trained in parallel
    for seed in range(seeds):
        options = dataclasses.replace(config.fit_options(progress=True), seed=seed, tune=seed == 0)
        this_seed: dict[str, Any] = {}
        for name, spec in SPECS.items():
            if spec.components:
                continue
            start = time.perf_counter()
            if name in later:
                model, seconds = later[name][seed]
                model.set_history(split.history("test"))
                fit_s.setdefault(name, []).append(seconds)
            else:
                fitted = fit_retriever(name, split, "test", configs=configs if seed == 0 else chosen,
                                       options=options)
                model = fitted.model
                fit_s.setdefault(name, []).append(time.perf_counter() - start)
                if seed == 0:
                    chosen[name] = fitted.config
                    search.update(fitted.tuning)
                    models[name] = model
            if seed == 0 and spec.search == "random" and seeds > 1:
                # the chosen config with the other seeds, in the search's worker processes
                got = grid_search(spec.cls, chosen[name], {"seed": list(range(1, seeds))}, split,
                                  workers=config.search_workers, keep_models=True)
                later[name] = {s: (m, t["fit_s"]) for s, m, t in zip(range(1, seeds), got.models, got.trials)}
            this_seed[name] = model
            reports.setdefault(name, []).append(evaluate_retriever(model, split, "test", ks=KS))
        # the hybrid of this seed, as `shortlist train` builds it: the two-tower above, co-visitation, ALS
        # (chosen configs) and popularity fitted on the validation history, both fusions tuned on validation
        start = time.perf_counter()
        parts = {}
        for name in SPECS["hybrid"].components:
            if SPECS[name].test_stage == "history":
                parts[name] = this_seed[name].set_history(split.history("val"))
            else:
                parts[name] = fit_retriever(name, split, "val", configs=chosen,
                                            options=dataclasses.replace(options, tune=False)).model
        hybrid = HybridRetriever(parts, dataclasses.replace(config.hybrid, progress=False)).tune(split)
        hybrid.set_history(split.history("test"))
        fit_s.setdefault("hybrid", []).append(time.perf_counter() - start + sum(fit_s[n][-1] for n in parts))
        reports.setdefault("hybrid", []).append(evaluate_retriever(hybrid, split, "test", ks=KS))
        reports.setdefault("hybrid candidates", []).append(
            evaluate_retriever(hybrid.for_candidates(), split, "test", ks=KS))
        search.setdefault("hybrid_by_seed", []).append(
            {"served_source": hybrid.served_source, "served": dataclasses.asdict(hybrid.config.served_fusion()),
             "candidates": dataclasses.asdict(hybrid.config.candidate_fusion()),
             "served_val_NDCG@10": hybrid.tuning["served_best"]})
        if seed == 0:
            models["hybrid"] = hybrid
    if getattr(chosen.get("two_tower"), "ema_epochs", 0):
        # the chosen two-tower without its weight average, same seeds: the paired check of that default
        raw = dataclasses.replace(chosen["two_tower"], ema_epochs=0.0, progress=False)
        got = grid_search(SPECS["two_tower"].cls, raw, {"seed": list(range(seeds))}, split,
                          workers=config.search_workers, keep_models=True)
        for model in got.models:
            model.set_history(split.history("test"))
            reports.setdefault(NO_AVERAGE, []).append(evaluate_retriever(model, split, "test", ks=KS))
        fit_s[NO_AVERAGE] = [t["fit_s"] for t in got.trials]
    rows = []
    for name, got in reports.items():
        extra: dict[str, Any] = {}
        if name == "hybrid":
            extra["served_by_seed"] = [h["served_source"] for h in search["hybrid_by_seed"]]
        if name == "two_tower":
            extra["config"] = {k: v for k, v in chosen["two_tower"].to_dict().items()
                               if k in ("loss", "n_blocks", "dropout", "max_len", "learning_rate", "max_epochs")}
        label = {"hybrid": "hybrid (served)", "hybrid candidates": "hybrid candidates (for a reranker)"}.get(name, name)
        rows.append(_seed_row(label, got, fit_s.get(name, fit_s.get(name.split()[0], [0.0])), config.seed, **extra))
    search["paired"] = paired_rows(reports, config.seed)
    return rows, search, models


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


def run(data_path: str | None = None, ann_items: int = 200_000, seed: int = 0, seeds: int = 3,
        search_trials: int = 4, search_budget_s: float = 900.0) -> dict[str, Any]:
    config = TrainConfig(data_path=data_path, seed=seed, search_trials=search_trials,
                         search_budget_s=search_budget_s)
    raw = load_dataset(config.dataset, data_path)
    split = prepare_split(raw, config)
    print("## Dataset after filtering\n")
    print(markdown_table([split.stats()], ["users", "items", "interactions", "train", "val", "test"]))

    started = time.perf_counter()
    quality, search, fitted = quality_rows(split, config, seeds)
    quality_s = time.perf_counter() - started
    print(f"\n## Test quality: mean over {seeds} seeds of the config validation chose (sd over seeds; 95% "
          "bootstrap interval over users of the seed-averaged metric)\n")
    print(markdown_table(quality, QUALITY_COLUMNS))
    two_tower = next(r for r in quality if r["method"] == "two_tower")
    print(f"\ntwo-tower as `shortlist train` selects it: NDCG@10 {two_tower['NDCG@10']:.4f} (mean of {seeds} seeds) "
          f"against LRURec's {LRURec}: {'reached' if two_tower['NDCG@10'] >= LRURec else 'NOT reached'}")
    trials = [{"trial": i, **t} for i, t in enumerate(search.get("two_tower", {}).get("trials", []))]
    if trials:
        print("\n## The two-tower's validation search (seed 0; a blank cell keeps the default)\n")
        print(markdown_table(trials, SEARCH_COLUMNS))
        for skipped in search["two_tower"].get("skipped", []):
            print(f"not tried: {skipped}")
    served = [h["served_source"] for h in search["hybrid_by_seed"]]
    print(f"\nhybrid: the list served without a reranker came from {served} (per seed)")
    paired = search["paired"]
    print("\n## Paired differences (seed-averaged per-user NDCG@10, same test users)\n")
    print(markdown_table(paired, PAIRED_COLUMNS))

    ann: list[dict[str, Any]] = []
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

    rows = [{**r, "section": "quality"} for r in quality] + [{**r, "section": "paired"} for r in paired] + [
        {**r, "section": "ann"} for r in ann] + [{**r, "section": "batch"} for r in batch]
    path = write_results("retrieval", rows, {
        "dataset": DEFAULT_DATA, "protocol": "LlamaRec leave-one-out, 5-core", "split": split.stats(),
        "search": {k: v for k, v in search.items() if k != "paired"}, "grids": {n: dict(s.search_space) for n, s in SPECS.items()},
        "seeds": list(range(seeds)), "seed": seed, "ks": KS, "quality_seconds": round(quality_s, 1),
        "lrurec_bar": LRURec,
        "paper_reference": {"SASRec": {"NDCG@10": 0.0522, "Recall@10": 0.0993},
                            "LRURec": {"NDCG@10": 0.0705, "Recall@10": 0.1426}},
    })
    print(f"\nwrote {path}")
    return {"rows": rows, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--ann-items", type=int, default=200_000, help="synthetic ANN catalogue size (0 = skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search and the bootstrap")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of each chosen config (default 3)")
    parser.add_argument("--search-trials", type=int, default=4, help="as `shortlist train --search-trials`")
    parser.add_argument("--search-budget", type=float, default=900.0, help="as `shortlist train --search-budget`")
    args = parser.parse_args(argv)
    run(args.data_path, args.ann_items, args.seed, args.seeds, args.search_trials, args.search_budget)


if __name__ == "__main__":
    main()
