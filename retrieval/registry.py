"""Retrievers by name: build one from a config, or load any saved one from its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.errors import ConfigError
from data.io import read_manifest
from retrieval.base import RETRIEVER_KIND, EmbeddingRetriever, Retriever
from retrieval.cf import ALSRetriever, BPRRetriever
from retrieval.hybrid import HYBRID_KIND, HybridRetriever
from retrieval.popularity import PopularityRetriever
from retrieval.two_tower import TwoTowerRetriever

RETRIEVERS: dict[str, type[EmbeddingRetriever]] = {
    cls.name: cls for cls in (PopularityRetriever, ALSRetriever, BPRRetriever, TwoTowerRetriever)
}


def register(cls: type[EmbeddingRetriever]) -> type[EmbeddingRetriever]:
    """Add a retriever class (used by later stages such as the two-tower model)."""
    RETRIEVERS[cls.name] = cls
    return cls


def retriever_class(name: str) -> type[EmbeddingRetriever]:
    try:
        return RETRIEVERS[name]
    except KeyError:
        raise ConfigError(f"unknown retriever {name!r}; choose one of {sorted(RETRIEVERS)}") from None


def make_retriever(name: str, config: Any = None) -> EmbeddingRetriever:
    """A new, unfitted retriever of kind ``name`` (``"popularity"``, ``"als"``, ``"bpr"``)."""
    return retriever_class(name)(config)


def load_retriever(folder: str | Path) -> Retriever:
    """Load any retriever saved with ``save`` (a hybrid too); the manifest says which class."""
    manifest = read_manifest(folder)
    if manifest.get("kind") == HYBRID_KIND:
        return HybridRetriever.load(folder)
    read_manifest(folder, kind=RETRIEVER_KIND)  # a clear error for any other kind
    return retriever_class(manifest["model"]).load(folder)
