"""Reranking benchmark: does the second stage beat retrieval alone? Both protocols, the same cases, one run.

    python -m benchmarks.rerank [--protocols leave_one_out last_n] [--artifacts artifacts/rerank]
                                [--serve-backend torch] [--latency-cases 200] [--threads 2]

For each protocol (LlamaRec's leave-one-out, the headline, and ``last-n`` with n=5: each user's last 5
events, each scored from its own prefix, about 3,050 cases) it loads from ``ARTIFACTS/<protocol>/`` the
candidate retriever (two-tower), the item-token teacher and its distilled student
(``python -m pipeline.second_stage`` writes them; when missing they are trained here with that module's
defaults, which takes far longer than this benchmark's 20 minutes), and reports, on the test cases:

* ``retrieval only``: the two-tower's order (the candidates every ranker reorders);
* ``retrieval: default hybrid``: the list the default retriever serves without a reranker, built around
  the same two-tower (:func:`benchmarks.hybrid_protocols.default_hybrid`: co-visitation, ALS and
  popularity fitted on the validation history, both fusions tuned on validation), the strongest list the
  first stage offers; the acceptance checks pair the served two-stage list against it too;
* ``<ranker> alone top-M`` for M in {20, 50, 100}: the top M reordered by the ranker's score alone;
* ``<ranker> + hybrid head top-M``: the ranker's score blended with the retrieval score and rank by the
  head fitted on validation, at the shortlist size M that validation chose for it among {20, 50, 100}
  (a head that beat the retrieval order at no M is marked "lost on validation": retrieval order);
* ``two-stage (served)``: what :meth:`pipeline.recommender.Recommender.recommend` returns for each case's
  history with the served ranker on ``--serve-backend`` (the teacher or the student, as the second stage
  chose on validation in ``served.json``; its hybrid head at its M, filtering and fallback rules included),
  with a generous budget so no case degrades for lack of time (the degraded count is reported);

with NDCG@10, Recall@10 and MRR@10 (full catalogue, the case's history masked), their 95% bootstrap
intervals, and ``dNDCG@10`` against retrieval with its paired interval (``dNDCG@10_ci``). Under ``last-n``
the intervals resample users, not cases, since one user's cases are not independent. Rankers are the
teacher and the student, each on fp32 and int8 (``torch-int8``: dynamic int8 linears), plus any title
cross-encoder folder given with ``--title``; each ranker's validation NDCG@10 alone at M=50
(``val_NDCG@10``, what picks the default variant) is reported beside its test row. Latency (p50/p99 ms per
request at M=50, candidate ids to sorted scores, inputs included, history cache cold) is measured on
``--latency-cases`` random test cases at ``--threads`` threads (``meta.latency_M100`` at M=100), and for
the served row end to end (retrieval, filter, rerank, blend) under ``--budget-ms``. The acceptance checks
(``meta.protocols.<protocol>.acceptance``) include the run's power (the served gain's standard error and
the true gain it would show with 80% probability) and the student's share of the teacher's gain (both with
their hybrid heads, on ``--serve-backend``). LlamaRec's paper rows are listed for reference (leave-one-out
only). Writes ``benchmarks/results/rerank.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, latency_ms, ml_benchmark_parser, write_results
from data.metrics import paired_bootstrap_ci
from pipeline.report import markdown_table
from ranking.blend import HybridBlend

log = logging.getLogger(__name__)

MS = (20, 50, 100)
#: Scoring backends every ranker is measured on (row label).
BACKENDS = {"torch": "fp32", "torch-int8": "int8"}
SERVED_M = 50
#: The served head's ablation: retrieval score, rank and co-visitation, no cross-encoder (:func:`covisit_only_head`).
ABLATION = "no reranker: retrieval + co-visitation head"
#: The default retriever's own served list (no reranker), built around the candidate two-tower.
HYBRID_ROW = "retrieval: default hybrid (two-tower + co-visitation + ALS + popularity)"
PAPER_ROWS = [
    {"protocol": "leave_one_out", "method": "LRURec (paper figure)", "NDCG@10": 0.0705, "Recall@10": 0.1426,
     "MRR@10": 0.0491, "source": "LlamaRec paper, Table 1 (ml-latest-small)"},
    {"protocol": "leave_one_out", "method": "LlamaRec, Llama-2-7B reranking top-20 (paper figure)",
     "NDCG@10": 0.0759, "Recall@10": 0.1524, "MRR@10": 0.0529, "source": "LlamaRec paper, Table 1"},
]
COLUMNS = ["protocol", "method", "M", "NDCG@10", "Recall@10", "MRR@10", "dNDCG@10", "val_NDCG@10", "p50_ms",
           "p99_ms"]
#: What the served ranker must meet at M=50, and the share of the teacher's gain the student must keep.
TARGET_P50_MS, TARGET_P99_MS, TARGET_GAIN_KEPT, LLAMAREC_NDCG = 15.0, 25.0, 0.8, 0.0759


def rerank_rows(ranked: np.ndarray, scores: np.ndarray, m: int) -> np.ndarray:
    """The retrieval lists with their first ``m`` columns reordered by ``scores`` (stable on ties; ``-inf``
    scores, i.e. padding, last)."""
    out = ranked.copy()
    order = np.argsort(-scores[:, :m], axis=1, kind="stable")
    out[:, :m] = np.take_along_axis(ranked[:, :m], order, axis=1)
    return out


def load_stage(protocol: str, raw: Any, folder: Path, threads: int) -> dict[str, Any]:
    """The split, the candidate retriever, the teacher and the student of ``protocol`` (trained when missing
    or stale, through :func:`pipeline.second_stage.train_second_stage`)."""
    from pipeline.second_stage import (
        RETRIEVER_DIR,
        SERVED_FILE,
        STUDENT_DIR,
        TEACHER_DIR,
        SecondStageConfig,
        learned_from,
        served_ranker,
        train_second_stage,
    )
    from pipeline.stages import candidate_retriever, protocol_split
    from ranking.item_ranker import ItemTokenRanker

    split = protocol_split(raw, protocol)
    root = folder / protocol
    retriever = candidate_retriever(split, "two_tower", root / RETRIEVER_DIR, threads=threads)
    fingerprint = split.history("val").fingerprint()

    def fresh(path: Path) -> Any:
        if not (path / "manifest.json").is_file():
            return None
        ranker = ItemTokenRanker.load(path)
        same = ranker.meta.get("history_fingerprint") == fingerprint and learned_from(ranker, retriever, path)
        return ranker if same else None

    teacher, student = fresh(root / TEACHER_DIR), fresh(root / STUDENT_DIR)
    if teacher is None or student is None:
        log.warning("%s: no matching saved teacher/student under %s; training them now with the defaults of "
                    "pipeline.second_stage (slow: see its docstring)", protocol, root)
        train_second_stage(SecondStageConfig(protocol=protocol, out=str(folder)), raw=raw)
        teacher, student = fresh(root / TEACHER_DIR), fresh(root / STUDENT_DIR)
    served = served_ranker(root)
    choice = json.loads((root / SERVED_FILE).read_text()) if (root / SERVED_FILE).is_file() else {}
    return {"split": split, "retriever": retriever, "teacher": teacher, "student": student,
            "served": "teacher" if served is not None and served.name == TEACHER_DIR else "student",
            "served_choice": choice}


def head_scores(ranker: Any, model_scores: np.ndarray, retrieval: np.ndarray, m: int, histories: list[np.ndarray],
                candidates: np.ndarray) -> np.ndarray | None:
    """``(n, m)`` hybrid-head scores of the top ``m`` (``None`` when the ranker has no head)."""
    from ranking.blend import extra_features

    if not getattr(ranker, "hybrid_head", None):
        return None
    blend = HybridBlend.from_dict(ranker.hybrid_head)
    extra = extra_features(blend, ranker, histories, candidates[:, :m])
    return blend.score(model_scores[:, :m], retrieval[:, :m].astype(np.float64), extra=extra)


def covisit_only_head(ranker: Any, retriever: Any, split: Any) -> tuple[Any, int] | None:
    """The ablation of the served head without the cross-encoder: a head over the retrieval score, log rank
    and the ranker's co-visitation score only, fitted and its M chosen on validation by the same rule as
    :func:`ranking.item_trainer.fit_hybrid_head` (the cross-encoder column is held at 0, which z-scores to
    0, so it carries nothing). ``(blend, M)``, or ``None`` when the ranker has no co-visitation counts or
    no such head beats the retrieval order on validation. The retriever must hold ``split.history("val")``."""
    from ranking.config import BlendConfig
    from ranking.item_trainer import validation_set

    if getattr(ranker, "covisit", None) is None:
        return None
    lists, retrieval = validation_set(retriever, split, ranker.items, max(MS))
    histories = [ranker.items.external(h) for h in lists.histories]
    ids = np.where(lists.candidates >= 0, ranker.items.ids[np.maximum(lists.candidates, 0)], -1)
    covisit = ranker.covisit.score_lists(histories, ids)
    config = BlendConfig(features=("ce", "retrieval", "log_rank", "covisit"))
    best = None
    for m in MS:
        inside = np.flatnonzero(lists.target_col < m)
        blank = np.where(np.isfinite(retrieval[inside, :m]), 0.0, -np.inf)
        blend = HybridBlend(config).fit(blank, retrieval[inside, :m], lists.target_col[inside],
                                        n_users=lists.n_users, extra={"covisit": covisit[inside, :m]})
        gain = blend.report["cv_ndcg@10_blend"] - blend.report["cv_ndcg@10_retrieval"]
        if blend.use_blend and (best is None or gain > best[2]):
            best = (blend, m, gain)
    return None if best is None else best[:2]


def validation_ndcg(rankers: dict[str, Any], retriever: Any, split: Any, m: int) -> dict[str, float]:
    """Validation NDCG@10 of each ranker alone reranking the retriever's top ``m`` (every validation user
    counted), and of the retrieval order: what chooses the default variant. The retriever must hold
    ``split.history("val")``."""
    from ranking.data import reranked_ndcg
    from ranking.item_trainer import validation_set

    items = next(iter(rankers.values())).items
    lists, _ = validation_set(retriever, split, items, m)
    histories = [items.ids[h] for h in lists.histories]
    candidates = np.where(lists.candidates >= 0, items.ids[np.maximum(lists.candidates, 0)], -1)
    out = {"retrieval order": lists.retrieval_ndcg}
    for name, ranker in rankers.items():
        out[name] = reranked_ndcg(ranker.score_lists(histories, candidates), lists.target_col, lists.n_users)
    return {k: round(float(v), 6) for k, v in out.items()}


def served_lists(recommender: Any, cases: Any, k: int, budget_ms: float, progress: bool) -> tuple[np.ndarray, dict]:
    """``(n, k)`` item ids the recommender returns for each case's history, and what it did."""
    from tqdm.auto import tqdm

    out = np.full((len(cases), k), -1, dtype=np.int64)
    paths: dict[str, int] = {}
    degraded, ms = 0, []
    for i, history in enumerate(tqdm(cases.histories, desc="served", disable=not progress, unit="case")):
        rec = recommender.recommend(history=history, k=k, budget_ms=budget_ms, explain=False)
        ids = [item.item_id for item in rec.items]
        out[i, :len(ids)] = ids
        paths[rec.path] = paths.get(rec.path, 0) + 1
        degraded += int(rec.degraded)
        ms.append(rec.timings_ms.get("total", 0.0))
    return out, {"paths": paths, "degraded": degraded}


def rank_latency(ranker: Any, histories: list[np.ndarray], candidates: np.ndarray, m: int) -> dict[str, float]:
    """Per request ``rank(history, top-m ids)`` latency, history cache cleared before every call."""

    def call(i: int) -> None:
        ranker.clear_cache()
        ranker.rank(histories[i % len(histories)], candidates[i % len(histories), :m])

    return latency_ms(call, len(histories), warmup=min(10, len(histories)))


def served_latency(recommender: Any, histories: list[np.ndarray], budget_ms: float) -> dict[str, Any]:
    """End-to-end ``recommend`` latency at the served budget, with the per-stage medians."""
    stages: dict[str, list[float]] = {}
    degraded = 0

    def call(i: int) -> None:
        nonlocal degraded
        recommender.ranker.clear_cache()
        rec = recommender.recommend(history=histories[i % len(histories)], k=10, budget_ms=budget_ms,
                                    explain=False)
        degraded += int(rec.degraded)
        for name, value in rec.timings_ms.items():
            stages.setdefault(name, []).append(value)

    timing = latency_ms(call, len(histories), warmup=min(10, len(histories)))
    return {**timing, "stage_p50_ms": {k: round(float(np.median(v)), 3) for k, v in stages.items()},
            "degraded": degraded}


def run_protocol(protocol: str, stage: dict[str, Any], args: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from benchmarks.hybrid_protocols import default_hybrid
    from pipeline.recommender import Recommender
    from pipeline.recommender_config import RecommenderConfig
    from ranking.loading import load_ranker
    from retrieval.evaluate import evaluate_cases, retrieve_cases

    split, retriever = stage["split"], stage["retriever"]
    rankers = {}
    for who in ("teacher", "student"):
        for backend, label in BACKENDS.items():
            rankers[f"{who} ({label})"] = stage[who].with_backend(backend, threads=args.threads)
    served_name = f"{stage['served']} ({BACKENDS[args.serve_backend]})"
    served_model = rankers[served_name]
    print(f"{protocol}: serving {served_name}: {stage['served_choice'].get('reason', 'no served.json')}")
    for folder in args.title or []:
        title = load_ranker(folder)
        trained_on = (title.meta.get("metrics") or {}).get("train_fingerprint")
        if trained_on != split.history("val").fingerprint():
            print(f"{protocol}: skipping {folder}: trained on another split (its train_fingerprint differs)")
            continue
        rankers[f"title cross-encoder {Path(folder).name}"] = title
    validation = validation_ndcg(rankers, retriever, split, SERVED_M)
    validation_m20 = validation_ndcg(rankers, retriever, split, 20)
    print(f"{protocol}: validation NDCG@10 at M={SERVED_M}: {validation}; at M=20: {validation_m20}")
    ablation = covisit_only_head(served_model, retriever, split)
    hybrid = default_hybrid(split, retriever, seed=args.seed, progress=not args.quiet).model  # test histories
    retriever.set_history(split.history("test"))
    cases = split.cases("test")
    n_items = len(split.items)
    depth = max(MS)
    started = time.perf_counter()
    ids, scores = retrieve_cases(retriever, cases, depth)
    retrieval_seconds = time.perf_counter() - started
    clusters = None if cases.one_per_user else cases.users
    print(f"{protocol}: {len(cases)} test cases, retrieval {retrieval_seconds:.1f} s, "
          f"target in top-{depth}: {np.mean((ids == cases.targets[:, None]).any(axis=1)):.3f}")

    lists: dict[str, tuple[Any, np.ndarray]] = {"retrieval only": ("-", ids),
                                                 HYBRID_ROW: ("-", retrieve_cases(hybrid, cases, 10, batch=False)[0])}
    model_scores: dict[str, np.ndarray] = {}
    for name, ranker in rankers.items():
        tick = time.perf_counter()
        model_scores[name] = ranker.score_lists(cases.histories, ids, progress=not args.quiet, desc=name)
        print(f"  scored {name} in {time.perf_counter() - tick:.1f} s")
        for m in MS:
            lists[f"{name} alone top-{m}"] = (m, rerank_rows(ids, model_scores[name], m))
        head_m = getattr(ranker, "head_m", None)
        hybrid = head_scores(ranker, model_scores[name], scores, head_m, cases.histories, ids) if head_m else None
        if hybrid is not None:
            full = np.full(ids.shape, -np.inf)
            full[:, :head_m] = hybrid
            used = "" if HybridBlend.from_dict(ranker.hybrid_head).use_blend else " (lost on validation: retrieval order)"
            lists[f"{name} + hybrid head top-{head_m}{used}"] = (head_m, rerank_rows(ids, full, head_m))

    if ablation is not None:  # what the served head gains without the cross-encoder
        blend, m = ablation
        blank = np.where(np.isfinite(scores[:, :m]), 0.0, -np.inf)
        extra = {"covisit": served_model.covisit.score_lists(cases.histories, ids[:, :m])}
        full = np.full(ids.shape, -np.inf)
        full[:, :m] = blend.score(blank, scores[:, :m].astype(np.float64), extra=extra)
        lists[f"{ABLATION} top-{m}"] = (m, rerank_rows(ids, full, m))

    config = RecommenderConfig(max_m=max(MS), threads=args.threads, calibrate=False)  # the head's M caps it
    recommender = Recommender(retriever, served_model, config=config)
    tick = time.perf_counter()
    served, served_info = served_lists(recommender, cases, 10, args.quality_budget_ms, not args.quiet)
    served_seconds = time.perf_counter() - tick
    lists["two-stage (served)"] = (served_model.head_m or SERVED_M, served)

    reports = {name: evaluate_cases(ranked, cases, n_items, ks=(10,), seed=args.seed)
               for name, (_, ranked) in lists.items()}
    base = reports["retrieval only"].per_user["NDCG@10"]

    rng = np.random.default_rng(args.seed)
    sample = rng.choice(len(cases), size=min(args.latency_cases, len(cases)), replace=False)
    lat_hist = [cases.histories[i] for i in sample]
    load_before = os.getloadavg()
    latency = {name: rank_latency(r, lat_hist, ids[sample], SERVED_M) for name, r in rankers.items()}
    latency_m100 = {name: rank_latency(r, lat_hist, ids[sample], max(MS)) for name, r in rankers.items()}
    recommender.close()
    online = Recommender(retriever, served_model, config=RecommenderConfig(max_m=max(MS), threads=args.threads))
    online.warm_up()  # the served path as it runs online: a calibrated latency model plans M within the budget
    served_timing = served_latency(online, lat_hist, args.budget_ms)
    online.close()
    load_after = os.getloadavg()

    rows = []
    for name, (m, _) in lists.items():
        report = reports[name]
        row = {"protocol": protocol, **{k: v for k, v in report.row(name, M=m).items() if not k.startswith("Cov")}}
        row["cases"] = row.pop("users")
        diff = report.per_user["NDCG@10"] - base
        lo, hi = paired_bootstrap_ci(report.per_user["NDCG@10"], base, seed=args.seed, clusters=clusters)
        row["dNDCG@10"] = round(float(diff.mean()), 6)
        row["dNDCG@10_ci"] = [round(lo, 6), round(hi, 6)]
        owner = next((r for r in rankers if name.startswith(r + " ")), None)
        if owner is not None and name == f"{owner} alone top-{SERVED_M}":
            row["val_NDCG@10"] = round(validation[owner], 6)
            row["p50_ms"] = round(latency[owner]["p50_ms"], 2)
            row["p99_ms"] = round(latency[owner]["p99_ms"], 2)
        if name == "two-stage (served)":
            row["p50_ms"] = round(served_timing["p50_ms"], 2)
            row["p99_ms"] = round(served_timing["p99_ms"], 2)
            row["latency"] = "end to end: retrieval + filter + rerank + blend, budget " \
                             f"{args.budget_ms:.0f} ms; stage p50 {served_timing['stage_p50_ms']}"
            row.update(served_info, ranker=served_name)
        rows.append(row)
    if protocol == "leave_one_out":
        rows += PAPER_ROWS

    by_name = {r["method"]: r for r in rows}
    served_row = by_name["two-stage (served)"]
    def head_gain(who: str) -> float:
        row = next((r for r in rows if r["method"].startswith(f"{who} + hybrid head")), None)
        return row["dNDCG@10"] if row else float("nan")

    teacher_gain = head_gain("teacher (fp32)")
    student_name = f"student ({BACKENDS[args.serve_backend]})"
    kept = head_gain(student_name) / teacher_gain if teacher_gain and teacher_gain > 0 else float("nan")
    checks = {
        "served_ranker": served_name,
        "served_beats_retrieval_ci_above_zero": bool(served_row["dNDCG@10_ci"][0] > 0),
        "served_dNDCG@10": served_row["dNDCG@10"],
        "served_dNDCG@10_ci": served_row["dNDCG@10_ci"],
        # the run's power: the paired interval's standard error, and the true gain this many cases shows
        # (lower bound above zero) with 80% probability: (1.96 + 0.84) standard errors
        "served_dNDCG@10_se": round(paired_se(served_row["dNDCG@10_ci"]), 6),
        "gain_shown_with_80pct_power": round(2.8 * paired_se(served_row["dNDCG@10_ci"]), 6),
        "served_NDCG@10": served_row["NDCG@10"],
        "served_p50_ms_M50": round(latency[served_name]["p50_ms"], 2),
        "served_p99_ms_M50": round(latency[served_name]["p99_ms"], 2),
        "served_latency_ok": bool(latency[served_name]["p50_ms"] <= TARGET_P50_MS
                                  and latency[served_name]["p99_ms"] <= TARGET_P99_MS),
        "teacher_hybrid_dNDCG@10": teacher_gain,
        f"{student_name}_hybrid_dNDCG@10": head_gain(student_name),
        "student_share_of_teacher_gain": round(kept, 3) if np.isfinite(kept) else None,
        "student_keeps_80pct_of_teacher_gain": bool(np.isfinite(kept) and kept >= TARGET_GAIN_KEPT),
        "student_p50_ms_M50": round(latency[student_name]["p50_ms"], 2),
        "student_p99_ms_M50": round(latency[student_name]["p99_ms"], 2),
    }
    ablation_name = next((name for name in reports if name.startswith(ABLATION)), None)
    if ablation_name is not None:  # the cross-encoder's own part of the served gain, paired
        served_ndcg = reports["two-stage (served)"].per_user["NDCG@10"]
        rest = reports[ablation_name].per_user["NDCG@10"]
        lo, hi = paired_bootstrap_ci(served_ndcg, rest, seed=args.seed, clusters=clusters)
        checks["served_vs_no_reranker_head_dNDCG@10"] = round(float((served_ndcg - rest).mean()), 6)
        checks["served_vs_no_reranker_head_dNDCG@10_ci"] = [round(lo, 6), round(hi, 6)]
    # against the strongest list the first stage serves alone, paired
    served_ndcg, hybrid_ndcg = reports["two-stage (served)"].per_user["NDCG@10"], reports[HYBRID_ROW].per_user["NDCG@10"]
    lo, hi = paired_bootstrap_ci(served_ndcg, hybrid_ndcg, seed=args.seed, clusters=clusters)
    checks["served_vs_default_hybrid_dNDCG@10"] = round(float((served_ndcg - hybrid_ndcg).mean()), 6)
    checks["served_vs_default_hybrid_dNDCG@10_ci"] = [round(lo, 6), round(hi, 6)]
    checks["served_beats_default_hybrid_ci_above_zero"] = bool(lo > 0)
    if protocol == "leave_one_out":
        checks["at_or_above_llamarec_0.0759"] = bool(served_row["NDCG@10"] >= LLAMAREC_NDCG)
    teacher_meta = stage["teacher"].meta
    meta = {
        "cases": len(cases), "users": int(np.unique(cases.users).size), "split": split.stats(),
        "validation_ndcg@10_M50": validation, "validation_ndcg@10_M20": validation_m20,
        "retrieval_seconds": round(retrieval_seconds, 2), "served_seconds": round(served_seconds, 1),
        "target_in_top_100": float(np.mean((ids == cases.targets[:, None]).any(axis=1))),
        "latency": latency, "latency_M100": latency_m100, "served_latency": served_timing, "latency_cases": int(sample.size),
        "load_average_during_latency": [load_before, load_after],
        "teacher": {"config": stage["teacher"].config.to_dict(), "training": teacher_meta.get("training"),
                    "trainer": teacher_meta.get("trainer"), "hybrid_head": teacher_meta.get("hybrid_head")},
        "student": {"config": stage["student"].config.to_dict(), "training": stage["student"].meta.get("training"),
                    "teacher": stage["student"].meta.get("teacher"),
                    "hybrid_head": stage["student"].meta.get("hybrid_head")},
        "served_choice": stage["served_choice"], "acceptance": checks,
    }
    return rows, meta


def paired_se(ci: list[float]) -> float:
    """Standard error of a paired difference, read off its 95% bootstrap interval (normal approximation)."""
    return (ci[1] - ci[0]) / (2 * 1.96)


def run(args: Any) -> dict[str, Any]:
    import torch

    from pipeline.train import load_dataset

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    raw = load_dataset(DEFAULT_DATA, args.data_path)
    rows, metas = [], {}
    for protocol in args.protocols:
        stage = load_stage(protocol, raw, Path(args.artifacts), args.threads)
        protocol_rows, metas[protocol] = run_protocol(protocol, stage, args)
        rows += protocol_rows
    meta = {"dataset": DEFAULT_DATA, "protocols": metas, "threads": args.threads, "seed": args.seed,
            "serve_backend": args.serve_backend, "quality_budget_ms": args.quality_budget_ms,
            "budget_ms": args.budget_ms, "seconds": round(time.perf_counter() - started, 1),
            "metrics": "full-catalogue NDCG/Recall/MRR@10 of the final top-10 (top-M reranked, then the rest of "
                       "the retrieval list); intervals: 95% bootstrap over users (last_n: cases clustered by user)"}
    print(f"\n## Reranking on {DEFAULT_DATA}, test cases (95% bootstrap intervals)\n")
    path = write_results(args.out, rows, meta, COLUMNS, out_dir=Path(args.results_dir))
    for protocol, m in metas.items():
        print(f"\n{protocol}:\n" + markdown_table([{"check": k, "value": v} for k, v in m["acceptance"].items()],
                                                  ["check", "value"]))
    print(f"\nwrote {path} in {meta['seconds']:.0f} s")
    return {"rows": rows, "meta": meta, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = ml_benchmark_parser(__doc__, "rerank")
    parser.add_argument("--protocols", nargs="+", default=["leave_one_out", "last_n"],
                        choices=["leave_one_out", "last_n"])
    parser.add_argument("--serve-backend", default="torch", choices=list(BACKENDS),
                        help="the backend the served ranker runs on (int8 is no faster at d=64 on this CPU)")
    parser.add_argument("--title", nargs="*", default=None,
                        help="title cross-encoder folders to add as rankers (trained on the same split)")
    parser.add_argument("--latency-cases", type=int, default=200, help="random test cases timed per ranker")
    parser.add_argument("--budget-ms", type=float, default=50.0, help="the served budget (latency rows)")
    parser.add_argument("--quality-budget-ms", type=float, default=1000.0,
                        help="budget of the served quality row (generous: no case degrades for lack of time)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("faiss.loader", "retrieval.item_features"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run(args)


if __name__ == "__main__":
    main()
