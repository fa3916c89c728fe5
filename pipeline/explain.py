"""Explanations: per recommended item, the history items most similar to it ("because you watched ..."),
and, per retrieval candidate, which retrievers found it (:func:`found_by`).

Similarity is the cosine of the retriever's item embeddings (:meth:`~retrieval.base.Retriever.item_embeddings`:
the two-tower's item vectors, or CF factors). The co-visitation retriever has no embedding: its items are
explained by the history items other users most often took them right after (its counts). Any other
retriever without an embedding explains nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Explainer:
    """Names the history items most similar to each recommended item.

    Args:
        embeddings: ``(vectors, items)`` as :meth:`~retrieval.base.Retriever.item_embeddings` returns them
            (``(n_items, d)`` vectors and their :class:`~data.vocab.IdVocab`), or ``None``.
    """

    def __init__(self, embeddings: tuple[np.ndarray, Any] | None, covisit: Any = None) -> None:
        self.vectors: np.ndarray | None = None
        self.items = None
        #: co-visitation counts (:class:`~retrieval.covisit.Covisitation`), used when there is no embedding
        self.covisit = covisit if embeddings is None else None
        if self.covisit is not None:
            self.items = covisit.items
        if embeddings is not None:
            vectors, self.items = embeddings
            vectors = np.asarray(vectors, dtype=np.float32)
            self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    @classmethod
    def from_retriever(cls, retriever: Any) -> Explainer:
        """The explainer of ``retriever``'s item embeddings (or of its co-visitation counts, when it has
        those and no embedding)."""
        return cls(retriever.item_embeddings(), covisit=getattr(retriever, "covisit", None))

    def because(self, ids: np.ndarray, history: np.ndarray, *, top_n: int, recent: int) -> list[list[int]]:
        """Per item of ``ids``, up to ``top_n`` distinct items of the last ``recent`` of ``history`` (ids,
        oldest first), most similar first (ties: the older history position first); ``[]`` for an item or
        history outside the embedding's catalogue. With co-visitation counts instead, "similar" is how often
        other users took the item right after the history item, among the items that voted in its score (the
        counts' ``recent``), and items never taken after it are left out."""
        if (self.vectors is None and self.covisit is None) or history.size == 0 or ids.size == 0 or top_n < 1:
            return [[] for _ in ids]
        if self.vectors is None:  # only the items that voted in the co-visitation score can explain it
            recent = min(recent, self.covisit.config.recent)
        last = history[-recent:]
        h_rows = self.items.rows(last, missing="ignore")
        last, h_rows = last[h_rows >= 0], h_rows[h_rows >= 0]
        if last.size == 0:
            return [[] for _ in ids]
        i_rows = self.items.rows(ids, missing="ignore")
        if self.vectors is not None:
            sims = self.vectors[np.maximum(i_rows, 0)] @ self.vectors[h_rows].T
        else:  # counts C[h, i]: (items, history)
            sims = self.covisit.counts[h_rows][:, np.maximum(i_rows, 0)].toarray().T
        out = []
        for row, values in zip(i_rows, sims):
            picked: list[int] = []
            if row >= 0:
                for j in np.argsort(-values, kind="stable"):
                    if self.vectors is None and values[j] <= 0:
                        break
                    if int(last[j]) not in picked:
                        picked.append(int(last[j]))
                    if len(picked) == top_n:
                        break
            out.append(picked)
        return out


def found_by(retriever: Any, ids: np.ndarray, *, user_id: int | None, history: np.ndarray, by_history: bool,
             depth: int, exclude_seen: bool = True, allow: Any = None, deny: Any = None) -> list[list[str]]:
    """Per item of ``ids``, the names of the retrievers that returned it for this request.

    For a hybrid (a retriever with ``components``) these are its components: by user id from
    :meth:`~retrieval.hybrid.HybridRetriever.candidates` (fused list of ``depth``), by ``history`` (when
    ``by_history``: an explicit history or real-time events) from each component's ``retrieve_history``
    list at the hybrid's component depth. A single retriever found everything it returned. The retrieval
    is run again, so call this off the timed path.
    """
    components = getattr(retriever, "components", None)
    if not components:
        return [[str(getattr(retriever, "name", type(retriever).__name__))] for _ in ids]
    found: dict[int, list[str]] = {}
    if not by_history and user_id is not None and hasattr(retriever, "candidates"):
        got = retriever.candidates(int(user_id), depth, exclude_seen=exclude_seen, allow=allow, deny=deny)
        for item, row in zip(got.item_ids.tolist(), got.found):
            if item != -1:
                found[int(item)] = [name for name, hit in zip(got.sources, row) if hit]
    else:
        deep = retriever.depth(depth) if hasattr(retriever, "depth") else depth
        for name, component in components.items():
            got, _ = component.retrieve_history(history, deep, exclude_seen=exclude_seen, allow=allow, deny=deny)
            for item in got[got != -1].tolist():
                found.setdefault(int(item), []).append(str(name))
    return [found.get(int(item), []) for item in ids]


__all__ = ["Explainer", "found_by"]
