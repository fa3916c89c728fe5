"""Top-K ranking metrics, averaged over users, with bootstrap confidence intervals.

Every metric takes ``ranked``, an (n_users, K) array of item ids in rank order (padding -1 is never
relevant), and ``relevant``, one collection of relevant item ids per user. Rank positions are 1-based.

* ``Recall@K`` = |top-K ∩ relevant| / |relevant|. With one held-out item (leave-one-out) this is the
  hit rate HR@K: 1 if the item is in the top K, else 0.
* ``NDCG@K`` = DCG@K / IDCG@K with DCG@K = Σ_{i≤K, item_i relevant} 1 / log2(i + 1) and IDCG@K the DCG of
  a perfect list (min(|relevant|, K) hits at the top). One target at rank r gives 1 / log2(r + 1).
* ``MRR@K`` = 1 / (rank of the first relevant item) if it is within the top K, else 0.
* ``Coverage@K`` = |∪_users top-K| / catalogue size: the share of the catalogue recommended to anyone.
  It is a property of the whole list set, so it has no per-user value and no interval.

The protocol ranks the whole catalogue with each user's own history masked; callers produce ``ranked``
that way (exact search with ``exclude_seen=True``). A user's mean is taken over users, each weighted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.errors import DataValidationError

PER_USER_METRICS = ("Recall", "NDCG", "MRR")


def relevance_matrix(ranked: np.ndarray, relevant: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (n, K) matrix ``rel[u, i] = ranked[u, i] in relevant[u]`` and the count of relevant items."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise DataValidationError(f"ranked must be a 2-D (users, K) array, got shape {ranked.shape}")
    if len(relevant) != ranked.shape[0]:
        raise DataValidationError(
            f"relevant has {len(relevant)} entries but ranked has {ranked.shape[0]} rows; pass one per user"
        )
    sets = [np.atleast_1d(np.asarray(r, dtype=np.int64)) for r in relevant]
    n_rel = np.array([np.unique(s).size for s in sets], dtype=np.int64)
    if ranked.shape[0] and (n_rel == 1).all():
        targets = np.array([s[0] for s in sets], dtype=np.int64)
        rel = ranked == targets[:, None]
    else:
        rel = np.zeros(ranked.shape, dtype=bool)
        for u, s in enumerate(sets):
            rel[u] = np.isin(ranked[u], s)
    rel &= ranked != -1
    return rel, n_rel


def _per_user_at_k(rel: np.ndarray, n_rel: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Recall, NDCG and MRR at ``k`` from a relevance matrix (the definitions in the module docstring)."""
    top = rel[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (top * discounts[: top.shape[1]]).sum(axis=1)
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(n_rel, k)]
    return {
        "Recall": top.sum(axis=1) / np.maximum(n_rel, 1),
        "NDCG": np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0),
        "MRR": np.where(top.any(axis=1), 1.0 / (top.argmax(axis=1) + 1), 0.0),
    }


def recall_at_k(ranked: np.ndarray, relevant: Sequence[Any], k: int) -> np.ndarray:
    """Per-user Recall@k (hit rate with one target)."""
    return _per_user_at_k(*relevance_matrix(ranked, relevant), k)["Recall"]


def ndcg_at_k(ranked: np.ndarray, relevant: Sequence[Any], k: int) -> np.ndarray:
    """Per-user NDCG@k with binary gains and log2(rank + 1) discounts."""
    return _per_user_at_k(*relevance_matrix(ranked, relevant), k)["NDCG"]


def mrr_at_k(ranked: np.ndarray, relevant: Sequence[Any], k: int) -> np.ndarray:
    """Per-user reciprocal rank of the first relevant item within the top k (0 when none)."""
    return _per_user_at_k(*relevance_matrix(ranked, relevant), k)["MRR"]


def coverage_at_k(ranked: np.ndarray, k: int, n_items: int) -> float:
    """Share of the ``n_items`` catalogue that appears in at least one user's top k."""
    if n_items <= 0:
        raise DataValidationError("n_items must be positive")
    top = np.asarray(ranked)[:, :k]
    return float(np.unique(top[top != -1]).size / n_items)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-case ``values``.

    Cases are resampled with replacement; with ``clusters`` (one label per case, e.g. the user of each
    ``last-n`` test case) whole clusters are resampled instead, because one user's cases are not
    independent, and each replicate's mean is taken over the cases of the drawn clusters.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    if clusters is None:
        for b in range(n_boot):  # chunked to bound memory at any user count
            means[b] = values[rng.integers(0, values.size, values.size)].mean()
    else:
        clusters = np.asarray(clusters)
        if clusters.shape != values.shape:
            raise DataValidationError(f"clusters must give one label per value: {clusters.shape} vs {values.shape}")
        _, label = np.unique(clusters, return_inverse=True)
        sums = np.bincount(label, weights=values)
        counts = np.bincount(label).astype(np.float64)
        k = sums.size
        for b in range(n_boot):
            draw = rng.integers(0, k, k)
            means[b] = sums[draw].sum() / counts[draw].sum()
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, **kwargs: Any) -> tuple[float, float]:
    """Interval of mean(a - b) over the same cases: whether method a beats method b (``clusters=`` as in
    :func:`bootstrap_ci`)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise DataValidationError(f"paired_bootstrap_ci: shapes differ {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, **kwargs)


@dataclass
class MetricReport:
    """Per-user metric values, their means, bootstrap intervals and catalogue coverage.

    Attributes:
        per_user: metric name (``"NDCG@10"``) -> per-user values, aligned with ``users``.
        coverage: ``"Coverage@K"`` -> catalogue coverage.
        users: the external user ids evaluated, in row order.
        ci: metric name -> (lo, hi) 95% bootstrap interval of the mean.
    """

    per_user: dict[str, np.ndarray]
    coverage: dict[str, float]
    users: np.ndarray
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def means(self) -> dict[str, float]:
        return {name: float(v.mean()) if v.size else float("nan") for name, v in self.per_user.items()}

    def row(self, method: str, **extra: Any) -> dict[str, Any]:
        """One benchmark JSON row: ``{"method", metric: mean, "<metric>_ci": [lo, hi], ...}``."""
        out: dict[str, Any] = {"method": method}
        for name, mean in self.means.items():
            out[name] = round(mean, 6)
            if name in self.ci:
                out[f"{name}_ci"] = [round(self.ci[name][0], 6), round(self.ci[name][1], 6)]
        out.update({k: round(v, 6) for k, v in self.coverage.items()})
        out["users"] = int(self.users.size)
        out.update(extra)
        return out


def evaluate_rankings(
    ranked: np.ndarray,
    relevant: Sequence[Any],
    *,
    ks: Sequence[int] = (10, 20, 50, 100, 200),
    n_items: int,
    users: np.ndarray | None = None,
    ci_metrics: Sequence[str] = ("Recall@10", "NDCG@10", "MRR@10"),
    n_boot: int = 1000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> MetricReport:
    """Recall@K, NDCG@K and MRR@K for each K in ``ks`` plus Coverage@K, with intervals for ``ci_metrics``
    (``clusters``: one label per row, resampled as whole clusters; see :func:`bootstrap_ci`)."""
    ranked = np.asarray(ranked)
    if ranked.shape[1] < max(ks):
        raise DataValidationError(f"ranked has {ranked.shape[1]} columns; need at least max(ks)={max(ks)}")
    rel, n_rel = relevance_matrix(ranked, relevant)
    per_user: dict[str, np.ndarray] = {}
    coverage: dict[str, float] = {}
    for k in ks:
        for name, values in _per_user_at_k(rel, n_rel, k).items():
            per_user[f"{name}@{k}"] = values
        coverage[f"Coverage@{k}"] = coverage_at_k(ranked, k, n_items)
    users = np.arange(ranked.shape[0]) if users is None else np.asarray(users)
    ci = {}
    if n_boot > 0:
        ci = {m: bootstrap_ci(per_user[m], n_boot=n_boot, seed=seed, clusters=clusters)
              for m in ci_metrics if m in per_user}
    return MetricReport(per_user=per_user, coverage=coverage, users=users, ci=ci)
