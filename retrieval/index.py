"""A FAISS item index behind one interface: exact (``"Flat"``) or ANN (``"HNSW32"``, ``"IVF256,Flat"``).

The index is described by a FAISS factory string plus a search-parameter string (like FAISS's
``contrib/factory_tools.py``); :meth:`ItemIndex.describe` joins them as ``"factory|search_params"`` and
benchmarks key their results by it.

Search semantics, whatever the factory:

* Ids returned are EXTERNAL item ids (``items.ids``); scores are float32 and higher-is-better (inner
  product, or the negative SQUARED L2 distance for ``metric="l2"``, FAISS's convention).
* Scores are always exact: FAISS proposes candidates and every returned score is recomputed from the kept
  float32 vectors (in float64, one query at a time), so scores of ANN and exact indexes are comparable, the
  order within a result list is exact, and a query gives the same answer alone or in a batch. Ties are
  broken by ascending internal row, so the order is deterministic.
* Excluded items (per-query ``exclude_rows``, global ``deny``) never appear and never cost a slot: the
  index over-fetches, doubles the fetch while results are short, and when the ANN structure cannot supply
  enough (IVF with a small ``nprobe``, HNSW) the remaining slots are filled with the best not-yet-returned
  eligible items by exact score. Only when fewer than ``k`` eligible items exist at all is the tail padded
  with id ``-1`` and score ``-inf``, as FAISS does.
* With an ``allow`` list the search is exact (brute force) over the allowed vectors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.config import JsonConfig, require
from data.errors import ArtifactError, ConfigError, DataValidationError, NotFittedError, UnknownIdError
from data.io import atomic_path, file_checksums, library_versions, read_manifest, write_manifest
from data.vocab import IdVocab

MANIFEST_KIND = "faiss_index"
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.safetensors"
FORMAT_VERSION = 1

_METRICS = ("ip", "l2")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$")


def _faiss() -> Any:
    """Import faiss lazily (it is heavy and pulls in OpenMP)."""
    import faiss

    return faiss


def _check_search_params(params: str, field: str = "IndexConfig.search_params") -> str:
    """Check ``params`` is ``""`` or comma-separated ``name=number`` pairs; return it stripped of spaces."""
    if not isinstance(params, str):
        raise ConfigError(f"{field} must be a string like 'efSearch=64', got {params!r}")
    cleaned = params.replace(" ", "")
    if cleaned:
        for part in cleaned.split(","):
            if not _PARAM_RE.match(part):
                raise ConfigError(
                    f"{field}={params!r}: {part!r} is not 'name=number'; write faiss "
                    "ParameterSpace parameters like 'efSearch=64' or 'nprobe=16,quantizer_efSearch=32', "
                    "or '' for the defaults"
                )
    return cleaned


@dataclass
class IndexConfig(JsonConfig):
    """How to build and search an :class:`ItemIndex`.

    Attributes:
        factory: a ``faiss.index_factory`` string: ``"Flat"`` (exact), ``"HNSW32"``, ``"IVF256,Flat"``,
            ``"IVF64,PQ8"``... It is parsed against the real dimension at :meth:`ItemIndex.build`; an
            unparsable string raises :class:`ConfigError` there. Id-mapping factories (``"IDMap,..."``) are
            not supported: the index maps rows to ids itself.
        search_params: a faiss ``ParameterSpace`` string applied after build and load, e.g.
            ``"efSearch=128"`` (HNSW) or ``"nprobe=16"`` (IVF); several are comma-separated. ``""`` keeps
            the index's current parameters (the faiss defaults on a fresh build: ``efSearch=16``,
            ``nprobe=1``).
        metric: ``"ip"`` (inner product) or ``"l2"`` (squared Euclidean distance). Scores are always
            higher-is-better, so ``"l2"`` scores are negative squared distances.
        threads: OpenMP threads for faiss during every build, search and load; the previous OpenMP setting
            is restored afterwards, so the index never changes the thread count of torch or anything else
            sharing the OpenMP runtime (a leaked setting oversubscribed the cores and made two-tower
            training 15x slower). HNSW builds are reproducible only with ``threads=1``.
        train_sample: how many vectors (drawn without replacement with ``seed``) train IVF/PQ indexes;
            ``None`` uses all vectors. An IVF index needs at least ``nlist`` training vectors; fewer raises
            :class:`ConfigError` suggesting a smaller ``nlist`` (no silent clamping, so the factory string a
            benchmark reports is the index it measured).
        seed: seeds the training sample and the IVF k-means.
    """

    factory: str = "Flat"
    search_params: str = ""
    metric: str = "ip"
    threads: int = 1
    train_sample: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            isinstance(self.factory, str) and self.factory.strip() != "",
            f"IndexConfig.factory must be a non-empty faiss.index_factory string such as 'Flat', 'HNSW32' "
            f"or 'IVF256,Flat', got {self.factory!r}",
        )
        self.factory = self.factory.strip()
        require(
            not self.factory.upper().startswith("IDMAP"),
            f"IndexConfig.factory={self.factory!r}: IDMap factories are not supported; ItemIndex maps rows "
            "to external ids itself, drop the 'IDMap,' prefix",
        )
        self.search_params = _check_search_params(self.search_params)
        require(
            self.metric in _METRICS,
            f"IndexConfig.metric must be one of {list(_METRICS)}, got {self.metric!r}",
        )
        require(
            isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 1,
            f"IndexConfig.threads must be an integer >= 1, got {self.threads!r}",
        )
        require(
            self.train_sample is None
            or (
                isinstance(self.train_sample, int)
                and not isinstance(self.train_sample, bool)
                and self.train_sample >= 1
            ),
            f"IndexConfig.train_sample must be None (use all vectors) or an integer >= 1, "
            f"got {self.train_sample!r}",
        )
        require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            f"IndexConfig.seed must be an integer, got {self.seed!r}",
        )

    def faiss_metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2


class ItemIndex:
    """Top-k item search over FAISS with exclusions, allow/deny lists, padding and save/load.

    Attributes (after :meth:`build` or :meth:`load`):
        config: the :class:`IndexConfig` (``search_params`` follows :meth:`set_search_params`).
        items: the item vocabulary; row ``i`` of :attr:`vectors` is item ``items.ids[i]``.
        vectors: a float32 copy of the item vectors, used for exact rescoring, allow lists and fill-in.
        dim: the vector dimension.
        ntotal: the number of indexed items.
    """

    def __init__(self, config: IndexConfig | None = None) -> None:
        if config is not None and not isinstance(config, IndexConfig):
            raise ConfigError(f"ItemIndex: config must be an IndexConfig, got {type(config).__name__}")
        self.config = config if config is not None else IndexConfig()
        self._index: Any = None
        self.items: IdVocab | None = None
        self.vectors: np.ndarray | None = None

    # ------------------------------------------------------------------ properties
    @property
    def is_built(self) -> bool:
        return self._index is not None

    @property
    def dim(self) -> int:
        self._require_built()
        return int(self.vectors.shape[1])  # type: ignore[union-attr]

    @property
    def ntotal(self) -> int:
        self._require_built()
        return int(self.vectors.shape[0])  # type: ignore[union-attr]

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (read it; changing it bypasses the checks here)."""
        self._require_built()
        return self._index

    def describe(self) -> str:
        """``"factory|search_params"``: the key benchmarks file results under."""
        return f"{self.config.factory}|{self.config.search_params}"

    def __repr__(self) -> str:
        size = f"ntotal={self.ntotal}, dim={self.dim}" if self.is_built else "not built"
        return f"ItemIndex({self.describe()!r}, metric={self.config.metric!r}, {size})"

    def _require_built(self) -> None:
        if self._index is None:
            raise NotFittedError("ItemIndex: call build(vectors, items) or ItemIndex.load(folder) first")

    # ------------------------------------------------------------------ build
    def build(self, vectors: np.ndarray, items: IdVocab) -> ItemIndex:
        """Index ``vectors`` (``(len(items), d)``; row ``i`` is ``items.ids[i]``), training first if needed.

        The input array is copied (as float32), never modified. Returns ``self``.
        """
        if not isinstance(items, IdVocab):
            raise DataValidationError(
                f"ItemIndex.build: items must be an IdVocab, got {type(items).__name__}"
            )
        matrix = _as_float_matrix(vectors, "vectors")
        if matrix.shape[0] != len(items):
            raise DataValidationError(
                f"ItemIndex.build: vectors has {matrix.shape[0]} rows but items has {len(items)} ids; "
                "pass one vector per item, row i for items.ids[i]"
            )
        if matrix.shape[0] == 0:
            raise DataValidationError("ItemIndex.build: vectors has no rows; there is nothing to index")
        dim = matrix.shape[1]
        with omp_threads(self.config.threads):
            return self._build(matrix, items, dim)

    def _build(self, matrix: np.ndarray, items: IdVocab, dim: int) -> ItemIndex:
        faiss = _faiss()
        try:
            index = faiss.index_factory(dim, self.config.factory, self.config.faiss_metric())
        except RuntimeError as exc:
            raise ConfigError(
                f"IndexConfig.factory={self.config.factory!r} is not a valid faiss.index_factory string for "
                f"dim={dim} ({_faiss_message(exc)}); use e.g. 'Flat', 'HNSW32', 'IVF64,Flat' or 'IVF64,PQ8' "
                "(PQ m must divide the dimension)"
            ) from exc
        if not index.is_trained:
            self._train(index, matrix)
        try:
            index.add(matrix)
        except RuntimeError as exc:
            raise ConfigError(
                f"IndexConfig.factory={self.config.factory!r}: adding vectors failed ({_faiss_message(exc)})"
            ) from exc
        self._index = index
        self.items = items
        self.vectors = matrix
        self.set_search_params(self.config.search_params)
        return self

    def _train(self, index: Any, matrix: np.ndarray) -> None:
        faiss = _faiss()
        n = matrix.shape[0]
        sample = matrix
        if self.config.train_sample is not None and self.config.train_sample < n:
            rng = np.random.default_rng(self.config.seed)
            rows = np.sort(rng.choice(n, size=self.config.train_sample, replace=False))
            sample = np.ascontiguousarray(matrix[rows])
        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            ivf.cp.seed = int(self.config.seed)
            if sample.shape[0] < ivf.nlist:
                suggestion = max(1, int(np.sqrt(sample.shape[0])))
                raise ConfigError(
                    f"IndexConfig.factory={self.config.factory!r} has nlist={ivf.nlist} inverted lists but "
                    f"only {sample.shape[0]} training vectors (items={n}, "
                    f"train_sample={self.config.train_sample}); use a smaller nlist, e.g. "
                    f"'IVF{suggestion},...' (about sqrt(n)), raise train_sample, or use 'Flat'/'HNSW32'"
                )
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ConfigError(
                f"IndexConfig.factory={self.config.factory!r}: training on {sample.shape[0]} vectors failed "
                f"({_faiss_message(exc)}); use fewer centroids (smaller nlist, or PQ with fewer bits) or "
                "more training vectors"
            ) from exc

    def set_search_params(self, params: str) -> None:
        """Apply faiss ``ParameterSpace`` parameters (``"efSearch=128"``); updates config.search_params."""
        self._require_built()
        cleaned = _check_search_params(params, field="ItemIndex.set_search_params: params")
        if cleaned:
            faiss = _faiss()
            try:
                faiss.ParameterSpace().set_index_parameters(self._index, cleaned)
            except RuntimeError as exc:
                raise ConfigError(
                    f"search_params={params!r} does not apply to a {self.config.factory!r} index "
                    f"({_faiss_message(exc)}); HNSW takes 'efSearch=N', IVF takes 'nprobe=N'"
                ) from exc
        self.config = dataclasses.replace(self.config, search_params=cleaned)

    def exact(self) -> ItemIndex:
        """A ``"Flat"`` index over the same vectors, items and metric (the ground truth for ANN recall)."""
        self._require_built()
        config = IndexConfig(
            factory="Flat",
            search_params="",
            metric=self.config.metric,
            threads=self.config.threads,
            seed=self.config.seed,
        )
        return ItemIndex(config).build(self.vectors, self.items)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ search
    def search(
        self,
        queries: Any,
        k: int,
        *,
        exclude_rows: Any = None,
        allow: Iterable[int] | np.ndarray | None = None,
        deny: Iterable[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each query.

        Args:
            queries: one query ``(d,)`` or a batch ``(n, d)``; must be finite.
            k: how many items per query, a positive integer (may exceed the catalogue: the tail is padded).
            exclude_rows: internal item ROWS never returned, per query (e.g. the user's seen items). For a
                batch: a sequence of ``n`` entries, each an int array-like or ``None``. For a single query:
                one int array-like. Row ``-1`` (the "unknown" marker of ``IdVocab.rows(missing="ignore")``)
                is ignored; other rows outside ``[0, ntotal)`` raise :class:`DataValidationError`.
            allow: external item ids; when given only these can be returned, scored exactly. Every id must
                be in ``items`` (an unknown id raises :class:`UnknownIdError`: an allow list from another
                catalogue is a bug, filter it with ``[i for i in allow if i in index.items]``).
            deny: external item ids never returned for any query; ids not in ``items`` are ignored (a
                business-rule block list may name items outside this catalogue).

        Returns:
            ``(ids, scores)``: int64 external ids and float32 scores, sorted by score descending (ties by
            ascending row), shape ``(k,)`` for a single query and ``(n, k)`` for a batch. Slots with no
            eligible item hold id ``-1`` and score ``-inf``.
        """
        self._require_built()
        k = _check_k(k)
        matrix, single = self._check_queries(queries)
        n = matrix.shape[0]
        banned = self._banned_rows(exclude_rows, deny, n, single)
        allow_rows = None if allow is None else self._allow_rows(allow)

        with omp_threads(self.config.threads):
            if allow_rows is not None:
                rows, scores = self._search_allowed(matrix, k, banned, allow_rows)
            else:
                rows, scores = self._search_index(matrix, k, banned)
        ids = self.items.external(rows)  # type: ignore[union-attr]
        scores = scores.astype(np.float32)
        if single:
            return ids[0], scores[0]
        return ids, scores

    def _check_queries(self, queries: Any) -> tuple[np.ndarray, bool]:
        try:
            array = np.asarray(queries, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataValidationError(
                f"ItemIndex.search: queries must be a numeric array of shape (d,) or (n, d) with "
                f"d={self.dim} ({exc})"
            ) from exc
        if array.ndim not in (1, 2):
            raise DataValidationError(
                f"ItemIndex.search: queries must have shape (d,) or (n, d) with d={self.dim}, "
                f"got shape {array.shape}"
            )
        single = array.ndim == 1
        matrix = array[None, :] if single else array
        if matrix.shape[1] != self.dim:
            raise DataValidationError(
                f"ItemIndex.search: queries have dimension {matrix.shape[1]} but the index has "
                f"dim={self.dim}; encode the queries with the model that produced the item vectors"
            )
        if not np.isfinite(matrix).all():
            bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))[:5].tolist()
            raise DataValidationError(
                f"ItemIndex.search: queries contain NaN or infinite values (query rows {bad}); "
                "fix or drop those queries before searching"
            )
        return np.ascontiguousarray(matrix, dtype=np.float32), single

    def _banned_rows(self, exclude_rows: Any, deny: Any, n: int, single: bool) -> list[np.ndarray]:
        """Per query: the sorted unique rows that must not be returned (exclusions plus deny)."""
        deny_rows = np.empty(0, dtype=np.int64)
        if deny is not None:
            rows = self.items.rows(as_id_array(deny, "deny"), missing="ignore")  # type: ignore[union-attr]
            deny_rows = np.unique(rows[rows >= 0])
        if exclude_rows is None:
            return [deny_rows] * n
        if single:
            per_query: Sequence[Any] = [exclude_rows]
            array = _maybe_array(exclude_rows)
            if array is not None and array.ndim == 2 and array.shape[0] == 1:
                per_query = [array[0]]
        else:
            if isinstance(exclude_rows, (str, bytes)) or not hasattr(exclude_rows, "__len__"):
                raise DataValidationError(
                    f"ItemIndex.search: exclude_rows must be a sequence of {n} row arrays (one per query), "
                    f"got {type(exclude_rows).__name__}"
                )
            per_query = exclude_rows
            if len(per_query) != n:
                raise DataValidationError(
                    f"ItemIndex.search: exclude_rows has {len(per_query)} entries but there are {n} queries; "
                    "pass one row array (or None) per query"
                )
        out = []
        for position, entry in enumerate(per_query):
            rows = self._check_rows(entry, position)
            out.append(np.union1d(rows, deny_rows) if deny_rows.size else rows)
        return out

    def _check_rows(self, entry: Any, position: int) -> np.ndarray:
        if entry is None:
            return np.empty(0, dtype=np.int64)
        array = np.asarray(entry)
        if array.size == 0:
            return np.empty(0, dtype=np.int64)
        if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
            raise DataValidationError(
                f"ItemIndex.search: exclude_rows[{position}] must hold integer item rows, got dtype "
                f"{array.dtype}; map external ids with index.items.rows(ids)"
            )
        rows = array.astype(np.int64).ravel()
        bad = rows[(rows < -1) | (rows >= self.ntotal)]
        if bad.size:
            raise DataValidationError(
                f"ItemIndex.search: exclude_rows[{position}] has rows {bad[:5].tolist()} outside "
                f"[0, {self.ntotal}); pass internal rows (index.items.rows(ids)), not external ids"
            )
        return np.unique(rows[rows >= 0])

    def _allow_rows(self, allow: Any) -> np.ndarray:
        ids = as_id_array(allow, "allow")
        try:
            rows = self.items.rows(ids, missing="raise")  # type: ignore[union-attr]
        except UnknownIdError as exc:
            raise UnknownIdError(
                f"ItemIndex.search: allow lists ids that are not indexed ({exc}); filter the allow list "
                "with [i for i in allow if i in index.items]"
            ) from exc
        return np.unique(rows)

    def _search_allowed(
        self, matrix: np.ndarray, k: int, banned: list[np.ndarray], allow_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n = matrix.shape[0]
        rows_out = np.full((n, k), -1, dtype=np.int64)
        scores_out = np.full((n, k), -np.inf, dtype=np.float64)
        for i in range(n):
            candidates = allow_rows[~np.isin(allow_rows, banned[i], assume_unique=True)]
            self._finalize(i, matrix[i], candidates, k, rows_out, scores_out)
        return rows_out, scores_out

    def _search_index(
        self, matrix: np.ndarray, k: int, banned: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch from faiss, drop banned rows, double the fetch while short, then fill exactly.

        The first fetch is ``k`` plus the next power of two above the query's banned-row count, so it is
        short only when faiss returns fewer labels than asked (IVF lists exhausted, HNSW beam too narrow).
        Then the fetch doubles (up to ``ntotal``; a larger ``k`` widens the HNSW beam) while each round
        returns more labels; once a round brings nothing new, the missing slots are filled with the best
        remaining eligible items by exact score. A query's fetch sizes depend only on ``k`` and its own
        exclusions, never on the rest of the batch, so it gets the same answer alone or in a batch.
        """
        n = matrix.shape[0]
        ntotal = self.ntotal
        rows_out = np.full((n, k), -1, dtype=np.int64)
        scores_out = np.full((n, k), -np.inf, dtype=np.float64)
        fetch = np.array([min(ntotal, k + _pow2_at_least(b.size)) for b in banned], dtype=np.int64)
        need = np.array([min(k, ntotal - b.size) for b in banned], dtype=np.int64)
        returned = np.full(n, -1, dtype=np.int64)  # labels faiss returned in the query's previous round
        pending = np.arange(n)
        while pending.size:
            next_pending = []
            for size in np.unique(fetch[pending]):
                group = pending[fetch[pending] == size]
                _, labels = self._index.search(matrix[group], int(size))
                for position, i in enumerate(group):
                    got = labels[position]
                    got = got[got >= 0]
                    candidates = got[~np.isin(got, banned[i])] if banned[i].size else got
                    if candidates.size >= need[i]:
                        self._finalize(i, matrix[i], candidates, k, rows_out, scores_out)
                    elif size >= ntotal or got.size <= returned[i]:
                        fill = self._exact_fill(matrix[i], candidates, banned[i], need[i] - candidates.size)
                        merged = np.concatenate([candidates, fill])
                        self._finalize(i, matrix[i], merged, k, rows_out, scores_out)
                    else:
                        returned[i] = got.size
                        fetch[i] = min(ntotal, 2 * size)
                        next_pending.append(i)
            pending = np.asarray(next_pending, dtype=np.int64)
        return rows_out, scores_out

    def _exact_fill(
        self, query: np.ndarray, candidates: np.ndarray, banned: np.ndarray, count: int
    ) -> np.ndarray:
        """The ``count`` best eligible rows (not banned, not already candidates) by exact score."""
        mask = np.ones(self.ntotal, dtype=bool)
        mask[banned] = False
        mask[candidates] = False
        rest = np.flatnonzero(mask)
        if rest.size <= count:
            return rest
        scores = self._exact_scores(query, rest)
        order = np.lexsort((rest, -scores))
        return rest[order[:count]]

    def _finalize(
        self,
        i: int,
        query: np.ndarray,
        candidates: np.ndarray,
        k: int,
        rows_out: np.ndarray,
        scores_out: np.ndarray,
    ) -> None:
        """Rescore ``candidates`` exactly, sort (score desc, row asc), write the best ``k`` into row ``i``."""
        if candidates.size == 0:
            return
        scores = self._exact_scores(query, candidates)
        order = np.lexsort((candidates, -scores))[:k]
        rows_out[i, : order.size] = candidates[order]
        scores_out[i, : order.size] = scores[order]

    def _exact_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact float64 scores of ``rows``; elementwise then row sums, so each score is independent of
        which other rows are scored alongside it (unlike BLAS kernels)."""
        vectors = self.vectors[rows].astype(np.float64)  # type: ignore[index]
        q = query.astype(np.float64)
        if self.config.metric == "ip":
            return (vectors * q).sum(axis=1)
        diff = vectors - q
        return -(diff * diff).sum(axis=1)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss``, ``vectors.safetensors`` and ``manifest.json`` into ``folder`` atomically."""
        self._require_built()
        faiss = _faiss()
        from safetensors.numpy import save_file

        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            save_file({"vectors": np.ascontiguousarray(self.vectors)}, str(tmp / VECTORS_FILE))
            write_manifest(
                tmp,
                {
                    "kind": MANIFEST_KIND,
                    "format_version": FORMAT_VERSION,
                    "describe": self.describe(),
                    "config": self.config.to_dict(),
                    "items": self.items.to_json_dict(),  # type: ignore[union-attr]
                    "dim": self.dim,
                    "ntotal": self.ntotal,
                    "faiss_class": type(self._index).__name__,
                    "versions": library_versions(),
                    "files": file_checksums(tmp, [INDEX_FILE, VECTORS_FILE]),
                },
            )
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, expected_items: IdVocab | None = None) -> ItemIndex:
        """Load a folder written by :meth:`save`, verifying checksums, shapes, metric and vocabulary.

        ``expected_items``: the catalogue the caller's model scores; a different saved vocabulary raises
        :class:`ArtifactError` (an index must never be paired with another catalogue).
        """
        faiss = _faiss()
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        manifest = read_manifest(folder, kind=MANIFEST_KIND)
        try:
            config = IndexConfig.from_dict(manifest["config"])
            items = IdVocab.from_json_dict(manifest["items"])
            dim, ntotal = int(manifest["dim"]), int(manifest["ntotal"])
        except (KeyError, TypeError, ValueError) as exc:  # ConfigError/DataValidationError are ValueErrors
            raise ArtifactError(
                f"{folder}: manifest.json is incomplete or invalid ({exc}); re-save the index"
            ) from exc
        for name in (INDEX_FILE, VECTORS_FILE):
            if name not in manifest.get("files", {}):
                raise ArtifactError(f"{folder}: manifest does not list {name}; re-save the index")
        if expected_items is not None and expected_items != items:
            raise ArtifactError(
                f"{folder}: the index was built over {len(items)} items (fingerprint {items.fingerprint()}) "
                f"but expected_items has {len(expected_items)} (fingerprint {expected_items.fingerprint()}); "
                "rebuild the index from the model that produced these items"
            )
        try:
            with omp_threads(config.threads):
                index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as exc:
            raise ArtifactError(
                f"{folder / INDEX_FILE}: faiss cannot read it ({_faiss_message(exc)}); re-save the index"
            ) from exc
        try:
            vectors = load_file(str(folder / VECTORS_FILE)).get("vectors")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(
                f"{folder / VECTORS_FILE}: cannot read it ({exc}); re-save the index"
            ) from exc

        problems = []
        if index.d != dim or index.ntotal != ntotal:
            problems.append(f"faiss index has dim={index.d}, ntotal={index.ntotal}")
        if vectors is None or vectors.dtype != np.float32 or vectors.shape != (ntotal, dim):
            shape = None if vectors is None else (vectors.shape, str(vectors.dtype))
            problems.append(f"vectors are {shape}, expected float32 {(ntotal, dim)}")
        if len(items) != ntotal:
            problems.append(f"items hold {len(items)} ids")
        if index.metric_type != config.faiss_metric():
            problems.append(f"faiss metric_type={index.metric_type} but config.metric={config.metric!r}")
        expected_class = _factory_class(dim, config)
        if expected_class is not None and type(index).__name__ != expected_class:
            problems.append(f"faiss index is a {type(index).__name__}, config.factory gives {expected_class}")
        if problems:
            raise ArtifactError(
                f"{folder}: the files do not match manifest.json (dim={dim}, ntotal={ntotal}, "
                f"factory={config.factory!r}): {'; '.join(problems)}; re-save the index"
            )
        out = cls(config)
        out._index = index
        out.items = items
        out.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        try:
            out.set_search_params(config.search_params)
        except ConfigError as exc:
            raise ArtifactError(f"{folder}: {exc}") from exc
        return out


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def omp_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` faiss OpenMP threads, restoring the previous count afterwards."""
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise DataValidationError(f"ItemIndex.search: k must be a positive integer, got {k!r}")
    return int(k)


def _as_float_matrix(values: Any, name: str) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float32, copy=True)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"ItemIndex.build: {name} must be a numeric (n, d) array ({exc})") from exc
    if array.ndim != 2 or array.shape[1] == 0:
        raise DataValidationError(f"ItemIndex.build: {name} must have shape (n_items, d), got {array.shape}")
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))[:5].tolist()
        raise DataValidationError(
            f"ItemIndex.build: {name} contain NaN or infinite values (rows {bad}); fix the item embeddings"
        )
    return np.ascontiguousarray(array)


def as_id_array(values: Any, name: str) -> np.ndarray:
    """``values`` (an array, a scalar or an iterable of external item ids) as a 1-D int64 array; anything
    but integers raises :class:`DataValidationError` naming ``name``."""
    if isinstance(values, np.ndarray):
        array = values
    elif np.isscalar(values):
        array = np.asarray([values])
    else:
        array = np.asarray(list(values))
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise DataValidationError(
            f"{name} must hold integer external item ids, got dtype {array.dtype}"
        )
    return array.astype(np.int64).ravel()


def _maybe_array(values: Any) -> np.ndarray | None:
    try:
        return np.asarray(values)
    except ValueError:  # ragged
        return None


def _pow2_at_least(count: int) -> int:
    """0 for 0, else the smallest power of two >= ``count`` (buckets over-fetch sizes)."""
    return 0 if count <= 0 else 1 << (int(count) - 1).bit_length()


def _faiss_message(exc: BaseException) -> str:
    """The useful tail of a faiss RuntimeError (drop the C++ signature)."""
    text = str(exc).strip()
    for marker in ("failed: ", "Error: ", ": "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
            break
    return text.splitlines()[0] if text else type(exc).__name__


def _factory_class(dim: int, config: IndexConfig) -> str | None:
    """The class faiss.read_index gives for an index built from ``config`` (None if it cannot be built)."""
    faiss = _faiss()
    try:
        empty = faiss.index_factory(dim, config.factory, config.faiss_metric())
        return type(faiss.deserialize_index(faiss.serialize_index(empty))).__name__
    except RuntimeError:
        return None


__all__ = ["INDEX_FILE", "MANIFEST_KIND", "VECTORS_FILE", "IndexConfig", "ItemIndex", "as_id_array"]
