"""Batch candidate generation: the top-N items of every user, written to Parquet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from data.io import atomic_path
from retrieval.base import Retriever, check_k


@dataclass
class BatchStats:
    """Throughput of a batch run.

    Attributes:
        users: users written.
        rows: candidate rows written.
        seconds: wall time of retrieval plus writing.
        users_per_second: throughput.
        path: the Parquet file.
    """

    users: int
    rows: int
    seconds: float
    users_per_second: float
    path: Path


def generate_candidates(
    retriever: Retriever,
    out: str | Path,
    *,
    k: int = 100,
    users: np.ndarray | None = None,
    batch_size: int = 1024,
    exclude_seen: bool = True,
    progress: bool = True,
) -> BatchStats:
    """Write ``user_id, rank, item_id, score`` rows (rank 1 is best) for every user, atomically.

    ``users`` defaults to every user the retriever knows; padding (-1) rows are dropped.
    """
    k = check_k(k)
    users = retriever.users.ids if users is None else np.asarray(users, dtype=np.int64)
    started = time.perf_counter()
    parts = []
    for start in tqdm(range(0, users.size, batch_size), desc="candidates", unit="batch", disable=not progress):
        batch = users[start : start + batch_size]
        ids, scores = retriever.retrieve(batch, k, exclude_seen=exclude_seen)
        frame = pd.DataFrame({
            "user_id": np.repeat(batch, k),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), batch.size),
            "item_id": ids.ravel(),
            "score": scores.ravel().astype(np.float32),
        })
        parts.append(frame[frame["item_id"] != -1])
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["user_id", "rank", "item_id", "score"])
    out = Path(out)
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    seconds = time.perf_counter() - started
    return BatchStats(users=int(users.size), rows=len(table), seconds=seconds,
                      users_per_second=users.size / seconds if seconds > 0 else float("inf"), path=out)


def export_embeddings(retriever: Retriever, out: str | Path) -> list[Path]:
    """Write ``items.parquet`` and ``users.parquet`` (``item_id``/``user_id`` + ``embedding``) under ``out``.

    The user vectors are the query vectors the retriever searches with (stored factors for ALS/BPR, the
    query tower over the current history for the two-tower). A hybrid writes one sub-folder per
    component. Files are written atomically.
    """
    from retrieval.base import EmbeddingRetriever

    out = Path(out)
    components = getattr(retriever, "components", None)
    if components is not None:
        return [p for name, comp in components.items() for p in export_embeddings(comp, out / name)]
    if not isinstance(retriever, EmbeddingRetriever):
        raise TypeError(f"export_embeddings: {type(retriever).__name__} has no embeddings to export")
    users = np.arange(len(retriever.users))
    tables = {
        "items.parquet": pd.DataFrame({"item_id": retriever.items.ids,
                                       "embedding": list(np.asarray(retriever.item_factors))}),
        "users.parquet": pd.DataFrame({"user_id": retriever.users.ids,
                                       "embedding": list(np.asarray(retriever.user_vectors(users)))}),
    }
    written = []
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            table.to_parquet(tmp, index=False)
        written.append(out / name)
    return written
