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
from data.errors import DataValidationError
from data.protocol import Split, apply_filters, make_split
from retrieval.registry import SPECS

log = logging.getLogger(__name__)

#: Retrievers this module can fit for the reranker's candidates: every registered one but composites.
CANDIDATE_RETRIEVERS = tuple(name for name, spec in SPECS.items() if not spec.components)


def protocol_split(raw: Interactions, protocol: str = "leave_one_out", n: int = 5) -> Split:
    """Protocol steps 1-3 (filters), then step 4 under ``protocol`` (``leave_one_out`` or ``last_n``)."""
    return make_split(apply_filters(raw), protocol, n)


def candidate_retriever(split: Split, name: str = "two_tower", folder: str | Path | None = None, *,
                        threads: int | None = None, config: Any = None) -> Any:
    """The retriever fitted on ``split.history("val")`` whose candidates the reranker learns from.

    :func:`retrieval.fitting.fit_retriever` with ``config`` (default: the model's default config; no
    search). The two-tower is early-stopped on the validation targets and, when ``folder`` is given, saved
    there and loaded again on the next call while its history fingerprint and settings match the split's
    (a mismatch or a damaged folder is refitted and overwritten). CF retrievers are refitted each time (about
    a second). ``threads`` sets only the two-tower's training threads.
    """
    if name not in CANDIDATE_RETRIEVERS:
        raise DataValidationError(f"retriever must be one of {list(CANDIDATE_RETRIEVERS)}, got {name!r}")
    import dataclasses

    from retrieval.fitting import FitOptions, fit_retriever

    if name == "two_tower" and threads:
        from retrieval.two_tower import TwoTowerConfig

        config = dataclasses.replace(config or TwoTowerConfig(), threads=threads)
    configs = {name: config} if config is not None else None
    cache = folder if name == "two_tower" else None
    return fit_retriever(name, split, "val", configs=configs, options=FitOptions(tune=False, threads=1),
                         cache=cache).model


__all__ = ["CANDIDATE_RETRIEVERS", "candidate_retriever", "protocol_split"]
