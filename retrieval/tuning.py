"""Small, seeded searches of retriever settings on the validation split.

* :func:`grid_search`: every point of a grid (the matrix-factorisation models: a second or two each).
* :func:`random_search`: the default config, then a few chosen points, then seeded random points, within
  a trial count and a time budget (the two-tower: a minute or two per trial on 2 cores).

Both fit ``make(config)`` on ``split.history("val")`` (with ``validation=split``, for early stopping) and
keep the best validation NDCG@10; every other field, the seed included, comes from the base config, so a
search is reproducible.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.errors import ConfigError
from data.protocol import Split
from retrieval.base import Retriever
from retrieval.evaluate import evaluate_retriever


@dataclass
class TuningResult:
    """Outcome of a search.

    Attributes:
        best_config: the config with the best validation metric.
        best_value: that metric's value.
        metric: the metric maximised (``"NDCG@10"``).
        trials: one dict per point tried: its parameters, validation metrics and ``fit_s``.
        best_model: the fitted model of the best point (on ``split.history("val")``).
        skipped: points not tried, with why (time budget, catalogue size).
    """

    best_config: Any
    best_value: float
    metric: str
    trials: list[dict[str, Any]]
    best_model: Retriever | None = None
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: metric, best value, trials, skipped and the best config."""
        return {"metric": self.metric, "best": self.best_value, "trials": self.trials, "skipped": self.skipped,
                "best_config": self.best_config.to_dict() if hasattr(self.best_config, "to_dict")
                else dataclasses.asdict(self.best_config)}


def _check_fields(base_config: Any, names: Sequence[str]) -> None:
    fields = {f.name for f in dataclasses.fields(base_config)}
    unknown = sorted(set(names) - fields)
    if unknown:
        raise ConfigError(f"search: unknown field(s) {unknown} for {type(base_config).__name__}")


def _run(make: Callable[[Any], Retriever], points: Sequence[dict[str, Any]], base_config: Any, split: Split,
         metric: str, ks: Sequence[int], progress: bool, budget_s: float | None = None,
         label: str = "") -> TuningResult:
    history = split.history("val")
    trials: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    best: tuple[float, Any, Retriever] | None = None
    started = time.perf_counter()
    bar = tqdm(points, desc=f"tune {label or type(base_config).__name__}", disable=not progress)
    for params in bar:
        elapsed = time.perf_counter() - started
        mean_trial = elapsed / len(trials) if trials else 0.0
        if budget_s is not None and trials and elapsed + mean_trial > budget_s:
            skipped.append({**params, "why": f"time budget ({budget_s:.0f} s; {elapsed:.0f} s used)"})
            continue
        config = dataclasses.replace(base_config, **params)
        tick = time.perf_counter()
        model = make(config).fit(history, items=split.items, validation=split)
        fit_s = time.perf_counter() - tick
        means = evaluate_retriever(model, split, "val", ks=ks, n_boot=0).means
        trials.append({**params, **{k: round(v, 6) for k, v in means.items()}, "fit_s": round(fit_s, 1)})
        if best is None or means[metric] > best[0]:
            best = (means[metric], config, model)
        bar.set_postfix(best=f"{best[0]:.4f}")
    return TuningResult(best_config=best[1], best_value=float(best[0]), metric=metric, trials=trials,
                        best_model=best[2], skipped=skipped)


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
    """Fit ``make(config)`` for every grid point; keep the best on validation.

    ``grid`` maps config field names to candidate values; the other fields come from ``base_config``.
    """
    _check_fields(base_config, list(grid))
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]
    return _run(make, points, base_config, split, metric, ks, progress)


def random_points(space: Mapping[str, Sequence[Any]], base_config: Any, trials: int, *,
                  first: Sequence[Mapping[str, Any]] = (), seed: int = 0,
                  allowed: Callable[[Mapping[str, Any]], bool] | None = None) -> tuple[list[dict], list[dict]]:
    """``(points, refused)``: up to ``trials`` distinct points, as changes to ``base_config``: ``{}`` (the
    base config itself) first, then ``first``, then seeded random points of ``space``. Points that
    ``allowed`` refuses are returned apart."""
    _check_fields(base_config, list(space) + [k for p in first for k in p])
    current = {name: getattr(base_config, name) for name in space}
    rng = np.random.default_rng(seed)
    seen: set[tuple] = set()
    points: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []

    def offer(change: Mapping[str, Any]) -> None:
        full = {**current, **change}
        key = tuple(sorted((k, repr(v)) for k, v in full.items()))
        if key in seen:
            return
        seen.add(key)
        diff = {k: v for k, v in full.items() if v != current.get(k)}
        if allowed is not None and not allowed(full):
            refused.append(diff)
        else:
            points.append(diff)

    offer({})
    for change in first:
        if len(points) < trials:
            offer(change)
    n_space = int(np.prod([len(v) for v in space.values()])) if space else 1
    attempts = 0
    while len(points) < trials and len(seen) < n_space and attempts < 100 * trials:
        attempts += 1
        offer({name: values[int(rng.integers(len(values)))] for name, values in space.items()})
    return points[:trials], refused


def random_search(
    make: Callable[[Any], Retriever],
    base_config: Any,
    space: Mapping[str, Sequence[Any]],
    split: Split,
    *,
    trials: int = 4,
    budget_s: float | None = None,
    first: Sequence[Mapping[str, Any]] = (),
    allowed: Callable[[Mapping[str, Any]], bool] | None = None,
    seed: int = 0,
    metric: str = "NDCG@10",
    ks: Sequence[int] = (10, 50),
    progress: bool = True,
) -> TuningResult:
    """The base config, ``first``, then seeded random points of ``space`` (see :func:`random_points`),
    each fitted and scored on validation; the best is kept.

    A trial is not started when the time used plus the mean trial time would pass ``budget_s`` (the base
    config always runs). Points ``allowed`` refuses (a full softmax over a large catalogue) are skipped.
    """
    if trials < 1:
        raise ConfigError(f"random_search: trials must be >= 1, got {trials}")
    points, refused = random_points(space, base_config, trials, first=first, seed=seed, allowed=allowed)
    result = _run(make, points, base_config, split, metric, ks, progress, budget_s)
    result.skipped = [{**p, "why": "not allowed on this catalogue"} for p in refused] + result.skipped
    return result


__all__ = ["TuningResult", "grid_search", "random_points", "random_search"]
