"""``shortlist`` command line: a thin shell over the job functions.

    shortlist train      [--model hybrid|two_tower|covisit|als|bpr|popularity] [--dataset ml-latest-small] [--data-path DIR]
                         [--interactions FILE [--items FILE] [--user-col C --item-col C --time-col C ...]]
                         [--search-trials 4] [--search-budget 900]
    shortlist train-ranker [--steps 600] [--student-steps 200] [--artifacts artifacts]
    shortlist evaluate   [--artifacts artifacts] [--ranker auto|DIR]
    shortlist recommend  --user ID [--k 10] [--ranker auto|DIR]
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
        from data.datasets import FileColumns

        columns = FileColumns(user=args.user_col, item=args.item_col, time=args.time_col, rating=args.rating_col,
                              item_id=args.item_id_col, title=args.title_col, genres=args.genres_col,
                              text=tuple(args.text_col), duplicates=args.duplicates)
        config = TrainConfig(
            dataset=args.dataset, data_path=args.data_path, interactions=args.interactions, items=args.items,
            columns=columns, model=args.model, tune=not args.no_tune, search_trials=args.search_trials,
            search_budget_s=args.search_budget, search_workers=args.search_workers, artifacts=args.artifacts,
            seed=args.seed, threads=args.threads,
            index=IndexConfig(factory=args.index, search_params=args.search_params, threads=args.threads),
        )
    data = None
    if getattr(args, "events", None):  # issue 14: fold the service's event log into this training run
        from pipeline.event_log import fold_events

        data = fold_events(config.load_data(), args.events)
        print(f"Folded {data.meta['events']['events']} events from {args.events} "
              f"({data.meta['events']['dropped']} for unknown items dropped)")
    result = train(config, data=data)
    print("\n## Dataset after the protocol's filters\n")
    print(markdown_table([result.split_stats], ["users", "items", "interactions", "train", "val", "test"]))
    for name, tuning in result.tuning.items():
        if tuning.get("trials") and "best_config" in tuning:
            names = list(dict.fromkeys(k for t in tuning["trials"] for k in t if "@" not in k and k != "fit_s"))
            kind = "search" if name == "two_tower" else "grid"
            print(f"\n## {name}: validation {kind} ({len(tuning['trials'])} points, best {tuning['metric']} "
                  f"{tuning['best']:.4f}; a blank cell keeps the default)\n")
            print(markdown_table(tuning["trials"], [*names, "Recall@10", "NDCG@10", "Recall@50", "fit_s"]))
            for skipped in tuning.get("skipped", []):
                print(f"not tried: {skipped}")
    print("\n## Test metrics (95% bootstrap intervals)\n")
    rows = [result.report.row(config.model)]
    if result.candidates_report is not None:
        rows[0]["method"] = f"{config.model} (served: {result.served_source})"
        rows.append(result.candidates_report.row(f"{config.model} candidates (fusion for Recall@50)"))
    rows += [r.row(n) for n, r in result.baselines.items()]
    print(markdown_table(rows, METRIC_COLUMNS))
    if result.served_source is not None:
        print(f"\nThe list served without a reranker comes from: {result.served_source} (best validation "
              "NDCG@10 among the fusions and each component alone); a reranker reads the candidate fusion.")
    print(f"\nSaved {result.folder} in {result.seconds:.1f} s")
    return 0


def _train_ranker(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.report import markdown_table
    from pipeline.second_stage import DEMO_STUDENT, DEMO_TRAINER, SecondStageConfig, train_artifact_ranker

    trainer = dataclasses.replace(DEMO_TRAINER, max_steps=args.steps, threads=args.threads,
                                  eval_every=max(1, min(DEMO_TRAINER.eval_every, args.steps)))
    student = dataclasses.replace(DEMO_STUDENT, max_steps=args.student_steps, threads=args.threads,
                                  eval_every=max(1, min(DEMO_STUDENT.eval_every, args.student_steps)))
    config = SecondStageConfig(trainer=trainer, student_trainer=student, data_path=args.data_path, retrain=True,
                               events=args.events)
    if args.student_steps == 0:
        config = dataclasses.replace(config, student_layers=())
    result = train_artifact_ranker(args.artifacts, config)
    rows = []
    for name, part in (("teacher", result.teacher), ("student", result.student)):
        if not part:
            continue
        training, head = part.get("training") or {}, (part.get("hybrid_head") or {}).get("report", {})
        rows.append({"ranker": name, "steps": training.get("steps"), "best step": training.get("best_step"),
                     "lists/s": round(training.get("lists_per_s", 0.0), 1),
                     "val NDCG@10 alone": training.get("best_metric"),
                     "val NDCG@10 retrieval": training.get("retrieval_metric"),
                     "hybrid head M": head.get("m"), "hybrid head CV NDCG@10": head.get("cv_ndcg@10_blend"),
                     "head reads co-visitation": "covisit" in (head.get("weights") or {}),
                     "best head tried": _best_head(head), "served list val NDCG@10": head.get("served_ndcg@10"),
                     "hybrid head used": head.get("use_blend"), "folder": part["folder"]})
    print("\n## Second stage: item-token reranker (validation; alone: top-50 of the artifact's retriever)\n")
    print(markdown_table(rows, list(rows[0])))
    print("\nThe hybrid head is served only where it beat, in cross-validation on the validation users, the "
          "retrieval order it reranks\nand the retriever's own served list; else the recommender serves that list "
          "and skips the reranker.")
    if result.served:
        print(f"Served ranker (chosen on validation): {result.served['served']}: {result.served['reason']}")
    print(f"\nTrained in {result.seconds:.0f} s (a short demo budget; the benchmark's models train for an hour: "
          "python -m pipeline.second_stage)")
    return 0


def _best_head(report: dict) -> str:
    """``"M=50 +covisit: 0.0977"``: the head with the best cross-validated NDCG@10 among all those tried
    (each shortlist size, with and without co-visitation), used or not."""
    tried = report.get("by_m") or {}
    if not tried:
        return ""
    key = max(tried, key=lambda k: tried[k].get("cv_ndcg@10_blend", float("-inf")))
    m, _, extra = key.partition("+")
    return f"M={m}{' +' + extra if extra else ''}: {tried[key].get('cv_ndcg@10_blend', float('nan')):.4f}"


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_artifact_lists, evaluate_two_stage, resolve_ranker
    from pipeline.report import markdown_table

    if resolve_ranker(args.ranker, args.artifacts) is not None:
        out = evaluate_two_stage(args.artifacts, args.ranker, data_path=args.data_path, events=args.events)
        rows = [out["retrieval"].row("retrieval only"), out["two_stage"].row("two-stage (served)")]
        rows[1]["dNDCG@10"], rows[1]["dNDCG@10_ci"] = out["dNDCG@10"], list(out["dNDCG@10_ci"])
        print(f"## Retrieval against the served two-stage list (test split, same users; ranker {out['ranker']})\n")
        print(markdown_table(rows, ["method", "NDCG@10", "Recall@10", "MRR@10", "dNDCG@10"]))
        print(f"\npaths: {out['paths']}; hybrid head used: {out['blend_used']}")
        if args.json:
            print(json.dumps({"retrieval": rows[0], "two_stage": rows[1]}, indent=2))
        return 0
    out = evaluate_artifact_lists(args.artifacts, args.data_path, events=args.events)
    manifest = out["manifest"]
    rows = [out["served"].row(manifest["model"])]
    if out["candidates"] is not None:
        rows[0]["method"] = f"{manifest['model']} served (from {out['served_source']})"
        rows.append(out["candidates"].row(f"{manifest['model']} candidates (what a reranker reads)"))
    print(f"## {manifest['version']} on {manifest['data']['name']} (test split)\n")
    print(markdown_table(rows, METRIC_COLUMNS))
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from pipeline.artifacts import load_artifact
    from pipeline.evaluate import resolve_ranker
    from pipeline.report import markdown_table

    folder = resolve_ranker(args.ranker, args.artifacts)
    if folder is not None:
        return _recommend_two_stage(args, folder)
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


def _recommend_two_stage(args: argparse.Namespace, folder) -> int:
    from pipeline.recommender import Recommender
    from pipeline.recommender_config import RecommenderConfig
    from pipeline.report import markdown_table

    rec = Recommender.load(args.artifacts, folder, backend=args.backend,
                           config=RecommenderConfig(max_m=args.max_m, threads=args.threads))
    rec.warm_up()
    history = rec.history(args.user)
    ids, _ = rec.retriever.retrieve_history(history, args.k, exclude_seen=True) if history.size else \
        rec.retriever.popular_items(args.k)
    out = rec.recommend(args.user, k=args.k, budget_ms=args.budget_ms)
    rec.close()
    before = {int(i): r + 1 for r, i in enumerate(ids) if i != -1}
    titles = rec._title
    print(f"## User {args.user}: {history.size} events; the last 5: "
          + "; ".join(str(titles(int(i))) for i in history[-5:][::-1]) + "\n")
    print(f"### Retrieval order (first stage, top {args.k})\n")
    print(markdown_table([{"rank": r, "item_id": i, "title": titles(i)} for i, r in before.items()],
                         ["rank", "item_id", "title"]))
    rows = []
    for item in out.items:
        was = before.get(item.item_id)
        move = "new" if was is None else ("=" if was == item.rank else f"{was - item.rank:+d}")
        rows.append({"rank": item.rank, "move": move, "item_id": item.item_id, "title": item.title,
                     "score": item.score, "retrieval score": item.retrieval_score,
                     "reranker score": item.rerank_score if item.rerank_score is not None else ""})
    print(f"\n### Served list (path {out.path}, {out.reranked_m} candidates reranked"
          f"{', degraded: ' + str(out.degraded_reason) if out.degraded else ''})\n")
    print(markdown_table(rows, ["rank", "move", "item_id", "title", "score", "retrieval score", "reranker score"]))
    stages = {k: round(v, 2) for k, v in out.timings_ms.items()}
    print(f"\nper-stage latency (ms, budget {out.budget_ms:.0f}): {stages}")
    if not rec.rerank_pays:
        print("the hybrid head did not beat the retrieval order on validation, so the reranker is skipped and the "
              "retrieval order is served")
    return 0


def _candidates(args: argparse.Namespace) -> int:
    from pipeline.artifacts import load_artifact
    from pipeline.batch import generate_candidates

    if args.engine == "ray":  # ---- issue #15: Ray Data engine (pipeline/ray_batch.py) ----
        from pipeline.ray_batch import generate_candidates_ray

        stats = generate_candidates_ray(args.artifacts, args.out, k=args.k, users=args.users,
                                        batch_size=args.batch_size, ranker=args.rerank, rerank_m=args.rerank_m,
                                        blend=args.blend, workers=args.workers, threads=args.threads or 1)
        print(f"Wrote {stats.rows:,} candidates for {stats.users:,} users to {stats.path}/ (Parquet dataset) in "
              f"{stats.seconds:.2f} s with {args.workers} Ray workers ({stats.users_per_second:,.0f} users/s)")
        return 0
    artifact = load_artifact(args.artifacts)
    ranker = blend = None
    if args.rerank:
        from ranking.loading import load_ranker

        ranker = load_ranker(args.rerank, load_tokenizer=False)
        import torch

        torch.set_num_threads(args.threads or 2)
        if args.blend:
            from ranking.blend import HybridBlend

            blend = HybridBlend.load(args.blend)
    users = None
    if args.users:  # issue #15: --users for both engines
        from pipeline.batch import read_users

        users = read_users(args.users)
    stats = generate_candidates(artifact.retriever, args.out, k=args.k, batch_size=args.batch_size, ranker=ranker,
                                rerank_m=args.rerank_m, blend=blend, users=users)
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

    from retrieval.registry import SPECS

    p = sub.add_parser("train", help="tune, fit, evaluate and save a retriever")
    p.add_argument("--model", default="hybrid", choices=list(SPECS),
                   help="retriever to train: " + "; ".join(f"{n}: {s.description}" for n, s in SPECS.items()))
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens name (default: ml-latest-small)")
    p.add_argument("--data-path", default=None, help="folder with the dataset files (else SHORTLIST_DATA_DIR)")
    p.add_argument("--interactions", default=None, metavar="FILE",
                   help="your own events (.csv, .tsv, .parquet) instead of MovieLens; see the column flags")
    p.add_argument("--items", default=None, metavar="FILE", help="your own item table for --interactions")
    p.add_argument("--user-col", default="user_id", help="--interactions: user id column (default: user_id)")
    p.add_argument("--item-col", default="item_id", help="--interactions: item id column (default: item_id)")
    p.add_argument("--time-col", default="timestamp",
                   help="--interactions: event time column (default: timestamp; '' = row order)")
    p.add_argument("--rating-col", default="", help="--interactions: optional rating column")
    p.add_argument("--item-id-col", default="", help="--items: item id column (default: --item-col)")
    p.add_argument("--title-col", default="", help="--items: title column (default: 'title' if present)")
    p.add_argument("--genres-col", default="", help="--items: optional |-joined genres column")
    p.add_argument("--text-col", action="append", default=[], metavar="C",
                   help="--items: a column describing the item (repeat for several)")
    p.add_argument("--duplicates", default="keep_last", choices=["keep_last", "keep_first", "keep_all"],
                   help="repeated (user, item) events (default: keep_last)")
    p.add_argument("--no-tune", action="store_true", help="skip the validation searches")
    p.add_argument("--search-trials", type=int, default=4,
                   help="two-tower configs tried on validation (default 4: the default, the full softmax, "
                        "2 seeded random points)")
    p.add_argument("--search-budget", type=float, default=900.0,
                   help="seconds: the two-tower search starts no trial likely to end past it (default 900)")
    p.add_argument("--search-workers", type=int, default=2,
                   help="processes the two-tower search trains in, one thread each (default 2)")
    p.add_argument("--index", default="Flat", help="FAISS factory string (Flat, HNSW32, IVF256,Flat)")
    p.add_argument("--search-params", default="", help="FAISS search parameters (efSearch=128, nprobe=16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=None, help="a TrainConfig JSON file (overrides the flags)")
    p.add_argument("--events", default=None, metavar="FILE",  # issue 14
                   help="fold the event log `shortlist serve --event-log FILE` wrote into the training data")
    artifacts_arg(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("train-ranker", help="train the second stage (item-token reranker + student) for an artifact")
    p.add_argument("--steps", type=int, default=600, help="teacher training steps (default: a 3-minute demo run)")
    p.add_argument("--student-steps", type=int, default=200, help="distillation steps (0: no student)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--events", default=None, metavar="FILE",
                   help="an artifact trained with `train --events`: its event log, if it moved (default: the "
                        "path its manifest records)")
    p.add_argument("--threads", type=int, default=2)
    artifacts_arg(p)
    p.set_defaults(func=_train_ranker)

    p = sub.add_parser("evaluate", help="re-score the saved artifact on the test split")
    p.add_argument("--data-path", default=None)
    p.add_argument("--events", default=None, metavar="FILE",
                   help="an artifact trained with `train --events`: its event log, if it moved (default: the "
                        "path its manifest records)")
    p.add_argument("--ranker", default=None, metavar="auto|DIR",
                   help="also score the served two-stage list with this ranker (auto: train-ranker's student)")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    artifacts_arg(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("recommend", help="top-k items for one user, with titles")
    p.add_argument("--user", type=int, required=True, help="external user id (unknown ids get popular items)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ranker", default=None, metavar="auto|DIR",
                   help="rerank with this ranker and show the list before and after (auto: train-ranker's student)")
    p.add_argument("--backend", default="torch", help="the ranker's backend (torch, torch-int8)")
    p.add_argument("--budget-ms", type=float, default=50.0)
    p.add_argument("--max-m", type=int, default=100,
                   help="most candidates reranked (a hybrid head caps it at the depth chosen on validation)")
    p.add_argument("--threads", type=int, default=1, help="serving threads")
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while reranking (default 2; with --engine ray: per worker, default 1)")
    # ---- issue #15: the Ray Data engine (pipeline/ray_batch.py) ----
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray Data actors, --out becomes a Parquet folder")
    p.add_argument("--workers", type=int, default=2, help="Ray actors (--engine ray; default: 2)")
    p.add_argument("--users", default=None, help="a Parquet file whose user_id column lists the users (default: all)")
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
