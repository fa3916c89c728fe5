"""Hybrid candidate generation: several fitted retrievers merged into one de-duplicated list.

Each component retrieves a deeper list (``depth_factor * k``); the lists are fused per user by

* **reciprocal-rank fusion** (``"rrf"``): ``score(i) = sum_r w_r / (rrf_k + rank_r(i))``, or
* **weighted score** (``"score"``): ``score(i) = sum_r w_r * s_r(i)`` with ``s_r`` the component's score
  min-max normalised over that user's list (1 = its best, 0 = its last),

where a component that did not return item ``i`` adds nothing. Ties are broken by the best component
rank, then by item id.

Two lists, two roles, both chosen on validation by :meth:`HybridRetriever.tune` over one grid (every
method, ``rrf_k`` and weight combination, and each component alone):

* the **candidate fusion** (``method``, ``rrf_k``, ``weights``) maximises ``tune_metric`` (Recall@50: what
  a reranker needs). :meth:`HybridRetriever.candidates` and :meth:`HybridRetriever.for_candidates` use it;
* the **served fusion** (``served_*``) maximises ``served_metric`` (NDCG@10): it is the list a user gets
  when no reranker runs (:meth:`HybridRetriever.retrieve`, :meth:`HybridRetriever.retrieve_history`).
  Each component alone is in the grid, so on validation the served list is never below the best single
  component; where one component wins, the served list is exactly that component's order.

:meth:`HybridRetriever.candidates` also returns, per candidate, which components found it, with their
scores and ranks (features for the reranker).

The retrieve contract is the one of :class:`~retrieval.base.Retriever` (scalar -> 1-D, array -> 2-D,
padding ``-1``/``-inf``; unknown users get each component's fallback). An explicit history
(:meth:`HybridRetriever.retrieve_history`) is fused the same way from each component's
``retrieve_history`` list.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.config import JsonConfig, require
from data.dataset import Interactions
from data.errors import ArtifactError, ConfigError, DataValidationError, NotFittedError
from data.io import atomic_path, library_versions, read_manifest, sha256_file, write_manifest
from data.metrics import evaluate_rankings
from data.protocol import Split
from data.vocab import IdVocab
from retrieval.base import Retriever, as_history, as_user_array, check_k, known_rows

HYBRID_KIND = "hybrid_retriever"
_METHODS = ("rrf", "score")
_METRIC_RE = re.compile(r"^(Recall|NDCG|MRR)@(\d+)$")


@dataclass
class HybridConfig(JsonConfig):
    """How the component lists are fused, and the validation grid :meth:`HybridRetriever.tune` searches.

    Attributes:
        method: ``"rrf"`` (reciprocal-rank fusion) or ``"score"`` (weighted min-max normalised scores).
        rrf_k: the RRF constant (larger flattens the rank discount).
        weights: one weight per component, in component order; empty means all 1.
        depth_factor: each component retrieves ``ceil(depth_factor * k)`` items before fusion (>= 1).
        tune_metric: the validation metric :meth:`HybridRetriever.tune` maximises (``"Recall@50"``:
            recall at a shortlist size is what the reranker needs).
        tune_methods: methods searched.
        tune_rrf_ks: ``rrf_k`` values searched (RRF only).
        tune_weights: values searched for each component's weight but the first (fixed at 1); each
            component alone is always tried too.
        served_method: the fusion of the list served without a reranker (``retrieve``): ``"rrf"``,
            ``"score"``, or ``""`` (the default) to serve the candidate fusion above. :meth:`tune` sets it.
        served_rrf_k: its RRF constant.
        served_weights: its weights (one-hot: one component's own order); empty means all 1.
        served_metric: the validation metric the served fusion maximises (``"NDCG@10"``: the top of the
            list is what a user sees).
        progress: show a progress bar while tuning.
    """

    method: str = "rrf"
    rrf_k: float = 60.0
    weights: tuple[float, ...] = ()
    depth_factor: float = 3.0
    tune_metric: str = "Recall@50"
    tune_methods: tuple[str, ...] = _METHODS
    tune_rrf_ks: tuple[float, ...] = (10.0, 30.0, 60.0, 120.0)
    tune_weights: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    served_method: str = ""
    served_rrf_k: float = 60.0
    served_weights: tuple[float, ...] = ()
    served_metric: str = "NDCG@10"
    progress: bool = True

    def __post_init__(self) -> None:
        require(self.method in _METHODS, f"HybridConfig.method must be one of {list(_METHODS)}, got {self.method!r}")
        require(self.rrf_k >= 0, f"HybridConfig.rrf_k must be >= 0, got {self.rrf_k}")
        require(all(w >= 0 for w in self.weights), "HybridConfig.weights must be >= 0")
        require(self.depth_factor >= 1, f"HybridConfig.depth_factor must be >= 1, got {self.depth_factor}")
        require(bool(_METRIC_RE.match(self.tune_metric)),
                f"HybridConfig.tune_metric must look like 'Recall@50', 'NDCG@10' or 'MRR@10', got "
                f"{self.tune_metric!r}")
        require(len(self.tune_methods) > 0 and all(m in _METHODS for m in self.tune_methods),
                f"HybridConfig.tune_methods must be a non-empty subset of {list(_METHODS)}")
        require(len(self.tune_rrf_ks) > 0 and all(k >= 0 for k in self.tune_rrf_ks),
                "HybridConfig.tune_rrf_ks must be non-empty and >= 0")
        require(len(self.tune_weights) > 0 and all(w >= 0 for w in self.tune_weights),
                "HybridConfig.tune_weights must be non-empty and >= 0")
        require(self.served_method in ("", *_METHODS),
                f"HybridConfig.served_method must be '' or one of {list(_METHODS)}, got {self.served_method!r}")
        require(self.served_rrf_k >= 0, f"HybridConfig.served_rrf_k must be >= 0, got {self.served_rrf_k}")
        require(all(w >= 0 for w in self.served_weights), "HybridConfig.served_weights must be >= 0")
        require(bool(_METRIC_RE.match(self.served_metric)),
                f"HybridConfig.served_metric must look like 'NDCG@10', got {self.served_metric!r}")

    def candidate_fusion(self) -> Fusion:
        """The fusion of the reranker's candidates."""
        return Fusion(self.method, self.rrf_k, tuple(self.weights))

    def served_fusion(self) -> Fusion:
        """The fusion of the list served without a reranker (the candidate fusion unless tuned apart)."""
        if not self.served_method:
            return self.candidate_fusion()
        return Fusion(self.served_method, self.served_rrf_k, tuple(self.served_weights))


@dataclass(frozen=True)
class Fusion:
    """One way of fusing the component lists: ``method``, ``rrf_k`` and ``weights`` (empty: all 1)."""

    method: str
    rrf_k: float
    weights: tuple[float, ...]

    def single(self) -> int | None:
        """The index of the only component with a non-zero weight, or ``None``."""
        nonzero = [i for i, w in enumerate(self.weights) if w > 0]
        return nonzero[0] if len(nonzero) == 1 and len(self.weights) > 1 else None


@dataclass
class Candidates:
    """Fused candidates with their provenance.

    Attributes:
        item_ids: int64 ``(n, k)`` (``(k,)`` for a scalar user) fused list, padding ``-1``.
        scores: float32 fused scores, padding ``-inf``.
        sources: the component names, in the order of the last axis below.
        component_scores: float32 ``(n, k, R)`` each component's raw score of the candidate, NaN where the
            component did not return it.
        component_ranks: int32 ``(n, k, R)`` the candidate's 1-based rank in each component's list, 0
            where the component did not return it.
    """

    item_ids: np.ndarray
    scores: np.ndarray
    sources: tuple[str, ...]
    component_scores: np.ndarray
    component_ranks: np.ndarray

    @property
    def found(self) -> np.ndarray:
        """bool ``(n, k, R)``: which components returned each candidate."""
        return self.component_ranks > 0


@dataclass
class _Lists:
    """The components' deep lists for ``n`` users: ids/scores ``(n, R, D)``."""

    ids: np.ndarray
    scores: np.ndarray

    @classmethod
    def stack(cls, results: Sequence[tuple[np.ndarray, np.ndarray]]) -> _Lists:
        """One ``(ids, scores)`` result per component, each ``(n, D)`` (or ``(D,)`` for one user)."""
        return cls(ids=np.stack([np.atleast_2d(ids) for ids, _ in results], axis=1),
                   scores=np.stack([np.atleast_2d(scores) for _, scores in results], axis=1))


def _normalised(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Min-max normalise each (user, component) list over its non-padding entries (1 best, 0 last)."""
    valid = ids != -1
    finite = np.where(valid, scores, np.nan).astype(np.float64)
    with np.errstate(invalid="ignore"):
        hi = np.nanmax(np.where(valid.any(-1, keepdims=True), finite, 0.0), axis=-1, keepdims=True)
        lo = np.nanmin(np.where(valid.any(-1, keepdims=True), finite, 0.0), axis=-1, keepdims=True)
    span = hi - lo
    out = np.where(span > 0, (finite - lo) / np.where(span > 0, span, 1.0), 1.0)
    return np.where(valid, out, 0.0)


def fuse(lists: _Lists, k: int, *, method: str, weights: Sequence[float], rrf_k: float,
         provenance: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Fuse component lists into top-``k`` ``(ids, scores, component_scores, component_ranks)``.

    The last two are ``None`` unless ``provenance``. Vectorised over users.
    """
    n, r, depth = lists.ids.shape
    ranks = np.broadcast_to(np.arange(1, depth + 1, dtype=np.float64), (n, r, depth))
    w = np.asarray(weights, dtype=np.float64).reshape(1, r, 1)
    if method == "rrf":
        contrib = w / (rrf_k + ranks)
    else:
        contrib = w * _normalised(lists.scores, lists.ids)
    user = np.broadcast_to(np.arange(n)[:, None, None], (n, r, depth)).ravel()
    comp = np.broadcast_to(np.arange(r)[None, :, None], (n, r, depth)).ravel()
    ids = lists.ids.ravel()
    valid = ids != -1
    user, comp, ids = user[valid], comp[valid], ids[valid]
    contrib, rank_flat = contrib.ravel()[valid], ranks.ravel()[valid]
    raw = lists.scores.ravel()[valid]
    order = np.lexsort((ids, user))
    user, comp, ids, contrib, rank_flat, raw = (a[order] for a in (user, comp, ids, contrib, rank_flat, raw))
    new_group = np.ones(user.size, dtype=bool)
    new_group[1:] = (user[1:] != user[:-1]) | (ids[1:] != ids[:-1])
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    g_user, g_id = user[starts], ids[starts]
    g_score = np.add.reduceat(contrib, starts) if starts.size else np.zeros(0)
    g_best = np.minimum.reduceat(rank_flat, starts) if starts.size else np.zeros(0)
    pick = np.lexsort((g_id, g_best, -g_score, g_user))
    g_user_sorted = g_user[pick]
    first = np.searchsorted(g_user_sorted, np.arange(n))
    position = np.arange(pick.size) - first[g_user_sorted]
    keep = position < k
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows, cols, chosen = g_user_sorted[keep], position[keep], pick[keep]
    out_ids[rows, cols] = g_id[chosen]
    out_scores[rows, cols] = g_score[chosen]
    if not provenance:
        return out_ids, out_scores, None, None
    slot = np.full(starts.size, -1, dtype=np.int64)  # group -> flat output slot
    slot[chosen] = rows * k + cols
    target = slot[group]
    hit = target >= 0
    comp_scores = np.full((n * k, r), np.nan, dtype=np.float32)
    comp_ranks = np.zeros((n * k, r), dtype=np.int32)
    comp_scores[target[hit], comp[hit]] = raw[hit]
    comp_ranks[target[hit], comp[hit]] = rank_flat[hit].astype(np.int32)
    return out_ids, out_scores, comp_scores.reshape(n, k, r), comp_ranks.reshape(n, k, r)


class HybridRetriever(Retriever):
    """Fuses the lists of several fitted retrievers; see the module docstring.

    Args:
        components: fitted retrievers, as ``{name: retriever}`` or a sequence (named by their ``name``,
            with ``_2``, ``_3``... for repeats). All must share the item catalogue and the history.
        config: the fusion settings.

    Attributes:
        tuning: after :meth:`tune`, ``{"metric", "best", "trials"}``.
    """

    name = "hybrid"

    def __init__(self, components: Mapping[str, Retriever] | Sequence[Retriever],
                 config: HybridConfig | None = None) -> None:
        if isinstance(components, Mapping):
            named = dict(components)
        else:
            named = {}
            for comp in components:
                base = getattr(comp, "name", type(comp).__name__)
                key, i = base, 1
                while key in named:
                    i += 1
                    key = f"{base}_{i}"
                named[key] = comp
        if not named:
            raise ConfigError("HybridRetriever: pass at least one component retriever")
        for key, comp in named.items():
            if not isinstance(comp, Retriever):
                raise ConfigError(f"HybridRetriever: component {key!r} is a {type(comp).__name__}, not a Retriever")
        self.components: dict[str, Retriever] = named
        self.config = config or HybridConfig()
        for field_name in ("weights", "served_weights"):
            given = getattr(self.config, field_name)
            if given and len(given) != len(named):
                raise ConfigError(
                    f"HybridConfig.{field_name} has {len(given)} values for {len(named)} components "
                    f"({list(named)}); give one per component or leave it empty"
                )
        self.tuning: dict[str, Any] | None = None
        self._candidate_view = _CandidateView(self)  # for_candidates() is called once per served request

    # ---- contract -------------------------------------------------------------------------------
    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.components)

    @property
    def weights(self) -> tuple[float, ...]:
        """The candidate fusion's weights (all 1 when the config leaves them empty)."""
        return tuple(self.config.weights) or (1.0,) * len(self.components)

    def _weights(self, fusion: Fusion) -> tuple[float, ...]:
        return tuple(fusion.weights) or (1.0,) * len(self.components)

    @property
    def served_source(self) -> str:
        """What serves the list without a reranker: a component's name, or ``"fusion"``."""
        fusion = self.config.served_fusion()
        single = Fusion(fusion.method, fusion.rrf_k, self._weights(fusion)).single()
        return self.sources[single] if single is not None else "fusion"

    @property
    def users(self) -> IdVocab:  # type: ignore[override]
        return self._first("users")

    @property
    def items(self) -> IdVocab:  # type: ignore[override]
        return self._first("items")

    def _first(self, attr: str) -> Any:
        """The first component's ``attr`` (the components share users and items)."""
        comp = next(iter(self.components.values()))
        try:
            return getattr(comp, attr)
        except AttributeError:
            raise NotFittedError("HybridRetriever: fit() its components or load() it first") from None

    def reindex(self, config: Any) -> HybridRetriever:
        """Serve every component from another index (``"HNSW32"`` instead of ``"Flat"``, say)."""
        for comp in self.components.values():
            comp.reindex(config)
        return self

    @property
    def history_fingerprint(self) -> str:
        prints = {comp.history_fingerprint for comp in self.components.values()}
        return prints.pop() if len(prints) == 1 else "mixed:" + ",".join(sorted(prints))

    def fit(self, data: Interactions, *, items: IdVocab | None = None, validation: Split | None = None
            ) -> HybridRetriever:
        """Refit every component on ``data`` (each gets ``validation`` too); with ``validation``, then
        :meth:`tune` both fusions on it, else keep the configured ones."""
        for comp in self.components.values():
            comp.fit(data, items=items, validation=validation)
        if validation is not None:
            self.tune(validation)
        return self

    def set_history(self, data: Interactions) -> HybridRetriever:
        """Give every component the histories ``data`` (no retraining)."""
        for comp in self.components.values():
            comp.set_history(data)
        return self

    def depth(self, k: int) -> int:
        """How many items each component retrieves for a final list of ``k``."""
        return max(k, math.ceil(self.config.depth_factor * k))

    def _lists(self, ids: np.ndarray, depth: int, exclude_seen: bool, allow: Any, deny: Any) -> _Lists:
        return _Lists.stack([comp.retrieve(ids, depth, exclude_seen=exclude_seen, allow=allow, deny=deny)
                             for comp in self.components.values()])

    def _fuse(self, lists: _Lists, k: int, provenance: bool = False, fusion: Fusion | None = None
              ) -> tuple[np.ndarray, ...]:
        """:func:`fuse` with ``fusion`` (default: the candidate fusion)."""
        fusion = fusion or self.config.candidate_fusion()
        return fuse(lists, k, method=fusion.method, weights=self._weights(fusion), rrf_k=fusion.rrf_k,
                    provenance=provenance)

    def _retrieve(self, fusion: Fusion, user_ids, k, exclude_seen, allow, deny):
        k = check_k(k)
        ids, scalar = as_user_array(user_ids)
        out_ids, out_scores, _, _ = self._fuse(self._lists(ids, self.depth(k), exclude_seen, allow, deny), k,
                                               fusion=fusion)
        cold = self.users.rows(ids, missing="ignore") < 0
        if cold.any():  # unknown users: the popularity fallback itself (one list for all), not a fusion of it
            out_ids[cold], out_scores[cold] = self.popular_items(k, allow=allow, deny=deny)
        if scalar:
            return out_ids[0], out_scores[0]
        return out_ids, out_scores

    def _retrieve_history(self, fusion: Fusion, history, k, exclude_seen, allow, deny):
        k = check_k(k)
        values = as_history(history)
        if known_rows(self.items, values).size == 0:
            return self.popular_items(k, exclude=values if exclude_seen else None, allow=allow, deny=deny)
        depth = self.depth(k)
        lists = _Lists.stack([comp.retrieve_history(values, depth, exclude_seen=exclude_seen, allow=allow, deny=deny)
                              for comp in self.components.values()])
        out_ids, out_scores, _, _ = self._fuse(lists, k, fusion=fusion)
        return out_ids[0], out_scores[0]

    def retrieve(self, user_ids, k, *, exclude_seen=True, allow=None, deny=None):
        """The served list (the served fusion: see the module docstring); unknown users get
        :meth:`popular_items`."""
        return self._retrieve(self.config.served_fusion(), user_ids, k, exclude_seen, allow, deny)

    def retrieve_history(self, history, k, *, exclude_seen=True, allow=None, deny=None):
        """Top-``k`` 1-D ``(item_ids, scores)`` for one explicit history: each component's
        ``retrieve_history`` list of depth :meth:`depth`, fused with the served fusion. A history with no
        catalogue item gets :meth:`popular_items`."""
        return self._retrieve_history(self.config.served_fusion(), history, k, exclude_seen, allow, deny)

    def for_candidates(self) -> Retriever:
        """A view of this hybrid whose ``retrieve``/``retrieve_history`` give the candidate fusion (tuned
        for recall at the reranker's depth) instead of the served list."""
        return self._candidate_view

    def popular_items(self, k, *, exclude=None, allow=None, deny=None):
        """The first component's popularity fallback (the components share the training events)."""
        return next(iter(self.components.values())).popular_items(k, exclude=exclude, allow=allow, deny=deny)

    def stored_history(self, user_id: int) -> np.ndarray:
        """The longest of the components' stored histories for ``user_id`` (the components share one
        history, but the two-tower keeps every event while seen masks keep each item once), the first on
        ties; empty for an unknown user."""
        histories = [comp.stored_history(user_id) for comp in self.components.values()]
        return max(histories, key=len)

    def item_embeddings(self) -> tuple[np.ndarray, IdVocab] | None:
        """The first component's item embedding that has one (component order)."""
        return next((e for e in (c.item_embeddings() for c in self.components.values()) if e is not None), None)

    def set_threads(self, threads: int) -> None:
        """Give every component ``threads``."""
        for comp in self.components.values():
            comp.set_threads(threads)

    def candidates(self, user_ids: Any, k: int, *, exclude_seen: bool = True, allow: Any = None,
                   deny: Any = None) -> Candidates:
        """The fused top-``k`` with, per candidate, each component's score and rank (see :class:`Candidates`)."""
        k = check_k(k)
        ids, scalar = as_user_array(user_ids)
        lists = self._lists(ids, self.depth(k), exclude_seen, allow, deny)
        out_ids, out_scores, comp_scores, comp_ranks = self._fuse(lists, k, provenance=True)
        if scalar:
            out_ids, out_scores, comp_scores, comp_ranks = out_ids[0], out_scores[0], comp_scores[0], comp_ranks[0]
        return Candidates(item_ids=out_ids, scores=out_scores, sources=self.sources,
                          component_scores=comp_scores, component_ranks=comp_ranks)

    # ---- tuning ---------------------------------------------------------------------------------
    def tune(self, split: Split, stage: str = "val") -> HybridRetriever:
        """Choose method, ``rrf_k`` and weights maximising ``config.tune_metric`` on ``stage``.

        The components must hold ``split.history(stage)`` (fit on it). Each component's deep list is
        retrieved once; every grid point only re-fuses them. Sets ``config`` and :attr:`tuning`.
        """
        from retrieval.evaluate import targets_by_user

        c = self.config
        if self.history_fingerprint != split.history(stage).fingerprint():
            raise DataValidationError(
                f"HybridRetriever.tune: the components' histories are not split.history({stage!r}); fit "
                f"them on it (or set_history) before tuning"
            )
        metric_k = int(_METRIC_RE.match(c.tune_metric).group(2))
        served_k = int(_METRIC_RE.match(c.served_metric).group(2))
        ks = tuple(sorted({10, metric_k, served_k}))
        users, relevant = targets_by_user(split, stage)
        lists = self._lists(users, self.depth(max(ks)), True, None, None)
        n_comp = len(self.components)
        weight_grid = [(1.0, *rest) for rest in itertools.product(c.tune_weights, repeat=n_comp - 1)]
        points = [("score", 0.0, w) for w in weight_grid] if "score" in c.tune_methods else []
        if "rrf" in c.tune_methods:
            points = [("rrf", rk, w) for rk in c.tune_rrf_ks for w in weight_grid] + points
        # each component alone (RRF with one non-zero weight keeps its order exactly), so the choice is
        # never worse on validation than the best single component
        singles = [tuple(float(i == r) for i in range(n_comp)) for r in range(n_comp)] if n_comp > 1 else []
        points += [("rrf", c.tune_rrf_ks[0], w) for w in singles]
        # singles first: on a tie the served list is one component's own order
        points = points[-len(singles):] + points[:-len(singles)] if singles else points
        trials, best, best_served = [], None, None
        for method, rrf_k, weights in tqdm(points, desc="tune hybrid", disable=not c.progress):
            ranked, _, _, _ = fuse(lists, max(ks), method=method, weights=weights, rrf_k=rrf_k)
            means = evaluate_rankings(ranked, relevant, ks=ks, n_items=len(split.items), n_boot=0).means
            trials.append({"method": method, "rrf_k": rrf_k, "weights": list(weights),
                           **{k: round(v, 6) for k, v in means.items()}})
            if best is None or means[c.tune_metric] > best[0]:
                best = (means[c.tune_metric], method, rrf_k, weights)
            if best_served is None or means[c.served_metric] > best_served[0]:
                best_served = (means[c.served_metric], method, rrf_k, weights)
        _, method, rrf_k, weights = best
        _, s_method, s_rrf_k, s_weights = best_served
        self.config = HybridConfig(**{**self.config.to_dict(), "method": method,
                                      "rrf_k": rrf_k if method == "rrf" else c.rrf_k,
                                      "weights": tuple(weights), "served_method": s_method,
                                      "served_rrf_k": s_rrf_k if s_method == "rrf" else c.served_rrf_k,
                                      "served_weights": tuple(s_weights)})
        self.tuning = {"metric": c.tune_metric, "best": float(best[0]), "served_metric": c.served_metric,
                       "served_best": float(best_served[0]), "served_source": self.served_source,
                       "trials": trials}
        return self

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the fusion config and every component (each in its own folder) atomically."""
        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            names = []  # a list of [key, folder] pairs: component order carries the weights' order
            for i, (key, comp) in enumerate(self.components.items()):
                sub = f"component_{i}"
                comp.save(tmp / sub)
                names.append([key, sub])
            write_manifest(tmp, {"kind": HYBRID_KIND, "config": self.config.to_dict(), "components": names,
                                 "tuning": self.tuning, "versions": library_versions(),
                                 # issue 14: the components' manifests are covered (never an empty list)
                                 "files": {f"{sub}/manifest.json": sha256_file(tmp / sub / "manifest.json")
                                           for _, sub in names}})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HybridRetriever:
        """Load a folder written by :meth:`save` (each component through ``load_retriever``)."""
        from retrieval.registry import load_retriever

        folder = Path(folder)
        manifest = read_manifest(folder, kind=HYBRID_KIND)
        try:
            components = {key: load_retriever(folder / sub) for key, sub in manifest["components"]}
            config = HybridConfig.from_dict(manifest["config"])
        except KeyError as exc:
            raise ArtifactError(f"{folder}: hybrid manifest lacks {exc}; re-save it") from exc
        out = cls(components, config)
        out.tuning = manifest.get("tuning")
        return out


class _CandidateView(Retriever):
    """:meth:`HybridRetriever.for_candidates`: the hybrid with the candidate fusion as its retrieve order.
    Everything else (history, fallback, persistence) is the hybrid's."""

    name = "hybrid"

    def __init__(self, hybrid: HybridRetriever) -> None:
        self.hybrid = hybrid

    def __getattr__(self, attr: str) -> Any:  # users, items, components, candidates, ...
        return getattr(self.hybrid, attr)

    @property
    def history_fingerprint(self) -> str:
        return self.hybrid.history_fingerprint

    def fit(self, data, *, items=None, validation=None):
        self.hybrid.fit(data, items=items, validation=validation)
        return self

    def set_history(self, data):
        self.hybrid.set_history(data)
        return self

    def save(self, folder):
        return self.hybrid.save(folder)

    @classmethod
    def load(cls, folder):
        return cls(HybridRetriever.load(folder))

    def for_candidates(self) -> Retriever:
        return self

    def retrieve(self, user_ids, k, *, exclude_seen=True, allow=None, deny=None):
        h = self.hybrid
        return h._retrieve(h.config.candidate_fusion(), user_ids, k, exclude_seen, allow, deny)

    def retrieve_history(self, history, k, *, exclude_seen=True, allow=None, deny=None):
        h = self.hybrid
        return h._retrieve_history(h.config.candidate_fusion(), history, k, exclude_seen, allow, deny)

    def popular_items(self, k, *, exclude=None, allow=None, deny=None):
        return self.hybrid.popular_items(k, exclude=exclude, allow=allow, deny=deny)

    def stored_history(self, user_id):
        return self.hybrid.stored_history(user_id)


__all__ = ["Candidates", "Fusion", "HybridConfig", "HybridRetriever", "fuse"]
