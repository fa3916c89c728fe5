"""One way to fit any registered retriever on a protocol split: tune on validation, serve a stage.

    fitted = fit_retriever("two_tower", split, "test")        # searched on validation, test histories
    fitted.model.retrieve(user_ids, 100)

:func:`fit_retriever` reads the model's :class:`~retrieval.registry.RetrieverSpec`:

1. the model is fitted on ``split.history("val")`` (``validation=split``: early stopping), tuned by the
   spec's search when ``options.tune`` (a grid, or the two-tower's budgeted random search);
2. for ``stage="test"`` it then serves the test histories (train + validation): ``"refit"`` models are
   refitted with the chosen config, ``"history"`` models keep their weights and read the new histories;
3. a composite (the hybrid) fits each component as in 1, tunes its fusions on validation, then moves
   every component to the stage's histories.

With ``cache=FOLDER`` a model fitted on ``split.history("val")`` is saved there and loaded again on the next
call while its history fingerprint and settings match (a mismatch or a damaged folder is refitted).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.config import JsonConfig, require
from data.errors import ArtifactError, ConfigError, DataValidationError
from data.protocol import Split
from retrieval.base import Retriever
from retrieval.index import IndexConfig
from retrieval.registry import RetrieverSpec, load_retriever, spec
from retrieval.tuning import TuningResult, grid_search, random_search

log = logging.getLogger(__name__)

_STAGES = ("val", "test")


@dataclass
class FitOptions(JsonConfig):
    """Job-wide settings of :func:`fit_retriever`.

    Attributes:
        tune: run each model's validation search (else its config as given).
        seed: seed of every model (the searches keep it fixed).
        threads: CPU threads of the models that have a ``threads`` field (BPR keeps 1: reproducible).
        index: the FAISS index every model serves from; ``None`` keeps each config's own.
        search_trials: most points of a random search (the two-tower's), the default config included.
        search_budget_s: a random search starts no trial that would likely end past this many seconds.
        search_seed: seed of the random search's points.
        search_workers: processes the random search trains its trials in (one torch thread each; 2 on a
            2-core machine halves its wall time; the results do not depend on it).
        progress: show progress bars.
    """

    tune: bool = True
    seed: int = 0
    threads: int = 2
    index: IndexConfig | None = None
    search_trials: int = 4
    search_budget_s: float = 900.0
    search_seed: int = 0
    search_workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        require(self.threads >= 1, f"FitOptions.threads must be >= 1, got {self.threads}")
        require(self.search_trials >= 1, f"FitOptions.search_trials must be >= 1, got {self.search_trials}")
        require(self.search_budget_s > 0, f"FitOptions.search_budget_s must be > 0, got {self.search_budget_s}")
        require(self.search_workers >= 1, f"FitOptions.search_workers must be >= 1, got {self.search_workers}")


@dataclass
class Fitted:
    """What :func:`fit_retriever` returns.

    Attributes:
        model: the retriever, holding ``split.history(stage)`` as its users' histories.
        config: its config (the one validation chose).
        tuning: per model name, what its search found (``TuningResult.summary()``; the hybrid's fusion
            search under ``"hybrid"``); empty when nothing was tuned.
        components: for a composite, its fitted components by name.
    """

    model: Retriever
    config: Any
    tuning: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Retriever] = field(default_factory=dict)


def model_config(name: str, configs: Mapping[str, Any] | None, options: FitOptions) -> Any:
    """The typed config of ``name``: ``configs[name]`` (a config object, or a dict from JSON) over the
    defaults, with the job's seed, threads and index applied."""
    s = spec(name)
    given = (configs or {}).get(name)
    if given is not None and not isinstance(given, (dict, s.config_type)):
        raise ConfigError(f"configs[{name!r}] must be a {s.config_type.__name__} or a dict, got "
                          f"{type(given).__name__}")
    overrides = given.to_dict() if isinstance(given, s.config_type) else given
    return s.make_config(overrides, seed=options.seed, threads=options.threads, index=options.index)


def fit_retriever(name: str, split: Split, stage: str = "val", *, configs: Mapping[str, Any] | None = None,
                  options: FitOptions | None = None, cache: str | Path | None = None,
                  fitted: Mapping[str, Retriever] | None = None) -> Fitted:
    """Fit the registered model ``name`` on ``split`` (tuned on validation) for ``stage``; see the module
    docstring. ``configs`` maps model names to their configs (objects or dicts); others use defaults.

    ``fitted`` (composites only) maps component names to retrievers already fitted on
    ``split.history("val")``, used as they are instead of fitting them again (a saved two-tower, say)."""
    options = options or FitOptions()
    if stage not in _STAGES:
        raise ConfigError(f"stage must be one of {_STAGES}, got {stage!r}")
    s = spec(name)
    if fitted and not s.components:
        raise ConfigError(f"fit_retriever({name!r}): fitted= gives components, and {name!r} has none")
    if s.components:
        return _fit_composite(s, split, stage, configs, options, dict(fitted or {}))
    config = model_config(name, configs, options)
    if cache is not None and options.tune and s.search_space:
        raise ConfigError(f"fit_retriever({name!r}): cache= holds one config, but a search would choose "
                          "another; pass options=FitOptions(tune=False) or drop cache=")
    searched = options.tune and bool(s.search_space)
    if stage == "test" and s.test_stage == "refit" and not searched and cache is None:
        # nothing to choose on validation: fit the test stage's history directly
        return Fitted(model=s.cls(config).fit(split.history("test"), items=split.items), config=config)
    cached = _load_cached(cache, split, config)
    if cached is not None:
        model, tuning = cached, {}
        config = model.config
    else:
        model, config, tuning = _fit_on_validation(s, config, split, options)
        if cache is not None:
            model.save(cache)
    if stage == "test":
        test_history = split.history("test")
        if s.test_stage == "refit":
            model = s.cls(config).fit(test_history, items=split.items)
        else:
            model.set_history(test_history)
    return Fitted(model=model, config=config, tuning=tuning)


def _fit_on_validation(s: RetrieverSpec, config: Any, split: Split, options: FitOptions
                       ) -> tuple[Retriever, Any, dict[str, Any]]:
    if not (options.tune and s.search_space):
        model = s.cls(config).fit(split.history("val"), items=split.items, validation=split)
        return model, config, {}
    make = s.cls
    if s.search == "grid":
        result: TuningResult = grid_search(make, config, s.search_space, split, progress=options.progress)
    else:
        n_items = len(split.items)
        allowed = (lambda point: s.point_filter(point, n_items)) if s.point_filter else None
        result = random_search(make, config, s.search_space, split, trials=options.search_trials,
                               budget_s=options.search_budget_s, first=s.first_points, allowed=allowed,
                               seed=options.search_seed, progress=options.progress,
                               workers=options.search_workers)
    return result.best_model, result.best_config, {s.name: result.summary()}


def _fit_composite(s: RetrieverSpec, split: Split, stage: str, configs: Mapping[str, Any] | None,
                   options: FitOptions, fitted: dict[str, Retriever]) -> Fitted:
    unknown = sorted(set(fitted) - set(s.components))
    if unknown:
        raise ConfigError(f"fit_retriever({s.name!r}): fitted= names {unknown}, not among its components "
                          f"{list(s.components)}")
    expected = split.history("val").fingerprint()
    stale = sorted(name for name, model in fitted.items() if model.history_fingerprint != expected)
    if stale:
        raise DataValidationError(f"fit_retriever({s.name!r}): fitted components {stale} do not hold "
                                  "split.history('val'); fit them on it (or set_history) first")
    components: dict[str, Retriever] = {}
    tuning: dict[str, Any] = {}
    for name in s.components:
        if name in fitted:
            components[name] = fitted[name]
            continue
        part = fit_retriever(name, split, "val", configs=configs, options=options)
        components[name] = part.model
        tuning.update(part.tuning)
    config = model_config(s.name, configs, options)
    if options.progress is False and hasattr(config, "progress"):
        config = dataclasses.replace(config, progress=False)
    model = s.cls(components, config)
    if options.tune and hasattr(model, "tune"):
        model.tune(split)
        tuning[s.name] = dict(model.tuning or {})
    if stage == "test":
        model.set_history(split.history("test"))
    return Fitted(model=model, config=model.config, tuning=tuning, components=components)


#: config fields that change speed, not what a model learns or returns
SPEED_FIELDS = ("threads", "device", "progress")


def config_settings(config: Any) -> dict[str, Any]:
    """A config's fields less the speed-only ones (:data:`SPEED_FIELDS`): what two fits must share to be the
    same model."""
    return {k: v for k, v in config.to_dict().items() if k not in SPEED_FIELDS}


def _load_cached(cache: str | Path | None, split: Split, config: Any) -> Retriever | None:
    path = Path(cache) if cache is not None else None
    if path is None or not (path / "manifest.json").is_file():
        return None
    try:
        model = load_retriever(path)
    except ArtifactError as exc:
        log.warning("cannot load %s (%s); refitting", path, exc)
        return None
    if model.history_fingerprint != split.history("val").fingerprint() or type(model.config) is not type(config) \
            or config_settings(model.config) != config_settings(config):
        log.warning("%s was fitted on other data or with another config; refitting", path)
        return None
    return model


__all__ = ["SPEED_FIELDS", "FitOptions", "Fitted", "config_settings", "fit_retriever", "model_config"]
