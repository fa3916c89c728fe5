"""The item table every loader returns and the text models read.

Columns (``data.dataset.ITEM_COLUMNS``):

* ``item_id`` int64, unique;
* ``title`` str (stripped; ``""`` when missing);
* ``genres`` str, ``|``-joined (``""`` when none; MovieLens' ``"(no genres listed)"`` becomes ``""``);
* ``year`` pandas nullable ``Int64``, parsed from a trailing ``"(1995)"`` in the title, else ``<NA>``;
* ``text`` str, what the two-tower item encoder and the reranker read: ``"Title (1995) | Adventure,
  Animation"`` (the title, then the genres joined with ``", "``), or, when ``text_cols`` are given, the
  non-empty values of those columns joined with ``" | "``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data.dataset import ITEM, ITEM_COLUMNS
from data.errors import DataValidationError
from data.validate import require_columns, to_int64_ids

NO_GENRES = "(no genres listed)"
TEXT_SEPARATOR = " | "
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def build_item_table(
    frame: pd.DataFrame, *, text_cols: Sequence[str] | None = None, source: str = "items"
) -> pd.DataFrame:
    """Build the canonical item table from a frame with ``item_id``, ``title`` and optionally ``genres``.

    Args:
        frame: one row per item; ``item_id`` (integer ids, unique) and ``title`` are required, ``genres``
            (``|``-joined strings or lists of strings) is optional. Not modified.
        text_cols: columns of ``frame`` whose values form ``text`` (joined with ``" | "``, empty values
            skipped); ``None`` gives ``"Title | Genre, Genre"``.
        source: a label for error messages.

    Returns:
        A new frame with exactly ``ITEM_COLUMNS``, in the input's row order.
    """
    wanted = {"item_id": ITEM, "title": "title"}
    for i, col in enumerate(text_cols or []):
        wanted[f"text_cols[{i}]"] = col
    require_columns(frame, wanted, source)
    ids = to_int64_ids(frame[ITEM], ITEM, source) if len(frame) else pd.Series([], dtype=np.int64)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataValidationError(
            f"{source}: column 'item_id' has repeated item ids (e.g. {dup.unique()[:5].tolist()}); "
            "the item table needs one row per item: drop or merge the duplicate rows"
        )
    titles = [_clean(v) for v in frame["title"].tolist()]
    genres = (
        [normalize_genres(v) for v in frame["genres"].tolist()] if "genres" in frame.columns else [""] * len(ids)
    )
    years = pd.array([parse_year(t) for t in titles], dtype="Int64")
    if text_cols:
        text = join_text_columns(frame, list(text_cols)).tolist()
    else:
        text = [default_text(t, g) for t, g in zip(titles, genres)]
    table = pd.DataFrame(
        {
            ITEM: ids.to_numpy(),
            "title": pd.Series(titles, dtype=str),
            "genres": pd.Series(genres, dtype=str),
            "year": years,
            "text": pd.Series(text, dtype=str),
        }
    )
    return table.loc[:, list(ITEM_COLUMNS)]


def parse_year(title: str) -> int | None:
    """The year of a trailing ``"(1995)"`` in ``title``, else ``None``."""
    match = _YEAR.search(title)
    return int(match.group(1)) if match else None


def normalize_genres(value: object) -> str:
    """``|``-joined genres: lists are joined, blanks dropped, ``"(no genres listed)"`` and nulls -> ``""``."""
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = [_clean(v) for v in value]
    else:
        parts = [p.strip() for p in _clean(value).split("|")]
    return "|".join(p for p in parts if p and p != NO_GENRES)


def default_text(title: str, genres: str) -> str:
    """``"Title (1995) | Adventure, Animation"``; just the title when there are no genres."""
    if not genres:
        return title
    return f"{title}{TEXT_SEPARATOR}{', '.join(genres.split('|'))}"


def join_text_columns(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Per row, the non-empty values of ``columns`` joined with ``" | "`` (lists are joined with ", ")."""
    rows = zip(*(frame[c].tolist() for c in columns)) if columns else iter(())
    joined = [TEXT_SEPARATOR.join(s for s in (_clean_text(v) for v in row) if s) for row in rows]
    return pd.Series(joined, index=frame.index, dtype=str)


def _clean(value: object) -> str:
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value).strip()


def _clean_text(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(s for s in (_clean(v) for v in value) if s)
    return _clean(value)
