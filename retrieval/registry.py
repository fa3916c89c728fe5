"""Retrievers by name: the one place a model is named.

A :class:`RetrieverSpec` says everything the jobs need about a model: its class, its typed config, the
validation search that tunes it, and how it moves from the validation stage to the test stage. The CLI
choices, :data:`pipeline.config.MODELS`, the grids and :func:`retrieval.fitting.fit_retriever` all read
:data:`SPECS`, so a new retriever is one class, one config and one :func:`register` call::

    @dataclass
    class ItemKNNConfig(JsonConfig):
        neighbours: int = 50
        index: IndexConfig = field(default_factory=IndexConfig)

    class ItemKNNRetriever(EmbeddingRetriever):
        name = "item_knn"
        config_type = ItemKNNConfig
        def _learn(self, matrix, **_): ...

    register(RetrieverSpec("item_knn", ItemKNNRetriever, ItemKNNConfig,
                           search_space={"neighbours": (20, 50, 100)}))

:func:`load_retriever` loads any saved retriever; the manifest says which class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.errors import ConfigError
from data.io import read_manifest
from retrieval.base import RETRIEVER_KIND, Retriever
from retrieval.cf import ALSConfig, ALSRetriever, BPRConfig, BPRRetriever
from retrieval.covisit import CovisitConfig
from retrieval.covisit_retriever import CovisitRetriever
from retrieval.hybrid import HYBRID_KIND, HybridConfig, HybridRetriever
from retrieval.popularity import PopularityConfig, PopularityRetriever
from retrieval.two_tower import TWO_TOWER_SEARCH, TwoTowerConfig, TwoTowerRetriever, search_point_allowed

_SEARCHES = ("grid", "random")
_TEST_STAGES = ("refit", "history")


@dataclass(frozen=True)
class RetrieverSpec:
    """What the jobs need to know about one retriever.

    Attributes:
        name: the model's name (CLI ``--model``, ``TrainConfig.model``, manifests).
        cls: the :class:`~retrieval.base.Retriever` subclass.
        config_type: its typed config (a :class:`~data.config.JsonConfig` dataclass).
        search_space: config field -> values tried on validation; empty: nothing to tune.
        search: ``"grid"`` (every point of ``search_space``) or ``"random"`` (the default config, then
            ``first_points``, then seeded random points, up to a trial count and a time budget).
        first_points: for ``"random"``: points tried right after the default config (one field changed
            each, say ``{"loss": "full_softmax"}``).
        test_stage: how a model fitted on the validation history serves the test stage: ``"refit"``
            (refit the chosen config on train + validation: matrix factorisation) or ``"history"`` (keep
            the weights and read the new histories: sequence models).
        components: for a composite (the hybrid): the registered models it fuses, in order.
        fixed: config fields the jobs always set (``threads=1`` keeps BPR's hogwild SGD reproducible).
        point_filter: ``(point, n_items) -> bool``: whether a search point is worth trying on a catalogue
            of ``n_items`` (the two-tower's full softmax only up to a measured size).
        common: the job-wide settings (``seed``, ``threads``, ``index``) applied to this config.
        description: one line for ``--help``.
    """

    name: str
    cls: type
    config_type: type
    search_space: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    search: str = "grid"
    first_points: Sequence[Mapping[str, Any]] = ()
    test_stage: str = "refit"
    components: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    point_filter: Callable[[Mapping[str, Any], int], bool] | None = None
    common: tuple[str, ...] = ("seed", "threads", "index")
    description: str = ""

    def __post_init__(self) -> None:
        if self.search not in _SEARCHES:
            raise ConfigError(f"RetrieverSpec({self.name!r}).search must be one of {_SEARCHES}")
        if self.test_stage not in _TEST_STAGES:
            raise ConfigError(f"RetrieverSpec({self.name!r}).test_stage must be one of {_TEST_STAGES}")
        fields = {f.name for f in dataclasses.fields(self.config_type)}
        named = set(self.search_space) | set(self.fixed) | {k for p in self.first_points for k in p}
        unknown = sorted(named - fields)
        if unknown:
            raise ConfigError(f"RetrieverSpec({self.name!r}): unknown {self.config_type.__name__} field(s) "
                              f"{unknown}")

    def make_config(self, overrides: Mapping[str, Any] | None = None, **common: Any) -> Any:
        """The typed config: defaults, then ``overrides`` (a dict from JSON, validated), then the ``common``
        job settings (``seed``, ``threads``, ``index``) for the fields this config has, then :attr:`fixed`."""
        config = self.config_type.from_dict(dict(overrides or {}))
        fields = {f.name for f in dataclasses.fields(self.config_type)}
        chosen = {k: v for k, v in common.items() if k in fields and k in self.common and v is not None}
        return dataclasses.replace(config, **{**chosen, **self.fixed})


SPECS: dict[str, RetrieverSpec] = {}


def register(spec: RetrieverSpec) -> RetrieverSpec:
    """Add ``spec`` (or replace the one of the same name); returns it."""
    if not isinstance(spec, RetrieverSpec):
        raise ConfigError(f"register: pass a RetrieverSpec, got {type(spec).__name__}")
    missing = [c for c in spec.components if c not in SPECS]
    if missing:
        raise ConfigError(f"register({spec.name!r}): components {missing} are not registered")
    SPECS[spec.name] = spec
    return spec


register(RetrieverSpec("popularity", PopularityRetriever, PopularityConfig,
                       description="most popular items (the cold-start fallback of every model)"))
register(RetrieverSpec("als", ALSRetriever, ALSConfig,
                       search_space={"factors": (32, 64, 128), "regularization": (0.01, 0.1), "alpha": (1.0, 5.0)},
                       description="implicit ALS matrix factorisation"))
register(RetrieverSpec("bpr", BPRRetriever, BPRConfig,
                       search_space={"factors": (32, 64, 128), "learning_rate": (0.01, 0.05),
                                     "regularization": (0.001, 0.01)},
                       fixed={"threads": 1}, description="implicit BPR matrix factorisation"))
register(RetrieverSpec("two_tower", TwoTowerRetriever, TwoTowerConfig, search_space=TWO_TOWER_SEARCH,
                       search="random", first_points=({"loss": "full_softmax"},), test_stage="history",
                       point_filter=search_point_allowed, common=("seed", "index"),
                       description="sequence query tower + content item tower (torch)"))
register(RetrieverSpec("covisit", CovisitRetriever, CovisitConfig,
                       search_space={"window": (1, 2, 3, 5, 8), "recent": (1, 2, 3, 5)},
                       description="what other users took right after this user's recent items (co-visitation)"))
register(RetrieverSpec("hybrid", HybridRetriever, HybridConfig, test_stage="history",
                       components=("two_tower", "covisit", "als", "popularity"),
                       description="two-tower + co-visitation + ALS + popularity, fused (the default)"))


def model_names() -> tuple[str, ...]:
    """Every registered model name, in registration order."""
    return tuple(SPECS)


def spec(name: str) -> RetrieverSpec:
    """The spec of ``name``; an unknown name raises :class:`ConfigError` listing the choices."""
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown retriever {name!r}; choose one of {sorted(SPECS)}") from None


def retriever_class(name: str) -> type:
    return spec(name).cls


def make_retriever(name: str, config: Any = None) -> Retriever:
    """A new, unfitted retriever of kind ``name`` (not a composite: see :func:`retrieval.fitting.fit_retriever`)."""
    s = spec(name)
    if s.components:
        raise ConfigError(f"{name!r} fuses fitted components; build it with retrieval.fitting.fit_retriever")
    return s.cls(config)


def load_retriever(folder: str | Path) -> Retriever:
    """Load any retriever saved with ``save`` (a hybrid too); the manifest says which class."""
    manifest = read_manifest(folder)
    if manifest.get("kind") == HYBRID_KIND:
        return HybridRetriever.load(folder)
    read_manifest(folder, kind=RETRIEVER_KIND)  # a clear error for any other kind
    return retriever_class(manifest["model"]).load(folder)


__all__ = ["SPECS", "RetrieverSpec", "load_retriever", "make_retriever", "model_names", "register",
           "retriever_class", "spec"]
