"""The online recommender: retrieval, then a reranker that keeps a latency budget.

:meth:`Recommender.recommend` runs, in order:

1. **retrieve** ``retrieve_k`` candidates from the retriever (the hybrid candidate generator of the
   artifact): by user id, or, when the request carries a history or the user has real-time events, from
   that history (:meth:`~retrieval.base.Retriever.retrieve_history`: the two-tower's query tower reads it,
   CF folds it in);
2. **filter** them (padding, duplicates, ``allow``/``deny``, seen items: :func:`filter_candidates`);
3. **plan** the shortlist size M from the latency model and the budget left (minus the micro-batcher's
   backlog and a margin), never above ``max_m`` nor the depth the ranker's hybrid head was chosen for on
   validation (:func:`pipeline.budget.plan_shortlist`);
4. **rerank** the top M with the cross-encoder, through the micro-batcher, waiting at most until the
   budget's deadline;
5. **blend** the cross-encoder score with the retrieval score and rank (:class:`~ranking.blend.HybridBlend`)
   when a blend is loaded, or the ranker carries its own validation-fitted one (its hybrid head); a head
   that did not beat the retrieval order on validation means the reranker is not run at all;
6. return the **top k** (the reranked M, then the rest of the retrieval order).

**Degrading**: when the budget left cannot cover ``min_m`` candidates, or the reranker raises, times out or
is overloaded, the answer keeps the retrieval order and says ``degraded`` with the reason; it is logged and
never raised. **Cold start**: an unknown user or an empty history gets popular items.
**Real time**: :meth:`Recommender.observe` appends to a user's history; the next request retrieves from the
new history and reranks with it (the ranker's history cache is keyed by the history's content, so nothing
stale is served); nothing is retrained.
**Explanations**: each item names the history items most similar to it in the retriever's item embedding
space (``because``; :mod:`pipeline.explain`).

The response types live in :mod:`pipeline.response`, the latency models in :mod:`pipeline.budget`, loading
in :mod:`pipeline.loading`; they are re-exported here.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from data.config import require
from data.errors import BudgetExceededError, ConfigError, DataValidationError, OverloadedError, UnknownIdError
from pipeline.budget import LatencyPredictor, LinearLatency, measure_latency, plan_shortlist
from pipeline.explain import Explainer, found_by
from pipeline.loading import check_vocabulary, load_parts
from pipeline.microbatch import MicroBatcher, ranker_scorer
from pipeline.recommender_config import RecommenderConfig
from pipeline.response import PATHS, STAGES, Recommendation, RecommendedItem, RetrievedItem
from ranking.residual import base_offsets, residual_base

log = logging.getLogger(__name__)


def stored_history(retriever: Any, user_id: int) -> np.ndarray:
    """``retriever.stored_history(user_id)``: the history it holds (item ids, oldest first; empty if unknown)."""
    return retriever.stored_history(int(user_id))


def popular_items(retriever: Any, k: int, *, exclude: Any = None, allow: Any = None,
                  deny: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``retriever.popular_items(k, ...)``: the cold-start list (1-D ids and scores); ``exclude`` are item ids."""
    return retriever.popular_items(k, exclude=exclude, allow=allow, deny=deny)


def filter_candidates(ids: np.ndarray, scores: np.ndarray, *, allow: np.ndarray | None = None,
                      deny: np.ndarray | None = None, seen: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Drop padding, ids outside ``allow``, ids in ``deny`` or ``seen``, and repeats (the first is kept);
    the order is kept."""
    keep = ids != -1
    if deny is not None and deny.size:
        keep &= ~np.isin(ids, deny)
    if allow is not None:
        keep &= np.isin(ids, allow)
    if seen is not None and seen.size:
        keep &= ~np.isin(ids, seen)
    ids, scores = ids[keep], scores[keep]
    _, first = np.unique(ids, return_index=True)
    if first.size != ids.size:
        order = np.sort(first)
        ids, scores = ids[order], scores[order]
    return ids, scores


def _is_user_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class Recommender:
    """Retrieval + budgeted reranking + real-time histories; see the module docstring.

    Args:
        retriever: any fitted :class:`~retrieval.base.Retriever` (the artifact's hybrid, usually).
        ranker: an :class:`~ranking.item_ranker.ItemTokenRanker` or a
            :class:`~ranking.cross_encoder.CrossEncoderRanker` (or anything with ``score``, ``score_lists``,
            ``items``, ``candidate_lengths`` and ``history_token_count``); ``None`` serves the retrieval order.
        blend: a fitted :class:`~ranking.blend.HybridBlend`, or ``None``: then the ranker's own hybrid head
            (``ranker.hybrid_head``, fitted on validation when it was trained) is served when it has one.
        latency: a latency model (:class:`LatencyPredictor`); ``None`` is calibrated at :meth:`warm_up`
            when ``config.calibrate``, else M is always ``max_m``.
        config: retrieval depth, M bounds, budget, explanations, threads, micro-batching.
        items: the item table (``title``...), indexed by ``item_id``, for titles in responses.
        info: what :meth:`describe` reports (artifact version, ranker folder...).
    """

    def __init__(self, retriever: Any, ranker: Any = None, *, blend: Any = None, latency: Any = None,
                 config: RecommenderConfig | None = None, items: Any = None,
                 info: dict[str, Any] | None = None) -> None:
        self.retriever = retriever
        self.ranker = ranker
        self.blend = blend
        self.latency = latency
        self.config = config or RecommenderConfig()
        self.items = items
        self.info = dict(info or {})
        if latency is not None and not isinstance(latency, LatencyPredictor):
            raise ConfigError(f"latency must have predict_ms() and max_candidates(); got {type(latency).__name__}")
        if blend is not None and getattr(blend, "n_sources", 0):
            raise ConfigError("this blend uses the 'source' feature, which the online path does not compute; "
                              "fit the blend with features ('ce', 'retrieval', 'log_rank')")
        own_head = blend is None and bool(getattr(ranker, "hybrid_head", None))
        if own_head:
            from ranking.blend import HybridBlend

            self.blend = blend = HybridBlend.from_dict(ranker.hybrid_head)
        if blend is not None:
            from ranking.blend import check_extra

            check_extra(blend, ranker)
        # the ranker's own head was chosen on validation for a shortlist size: rerank that deep (at most max_m)
        self.head_m: int | None = getattr(ranker, "head_m", None) if own_head else None
        # a blend that lost to the retrieval order in cross-validation would only reproduce that order: the
        # reranker is then not run at all (no latency spent on a list that cannot change)
        self.rerank_pays = not (blend is not None and not getattr(blend, "use_blend", True))
        # a ranker trained with the residual objective scores a correction of its base retrieval blend
        self.residual_base = residual_base(ranker)
        if ranker is not None:
            check_vocabulary(retriever, ranker)
            self._candidate_tokens = np.asarray(ranker.candidate_lengths(), dtype=np.float64)
        self._observed: OrderedDict[int, list[tuple[int, int]]] = OrderedDict()  # least recently changed first
        self.evicted_users = 0  # users dropped from memory at config.max_observed_users
        self._lock = threading.Lock()
        self.explainer = Explainer.from_retriever(retriever)
        self.batcher: MicroBatcher | None = None
        if ranker is not None:
            self.batcher = MicroBatcher(ranker_scorer(ranker), self.config.microbatch,
                                        on_start=self._thread_settings)
        self.warmed = False
        self._closed = False

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, artifact: str | Path, ranker: str | Path | None = None, *, blend: str | Path | None = None,
             latency: str | Path | None = None, config: RecommenderConfig | None = None,
             backend: str = "torch") -> Recommender:
        """Load and verify the pieces: ``artifact`` is a pipeline artifact (a version folder, or a root with
        ``LATEST``) or a saved retriever folder; ``ranker`` a saved cross-encoder folder; ``blend`` a blend
        JSON file; ``latency`` a saved latency model. Every manifest and checksum is checked, and a ranker
        whose catalogue does not cover the retriever's is refused (:class:`~data.errors.ArtifactError`)."""
        parts = load_parts(artifact, ranker, blend=blend, latency=latency, backend=backend,
                           threads=(config or RecommenderConfig()).threads)
        return cls(parts.retriever, parts.ranker, blend=parts.blend, latency=parts.latency, config=config,
                   items=parts.items, info=parts.info)

    def describe(self) -> dict[str, Any]:
        """What is loaded (for ``/readyz`` and logs)."""
        return {**self.info, "retriever": getattr(self.retriever, "name", type(self.retriever).__name__),
                "items": len(self.retriever.items), "users": len(self.retriever.users),
                "reranker": self.ranker is not None, "blend": self.blend is not None,
                "rerank_skipped": None if self.rerank_pays or self.ranker is None else
                "the blend did not beat the retrieval order on validation; serving that order",
                "latency_model": type(self.latency).__name__ if self.latency is not None else None,
                "microbatch": self.config.microbatch.to_dict(), "warmed": self.warmed}

    # ---- lifecycle ------------------------------------------------------------------------------
    def _thread_settings(self) -> None:
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)

    def set_threads(self, threads: int) -> None:
        """Serve every model with ``threads`` torch and FAISS threads (two-tower encoder, FAISS indexes,
        ranker backend), so concurrent requests do not oversubscribe the cores."""
        require(threads >= 1, f"threads must be >= 1, got {threads}")
        self.config = dataclasses.replace(self.config, threads=threads)
        self.retriever.set_threads(threads)
        backend = getattr(self.ranker, "backend", None)
        if backend is not None and hasattr(backend, "threads"):
            backend.threads = threads

    def start(self) -> Recommender:
        """Start the rerank worker (idempotent; :meth:`recommend` starts it on first use too)."""
        self._closed = False
        if self.batcher is not None:
            self.batcher.start()
        return self

    def close(self) -> None:
        """Stop the rerank worker (requests then keep the retrieval order until :meth:`start`)."""
        self._closed = True
        if self.batcher is not None:
            self.batcher.close()

    def warm_up(self, users: Sequence[int] | None = None) -> dict[str, Any]:
        """Run a few requests through every stage (first calls are slow), and calibrate the latency model
        when none was given (``ranking.latency.calibrate``, else a :class:`LinearLatency` fit on timings
        taken here). Returns what it did."""
        self.start()
        started = time.perf_counter()
        ids = self.retriever.users.ids
        count = min(self.config.warm_up_users, ids.size)
        if users is None:
            users = [int(u) for u in ids[:: max(1, ids.size // max(count, 1))][:count]]
        users = list(users)
        report: dict[str, Any] = {"users": len(users)}
        for user in users:
            self.recommend(int(user), k=10, budget_ms=60_000.0, explain=True)
        if self.ranker is not None and self.latency is None and self.config.calibrate:
            self.latency = self._calibrate(users)
            report["calibrated"] = type(self.latency).__name__
        self.warmed = True
        report["seconds"] = round(time.perf_counter() - started, 3)
        log.info("warm-up: %s", report)
        return report

    def _calibrate(self, users: Sequence[int]) -> Any:
        try:
            from ranking.latency import calibrate
        except ImportError:
            calibrate = None
        if calibrate is not None:
            try:
                return calibrate(self.ranker)
            except Exception as exc:  # noqa: BLE001 - fall back to the simple fit below
                log.warning("ranking.latency.calibrate failed (%s); fitting a linear latency model", exc)
        histories = [self._ranker_history(self.history(u)) for u in users]
        return measure_latency(self.ranker, lambda h, c: self.batcher.submit(h, c).result(timeout=60), histories,
                               self.retriever.items.ids, max_m=self.config.max_m)

    # ---- histories ------------------------------------------------------------------------------
    def history(self, user_id: int) -> np.ndarray:
        """The user's current history (item ids, oldest first): the stored one plus observed events."""
        base = self.retriever.stored_history(int(user_id))
        with self._lock:
            extra = self._observed.get(int(user_id))
            if not extra:
                return base
            return np.concatenate([base, np.fromiter((i for _, i in extra), dtype=np.int64)])

    def observe(self, user_id: int, item_id: int, ts: int | None = None) -> int:
        """Append an event to a user's history (known or new user); returns the history's new length.

        The next :meth:`recommend` reflects it at once (see the module docstring). Events are kept in
        ``ts`` order, at most ``config.max_observed`` per user and ``config.max_observed_users`` users (the
        least recently changed user is dropped from memory first); raises :class:`~data.errors.UnknownIdError` for an item outside the catalogue."""
        if not _is_user_id(user_id):
            raise DataValidationError(f"observe: user_id must be an integer id, got {user_id!r}")
        if not _is_user_id(item_id) or item_id not in self.retriever.items:
            raise UnknownIdError(f"observe: item_id {item_id!r} is not in the catalogue of "
                                 f"{len(self.retriever.items)} items; send events for known items only")
        stamp = int(ts) if ts is not None else int(time.time())
        with self._lock:
            events = self._observed.setdefault(int(user_id), [])
            self._observed.move_to_end(int(user_id))
            bisect.insort(events, (stamp, int(item_id)), key=lambda e: e[0])
            if len(events) > self.config.max_observed:
                del events[: len(events) - self.config.max_observed]
            while len(self._observed) > self.config.max_observed_users:
                self._observed.popitem(last=False)
                self.evicted_users += 1
        return int(self.history(int(user_id)).size)

    @property
    def observed_users(self) -> int:
        """Users whose real-time events are held in memory."""
        return len(self._observed)

    def observed(self, user_id: int) -> bool:
        with self._lock:
            return bool(self._observed.get(int(user_id)))

    def set_history(self, data: Any) -> Recommender:
        """Replace every user's stored history with ``data`` (an :class:`~data.dataset.Interactions`) and
        drop observed events; no retraining."""
        if not hasattr(self.retriever, "set_history"):
            raise ConfigError(f"{type(self.retriever).__name__} cannot set_history()")
        self.retriever.set_history(data)
        with self._lock:
            self._observed.clear()
        return self

    def unknown_items(self, item_ids: Any) -> list[int]:
        """The ids in ``item_ids`` outside the catalogue (for input validation)."""
        values = np.atleast_1d(np.asarray(item_ids, dtype=np.int64))
        if values.size == 0:
            return []
        rows = self.retriever.items.rows(values, missing="ignore")
        return values[rows < 0].tolist()

    def _ranker_history(self, history: np.ndarray) -> np.ndarray:
        """The history restricted to the ranker's catalogue."""
        if history.size == 0:
            return history
        return history[self.ranker.items.rows(history, missing="ignore") >= 0]

    # ---- recommending ---------------------------------------------------------------------------
    def _resolve(self, user: Any, history: Any) -> tuple[int | None, np.ndarray | None]:
        if user is not None and not _is_user_id(user):
            if history is not None:
                raise DataValidationError("recommend: pass a user id and/or history=[item ids], not two histories")
            user, history = None, user
        if history is not None:
            values = np.asarray(history)
            if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
                raise DataValidationError(f"history must be a 1-D list of integer item ids, got {history!r:.80}")
            history = values.astype(np.int64)
        if user is None and history is None:
            raise DataValidationError("recommend: pass a user id or a history of item ids")
        return (int(user) if user is not None else None), history

    def recommend(self, user: Any = None, k: int = 10, budget_ms: float | None = None, exclude_seen: bool = True,
                  allow: Any = None, deny: Any = None, *, history: Any = None, explain: bool = True,
                  started: float | None = None, include_retrieval: bool = False) -> Recommendation:
        """The top-``k`` items for a user id or a history (item ids, oldest first); see the module docstring.

        ``user`` may be a user id or a history; ``history=`` given with a user id replaces that user's
        history for this request. ``started`` (a ``time.perf_counter()`` value) is when the request
        arrived, so the budget covers what happened before the call. ``include_retrieval`` adds the
        retrieval order the list started from, with titles and the retrievers that found each candidate
        (:attr:`Recommendation.retrieval`); it is built after the timings are taken.
        """
        t0 = started if started is not None else time.perf_counter()
        c = self.config
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= c.max_k:
            raise DataValidationError(f"k must be an integer in [1, {c.max_k}], got {k!r}")
        budget = float(c.budget_ms if budget_ms is None else budget_ms)
        if not budget > 0:
            raise DataValidationError(f"budget_ms must be > 0, got {budget_ms!r}")
        user_id, explicit = self._resolve(user, history)
        if allow is not None:
            allow = np.asarray(list(allow), dtype=np.int64)
            bad = self.unknown_items(allow)
            if bad:
                raise UnknownIdError(f"allow: unknown item id(s) {bad[:5]}; list catalogue items only")
        if deny is not None:
            deny = np.asarray(list(deny), dtype=np.int64)
        timings: dict[str, float] = {}
        tick = time.perf_counter()

        # 1. retrieve
        hist = explicit if explicit is not None else self.history(user_id)
        if explicit is not None:
            hist = hist[self.retriever.items.rows(hist, missing="ignore") >= 0] if hist.size else hist
        depth = max(c.retrieve_k, k)
        by_history = False
        # a reranker reads the candidate list (a hybrid's fusion tuned for recall); without one the user
        # gets the served list (tuned for NDCG@10)
        wants_rerank = self.ranker is not None and c.rerank and (self.rerank_pays or not c.blend)
        source = self.retriever.for_candidates() if wants_rerank else self.retriever
        if hist.size == 0:
            path = "cold_start"
            ids, scores = self.retriever.popular_items(depth, allow=allow, deny=deny)
        else:
            path = "retrieval"
            by_history = explicit is not None or self.observed(user_id)
            if by_history:
                ids, scores = source.retrieve_history(hist, depth, exclude_seen=exclude_seen, allow=allow, deny=deny)
            else:
                ids, scores = source.retrieve(user_id, depth, exclude_seen=exclude_seen, allow=allow, deny=deny)
        tick = self._lap(timings, "retrieve", tick)

        # 2. filter
        ids, scores = filter_candidates(ids, scores, allow=allow, deny=deny, seen=hist if exclude_seen else None)
        tick = self._lap(timings, "filter", tick)

        # 3. plan
        m, reason = 0, None
        ranker_history = np.empty(0, np.int64)
        cost = 0.0
        if path != "cold_start" and wants_rerank and ids.size:
            ranker_history = self._ranker_history(hist)
            m, cost, reason = self._plan(ranker_history, ids, budget - (time.perf_counter() - t0) * 1000)
        tick = self._lap(timings, "plan", tick)

        # 4. rerank
        ce = None
        if m:
            ce, reason = self._rerank(ranker_history, ids[:m], cost, t0, budget, timings)
            m = m if ce is not None else 0
        tick = self._lap(timings, "rerank", tick)

        # 5. blend
        order = np.arange(ids.size)
        final = scores.astype(np.float64)
        if ce is not None:
            head = ce.astype(np.float64)
            if self.blend is not None and c.blend:
                head = self._blended(ce, scores[:m], ranker_history, ids[:m])
            elif self.residual_base is not None:
                head = base_offsets(self.residual_base, scores[None, :m])[0] + head
            top = np.argsort(-head, kind="stable")
            order = np.r_[top, np.arange(m, ids.size)]
            final = np.r_[head, scores[m:].astype(np.float64)]
            path = "reranked"
        tick = self._lap(timings, "blend", tick)

        # 6. top-k
        chosen = order[:k]
        because = self.explainer.because(ids[chosen], hist, top_n=c.explain_top_n if explain else 0,
                                         recent=c.explain_history)
        items = [
            RecommendedItem(item_id=int(ids[j]), rank=r + 1, score=float(final[j]), retrieval_score=float(scores[j]),
                            rerank_score=float(ce[j]) if ce is not None and j < m else None,
                            reranked=bool(ce is not None and j < m), because=because[r], title=self._title(ids[j]))
            for r, j in enumerate(chosen)
        ]
        timings["total"] = (time.perf_counter() - t0) * 1000
        degraded = reason is not None
        if degraded:
            log.info("degraded (%s) for user %s: %d candidates in retrieval order", reason, user_id, ids.size)
        retrieval = None
        if include_retrieval:
            shown = ids[: max(k, int(m))]
            sources = ([["popular"]] * shown.size if path == "cold_start" else
                       found_by(self.retriever, shown, user_id=user_id, history=hist, by_history=by_history,
                                depth=depth, exclude_seen=exclude_seen, allow=allow, deny=deny))
            retrieval = [RetrievedItem(item_id=int(i), rank=r + 1, score=float(scores[r]), title=self._title(i),
                                       sources=list(sources[r])) for r, i in enumerate(shown)]
        return Recommendation(items=items, path=path, degraded=degraded, degraded_reason=reason, reranked_m=int(m),
                              timings_ms={key: round(v, 3) for key, v in timings.items()}, budget_ms=budget,
                              user_id=user_id, history_length=int(hist.size), retrieval=retrieval)

    @staticmethod
    def _lap(timings: dict[str, float], stage: str, tick: float) -> float:
        now = time.perf_counter()
        timings[stage] = (now - tick) * 1000
        return now

    def _plan(self, history: np.ndarray, ids: np.ndarray, left_ms: float) -> tuple[int, float, str | None]:
        """``(M, predicted ms, reason)`` for the budget left (:func:`~pipeline.budget.plan_shortlist`), after
        the margins and the micro-batcher's backlog."""
        c = self.config
        cap = min(c.max_m, self.head_m) if self.head_m else c.max_m
        rows = self.ranker.items.rows(ids[: min(cap, ids.size)])
        if self.latency is None:
            return rows.size, 0.0, None
        backlog = self.batcher.backlog_ms if self.batcher is not None else 0.0
        history_tokens = self.ranker.history_token_count(self.ranker.items.rows(history))
        return plan_shortlist(self.latency, left_ms - c.plan_margin_ms - c.reserve_ms - backlog, history_tokens,
                              self._candidate_tokens[rows], min_m=c.min_m)

    def _rerank(self, history: np.ndarray, candidates: np.ndarray, cost: float, t0: float, budget: float,
                timings: dict[str, float]) -> tuple[np.ndarray | None, str | None]:
        """Cross-encoder scores through the batcher, or ``(None, reason)``; never raises."""
        wait_s = (budget - (time.perf_counter() - t0) * 1000 - self.config.reserve_ms) / 1000
        if wait_s <= 0:
            return None, "budget"
        if not self.batcher.running and not self._closed:
            self.batcher.start()
        try:
            future = self.batcher.submit(history, candidates, cost_ms=cost)
        except OverloadedError as exc:
            log.warning("reranker overloaded: %s", exc)
            return None, "overloaded"
        submitted = time.perf_counter()
        try:
            scores = future.result(timeout=wait_s)
        except FutureTimeout:
            future.cancel()
            log.warning("reranker timed out after %.1f ms (budget %.0f ms, %d candidates)", wait_s * 1000, budget,
                        candidates.size)
            return None, "timeout"
        except Exception as exc:  # noqa: BLE001 - a failing reranker degrades, it never fails the request
            log.warning("reranker failed (%s: %s); serving the retrieval order", type(exc).__name__, exc)
            return None, "error"
        if scores.shape != candidates.shape or not np.all(np.isfinite(scores)):
            log.warning("reranker returned %s scores for %d candidates (or non-finite ones); ignoring them",
                        scores.shape, candidates.size)
            return None, "error"
        if future.started:
            timings["rerank_wait"] = max(0.0, (future.started - submitted) * 1000)
        return scores, None

    def _blended(self, ce: np.ndarray, retrieval: np.ndarray, history: np.ndarray, candidates: np.ndarray
                 ) -> np.ndarray:
        from ranking.blend import extra_features

        extra = extra_features(self.blend, self.ranker, [history], candidates[None])
        return np.asarray(self.blend.score(ce[None], retrieval[None].astype(np.float64), extra=extra)[0],
                          dtype=np.float64)

    def _title(self, item_id: int) -> str | None:
        if self.items is None or "title" not in getattr(self.items, "columns", ()):
            return None
        value = self.items["title"].get(int(item_id))
        return None if value is None else str(value)

    # ---- plain reranking ------------------------------------------------------------------------
    def rerank(self, user_or_history: Any, candidates: Any, top_n: int | None = None, *,
               timeout_ms: float = 2000.0) -> list[dict[str, Any]]:
        """``[{item_id, score, index}]`` of ``candidates`` sorted by cross-encoder score (``index`` is the
        position in ``candidates``), cut to ``top_n``. Raises :class:`~data.errors.OverloadedError` when the
        queue is full, :class:`~data.errors.BudgetExceededError` after ``timeout_ms``."""
        if self.ranker is None:
            raise ConfigError("rerank: no reranker is loaded; start the service with --ranker")
        values = np.asarray(candidates)
        if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
            raise DataValidationError("candidates must be a 1-D list of integer item ids")
        values = values.astype(np.int64)
        bad = [int(i) for i in values if i not in self.ranker.items]
        if bad:
            raise UnknownIdError(f"candidates: unknown item id(s) {bad[:5]}; rank catalogue items only")
        if values.size == 0:
            return []
        if not self.batcher.running and not self._closed:
            self.batcher.start()
        if _is_user_id(user_or_history):
            history = self.history(int(user_or_history))
        else:
            history = np.asarray(user_or_history, dtype=np.int64)
        future = self.batcher.submit(self._ranker_history(history), values)
        try:
            scores = future.result(timeout=timeout_ms / 1000)
        except FutureTimeout:
            future.cancel()
            raise BudgetExceededError(f"rerank: the reranker did not answer within {timeout_ms:.0f} ms") from None
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [{"item_id": int(values[i]), "score": float(scores[i]), "index": int(i)} for i in order]


__all__ = [
    "PATHS",
    "STAGES",
    "LatencyPredictor",
    "LinearLatency",
    "Recommendation",
    "RecommendedItem",
    "Recommender",
    "RetrievedItem",
    "check_vocabulary",
    "filter_candidates",
    "popular_items",
    "stored_history",
]
