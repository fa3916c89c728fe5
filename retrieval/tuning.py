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
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data.errors import ConfigError
from data.protocol import Split
from retrieval.base import Retriever
from retrieval.evaluate import evaluate_retriever

log = logging.getLogger(__name__)


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
        models: every fitted model, in trial order (only with ``keep_models``).
    """

    best_config: Any
    best_value: float
    metric: str
    trials: list[dict[str, Any]]
    best_model: Retriever | None = None
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    models: list[Retriever] = dataclasses.field(default_factory=list)

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


def _fit_and_score(make: Callable[[Any], Retriever], config: Any, split: Split, ks: Sequence[int],
                   folder: str | None = None) -> tuple[Retriever | None, dict[str, float], float]:
    """One trial: fit on the validation history, score validation; in a worker process (``folder`` set)
    the model is saved there (safetensors, FAISS, JSON) and not returned."""
    if folder is not None and hasattr(config, "progress"):
        config = dataclasses.replace(config, progress=False)
    tick = time.perf_counter()
    model = make(config).fit(split.history("val"), items=split.items, validation=split)
    fit_s = time.perf_counter() - tick
    means = evaluate_retriever(model, split, "val", ks=ks, n_boot=0).means
    if folder is not None:
        model.save(folder)
        return None, means, fit_s
    return model, means, fit_s


def _run(make: Callable[[Any], Retriever], points: Sequence[dict[str, Any]], base_config: Any, split: Split,
         metric: str, ks: Sequence[int], progress: bool, budget_s: float | None = None,
         label: str = "", workers: int = 1, keep_models: bool = False) -> TuningResult:
    """Fit and score every point (in ``workers`` processes when > 1), stopping at ``budget_s``."""
    trials: list[dict[str, Any] | None] = [None] * len(points)
    models: list[Retriever | None] = [None] * len(points)
    skipped: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(total=len(points), desc=f"tune {label or type(base_config).__name__}", disable=not progress)

    def record(i: int, model: Retriever | None, means: dict[str, float], fit_s: float) -> None:
        trials[i] = {**points[i], **{k: round(v, 6) for k, v in means.items()}, "fit_s": round(fit_s, 1)}
        models[i] = model
        done = [t for t in trials if t is not None]
        bar.update(1)
        bar.set_postfix(best=f"{max(t[metric] for t in done):.4f}")

    def over_budget(n_done: int) -> bool:
        """Whether a new trial would likely end past ``budget_s`` (the first always starts)."""
        if budget_s is None or n_done == 0:
            return False
        elapsed = time.perf_counter() - started
        return elapsed + elapsed / n_done > budget_s

    def skip(params: dict[str, Any]) -> None:
        skipped.append({**params, "why": f"time budget ({budget_s:.0f} s)"})

    def run_here() -> None:
        """The points not done yet, one after another in this process."""
        for i, params in enumerate(points):
            if trials[i] is not None:
                continue
            if over_budget(sum(t is not None for t in trials)):
                skip(params)
                continue
            record(i, *_fit_and_score(make, dataclasses.replace(base_config, **params), split, ks))

    if workers <= 1 or len(points) == 1:  # one point: no process to spawn
        run_here()
    else:
        try:
            _run_parallel(make, points, base_config, split, ks, workers, record, over_budget, skip)
        except BrokenProcessPool as exc:
            # a spawned worker died: most often a caller's script without `if __name__ == "__main__":`
            # (spawn re-runs it), or memory; the points not done run here instead
            log.warning("search workers failed (%s); running the remaining points in this process. A script "
                        "that trains with workers > 1 must call it under `if __name__ == \"__main__\":`", exc)
            skipped.clear()
            run_here()
    bar.close()
    done = [i for i, t in enumerate(trials) if t is not None]
    best = max(done, key=lambda i: (trials[i][metric], -i))  # the earliest point on ties
    return TuningResult(best_config=dataclasses.replace(base_config, **points[best]),
                        best_value=float(trials[best][metric]), metric=metric, trials=[trials[i] for i in done],
                        best_model=models[best], skipped=skipped,
                        models=[models[i] for i in done] if keep_models else [])


def _run_parallel(make, points, base_config, split, ks, workers, record, over_budget, skip) -> None:
    """Trials in ``workers`` spawned processes (one torch thread each, as the configs say); each saves its
    model to a temporary folder and the parent loads the ones it keeps."""
    import multiprocessing
    import tempfile
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from retrieval.registry import load_retriever

    with tempfile.TemporaryDirectory(prefix="shortlist-search-") as tmp, ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = list(enumerate(points))
        running: dict[Any, int] = {}
        n_done = 0
        while pending or running:
            while pending and len(running) < workers:
                if over_budget(n_done):
                    for _, params in pending:
                        skip(params)
                    pending = []
                    break
                i, params = pending.pop(0)
                folder = f"{tmp}/trial_{i}"
                future = pool.submit(_fit_and_score, make, dataclasses.replace(base_config, **params), split, ks,
                                     folder)
                running[future] = i
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                _, means, fit_s = future.result()
                n_done += 1
                record(i, load_retriever(f"{tmp}/trial_{i}"), means, fit_s)


def grid_search(
    make: Callable[[Any], Retriever],
    base_config: Any,
    grid: Mapping[str, Sequence[Any]],
    split: Split,
    *,
    metric: str = "NDCG@10",
    ks: Sequence[int] = (10, 50),
    progress: bool = True,
    workers: int = 1,
    keep_models: bool = False,
) -> TuningResult:
    """Fit ``make(config)`` for every grid point; keep the best on validation.

    ``grid`` maps config field names to candidate values; the other fields come from ``base_config``.
    ``workers`` > 1 fits points in that many processes (worth it for models that train for minutes);
    ``keep_models`` returns every fitted model too (``{"seed": [1, 2]}`` trains one config with two seeds).
    """
    _check_fields(base_config, list(grid))
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))] or [{}]
    return _run(make, points, base_config, split, metric, ks, progress, workers=workers, keep_models=keep_models)


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
    workers: int = 1,
) -> TuningResult:
    """The base config, ``first``, then seeded random points of ``space`` (see :func:`random_points`),
    each fitted and scored on validation; the best is kept (the earliest on ties).

    A trial is not started when the time used plus the mean trial time would pass ``budget_s`` (the base
    config always runs). Points ``allowed`` refuses (a full softmax over a large catalogue) are skipped.
    ``workers`` > 1 runs trials in that many spawned processes; the results are the same as in one.
    """
    if trials < 1:
        raise ConfigError(f"random_search: trials must be >= 1, got {trials}")
    points, refused = random_points(space, base_config, trials, first=first, seed=seed, allowed=allowed)
    result = _run(make, points, base_config, split, metric, ks, progress, budget_s, workers=workers)
    result.skipped = [{**p, "why": "not allowed on this catalogue"} for p in refused] + result.skipped
    return result


__all__ = ["TuningResult", "grid_search", "random_points", "random_search"]
