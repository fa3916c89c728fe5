"""Re-evaluate a saved artifact on its dataset's test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.dataset import Interactions
from data.errors import ArtifactError
from data.metrics import MetricReport
from pipeline.artifacts import load_artifact
from pipeline.config import TrainConfig
from pipeline.train import prepare_split
from retrieval.evaluate import evaluate_retriever


def artifact_data(artifact: Any, data_path: str | None = None, events: str | Path | None = None) -> Interactions:
    """The events a loaded artifact (:func:`~pipeline.artifacts.load_artifact`) was trained on, read again:
    its dataset (``data_path`` overrides where it is looked for) plus, when it was trained with
    ``shortlist train --events``, the same prefix of that event log (from the path its manifest records, or
    ``events``). Refuses data that is not what it was trained on (fingerprint check), naming the artifact
    and the flag that fixes it."""
    from pipeline.event_log import fold_events

    manifest = artifact.manifest
    raw = TrainConfig.from_dict(manifest["config"]["train"]).load_data(data_path)
    folded = (manifest.get("data") or {}).get("events")
    if folded:
        log_path = events or folded.get("path")
        if not log_path:
            raise ArtifactError(f"{artifact.folder}: trained with the event log {folded.get('log')!r} (its first "
                                f"{folded.get('bytes')} bytes); pass it with --events PATH")
        raw = fold_events(raw, log_path, upto=int(folded["bytes"]), sha256=folded["sha256"])
    if raw.fingerprint() != manifest["data"]["fingerprint"]:
        raise ArtifactError(
            f"{artifact.folder}: trained on data with fingerprint {manifest['data']['fingerprint']}, but "
            f"{raw.name} on disk has {raw.fingerprint()}; pass the data it was trained on (--data-path) or retrain")
    return raw


def _artifact_split(artifacts: str | Path, data_path: str | None, events: str | Path | None = None):
    """``(artifact, train config, split)``; refuses data on disk that the artifact was not trained on."""
    artifact = load_artifact(artifacts)
    train_cfg = TrainConfig.from_dict(artifact.manifest["config"]["train"])
    return artifact, train_cfg, prepare_split(artifact_data(artifact, data_path, events), train_cfg)


def evaluate_artifact(artifacts: str | Path = "artifacts", data_path: str | None = None,
                      n_boot: int = 1000, events: str | Path | None = None) -> tuple[MetricReport, dict]:
    """Load the artifact, rebuild the split from the same data and score the served list on the test items.

    Refuses when the data on disk is not the data the artifact was trained on (fingerprint check); an
    artifact trained with ``--events`` reads the same prefix of its event log again (:func:`artifact_data`).
    """
    artifact, train_cfg, split = _artifact_split(artifacts, data_path, events)
    report = evaluate_retriever(artifact.retriever, split, "test", ks=train_cfg.ks, n_boot=n_boot,
                                seed=train_cfg.seed)
    return report, artifact.manifest


def evaluate_artifact_lists(artifacts: str | Path = "artifacts", data_path: str | None = None,
                            n_boot: int = 1000, events: str | Path | None = None) -> dict:
    """Both lists of the artifact on the test split: ``{"served": report, "candidates": report or None,
    "served_source": str or None, "manifest": dict}``. ``candidates`` is the list a reranker reads, when it
    differs from the served one (a hybrid's fusion tuned for recall); ``served_source`` says what serves
    the list without a reranker (a component's name, or ``"fusion"``)."""
    artifact, train_cfg, split = _artifact_split(artifacts, data_path, events)
    retriever = artifact.retriever
    served = evaluate_retriever(retriever, split, "test", ks=train_cfg.ks, n_boot=n_boot, seed=train_cfg.seed)
    candidates = None
    if retriever.for_candidates() is not retriever:
        candidates = evaluate_retriever(retriever.for_candidates(), split, "test", ks=train_cfg.ks, n_boot=n_boot,
                                        seed=train_cfg.seed)
    return {"served": served, "candidates": candidates, "served_source": getattr(retriever, "served_source", None),
            "manifest": artifact.manifest}


def resolve_ranker(ranker: str | Path | None, artifacts: str | Path = "artifacts") -> Path | None:
    """``None`` -> ``None``; ``"auto"`` -> the served ranker of ``artifacts``' LATEST version (what
    ``shortlist train-ranker`` wrote and chose on validation, :func:`pipeline.second_stage.choose_served`;
    ``None`` when there is none); anything else is taken as a folder."""
    if ranker is None:
        return None
    if str(ranker) != "auto":
        return Path(ranker)
    from pipeline.second_stage import ranker_folder, served_ranker

    return served_ranker(ranker_folder(artifacts))


def evaluate_two_stage(artifacts: str | Path = "artifacts", ranker: str | Path = "auto", *,
                       data_path: str | None = None, max_m: int = 100, budget_ms: float = 1000.0,
                       backend: str = "torch", seed: int = 0, events: str | Path | None = None) -> dict:
    """Retrieval alone against the served two-stage list on the artifact's test split, on the same users.

    Every test user goes through :meth:`~pipeline.recommender.Recommender.recommend` with the ranker (its
    hybrid head and fallback rules included; a generous ``budget_ms`` so no request degrades for lack of
    time). Returns ``{"retrieval": report, "two_stage": report, "dNDCG@10": mean, "dNDCG@10_ci": (lo, hi),
    "paths": {...}, "ranker": folder}``.
    """
    import numpy as np

    from data.metrics import paired_bootstrap_ci
    from pipeline.recommender import Recommender
    from pipeline.recommender_config import RecommenderConfig
    from retrieval.evaluate import evaluate_cases, retrieve_cases

    folder = resolve_ranker(ranker, artifacts)
    if folder is None:
        raise ArtifactError(f"{artifacts}: no ranker for the latest version; run `shortlist train-ranker` first")
    recommender = Recommender.load(artifacts, folder, backend=backend,
                                   config=RecommenderConfig(max_m=max_m, calibrate=False))
    _, _, split = _artifact_split(artifacts, data_path, events)
    cases = split.cases("test")
    ids, _ = retrieve_cases(recommender.retriever, cases, 10)
    served = np.full((len(cases), 10), -1, dtype=np.int64)
    paths: dict[str, int] = {}
    for i, (user, history) in enumerate(zip(cases.users, cases.histories)):
        rec = recommender.recommend(int(user), k=10, budget_ms=budget_ms, explain=False)
        served[i, :len(rec.items)] = [item.item_id for item in rec.items]
        paths[rec.path] = paths.get(rec.path, 0) + 1
    recommender.close()
    n_items = len(split.items)
    base = evaluate_cases(ids, cases, n_items, ks=(10,), seed=seed)
    two = evaluate_cases(served, cases, n_items, ks=(10,), seed=seed)
    diff = two.per_user["NDCG@10"] - base.per_user["NDCG@10"]
    ci = paired_bootstrap_ci(two.per_user["NDCG@10"], base.per_user["NDCG@10"], seed=seed)
    return {"retrieval": base, "two_stage": two, "dNDCG@10": float(diff.mean()), "dNDCG@10_ci": ci,
            "paths": paths, "ranker": str(folder), "blend_used": bool(getattr(recommender.blend, "use_blend", False))}
