"""Turn a user's event or item table into shortlist's canonical columns, or say exactly what is wrong.

:func:`validate_interactions` is the single gate every loader passes events through. It returns a new
frame with ``user_id``, ``item_id``, ``timestamp`` (all int64) and, when asked, ``rating`` (float64), and
raises :class:`~data.errors.DataValidationError` naming the column at fault and the fix for: missing
columns, empty input, null / non-numeric / non-integer ids, and null or non-numeric timestamps.

:func:`validate_items` does the same for an item table and returns it in ``ITEM_COLUMNS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from data.dataset import ITEM, RATING, TIME, USER
from data.errors import DataValidationError

DUPLICATE_RULES = ("keep_last", "keep_first", "keep_all")
_INT64_LIMIT = 2.0**63


def validate_interactions(
    frame: pd.DataFrame,
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str | None = TIME,
    rating_col: str | None = None,
    duplicates: str = "keep_last",
    source: str = "interactions",
) -> pd.DataFrame:
    """Check an event table and return a NEW frame in the canonical columns; ``frame`` is not modified.

    Args:
        frame: one row per event, in any column names.
        user_col, item_col: the columns holding user and item ids. Ids must be integers; numeric strings
            (``"12"``) and integral floats (``12.0``) are converted, anything else is an error.
        time_col: the column holding event times: numbers (seconds since the epoch; fractional seconds
            are floored), numeric strings, or a ``datetime64`` column (converted to int seconds, UTC).
            ``None`` means the table has no times: the row order is used instead (timestamps
            ``0 .. n-1``), so "latest" means "lowest in the file".
        rating_col: optional explicit rating column, kept as float64 ``rating``.
        duplicates: what to do with a (user, item) pair that appears more than once. Implicit feedback
            counts a pair once, so by default only one event is kept:

            * ``"keep_last"`` (default): keep the latest event (highest timestamp; among equal
              timestamps, the later row);
            * ``"keep_first"``: keep the earliest event (lowest timestamp; among equal timestamps, the
              earlier row);
            * ``"keep_all"``: keep every event (session / re-consumption data).
        source: a label for error messages (a file path or dataset name).

    Returns:
        ``user_id``, ``item_id``, ``timestamp`` (int64) and ``rating`` (float64, only if ``rating_col``),
        in the input's row order (minus dropped duplicates), with a fresh 0..n-1 index. Other columns
        are dropped.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError(
            f"{source}: expected a pandas DataFrame, got {type(frame).__name__}; "
            "load the file with pandas.read_csv/read_parquet first"
        )
    if duplicates not in DUPLICATE_RULES:
        raise DataValidationError(
            f"{source}: duplicates={duplicates!r} is not a valid rule; use one of {DUPLICATE_RULES}"
        )
    wanted = {"user_col": user_col, "item_col": item_col}
    if time_col is not None:
        wanted["time_col"] = time_col
    if rating_col is not None:
        wanted["rating_col"] = rating_col
    require_columns(frame, wanted, source)
    if len(frame) == 0:
        raise DataValidationError(
            f"{source}: the table has no rows (columns {list(map(str, frame.columns))}); "
            "pass a file or frame that holds at least one event"
        )

    out = pd.DataFrame(
        {
            USER: to_int64_ids(frame[user_col], user_col, source),
            ITEM: to_int64_ids(frame[item_col], item_col, source),
            TIME: (
                np.arange(len(frame), dtype=np.int64)
                if time_col is None
                else to_int64_seconds(frame[time_col], time_col, source)
            ),
        }
    )
    if rating_col is not None:
        out[RATING] = to_float_values(frame[rating_col], rating_col, source)
    return drop_duplicate_pairs(out, duplicates)


def drop_duplicate_pairs(frame: pd.DataFrame, duplicates: str = "keep_last") -> pd.DataFrame:
    """Apply the duplicates rule of :func:`validate_interactions` to a canonical frame (returns a copy)."""
    if duplicates not in DUPLICATE_RULES:
        raise DataValidationError(f"duplicates={duplicates!r} is not a valid rule; use one of {DUPLICATE_RULES}")
    frame = frame.reset_index(drop=True)
    if duplicates == "keep_all":
        return frame.copy()
    # Order by (timestamp, row); the last of each pair in this order is the latest event, ties broken
    # by row order; the first is the earliest.
    order = np.lexsort((np.arange(len(frame)), frame[TIME].to_numpy()))
    ordered = frame.iloc[order]
    keep = "last" if duplicates == "keep_last" else "first"
    kept = ordered.drop_duplicates([USER, ITEM], keep=keep)
    return frame.loc[np.sort(kept.index.to_numpy())].reset_index(drop=True)


def validate_items(
    items: pd.DataFrame,
    *,
    item_col: str = ITEM,
    title_col: str | None = "title",
    genres_col: str | None = None,
    text_cols: Sequence[str] | None = None,
    source: str = "items",
) -> pd.DataFrame:
    """Check an item table and return it in ``ITEM_COLUMNS`` (see :func:`data.items.build_item_table`).

    Args:
        items: one row per item, in any column names.
        item_col: the item id column (same rules as event ids); ids must be unique.
        title_col: the title column. ``None``: use a column named ``title`` if there is one, else the
            text built from ``text_cols`` (one of the two is required: the protocol drops untitled items).
        genres_col: optional genres column (``|``-joined strings, or lists).
        text_cols: optional columns whose values, joined with ``" | "``, form the ``text`` the text models
            read; by default the text is ``"Title (1995) | Genre, Genre"``.
        source: a label for error messages.
    """
    from data.items import build_item_table, join_text_columns  # data.items imports this module

    if not isinstance(items, pd.DataFrame):
        raise DataValidationError(f"{source}: expected a pandas DataFrame, got {type(items).__name__}")
    text_cols = list(text_cols) if text_cols is not None else None
    if isinstance(text_cols, list) and not text_cols:
        raise DataValidationError(f"{source}: text_cols is empty; pass at least one column or None")
    if title_col is None and "title" in items.columns:
        title_col = "title"
    if title_col is None and not text_cols:
        raise DataValidationError(
            f"{source}: no title column; pass title_col= (the column holding item titles) or text_cols="
        )
    wanted = {"item_col": item_col}
    if title_col is not None:
        wanted["title_col"] = title_col
    if genres_col is not None:
        wanted["genres_col"] = genres_col
    for i, col in enumerate(text_cols or []):
        wanted[f"text_cols[{i}]"] = col
    require_columns(items, wanted, source)
    if len(items) == 0:
        raise DataValidationError(f"{source}: the item table has no rows; pass a table with one row per item")

    ids = to_int64_ids(items[item_col], item_col, source)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataValidationError(
            f"{source}: column {item_col!r} has repeated item ids (e.g. {dup.unique()[:5].tolist()}); "
            "the item table needs one row per item: drop or merge the duplicate rows"
        )
    table = pd.DataFrame({ITEM: ids})
    private_text = [f"__text{i}" for i in range(len(text_cols or []))]
    for name, col in zip(private_text, text_cols or []):
        table[name] = items[col].to_numpy()
    if title_col is not None:
        table["title"] = items[title_col].to_numpy()
    else:
        table["title"] = join_text_columns(table, private_text).to_numpy()
    if genres_col is not None:
        table["genres"] = items[genres_col].to_numpy()
    return build_item_table(table, text_cols=private_text or None)


def require_columns(frame: pd.DataFrame, wanted: dict[str, str], source: str) -> None:
    """Raise if any of ``wanted`` (argument name -> column) is missing, listing the present columns."""
    present = list(map(str, frame.columns))
    missing = [(arg, col) for arg, col in wanted.items() if col not in frame.columns]
    if missing:
        what = ", ".join(f"{col!r} ({arg})" for arg, col in missing)
        raise DataValidationError(
            f"{source}: missing column(s) {what}; the table has columns {present}. "
            "Pass the right column names (e.g. user_col=, item_col=, time_col=) or rename the columns"
        )


def to_int64_ids(values: pd.Series, column: str, source: str) -> pd.Series:
    """Integer ids as int64: accepts ints, integral floats and numeric strings; raises on anything else."""
    null = values.isna().to_numpy()
    if null.any():
        rows = np.flatnonzero(null)
        raise DataValidationError(
            f"{source}: column {column!r} has {rows.size} null id(s) (first at row {int(rows[0])}); "
            "drop those rows or fill the ids"
        )
    if pd.api.types.is_bool_dtype(values):
        raise DataValidationError(f"{source}: column {column!r} holds booleans, not ids; pass the id column")
    if pd.api.types.is_integer_dtype(values):
        return pd.Series(values.to_numpy(dtype=np.int64), dtype=np.int64)
    numbers = _numeric(values, column, source, what="ids", fix="map string ids to integers first")
    _check_integral(numbers, values, column, source)
    return pd.Series(numbers.astype(np.int64), dtype=np.int64)


def to_int64_seconds(values: pd.Series, column: str, source: str) -> pd.Series:
    """Event times as int64 seconds: numbers (floored), numeric strings, or ``datetime64`` (-> UTC seconds)."""
    null = values.isna().to_numpy()
    if null.any():
        rows = np.flatnonzero(null)
        raise DataValidationError(
            f"{source}: column {column!r} has {rows.size} null timestamp(s) (first at row {int(rows[0])}); "
            "drop those rows, fill them, or pass time_col=None to use the row order"
        )
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(values):
        seconds = (values - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
        return pd.Series(seconds.to_numpy(dtype=np.int64), dtype=np.int64)
    if pd.api.types.is_bool_dtype(values):
        raise DataValidationError(f"{source}: column {column!r} holds booleans, not timestamps")
    if pd.api.types.is_integer_dtype(values):
        return pd.Series(values.to_numpy(dtype=np.int64), dtype=np.int64)
    numbers = _numeric(
        values, column, source, what="timestamps",
        fix="convert dates with pandas.to_datetime (datetime64 columns are accepted) or pass time_col=None",
    )
    if not np.isfinite(numbers).all() or (np.abs(numbers) >= _INT64_LIMIT).any():
        raise DataValidationError(f"{source}: column {column!r} has infinite or out-of-range timestamps")
    return pd.Series(np.floor(numbers).astype(np.int64), dtype=np.int64)


def to_float_values(values: pd.Series, column: str, source: str) -> pd.Series:
    """A numeric column (e.g. ratings) as float64; raises on nulls and non-numeric values."""
    null = values.isna().to_numpy()
    if null.any():
        rows = np.flatnonzero(null)
        raise DataValidationError(
            f"{source}: column {column!r} has {rows.size} null value(s) (first at row {int(rows[0])}); "
            "drop or fill those rows, or pass rating_col=None"
        )
    numbers = _numeric(values, column, source, what="values", fix="pass a numeric column or rating_col=None")
    return pd.Series(numbers, dtype=np.float64)


def _numeric(values: pd.Series, column: str, source: str, *, what: str, fix: str) -> np.ndarray:
    """float64 array of ``values``; raises naming the first non-numeric entries."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64)
    converted = pd.to_numeric(values, errors="coerce")
    bad = converted.isna().to_numpy()
    if bad.any():
        examples = [repr(v) for v in values[bad].unique()[:3].tolist()]
        raise DataValidationError(
            f"{source}: column {column!r} has non-numeric {what} (e.g. {', '.join(examples)}); {fix}"
        )
    return converted.to_numpy(dtype=np.float64)


def _check_integral(numbers: np.ndarray, values: pd.Series, column: str, source: str) -> None:
    finite = np.isfinite(numbers)
    bad = ~finite
    bad[finite] = (numbers[finite] != np.round(numbers[finite])) | (np.abs(numbers[finite]) >= _INT64_LIMIT)
    if bad.any():
        examples = [repr(v) for v in pd.unique(values[bad])[:3].tolist()]
        raise DataValidationError(
            f"{source}: column {column!r} has non-integer ids (e.g. {', '.join(examples)}); "
            "ids must be whole numbers: map them to integers first"
        )
