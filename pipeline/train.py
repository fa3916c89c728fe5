"""The main job: load, filter and split the data, tune and fit a retriever, evaluate it, save it."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from data.dataset import Interactions
from data.metrics import MetricReport
from data.protocol import Split, apply_filters, leave_one_out
from pipeline.artifacts import save_artifact
from pipeline.config import TrainConfig
from retrieval.cf import ALSConfig, BPRConfig
from retrieval.evaluate import evaluate_retriever
from retrieval.popularity import PopularityConfig
from retrieval.registry import make_retriever
from retrieval.tuning import TuningResult, grid_search

log = logging.getLogger(__name__)

#: Small validation grids, one per model (every other field keeps its default and the fixed seed).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "popularity": {},
    "als": {"factors": [32, 64, 128], "regularization": [0.01, 0.1], "alpha": [1.0, 5.0]},
    "bpr": {"factors": [32, 64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.001, 0.01]},
}


def base_config(model: str, config: TrainConfig) -> Any:
    """The model's default config with the job's seed, threads and index."""
    if model == "popularity":
        return PopularityConfig(index=config.index)
    cls = {"als": ALSConfig, "bpr": BPRConfig}[model]
    return cls(seed=config.seed, threads=config.threads, index=config.index)


def load_dataset(name: str = "ml-latest-small", path: str | None = None) -> Interactions:
    """Raw events of a MovieLens dataset (see :func:`data.movielens.load_movielens`)."""
    from data.movielens import load_movielens

    return load_movielens(name, path)


def prepare_split(data: Interactions, config: TrainConfig | None = None) -> Split:
    """Protocol steps 1-4: filter, then leave-one-out."""
    config = config or TrainConfig()
    return leave_one_out(apply_filters(data, config.protocol))


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        folder: the artifact version folder.
        report: test metrics of the saved model.
        baseline: test metrics of the popularity baseline on the same split.
        tuning: the grid search (``None`` when tuning was off).
        split_stats: dataset statistics after filtering.
        seconds: wall time of the job.
    """

    folder: Any
    report: MetricReport
    baseline: MetricReport
    tuning: TuningResult | None
    split_stats: dict[str, Any]
    seconds: float


def train(config: TrainConfig | None = None, *, data: Interactions | None = None,
          progress: bool = True) -> TrainResult:
    """Run the main job and return where the artifact went and its metrics.

    The model is tuned on the validation split (fitted on train, scored on the validation item), refitted
    with the best config on train + validation, and scored on the test item. The saved artifact is that
    refitted model; its manifest holds the config, the data fingerprint and the test metrics.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    raw = data if data is not None else load_dataset(config.dataset, config.data_path)
    split = prepare_split(raw, config)
    stats = split.stats()
    log.info("dataset after filtering: %s", stats)

    model_config = base_config(config.model, config)
    tuning = None
    if config.tune and GRIDS[config.model]:
        tuning = grid_search(lambda c: make_retriever(config.model, c), model_config, GRIDS[config.model],
                             split, progress=progress)
        model_config = tuning.best_config
    history = split.history("test")
    model = make_retriever(config.model, model_config).fit(history, items=split.items)
    report = evaluate_retriever(model, split, "test", ks=config.ks, seed=config.seed)
    popularity = make_retriever("popularity", PopularityConfig()).fit(history, items=split.items)
    baseline = evaluate_retriever(popularity, split, "test", ks=config.ks, seed=config.seed)

    metrics = {"test": report.row(config.model), "popularity_test": baseline.row("popularity")}
    if tuning is not None:
        metrics["validation"] = {"best": tuning.best_value, "metric": tuning.metric, "trials": tuning.trials}
    folder = save_artifact(
        config.artifacts,
        model,
        raw.items,
        config={"train": config.to_dict(), "model": dataclasses.asdict(model_config)},
        data={"name": raw.name, "fingerprint": raw.fingerprint(), "history_fingerprint":
              history.fingerprint(), "stats": stats},
        metrics=metrics,
    )
    return TrainResult(folder=folder, report=report, baseline=baseline, tuning=tuning, split_stats=stats,
                       seconds=time.perf_counter() - started)
