"""Small, seeded grid search of retriever hyperparameters on the validation split."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from data.errors import ConfigError
from data.protocol import Split
from retrieval.base import Retriever
from retrieval.evaluate import evaluate_retriever


@dataclass
class TuningResult:
    """Outcome of :func:`grid_search`.

    Attributes:
        best_config: the config with the best validation metric.
        best_value: that metric's value.
        metric: the metric maximised (``"NDCG@10"``).
        trials: one dict per grid point: its parameters and validation metrics.
    """

    best_config: Any
    best_value: float
    metric: str
    trials: list[dict[str, Any]]


def grid_search(
    make: Callable[[Any], Retriever],
    base_config: Any,
    grid: Mapping[str, Sequence[Any]],
    split: Split,
    *,
    metric: str = "NDCG@10",
    ks: Sequence[int] = (10, 50),
    progress: bool = True,
) -> TuningResult:
    """Fit ``make(config)`` on ``split.history("val")`` for every grid point; keep the best on validation.

    ``grid`` maps config field names to candidate values; the other fields (the seed among them) come
    from ``base_config``, so the search is reproducible.
    """
    fields = {f.name for f in dataclasses.fields(base_config)}
    unknown = sorted(set(grid) - fields)
    if unknown:
        raise ConfigError(f"grid: unknown field(s) {unknown} for {type(base_config).__name__}")
    history = split.history("val")
    names = list(grid)
    points = list(itertools.product(*(grid[n] for n in names))) or [()]
    trials: list[dict[str, Any]] = []
    best: tuple[float, Any] | None = None
    for values in tqdm(points, desc=f"tune {type(base_config).__name__}", disable=not progress):
        params = dict(zip(names, values))
        config = dataclasses.replace(base_config, **params)
        model = make(config).fit(history, items=split.items)
        report = evaluate_retriever(model, split, "val", ks=ks, n_boot=0)
        means = report.means
        trials.append({**params, **{k: round(v, 6) for k, v in means.items()}})
        if best is None or means[metric] > best[0]:
            best = (means[metric], config)
    return TuningResult(best_config=best[1], best_value=float(best[0]), metric=metric, trials=trials)
