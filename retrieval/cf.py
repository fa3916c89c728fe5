"""Matrix-factorisation baselines from the ``implicit`` library: ALS and BPR.

Both learn user and item factors from the binary user x item matrix; the factors are exported as
embeddings and served through the FAISS index of :class:`~retrieval.base.EmbeddingRetriever`.

An explicit history (a request's, or one with events observed after training) is **folded in**: its user
vector is computed from the fixed item factors, then the item index is searched with it
(:meth:`~retrieval.base.EmbeddingRetriever.retrieve_history`), so new events change the results without
retraining.

* ALS solves the user's least-squares problem exactly (implicit's ``recalculate_user``, a Cholesky solve of
  ``(YᵀY + λI + Σ_h (c-1) y_h y_hᵀ) u = Σ_h c y_h`` over the history's items ``h`` with confidence
  ``c = alpha``); for a user's own training history this is the vector the last ALS sweep would give, close
  to but not bit-equal to the stored one (training solves approximately, by conjugate gradient, against the
  item factors of the previous sweep).
* BPR has no closed-form user solve (implicit raises for ``recalculate_user``): the fold-in is the mean of
  the history's item factors, with the bias column set to 1 as in the learned user vectors (items that
  co-occur get close factors, so the mean points at the history's neighbourhood; a heuristic, not BPR's
  optimum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from data.config import JsonConfig, require
from retrieval.base import EmbeddingRetriever
from retrieval.index import IndexConfig


@dataclass
class ALSConfig(JsonConfig):
    """Implicit alternating least squares (Hu, Koren & Volinsky 2008).

    Attributes:
        factors: embedding dimension.
        regularization: L2 penalty on the factors.
        alpha: confidence scale; implicit (>= 0.5) gives an observed event confidence ``alpha`` (unobserved
            pairs have confidence 1).
        iterations: ALS sweeps.
        threads: CPU threads for implicit (BLAS is pinned to one thread while fitting).
        seed: random seed of the factor initialisation.
        show_progress: show implicit's progress bar.
        index: the FAISS index the item factors are served from.
    """

    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15
    threads: int = 1
    seed: int = 0
    show_progress: bool = False
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        require(self.factors >= 1, "factors must be >= 1")
        require(self.iterations >= 1, "iterations must be >= 1")
        require(self.regularization >= 0 and self.alpha >= 0, "regularization and alpha must be >= 0")
        require(self.threads >= 1, "threads must be >= 1")


@dataclass
class BPRConfig(JsonConfig):
    """Bayesian personalised ranking (Rendle et al. 2009), SGD over sampled (user, pos, neg) triples.

    Attributes:
        factors: embedding dimension (implicit adds one bias column to it).
        learning_rate: SGD step size.
        regularization: L2 penalty.
        iterations: passes over the data.
        threads: CPU threads; 1 keeps the result bit-for-bit reproducible.
        seed: random seed.
        show_progress: show implicit's progress bar.
        index: the FAISS index the item factors are served from.
    """

    factors: int = 64
    learning_rate: float = 0.05
    regularization: float = 0.01
    iterations: int = 100
    threads: int = 1
    seed: int = 0
    show_progress: bool = False
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        require(self.factors >= 1, "factors must be >= 1")
        require(self.iterations >= 1, "iterations must be >= 1")
        require(self.learning_rate > 0, "learning_rate must be > 0")
        require(self.threads >= 1, "threads must be >= 1")


class ImplicitRetriever(EmbeddingRetriever):
    """Factors learned by an ``implicit`` model; subclasses say which model in :meth:`_build_model` and how
    a history is folded in (:meth:`history_query`)."""

    def _build_model(self):
        raise NotImplementedError

    def _learn(self, matrix: sp.csr_matrix, **_: object) -> tuple[np.ndarray, np.ndarray]:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):  # implicit's own advice: its threads, not BLAS's
            model = self._build_model()
            model.fit(matrix, show_progress=self.config.show_progress)
        return np.asarray(model.user_factors), np.asarray(model.item_factors)


class ALSRetriever(ImplicitRetriever):
    """Implicit ALS factors behind the FAISS index; histories are folded in by an exact user solve."""

    name = "als"
    config_type = ALSConfig

    def __init__(self, config: ALSConfig | None = None) -> None:
        super().__init__(config)
        self._solver: Any = None  # an implicit model holding the item factors, for recalculate_user

    def history_query(self, item_rows: np.ndarray) -> np.ndarray:
        """The ALS user vector of a history of item rows (implicit's ``recalculate_user``; repeats count once,
        as in training)."""
        from threadpoolctl import threadpool_limits

        solver = self._solver
        if solver is None or solver.item_factors is not self.item_factors:
            solver = self._build_model()
            solver.item_factors = self.item_factors
            solver.user_factors = np.zeros((0, self.item_factors.shape[1]), dtype=np.float32)
            self._solver = solver
        solver.num_threads = self.config.threads
        cols = np.unique(item_rows)
        row = sp.csr_matrix((np.ones(cols.size, dtype=np.float32), cols, [0, cols.size]),
                            shape=(1, len(self.items)))
        with threadpool_limits(1, "blas"):
            return np.asarray(solver.recalculate_user(0, row), dtype=np.float32)

    def _build_model(self):
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.config
        return AlternatingLeastSquares(
            factors=c.factors, regularization=c.regularization, alpha=c.alpha, iterations=c.iterations,
            calculate_training_loss=False, num_threads=c.threads, random_state=c.seed,
        )


class BPRRetriever(ImplicitRetriever):
    """Implicit BPR factors (with the item-bias column) behind the FAISS index; a history is folded in as
    the mean of its item factors (see the module docstring)."""

    name = "bpr"
    config_type = BPRConfig

    def history_query(self, item_rows: np.ndarray) -> np.ndarray:
        """The mean factor of the history's items (each once), with the bias column (the last) set to 1."""
        query = self.item_factors[np.unique(item_rows)].mean(axis=0)
        query[-1] = 1.0
        return query.astype(np.float32)

    def item_embeddings(self) -> tuple[np.ndarray, Any] | None:
        """The item factors without the bias column (the bias is popularity, not similarity)."""
        if self.item_factors is None or self.item_factors.shape[1] < 3:
            return None
        return self.item_factors[:, :-1], self.items

    def _build_model(self):
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.config
        return BayesianPersonalizedRanking(
            factors=c.factors, learning_rate=c.learning_rate, regularization=c.regularization,
            iterations=c.iterations, num_threads=c.threads, random_state=c.seed,
        )
