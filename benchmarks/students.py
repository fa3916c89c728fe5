"""Student fidelity benchmark: how close each saved student ranks to its teacher, on every test user.

    python -m benchmarks.students [--students student-2l student-2l-t6 ...] [--backends torch onnx-int8]
        [--M 50] [--users 0]

``benchmarks.rerank_speed`` times every configuration but measures quality on a 300-user sample, where the
teacher's own NDCG@10 interval is about +-0.015 wide: it cannot tell students apart. This benchmark
compares student variants (layers, candidate text, pruned feed-forward width, early-stopping rule) with
their teacher on the same lists, on all test users by default:

* **NDCG@10** of the final list (the retrieval top-M reranked by the ranker, the rest of the retrieval order
  kept: the ``benchmarks.rerank_title`` protocol) with a bootstrap interval;
* **dNDCG@10_vs_teacher**: the mean per-user difference from the teacher with a *paired* bootstrap
  interval (much narrower than either model's own interval);
* **spearman_vs_teacher**: the mean Spearman correlation of the student's and the teacher's scores over
  each scored user's top-M: fidelity, which distillation optimises and which is far less noisy than
  NDCG@10 on one held-out item per user.

Users whose target is outside the retrieval top-M score 0 under any order and are not run through the
rankers (exact for NDCG@10). Students are ``--artifacts`` sub-folders (``python -m ranking.distill``);
each must verify (:func:`ranking.student.verify_student`) and name the teacher as its teacher. About 2
minutes for four students and two backends on 2 cores. Writes ``benchmarks/results/students.json``.
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

TEACHER = "two_tower-one_pass"
STUDENTS = ("student-2l", "student-3l")
COLUMNS = ["method", "NDCG@10", "dNDCG@10_vs_teacher", "spearman_vs_teacher", "layers", "item_tokens",
           "ffn_width"]


def spearman_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman correlation of the rows of ``a`` and ``b`` (``(n, M)``); a row that is constant in
    either has no rank order and is left out (``nan`` when none is left)."""
    from scipy.stats import spearmanr

    values = [spearmanr(x, y).statistic for x, y in zip(a, b) if np.ptp(x) > 0 and np.ptp(y) > 0]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def shape(ranker: Any) -> dict[str, Any]:
    return {"layers": len(ranker.model.bert.encoder.layer), "item_tokens": ranker.config.text.item_tokens,
            "ffn_width": int(ranker.encoder_config["intermediate_size"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.train import load_dataset, prepare_split
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.data import stage_retriever
    from ranking.student import verify_student, weights_fingerprint

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    folder = Path(args.artifacts)
    split = prepare_split(load_dataset(DEFAULT_DATA, args.data_path))
    retriever = val_retriever("two_tower", split, folder, threads=args.threads)
    test = stage_lists(split, "test", stage_retriever("two_tower", split, "test", previous=retriever), args.M)
    n_users = len(test["users"])
    sample = np.sort(np.random.default_rng(args.seed).permutation(n_users)[: args.users or n_users])
    scored = sample[test["hit"][sample].any(axis=1)]
    history = split.history("test")

    def per_user_ndcg(scores: np.ndarray) -> Any:
        return evaluate_rankings(rerank_rows(test["ids"], scores, args.M)[sample],
                                 [test["relevant"][i] for i in sample], ks=(10,), n_items=len(split.items),
                                 users=test["users"][sample], seed=args.seed)

    retrieval = per_user_ndcg(np.tile(-np.arange(args.M, dtype=np.float32), (n_users, 1)))
    teacher = CrossEncoderRanker.load(folder / args.teacher)
    teacher.set_history(history)
    teacher_fingerprint = weights_fingerprint(teacher.model)
    teacher_scores = cross_scores(teacher, test, scored, args.M, not args.quiet, "teacher")
    reference = per_user_ndcg(teacher_scores)
    t_ndcg = reference.per_user["NDCG@10"]
    rows: list[dict[str, Any]] = [
        {"method": "retrieval only", "NDCG@10": round(retrieval.means["NDCG@10"], 6),
         "NDCG@10_ci": [round(v, 6) for v in retrieval.ci["NDCG@10"]]},
        {"method": f"{args.teacher} torch (teacher)", **shape(teacher), "NDCG@10": round(float(t_ndcg.mean()), 6),
         "NDCG@10_ci": [round(v, 6) for v in reference.ci["NDCG@10"]], "spearman_vs_teacher": 1.0},
    ]
    students: dict[str, Any] = {}
    for name in args.students:
        try:
            check = verify_student(folder / name)
        except ArtifactError as exc:
            log.warning("skipping %s: %s", name, exc)
            students[name] = {"skipped": str(exc)}
            continue
        student = CrossEncoderRanker.load(folder / name)
        if (check["teacher"] or {}).get("weights_fingerprint") != teacher_fingerprint:
            log.warning("skipping %s: it was distilled from other teacher weights than %s", name, args.teacher)
            students[name] = {"skipped": f"distilled from another teacher than {args.teacher}"}
            continue
        students[name] = {"teacher": check["teacher"].get("folder"), "quality": check["quality"],
                          "distill_select": (student.meta.get("distill_config") or {}).get("select", "ndcg")}
        student.set_history(history)
        for backend in args.backends:
            ranker = student if backend == "torch" else student.with_backend(
                backend, threads=args.threads, cache_dir=folder / "backend-cache" / f"students-{name}")
            scores = cross_scores(ranker, test, scored, args.M, not args.quiet, f"{name} {backend}")
            report = per_user_ndcg(scores)
            values = report.per_user["NDCG@10"]
            lo, hi = paired_bootstrap_ci(values, t_ndcg, seed=args.seed)
            rows.append({"method": f"{name} {backend}", **shape(student), "backend": backend,
                         "NDCG@10": round(float(values.mean()), 6),
                         "NDCG@10_ci": [round(v, 6) for v in report.ci["NDCG@10"]],
                         "dNDCG@10_vs_teacher": round(float(np.mean(values - t_ndcg)), 6),
                         "dNDCG@10_vs_teacher_ci": [round(lo, 6), round(hi, 6)],
                         "spearman_vs_teacher": round(spearman_rows(scores[scored, :args.M],
                                                                    teacher_scores[scored, :args.M]), 4)})
    meta = {"dataset": DEFAULT_DATA, "teacher": args.teacher, "M": args.M, "users": int(sample.size),
            "scored_users": int(scored.size), "students": students, "seed": args.seed, "threads": args.threads,
            "protocol": "LlamaRec leave-one-out; full-catalogue NDCG@10 of the final list (top-M reranked, the "
                        "rest of the two-tower retrieval order kept); paired bootstrap of per-user differences",
            "seconds": round(time.perf_counter() - started, 1)}
    print(f"\n## Students against their teacher, ml-latest-small test, M={args.M}, {sample.size} users "
          f"({scored.size} with the target in the top {args.M})\n")
    path = write_results(args.out, rows, meta, COLUMNS, out_dir=Path(args.results_dir))
    print(f"\nwrote {path} in {meta['seconds']:.0f} s")
    return {"rows": rows, "meta": meta, "path": path}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ml_benchmark_parser(__doc__, "students")
    parser.add_argument("--teacher", default=TEACHER, help="teacher folder name under --artifacts")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), help="student folder names")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx-int8"], help="backends per student")
    parser.add_argument("--M", type=int, default=50, help="reranked depth")
    parser.add_argument("--users", type=int, default=0, help="test users sampled (0: all)")
    args = parser.parse_args(argv)
    if args.M < 10:
        parser.error("--M must be >= 10 (NDCG@10 reads the top 10)")
    if args.users < 0:
        parser.error("--users must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
