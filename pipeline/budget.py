"""Latency budgets: the latency-model contract, a linear fallback model, and the shortlist size M.

The recommender reranks the top M retrieval candidates, with M the most that the latency model predicts
fit in the budget left (:func:`plan_shortlist`). Any object with ``predict_ms`` and ``max_candidates``
(:class:`LatencyPredictor`; ``ranking.latency.LatencyModel`` has them) can plan; :class:`LinearLatency` is
the fallback fitted on a few timed calls (:func:`measure_latency`) and a fake for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from data.errors import DataValidationError


@runtime_checkable
class LatencyPredictor(Protocol):
    """What the recommender needs of a latency model (``ranking.latency.LatencyModel`` has it)."""

    def predict_ms(self, history_tokens: int, candidates: int, candidate_tokens: int, *,
                   cached_history: bool = False) -> float:
        """Predicted milliseconds to score ``candidates`` (``candidate_tokens`` in all) for one history."""

    def max_candidates(self, budget_ms: float, history_tokens: int, tokens_per_candidate: float, *,
                       cap: int) -> int:
        """The most candidates scored within ``budget_ms`` (0 when not even one fits), at most ``cap``."""


@dataclass
class LinearLatency:
    """A linear latency model, ``ms = intercept + per_candidate_token * candidate_tokens +
    per_history_token * history_tokens``: the fallback when ``ranking.latency`` gives none, and a fake
    for tests.

    Attributes:
        intercept: fixed milliseconds of a call.
        per_candidate_token: milliseconds per candidate token.
        per_history_token: milliseconds per history token.
    """

    intercept: float = 1.0
    per_candidate_token: float = 0.01
    per_history_token: float = 0.0

    def predict_ms(self, history_tokens: int, candidates: int, candidate_tokens: int, *,
                   cached_history: bool = False) -> float:
        """See :class:`LatencyPredictor`; a cached history costs nothing."""
        history = 0.0 if cached_history else self.per_history_token * history_tokens
        return self.intercept + history + self.per_candidate_token * candidate_tokens

    def max_candidates(self, budget_ms: float, history_tokens: int, tokens_per_candidate: float, *,
                       cap: int) -> int:
        """See :class:`LatencyPredictor`."""
        left = budget_ms - self.intercept - self.per_history_token * history_tokens
        per = self.per_candidate_token * max(tokens_per_candidate, 1.0)
        if left <= 0:
            return 0
        return int(min(cap, left / per if per > 0 else cap))

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> LinearLatency:
        """Least squares on ``(history_tokens, candidate_tokens, ms)`` samples (coefficients kept >= 0)."""
        data = np.asarray(samples, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] < 2:
            raise DataValidationError("LinearLatency.fit: pass at least two (history_tokens, candidate_tokens, "
                                      "ms) samples")
        design = np.c_[np.ones(len(data)), data[:, 1], data[:, 0]]
        coef, *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
        coef = np.maximum(coef, 0.0)
        if coef[1] == 0:  # degenerate timings: charge the mean cost per token
            coef[1] = float(np.mean(data[:, 2] / np.maximum(data[:, 1], 1.0)))
        return cls(float(coef[0]), float(coef[1]), float(coef[2]))


def plan_shortlist(latency: LatencyPredictor | None, available_ms: float, history_tokens: int,
                   candidate_tokens: np.ndarray, *, min_m: int) -> tuple[int, float, str | None]:
    """``(M, predicted ms, reason)``: how many of the candidates (``candidate_tokens``: each one's token
    count, in retrieval order, already cut to the cap ``max_m``) to rerank within ``available_ms``.

    Without a latency model M is the cap. When not even ``min(min_m, cap)`` candidates fit, M is 0 and the
    reason is ``"budget"`` (the request keeps the retrieval order); otherwise the reason is ``None``.
    """
    tokens = np.asarray(candidate_tokens, dtype=np.float64)
    cap = int(tokens.size)
    if latency is None or cap == 0:
        return cap, 0.0, None
    m = 0
    if available_ms > 0:
        m = int(latency.max_candidates(available_ms, history_tokens, float(tokens.mean()), cap=cap))
    m = min(m, cap)
    if m < min(min_m, cap):
        return 0, 0.0, "budget"
    return m, float(latency.predict_ms(history_tokens, m, int(tokens[:m].sum()))), None


def measure_latency(ranker: Any, score: Callable[[np.ndarray, np.ndarray], Any], histories: Sequence[np.ndarray],
                    pool: np.ndarray, *, max_m: int, seed: int = 0) -> LinearLatency:
    """A :class:`LinearLatency` fitted on timed ``score(history, candidates)`` calls (blocking): 1 to
    ``max_m`` random candidates from ``pool`` (item ids), for up to three of ``histories`` (ids in the
    ranker's catalogue); the token counts come from ``ranker.request_shape``."""
    histories = list(histories)[:3] or [np.empty(0, np.int64)]
    pool = np.asarray(pool, dtype=np.int64)
    rng = np.random.default_rng(seed)
    samples = []
    for size in (1, 8, 32, max_m):
        for history in histories:
            candidates = rng.choice(pool, size=min(size, pool.size), replace=False)
            shape = ranker.request_shape(history, candidates)
            tick = time.perf_counter()
            score(history, candidates)
            samples.append((shape["history_tokens"], shape["candidate_tokens"], (time.perf_counter() - tick) * 1000))
    return LinearLatency.fit(samples)


__all__ = ["LatencyPredictor", "LinearLatency", "measure_latency", "plan_shortlist"]
