"""Evaluate a retriever under the protocol: full-catalogue ranking with each user's history masked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.dataset import ITEM, USER
from data.errors import DataValidationError
from data.metrics import MetricReport, evaluate_rankings
from data.protocol import EvalCases, Split
from retrieval.base import Retriever

DEFAULT_KS = (10, 20, 50, 100, 200)


def targets_by_user(split: Split, stage: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(users, relevant)``: the users with held-out events in ``stage`` and their target item ids."""
    targets = split.targets(stage)
    grouped = targets.groupby(USER, sort=True)[ITEM]
    users = np.asarray(list(grouped.groups.keys()), dtype=np.int64)
    relevant = [g.to_numpy(dtype=np.int64) for _, g in grouped]
    return users, relevant


def evaluate_retriever(
    retriever: Retriever,
    split: Split,
    stage: str = "test",
    *,
    ks: Sequence[int] = DEFAULT_KS,
    n_boot: int = 1000,
    seed: int = 0,
    check_history: bool = True,
) -> MetricReport:
    """Metrics of ``retriever`` on ``stage``'s held-out events.

    The retriever must hold exactly ``split.history(stage)`` as its users' histories (fitted on it, or
    given it); otherwise a held-out item could be masked as "seen" or leak into training. That is checked
    through the history fingerprint unless ``check_history=False``.
    """
    expected = split.history(stage).fingerprint()
    if check_history and retriever.history_fingerprint != expected:
        raise DataValidationError(
            f"evaluate_retriever: the retriever's history does not match split.history({stage!r}); "
            f"fit it on split.history({stage!r}) (the {stage} stage's visible events) before evaluating"
        )
    users, relevant = targets_by_user(split, stage)
    ranked, _ = retriever.retrieve(users, max(ks), exclude_seen=True)
    return evaluate_rankings(ranked, relevant, ks=ks, n_items=len(split.items), users=users,
                             n_boot=n_boot, seed=seed)


def retrieve_cases(retriever: Retriever, cases: EvalCases, k: int, *, batch: bool | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)`` ``(n_cases, k)``: the retriever's top ``k`` for every case, from the case's own
    history with it masked as seen (``-1``/``-inf`` pad).

    One case per user whose history is the retriever's stored one (``batch=None`` checks it) goes through
    ``retrieve(users)`` in one call; otherwise each case goes through ``retrieve_history``.
    """
    n = len(cases)
    ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0:
        return ids, scores
    if batch is None:
        batch = cases.one_per_user and all(
            np.array_equal(retriever.stored_history(int(u)), h) for u, h in zip(cases.users, cases.histories))
    if batch:
        got_ids, got_scores = retriever.retrieve(cases.users, k, exclude_seen=True)
        return np.asarray(got_ids, dtype=np.int64), np.asarray(got_scores, dtype=np.float32)
    for i, history in enumerate(cases.histories):
        got_ids, got_scores = retriever.retrieve_history(history, k, exclude_seen=True)
        ids[i, :got_ids.size] = got_ids
        scores[i, :got_scores.size] = got_scores
    return ids, scores


def evaluate_cases(ranked: np.ndarray, cases: EvalCases, n_items: int, *, ks: Sequence[int] = (10,),
                   n_boot: int = 1000, seed: int = 0) -> MetricReport:
    """Metrics of ``ranked`` (one row per case) against the cases' targets; intervals resample users, so a
    user with several cases (``last-n``) counts as one cluster."""
    return evaluate_rankings(ranked, cases.relevant, ks=ks, n_items=n_items, users=cases.users, n_boot=n_boot,
                             seed=seed, clusters=None if cases.one_per_user else cases.users)
