"""The main job: load, filter and split the data, tune and fit a retriever, evaluate it, save it.

Every model is fitted through :func:`retrieval.fitting.fit_retriever` from its registry entry
(:mod:`retrieval.registry`): tuned on validation, then serving the test stage's histories.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from data.dataset import Interactions
from data.datasets import load_dataset as _load
from data.metrics import MetricReport
from data.protocol import Split, apply_filters, leave_one_out
from pipeline.artifacts import save_artifact
from pipeline.config import TrainConfig
from retrieval.evaluate import evaluate_retriever
from retrieval.fitting import Fitted, fit_retriever
from retrieval.registry import make_retriever

log = logging.getLogger(__name__)


def load_dataset(name: str = "ml-latest-small", path: str | None = None) -> Interactions:
    """Raw events of a MovieLens dataset (see :func:`data.datasets.load_dataset`)."""
    return _load(name, path)


def prepare_split(data: Interactions, config: TrainConfig | None = None) -> Split:
    """Protocol steps 1-4: filter, then leave-one-out."""
    config = config or TrainConfig()
    return leave_one_out(apply_filters(data, config.protocol))


def fit_for_test(model: str, config: TrainConfig, split: Split, *, progress: bool = True) -> Fitted:
    """``config.model`` tuned on validation and serving the test histories (see
    :func:`retrieval.fitting.fit_retriever`)."""
    return fit_retriever(model, split, "test", configs=config.configs(), options=config.fit_options(progress))


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
        served_source: for a hybrid, what serves the list without a reranker (a component or ``"fusion"``).
        candidates_report: for a hybrid, test metrics of its candidate fusion (tuned for recall).
    """

    folder: Any
    report: MetricReport
    baselines: dict[str, MetricReport]
    tuning: dict[str, Any]
    split_stats: dict[str, Any]
    seconds: float
    served_source: str | None = None
    candidates_report: MetricReport | None = None


def train(config: TrainConfig | None = None, *, data: Interactions | None = None,
          progress: bool = True) -> TrainResult:
    """Run the main job and return where the artifact went and its metrics (see :func:`fit_for_test`).

    The saved artifact is the model that was scored; its manifest holds the config, the data fingerprint,
    what validation chose and the test metrics.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    raw = data if data is not None else _load(config.dataset_spec())
    split = prepare_split(raw, config)
    stats = split.stats()
    log.info("dataset after filtering: %s", stats)

    fitted = fit_for_test(config.model, config, split, progress=progress)
    model, components = fitted.model, dict(fitted.components)
    report = evaluate_retriever(model, split, "test", ks=config.ks, seed=config.seed)
    candidates_report = None
    served_source = getattr(model, "served_source", None)
    if model.for_candidates() is not model:
        candidates_report = evaluate_retriever(model.for_candidates(), split, "test", ks=config.ks, seed=config.seed)
    if not components:
        components = {"popularity": make_retriever("popularity").fit(split.history("test"), items=split.items)}
    baselines = {name: evaluate_retriever(c, split, "test", ks=config.ks, seed=config.seed)
                 for name, c in components.items()}

    metrics = {"test": report.row(config.model),
               "baselines_test": {name: r.row(name) for name, r in baselines.items()},
               "validation": fitted.tuning}
    if candidates_report is not None:
        metrics["candidates_test"] = candidates_report.row(f"{config.model} candidates")
        metrics["served_source"] = served_source
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
    return TrainResult(folder=folder, report=report, baselines=baselines, tuning=fitted.tuning, split_stats=stats,
                       seconds=time.perf_counter() - started, served_source=served_source,
                       candidates_report=candidates_report)
