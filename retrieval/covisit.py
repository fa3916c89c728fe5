"""Co-visitation: how often other users took a candidate within a few events after what this user just took.

The counts behind two things: a retriever of its own (:mod:`retrieval.covisit_retriever`, scoring the whole
catalogue; a component of the default hybrid) and a feature of the reranker's hybrid head
(:mod:`ranking.blend`, feature ``"covisit"``, scoring a shortlist). Fitted
on the training events' per-user sequences (time order, then item id, as the protocols sort them): for
every pair of events ``(a, b)`` of one user with ``b`` at most ``window`` events after ``a``, the count
``C[a, b]`` grows by one. A request's score for candidate ``b`` is

    log(1 + sum_j C[h_j, b] / j)

over the history's ``recent`` most recent items ``h_1`` (the latest), ``h_2``, ... Items outside the
vocabulary it was fitted on (a new item, a padding id ``-1``) score 0.

Why it is there: the item-token cross-encoder and the two-tower both read the history as a sequence, yet
on ml-latest-small this one count, added to the head, raised its cross-validated validation NDCG@10 from
0.084 to 0.097 (leave-one-out); see the README's reranker section for the measured test effect.

Saved inside the folder of what reads it (:meth:`to_tensors` / :meth:`from_tensors`: three CSR arrays in
safetensors, the id vocabulary and config in that folder's manifest): the ranker's, so the counts travel
with the head, or the retriever's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from data.config import JsonConfig, require
from data.dataset import Interactions, sequences
from data.errors import ArtifactError, DataValidationError, NotFittedError
from data.vocab import IdVocab

TENSOR_NAMES = ("covisit_indptr", "covisit_indices", "covisit_data")


@dataclass
class CovisitConfig(JsonConfig):
    """What counts as a co-visit.

    Attributes:
        window: a pair ``(a, b)`` counts when ``b`` comes at most this many events after ``a`` in one
            user's sequence.
        recent: how many of a request's most recent history items vote (the j-th most recent with weight
            ``1/j``).
    """

    window: int = 3
    recent: int = 3

    def __post_init__(self) -> None:
        for name in ("window", "recent"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"CovisitConfig.{name} must be an integer >= 1, got {value!r}")


class Covisitation:
    """Co-visitation counts over an item vocabulary; see the module docstring.

    Args:
        config: the window and the number of recent history items that vote.
    """

    def __init__(self, config: CovisitConfig | None = None) -> None:
        self.config = config or CovisitConfig()
        self.items: IdVocab | None = None
        self.counts: sp.csr_matrix | None = None
        self.fingerprint = ""

    def fit(self, data: Interactions, items: IdVocab) -> Covisitation:
        """Count the pairs of ``data``'s per-user sequences over the catalogue ``items`` (events of items
        outside it are dropped first)."""
        if len(data) == 0:
            raise DataValidationError("Covisitation.fit: data has no events; pass a non-empty Interactions")
        frame = data.frame[data.frame["item_id"].isin(items.ids)]
        seqs = [s for s in sequences(frame, data.user_vocab(), items) if s.size > 1]
        rows, cols = [], []
        for lag in range(1, self.config.window + 1):
            for s in seqs:
                if s.size > lag:
                    rows.append(s[:-lag])
                    cols.append(s[lag:])
        n = len(items)
        r = np.concatenate(rows) if rows else np.empty(0, np.int64)
        c = np.concatenate(cols) if cols else np.empty(0, np.int64)
        counts = sp.coo_matrix((np.ones(r.size, dtype=np.float32), (r, c)), shape=(n, n)).tocsr()
        counts.sum_duplicates()
        self.items, self.counts, self.fingerprint = items, counts, data.fingerprint()
        return self

    def _check(self) -> None:
        if self.counts is None or self.items is None:
            raise NotFittedError("Covisitation: call fit() or from_tensors() before scoring")

    def _voters(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, weights)``: the ``recent`` latest of a history's catalogue rows (oldest first, unknown
        rows already dropped), latest first, with weights ``1/j``."""
        recent = np.asarray(rows, dtype=np.int64)[::-1][: self.config.recent]
        return recent, 1.0 / np.arange(1, recent.size + 1)

    def score(self, history: Any, candidates: Any) -> np.ndarray:
        """``(M,)`` scores of candidate ids (``-1`` pads score 0) for one history (item ids, oldest first)."""
        self._check()
        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 1:
            raise DataValidationError(f"candidates must be a 1-D array of item ids, got shape {candidates.shape}")
        history = np.asarray(history if history is not None else [], dtype=np.int64).ravel()
        out = np.zeros(candidates.size, dtype=np.float64)
        if history.size == 0 or candidates.size == 0:
            return out
        rows = self.items.rows(history, missing="ignore")
        recent, weights = self._voters(rows[rows >= 0])
        cols = self.items.rows(candidates, missing="ignore")
        known = cols >= 0
        if recent.size == 0 or not known.any():
            return out
        block = self.counts[recent][:, cols[known]].toarray()
        out[known] = np.log1p(weights @ block)
        return out

    def score_rows(self, histories: Sequence[np.ndarray]) -> sp.csr_matrix:
        """``(n, n_items)`` sparse float64: :meth:`score` of every catalogue item for histories given as
        catalogue ROWS (oldest first, no unknown ids). Only the items some recent item points at are stored
        (their scores are > 0; every other item scores 0), summed from the voters' rows of the counts in
        voter order, so a history costs the size of those rows, not of the catalogue."""
        self._check()
        counts = self.counts
        indptr, cols, scores = [0], [], []
        for rows in histories:
            recent, weights = self._voters(rows)
            starts, ends = counts.indptr[recent], counts.indptr[recent + 1]
            lengths = ends - starts
            if lengths.sum() == 0:
                indptr.append(indptr[-1])
                continue
            at = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
            votes = counts.data[at].astype(np.float64) * np.repeat(weights, lengths)
            items, where = np.unique(counts.indices[at], return_inverse=True)
            cols.append(items)
            scores.append(np.log1p(np.bincount(where, weights=votes, minlength=items.size)))
            indptr.append(indptr[-1] + items.size)
        empty = [np.empty(0)]
        return sp.csr_matrix((np.concatenate(scores + empty), np.concatenate(cols + empty).astype(np.int64), indptr),
                             shape=(len(histories), len(self.items)))

    def score_catalogue(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, n_items)`` float64: :meth:`score_rows` as a dense array (cost grows with the catalogue)."""
        return self.score_rows(histories).toarray()

    def score_lists(self, histories: Sequence[Any], candidates: np.ndarray) -> np.ndarray:
        """``(n, M)`` scores: row ``i`` is :meth:`score` of ``histories[i]`` and ``candidates[i]``."""
        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or candidates.shape[0] != len(histories):
            raise DataValidationError(f"candidates must be (n, M) for {len(histories)} histories, got shape "
                                      f"{candidates.shape}")
        out = np.zeros(candidates.shape, dtype=np.float64)
        for i, history in enumerate(histories):
            out[i] = self.score(history, candidates[i])
        return out

    # ---- persistence (inside the ranker's folder) ------------------------------------------------
    def to_tensors(self) -> dict[str, np.ndarray]:
        self._check()
        return {"covisit_indptr": self.counts.indptr.astype(np.int64),
                "covisit_indices": self.counts.indices.astype(np.int64),
                "covisit_data": self.counts.data.astype(np.float32)}

    def to_manifest(self) -> dict[str, Any]:
        self._check()
        return {"config": self.config.to_dict(), "items": self.items.to_json_dict(), "nnz": int(self.counts.nnz),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], manifest: dict[str, Any], where: str = "") -> Covisitation:
        """Rebuild from :meth:`to_tensors` and :meth:`to_manifest`; shapes that disagree with the
        vocabulary raise :class:`~data.errors.ArtifactError`."""
        try:
            model = cls(CovisitConfig.from_dict(manifest["config"]))
            items = IdVocab.from_json_dict(manifest["items"])
            indptr, indices, data = (np.asarray(tensors[k]) for k in TENSOR_NAMES)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: the co-visitation counts are incomplete ({exc}); re-fit them")
        n = len(items)
        if indptr.shape != (n + 1,) or indices.size != data.size or data.size != int(manifest.get("nnz", -1)) \
                or (indices.size and (indices.min() < 0 or indices.max() >= n)):
            raise ArtifactError(f"{where}: the co-visitation counts do not match their vocabulary of {n} items; "
                                "re-fit them")
        model.items = items
        model.counts = sp.csr_matrix((data, indices, indptr), shape=(n, n))
        model.fingerprint = str(manifest.get("fingerprint", ""))
        return model


__all__ = ["CovisitConfig", "Covisitation"]
