"""Load a user's own event file (CSV, TSV or Parquet), with an optional item table, as :class:`Interactions`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data.dataset import ITEM, Interactions
from data.errors import DatasetNotFoundError, DataValidationError
from data.validate import require_columns, validate_interactions, validate_items

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def load_interactions(
    path: str | Path,
    *,
    user_col: str,
    item_col: str,
    time_col: str | None = None,
    rating_col: str | None = None,
    items_path: str | Path | None = None,
    item_id_col: str | None = None,
    title_col: str | None = None,
    genres_col: str | None = None,
    text_cols: Sequence[str] | None = None,
    duplicates: str = "keep_last",
    name: str | None = None,
) -> Interactions:
    """Load events from ``path`` and, optionally, item descriptions from ``items_path``.

    Args:
        path: the event file: ``.csv``, ``.tsv``, ``.parquet`` or ``.pq``.
        user_col, item_col: columns of ``path`` holding integer user and item ids.
        time_col: column of event times (seconds, numeric strings or datetimes); ``None`` uses the row
            order as time (see :func:`data.validate.validate_interactions`).
        rating_col: optional rating column, kept as ``rating``.
        items_path: optional item table (same formats), one row per item.
        item_id_col: the item id column of ``items_path`` (default: ``item_col``).
        title_col: the title column of ``items_path`` (default: a ``title`` column, else the text of
            ``text_cols``).
        genres_col: optional genres column of ``items_path`` (``|``-joined).
        text_cols: columns of ``items_path`` that describe an item; joined with ``" | "`` they form the
            ``text`` the two-tower model and the reranker read.
        duplicates: ``"keep_last"`` (default), ``"keep_first"`` or ``"keep_all"``: see
            :func:`data.validate.validate_interactions`.
        name: a label for logs and manifests (default: the file name without suffix).
    """
    path = _existing(path, "path")
    wanted = {"user_col": user_col, "item_col": item_col}
    if time_col is not None:
        wanted["time_col"] = time_col
    if rating_col is not None:
        wanted["rating_col"] = rating_col
    raw = read_table(path, wanted, source="path")
    frame = validate_interactions(
        raw, user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col,
        duplicates=duplicates, source=str(path),
    )
    items = None
    if items_path is not None:
        items_path = _existing(items_path, "items_path")
        item_id_col = item_id_col or item_col
        columns = {"item_id_col": item_id_col}
        if title_col is not None:
            columns["title_col"] = title_col
        if genres_col is not None:
            columns["genres_col"] = genres_col
        for i, col in enumerate(text_cols or []):
            columns[f"text_cols[{i}]"] = col
        # read the title column too when title_col is None and the table has one
        table = read_table(items_path, columns, source="items_path", optional=("title",))
        items = validate_items(
            table, item_col=item_id_col, title_col=title_col, genres_col=genres_col, text_cols=text_cols,
            source=str(items_path),
        )
        unknown = ~frame[ITEM].isin(items[ITEM])
        if unknown.any():
            log.warning(
                "%s: %d of %d events are on %d item ids missing from %s; they have no title or text",
                path, int(unknown.sum()), len(frame), frame.loc[unknown, ITEM].nunique(), items_path,
            )
    return Interactions(
        frame=frame,
        items=items,
        name=name or path.name.split(".")[0],
        meta={"source": str(path), **({"items_source": str(items_path)} if items_path is not None else {})},
    )


def read_table(
    path: str | Path,
    columns: dict[str, str],
    *,
    source: str = "path",
    optional: Sequence[str] = (),
) -> pd.DataFrame:
    """Read the ``columns`` (argument name -> column) of a CSV/TSV/Parquet file, plus any ``optional``
    columns it has; a missing column raises :class:`DataValidationError` listing the columns present."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataValidationError(
            f"{source}={str(path)!r}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"use one of {list(SUFFIXES)} (convert the file, or rename it if it already is one)"
        )
    try:
        present = _header(path, suffix)
        require_columns(pd.DataFrame(columns=present), columns, f"{source}={str(path)!r}")
        wanted = list(dict.fromkeys([*columns.values(), *(c for c in optional if c in present)]))
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", usecols=wanted)
        return pd.read_parquet(path, columns=wanted)
    except pd.errors.EmptyDataError as exc:
        raise DataValidationError(
            f"{source}={str(path)!r}: the file is empty (no header, no rows); pass a file with a header row "
            "and at least one event"
        ) from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(
            f"{source}={str(path)!r}: could not parse the file ({exc}); check its format and encoding (UTF-8)"
        ) from exc
    except OSError as exc:
        raise DataValidationError(f"{source}={str(path)!r}: could not read the file ({exc})") from exc
    except Exception as exc:  # pyarrow raises its own error types for corrupt Parquet files
        if type(exc).__module__.startswith("pyarrow"):
            raise DataValidationError(f"{source}={str(path)!r}: not a readable Parquet file ({exc})") from exc
        raise


def _header(path: Path, suffix: str) -> list[str]:
    if suffix in (".csv", ".tsv"):
        return list(map(str, pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=0).columns))
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def _existing(path: str | Path, argument: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DatasetNotFoundError(f"{argument}={str(path)!r} {what}; pass the path of an existing file")
    return path
