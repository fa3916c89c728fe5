"""Batch candidate generation: the top-N items of every user, written to Parquet, optionally with the top M
reranked by the cross-encoder (the offline twin of :class:`pipeline.recommender.Recommender`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.errors import ConfigError, DataValidationError
from data.io import atomic_path
from retrieval.base import Retriever, check_k

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Throughput of a batch run.

    Attributes:
        users: users written.
        rows: candidate rows written.
        seconds: wall time of retrieval plus writing.
        users_per_second: throughput.
        path: the Parquet file.
        reranked_m: candidates reranked per user (0: retrieval order only).
    """

    users: int
    rows: int
    seconds: float
    users_per_second: float
    path: Path
    reranked_m: int = 0


def rerank_lists(ranker: Any, histories: Sequence[np.ndarray], ids: np.ndarray, scores: np.ndarray, m: int, *,
                 blend: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rerank the first ``m`` columns of retrieval lists ``ids``/``scores`` (``(n, N)``, ``-1`` padding).

    The top ``m`` are ordered by the cross-encoder score (or by ``blend``'s hybrid score when given, the
    online path's rule), the rest keep the retrieval order. Returns ``(ids, scores, retrieval_scores,
    cross_encoder_scores)`` in the new order: ``scores`` is the score each item was ordered by and the
    cross-encoder scores are NaN outside the top ``m``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    m = min(int(m), ids.shape[1])
    ce = np.full(ids.shape, np.nan, dtype=np.float32)
    if ids.size == 0 or m == 0:
        return ids, scores, scores, ce
    head = ranker.score_lists(list(histories), ids[:, :m])
    ce[:, :m] = np.where(ids[:, :m] >= 0, head, np.nan)
    order_scores = head.astype(np.float64)
    if blend is not None:
        from ranking.blend import extra_features

        extra = extra_features(blend, ranker, histories, ids[:, :m])
        order_scores = blend.score(head, np.where(ids[:, :m] >= 0, scores[:, :m], -np.inf), extra=extra)
    order = np.argsort(-np.where(ids[:, :m] >= 0, order_scores, -np.inf), axis=1, kind="stable")
    full = np.concatenate([order, np.broadcast_to(np.arange(m, ids.shape[1]), (ids.shape[0], ids.shape[1] - m))],
                          axis=1)
    final = scores.astype(np.float64).copy()
    final[:, :m] = np.where(ids[:, :m] >= 0, order_scores, -np.inf)
    def pick(values: np.ndarray) -> np.ndarray:
        return np.take_along_axis(values, full, axis=1)

    return pick(ids), pick(final).astype(np.float32), pick(scores), pick(ce)


def generate_candidates(
    retriever: Retriever,
    out: str | Path,
    *,
    k: int = 100,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    exclude_seen: bool = True,
    progress: bool = True,
    ranker: Any = None,
    rerank_m: int = 50,
    blend: Any = None,
    histories: Callable[[int], np.ndarray] | None = None,
) -> BatchStats:
    """Write ``user_id, rank, item_id, score`` rows (rank 1 is best) for every user, atomically.

    ``users`` defaults to every user the retriever knows; padding (-1) rows are dropped. Without a ranker
    the lists are the retriever's served lists (what ``recommend`` returns); with one, its candidate lists
    (:meth:`~retrieval.base.Retriever.for_candidates`). With a ``ranker``
    the top ``rerank_m`` of each list are reranked (:func:`rerank_lists`, with ``blend`` when given, else the
    ranker's own hybrid head when it carries one) using
    each user's history (``histories(user_id)``, default: the history the retriever holds), and the file
    also gets ``retrieval_score``, ``rerank_score`` and ``reranked`` columns; reranking runs in batches of
    at most 64 users under a progress bar.
    """
    k = check_k(k)
    users = retriever.users.ids if users is None else np.asarray(users, dtype=np.int64)
    job = CandidateJob.prepare(retriever, k=k, exclude_seen=exclude_seen, ranker=ranker, rerank_m=rerank_m,
                               blend=blend, histories=histories)
    if ranker is not None:
        batch_size = min(batch_size, 64)
    started = time.perf_counter()
    parts = []
    for start in tqdm(range(0, users.size, batch_size), desc="candidates", unit="batch", disable=not progress):
        parts.append(job.frame(users[start : start + batch_size]))
    table = pd.concat(parts, ignore_index=True) if parts else job.frame(np.empty(0, dtype=np.int64))
    out = Path(out)
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    seconds = time.perf_counter() - started
    return BatchStats(users=int(users.size), rows=len(table), seconds=seconds,
                      users_per_second=users.size / seconds if seconds > 0 else float("inf"), path=out,
                      reranked_m=job.m)


@dataclass
class CandidateJob:
    """The per-batch work of :func:`generate_candidates`, shared by the single-process loop and the Ray Data
    actors of :mod:`pipeline.ray_batch` (so both engines write the same rows).

    Attributes:
        retriever: the fitted retriever.
        k: candidates per user.
        exclude_seen: drop items in the user's stored history.
        ranker: the cross-encoder (``None``: retrieval order only).
        m: candidates reranked per user (0 without a ranker).
        blend: the blend ordering the reranked top ``m`` (``None``: the cross-encoder score alone).
        histories: ``user_id -> history item ids`` for the ranker.
    """

    retriever: Retriever
    k: int
    exclude_seen: bool = True
    ranker: Any = None
    m: int = 0
    blend: Any = None
    histories: Callable[[int], np.ndarray] | None = None

    @classmethod
    def prepare(cls, retriever: Retriever, *, k: int = 100, exclude_seen: bool = True, ranker: Any = None,
                rerank_m: int = 50, blend: Any = None,
                histories: Callable[[int], np.ndarray] | None = None) -> CandidateJob:
        """Check the arguments (see :func:`generate_candidates`) and resolve the defaults: the stored
        histories and, without ``blend``, the ranker's own hybrid head."""
        k = check_k(k)
        if ranker is None:
            return cls(retriever, k, exclude_seen)
        if isinstance(rerank_m, bool) or not isinstance(rerank_m, (int, np.integer)) or rerank_m < 1:
            raise DataValidationError(f"rerank_m must be a positive integer, got {rerank_m!r}")
        from pipeline.recommender import check_vocabulary, stored_history

        check_vocabulary(retriever, ranker)
        histories = histories or (lambda u: stored_history(retriever, u))
        if blend is None and getattr(ranker, "hybrid_head", None):  # the ranker's own validation-fitted head
            from ranking.blend import HybridBlend

            blend = HybridBlend.from_dict(ranker.hybrid_head)
        if blend is not None:
            from ranking.blend import check_extra

            check_extra(blend, ranker)
        return cls(retriever, k, exclude_seen, ranker, min(int(rerank_m), k), blend, histories)

    def frame(self, batch: np.ndarray) -> pd.DataFrame:
        """The candidate rows of the users ``batch`` (padding dropped), in user then rank order."""
        batch = np.asarray(batch, dtype=np.int64)
        k = self.k
        if batch.size:
            # with a reranker, its candidate list (a hybrid's fusion tuned for recall); else the served list
            source = self.retriever.for_candidates() if self.ranker is not None else self.retriever
            ids, scores = source.retrieve(batch, k, exclude_seen=self.exclude_seen)
        else:
            ids, scores = np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        columns: dict[str, Any] = {}
        if self.ranker is not None:
            known = self.ranker.items
            hist = []
            for u in batch:
                h = np.asarray(self.histories(int(u)), dtype=np.int64)
                hist.append(h[known.rows(h, missing="ignore") >= 0] if h.size else h)
            ids, scores, retrieval, ce = rerank_lists(self.ranker, hist, ids, scores, self.m, blend=self.blend)
            columns = {"retrieval_score": retrieval.ravel().astype(np.float32),
                       "rerank_score": ce.ravel().astype(np.float32), "reranked": ~np.isnan(ce.ravel())}
        frame = pd.DataFrame({
            "user_id": np.repeat(batch, k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), batch.size),
            "item_id": np.asarray(ids, dtype=np.int64).ravel(),
            "score": np.asarray(scores).ravel().astype(np.float32),
            **columns,
        })
        return frame[frame["item_id"] != -1].reset_index(drop=True)


def read_users(path: str | Path) -> np.ndarray:
    """The ``user_id`` column of a Parquet file (int64; duplicates kept in order), with clear errors."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"--users {path}: no such file; give a Parquet file with a user_id column")
    try:
        frame = pd.read_parquet(path, columns=["user_id"])
    except Exception as exc:  # pyarrow raises several types for a missing column or a non-Parquet file
        raise DataValidationError(f"--users {path}: cannot read a user_id column from it ({exc}); give a "
                                  "Parquet file with an integer user_id column") from exc
    values = frame["user_id"]
    if values.isna().any() or not pd.api.types.is_integer_dtype(values.dtype):
        raise DataValidationError(f"--users {path}: user_id must be integers without nulls, got dtype "
                                  f"{values.dtype}")
    return values.to_numpy(dtype=np.int64)


def export_embeddings(retriever: Retriever, out: str | Path) -> list[Path]:
    """Write ``items.parquet`` and ``users.parquet`` (``item_id``/``user_id`` + ``embedding``) under ``out``.

    The user vectors are the query vectors the retriever searches with (stored factors for ALS/BPR, the
    query tower over the current history for the two-tower). A hybrid writes one sub-folder per
    component that has embeddings (co-visitation has none and is skipped, with a log line). Files are
    written atomically.
    """
    from retrieval.base import EmbeddingRetriever

    out = Path(out)
    components = getattr(retriever, "components", None)
    if components is not None:
        skipped = [name for name, comp in components.items() if not isinstance(comp, EmbeddingRetriever)]
        if skipped:
            log.info("export_embeddings: %s have no embeddings; skipped", skipped)
        return [p for name, comp in components.items() if name not in skipped
                for p in export_embeddings(comp, out / name)]
    if not isinstance(retriever, EmbeddingRetriever):
        raise ConfigError(f"export_embeddings: the {getattr(retriever, 'name', type(retriever).__name__)!r} "
                          "retriever learns no embeddings to export; export a model that has them (two_tower, "
                          "als, bpr, or a hybrid, which writes its components that have them)")
    users = np.arange(len(retriever.users))
    tables = {
        "items.parquet": pd.DataFrame({"item_id": retriever.items.ids,
                                       "embedding": list(np.asarray(retriever.item_factors))}),
        "users.parquet": pd.DataFrame({"user_id": retriever.users.ids,
                                       "embedding": list(np.asarray(retriever.user_vectors(users)))}),
    }
    written = []
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            table.to_parquet(tmp, index=False)
        written.append(out / name)
    return written
