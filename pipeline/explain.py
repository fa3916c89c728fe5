"""Explanations: per recommended item, the history items most similar to it ("because you watched ...").

Similarity is the cosine of the retriever's item embeddings (:meth:`~retrieval.base.Retriever.item_embeddings`:
the two-tower's item vectors, or CF factors); a retriever without one explains nothing.
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

    def __init__(self, embeddings: tuple[np.ndarray, Any] | None) -> None:
        self.vectors: np.ndarray | None = None
        self.items = None
        if embeddings is not None:
            vectors, self.items = embeddings
            vectors = np.asarray(vectors, dtype=np.float32)
            self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    @classmethod
    def from_retriever(cls, retriever: Any) -> Explainer:
        """The explainer of ``retriever``'s item embeddings."""
        return cls(retriever.item_embeddings())

    def because(self, ids: np.ndarray, history: np.ndarray, *, top_n: int, recent: int) -> list[list[int]]:
        """Per item of ``ids``, up to ``top_n`` distinct items of the last ``recent`` of ``history`` (ids,
        oldest first), most similar first (ties: the older history position first); ``[]`` for an item or
        history outside the embedding's catalogue."""
        if self.vectors is None or history.size == 0 or ids.size == 0 or top_n < 1:
            return [[] for _ in ids]
        last = history[-recent:]
        h_rows = self.items.rows(last, missing="ignore")
        last, h_rows = last[h_rows >= 0], h_rows[h_rows >= 0]
        if last.size == 0:
            return [[] for _ in ids]
        i_rows = self.items.rows(ids, missing="ignore")
        sims = self.vectors[np.maximum(i_rows, 0)] @ self.vectors[h_rows].T
        out = []
        for row, values in zip(i_rows, sims):
            picked: list[int] = []
            if row >= 0:
                for j in np.argsort(-values, kind="stable"):
                    if int(last[j]) not in picked:
                        picked.append(int(last[j]))
                    if len(picked) == top_n:
                        break
            out.append(picked)
        return out


__all__ = ["Explainer"]
