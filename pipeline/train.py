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
from retrieval.base import Retriever
from retrieval.cf import ALSConfig, BPRConfig
from retrieval.evaluate import evaluate_retriever
from retrieval.hybrid import HybridRetriever
from retrieval.popularity import PopularityConfig
from retrieval.registry import make_retriever
from retrieval.tuning import grid_search
from retrieval.two_tower import TwoTowerRetriever

log = logging.getLogger(__name__)

#: Small validation grids of the CF models (every other field keeps its default and the fixed seed).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "popularity": {},
    "als": {"factors": [32, 64, 128], "regularization": [0.01, 0.1], "alpha": [1.0, 5.0]},
    "bpr": {"factors": [32, 64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.001, 0.01]},
}


def base_config(model: str, config: TrainConfig) -> Any:
    """The model's config with the job's seed, threads and index."""
    if model == "popularity":
        return PopularityConfig(index=config.index)
    if model == "two_tower":
        return dataclasses.replace(config.two_tower, index=config.index)
    if model == "bpr":  # BPR's parallel SGD is hogwild: only one thread gives a reproducible model
        return BPRConfig(seed=config.seed, threads=1, index=config.index)
    return ALSConfig(seed=config.seed, threads=config.threads, index=config.index)


def load_dataset(name: str = "ml-latest-small", path: str | None = None) -> Interactions:
    """Raw events of a MovieLens dataset (see :func:`data.movielens.load_movielens`)."""
    from data.movielens import load_movielens

    return load_movielens(name, path)


def prepare_split(data: Interactions, config: TrainConfig | None = None) -> Split:
    """Protocol steps 1-4: filter, then leave-one-out."""
    config = config or TrainConfig()
    return leave_one_out(apply_filters(data, config.protocol))


def fit_on_validation(model: str, config: TrainConfig, split: Split, *, progress: bool = True
                      ) -> tuple[Retriever, dict[str, Any]]:
    """A model fitted on ``split.history("val")`` (tuned on validation where it has a grid).

    Returns the model and what the tuning found (``{}`` when nothing was tuned).
    """
    model_config = base_config(model, config)
    history = split.history("val")
    if model == "two_tower":
        return TwoTowerRetriever(model_config).fit(history, items=split.items, validation=split), {}
    tuning: dict[str, Any] = {}
    if config.tune and GRIDS[model]:
        result = grid_search(lambda c: make_retriever(model, c), model_config, GRIDS[model], split,
                             progress=progress)
        model_config = result.best_config
        tuning = {"metric": result.metric, "best": result.best_value, "trials": result.trials,
                  "best_config": dataclasses.asdict(model_config)}
    return make_retriever(model, model_config).fit(history, items=split.items), tuning


def fit_for_test(model: str, config: TrainConfig, split: Split, *, progress: bool = True
                 ) -> tuple[Retriever, dict[str, Any], dict[str, Retriever]]:
    """A model ready to score the test stage: ``(model, tuning, components)``.

    ``tuning`` maps each tuned model's name to its validation search.

    * CF models are tuned on validation, then refitted with the best config on train + validation.
    * The two-tower trains on train (early stopping on validation) and then takes train + validation as
      its users' histories, without retraining: the query tower reads the history at request time.
    * The hybrid fits its components on train (two-tower, tuned ALS, popularity), tunes the fusion on
      validation, then moves every component to the train + validation history (ALS keeps its factors;
      the validation item joins its seen-item mask).
    """
    test_history = split.history("test")
    if model == "hybrid":
        components: dict[str, Retriever] = {}
        tuning: dict[str, Any] = {}
        for name in ("two_tower", "als", "popularity"):
            components[name], tuning[name] = fit_on_validation(name, config, split, progress=progress)
        hybrid = HybridRetriever(components, config.hybrid)
        if config.tune:
            hybrid.tune(split)
            tuning["hybrid"] = {k: v for k, v in (hybrid.tuning or {}).items()}
        hybrid.set_history(test_history)
        return hybrid, tuning, components
    if model == "two_tower":
        two_tower, _ = fit_on_validation(model, config, split, progress=progress)
        return two_tower.set_history(test_history), {}, {}
    _, tuning = fit_on_validation(model, config, split, progress=progress) if config.tune else (None, {})
    model_config = base_config(model, config)
    if tuning:
        model_config = type(model_config).from_dict(tuning["best_config"])
    refitted = make_retriever(model, model_config).fit(test_history, items=split.items)
    return refitted, ({model: tuning} if tuning else {}), {}


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        folder: the artifact version folder.
        report: test metrics of the saved model.
        baselines: test metrics of the other retrievers on the same split (the hybrid's components, or
            the popularity baseline), by name.
        tuning: what validation tuning chose, per model.
        split_stats: dataset statistics after filtering.
        seconds: wall time of the job.
    """

    folder: Any
    report: MetricReport
    baselines: dict[str, MetricReport]
    tuning: dict[str, Any]
    split_stats: dict[str, Any]
    seconds: float


def train(config: TrainConfig | None = None, *, data: Interactions | None = None,
          progress: bool = True) -> TrainResult:
    """Run the main job and return where the artifact went and its metrics (see :func:`fit_for_test`).

    The saved artifact is the model that was scored; its manifest holds the config, the data fingerprint,
    what validation chose and the test metrics.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    raw = data if data is not None else load_dataset(config.dataset, config.data_path)
    split = prepare_split(raw, config)
    stats = split.stats()
    log.info("dataset after filtering: %s", stats)

    model, tuning, components = fit_for_test(config.model, config, split, progress=progress)
    report = evaluate_retriever(model, split, "test", ks=config.ks, seed=config.seed)
    if not components:
        components = {"popularity": make_retriever("popularity").fit(split.history("test"), items=split.items)}
    baselines = {name: evaluate_retriever(c, split, "test", ks=config.ks, seed=config.seed)
                 for name, c in components.items()}

    metrics = {"test": report.row(config.model),
               "baselines_test": {name: r.row(name) for name, r in baselines.items()},
               "validation": tuning}
    folder = save_artifact(
        config.artifacts,
        model,
        raw.items,
        config={"train": config.to_dict()},
        data={"name": raw.name, "fingerprint": raw.fingerprint(),
              "history_fingerprint": split.history("test").fingerprint(), "stats": stats,
              **({"events": raw.meta["events"]} if "events" in raw.meta else {})},  # issue 14: folded event log
        metrics=metrics,
    )
    return TrainResult(folder=folder, report=report, baselines=baselines, tuning=tuning, split_stats=stats,
                       seconds=time.perf_counter() - started)
