"""MovieLens loaders: the three classic file layouts, folder resolution and a verified download.

Layouts (detected from the files present):

* ``ml-latest`` style (ml-latest-small, ml-latest, ml-25m, ml-20m): ``ratings.csv``
  (``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``), UTF-8;
* ``ml-1m``: ``ratings.dat`` (``user::movie::rating::timestamp``) and ``movies.dat``
  (``movie::title::genres``, latin-1);
* ``ml-100k``: ``u.data`` (tab-separated ``user item rating timestamp``) and ``u.item`` (``|``-separated,
  latin-1, 19 genre flag columns).

:func:`load_movielens` finds the files in this order: ``path``; ``$SHORTLIST_DATA_DIR/<name>``; the cache
folder (``cache_dir``, ``$SHORTLIST_CACHE_DIR`` or ``~/.cache/shortlist``) ``/<name>``; else it downloads
the official GroupLens zip into the cache, checks its pinned SHA-256, and extracts it safely and
atomically.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from data.dataset import ITEM, Interactions
from data.errors import ChecksumMismatchError, DatasetNotFoundError, DataValidationError
from data.io import atomic_write_text
from data.items import build_item_table
from data.validate import validate_interactions

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SHORTLIST_DATA_DIR"
CACHE_DIR_ENV = "SHORTLIST_CACHE_DIR"
BASE_URL = "https://files.grouplens.org/datasets/movielens"

# SHA-256 of the official zips at files.grouplens.org, from public pins: tensorflow/datasets
# (tensorflow_datasets/url_checksums/movielens.txt) for ml-latest-small, ml-100k, ml-1m, ml-20m and
# ml-25m, each corroborated by other projects; ml-latest (a rolling release GroupLens re-publishes) from
# the snapshot dated 2023-07-20 that several projects pin. ``None`` would mean "not pinned": the download
# is then accepted with a warning and its hash recorded in ``<cache>/<name>.zip.sha256``.
CHECKSUMS: dict[str, str | None] = {
    "ml-latest-small": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    "ml-latest": "66a9e518c747d76b241d9a859b001a2619d3ed1672ceef599eb50daf73a7b4a3",
    "ml-25m": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
    "ml-20m": "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
}
SUPPORTED = tuple(CHECKSUMS)

LAYOUT_FILES: dict[str, tuple[str, str]] = {
    "ml-latest": ("ratings.csv", "movies.csv"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.item"),
}

ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


# ----------------------------------------------------------------------------------------- folders


def default_data_dir() -> Path | None:
    """``$SHORTLIST_DATA_DIR`` (``~`` expanded), or ``None`` when the variable is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$SHORTLIST_CACHE_DIR``, else ``~/.cache/shortlist``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "shortlist"


def dataset_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where dataset ``name`` lives on disk: ``$SHORTLIST_DATA_DIR/<name>`` when that folder exists,
    else ``<cache folder>/<name>`` (which may not exist yet)."""
    _check_folder_name(name)
    data_dir = default_data_dir()
    if data_dir is not None and (data_dir / name).is_dir():
        return data_dir / name
    return default_cache_dir(cache_dir) / name


def detect_layout(folder: str | Path) -> str | None:
    """``"ml-latest"``, ``"ml-1m"`` or ``"ml-100k"`` from the files present in ``folder``; ``None`` if none."""
    folder = Path(folder)
    for layout, files in LAYOUT_FILES.items():
        if all((folder / f).is_file() for f in files):
            return layout
    return None


def find_layout_folder(folder: str | Path) -> Path | None:
    """``folder`` if it holds a MovieLens layout, or its only sub-folder that does (an unzipped
    ``ml-1m/ml-1m/``); else ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if detect_layout(folder):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    matches = [p for p in subdirs if detect_layout(p)]
    return matches[0] if len(matches) == 1 else None


# ----------------------------------------------------------------------------------------- loaders


def load_ml_latest(folder: str | Path, name: str | None = None) -> Interactions:
    """Load the ``ratings.csv`` + ``movies.csv`` layout (ml-latest-small, ml-latest, ml-25m, ml-20m)."""
    folder = _require_files(folder, "ml-latest")
    ratings_path, movies_path = (folder / f for f in LAYOUT_FILES["ml-latest"])
    try:
        raw = pd.read_csv(
            ratings_path,
            dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float64, "timestamp": np.int64},
        )
        movies = pd.read_csv(movies_path, dtype={"movieId": np.int64}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"{folder}: could not parse the MovieLens CSV files ({exc})") from exc
    frame = validate_interactions(
        raw, user_col="userId", item_col="movieId", time_col="timestamp", rating_col="rating",
        source=str(ratings_path),
    )
    items = _items(movies.rename(columns={"movieId": ITEM}), movies_path)
    return _interactions(frame, items, name or folder.name, folder, "ml-latest")


def load_ml_1m(folder: str | Path, name: str | None = None) -> Interactions:
    """Load the ml-1m layout: ``ratings.dat`` and latin-1 ``movies.dat``, both ``::``-separated."""
    folder = _require_files(folder, "ml-1m")
    ratings_path, movies_path = (folder / f for f in LAYOUT_FILES["ml-1m"])
    try:
        # ``::`` as separator needs pandas' slow python engine; ":" with the empty fields between
        # gives the same four columns with the C engine (the ratings file holds only numbers).
        raw = pd.read_csv(
            ratings_path, sep=":", header=None, usecols=[0, 2, 4, 6],
            names=["user", "_a", "item", "_b", "rating", "_c", "timestamp"],
        )
        rows = []
        with open(movies_path, encoding="latin-1", newline="") as handle:
            for line_no, line in enumerate(handle, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                parts = line.split("::")
                if len(parts) != 3:
                    raise DataValidationError(
                        f"{movies_path}:{line_no}: expected 'movie::title::genres', got {line!r}"
                    )
                rows.append(parts)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataValidationError(f"{folder}: could not parse the ml-1m files ({exc})") from exc
    frame = validate_interactions(
        raw, user_col="user", item_col="item", time_col="timestamp", rating_col="rating",
        source=str(ratings_path),
    )
    movies = pd.DataFrame(rows, columns=[ITEM, "title", "genres"])
    return _interactions(frame, _items(movies, movies_path), name or folder.name, folder, "ml-1m")


def load_ml_100k(folder: str | Path, name: str | None = None) -> Interactions:
    """Load the ml-100k layout: tab-separated ``u.data`` and latin-1 ``|``-separated ``u.item``.

    Genres come from the 19 flag columns of ``u.item``; the ``unknown`` flag means no genre.
    """
    folder = _require_files(folder, "ml-100k")
    ratings_path, movies_path = (folder / f for f in LAYOUT_FILES["ml-100k"])
    flag_cols = [f"g{i}" for i in range(len(ML_100K_GENRES))]
    try:
        raw = pd.read_csv(ratings_path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"])
        movies = pd.read_csv(
            movies_path, sep="|", header=None, encoding="latin-1", quoting=csv.QUOTE_NONE,
            names=[ITEM, "title", "release_date", "video_release_date", "url", *flag_cols],
            keep_default_na=False, dtype={c: np.int64 for c in flag_cols},
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataValidationError(f"{folder}: could not parse the ml-100k files ({exc})") from exc
    frame = validate_interactions(
        raw, user_col="user", item_col="item", time_col="timestamp", rating_col="rating",
        source=str(ratings_path),
    )
    flags = movies[flag_cols].to_numpy(dtype=bool)
    names = np.array(ML_100K_GENRES, dtype=object)
    movies["genres"] = [
        "|".join(g for g in names[row] if g != "unknown") for row in flags
    ]
    items = _items(movies[[ITEM, "title", "genres"]], movies_path)
    return _interactions(frame, items, name or folder.name, folder, "ml-100k")


LOADERS = {"ml-latest": load_ml_latest, "ml-1m": load_ml_1m, "ml-100k": load_ml_100k}


def load_movielens_folder(folder: str | Path, name: str | None = None) -> Interactions:
    """Load whichever MovieLens layout ``folder`` holds."""
    found = find_layout_folder(folder)
    if found is None:
        raise DatasetNotFoundError(
            f"{folder}: no MovieLens files found; expected one of "
            f"{', '.join(' + '.join(f) for f in LAYOUT_FILES.values())}"
        )
    return LOADERS[detect_layout(found)](found, name=name or Path(folder).name)


def load_movielens(
    name: str = "ml-latest-small",
    path: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> Interactions:
    """Load a MovieLens dataset by name, downloading it (once, verified) if it is nowhere on disk.

    Args:
        name: one of ``SUPPORTED`` (ml-latest-small, ml-latest, ml-25m, ml-20m, ml-1m, ml-100k).
        path: a folder holding the dataset's files; when given, nothing else is tried.
        cache_dir: the cache folder (default ``$SHORTLIST_CACHE_DIR`` or ``~/.cache/shortlist``).
        download: allow downloading the official zip when the files are not found.

    Resolution order: ``path``; ``$SHORTLIST_DATA_DIR/<name>``; ``<cache>/<name>``; download into
    ``<cache>/<name>``.
    """
    check_name(name)
    if path is not None:
        folder = find_layout_folder(path)
        if folder is None:
            raise DatasetNotFoundError(
                f"path={str(path)!r} holds no {name} files (expected "
                f"{' or '.join(' + '.join(f) for f in LAYOUT_FILES.values())}); "
                f"unzip {_url(name)} there or pass the folder that holds the files"
            )
        return load_movielens_folder(folder, name=name)
    data_dir = default_data_dir()
    if data_dir is not None:
        folder = find_layout_folder(data_dir / name)
        if folder is not None:
            return load_movielens_folder(folder, name=name)
    cache = default_cache_dir(cache_dir)
    folder = find_layout_folder(cache / name)
    if folder is not None:
        return load_movielens_folder(folder, name=name)
    if not download:
        raise DatasetNotFoundError(_where_to_put(name, cache, reason="download=False"))
    return load_movielens_folder(download_movielens(name, cache_dir=cache), name=name)


# ----------------------------------------------------------------------------------------- download


def check_name(name: str) -> None:
    """Raise :class:`DataValidationError` unless ``name`` is a supported MovieLens dataset."""
    if name not in CHECKSUMS:
        raise DataValidationError(
            f"name={name!r} is not a supported MovieLens dataset; use one of {list(SUPPORTED)}"
        )


def download_movielens(name: str, cache_dir: str | Path | None = None) -> Path:
    """Download ``<name>.zip`` from GroupLens into the cache, verify it and extract it; return the folder.

    The zip is streamed to a temporary file while hashing; a SHA-256 other than the pinned one raises
    :class:`ChecksumMismatchError` and deletes the file. Extraction goes to a temporary folder (members
    that would land outside it are refused) that is renamed to ``<cache>/<name>`` only when complete.
    """
    check_name(name)
    cache = default_cache_dir(cache_dir)
    target = cache / name
    if find_layout_folder(target) is not None:
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetNotFoundError(
            f"{target} exists but holds no {name} files; delete that folder (or put the unzipped files "
            "there) and retry"
        )
    cache.mkdir(parents=True, exist_ok=True)
    url = _url(name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".zip.tmp", dir=cache)
    tmp_zip = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            digest = _fetch(url, handle, name, cache)
        _check_checksum(name, digest, url, cache)
        _extract(tmp_zip, target, name)
    finally:
        tmp_zip.unlink(missing_ok=True)
    log.info("downloaded %s into %s", name, target)
    return target


def _fetch(url: str, handle: BinaryIO, name: str, cache: Path) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            total = _content_length(response)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False) as bar:
                while block := response.read(_CHUNK):
                    handle.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetNotFoundError(_where_to_put(name, cache, reason=f"downloading {url} failed: {exc}")) from exc
    return digest.hexdigest()


def _check_checksum(name: str, digest: str, url: str, cache: Path) -> None:
    expected = CHECKSUMS.get(name)
    if expected is None:
        record = cache / f"{name}.zip.sha256"
        atomic_write_text(record, f"{digest}  {name}.zip\n")
        log.warning(
            "%s: no pinned SHA-256 for %s; accepted the download unverified and recorded its SHA-256 "
            "%s in %s", name, url, digest, record,
        )
        return
    if digest != expected:
        raise ChecksumMismatchError(
            f"{name}: the download from {url} has SHA-256 {digest}, expected the pinned {expected}; "
            "the file was deleted. Retry (the transfer may have been corrupted); if it keeps failing, "
            "GroupLens may have re-published the zip: check it yourself and put the unzipped files in "
            f"{_data_dir_hint(name)} or {cache / name}/"
        )


def _extract(zip_path: Path, target: Path, name: str) -> None:
    """Extract ``zip_path`` safely into a temporary folder, then rename its dataset folder to ``target``."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".extract", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                root = staging.resolve()
                for member in archive.infolist():
                    dest = (staging / member.filename).resolve()
                    if member.filename.startswith(("/", "\\")) or not dest.is_relative_to(root):
                        raise DataValidationError(
                            f"{name}.zip: member {member.filename!r} would be written outside the target "
                            "folder; refusing to extract this archive"
                        )
                    archive.extract(member, staging)
        except zipfile.BadZipFile as exc:
            raise DataValidationError(f"{name}.zip is not a valid zip file ({exc}); retry the download") from exc
        found = find_layout_folder(staging / name) or find_layout_folder(staging)
        if found is None:
            raise DataValidationError(
                f"{name}.zip holds no MovieLens files (expected "
                f"{' or '.join(' + '.join(f) for f in LAYOUT_FILES.values())})"
            )
        try:
            if target.exists():
                target.rmdir()  # empty (checked by the caller)
            os.replace(found, target)
        except OSError:
            if find_layout_folder(target) is None:  # not another process finishing the same download
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _content_length(response) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------- helpers


def _url(name: str) -> str:
    return f"{BASE_URL}/{name}.zip"


def _data_dir_hint(name: str) -> str:
    data_dir = default_data_dir()
    return f"{data_dir / name}/ (${DATA_DIR_ENV}/{name}/)" if data_dir else f"${DATA_DIR_ENV}/{name}/"


def _where_to_put(name: str, cache: Path, reason: str) -> str:
    files = " + ".join(LAYOUT_FILES[_layout_of(name)])
    return (
        f"MovieLens {name!r} is not on disk and was not downloaded ({reason}). Download {_url(name)} "
        f"(from https://grouplens.org/datasets/movielens/), unzip it, and put its files ({files}) in "
        f"{_data_dir_hint(name)} (set {DATA_DIR_ENV} to the folder that holds {name}/), or in the cache "
        f"folder {cache / name}/, or pass path= the folder that holds them"
    )


def _layout_of(name: str) -> str:
    return name if name in ("ml-1m", "ml-100k") else "ml-latest"


def _check_folder_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DataValidationError(f"name={name!r} is not a dataset folder name; pass e.g. 'ml-latest-small'")


def _require_files(folder: str | Path, layout: str) -> Path:
    folder = Path(folder)
    missing = [f for f in LAYOUT_FILES[layout] if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{folder}: missing {missing} for the {layout} layout; pass the folder that holds "
            f"{' and '.join(LAYOUT_FILES[layout])}"
        )
    return folder


def _items(movies: pd.DataFrame, source: Path) -> pd.DataFrame:
    return build_item_table(movies, source=str(source))


def _interactions(frame: pd.DataFrame, items: pd.DataFrame, name: str, folder: Path, layout: str) -> Interactions:
    return Interactions(frame=frame, items=items, name=name, meta={"source": str(folder), "layout": layout})
