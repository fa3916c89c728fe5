"""Which signals add anything to the retrieval order? The hybrid blend fitted with each candidate signal.

    python -m benchmarks.blend_signals [--rankers two_tower-one_pass exp-residual ...] [--M 20 50]

The reranker's acceptance asks the hybrid blend (:class:`ranking.blend.HybridBlend`: a signal, the retrieval
score and the log rank, fitted on validation) to beat the retrieval order on test with the paired bootstrap
interval of the difference above zero. This benchmark puts different signals into the blend's ``ce`` slot
and measures each the same way, on all 610 test users of ml-latest-small (two-tower candidates):

* every saved ranker folder given with ``--rankers`` (under ``--artifacts``; the cross-encoder score). A
  ranker trained with the residual objective (``TrainerConfig.objective="residual"``) also gets a row for
  its own score, ``base offset + cross-encoder``, without refitting;
* cheap text signals from the bundled MiniLM's sentence embeddings of each item's text, which a
  cross-encoder reading titles should be able to learn at least as well: the candidate's highest cosine
  similarity to the last 1, 5 and 20 history items.

Per signal and M: the validation cross-validation gain of the blend over the retrieval order (the guard the
recommender uses), and on test the blend's NDCG@10 with the paired interval of its difference from
retrieval, both **forced** (the fitted weights applied even when the guard would refuse them: what the
signal can do) and as the guard would serve it. ``meta.detectable_gain`` is the half-width of the widest
paired interval: a signal needs about that much gain before any interval can clear zero.

Rankers that are not there are skipped with a message; text signals need no artifacts. About 1 minute for
the text signals and ~2 minutes per 6-layer ranker on 2 cores. Writes ``benchmarks/results/blend_signals.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, ml_benchmark_parser, write_results
from benchmarks.rerank_title import cross_scores, rerank_rows, stage_lists, val_retriever
from data.errors import ArtifactError
from data.metrics import evaluate_rankings, paired_bootstrap_ci

log = logging.getLogger(__name__)

TEXT_SIGNALS = {"text max-cosine, last 1": 1, "text max-cosine, last 5": 5, "text max-cosine, last 20": 20}
COLUMNS = ["method", "M", "val_cv_gain", "NDCG@10", "dNDCG@10", "served_dNDCG@10"]


def text_similarity(embeddings: np.ndarray, histories: list[np.ndarray], user_rows: np.ndarray,
                    candidates: np.ndarray, last: int) -> np.ndarray:
    """``(n, M)``: each candidate's highest cosine similarity to the user's ``last`` history items
    (``embeddings`` L2-normalised rows; ``-inf`` for padding or an empty history)."""
    out = np.full(candidates.shape, -np.inf)
    for i, u in enumerate(user_rows):
        history = histories[int(u)][-last:]
        valid = candidates[i] >= 0
        if history.size and valid.any():
            out[i, valid] = (embeddings[candidates[i, valid]] @ embeddings[history].T).max(axis=1)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.train import load_dataset, prepare_split
    from ranking.blend import HybridBlend
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.data import stage_retriever, user_sequences
    from ranking.residual import base_offsets, residual_base
    from retrieval.item_features import default_cache_dir, encode_texts, item_rows_table

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    folder = Path(args.artifacts)
    raw = load_dataset(DEFAULT_DATA, args.data_path)
    split = prepare_split(raw)
    depth = max(args.M)
    retriever = val_retriever("two_tower", split, folder, threads=args.threads)
    stages = {"val": stage_lists(split, "val", retriever, depth),
              "test": stage_lists(split, "test", stage_retriever("two_tower", split, "test", previous=retriever),
                                  depth)}
    for stage, lists in stages.items():
        lists["rows"] = split.items.rows(lists["ids"].ravel(), missing="ignore").reshape(lists["ids"].shape)
        lists["user_rows"] = split.users.rows(lists["users"])
        lists["histories"] = user_sequences(split.history(stage), split.users, split.items)
        lists["scored"] = np.flatnonzero(lists["hit"].any(axis=1))

    signals: dict[str, dict[str, np.ndarray]] = {}  # name -> stage -> (n, depth) scores
    residual_bases: dict[str, tuple[Any, np.ndarray]] = {}  # residual rankers: (base blend, test scores)
    skipped: dict[str, str] = {}
    embeddings = encode_texts(item_rows_table(raw.items, split.items)["text"].tolist(), "bundled-minilm",
                              cache_dir=default_cache_dir(), progress=not args.quiet)
    for name, last in TEXT_SIGNALS.items():
        signals[name] = {stage: text_similarity(embeddings, lists["histories"], lists["user_rows"], lists["rows"],
                                                last) for stage, lists in stages.items()}
    for name in args.rankers:
        try:
            ranker = CrossEncoderRanker.load(folder / name)
        except ArtifactError as exc:
            log.warning("skipping ranker %s: %s", name, exc)
            skipped[name] = str(exc)
            continue
        key = f"cross-encoder {name}"
        signals[key] = {}
        for stage, lists in stages.items():
            ranker.set_history(split.history(stage))
            signals[key][stage] = cross_scores(ranker, lists, lists["scored"], depth, not args.quiet,
                                               f"{name} {stage}")
        base = residual_base(ranker)
        if base is not None:
            residual_bases[f"residual {name}: base + cross-encoder"] = (base, signals[key]["test"])

    test = stages["test"]
    n_items = len(split.items)

    def report(scores: np.ndarray, m: int) -> Any:
        ranked = rerank_rows(test["ids"], scores, m)
        return evaluate_rankings(ranked, test["relevant"], ks=(10,), n_items=n_items, users=test["users"],
                                 seed=args.seed)

    retrieval = report(np.tile(-np.arange(depth, dtype=np.float64), (len(test["users"]), 1)), depth)
    base_ndcg = retrieval.per_user["NDCG@10"]

    def difference(values: np.ndarray) -> tuple[float, list[float]]:
        lo, hi = paired_bootstrap_ci(values, base_ndcg, seed=args.seed)
        return round(float(np.mean(values - base_ndcg)), 6), [round(lo, 6), round(hi, 6)]

    rows: list[dict[str, Any]] = [{"method": "retrieval only (two-tower)", "M": "-",
                                   "NDCG@10": round(retrieval.means["NDCG@10"], 6),
                                   "NDCG@10_ci": [round(v, 6) for v in retrieval.ci["NDCG@10"]]}]
    blends: dict[str, dict[str, Any]] = {}
    val = stages["val"]
    for name, by_stage in signals.items():
        for m in args.M:
            inside = np.flatnonzero(val["hit"][:, :m].any(axis=1))
            target_col = val["hit"][inside, :m].argmax(axis=1)
            blend = HybridBlend().fit(by_stage["val"][inside, :m], val["scores"][inside, :m], target_col,
                                      n_users=len(val["users"]))
            X, valid, _ = blend.features(by_stage["test"][:, :m], test["scores"][:, :m])
            forced = np.full(test["ids"].shape, -np.inf)
            forced[:, :m] = np.where(valid, X @ blend.weights, -np.inf)
            unscored = ~np.isfinite(by_stage["test"][:, 0])
            forced[unscored, :m] = -np.arange(m)  # no signal: keep the retrieval order
            served = forced if blend.use_blend else np.tile(-np.arange(depth, dtype=np.float64),
                                                            (len(test["users"]), 1))
            forced_report, served_report = report(forced, m), report(served, m)
            d, d_ci = difference(forced_report.per_user["NDCG@10"])
            sd, sd_ci = difference(served_report.per_user["NDCG@10"])
            gain = blend.report["cv_ndcg@10_blend"] - blend.report["cv_ndcg@10_retrieval"]
            rows.append({"method": f"{name} + retrieval blend", "M": m, "val_cv_gain": round(gain, 6),
                         "use_blend": blend.use_blend, "NDCG@10": round(forced_report.means["NDCG@10"], 6),
                         "NDCG@10_ci": [round(v, 6) for v in forced_report.ci["NDCG@10"]],
                         "dNDCG@10": d, "dNDCG@10_ci": d_ci, "served_dNDCG@10": sd, "served_dNDCG@10_ci": sd_ci})
            blends[f"{name} M={m}"] = blend.report
    for name, (base, ce) in residual_bases.items():
        for m in args.M:  # the base z-scores the retrieval score over the reranked top-M, as in training
            scores = np.full(test["ids"].shape, -np.inf)
            scores[:, :m] = base_offsets(base, test["scores"][:, :m]) + np.where(np.isfinite(ce[:, :m]),
                                                                                 ce[:, :m], 0.0)
            r = report(scores, m)
            d, d_ci = difference(r.per_user["NDCG@10"])
            rows.append({"method": name, "M": m, "NDCG@10": round(r.means["NDCG@10"], 6),
                         "NDCG@10_ci": [round(v, 6) for v in r.ci["NDCG@10"]], "dNDCG@10": d, "dNDCG@10_ci": d_ci})
    widths = [(r["dNDCG@10_ci"][1] - r["dNDCG@10_ci"][0]) / 2 for r in rows if "dNDCG@10_ci" in r]
    meta = {"dataset": DEFAULT_DATA, "retriever": "two_tower", "M": list(args.M), "test_users": len(test["users"]),
            "val_lists_with_target": {str(m): int(val["hit"][:, :m].any(axis=1).sum()) for m in args.M},
            "detectable_gain": round(max(widths), 6) if widths else None, "blends": blends,
            "skipped_rankers": skipped, "seed": args.seed, "threads": args.threads,
            "protocol": "LlamaRec leave-one-out; blend fitted on validation lists holding the target (5-fold CV "
                        "for the guard); test NDCG@10 of the final list, paired bootstrap vs retrieval",
            "seconds": round(time.perf_counter() - started, 1)}
    print(f"\n## Signals in the hybrid blend, ml-latest-small test, {len(test['users'])} users\n")
    path = write_results(args.out, rows, meta, COLUMNS, out_dir=Path(args.results_dir))
    print(f"\ndetectable gain (widest paired half-interval): {meta['detectable_gain']}")
    print(f"wrote {path} in {meta['seconds']:.0f} s")
    return {"rows": rows, "meta": meta, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = ml_benchmark_parser(__doc__, "blend_signals")
    parser.add_argument("--rankers", nargs="*", default=["two_tower-one_pass"],
                        help="ranker folders under --artifacts whose scores are tried in the blend")
    parser.add_argument("--M", type=int, nargs="+", default=[20, 50], help="reranked depths")
    args = parser.parse_args(argv)
    if min(args.M) < 10:
        parser.error("--M must be >= 10 (NDCG@10 reads the top 10)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args)


if __name__ == "__main__":
    main()
