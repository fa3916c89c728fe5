"""The hybrid score: the cross-encoder score blended with the retrieval score and rank.

Per candidate of a top-M list, the features are

* ``ce``: the cross-encoder score, z-scored within the list;
* ``retrieval``: the retrieval score, z-scored within the list;
* ``log_rank``: ``log(rank)`` of the 1-based retrieval rank;
* ``source``: one-hot of the retriever that found the candidate, when the candidates carry it;
* ``covisit``: the co-visitation score of the candidate after the request's recent items
  (:class:`~retrieval.covisit.Covisitation`, carried by the ranker; :func:`extra_features` computes it);

and the hybrid score is their weighted sum. The weights are fitted on validation lists by a listwise
softmax (the held-out item against the rest of its list) with an L2 penalty.

**Never worse than retrieval**: before trusting the blend, K-fold cross-validation over validation users
compares the blend's NDCG@10 with the retrieval order's; unless the blend wins by more than
``min_gain``, :class:`HybridBlend` keeps the retrieval order (``use_blend`` is False, and :meth:`score`
returns a score that reproduces the retrieval order exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data.errors import ArtifactError, ConfigError, DataValidationError, NotFittedError
from data.io import atomic_write_json
from ranking.config import BlendConfig
from ranking.data import reranked_ndcg

BLEND_KIND = "hybrid_blend"
#: Features computed outside the blend from the ranker and the request (:func:`extra_features`).
EXTRA_FEATURES = ("covisit",)


def extra_features(blend: HybridBlend, ranker: Any, histories: Any, candidates: np.ndarray
                   ) -> dict[str, np.ndarray] | None:
    """The ``extra`` features ``blend`` reads, for ``(n, M)`` candidate ids (``-1`` pads) and their
    histories (item ids, oldest first), from what ``ranker`` carries (its co-visitation counts); ``None``
    when the blend reads none. A blend that reads one the ranker lacks raises :class:`ConfigError`."""
    if not blend.extra_names or not blend.use_blend:
        return None
    check_extra(blend, ranker)
    return {"covisit": ranker.covisit.score_lists(list(histories), np.asarray(candidates))}


def check_extra(blend: Any, ranker: Any) -> None:
    """Raise :class:`ConfigError` when ``blend`` reads a feature ``ranker`` cannot give (checked when a
    recommender or a batch job is built, so nothing fails mid-run)."""
    if "covisit" in getattr(blend, "extra_names", ()) and getattr(ranker, "covisit", None) is None:
        raise ConfigError("this hybrid head reads co-visitation scores ('covisit') and the ranker carries no "
                          "co-visitation counts; serve the head with the ranker it was fitted with, refit it "
                          "(python -m pipeline.second_stage --heads-only) or fit the blend without 'covisit'")


def _checked(ce: Any, retrieval: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ce, retrieval, valid)`` as float arrays of one ``(lists, M)`` shape, and where both are finite."""
    ce = np.asarray(ce, dtype=np.float64)
    retrieval = np.asarray(retrieval, dtype=np.float64)
    if ce.shape != retrieval.shape or ce.ndim != 2:
        raise DataValidationError(f"ce and retrieval scores must be (lists, M) arrays of one shape; got {ce.shape} "
                                  f"and {retrieval.shape}")
    return ce, retrieval, np.isfinite(ce) & np.isfinite(retrieval)


def _zscore(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row z-score over the valid entries (0 where invalid or where a row is constant)."""
    x = np.where(valid, values, 0.0).astype(np.float64)
    count = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    mean = x.sum(axis=1, keepdims=True) / count
    var = (np.where(valid, (x - mean) ** 2, 0.0)).sum(axis=1, keepdims=True) / count
    z = np.where(var > 1e-12, (x - mean) / np.sqrt(np.maximum(var, 1e-12)), 0.0)
    return np.where(valid, z, 0.0)


class HybridBlend:
    """A few weights over the cross-encoder and retrieval signals; see the module docstring.

    Args:
        config: features, penalty, folds and the never-worse margin.
    """

    def __init__(self, config: BlendConfig | None = None) -> None:
        self.config = config or BlendConfig()
        self.weights: np.ndarray | None = None
        self.feature_names: list[str] = []
        self.n_sources = 0
        self.use_blend = False
        self.report: dict[str, Any] = {}

    # ---- features -------------------------------------------------------------------------------
    @property
    def extra_names(self) -> tuple[str, ...]:
        """The features the caller must pass in ``extra`` (computed outside the blend: ``"covisit"``)."""
        return tuple(name for name in self.config.features if name in EXTRA_FEATURES)

    def features(self, ce: np.ndarray, retrieval: np.ndarray, sources: np.ndarray | None = None,
                 n_sources: int | None = None, extra: dict[str, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(X, valid, names)``: ``(n, M, F)`` features, the ``(n, M)`` validity mask and feature names.

        Columns of ``ce``/``retrieval`` are candidates in retrieval order; ``-inf`` (or NaN) marks padding.
        ``extra`` holds the features of :attr:`extra_names`, each ``(n, M)``.
        """
        ce, retrieval, valid = _checked(ce, retrieval)
        columns, names = [], []
        for name in self.config.features:
            if name == "ce":
                columns.append(_zscore(ce, valid))
                names.append("ce")
            elif name == "retrieval":
                columns.append(_zscore(retrieval, valid))
                names.append("retrieval")
            elif name == "log_rank":
                rank = np.broadcast_to(np.log(np.arange(1, ce.shape[1] + 1, dtype=np.float64)), ce.shape)
                columns.append(np.where(valid, rank, 0.0))
                names.append("log_rank")
            elif name == "source" and sources is not None:
                sources = np.asarray(sources, dtype=np.int64)
                count = int(n_sources if n_sources is not None else sources.max(initial=-1) + 1)
                for s in range(count):
                    columns.append(np.where(valid & (sources == s), 1.0, 0.0))
                    names.append(f"source={s}")
            elif name in EXTRA_FEATURES:
                value = None if extra is None else extra.get(name)
                if value is None or np.shape(value) != ce.shape:
                    raise DataValidationError(
                        f"this hybrid head reads the {name!r} feature: pass extra={{{name!r}: (lists, M) array}} "
                        f"of shape {ce.shape} (ranking.blend.extra_features computes it from the ranker)")
                columns.append(np.where(valid, np.asarray(value, dtype=np.float64), 0.0))
                names.append(name)
        X = np.stack(columns, axis=-1) if columns else np.zeros((*ce.shape, 0))
        return X, valid, names

    # ---- fitting --------------------------------------------------------------------------------
    def _fit_weights(self, X: np.ndarray, valid: np.ndarray, target_col: np.ndarray) -> np.ndarray:
        import torch

        x = torch.as_tensor(X, dtype=torch.float64)
        mask = torch.as_tensor(valid)
        target = torch.as_tensor(target_col, dtype=torch.long)
        w = torch.zeros(X.shape[-1], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=self.config.steps, line_search_fn="strong_wolfe")
        l2 = self.config.l2

        def closure():
            optimizer.zero_grad()
            logits = (x @ w).masked_fill(~mask, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w * w).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return w.detach().numpy().copy()

    def fit(self, ce: np.ndarray, retrieval: np.ndarray, target_col: np.ndarray, n_users: int | None = None,
            sources: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> HybridBlend:
        """Fit on validation lists that hold their target at column ``target_col``.

        ``n_users`` counts every validation user (lists without the target add 0 to NDCG@10); it only
        scales the reported NDCG values.
        """
        target_col = np.asarray(target_col, dtype=np.int64)
        if target_col.shape != (np.asarray(ce).shape[0],):
            raise DataValidationError(f"target_col must have one entry per list; got {target_col.shape}")
        self.n_sources = int(np.asarray(sources).max(initial=-1) + 1) if sources is not None else 0
        X, valid, names = self.features(ce, retrieval, sources, self.n_sources, extra)
        if len(target_col) and not valid[np.arange(len(target_col)), target_col].all():
            raise DataValidationError("every list's target column must hold a valid (finite) candidate")
        self.feature_names = names
        n = len(target_col)
        total = n_users or n
        retrieval_order = -np.broadcast_to(np.arange(X.shape[1], dtype=np.float64), valid.shape)
        retrieval_order = np.where(valid, retrieval_order, -np.inf)
        folds = min(self.config.folds, n) if n else 0
        blend_cv, base_cv = 0.0, 0.0
        if folds >= 2:
            assign = np.random.default_rng(self.config.seed).permutation(n) % folds
            for f in range(folds):
                train, held = assign != f, assign == f
                w = self._fit_weights(X[train], valid[train], target_col[train])
                scores = np.where(valid[held], X[held] @ w, -np.inf)
                blend_cv += reranked_ndcg(scores, target_col[held], total)
                base_cv += reranked_ndcg(retrieval_order[held], target_col[held], total)
        self.weights = self._fit_weights(X, valid, target_col) if n else np.zeros(len(names))
        in_sample = reranked_ndcg(np.where(valid, X @ self.weights, -np.inf), target_col, total) if n else 0.0
        self.use_blend = folds >= 2 and blend_cv > base_cv + self.config.min_gain
        self.report = {"cv_ndcg@10_blend": blend_cv, "cv_ndcg@10_retrieval": base_cv, "folds": folds,
                       "fit_ndcg@10_blend": in_sample, "lists": n, "users": total,
                       "use_blend": self.use_blend,
                       "weights": dict(zip(names, np.round(self.weights, 6).tolist()))}
        return self

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, ce: np.ndarray, retrieval: np.ndarray, sources: np.ndarray | None = None,
              extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """``(n, M)`` hybrid scores (``-inf`` on padding). When the blend did not beat retrieval on
        validation, the score is ``-column``, which keeps the retrieval order exactly."""
        if self.weights is None:
            raise NotFittedError("HybridBlend: call fit() or load() before score()")
        if not self.use_blend:
            _, _, valid = _checked(ce, retrieval)
            order = -np.broadcast_to(np.arange(valid.shape[1], dtype=np.float64), valid.shape)
            return np.where(valid, order, -np.inf)
        X, valid, _ = self.features(ce, retrieval, sources, self.n_sources, extra)
        return np.where(valid, X @ self.weights, -np.inf)

    def rerank(self, candidates: np.ndarray, ce: np.ndarray, retrieval: np.ndarray,
               sources: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The candidate ids of each row reordered by the hybrid score (padding ``-1`` last)."""
        candidates = np.asarray(candidates)
        order = np.argsort(-self.score(ce, retrieval, sources, extra), axis=1, kind="stable")
        return np.take_along_axis(candidates, order, axis=1)

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.weights is None:
            raise NotFittedError("HybridBlend: nothing to save; call fit() first")
        return {"kind": BLEND_KIND, "config": self.config.to_dict(), "weights": self.weights.tolist(),
                "feature_names": self.feature_names, "n_sources": self.n_sources, "use_blend": self.use_blend,
                "report": self.report}

    def save(self, path: str | Path) -> Path:
        """Write the blend as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> HybridBlend:
        if payload.get("kind") != BLEND_KIND:
            raise ArtifactError(f"not a hybrid blend (kind {payload.get('kind')!r}); pass a file written by "
                                "HybridBlend.save")
        blend = cls(BlendConfig.from_dict(payload["config"]))
        blend.weights = np.asarray(payload["weights"], dtype=np.float64)
        blend.feature_names = list(payload["feature_names"])
        blend.n_sources = int(payload["n_sources"])
        blend.use_blend = bool(payload["use_blend"])
        blend.report = dict(payload.get("report", {}))
        if blend.weights.shape != (len(blend.feature_names),):
            raise ArtifactError("hybrid blend: weights and feature names differ in length; re-fit the blend")
        return blend

    @classmethod
    def load(cls, path: str | Path) -> HybridBlend:
        import json

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ArtifactError(f"{path}: cannot read the hybrid blend ({exc}); re-fit it") from exc
