"""Most-popular baseline: every user gets the items with the most training events."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from data.config import JsonConfig
from retrieval.base import EmbeddingRetriever
from retrieval.index import IndexConfig


@dataclass
class PopularityConfig(JsonConfig):
    """Popularity baseline.

    Attributes:
        index: the item index; popularity is a 1-D embedding (user vector ``[1]``, item vector
            ``[count]``), so exact ``"Flat"`` search is the right choice.
    """

    index: IndexConfig = field(default_factory=IndexConfig)


class PopularityRetriever(EmbeddingRetriever):
    """Scores item i by its count of training events, for every user (seen items still excluded)."""

    name = "popularity"
    config_type = PopularityConfig

    def _learn(self, matrix: sp.csr_matrix, **_: object) -> tuple[np.ndarray, np.ndarray]:
        counts = np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel()
        return np.ones((matrix.shape[0], 1), dtype=np.float32), counts[:, None]
