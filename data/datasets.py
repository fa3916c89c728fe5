"""Datasets by name: the MovieLens releases and the user's own files, behind one call.

    load_dataset("ml-latest-small")                                  # MovieLens, found as documented
    load_dataset(DatasetSpec(interactions="events.parquet", items="items.csv",
                             columns=FileColumns(user="uid", item="sku", time="ts")))

Every job (``shortlist train``, the second stage, the benchmarks) loads its data here, so the upper
packages never need to know where events come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data.config import JsonConfig, require
from data.dataset import Interactions


@dataclass
class FileColumns(JsonConfig):
    """How to read the user's own files (:func:`data.generic.load_interactions`).

    Attributes:
        user: column of the event file holding integer user ids.
        item: column of the event file holding integer item ids.
        time: column of event times (seconds, numeric strings or datetimes); ``""`` uses the row order.
        rating: optional rating column (``""``: none).
        item_id: the item id column of the item table (``""``: the same name as ``item``).
        title: the title column of the item table (``""``: a ``title`` column if there is one).
        genres: optional ``|``-joined genres column of the item table.
        text: columns of the item table that describe an item (joined into the text the models read).
        duplicates: repeated (user, item) events: ``"keep_last"``, ``"keep_first"`` or ``"keep_all"``.
    """

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: str = ""
    item_id: str = ""
    title: str = ""
    genres: str = ""
    text: tuple[str, ...] = ()
    duplicates: str = "keep_last"

    def __post_init__(self) -> None:
        require(bool(self.user) and bool(self.item), "FileColumns.user and FileColumns.item must be column names")
        require(self.duplicates in ("keep_last", "keep_first", "keep_all"),
                f"FileColumns.duplicates must be keep_last, keep_first or keep_all, got {self.duplicates!r}")


@dataclass
class DatasetSpec(JsonConfig):
    """Where a job's events come from.

    Attributes:
        name: a MovieLens name (``"ml-latest-small"``, ``"ml-1m"``, ``"ml-100k"``, ``"ml-25m"``...), used
            when ``interactions`` is empty.
        path: a folder holding the MovieLens files; ``None`` searches ``$SHORTLIST_DATA_DIR`` and the cache.
        interactions: the user's own event file (CSV, TSV or Parquet) instead of MovieLens.
        items: the user's own item table for ``interactions`` (optional).
        columns: how to read those two files.
    """

    name: str = "ml-latest-small"
    path: str | None = None
    interactions: str | None = None
    items: str | None = None
    columns: FileColumns = field(default_factory=FileColumns)

    def __post_init__(self) -> None:
        require(self.items is None or self.interactions is not None,
                "DatasetSpec.items is read with interactions: pass interactions too (or drop items)")


def load_dataset(spec: str | DatasetSpec = "ml-latest-small", path: str | None = None) -> Interactions:
    """The raw events of ``spec``: a MovieLens name (with ``path``), or a :class:`DatasetSpec`."""
    if isinstance(spec, str):
        spec = DatasetSpec(name=spec, path=path)
    if spec.interactions is None:
        from data.movielens import load_movielens

        return load_movielens(spec.name, spec.path)
    from data.generic import load_interactions

    c = spec.columns
    return load_interactions(
        spec.interactions, user_col=c.user, item_col=c.item, time_col=c.time or None,
        rating_col=c.rating or None, items_path=spec.items, item_id_col=c.item_id or None,
        title_col=c.title or None, genres_col=c.genres or None, text_cols=list(c.text) or None,
        duplicates=c.duplicates,
    )


__all__ = ["DatasetSpec", "FileColumns", "load_dataset"]
