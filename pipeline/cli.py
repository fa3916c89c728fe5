"""``shortlist`` command line: a thin shell over the job functions.

    shortlist train      [--model hybrid|two_tower|als|bpr|popularity] [--dataset ml-latest-small] [--data-path DIR]
    shortlist evaluate   [--artifacts artifacts]
    shortlist recommend  --user ID [--k 10]
    shortlist candidates --out FILE.parquet [--k 100] [--rerank RANKER_DIR [--rerank-m 50] [--blend FILE]]
    shortlist embeddings --out DIR
    shortlist serve      [--artifacts artifacts] [--ranker DIR] [--host 127.0.0.1] [--port 8000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from data.errors import ShortlistError

METRIC_COLUMNS = ["method", "Recall@10", "Recall@50", "Recall@200", "NDCG@10", "MRR@10", "Coverage@10"]


def _train(args: argparse.Namespace) -> int:
    from pipeline.config import TrainConfig
    from pipeline.report import markdown_table
    from pipeline.train import train
    from retrieval.index import IndexConfig

    if args.config:
        config = TrainConfig.load(args.config)
    else:
        config = TrainConfig(
            dataset=args.dataset, data_path=args.data_path, model=args.model, tune=not args.no_tune,
            artifacts=args.artifacts, seed=args.seed, threads=args.threads,
            index=IndexConfig(factory=args.index, search_params=args.search_params, threads=args.threads),
        )
    result = train(config)
    print("\n## Dataset after the protocol's filters\n")
    print(markdown_table([result.split_stats], ["users", "items", "interactions", "train", "val", "test"]))
    for name, tuning in result.tuning.items():
        if tuning.get("trials") and "best_config" in tuning:
            names = [k for k in tuning["trials"][0] if "@" not in k]
            print(f"\n## {name}: validation grid ({len(tuning['trials'])} points, best {tuning['metric']} "
                  f"{tuning['best']:.4f})\n")
            print(markdown_table(tuning["trials"], [*names, "Recall@10", "NDCG@10", "Recall@50"]))
    print("\n## Test metrics (95% bootstrap intervals)\n")
    rows = [result.report.row(config.model)] + [r.row(n) for n, r in result.baselines.items()]
    print(markdown_table(rows, METRIC_COLUMNS))
    print(f"\nSaved {result.folder} in {result.seconds:.1f} s")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_artifact
    from pipeline.report import markdown_table

    report, manifest = evaluate_artifact(args.artifacts, args.data_path)
    print(f"## {manifest['version']} on {manifest['data']['name']} (test split)\n")
    print(markdown_table([report.row(manifest["model"])], METRIC_COLUMNS))
    if args.json:
        print(json.dumps(report.row(manifest["model"]), indent=2))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from pipeline.artifacts import load_artifact
    from pipeline.report import markdown_table

    artifact = load_artifact(args.artifacts)
    retriever = artifact.retriever
    known = args.user in retriever.users
    ids, scores = retriever.retrieve(args.user, args.k)
    keep = ids != -1
    rows = [
        {"rank": r + 1, "item_id": int(i), "score": float(s), "title": t,
         "genres": str(artifact.items["genres"].get(int(i), "")).replace("|", ", ") if "genres" in artifact.items
         else ""}
        for r, (i, s, t) in enumerate(zip(ids[keep], scores[keep], artifact.titles(ids[keep])))
    ]
    how = "personalised" if known else "unknown user: cold-start popularity fallback"
    print(f"## Top {args.k} for user {args.user} ({how}, model {artifact.manifest['model']})\n")
    print(markdown_table(rows, ["rank", "item_id", "score", "title", "genres"]))
    return 0


def _candidates(args: argparse.Namespace) -> int:
    from pipeline.artifacts import load_artifact
    from pipeline.batch import generate_candidates

    artifact = load_artifact(args.artifacts)
    ranker = blend = None
    if args.rerank:
        from ranking.cross_encoder import CrossEncoderRanker

        ranker = CrossEncoderRanker.load(args.rerank, load_tokenizer=False)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.blend:
            from ranking.blend import HybridBlend

            blend = HybridBlend.load(args.blend)
    stats = generate_candidates(artifact.retriever, args.out, k=args.k, batch_size=args.batch_size, ranker=ranker,
                                rerank_m=args.rerank_m, blend=blend)
    how = f", top {stats.reranked_m} reranked" if stats.reranked_m else ""
    print(f"Wrote {stats.rows:,} candidates for {stats.users:,} users to {stats.path} in {stats.seconds:.2f} s "
          f"({stats.users_per_second:,.0f} users/s{how})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.serve import run

    return run(args)


def _embeddings(args: argparse.Namespace) -> int:
    from pipeline.artifacts import load_artifact
    from pipeline.batch import export_embeddings

    for path in export_embeddings(load_artifact(args.artifacts).retriever, args.out):
        print(f"Wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortlist", description="Two-stage recommender: retrieval + rerank")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def artifacts_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--artifacts", default="artifacts",
                       help="artifact root (uses its LATEST version) or a version folder (default: artifacts)")

    p = sub.add_parser("train", help="tune, fit, evaluate and save a retriever")
    p.add_argument("--model", default="hybrid", choices=["hybrid", "two_tower", "als", "bpr", "popularity"],
                   help="retriever to train (default: hybrid = two-tower + ALS + popularity)")
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens name (default: ml-latest-small)")
    p.add_argument("--data-path", default=None, help="folder with the dataset files (else SHORTLIST_DATA_DIR)")
    p.add_argument("--no-tune", action="store_true", help="skip the validation grid search")
    p.add_argument("--index", default="Flat", help="FAISS factory string (Flat, HNSW32, IVF256,Flat)")
    p.add_argument("--search-params", default="", help="FAISS search parameters (efSearch=128, nprobe=16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=None, help="a TrainConfig JSON file (overrides the flags)")
    artifacts_arg(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="re-score the saved artifact on the test split")
    p.add_argument("--data-path", default=None)
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    artifacts_arg(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("recommend", help="top-k items for one user, with titles")
    p.add_argument("--user", type=int, required=True, help="external user id (unknown ids get popular items)")
    p.add_argument("--k", type=int, default=10)
    artifacts_arg(p)
    p.set_defaults(func=_recommend)

    p = sub.add_parser("candidates", help="batch top-N candidates for all users to Parquet")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--rerank", default=None, metavar="RANKER_DIR",
                   help="rerank each user's top --rerank-m with this saved cross-encoder")
    p.add_argument("--rerank-m", type=int, default=50, help="candidates reranked per user (default: 50)")
    p.add_argument("--blend", default=None, help="a HybridBlend JSON file for the reranked order")
    p.add_argument("--threads", type=int, default=2, help="torch threads while reranking")
    artifacts_arg(p)
    p.set_defaults(func=_candidates)

    p = sub.add_parser("embeddings", help="export user and item embeddings to Parquet")
    p.add_argument("--out", required=True, help="output folder (items.parquet, users.parquet)")
    artifacts_arg(p)
    p.set_defaults(func=_embeddings)

    from pipeline.serve import add_arguments

    p = sub.add_parser("serve", help="serve /recommend, /rerank, /events over HTTP (the [serve] extra)")
    add_arguments(p)
    p.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ShortlistError as exc:
        print(f"shortlist {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
