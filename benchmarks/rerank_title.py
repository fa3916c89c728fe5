"""Title cross-encoder benchmark (the reranker variant that reads words of titles) on ml-latest-small
under the LlamaRec protocol: pairwise against one-pass scoring. The item-token reranker's benchmark, under
both protocols, is :mod:`benchmarks.rerank`.

    python -m benchmarks.rerank_title [--retriever auto|two_tower|als|...] [--artifacts artifacts/rerank]
                                [--retrain] [--max-steps N] [--latency-users 50] [--threads 2]

In one run, on the test split, full-catalogue metrics of the final top-10 (the top-M reranked, then the rest
of the retrieval list), each with 95% bootstrap intervals and the paired bootstrap interval of its NDCG@10
difference from retrieval alone:

* retrieval only;
* pairwise cross-encoder reranking of the top-M, M in {20, 50};
* one-pass (shared-history) reranking of the top-M, M in {20, 50};
* the hybrid blend (one-pass score + retrieval score and rank, fitted on validation) at M in {20, 50};

plus the rerank latency per user (p50/p99, ms, candidate ids to scores) on CPU with ``--threads`` threads
for each mode, and LlamaRec's Table 1 rows marked as paper figures.

**Models**: for each mode the benchmark loads ``ARTIFACTS/<retriever>-<mode>`` when it exists and was
trained on this split with this retriever, and trains it and saves it otherwise (``--retrain`` forces
training). The one-pass model is fine-tuned from the base MiniLM (``ranking.trainer.fit_on_split``). A
pairwise step costs about 3.5x a one-pass step on CPU, so by default the pairwise model starts from the
one-pass weights (same head, same pooling; only the attention pattern differs) and is fine-tuned pairwise
for ``--pairwise-steps`` with an evaluation at step 0, so it sees at least as much training as the one-pass
model; ``--pairwise-from-scratch`` trains it from the base model instead. Measured on the 2-core machine
while another job held one core (``--train-threads 1``): two-tower fit about 2 min, one-pass training
13 min (250 steps), pairwise fine-tuning 14 min (60 steps), scoring and timing about 12 min, so a cold run
takes about 45 minutes and a warm run (both models loaded from ``--artifacts``) about 12 minutes; the
default is therefore "load if present, train otherwise", not "train within 20 minutes".

**Scoring shortcut (exact)**: a user whose test item is not in the retrieval top-M has NDCG@10, Recall@10 and
MRR@10 equal to 0 whatever the order of the top-M (the item stays at a rank > M >= 20), so only users whose
item is in the top 50 are run through the cross-encoder; the reported numbers are identical to scoring
every user (``--score-all-users`` does that, slower). Latency is measured on random test users.

Writes ``benchmarks/results/rerank_title.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, latency_ms, write_results
from data.errors import ArtifactError
from data.metrics import evaluate_rankings, paired_bootstrap_ci
from data.protocol import Split
from pipeline.report import markdown_table

log = logging.getLogger(__name__)

MS = (20, 50)
KS = (10,)
PAPER_ROWS = [
    {"method": "LRURec (paper figure)", "NDCG@10": 0.0705, "Recall@10": 0.1426, "MRR@10": 0.0491,
     "source": "LlamaRec paper, Table 1 (ml-latest-small)"},
    {"method": "LlamaRec, Llama-2-7B reranking top-20 (paper figure)", "NDCG@10": 0.0759, "Recall@10": 0.1524,
     "MRR@10": 0.0529, "source": "LlamaRec paper, Table 1 (ml-latest-small)"},
]
#: Table columns; a metric with a ``<metric>_ci`` entry prints as ``mean [lo, hi]``.
COLUMNS = ["method", "M", "NDCG@10", "Recall@10", "MRR@10", "dNDCG@10", "p50_ms", "p99_ms"]


def choose_retriever(name: str) -> str:
    """``auto``: the two-tower retriever when its module imports, else ALS."""
    if name != "auto":
        return name
    try:
        import retrieval.two_tower  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "als"
    return "two_tower"


def val_retriever(name: str, split: Split, folder: Path, threads: int | None = None) -> Any:
    """The retriever fitted on the training events; the two-tower one is cached in ``folder``."""
    from ranking.data import stage_retriever

    if name != "two_tower":
        return stage_retriever(name, split, "val")
    from retrieval.two_tower import TwoTowerRetriever

    path = folder / "retriever-two_tower"
    expected = split.history("val").fingerprint()
    if path.is_dir():
        try:
            model = TwoTowerRetriever.load(path)
            if model.history_fingerprint == expected:
                return model
        except ArtifactError as exc:
            log.warning("ignoring %s: %s", path, exc)
    model = stage_retriever(name, split, "val", threads=threads)
    model.save(path)
    return model


def load_or_train(mode: str, retriever_name: str, retriever: Any, split: Split, item_table: Any, folder: Path,
                  retrain: bool, trainer_overrides: dict[str, Any], init: Any = None) -> tuple[Any, dict[str, Any]]:
    """The trained ranker of ``mode`` from ``folder`` when it matches this split, else trained and saved
    (from the base model, or warm-started from ``init``'s weights)."""
    from ranking.config import RankerConfig, TrainerConfig
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.trainer import fit_on_split, warm_start

    path = folder / f"{retriever_name}-{mode}"
    fingerprint = split.history("val").fingerprint()
    if path.is_dir() and not retrain:
        try:
            ranker = CrossEncoderRanker.load(path)
            bench = ranker.meta.get("metrics", {})
            if bench.get("train_fingerprint") == fingerprint and bench.get("retriever") == retriever_name:
                ranker.set_history(split.train)
                return ranker, {"loaded_from": str(path), **bench}
            log.warning("%s was trained on other data or candidates; retraining", path)
        except ArtifactError as exc:
            log.warning("cannot load %s (%s); retraining", path, exc)
    config = TrainerConfig.from_dict({**TrainerConfig().to_dict(), **trainer_overrides})
    started = time.perf_counter()
    start = warm_start(init, mode) if init is not None else None
    ranker, record = fit_on_split(split, retriever, item_table, RankerConfig(mode=mode), config, ranker=start)
    seconds = time.perf_counter() - started
    info = {"train_fingerprint": fingerprint, "retriever": retriever_name, "train_seconds": round(seconds, 1),
            "initialised_from": init.mode if init is not None else "base model", "trainer": config.to_dict(),
            "val_history": record.history,
            "val_ndcg@10": record.best_metric, "val_retrieval_ndcg@10": record.retrieval_metric,
            "best_step": record.best_step, "steps": record.steps, "lists_per_s": record.lists_per_s}
    ranker.save(path, metrics=info)
    return ranker, {"trained_now": True, **info}


def rerank_rows(ranked: np.ndarray, scores: np.ndarray, m: int) -> np.ndarray:
    """The retrieval lists with their first ``m`` columns reordered by ``scores`` (stable on ties)."""
    out = ranked.copy()
    order = np.argsort(-scores[:, :m], axis=1, kind="stable")
    out[:, :m] = np.take_along_axis(ranked[:, :m], order, axis=1)
    return out


def stage_lists(split: Split, stage: str, retriever: Any, depth: int, limit: int = 0) -> dict[str, Any]:
    """Users with a held-out item in ``stage``, their retrieval top ``depth`` and which hold the target
    (``limit`` > 0 keeps the first ``limit`` users: smoke runs only)."""
    from retrieval.evaluate import targets_by_user

    users, relevant = targets_by_user(split, stage)
    if limit:
        users, relevant = users[:limit], relevant[:limit]
    ids, scores = retriever.retrieve(users, depth, exclude_seen=True)
    target = np.array([r[0] for r in relevant], dtype=np.int64)
    hit = ids == target[:, None]
    return {"users": users, "relevant": relevant, "ids": ids, "scores": scores, "target": target, "hit": hit}


def cross_scores(ranker: Any, lists: dict[str, Any], rows: np.ndarray, depth: int, progress: bool,
                 desc: str) -> np.ndarray:
    """``(n_users, depth)`` cross-encoder scores, computed for ``rows`` only (``-inf`` elsewhere)."""
    out = np.full(lists["ids"].shape, -np.inf, dtype=np.float32)
    if rows.size:
        out[rows, :depth] = ranker.score_lists([int(u) for u in lists["users"][rows]], lists["ids"][rows, :depth],
                                               progress=progress, desc=desc)
    return out


def measure_latency(ranker: Any, users: np.ndarray, candidates: np.ndarray, m: int, *, cached: bool) -> dict:
    """Per-user ``rank`` latency over ``users`` (candidate ids -> sorted scores); ``cached=False`` clears
    the history key/value cache before every call."""

    def call(i: int) -> None:
        if not cached:
            ranker.clear_cache()
        ranker.rank(int(users[i % users.size]), candidates[i % users.size, :m])

    if cached:  # fill the cache first, as a live service would have it
        for i in range(users.size):
            call(i)
    return latency_ms(call, users.size, warmup=min(3, users.size))


def time_modes(rankers: dict[str, Any], users: np.ndarray, candidates: np.ndarray,
               threads: int) -> dict[tuple[str, int], dict[str, float]]:
    """Rerank latency per mode and M at ``threads`` torch threads; one-pass also with the history cached."""
    import torch

    torch.set_num_threads(threads)
    latency: dict[tuple[str, int], dict[str, float]] = {}
    for mode, ranker in rankers.items():
        for m in MS:
            latency[(mode, m)] = measure_latency(ranker, users, candidates, m, cached=False)
            print(f"latency {threads} thread(s) {mode} M={m}: {latency[(mode, m)]}")
    for m in MS:
        latency[("one_pass cached", m)] = measure_latency(rankers["one_pass"], users, candidates, m, cached=True)
        print(f"latency {threads} thread(s) one_pass (history cached) M={m}: {latency[('one_pass cached', m)]}")
    return latency


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.train import load_dataset, prepare_split
    from ranking.blend import HybridBlend
    from ranking.data import stage_retriever

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    raw = load_dataset(DEFAULT_DATA, args.data_path)
    split = prepare_split(raw)
    folder = Path(args.artifacts)
    retriever_name = choose_retriever(args.retriever)
    print(f"retriever: {retriever_name}")
    retriever = val_retriever(retriever_name, split, folder, threads=args.train_threads or args.threads)
    depth = max(MS)

    overrides: dict[str, Any] = {"threads": args.train_threads or args.threads, "progress": not args.quiet}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    rankers, training = {}, {}
    rankers["one_pass"], training["one_pass"] = load_or_train("one_pass", retriever_name, retriever, split,
                                                              raw.items, folder, args.retrain, overrides)
    print(f"one_pass: {training['one_pass']}")
    if args.pairwise_from_scratch:
        pairwise_overrides, init = overrides, None
    else:  # warm start: the one-pass weights, then pairwise fine-tuning (it sees at least as much training)
        steps = args.pairwise_steps
        pairwise_overrides = {**overrides, "max_steps": steps, "eval_every": max(1, steps // 2),
                              "eval_at_start": True, "warmup_steps": min(10, steps)}
        init = rankers["one_pass"]
    rankers["pairwise"], training["pairwise"] = load_or_train("pairwise", retriever_name, retriever, split,
                                                              raw.items, folder, args.retrain, pairwise_overrides,
                                                              init=init)
    print(f"pairwise: {training['pairwise']}")

    # ---- the hybrid blend, fitted on validation (one-pass scores, training histories) ------------
    val = stage_lists(split, "val", retriever, depth, args.limit_users)
    one_pass = rankers["one_pass"]
    one_pass.set_history(split.train)
    val_rows = np.flatnonzero(val["hit"].any(axis=1))
    val_ce = cross_scores(one_pass, val, val_rows, depth, not args.quiet, "val one-pass")
    blends, blend_reports = {}, {}
    for m in MS:
        inside = val_rows[val["hit"][val_rows, :m].any(axis=1)]
        target_col = val["hit"][inside, :m].argmax(axis=1)
        blends[m] = HybridBlend().fit(val_ce[inside, :m], val["scores"][inside, :m], target_col,
                                      n_users=len(val["users"]))
        blend_reports[m] = blends[m].report
        print(f"blend M={m}: {blends[m].report}")
    chosen_m = max(MS, key=lambda m: blend_reports[m]["cv_ndcg@10_blend"] if blends[m].use_blend else -1.0)

    # ---- test stage --------------------------------------------------------------------------------
    test_retriever = stage_retriever(retriever_name, split, "test",
                                   previous=retriever if retriever_name == "two_tower" else None)
    test = stage_lists(split, "test", test_retriever, depth, args.limit_users)
    history = split.history("test")
    for ranker in rankers.values():
        ranker.set_history(history)
    rows = np.arange(len(test["users"])) if args.score_all_users else np.flatnonzero(test["hit"].any(axis=1))
    print(f"test: {rows.size} of {len(test['users'])} users run through the cross-encoder")
    ce = {mode: cross_scores(r, test, rows, depth, not args.quiet, f"test {mode}") for mode, r in rankers.items()}

    lists: dict[str, tuple[int | None, np.ndarray]] = {"retrieval only": (None, test["ids"])}
    for mode in ("pairwise", "one_pass"):
        for m in MS:
            lists[f"{mode} rerank top-{m}"] = (m, rerank_rows(test["ids"], ce[mode], m))
    for m in MS:
        hybrid = np.full(test["ids"].shape, -np.inf)
        hybrid[:, :m] = blends[m].score(ce["one_pass"][:, :m], test["scores"][:, :m])
        hybrid[~np.isfinite(ce["one_pass"][:, 0]), :m] = -np.arange(m)  # unscored users keep retrieval order
        label = f"hybrid (one-pass + retrieval) top-{m}" + (" [selected on val]" if m == chosen_m else "")
        lists[label] = (m, rerank_rows(test["ids"], hybrid, m))

    reports = {name: evaluate_rankings(ranked, test["relevant"], ks=KS, n_items=len(split.items),
                                       users=test["users"], seed=args.seed)
               for name, (_, ranked) in lists.items()}
    base = reports["retrieval only"].per_user["NDCG@10"]

    # ---- latency -------------------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    sample = rng.choice(len(test["users"]), size=min(args.latency_users, len(test["users"])), replace=False)
    lat_users, lat_cands = test["users"][sample], test["ids"][sample]
    load_before = os.getloadavg()
    latency = time_modes(rankers, lat_users, lat_cands, args.threads)
    extra_latency = {}
    for threads in args.extra_latency_threads:
        if threads != args.threads:
            timed = time_modes(rankers, lat_users, lat_cands, threads)
            extra_latency[str(threads)] = {f"{k[0]} M={k[1]}": v for k, v in timed.items()}
    torch.set_num_threads(args.threads)
    load_after = os.getloadavg()
    blend_ms = latency_ms(lambda i: blends[MS[-1]].score(ce["one_pass"][i:i + 1, :MS[-1]],
                                                         test["scores"][i:i + 1, :MS[-1]]), 50, warmup=5)

    rows_out = []
    for name, (m, _) in lists.items():
        report = reports[name]
        row = report.row(name, M=m if m else "-")
        row = {k: v for k, v in row.items() if not k.startswith("Coverage")}
        lo, hi = paired_bootstrap_ci(report.per_user["NDCG@10"], base, seed=args.seed)
        row["dNDCG@10"] = round(float(np.mean(report.per_user["NDCG@10"] - base)), 6)
        row["dNDCG@10_ci"] = [round(lo, 6), round(hi, 6)]
        mode = "pairwise" if name.startswith("pairwise") else "one_pass" if m else None
        if mode:
            row["p50_ms"] = round(latency[(mode, m)]["p50_ms"], 1)
            row["p99_ms"] = round(latency[(mode, m)]["p99_ms"], 1)
            if mode == "one_pass":
                row["p50_ms_history_cached"] = round(latency[("one_pass cached", m)]["p50_ms"], 1)
                row["p99_ms_history_cached"] = round(latency[("one_pass cached", m)]["p99_ms"], 1)
        if name.startswith("hybrid"):
            row["blend_p50_ms"] = round(blend_ms["p50_ms"], 3)
        rows_out.append(row)
    rows_out += PAPER_ROWS

    speedup = {m: latency[("pairwise", m)]["p50_ms"] / latency[("one_pass", m)]["p50_ms"] for m in MS}
    hybrid_row = next(r for r in rows_out if "[selected on val]" in r["method"]) if any(
        "[selected on val]" in r["method"] for r in rows_out) else None
    one50 = reports["one_pass rerank top-50"]
    pair50 = reports["pairwise rerank top-50"]
    checks = {
        "hybrid_beats_retrieval_ci_above_zero": bool(hybrid_row and hybrid_row["dNDCG@10_ci"][0] > 0),
        "one_pass_within_pairwise_ci_M50": bool(pair50.ci["NDCG@10"][0] <= one50.means["NDCG@10"]
                                                <= pair50.ci["NDCG@10"][1]),
        "one_pass_speedup_M50": round(speedup[50], 2),
        "one_pass_at_least_4x_faster_M50": bool(speedup[50] >= 4.0),
    }
    meta = {
        "dataset": DEFAULT_DATA, "protocol": "LlamaRec leave-one-out, 5-core; full-catalogue metrics of the final "
        "top-10 (top-M reranked, then the rest of the retrieval list)",
        "retriever": retriever_name, "split": split.stats(), "threads": args.threads, "seed": args.seed,
        "scored_users": int(rows.size), "test_users": len(test["users"]),
        "scoring_shortcut": "users whose test item is outside the top 50 are not run through the cross-encoder; "
                            "their metrics are 0 under any order of the top-M, so every number is exact",
        "training": training, "blends": {str(m): blend_reports[m] for m in MS}, "blend_selected_M": chosen_m,
        "latency_users": int(sample.size), "latency": {f"{k[0]} M={k[1]}": v for k, v in latency.items()},
        "latency_other_threads": extra_latency, "load_average_during_latency": [load_before, load_after],
        "blend_latency_ms": blend_ms, "speedup_one_pass_vs_pairwise_p50": speedup, "acceptance": checks,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("\n## Reranking on ml-latest-small, test split (95% bootstrap intervals)\n")
    path = write_results("rerank_title", rows_out, meta, COLUMNS)
    print("\n" + markdown_table([{"check": k, "value": v} for k, v in checks.items()], ["check", "value"]))
    print(f"\nwrote {path} in {meta['seconds']:.0f} s")
    return {"rows": rows_out, "meta": meta, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--retriever", default="auto", help="auto (two-tower if available, else ALS), als, ...")
    parser.add_argument("--artifacts", default="artifacts/rerank", help="where trained rankers are kept")
    parser.add_argument("--retrain", action="store_true", help="train the rankers even if saved ones match")
    parser.add_argument("--max-steps", type=int, default=0, help="one-pass training steps (0: TrainerConfig's)")
    parser.add_argument("--pairwise-steps", type=int, default=60,
                        help="pairwise fine-tuning steps after the warm start from the one-pass weights")
    parser.add_argument("--pairwise-from-scratch", action="store_true",
                        help="train the pairwise model from the base model with the one-pass recipe (slow on CPU)")
    parser.add_argument("--latency-users", type=int, default=50, help="random test users timed per mode and M")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for scoring and latency (2 cores)")
    parser.add_argument("--train-threads", type=int, default=0,
                        help="torch threads for training (0: --threads); 1 is faster when another job holds a core")
    parser.add_argument("--extra-latency-threads", type=int, nargs="*", default=[1],
                        help="also time the modes at these thread counts (reported in meta)")
    parser.add_argument("--score-all-users", action="store_true", help="run every test user, not only hits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-users", type=int, default=0, help="smoke runs only: evaluate the first N users")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args)


if __name__ == "__main__":
    main()
