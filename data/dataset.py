"""The in-memory form of a dataset: events in external ids, plus optional item text.

Column names are fixed across the project: ``user_id``, ``item_id``, ``timestamp`` (int64 seconds) and an
optional ``rating``; the item table has ``item_id``, ``title``, ``genres`` (``|``-joined), ``year``
(nullable) and ``text`` (what the text models read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data.io import fingerprint_arrays
from data.vocab import IdVocab

USER = "user_id"
ITEM = "item_id"
TIME = "timestamp"
RATING = "rating"
ITEM_COLUMNS = ("item_id", "title", "genres", "year", "text")


@dataclass
class Interactions:
    """Implicit-feedback events.

    Attributes:
        frame: one row per event with int64 ``user_id``, ``item_id``, ``timestamp`` (and maybe ``rating``).
        items: optional item table (``ITEM_COLUMNS``), one row per item id; may cover more items than
            ``frame`` uses.
        name: a label for logs and manifests (``"ml-latest-small"``).
    """

    frame: pd.DataFrame
    items: pd.DataFrame | None = None
    name: str = "interactions"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def n_users(self) -> int:
        return int(self.frame[USER].nunique())

    @property
    def n_items(self) -> int:
        return int(self.frame[ITEM].nunique())

    def user_vocab(self) -> IdVocab:
        return IdVocab.from_values(self.frame[USER].to_numpy(), name="user")

    def item_vocab(self) -> IdVocab:
        return IdVocab.from_values(self.frame[ITEM].to_numpy(), name="item")

    def fingerprint(self) -> str:
        """A short hash of the (sorted) events: recorded in manifests to tie a model to its data."""
        f = self.frame.sort_values([USER, TIME, ITEM], kind="stable")
        return fingerprint_arrays(f[USER].to_numpy(), f[ITEM].to_numpy(), f[TIME].to_numpy())

    def stats(self) -> dict[str, Any]:
        n, u, i = len(self), self.n_users, self.n_items
        per_user = self.frame.groupby(USER).size() if n else pd.Series([0])
        return {
            "name": self.name,
            "users": u,
            "items": i,
            "interactions": n,
            "density": n / (u * i) if u and i else 0.0,
            "avg_per_user": float(per_user.mean()),
            "median_per_user": float(per_user.median()),
        }

    def with_frame(self, frame: pd.DataFrame, name: str | None = None) -> Interactions:
        return Interactions(frame=frame.reset_index(drop=True), items=self.items, name=name or self.name,
                            meta=dict(self.meta))

    def sorted_frame(self) -> pd.DataFrame:
        """Events ordered by (user, timestamp, item): the protocol's canonical order."""
        return self.frame.sort_values([USER, TIME, ITEM], kind="stable").reset_index(drop=True)


def to_csr(frame: pd.DataFrame, users: IdVocab, items: IdVocab) -> sp.csr_matrix:
    """Binary user x item matrix (rows/cols from the vocabularies); repeated events count once."""
    rows = users.rows(frame[USER].to_numpy())
    cols = items.rows(frame[ITEM].to_numpy())
    data = np.ones(rows.size, dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(users), len(items)), dtype=np.float32)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def sequences(frame: pd.DataFrame, users: IdVocab, items: IdVocab) -> list[np.ndarray]:
    """Per user row, the item rows in (timestamp, item id) order; users without events get an empty array."""
    f = frame.sort_values([USER, TIME, ITEM], kind="stable")
    user_rows = users.rows(f[USER].to_numpy())
    item_rows = items.rows(f[ITEM].to_numpy())
    out = [np.empty(0, dtype=np.int64) for _ in range(len(users))]
    if user_rows.size == 0:
        return out
    bounds = np.flatnonzero(np.diff(user_rows)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [user_rows.size]])
    for s, e in zip(starts, ends):
        out[int(user_rows[s])] = item_rows[s:e].copy()
    return out
