"""What the online recommender answers: :class:`Recommendation` (one request) of :class:`RecommendedItem`,
and, when asked, the retrieval order it started from (:class:`RetrievedItem`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: How a response was produced (:attr:`Recommendation.path`).
PATHS = ("reranked", "retrieval", "cold_start")
#: The timed stages of a request (:attr:`Recommendation.timings_ms`).
STAGES = ("retrieve", "filter", "plan", "rerank", "blend", "total")


@dataclass
class RecommendedItem:
    """One recommended item.

    Attributes:
        item_id: external item id.
        rank: 1-based position.
        score: the score it was ordered by (blended or cross-encoder score inside the reranked shortlist,
            retrieval score outside it).
        retrieval_score: its retrieval score.
        rerank_score: its cross-encoder score, ``None`` when it was not reranked.
        reranked: whether it was in the reranked shortlist.
        because: history item ids that most influenced it (most similar first).
        title: its title, when the artifact has an item table.
    """

    item_id: int
    rank: int
    score: float
    retrieval_score: float
    rerank_score: float | None = None
    reranked: bool = False
    because: list[int] = field(default_factory=list)
    title: str | None = None


@dataclass
class RetrievedItem:
    """One candidate of the retrieval order, before reranking (``include_retrieval=True`` only).

    Attributes:
        item_id: external item id.
        rank: 1-based position in the filtered retrieval order.
        score: its retrieval score.
        title: its title, when the artifact has an item table.
        sources: the retrievers that found it (the components of a hybrid; ``["popular"]`` on cold start).
    """

    item_id: int
    rank: int
    score: float
    title: str | None = None
    sources: list[str] = field(default_factory=list)


@dataclass
class Recommendation:
    """What :meth:`pipeline.recommender.Recommender.recommend` returns.

    Attributes:
        items: the top-k items, best first.
        path: ``"reranked"``, ``"retrieval"`` (retrieval order: degraded, or no reranker) or
            ``"cold_start"`` (popular items).
        degraded: the reranker was wanted but skipped (budget, timeout, error, overload).
        degraded_reason: why (``"budget"``, ``"timeout"``, ``"error"``, ``"overloaded"``), else ``None``.
        reranked_m: how many candidates the reranker scored (0 when none).
        timings_ms: milliseconds per stage (``retrieve``, ``filter``, ``plan``, ``rerank``, ``blend``,
            ``total``; ``rerank_wait`` when the job queued).
        budget_ms: the request's budget.
        user_id: the user, when the request named one.
        history_length: items in the history used.
        retrieval: the filtered retrieval order the list started from (its first ``max(k, reranked_m)``
            candidates), only when the request asked for it (``include_retrieval``); else ``None``, and
            left out of :meth:`to_dict`.
    """

    items: list[RecommendedItem]
    path: str
    degraded: bool
    degraded_reason: str | None
    reranked_m: int
    timings_ms: dict[str, float]
    budget_ms: float
    user_id: int | None = None
    history_length: int = 0
    retrieval: list[RetrievedItem] | None = None

    @property
    def item_ids(self) -> list[int]:
        """The recommended item ids, best first."""
        return [i.item_id for i in self.items]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what the HTTP service returns); ``retrieval`` only when it was asked for."""
        out = dataclasses.asdict(self)
        if self.retrieval is None:
            del out["retrieval"]
        return out


__all__ = ["PATHS", "STAGES", "Recommendation", "RecommendedItem", "RetrievedItem"]
