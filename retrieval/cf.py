"""Matrix-factorisation baselines from the ``implicit`` library: ALS and BPR.

Both learn user and item factors from the binary user x item matrix; the factors are exported as
embeddings and served through the FAISS index of :class:`~retrieval.base.EmbeddingRetriever`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        alpha: confidence scale; an observed event has confidence ``1 + alpha``.
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
    """Factors learned by an ``implicit`` model; subclasses say which model in :meth:`_build_model`."""

    def _build_model(self):
        raise NotImplementedError

    def _learn(self, matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):  # implicit's own advice: its threads, not BLAS's
            model = self._build_model()
            model.fit(matrix, show_progress=self.config.show_progress)
        return np.asarray(model.user_factors), np.asarray(model.item_factors)


class ALSRetriever(ImplicitRetriever):
    """Implicit ALS factors behind the FAISS index."""

    name = "als"
    config_type = ALSConfig

    def _build_model(self):
        from implicit.cpu.als import AlternatingLeastSquares

        c = self.config
        return AlternatingLeastSquares(
            factors=c.factors, regularization=c.regularization, alpha=c.alpha, iterations=c.iterations,
            calculate_training_loss=False, num_threads=c.threads, random_state=c.seed,
        )


class BPRRetriever(ImplicitRetriever):
    """Implicit BPR factors (with the item-bias column) behind the FAISS index."""

    name = "bpr"
    config_type = BPRConfig

    def _build_model(self):
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        c = self.config
        return BayesianPersonalizedRanking(
            factors=c.factors, learning_rate=c.learning_rate, regularization=c.regularization,
            iterations=c.iterations, num_threads=c.threads, random_state=c.seed,
        )
