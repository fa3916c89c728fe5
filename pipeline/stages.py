"""The first stage as the second stage needs it: a split under a protocol, and the retriever that serves its
candidates, fitted once per split and cached on disk.

The reranker trains on the candidates of a retriever fitted on ``split.history("val")`` (early-stopped on
the validation targets). The same retriever serves the test stage by reading the test histories (the
two-tower's query tower reads a history at request time, so nothing is refitted). The cache is keyed by
the history's fingerprint, so a folder fitted on other data is refitted, never reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data.dataset import Interactions
from data.errors import ArtifactError, DataValidationError
from data.protocol import Split, apply_filters, make_split

log = logging.getLogger(__name__)

#: Retrievers this module can fit for the reranker's candidates.
CANDIDATE_RETRIEVERS = ("two_tower", "als", "bpr", "popularity")


def protocol_split(raw: Interactions, protocol: str = "leave_one_out", n: int = 5) -> Split:
    """Protocol steps 1-3 (filters), then step 4 under ``protocol`` (``leave_one_out`` or ``last_n``)."""
    return make_split(apply_filters(raw), protocol, n)


def candidate_retriever(split: Split, name: str = "two_tower", folder: str | Path | None = None, *,
                        threads: int | None = None, config: Any = None) -> Any:
    """The retriever fitted on ``split.history("val")`` whose candidates the reranker learns from.

    ``two_tower`` is trained with early stopping on the validation targets and, when ``folder`` is given,
    saved there and loaded again on the next call while its history fingerprint matches the split's (a
    mismatch or a damaged folder is refitted and overwritten). CF retrievers are refitted each time (about a
    second). ``config`` overrides the two-tower's default config; ``threads`` only its training threads.
    """
    if name not in CANDIDATE_RETRIEVERS:
        raise DataValidationError(f"retriever must be one of {list(CANDIDATE_RETRIEVERS)}, got {name!r}")
    history = split.history("val")
    if name != "two_tower":
        from retrieval.registry import make_retriever

        return make_retriever(name).fit(history, items=split.items)
    import dataclasses

    from retrieval.two_tower import TwoTowerConfig, TwoTowerRetriever

    path = Path(folder) if folder is not None else None
    if path is not None and (path / "manifest.json").is_file():
        try:
            model = TwoTowerRetriever.load(path)
            same = config is None or _settings(model.config) == _settings(config)
            if model.history_fingerprint == history.fingerprint() and same:
                return model
            log.warning("%s was fitted on other data or with another config; refitting", path)
        except ArtifactError as exc:
            log.warning("cannot load %s (%s); refitting", path, exc)
    config = config or TwoTowerConfig()
    if threads:
        config = dataclasses.replace(config, threads=threads)
    model = TwoTowerRetriever(config).fit(history, items=split.items, validation=split)
    if path is not None:
        model.save(path)
    return model


def _settings(config: Any) -> dict[str, Any]:
    """A config's fields less the speed-only ones (threads, device, progress bars)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("threads", "device", "progress")}


__all__ = ["CANDIDATE_RETRIEVERS", "candidate_retriever", "protocol_split"]
