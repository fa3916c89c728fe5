"""Rerank speed benchmark: quality and latency of every mode x layers x backend x M on ml-latest-small.

    python -m benchmarks.rerank_speed [--modes pairwise one_pass] [--layers 6 3 2]
        [--backends torch torch-int8 torch-bf16 onnx onnx-int8] [--M 20 50 100] [--users 300]
        [--pairwise-users 50] [--latency-users 30] [--threads 2] [--quick]

Same protocol as ``benchmarks.rerank_title`` (its helpers are reused): the LlamaRec leave-one-out split, the
two-tower retriever fitted on the training events and given the test history, each test user's top-M
reranked and the rest of the retrieval order kept, full-catalogue NDCG@10 of that final list with a 95%
bootstrap interval.

**Models.** The 6-layer teachers are ``ARTIFACTS/two_tower-one_pass`` and ``ARTIFACTS/two_tower-pairwise``
(loaded through ``benchmarks.rerank_title.load_or_train``, which trains them when missing: slow). Students are
``ARTIFACTS/student-{k}l`` and ``ARTIFACTS/student-{k}l-pairwise`` (``python -m ranking.distill``), shaped as
:data:`STUDENT_SHAPES` says (the one-pass 2-layer student: 8-token candidate text, feed-forward pruned to
512 neurons); a student that is missing, fails :func:`ranking.student.verify_student`, was distilled from
other teacher weights or other data, or has another shape is distilled here with a short budget
(``--student-steps``; recorded in ``meta.students``) and saved, except under ``--quick``.

**Against the teacher**: every non-teacher row also carries ``dNDCG@10_vs_teacher``, the mean per-user
difference from its mode's 6-layer torch teacher on the same users and M, with a paired bootstrap interval
(the teacher's own interval is much wider than the paired one).

**Quality.** ``--users`` test users are sampled once (seeded); NDCG@10 is the mean over all of them. A user
whose target is outside the retrieval top-M has NDCG@10 = 0 under any order of the top-M, so only users
with the target in the top ``max(M)`` are run through the cross-encoder, and the number is exact for the
sampled users. Each (mode, layers, backend) scores its users' top ``max(M)`` once in batches
(``score_lists``) and every M reranks a prefix of those scores: a candidate's score does not depend on the
other candidates in fp32/bf16, while the int8 backends quantize activations per batch, so their scores
carry batch-dependent quantization noise (it is the same noise a served request sees). Pairwise scoring
costs about 6x one-pass scoring, so every pairwise row (teacher and students alike) is scored on the first
``--pairwise-users`` of the same sample; the pairwise rows compare with each other on those users, the
one-pass rows on all ``--users``.

**Latency.** ``ranker.rank(user, candidate_ids)`` per request (history lookup, token ids, the forward
passes, sorting: everything from candidate ids to scores) with a cold history KV cache, on a fixed random
sample of ``--latency-users`` test users and their retrieval top-M, at ``--threads`` threads. A combination
whose warm-up shows it would take more than ``--combo-seconds`` per M is timed on fewer users (at least 5;
``latency_users`` in its row says how many). Rows marked ``cached`` time the one-pass mode with each user's
history keys/values already cached (a live service's steady state for returning users).
**Speedup** is the naive baseline's p50 over the very same requests (same users, same candidates, measured
in the same run; :mod:`benchmarks.naive`: string tokenization padded to 128 tokens, eager fp32 6-layer
BertModel, one sequence per pair) divided by the combination's p50 on them.

Writes ``benchmarks/results/rerank_speed.json`` (rows and ``meta`` with the acceptance checks at M=50) and
``benchmarks/results/rerank_speed.png`` (NDCG@10 against p50, log scale, Pareto front highlighted) and
prints a Markdown table. Combinations run in this order: each mode's 6-layer torch reference, then the
fewest layers first, all backends each; ``--budget-minutes`` (18) skips the combinations left when the run
reaches it (listed in ``meta.skipped``; with the defaults those are the pairwise 6-layer non-torch ones).

**Run time** with the teachers and students saved, on 2 cores: 1,127 s measured for the defaults (the
18-minute budget then skipped the last two combinations, pairwise 6-layer onnx and onnx-int8). A missing
student is distilled first (``STUDENT_STEPS``: ~1.5 min one-pass, ~2.5 min pairwise), and the budget
then cuts more of the tail.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DEFAULT_DATA, RESULTS, write_results
from benchmarks.naive import catalogue_texts, naive_rank
from benchmarks.rerank_title import cross_scores, load_or_train, rerank_rows, stage_lists, val_retriever
from data.errors import ArtifactError, ConfigError, ShortlistError
from data.metrics import evaluate_rankings, paired_bootstrap_ci
from pipeline.report import markdown_table

log = logging.getLogger(__name__)

MODES = ("pairwise", "one_pass")
LAYERS = (6, 3, 2)
BACKENDS = ("torch", "torch-int8", "torch-bf16", "onnx", "onnx-int8")
MS = (20, 50, 100)
RETRIEVER = "two_tower"
#: Steps of a student distilled inside the benchmark (about 2 minutes each on 2 cores; ``python -m
#: ranking.distill`` trains them properly, about 5 minutes each).
STUDENT_STEPS = {"one_pass": 80, "pairwise": 16}
#: The shape of the student of each (mode, layer count) this benchmark reads (``student_path``) and distils
#: when it is missing or shaped otherwise: candidate text budget in tokens and feed-forward width; absent
#: values are the teacher's. ``python -m ranking.distill --layers 2 --item-tokens 8 --ffn-width 512 --steps
#: 600 --learning-rate 3e-4 --eval-every 100 --out ARTIFACTS/student-2l`` makes the one-pass 2-layer one
#: with the full step budget.
STUDENT_SHAPES: dict[tuple[str, int], dict[str, int]] = {("one_pass", 2): {"item_tokens": 8, "ffn_width": 512}}
#: Validation users of a student distilled inside the benchmark (early stopping).
STUDENT_VAL_USERS = 200
QUICK = {"users": 40, "pairwise_users": 12, "latency_users": 3, "M": [20, 50], "layers": [6, 2],
         "backends": ["torch", "onnx-int8"], "modes": ["one_pass", "pairwise"], "student_steps": 3}
COLUMNS = ["method", "NDCG@10", "dNDCG@10_vs_teacher", "p50_ms", "p99_ms", "speedup_vs_naive", "latency_users",
           "scored_users"]
#: Acceptance targets of the best configuration at M=50.
TARGETS = {"p50_ms": 15.0, "p99_ms": 25.0, "speedup": 30.0, "ndcg_fraction_of_teacher": 0.97}


def student_path(folder: Path, layers: int, mode: str) -> Path:
    return folder / (f"student-{layers}l" + ("-pairwise" if mode == "pairwise" else ""))


def student_shape(teacher: Any, layers: int) -> dict[str, int]:
    """``{"item_tokens", "ffn_width"}`` of ``teacher``'s ``layers``-layer student (:data:`STUDENT_SHAPES`,
    else the teacher's values)."""
    shape = STUDENT_SHAPES.get((teacher.mode, layers), {})
    return {"item_tokens": shape.get("item_tokens") or teacher.config.text.item_tokens,
            "ffn_width": shape.get("ffn_width") or int(teacher.encoder_config["intermediate_size"])}


def shape_of(ranker: Any) -> dict[str, int]:
    """A ranker's ``{"item_tokens", "ffn_width"}``."""
    return {"item_tokens": ranker.config.text.item_tokens,
            "ffn_width": int(ranker.encoder_config["intermediate_size"])}


def model_sha256(folder: Path) -> str | None:
    """The SHA-256 of ``folder/model.safetensors`` recorded in its manifest (``None`` if there is none)."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("files", {}).get("model.safetensors")


# ---- models -------------------------------------------------------------------------------------
def load_teachers(modes: list[str], retriever: Any, split: Any, item_table: Any, folder: Path,
                  threads: int, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The 6-layer teachers per mode (one-pass always: the pairwise teacher is warm-started from it when it
    has to be trained, as ``benchmarks.rerank_title`` does)."""
    overrides: dict[str, Any] = {"threads": threads, "progress": progress}
    teachers, info = {}, {}
    teachers["one_pass"], info["one_pass"] = load_or_train("one_pass", RETRIEVER, retriever, split, item_table,
                                                           folder, False, overrides)
    if "pairwise" in modes:
        steps = 60  # benchmarks.rerank's --pairwise-steps default
        pairwise = {**overrides, "max_steps": steps, "eval_every": steps // 2, "eval_at_start": True,
                    "warmup_steps": 10}
        teachers["pairwise"], info["pairwise"] = load_or_train("pairwise", RETRIEVER, retriever, split, item_table,
                                                               folder, False, pairwise, init=teachers["one_pass"])
    for mode in teachers:
        info[mode] = {k: v for k, v in info[mode].items() if k not in ("trainer", "val_history")}
        info[mode]["model_sha256"] = model_sha256(folder / f"{RETRIEVER}-{mode}")
    return teachers, info


def load_or_distill(teacher: Any, teacher_folder: Path, layers: int, split: Any, retriever: Any, folder: Path,
                    steps: int, threads: int, *, save: bool, progress: bool, val_users: int = 0,
                    ) -> tuple[Any, dict[str, Any]]:
    """The ``layers``-layer student of ``teacher``: loaded when its saved folder verifies and was distilled
    from these teacher weights on this split, else distilled now (``steps``, early stopping on
    ``val_users`` validation users, 0: all) and saved when ``save``."""
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.distill import DistillConfig, distill
    from ranking.student import default_layers, make_student, save_student, verify_student

    path = student_path(folder, layers, teacher.mode)
    shape = student_shape(teacher, layers)
    fingerprint = split.history("val").fingerprint()
    expected_sha = model_sha256(teacher_folder)
    if path.is_dir():
        try:
            check = verify_student(path)
            student = CrossEncoderRanker.load(path)
            metrics = student.meta.get("metrics", {})
            same = (student.meta["teacher"].get("model_sha256") == expected_sha and student.mode == teacher.mode
                    and metrics.get("train_fingerprint") == fingerprint and student.items == split.items
                    and check["layers"] == layers and shape_of(student) == shape)
            if same:
                return student, {"loaded_from": str(path), "probe_max_abs_diff": check["max_abs_diff"],
                                 "student_layers": check["student_layers"], **metrics, **shape}
            log.warning("%s was distilled from another teacher, on other data or with another shape than %s; "
                        "distilling again", path, shape)
        except (ArtifactError, KeyError) as exc:
            log.warning("cannot use %s (%s); distilling again", path, exc)
    started = time.perf_counter()
    config = DistillConfig(steps=steps, eval_every=max(1, steps // 3), threads=threads, progress=progress,
                           val_users=val_users)
    chosen = default_layers(len(teacher.model.bert.encoder.layer), layers)
    text = dataclasses.replace(teacher.config.text, item_tokens=shape["item_tokens"])
    student = make_student(teacher, chosen, text, teacher_folder=teacher_folder, ffn_width=shape["ffn_width"])
    trained, record = distill(teacher, student, split, retriever, config)
    info = {"val_ndcg@10": record.best_metric, "teacher_val_ndcg@10": record.teacher_metric,
            "start_val_ndcg@10": record.start_metric, "train_fingerprint": fingerprint, "retriever": RETRIEVER,
            "train_seconds": round(time.perf_counter() - started, 1), "steps": record.steps,
            "best_step": record.best_step, "student_layers": list(chosen), **shape}
    if save:
        save_student(trained, path, metrics=info)
    return trained, {"trained_now": True, "saved_to": str(path) if save else None, **info}


def with_backend(ranker: Any, name: str, threads: int, cache_dir: Path) -> Any:
    """``ranker`` scoring through backend ``name``; raises when the backend cannot run here."""
    if not hasattr(ranker, "with_backend"):
        if name == "torch":
            return ranker
        raise ConfigError("CrossEncoderRanker.with_backend is not available in this checkout")
    return ranker.with_backend(name, threads=threads, device="cpu", cache_dir=cache_dir)


# ---- timing -------------------------------------------------------------------------------------
def time_requests(call: Callable[[int], Any], n: int, warmup: int = 2) -> np.ndarray:
    """Wall time in ms of ``call(i)`` for ``i < n`` (after ``warmup`` calls on the first requests)."""
    for i in range(warmup):
        call(i % max(n, 1))
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        call(i)
        out[i] = (time.perf_counter() - start) * 1000
    return out


def affordable(call: Callable[[int], Any], wanted: int, seconds: float, least: int = 5) -> int:
    """How many requests fit in ``seconds``, judged from one warm-up call (between ``least`` and ``wanted``)."""
    start = time.perf_counter()
    call(0)
    each = max(time.perf_counter() - start, 1e-6)
    return int(min(wanted, max(least, seconds // each)))


def time_combination(ranker: Any, users: np.ndarray, candidates: np.ndarray, depths: list[int], seconds: float,
                     cached_m: int | None) -> dict[tuple[int, bool], np.ndarray]:
    """Per-request ms of ``ranker.rank(user, top-M candidates)`` per M with a cold history cache, and at
    ``cached_m`` also with every timed user's history already cached; keyed ``(M, cached)``."""
    timings: dict[tuple[int, bool], np.ndarray] = {}
    for m in depths:
        def cold(i: int, m: int = m) -> None:
            ranker.clear_cache()
            ranker.rank(int(users[i]), candidates[i, :m])

        def warm(i: int, m: int = m) -> None:
            ranker.rank(int(users[i]), candidates[i, :m])

        n = affordable(cold, users.size, seconds, least=min(5, users.size))
        timings[(m, False)] = time_requests(cold, n)
        if m == cached_m:
            ranker.clear_cache()
            for i in range(n):  # fill the cache, as a live service has it for returning users
                warm(i)
            timings[(m, True)] = time_requests(warm, n)
    return timings


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def combination_rows(name: str, key: tuple[str, int, str], timings: dict[tuple[int, bool], np.ndarray],
                     scores: np.ndarray, test: dict[str, Any], sample: np.ndarray, scored: np.ndarray,
                     naive_ms: dict[int, np.ndarray], n_items: int, seed: int,
                     reference: dict[int, np.ndarray] | None = None,
                     is_reference: bool = False) -> list[dict[str, Any]]:
    """One row per timed (M, cached): NDCG@10 of the reranked lists over ``sample`` (only ``scored`` users
    were run through the cross-encoder), latency percentiles and the speedup over the naive baseline on the
    same requests.

    ``reference`` (M -> per-user NDCG@10 over ``sample``) is the mode's teacher: each row then carries
    ``dNDCG@10_vs_teacher`` and its paired bootstrap interval; the teacher's own call (``is_reference``)
    fills it instead.
    """
    mode, layers, backend = key
    rows = []
    fill = reference is not None and is_reference
    for (m, cached), ms in timings.items():
        report = evaluate_rankings(rerank_rows(test["ids"], scores, m)[sample], [test["relevant"][i] for i in sample],
                                   ks=(10,), n_items=n_items, users=test["users"][sample], seed=seed)
        ndcg = report.per_user["NDCG@10"]
        versus: dict[str, Any] = {}
        if fill and not cached:
            reference[m] = ndcg
        elif reference and m in reference and not fill:
            lo, hi = paired_bootstrap_ci(ndcg, reference[m], seed=seed)
            versus = {"dNDCG@10_vs_teacher": round(float(np.mean(ndcg - reference[m])), 6),
                      "dNDCG@10_vs_teacher_ci": [round(lo, 6), round(hi, 6)]}
        shared = min(ms.size, naive_ms[m].size)
        naive_p50 = float(np.median(naive_ms[m][:shared]))
        rows.append({
            "method": f"{name} M={m}" + (" cached" if cached else ""), "mode": mode, "layers": layers,
            "backend": backend, "M": m, "cached": cached, "NDCG@10": round(report.means["NDCG@10"], 6),
            "NDCG@10_ci": [round(v, 6) for v in report.ci["NDCG@10"]], "quality_users": int(sample.size),
            "scored_users": int(test["hit"][scored, :m].any(axis=1).sum()), **percentiles(ms),
            "latency_users": int(ms.size), "naive_p50_ms_same_users": round(naive_p50, 2),
            "speedup_vs_naive": round(naive_p50 / float(np.median(ms[:shared])), 2), **versus,
        })
    return rows


# ---- the run ------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole run; combinations past it are skipped and listed."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.perf_counter() + 60 * minutes if minutes > 0 else float("inf")
        self.skipped: list[dict[str, str]] = []

    def left(self) -> bool:
        return time.perf_counter() < self.deadline


def combination_order(modes: list[str], layers: list[int], backends: list[str]) -> list[tuple[str, int, str]]:
    """Every (mode, layers, backend), each mode's 6-layer torch reference first, then the fewest layers
    first (the fast configurations), so a budget cut drops the slow teachers' other backends last-measured."""
    top = max(layers)
    out = []
    for mode in sorted(modes, key=lambda m: m != "one_pass"):
        if "torch" in backends:
            out.append((mode, top, "torch"))
        for k in sorted(layers):
            out += [(mode, k, b) for b in backends if (mode, k, b) not in out]
    return out


def acceptance(rows: list[dict[str, Any]], m: int = 50) -> dict[str, Any]:
    """The checks on the fastest uncached configuration at M=``m`` whose NDCG@10 is within its mode's
    teacher interval or at least 97% of the teacher's (the fastest overall when none is)."""
    candidates = [r for r in rows if r.get("M") == m and not r.get("cached") and r.get("p50_ms") is not None
                  and r.get("layers") is not None]
    if not candidates:
        return {"evaluated": False, "reason": f"no row at M={m}"}
    teachers = {r["mode"]: r for r in candidates if r["layers"] == 6 and r["backend"] == "torch"
                and r.get("NDCG@10") is not None}

    def quality_ok(row: dict[str, Any]) -> bool:
        teacher = teachers.get(row["mode"])
        if teacher is None or row.get("NDCG@10") is None:
            return False
        lo, _ = teacher["NDCG@10_ci"]
        return bool(row["NDCG@10"] >= lo or row["NDCG@10"] >= TARGETS["ndcg_fraction_of_teacher"] * teacher["NDCG@10"])

    good = [r for r in candidates if quality_ok(r)]
    best = min(good or candidates, key=lambda r: r["p50_ms"])
    teacher = teachers.get(best["mode"], {})
    checks = {
        "best_config": best["method"],
        "chosen_among": "configurations meeting the quality check" if good else "all (none met the quality check)",
        "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"], "speedup_vs_naive": best.get("speedup_vs_naive"),
        "NDCG@10": best.get("NDCG@10"), "teacher_NDCG@10": teacher.get("NDCG@10"),
        "teacher_NDCG@10_ci": teacher.get("NDCG@10_ci"),
        "dNDCG@10_vs_teacher": best.get("dNDCG@10_vs_teacher"),
        "dNDCG@10_vs_teacher_ci": best.get("dNDCG@10_vs_teacher_ci"),
        f"p50_le_{TARGETS['p50_ms']:g}ms": bool(best["p50_ms"] <= TARGETS["p50_ms"]),
        f"p99_le_{TARGETS['p99_ms']:g}ms": bool(best["p99_ms"] <= TARGETS["p99_ms"]),
        f"speedup_ge_{TARGETS['speedup']:g}x": bool((best.get("speedup_vs_naive") or 0) >= TARGETS["speedup"]),
        "ndcg_within_teacher_ci_or_97pct": quality_ok(best),
    }
    checks["all_pass"] = all(v for k, v in checks.items() if k.startswith(("p50_le", "p99_le", "speedup_ge", "ndcg_")))
    return checks


def pareto_plot(rows: list[dict[str, Any]], naive: dict[int, float], path: Path, title: str) -> Path | None:
    """NDCG@10 against p50 (log scale) of every uncached row with both, the Pareto front highlighted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install shortlist[plot]); no plot written")
        return None
    points = [r for r in rows if r.get("NDCG@10") is not None and r.get("p50_ms") and not r.get("cached")
              and r.get("layers") is not None]
    if not points:
        return None
    ordered = sorted(points, key=lambda r: (r["p50_ms"], -r["NDCG@10"]))
    front, best = [], -np.inf
    for r in ordered:
        if r["NDCG@10"] > best:
            front.append(r)
            best = r["NDCG@10"]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    colours = {"one_pass": "tab:blue", "pairwise": "tab:orange"}
    markers = {20: "o", 50: "s", 100: "^"}
    for r in points:
        ax.scatter(r["p50_ms"], r["NDCG@10"], color=colours.get(r["mode"], "grey"), marker=markers.get(r["M"], "x"),
                   s=18 + 10 * (6 - r["layers"]), alpha=0.55, edgecolors="none")
    ax.plot([r["p50_ms"] for r in front], [r["NDCG@10"] for r in front], color="black", lw=1.2, zorder=3,
            label="Pareto front")
    for r in front:
        ax.scatter(r["p50_ms"], r["NDCG@10"], facecolors="none", edgecolors="black", s=90, zorder=4)
        ax.annotate(r["method"], (r["p50_ms"], r["NDCG@10"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for m, ms in sorted(naive.items()):
        ax.axvline(ms, color="grey", ls=":", lw=1)
        ax.text(ms, ax.get_ylim()[0], f" naive M={m}", rotation=90, fontsize=7, va="bottom", color="grey")
    for r in rows:
        if r["method"].startswith("retrieval only") and r.get("NDCG@10") is not None:
            ax.axhline(r["NDCG@10"], color=colours.get(r.get("mode"), "grey"), ls="--", lw=0.8, alpha=0.7,
                       label=r["method"])
    for mode, colour in colours.items():
        ax.scatter([], [], color=colour, label=mode)
    for m, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"M={m}")
    for k in sorted({r["layers"] for r in points}, reverse=True):
        ax.scatter([], [], color="grey", s=18 + 10 * (6 - k), alpha=0.55, label=f"{k} layers")
    ax.set_xscale("log")
    ax.set_xlabel("rerank latency p50 per user (ms, log scale; cold history cache)")
    ax.set_ylabel("NDCG@10 (test, full catalogue)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.train import load_dataset, prepare_split
    from ranking.data import stage_retriever

    started = time.perf_counter()
    budget = Budget(args.budget_minutes)
    torch.set_num_threads(args.threads)
    progress = not args.quiet
    raw = load_dataset(DEFAULT_DATA, args.data_path)
    split = prepare_split(raw)
    folder = Path(args.artifacts)
    retriever = val_retriever(RETRIEVER, split, folder, threads=args.threads)
    teachers, teacher_info = load_teachers(args.modes, retriever, split, raw.items, folder, args.threads, progress)
    top = max(args.layers)
    n_teacher = len(teachers["one_pass"].model.bert.encoder.layer)
    if top != n_teacher:
        raise ConfigError(f"--layers must include the teachers' {n_teacher} layers (the reference); got {args.layers}")

    base: dict[tuple[str, int], Any] = {}
    students: dict[str, Any] = {}
    for mode in args.modes:
        base[(mode, top)] = teachers[mode]
        for k in sorted(k for k in args.layers if k < top):
            steps = args.student_steps or STUDENT_STEPS[mode]
            base[(mode, k)], students[f"{mode} L{k}"] = load_or_distill(
                teachers[mode], folder / f"{RETRIEVER}-{mode}", k, split, retriever, folder, steps, args.threads,
                save=not args.quick, progress=progress, val_users=60 if args.quick else STUDENT_VAL_USERS)
            torch.set_num_threads(args.threads)
            print(f"student {mode} L{k}: {students[f'{mode} L{k}']}")
    setup_seconds = time.perf_counter() - started

    # ---- the test stage: candidates, samples, histories ---------------------------------------------
    test_retriever = stage_retriever(RETRIEVER, split, "test", previous=retriever)
    depth = max(args.M)
    test = stage_lists(split, "test", test_retriever, depth)
    history = split.history("test")
    for ranker in {id(r): r for r in (*base.values(), *teachers.values())}.values():
        ranker.set_history(history)  # before with_backend: the copies share the history table
    n_test = len(test["users"])
    order = np.random.default_rng(args.seed).permutation(n_test)
    quality_sample = np.sort(order[: args.users or n_test])
    samples = {"one_pass": quality_sample,
               "pairwise": np.sort(order[: min(args.pairwise_users or n_test, args.users or n_test)])}
    scored = {mode: s[test["hit"][s].any(axis=1)] for mode, s in samples.items()}
    latency_sample = np.random.default_rng(args.seed + 1).choice(n_test, size=min(args.latency_users, n_test),
                                                                replace=False)
    lat_users, lat_cands = test["users"][latency_sample], test["ids"][latency_sample]

    # ---- the naive baseline ----------------------------------------------------------------------
    naive_model = teachers.get("pairwise", teachers["one_pass"])
    texts = catalogue_texts(raw.items, split.items)
    naive_ms: dict[int, np.ndarray] = {}
    for m in args.M:
        def naive_call(i: int, m: int = m) -> None:
            naive_rank(naive_model, naive_model.history_of(int(lat_users[i])), lat_cands[i, :m], texts)

        n = affordable(naive_call, lat_users.size, args.naive_seconds, least=min(5, lat_users.size))
        naive_ms[m] = time_requests(naive_call, n, warmup=1)
        print(f"naive M={m}: {percentiles(naive_ms[m])} over {n} users")

    # ---- every combination --------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        s = samples[mode]
        ranked = test["ids"][s]
        report = evaluate_rankings(ranked, [test["relevant"][i] for i in s], ks=(10,), n_items=len(split.items),
                                   users=test["users"][s], seed=args.seed)
        rows.append({**{k: v for k, v in report.row(f"retrieval only ({mode} users)").items()
                        if k.startswith(("method", "NDCG@10"))}, "mode": mode, "quality_users": int(s.size)})
    for m in args.M:
        rows.append({"method": f"naive pairwise L{n_teacher} fp32 M={m}", "M": m, "backend": "naive",
                     **percentiles(naive_ms[m]), "latency_users": int(naive_ms[m].size), "speedup_vs_naive": 1.0})
    preparation: dict[str, float] = {}
    teacher_ndcg: dict[str, dict[int, np.ndarray]] = {mode: {} for mode in args.modes}
    cached_m = 50 if 50 in args.M else max(args.M)
    for mode, k, backend in combination_order(args.modes, args.layers, args.backends):
        name = f"{mode} L{k} {backend}"
        if not budget.left():
            budget.skipped.append({"combination": name, "reason": f"--budget-minutes {args.budget_minutes} reached"})
            continue
        tick = time.perf_counter()
        try:
            ranker = with_backend(base[(mode, k)], backend, args.threads, folder / "backend-cache" / f"{mode}-L{k}")
        except (ShortlistError, ImportError, NotImplementedError) as exc:
            budget.skipped.append({"combination": name, "reason": f"{type(exc).__name__}: {exc}"})
            print(f"skip {name}: {exc}")
            continue
        preparation[name] = round(time.perf_counter() - tick, 1)
        torch.set_num_threads(args.threads)
        timings = time_combination(ranker, lat_users, lat_cands, args.M, args.combo_seconds,
                                   cached_m if mode == "one_pass" and not args.no_cached else None)
        scores = cross_scores(ranker, test, scored[mode], depth, progress, f"{name} scoring")
        for row in combination_rows(name, (mode, k, backend), timings, scores, test, samples[mode], scored[mode],
                                    naive_ms, len(split.items), args.seed,
                                    reference=teacher_ndcg[mode], is_reference=(k == top and backend == "torch")):
            rows.append(row)
            print(f"{row['method']}: NDCG@10 {row['NDCG@10']:.4f} p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms "
                  f"speedup {row['speedup_vs_naive']}x ({row['latency_users']} users)")

    checks = acceptance(rows)
    meta = {
        "dataset": DEFAULT_DATA, "retriever": RETRIEVER, "split": split.stats(), "threads": args.threads,
        "seed": args.seed, "protocol": "LlamaRec leave-one-out, 5-core; full-catalogue NDCG@10 of the final list "
        "(top-M reranked, then the rest of the retrieval order)",
        "quality_users": {mode: int(s.size) for mode, s in samples.items()},
        "scored_users": {mode: int(s.size) for mode, s in scored.items()}, "test_users": n_test,
        "quality_note": "NDCG@10 is the mean over the sampled test users; users whose target is outside the "
                        f"retrieval top-{depth} score 0 under any order and are not run through the "
                        "cross-encoder, so the number is exact for the sample. Pairwise rows use the first "
                        "--pairwise-users of the sample (pairwise scoring costs about 6x one-pass), so compare "
                        "pairwise rows with pairwise rows. Scores are computed once at depth max(M) and each M "
                        "reranks a prefix (int8 backends: batch-dependent activation quantization noise).",
        "latency_note": "ranker.rank(user, candidate ids) per request, cold history KV cache unless the row says "
                        "cached; slow combinations are timed on fewer users (latency_users); speedup_vs_naive = "
                        "naive p50 / row p50 over the same requests (the first min(latency_users, naive users))",
        "latency_users": int(lat_users.size), "naive": {str(m): {**percentiles(v), "users": int(v.size)}
                                                         for m, v in naive_ms.items()},
        "naive_model": f"{RETRIEVER}-{naive_model.mode} weights, 6 layers, HF tokenizer max_length=128, eager fp32",
        "teachers": teacher_info, "students": students, "backend_preparation_seconds": preparation,
        "skipped": budget.skipped, "acceptance": checks, "setup_seconds": round(setup_seconds, 1),
        "load_average": os.getloadavg(), "quick": bool(args.quick),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\n## Rerank speed on ml-latest-small, test split ({args.threads} threads; 95% bootstrap intervals)\n")
    table = [{**r, "NDCG@10": _with_ci(r)} for r in rows]
    print(markdown_table(table, COLUMNS))
    path = write_results(args.out, rows, meta, out_dir=args.results_dir)
    plot = pareto_plot(rows, {m: float(np.median(v)) for m, v in naive_ms.items()},
                       Path(args.results_dir) / f"{args.out}.png",
                       f"Rerank quality vs latency, ml-latest-small test, {args.threads} threads "
                       f"(one-pass: {samples['one_pass'].size} users, pairwise: {samples['pairwise'].size})")
    print("\n" + markdown_table([{"check": k, "value": v} for k, v in checks.items()], ["check", "value"]))
    print(f"\nwrote {path}" + (f" and {plot}" if plot else "") + f" in {meta['seconds']:.0f} s")
    return {"rows": rows, "meta": meta, "path": path, "plot": plot}


def _with_ci(row: dict[str, Any]) -> Any:
    if row.get("NDCG@10") is None:
        return None
    ci = row.get("NDCG@10_ci")
    return f"{row['NDCG@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{row['NDCG@10']:.4f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--artifacts", default="artifacts/rerank", help="teachers, students and backend caches")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help=f"default {list(MODES)}")
    parser.add_argument("--layers", nargs="+", type=int, default=None, help=f"default {list(LAYERS)}")
    parser.add_argument("--backends", nargs="+", default=None, help=f"default {list(BACKENDS)}")
    parser.add_argument("--M", nargs="+", type=int, default=None, help=f"reranked depths, default {list(MS)}")
    parser.add_argument("--users", type=int, default=None, help="test users sampled for NDCG (0: all; default 300)")
    parser.add_argument("--pairwise-users", type=int, default=None,
                        help="users of that sample the pairwise rows are scored on (0: all; default 50)")
    parser.add_argument("--latency-users", type=int, default=None, help="test users timed per combination (30)")
    parser.add_argument("--combo-seconds", type=float, default=5.0,
                        help="latency time per combination and M before fewer users are timed (at least 5)")
    parser.add_argument("--naive-seconds", type=float, default=45.0, help="the same for the naive baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (2 cores)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help=f"steps of a student distilled here when missing (0: {STUDENT_STEPS})")
    parser.add_argument("--no-cached", action="store_true", help="no history-cached one-pass rows")
    parser.add_argument("--budget-minutes", type=float, default=18.0,
                        help="skip the combinations left after this many minutes (0: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run on a tiny slice ({QUICK}); students are not saved; writes "
                             "rerank_speed_quick.json")
    parser.add_argument("--out", default=None, help="results name (default rerank_speed, or rerank_speed_quick)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the JSON and the PNG go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    defaults = {"modes": list(MODES), "layers": list(LAYERS), "backends": list(BACKENDS), "M": list(MS),
                "users": 300, "pairwise_users": 50, "latency_users": 30, "student_steps": 0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, value) if args.quick else value)
    args.out = args.out or ("rerank_speed_quick" if args.quick else "rerank_speed")
    for name in ("users", "pairwise_users", "latency_users"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.latency_users < 1 or any(m < 10 for m in args.M):
        parser.error("--latency-users must be >= 1 and every --M >= 10 (NDCG@10 reads the top 10)")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
