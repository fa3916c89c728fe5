"""The retrieval contract and the embedding retriever every model builds on.

``retrieve(user_ids, k) -> (item_ids, scores)``: a scalar user id gives 1-D arrays of length ``k``; an
array of ids gives 2-D ``(n, k)`` arrays. Ids are external ids; scores are higher-is-better; missing
results are padded with id -1 and score -inf, as FAISS does. Users the model has never seen get the
popularity fallback instead of an error.

``retrieve_history(history, k) -> (item_ids, scores)``: the same for ONE user given as an explicit history
(external item ids, oldest first; 1-D results, same padding), so a request's own history or events observed
since training change the answer without retraining. Item ids outside the catalogue are skipped; an empty
history gets the popularity fallback. ``stored_history(user_id)`` is the history the retriever holds for a
user, in that form; ``popular_items(k)`` is the fallback list itself.

The model (factors or towers), its training and its serving are separate: a subclass only says how it
learns item vectors and how it turns a user into a query vector; this class owns the FAISS index, the
seen-item mask and the fallback.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from data.dataset import ITEM, TIME, USER, Interactions, to_csr
from data.errors import ArtifactError, DataValidationError, NotFittedError
from data.io import atomic_path, file_checksums, library_versions, read_manifest, write_manifest
from data.protocol import Split
from data.vocab import IdVocab
from retrieval.index import IndexConfig, ItemIndex

log = logging.getLogger(__name__)

RETRIEVER_KIND = "retriever"
TENSORS_FILE = "tensors.safetensors"
INDEX_DIR = "index"


def as_user_array(user_ids: Any) -> tuple[np.ndarray, bool]:
    """``(ids, scalar)``: the ids as int64 1-D array and whether the caller passed a scalar."""
    scalar = np.ndim(user_ids) == 0
    values = np.atleast_1d(np.asarray(user_ids))
    if values.ndim != 1:
        raise DataValidationError(f"user_ids must be a scalar or a 1-D array, got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        try:
            as_int = values.astype(np.int64)
            if values.dtype.kind == "f" and not np.array_equal(as_int, values):
                raise ValueError
            values = as_int
        except (TypeError, ValueError) as exc:
            raise DataValidationError(
                f"user_ids must be integer ids, got {values[:3].tolist()}; pass the dataset's user ids"
            ) from exc
    return values.astype(np.int64, copy=False), scalar


def check_k(k: Any) -> int:
    """``k`` as an int; raises :class:`DataValidationError` unless it is a positive integer."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataValidationError(f"k must be a positive integer, got {k!r}")
    return int(k)


def as_history(history: Any, name: str = "history") -> np.ndarray:
    """One user's history (external item ids, oldest first) as an int64 1-D array; ``None`` is empty."""
    if history is None:
        return np.empty(0, dtype=np.int64)
    values = np.asarray(history)
    if values.ndim != 1:
        raise DataValidationError(
            f"{name} must be a 1-D list of item ids (one user, oldest first), got shape {values.shape}; "
            "call once per user"
        )
    if values.size and not np.issubdtype(values.dtype, np.integer):
        as_int = values.astype(np.int64) if values.dtype.kind == "f" else None
        if as_int is None or not np.array_equal(as_int, values):
            raise DataValidationError(f"{name} must hold integer item ids, got {values[:3].tolist()}")
        values = as_int
    return values.astype(np.int64, copy=False)


def known_rows(items: IdVocab, history: np.ndarray) -> np.ndarray:
    """Catalogue rows of the ids in ``history`` that are in ``items`` (order kept, unknown ids skipped)."""
    if history.size == 0:
        return np.empty(0, dtype=np.int64)
    rows = items.rows(history, missing="ignore")
    if (rows < 0).any():
        log.debug("skipping %d item ids outside the catalogue", int((rows < 0).sum()))
    return rows[rows >= 0]


def seen_matrix(frame: Any, users: IdVocab, items: IdVocab) -> sp.csr_matrix:
    """The binary user x item matrix of :func:`~data.dataset.to_csr`, but each row's item columns in time
    order (of the item's latest event, ties by item id), so the seen masks also keep the history's order
    (:meth:`EmbeddingRetriever.stored_history`). CSR rows need not be sorted for row slicing and search."""
    f = frame.sort_values([TIME, ITEM], kind="stable")
    rows = users.rows(f[USER].to_numpy())
    cols = items.rows(f[ITEM].to_numpy())
    key = rows * len(items) + cols
    _, last_from_end = np.unique(key[::-1], return_index=True)
    keep = np.sort(key.size - 1 - last_from_end)  # each (user, item) once, at its latest event, in time order
    rows, cols = rows[keep], cols[keep]
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(users)), out=indptr[1:])
    return sp.csr_matrix((np.ones(cols.size, dtype=np.float32), cols, indptr), shape=(len(users), len(items)))


def read_retriever_manifest(folder: Path, name: str) -> dict[str, Any]:
    """The checked manifest of a saved retriever (:func:`~data.io.read_manifest`: kind and checksums),
    refused unless it holds the model ``name``."""
    manifest = read_manifest(folder, kind=RETRIEVER_KIND)
    if manifest.get("model") != name:
        raise ArtifactError(f"{folder}: holds a {manifest.get('model')!r} retriever, not {name!r}; use "
                            "retrieval.load_retriever(folder) to load any kind")
    return manifest


class Retriever(ABC):
    """Abstract retrieval stage. See the module docstring for the contract."""

    name: ClassVar[str] = "retriever"
    users: IdVocab
    items: IdVocab

    @abstractmethod
    def fit(self, data: Interactions, *, items: IdVocab | None = None, validation: Split | None = None
            ) -> Retriever:
        """Learn from ``data``; ``items`` fixes the catalogue (default: the items in ``data``).

        ``validation`` is a :class:`~data.protocol.Split` whose ``history("val")`` is ``data``: models that
        train iteratively stop early on its validation targets, composites tune on them; the others ignore
        it. ``data``'s events become the users' histories.
        """

    @abstractmethod
    def set_history(self, data: Interactions) -> Retriever:
        """Replace the users' histories with ``data`` without retraining (the test stage reads train +
        validation); users outside the vocabulary keep the cold-start fallback. Returns ``self``."""

    @abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write the fitted retriever to ``folder`` atomically, with a manifest holding its config and id
        vocabularies; :func:`retrieval.registry.load_retriever` loads any kind back."""

    @classmethod
    @abstractmethod
    def load(cls, folder: str | Path) -> Retriever:
        """Load a folder written by :meth:`save`; refuses one whose files or vocabularies do not match."""

    @abstractmethod
    def retrieve(
        self,
        user_ids: Any,
        k: int,
        *,
        exclude_seen: bool = True,
        allow: Any = None,
        deny: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user; see the module docstring."""

    @abstractmethod
    def popular_items(self, k: int, *, exclude: Any = None, allow: Any = None,
                      deny: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most popular items as 1-D ``(ids, scores)``: the cold-start answer. ``exclude`` are item
        ids left out (like ``deny``; unknown ids are ignored)."""

    @abstractmethod
    def stored_history(self, user_id: int) -> np.ndarray:
        """The history the retriever holds for ``user_id``: external item ids, oldest first; empty for an
        unknown user."""

    def retrieve_history(
        self,
        history: Any,
        k: int,
        *,
        exclude_seen: bool = True,
        allow: Any = None,
        deny: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` 1-D ``(item_ids, scores)`` for one user's explicit ``history`` (external item ids, oldest
        first); ``exclude_seen`` leaves the history's items out. See the module docstring.

        This default is for models that cannot read a history: the popularity fallback
        (:meth:`popular_items`) with the history's items excluded when ``exclude_seen``. Models that can
        (the embedding retrievers, the hybrid) override it.
        """
        k = check_k(k)
        values = as_history(history)
        return self.popular_items(k, exclude=values if exclude_seen else None, allow=allow, deny=deny)

    def for_candidates(self) -> Retriever:
        """The retriever whose order feeds a reranker. This default is ``self``; a hybrid returns a view
        that uses its fusion tuned for recall at the reranker's depth, while ``retrieve`` itself gives the
        list served without a reranker."""
        return self

    def item_embeddings(self) -> tuple[np.ndarray, IdVocab] | None:
        """``(vectors, items)``: an ``(n_items, d)`` item embedding whose cosine similarity says which
        items are alike (for explanations), or ``None`` when the model has none (this default)."""
        return None

    def set_threads(self, threads: int) -> None:
        """Serve with ``threads`` CPU threads (model and index); this default changes nothing."""

    @property
    @abstractmethod
    def history_fingerprint(self) -> str:
        """Fingerprint of the events the retriever currently treats as users' histories."""


class EmbeddingRetriever(Retriever):
    """A retriever that scores items by the inner product of a user vector and item vectors.

    Subclasses implement :meth:`_learn` (item vectors and stored user vectors from the user x item
    matrix) and may override :meth:`user_vectors` (the two-tower model computes them from history) and
    :meth:`history_query` (the query vector of an explicit history: a fold-in; without one,
    :meth:`retrieve_history` gives popular items).
    """

    #: The subclass's typed config class (its default instance is used when no config is given).
    config_type: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_type()
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.popularity: np.ndarray | None = None
        self.seen: sp.csr_matrix | None = None
        self.index: ItemIndex | None = None
        self._fallback: ItemIndex | None = None
        self._fingerprint = ""

    # ---- learning -------------------------------------------------------------------------------
    @abstractmethod
    def _learn(self, matrix: sp.csr_matrix, *, data: Interactions, validation: Split | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(user_factors, item_factors)`` for the binary user x item ``matrix`` (built from
        ``data``; models that read sequences or stop early use ``data`` and ``validation`` too)."""

    def fit(self, data: Interactions, *, items: IdVocab | None = None, validation: Split | None = None
            ) -> EmbeddingRetriever:
        """Learn the item vectors (and stored user vectors) from ``data``; ``validation`` is unused here
        (subclasses that stop early read it: see :meth:`Retriever.fit`)."""
        if len(data) == 0:
            raise DataValidationError("fit: data has no events; pass a non-empty Interactions")
        self.users = data.user_vocab()
        self.items = items if items is not None else data.item_vocab()
        matrix = to_csr(data.frame, self.users, self.items)
        self.seen = seen_matrix(data.frame, self.users, self.items)
        self.popularity = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
        self._fingerprint = data.fingerprint()
        user_factors, item_factors = self._learn(matrix, data=data, validation=validation)
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        self._build_indexes()
        return self

    def set_history(self, data: Interactions) -> EmbeddingRetriever:
        """Replace the users' histories (seen-item masks) with ``data`` without retraining.

        Used to score the test stage with the validation item in the history. Models whose query vector is
        computed from the history (the two-tower) also update their sequences. Users not in the
        vocabulary are ignored (they keep the cold-start fallback).
        """
        self._check_fitted("set_history")
        known = data.frame[data.frame["user_id"].isin(self.users.ids) & data.frame["item_id"].isin(self.items.ids)]
        self.seen = seen_matrix(known, self.users, self.items)
        self._fingerprint = data.fingerprint()
        return self

    def _build_indexes(self) -> None:
        self.index = ItemIndex(self.index_config).build(self.item_factors, self.items)
        self._fallback = ItemIndex(IndexConfig(factory="Flat", threads=self.index_config.threads)).build(
            self.popularity[:, None], self.items
        )

    def reindex(self, config: IndexConfig) -> EmbeddingRetriever:
        """Serve the same item vectors from another index (``"HNSW32"`` instead of ``"Flat"``, say)."""
        if self.item_factors is None:
            raise NotFittedError(f"{type(self).__name__}: call fit() or load() before reindex()")
        self.config = dataclasses.replace(self.config, index=config)
        self._build_indexes()
        return self

    @property
    def index_config(self) -> IndexConfig:
        return getattr(self.config, "index", None) or IndexConfig()

    @property
    def history_fingerprint(self) -> str:
        return self._fingerprint

    def _check_fitted(self, method: str) -> None:
        if self.index is None:
            raise NotFittedError(f"{type(self).__name__}: call fit() or load() before {method}()")

    # ---- serving --------------------------------------------------------------------------------
    def user_vectors(self, user_rows: np.ndarray) -> np.ndarray:
        """Query vectors for known user rows."""
        return self.user_factors[user_rows]

    def seen_rows(self, user_row: int) -> np.ndarray:
        """Item rows the user has interacted with (excluded from their results)."""
        return self.seen.indices[self.seen.indptr[user_row] : self.seen.indptr[user_row + 1]]

    def has_query(self, user_rows: np.ndarray) -> np.ndarray:
        """Which user rows (-1 = unknown) get a personal query vector; the rest get popular items."""
        return np.asarray(user_rows) >= 0

    def retrieve(self, user_ids, k, *, exclude_seen=True, allow=None, deny=None):
        self._check_fitted("retrieve")
        k = check_k(k)
        ids, scalar = as_user_array(user_ids)
        rows = self.users.rows(ids, missing="ignore")
        out_ids = np.full((ids.size, k), -1, dtype=np.int64)
        out_scores = np.full((ids.size, k), -np.inf, dtype=np.float32)
        known = self.has_query(rows)
        if known.any():
            known_rows = rows[known]
            exclude = [self.seen_rows(r) for r in known_rows] if exclude_seen else None
            out_ids[known], out_scores[known] = self.index.search(
                self.user_vectors(known_rows), k, exclude_rows=exclude, allow=allow, deny=deny
            )
        if (~known).any():
            cold = rows[~known]
            log.debug("cold-start fallback for %d users", int(cold.size))
            exclude = [self.seen_rows(r) if r >= 0 else None for r in cold] if exclude_seen else None
            out_ids[~known], out_scores[~known] = self.popular(cold.size, k, exclude_rows=exclude,
                                                               allow=allow, deny=deny)
        if scalar:
            return out_ids[0], out_scores[0]
        return out_ids, out_scores

    def popular(self, n: int, k: int, *, exclude_rows=None, allow=None, deny=None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most popular items for ``n`` rows: the cold-start answer (``exclude_rows`` per row)."""
        queries = np.ones((n, 1), dtype=np.float32)
        return self._fallback.search(queries, check_k(k), exclude_rows=exclude_rows, allow=allow, deny=deny)

    def popular_items(self, k, *, exclude=None, allow=None, deny=None):
        self._check_fitted("popular_items")
        rows = known_rows(self.items, as_history(exclude, "exclude"))
        ids, scores = self.popular(1, k, exclude_rows=[rows] if rows.size else None, allow=allow, deny=deny)
        return ids[0], scores[0]

    def history_query(self, item_rows: np.ndarray) -> np.ndarray | None:
        """The query vector ``(dim,)`` of a history of catalogue rows (non-empty, oldest first), or ``None``
        when the model cannot read a history (this default: :meth:`retrieve_history` then falls back to
        popular items, as :meth:`Retriever.retrieve_history` documents)."""
        return None

    def retrieve_history(self, history, k, *, exclude_seen=True, allow=None, deny=None):
        """Top-``k`` 1-D ``(item_ids, scores)`` for one user's explicit history (external item ids, oldest
        first): the index searched with :meth:`history_query`'s vector, the history's items excluded when
        ``exclude_seen``. Unknown item ids are skipped; an empty history, or a model without a history
        query, gets the popularity fallback."""
        self._check_fitted("retrieve_history")
        k = check_k(k)
        rows = known_rows(self.items, as_history(history))
        query = self.history_query(rows) if rows.size else None
        exclude = [np.unique(rows)] if exclude_seen and rows.size else None
        if query is None:
            ids, scores = self.popular(1, k, exclude_rows=exclude, allow=allow, deny=deny)
        else:
            query = np.asarray(query, dtype=np.float32).reshape(1, -1)
            ids, scores = self.index.search(query, k, exclude_rows=exclude, allow=allow, deny=deny)
        return ids[0], scores[0]

    def stored_history(self, user_id: int) -> np.ndarray:
        """The user's seen items, oldest first (each item once, at its latest event; a model saved before
        the masks kept time order gives catalogue order); empty for an unknown user."""
        self._check_fitted("stored_history")
        if user_id not in self.users:
            return np.empty(0, dtype=np.int64)
        return self.items.external(self.seen_rows(self.users.row(int(user_id))))

    def item_embeddings(self) -> tuple[np.ndarray, IdVocab] | None:
        """The item factors when they have more than one dimension (popularity's 1-D counts say nothing
        about similarity)."""
        if self.item_factors is None or self.item_factors.ndim != 2 or self.item_factors.shape[1] < 2:
            return None
        return self.item_factors, self.items

    def set_threads(self, threads: int) -> None:
        """Use ``threads`` for the model (when its config has ``threads``) and the FAISS indexes."""
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise DataValidationError(f"threads must be a positive integer, got {threads!r}")
        if hasattr(self.config, "threads"):
            self.config = dataclasses.replace(self.config, threads=int(threads))
        for index in (self.index, self._fallback):
            if index is not None:
                index.config = dataclasses.replace(index.config, threads=int(threads))

    # ---- persistence ----------------------------------------------------------------------------
    def _extra_tensors(self) -> dict[str, np.ndarray]:
        """Subclass hook: more arrays to store in the tensors file."""
        return {}

    def _restore_extra(self, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        """Subclass hook: restore what :meth:`_extra_tensors` saved."""

    def save(self, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        """Write the retriever to ``folder`` atomically: tensors, FAISS index and a manifest."""
        from safetensors.numpy import save_file

        if self.index is None:
            raise NotFittedError(f"{type(self).__name__}: nothing to save; call fit() first")
        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            tensors = {
                "user_factors": self.user_factors,
                "item_factors": self.item_factors,
                "popularity": self.popularity,
                "seen_indptr": self.seen.indptr.astype(np.int64),
                "seen_indices": self.seen.indices.astype(np.int64),
                **self._extra_tensors(),
            }
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            self.index.save(tmp / INDEX_DIR)
            write_manifest(tmp, {
                "kind": RETRIEVER_KIND,
                "model": self.name,
                "config": self.config.to_dict(),
                "users": self.users.to_json_dict(),
                "items": self.items.to_json_dict(),
                "history_fingerprint": self._fingerprint,
                "dim": int(self.item_factors.shape[1]),
                "metrics": metrics or {},
                "versions": library_versions(),
                "files": file_checksums(tmp, [TENSORS_FILE]),
            })
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingRetriever:
        """Load a folder written by :meth:`save`; refuses one whose files or vocabularies do not match."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest = read_retriever_manifest(folder, cls.name)
        model = cls(cls._saved_config(manifest["config"]))
        model.users = IdVocab.from_json_dict(manifest["users"])
        model.items = IdVocab.from_json_dict(manifest["items"])
        tensors = load_file(str(folder / TENSORS_FILE))
        model.user_factors = tensors["user_factors"]
        model.item_factors = tensors["item_factors"]
        model.popularity = tensors["popularity"]
        n_users, n_items = len(model.users), len(model.items)
        shapes_ok = (
            model.item_factors.shape[0] == n_items
            and model.popularity.shape == (n_items,)
            and tensors["seen_indptr"].shape == (n_users + 1,)
            and model.item_factors.shape[1] == manifest["dim"]
        )
        if not shapes_ok:
            raise ArtifactError(f"{folder}: tensor shapes do not match the manifest's vocabularies")
        model.seen = sp.csr_matrix(
            (np.ones(tensors["seen_indices"].size, dtype=np.float32), tensors["seen_indices"],
             tensors["seen_indptr"]),
            shape=(n_users, n_items),
        )
        model._fingerprint = manifest["history_fingerprint"]
        model._restore_extra(tensors, manifest)
        model.index = ItemIndex.load(folder / INDEX_DIR, expected_items=model.items)
        model._fallback = ItemIndex(IndexConfig(factory="Flat", threads=model.index_config.threads)).build(
            model.popularity[:, None], model.items
        )
        return model

    @classmethod
    def config_class(cls) -> type:
        return cls.config_type

    @classmethod
    def _saved_config(cls, values: dict[str, Any]) -> Any:
        """The config of a saved model from its manifest (a subclass fills fields older folders lack with
        the value they were trained under, not today's default)."""
        return cls.config_class().from_dict(values)
