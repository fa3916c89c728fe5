"""The config of the training job (``shortlist train``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from data.config import JsonConfig, require
from data.dataset import Interactions
from data.datasets import DatasetSpec, FileColumns, load_dataset
from data.protocol import ProtocolConfig
from retrieval.fitting import FitOptions
from retrieval.hybrid import HybridConfig
from retrieval.index import IndexConfig
from retrieval.registry import SPECS, model_names, spec
from retrieval.two_tower import TwoTowerConfig

#: Every model ``shortlist train`` can fit: the registry's names (:mod:`retrieval.registry`).
MODELS = model_names()

#: Models with a typed field of their own in :class:`TrainConfig`.
_TYPED = ("two_tower", "hybrid")


@dataclass
class TrainConfig(JsonConfig):
    """What ``shortlist train`` does.

    Attributes:
        dataset: a MovieLens name (``"ml-latest-small"``, ``"ml-1m"``, ``"ml-100k"``, ``"ml-25m"``) found
            under ``data_path``, ``$SHORTLIST_DATA_DIR`` or the download cache; ignored when
            ``interactions`` is set.
        data_path: a folder holding the dataset's files; ``None`` searches as above.
        interactions: the user's own event file (CSV, TSV or Parquet) instead of a MovieLens dataset,
            read with the ``columns`` below through :func:`data.generic.load_interactions`.
        items: the user's own item table for ``interactions`` (optional).
        columns: how to read those files (:class:`data.datasets.FileColumns`: column names).
        model: the retriever to train, a registered name (:data:`MODELS`): ``"hybrid"`` (two-tower +
            co-visitation + ALS + popularity fused, the default), ``"two_tower"``, ``"covisit"``, ``"als"``,
            ``"bpr"`` or ``"popularity"``.
        tune: search each model's settings on validation (the CF grids, the two-tower's seeded search,
            the hybrid's fusions).
        search_trials: most two-tower configs the search tries (the default config, the full softmax
            where the catalogue allows it, then seeded random points).
        search_budget_s: the two-tower search starts no trial likely to end past this many seconds.
        search_workers: processes the two-tower search trains its trials in (one torch thread each).
        protocol: filtering rules of the evaluation protocol.
        index: the FAISS index the trained item embeddings are served from (every retriever's).
        two_tower: the two-tower model and its training (its own ``index`` is replaced by ``index``); the
            search starts from it.
        hybrid: how the hybrid fuses its components, and its validation grid.
        models: settings of any other registered model, by name (``{"als": {"factors": 128}}``), over its
            defaults; with ``tune`` the search may still change the searched fields.
        artifacts: root folder of the versioned artifacts.
        ks: cut-offs of the reported metrics.
        seed: seed of every model (the searches keep it fixed).
        threads: CPU threads for training and search.
    """

    dataset: str = "ml-latest-small"
    data_path: str | None = None
    interactions: str | None = None
    items: str | None = None
    columns: FileColumns = field(default_factory=FileColumns)
    model: str = "hybrid"
    tune: bool = True
    search_trials: int = 4
    search_budget_s: float = 900.0
    search_workers: int = 2
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: str = "artifacts"
    ks: tuple[int, ...] = (10, 20, 50, 100, 200)
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        require(self.model in SPECS, f"model must be one of {list(SPECS)}, got {self.model!r}")
        require(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks must be positive cut-offs")
        require(self.threads >= 1, "threads must be >= 1")
        require(self.search_trials >= 1, f"search_trials must be >= 1, got {self.search_trials}")
        require(self.search_budget_s > 0, f"search_budget_s must be > 0, got {self.search_budget_s}")
        require(isinstance(self.models, dict), "models must map model names to settings")
        for name, values in self.models.items():
            require(name in SPECS, f"models: unknown model {name!r}; registered: {list(SPECS)}")
            require(name not in _TYPED, f"models: set {name!r} in TrainConfig.{name}, not in models")
            spec(name).config_type.from_dict(dict(values))  # a typo fails here, not mid-run
        self.dataset_spec()  # items without interactions fails here

    def dataset_spec(self) -> DatasetSpec:
        """Where the events come from (:func:`data.datasets.load_dataset`)."""
        return DatasetSpec(name=self.dataset, path=self.data_path, interactions=self.interactions,
                           items=self.items, columns=self.columns)

    def load_data(self, data_path: str | None = None) -> Interactions:
        """The raw events (``data_path`` overrides where MovieLens is looked for)."""
        spec = self.dataset_spec()
        if data_path:
            spec = dataclasses.replace(spec, path=data_path)
        return load_dataset(spec)

    def configs(self) -> dict[str, Any]:
        """Each model's settings for :func:`retrieval.fitting.fit_retriever`."""
        return {**self.models, "two_tower": self.two_tower, "hybrid": self.hybrid}

    def fit_options(self, progress: bool = True) -> FitOptions:
        """The job-wide settings of :func:`retrieval.fitting.fit_retriever`."""
        return FitOptions(tune=self.tune, seed=self.seed, threads=self.threads, index=self.index,
                          search_trials=self.search_trials, search_budget_s=self.search_budget_s,
                          search_seed=self.seed, search_workers=self.search_workers, progress=progress)
