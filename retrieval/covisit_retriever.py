"""Sequential co-visitation as a retriever: what other users took right after what this user just took.

Item ``b`` scores ``log(1 + sum_j C[h_j, b] / j)`` for a user whose most recent items are ``h_1`` (the
latest), ``h_2``, ... (:class:`~retrieval.covisit.Covisitation`: ``C[a, b]`` counts the training
sequences in which ``b`` came at most ``window`` events after ``a``). Items no recent item points at score
0 and follow in popularity order, so every list is full; a user with no history gets the popularity
fallback itself (scores are training-event counts, as in every retriever).

It has no vector index: scoring is an exact sparse product (:meth:`reindex` keeps it exact) that touches
only the items the recent items point at, then the popularity order fills the list, so a request's cost
grows with those neighbours and with ``k``, not with the catalogue. It learns no embedding, so it
gives no item similarity for explanations (:meth:`item_embeddings` is ``None``).

On ml-latest-small this count, alone, is the strongest single retriever (see the README's retrieval
table); it is a component of the default hybrid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data.dataset import ITEM, USER, Interactions, sequences, to_csr
from data.errors import ArtifactError, DataValidationError, NotFittedError, UnknownIdError
from data.io import atomic_path, file_checksums, library_versions, write_manifest
from data.protocol import Split
from data.vocab import IdVocab
from retrieval.base import (
    RETRIEVER_KIND,
    TENSORS_FILE,
    Retriever,
    as_history,
    as_user_array,
    check_k,
    known_rows,
    read_retriever_manifest,
)
from retrieval.covisit import Covisitation, CovisitConfig
from retrieval.index import as_id_array

log = logging.getLogger(__name__)

#: users scored by one sparse product when a batch is retrieved
_CHUNK_USERS = 1024


class CovisitRetriever(Retriever):
    """Scores the catalogue by co-visitation after each user's most recent items; see the module docstring.

    Attributes (after fit/load): ``covisit`` (the counts), ``popularity`` (training events per item, the
    tie-break and the fallback).
    """

    name = "covisit"
    config_type = CovisitConfig

    def __init__(self, config: CovisitConfig | None = None) -> None:
        self.config = config if config is not None else CovisitConfig()
        self.covisit: Covisitation | None = None
        self.popularity: np.ndarray | None = None
        self._sequences: list[np.ndarray] = []
        self._fingerprint = ""
        self._by_popularity: np.ndarray | None = None

    # ---- learning -------------------------------------------------------------------------------
    def fit(self, data: Interactions, *, items: IdVocab | None = None, validation: Split | None = None
            ) -> CovisitRetriever:
        """Count ``data``'s co-visits over the catalogue ``items`` (default: the items in ``data``);
        ``data``'s events become the users' histories. ``validation`` is unused (nothing stops early)."""
        if len(data) == 0:
            raise DataValidationError("fit: data has no events; pass a non-empty Interactions")
        self.users = data.user_vocab()
        self.items = items if items is not None else data.item_vocab()
        self.covisit = Covisitation(self.config).fit(data, self.items)
        known = data.frame[data.frame[ITEM].isin(self.items.ids)]
        self.popularity = np.asarray(to_csr(known, self.users, self.items).sum(axis=0),
                                     dtype=np.float32).ravel()
        self._by_popularity = None
        self._sequences = sequences(known, self.users, self.items)
        self._fingerprint = data.fingerprint()
        return self

    def set_history(self, data: Interactions) -> CovisitRetriever:
        """Replace the users' histories with ``data`` (the counts stay as fitted); users outside the
        vocabulary keep the cold-start fallback."""
        self._check_fitted("set_history")
        known = data.frame[data.frame[USER].isin(self.users.ids) & data.frame[ITEM].isin(self.items.ids)]
        self._sequences = sequences(known, self.users, self.items)
        self._fingerprint = data.fingerprint()
        return self

    def reindex(self, config: Any) -> CovisitRetriever:
        """Nothing to re-index: co-visitation scores the catalogue exactly from its sparse counts (a hybrid
        re-indexing its components leaves this one exact)."""
        log.debug("covisit: no vector index; %s ignored, scoring stays exact", config)
        return self

    @property
    def history_fingerprint(self) -> str:
        return self._fingerprint

    def _check_fitted(self, method: str) -> None:
        if self.covisit is None:
            raise NotFittedError(f"{type(self).__name__}: call fit() or load() before {method}()")

    # ---- scoring --------------------------------------------------------------------------------
    def _banned(self, history_rows: np.ndarray | None, deny: Any) -> np.ndarray:
        parts = [] if history_rows is None else [history_rows]
        if deny is not None:
            rows = self.items.rows(as_id_array(deny, "deny"), missing="ignore")
            parts.append(rows[rows >= 0])
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)

    def _allowed(self, allow: Any) -> np.ndarray | None:
        if allow is None:
            return None
        try:
            return np.unique(self.items.rows(as_id_array(allow, "allow"), missing="raise"))
        except UnknownIdError as exc:
            raise UnknownIdError(f"covisit: allow lists ids outside the catalogue ({exc}); filter the allow "
                                 "list with [i for i in allow if i in retriever.items]") from exc

    def _popular_order(self) -> np.ndarray:
        """Every catalogue row, most popular first (ties: catalogue order), computed once per fit/load."""
        if self._by_popularity is None:
            self._by_popularity = np.lexsort((np.arange(self.popularity.size), -self.popularity))
        return self._by_popularity

    def _fill(self, n: int, exclude: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The ``n`` most popular rows outside ``exclude`` (sorted, unique), within ``allowed`` if given;
        fewer when the catalogue runs out. Reads ``n + len(exclude)`` rows of the popularity order at most."""
        if allowed is not None:
            pool = allowed[np.lexsort((allowed, -self.popularity[allowed]))]
        else:
            pool = self._popular_order()[: n + exclude.size]
        return pool[~np.isin(pool, exclude, assume_unique=True)][:n]

    def _top(self, cols: np.ndarray, scores: np.ndarray, k: int, banned: np.ndarray,
             allowed: np.ndarray | None, fill_score: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of the items ``cols`` scoring ``scores`` (> 0; every other item scores 0), ties broken
        by popularity, then catalogue order; the zero-scored rest follows in popularity order (scored
        ``fill_score[row]``, else 0) until ``k``, then ``-1``/``-inf`` pads. Cost grows with ``cols``, not
        with the catalogue."""
        keep = ~np.isin(cols, banned)
        if allowed is not None:
            keep &= np.isin(cols, allowed)
        cols, scores = cols[keep], scores[keep]
        if cols.size > k:
            kth = np.partition(scores, cols.size - k)[cols.size - k]
            tied = scores >= kth
            cols, scores = cols[tied], scores[tied]
        order = np.lexsort((cols, -self.popularity[cols], -scores))[:k]
        chosen, chosen_scores = cols[order], scores[order]
        if chosen.size < k:
            rest = self._fill(k - chosen.size, np.union1d(banned, chosen), allowed)
            chosen = np.concatenate([chosen, rest])
            chosen_scores = np.concatenate([chosen_scores, fill_score[rest] if fill_score is not None
                                            else np.zeros(rest.size)])
        ids = np.full(k, -1, dtype=np.int64)
        out = np.full(k, -np.inf, dtype=np.float32)
        ids[:chosen.size] = self.items.external(chosen)
        out[:chosen.size] = chosen_scores
        return ids, out

    def _popular_row(self, k: int, banned: np.ndarray, allowed: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The cold-start answer: popular items, scored by their training-event counts."""
        empty = np.empty(0, dtype=np.int64)
        return self._top(empty, np.empty(0), k, banned, allowed, fill_score=self.popularity)

    # ---- serving --------------------------------------------------------------------------------
    def retrieve(self, user_ids, k, *, exclude_seen=True, allow=None, deny=None):
        self._check_fitted("retrieve")
        k = check_k(k)
        ids, scalar = as_user_array(user_ids)
        rows = self.users.rows(ids, missing="ignore")
        allowed = self._allowed(allow)
        out_ids = np.full((ids.size, k), -1, dtype=np.int64)
        out_scores = np.full((ids.size, k), -np.inf, dtype=np.float32)
        histories = [self._sequences[r] if r >= 0 else np.empty(0, np.int64) for r in rows]
        warm = np.flatnonzero([h.size > 0 for h in histories])
        for start in range(0, warm.size, _CHUNK_USERS):
            part = warm[start:start + _CHUNK_USERS]
            scores = self.covisit.score_rows([histories[i] for i in part])
            for j, i in enumerate(part):
                got = slice(scores.indptr[j], scores.indptr[j + 1])
                banned = self._banned(histories[i] if exclude_seen else None, deny)
                out_ids[i], out_scores[i] = self._top(scores.indices[got], scores.data[got], k, banned, allowed)
        for i in np.setdiff1d(np.arange(ids.size), warm):  # unknown users, or known with no events now
            banned = self._banned(histories[i] if exclude_seen else None, deny)
            out_ids[i], out_scores[i] = self._popular_row(k, banned, allowed)
        if scalar:
            return out_ids[0], out_scores[0]
        return out_ids, out_scores

    def retrieve_history(self, history, k, *, exclude_seen=True, allow=None, deny=None):
        """Top-``k`` 1-D ``(item_ids, scores)`` after an explicit history (external ids, oldest first);
        unknown ids are skipped, and a history with no catalogue item gets :meth:`popular_items`."""
        self._check_fitted("retrieve_history")
        k = check_k(k)
        rows = known_rows(self.items, as_history(history))
        banned = self._banned(rows if exclude_seen else None, deny)
        if rows.size == 0:
            return self._popular_row(k, banned, self._allowed(allow))
        scores = self.covisit.score_rows([rows])
        return self._top(scores.indices, scores.data, k, banned, self._allowed(allow))

    def popular_items(self, k, *, exclude=None, allow=None, deny=None):
        self._check_fitted("popular_items")
        rows = known_rows(self.items, as_history(exclude, "exclude"))
        return self._popular_row(check_k(k), self._banned(rows, deny), self._allowed(allow))

    def stored_history(self, user_id: int) -> np.ndarray:
        """The user's sequence (every event, oldest first); empty for an unknown user."""
        self._check_fitted("stored_history")
        if user_id not in self.users:
            return np.empty(0, dtype=np.int64)
        return self.items.external(self._sequences[self.users.row(int(user_id))])

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the counts, popularity and histories (safetensors) and a manifest, atomically."""
        from safetensors.numpy import save_file

        self._check_fitted("save")
        folder = Path(folder)
        lengths = np.array([s.size for s in self._sequences], dtype=np.int64)
        tensors = {**self.covisit.to_tensors(), "popularity": self.popularity,
                   "history_indptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   "history_rows": np.concatenate(self._sequences + [np.empty(0, np.int64)]).astype(np.int64),
                   "user_ids": self.users.ids.astype(np.int64), "item_ids": self.items.ids.astype(np.int64)}
        counts = self.covisit.to_manifest()
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            write_manifest(tmp, {
                "kind": RETRIEVER_KIND, "model": self.name, "config": self.config.to_dict(),
                "users": self.users.to_json_dict(), "items": self.items.to_json_dict(),
                "history_fingerprint": self._fingerprint,
                "counts": {"nnz": counts["nnz"], "fingerprint": counts["fingerprint"]},
                "versions": library_versions(), "files": file_checksums(tmp, [TENSORS_FILE]),
            })
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CovisitRetriever:
        """Load a folder written by :meth:`save`; refuses one whose files or vocabularies do not match."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest = read_retriever_manifest(folder, cls.name)
        try:
            model = cls(CovisitConfig.from_dict(manifest["config"]))
            model.users = IdVocab.from_json_dict(manifest["users"])
            model.items = IdVocab.from_json_dict(manifest["items"])
            counts = {"config": manifest["config"], "items": manifest["items"], **manifest["counts"]}
        except KeyError as exc:
            raise ArtifactError(f"{folder}: manifest lacks {exc}; re-save the retriever") from exc
        tensors = load_file(str(folder / TENSORS_FILE))
        indptr = tensors["history_indptr"]
        if not (np.array_equal(tensors["user_ids"], model.users.ids)
                and np.array_equal(tensors["item_ids"], model.items.ids)
                and tensors["popularity"].shape == (len(model.items),)
                and indptr.shape == (len(model.users) + 1,)):
            raise ArtifactError(f"{folder}: the saved arrays do not match the manifest's id vocabularies; "
                                "re-save the retriever")
        model.covisit = Covisitation.from_tensors(tensors, counts, str(folder))
        model.popularity = tensors["popularity"]
        rows = tensors["history_rows"]
        model._sequences = [rows[indptr[i]:indptr[i + 1]] for i in range(len(model.users))]
        model._fingerprint = manifest["history_fingerprint"]
        return model


__all__ = ["CovisitRetriever"]
