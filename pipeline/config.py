"""The config of the training job (``shortlist train``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data.config import JsonConfig, require
from data.protocol import ProtocolConfig
from retrieval.hybrid import HybridConfig
from retrieval.index import IndexConfig
from retrieval.two_tower import TwoTowerConfig

MODELS = ("popularity", "als", "bpr", "two_tower", "hybrid")


@dataclass
class TrainConfig(JsonConfig):
    """What ``shortlist train`` does.

    Attributes:
        dataset: a MovieLens name (``"ml-latest-small"``, ``"ml-1m"``, ``"ml-100k"``, ``"ml-25m"``) found
            under ``data_path``, ``$SHORTLIST_DATA_DIR`` or the download cache.
        data_path: a folder holding the dataset's files; ``None`` searches as above.
        model: the retriever to train: ``"hybrid"`` (two-tower + ALS + popularity fused, the default),
            ``"two_tower"``, ``"als"``, ``"bpr"`` or ``"popularity"``.
        tune: grid-search the CF models' hyperparameters (and the hybrid's fusion) on validation.
        protocol: filtering rules of the evaluation protocol.
        index: the FAISS index the trained item embeddings are served from (every retriever's).
        two_tower: the two-tower model and its training (its own ``index`` is replaced by ``index``).
        hybrid: how the hybrid fuses its components, and its validation grid.
        artifacts: root folder of the versioned artifacts.
        ks: cut-offs of the reported metrics.
        seed: seed of every model (the grid search keeps it fixed).
        threads: CPU threads for training and search.
    """

    dataset: str = "ml-latest-small"
    data_path: str | None = None
    model: str = "hybrid"
    tune: bool = True
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    artifacts: str = "artifacts"
    ks: tuple[int, ...] = (10, 20, 50, 100, 200)
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        require(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        require(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks must be positive cut-offs")
        require(self.threads >= 1, "threads must be >= 1")
