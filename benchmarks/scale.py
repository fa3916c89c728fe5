"""Scale benchmark on the synthetic generator: FAISS indexes over a large catalogue, and batch candidates
single-process against Ray Data with 1 and 2 workers.

    python -m benchmarks.scale                       # defaults: 250,000 items x 1,000,000 users (< 20 min)
    python -m benchmarks.scale --items 1000000       # the 1M x 1M run of issue #15 (longer; see the README)

In one run:

1. **Data**: ``data.synthetic.generate`` events for ``--users`` users over ``--items`` items. Item vectors
   are the items' taste-cluster centroid plus noise (64 dims, unit length, seeded); a user's query vector
   is the normalised mean of the vectors of the items in their history (a fold-in, as CF does).
2. **Indexes** Flat, HNSW32 (``efSearch`` 128) and IVF-PQ (``IVF{nlist},PQ16``, ``nprobe`` 32): build time,
   memory (the serialised index, and the process's RSS growth while building), ANN Recall@100 against
   exact search on ``--sample`` users, and single-query p50/p99 on one thread. Flat batch search is
   measured with FAISS's default BLAS threshold and with ``distance_compute_blas_threshold=20``.
3. **Batch candidates** (top-100 per user, written to Parquet) for ``--batch-users`` users through the
   ``--batch-index`` index: single process (2 threads) against Ray Data actors holding the index (1
   worker x 2 threads, 2 workers x 1 thread); Ray's start-up is timed apart. The ratio to the
   single-process rate is the comparison; the time for every user is projected from the rate.
4. **Projection to 100M items** from the measured bytes per vector and per-query cost (README).

Writes ``benchmarks/results/scale.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from benchmarks.common import latency_ms, round_row, write_results
from data.synthetic import SyntheticConfig, generate, item_catalog
from pipeline.report import markdown_table

DIM = 64
K = 100
INDEXES = {"Flat": ("Flat", ""), "HNSW32": ("HNSW32", "efSearch=128"), "IVF-PQ": (None, "nprobe=32")}


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def vectors(n_users: int, n_items: int, *, clusters: int, seed: int = 0,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """``(item vectors, user ids, user vectors, timings)`` of a synthetic catalogue (see the module)."""
    import scipy.sparse as sp

    timings = {}
    started = time.perf_counter()
    config = SyntheticConfig(n_users=n_users, n_items=n_items, n_clusters=clusters, mean_history=20, seed=seed)
    events = generate(config, progress=progress)
    timings["generate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((clusters, DIM)).astype(np.float32)
    catalog = item_catalog(config)  # the true cluster of every item (ids 1..n_items)
    item_ids = catalog.item_ids
    items = centroids[catalog.cluster] + 0.7 * rng.standard_normal((item_ids.size, DIM)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    frame = events.frame
    users = np.unique(frame["user_id"].to_numpy())
    rows = np.searchsorted(users, frame["user_id"].to_numpy())
    cols = np.searchsorted(item_ids, frame["item_id"].to_numpy())
    matrix = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(users.size, item_ids.size))
    del events, frame
    queries = np.asarray(matrix @ items, dtype=np.float32)
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    timings["vectors_s"] = time.perf_counter() - started
    return items, users, queries, timings


def build(name: str, items: np.ndarray, nlist: int, train_sample: int, seed: int = 0) -> tuple[Any, dict]:
    """Build one index (2 threads); returns it and its build row."""
    import faiss

    factory, params = INDEXES[name]
    factory = factory or f"IVF{nlist},PQ16"
    before = rss_mb()
    started = time.perf_counter()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(items[rng.choice(items.shape[0], min(train_sample, items.shape[0]), replace=False)])
    index.add(items)
    seconds = time.perf_counter() - started
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    size = faiss.serialize_index(index).nbytes
    return index, {"method": name, "factory": factory, "search_params": params, "build_s": seconds,
                   "index_mb": size / 2**20, "bytes_per_item": size / items.shape[0],
                   "rss_growth_mb": rss_mb() - before}


def single_query_latency(index: Any, sample: np.ndarray, n: int) -> dict[str, float]:
    """p50/p95/p99 of single-query searches on one thread."""
    import faiss

    faiss.omp_set_num_threads(1)
    try:
        return latency_ms(lambda i: index.search(sample[i % sample.shape[0]][None], K), n, warmup=10)
    finally:
        faiss.omp_set_num_threads(2)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f[f >= 0], e).size / e.size for f, e in zip(found, exact)]))


def flat_batch_rate(index: Any, queries: np.ndarray, threshold: int | None) -> tuple[float, np.ndarray]:
    """Queries per second of one batched Flat search (2 threads) at a BLAS threshold (None: FAISS default)."""
    import faiss

    default = faiss.cvar.distance_compute_blas_threshold
    if threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = threshold
    try:
        started = time.perf_counter()
        _, ids = index.search(queries, K)
        return queries.shape[0] / (time.perf_counter() - started), ids
    finally:
        faiss.cvar.distance_compute_blas_threshold = default


# ---- batch candidates ------------------------------------------------------------------------------
class IndexActor:
    """A Ray Data actor (or the single-process worker): loads the index and the user vectors from files
    once, then writes the top-``K`` rows of each batch of user rows."""

    def __init__(self, index_path: str, users_path: str, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = faiss.read_index(index_path)
        with np.load(users_path) as data:
            self.user_ids, self.queries = data["ids"], data["vectors"]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch["row"].to_numpy()
        scores, ids = self.index.search(np.ascontiguousarray(self.queries[rows]), K)
        return pd.DataFrame({"user_id": np.repeat(self.user_ids[rows], K),
                             "rank": np.tile(np.arange(1, K + 1, dtype=np.int32), rows.size),
                             "item_row": ids.ravel(), "score": scores.ravel()})


def batch_single(index_path: str, users_path: str, rows: np.ndarray, out: Path, batch: int) -> float:
    worker = IndexActor(index_path, users_path, threads=2)
    started = time.perf_counter()
    parts = [worker(pd.DataFrame({"row": rows[i : i + batch]})) for i in range(0, rows.size, batch)]
    pd.concat(parts, ignore_index=True).to_parquet(out, index=False)
    return time.perf_counter() - started


def batch_ray(index_path: str, users_path: str, rows: np.ndarray, out: Path, batch: int, workers: int,
              threads: int) -> tuple[float, float]:
    """``(seconds of the run, seconds to start Ray)`` with ``workers`` actors of ``threads`` threads."""
    import ray

    from pipeline.ray_runtime import worker_env

    started = time.perf_counter()
    ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env(threads)})
    start_s = time.perf_counter() - started
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        blocks = [pd.DataFrame({"row": rows[i : i + batch]}) for i in range(0, rows.size, batch)]
        started = time.perf_counter()
        dataset = ray.data.from_pandas(blocks).map_batches(
            IndexActor, fn_constructor_args=(index_path, users_path, threads), batch_size=batch,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
        dataset.write_parquet(str(out))
        return time.perf_counter() - started, start_s
    finally:
        ray.shutdown()


# ---- projection --------------------------------------------------------------------------------------
def projection(rows: list[dict], n_items: int, target: int = 100_000_000, shard_items: int = 10_000_000,
               rates: tuple[int, ...] = (1_000, 10_000), replica_cores: int = 2,
               utilisation: float = 0.6) -> list[dict]:
    """Memory per shard and replicas needed at ``target`` items, from the measured rows.

    A query is sent to every shard; a shard's single-thread search cost is the measured mean scaled with
    items linearly (Flat), with ``sqrt(items)`` (IVF: ``nlist`` grows as ``sqrt(items)`` at a fixed
    ``nprobe``) or with ``log(items)`` (HNSW). This is the index search only (no retrieval model, no
    reranker, no HTTP).
    Replicas = rate x CPU-seconds per request / (cores per replica x utilisation).
    """
    shards = math.ceil(target / shard_items)
    out = []
    for row in rows:
        if "mean_ms" not in row:
            continue
        if row["method"].startswith("HNSW"):  # graph walk: ~log(items)
            growth = math.log(shard_items) / math.log(n_items)
        elif row["method"].startswith("IVF"):  # nlist ~ sqrt(items), fixed nprobe: lists scanned ~ sqrt(items)
            growth = math.sqrt(shard_items / n_items)
        else:  # Flat: every item
            growth = shard_items / n_items
        shard_ms = row["mean_ms"] * growth  # capacity follows the mean cost, not the median
        cpu_s = shards * shard_ms / 1000
        proj = {"method": row["method"], "shards": shards, "items_per_shard": shard_items,
                "shard_memory_gb": row["bytes_per_item"] * shard_items / 2**30,
                "total_memory_gb": row["bytes_per_item"] * target / 2**30,
                "shard_query_ms": shard_ms, "cpu_ms_per_request": cpu_s * 1000}
        for rate in rates:
            proj[f"cores_at_{rate}_rps"] = math.ceil(rate * cpu_s / utilisation)
            proj[f"replicas_at_{rate}_rps"] = math.ceil(rate * cpu_s / (replica_cores * utilisation))
        out.append(proj)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size")
    parser.add_argument("--users", type=int, default=1_000_000, help="users generated (query vectors)")
    parser.add_argument("--clusters", type=int, default=1_000, help="taste clusters of the generator")
    parser.add_argument("--sample", type=int, default=1_000, help="users for recall and latency")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed per index")
    parser.add_argument("--batch-users", type=int, default=50_000, help="users of the batch comparison")
    parser.add_argument("--batch-index", default="HNSW32", choices=list(INDEXES), help="index of the batch run")
    parser.add_argument("--indexes", default="Flat,HNSW32,IVF-PQ", help="comma-separated subset of the indexes")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4 * sqrt(items))")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray batch runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.indexes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(INDEXES))
    if unknown:
        parser.error(f"--indexes: unknown {unknown}; choose from {list(INDEXES)}")
    if args.batch_index not in names:
        parser.error(f"--batch-index {args.batch_index} must be one of --indexes {names}")
    import faiss

    faiss.omp_set_num_threads(2)
    nlist = args.nlist or int(2 ** round(math.log2(4 * math.sqrt(args.items))))
    started = time.perf_counter()
    items, user_ids, queries, timings = vectors(args.users, args.items, clusters=args.clusters, seed=args.seed)
    print(f"data: {items.shape[0]:,} items x {user_ids.size:,} users in {sum(timings.values()):.0f} s")
    rng = np.random.default_rng(args.seed)
    sample = queries[rng.choice(user_ids.size, args.sample, replace=False)]
    exact_index, flat_row = build("Flat", items, nlist, 0)
    _, exact = flat_batch_rate(exact_index, sample, 20)
    rows, flat_rates = [], {}
    work = Path(tempfile.mkdtemp(prefix="shortlist-scale-"))
    for name in tqdm(names, desc="indexes"):
        index, row = (exact_index, flat_row) if name == "Flat" else build(
            name, items, nlist, train_sample=max(64 * nlist, 100_000), seed=args.seed)
        faiss.omp_set_num_threads(2)
        _, found = index.search(sample, K)
        row["recall@100"] = recall_at_k(found, exact)
        row.update(single_query_latency(index, sample, args.latency_queries))
        if name == "Flat":
            batch = sample[: min(1024, args.sample)]
            flat_rates["faiss_default"], default_ids = flat_batch_rate(index, batch, None)
            flat_rates["threshold_20"], blas_ids = flat_batch_rate(index, batch, 20)
            flat_rates["same_ids"] = float(np.mean(default_ids == blas_ids))  # share of identical result ids
            row["batch_qps_default_blas"], row["batch_qps_blas20"] = flat_rates["faiss_default"], flat_rates[
                "threshold_20"]
        if name == args.batch_index:
            faiss.write_index(index, str(work / "index.faiss"))
        rows.append(round_row(row))
        index = None  # free it before the next build
    exact_index = None
    print("\n## Indexes\n")
    print(markdown_table(rows, ["method", "build_s", "index_mb", "bytes_per_item", "rss_growth_mb", "recall@100",
                                "p50_ms", "p99_ms"]))

    # batch candidates
    n_batch = min(args.batch_users, user_ids.size)
    batch_rows = rng.choice(user_ids.size, n_batch, replace=False)
    np.savez(work / "users.npz", ids=user_ids, vectors=queries)
    del queries
    single_s = batch_single(str(work / "index.faiss"), str(work / "users.npz"), batch_rows, work / "single.parquet",
                            1024)
    batch = [{"method": f"single process ({args.batch_index}, 2 threads)", "users": n_batch, "seconds": single_s,
              "users_per_s": n_batch / single_s, "ratio_to_single": 1.0}]
    if not args.no_ray:
        for workers, threads in ((1, 2), (2, 1)):
            seconds, start_s = batch_ray(str(work / "index.faiss"), str(work / "users.npz"), batch_rows,
                                         work / f"ray{workers}", 1024, workers, threads)
            batch.append({"method": f"Ray Data, {workers} worker(s) x {threads} thread(s)", "users": n_batch,
                          "seconds": seconds, "users_per_s": n_batch / seconds,
                          "ratio_to_single": (n_batch / seconds) / (n_batch / single_s), "ray_start_s": start_s})
    for row in batch:
        row["all_users_min"] = user_ids.size / row["users_per_s"] / 60
    batch = [round_row(r) for r in batch]
    print("\n## Batch candidates (top-100, Parquet)\n")
    print(markdown_table(batch, ["method", "users", "seconds", "users_per_s", "ratio_to_single", "ray_start_s",
                                 "all_users_min"]))
    proj = [round_row(r, 3) for r in projection(rows, items.shape[0])]
    print("\n## Projection to 100M items (10M-item shards; 2-core replicas at 60% utilisation)\n")
    print(markdown_table(proj, list(proj[0]) if proj else ["method"]))
    meta = {"items": int(items.shape[0]), "users": int(user_ids.size), "dim": DIM, "k": K, "nlist": nlist,
            "sample": args.sample, "batch_users": n_batch, "batch_index": args.batch_index, "timings": timings,
            "flat_batch_qps": flat_rates, "projection": proj, "batch": batch, "seed": args.seed,
            "total_s": time.perf_counter() - started, "omp": os.environ.get("OMP_NUM_THREADS")}
    from benchmarks.common import RESULTS

    path = write_results("scale", rows + batch, meta, out_dir=Path(args.out_dir) if args.out_dir else RESULTS)
    print(f"\nWrote {path} in {meta['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
