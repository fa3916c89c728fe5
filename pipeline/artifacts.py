"""The versioned artifact folder ``shortlist train`` writes and every other command reads.

Layout of ``<root>/<version>/``::

    manifest.json      kind, version, created, library versions, config, data fingerprint, dataset
                       statistics, metrics, and the checksum of every file below
    retriever/         the retriever (its own manifest, tensors and FAISS index)
    items.parquet      the item table (titles and genres for display)

The folder is built under a temporary name and renamed into place; ``<root>/LATEST`` (written atomically
afterwards) names the newest version. Temporary folders a killed run left behind (``.<version>.*.tmp``,
older than :data:`STALE_TEMP_S`) are removed by the next save.

Loading verifies the whole tree from the top (:func:`data.integrity.verify_tree`): the top manifest lists
the checksum of *every* file of the version, nested manifests included, and a file it leaves out, an
empty list, or a changed byte is refused. Every file is then opened by its format
(:func:`data.integrity.check_readable`), so a damaged file is named in an
:class:`~data.errors.ArtifactError` instead of a library traceback. ``LATEST`` must name a version folder
directly inside the root. Finally the retriever's item vocabulary must match the item table.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from data.errors import ArtifactError, ShortlistError
from data.integrity import check_readable, tree_checksums, verify_tree
from data.io import (
    atomic_path,
    atomic_write_text,
    library_versions,
    read_manifest,
    write_manifest,
)
from retrieval.base import Retriever
from retrieval.registry import load_retriever

ARTIFACT_KIND = "shortlist_artifact"
LATEST = "LATEST"
RETRIEVER_DIR = "retriever"
ITEMS_FILE = "items.parquet"
#: A temporary folder under the artifact root untouched for this long is a killed run's leftover.
STALE_TEMP_S = 15 * 60

log = logging.getLogger(__name__)


@dataclass
class Artifact:
    """A loaded artifact.

    Attributes:
        folder: the version folder.
        manifest: its manifest.
        retriever: the retrieval model with its index.
        items: the item table (``item_id``, ``title``, ``genres``, ...), indexed by ``item_id``.
    """

    folder: Path
    manifest: dict[str, Any]
    retriever: Retriever
    items: pd.DataFrame

    def titles(self, item_ids: Any) -> list[str]:
        return [str(self.items["title"].get(int(i), f"item {i}")) for i in item_ids]


def save_artifact(
    root: str | Path,
    retriever: Retriever,
    items: pd.DataFrame | None,
    *,
    config: dict[str, Any],
    data: dict[str, Any],
    metrics: dict[str, Any],
    version: str | None = None,
) -> Path:
    """Write a new version folder under ``root`` and point ``root/LATEST`` at it."""
    root = Path(root)
    version = version or f"{retriever.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
    folder = root / version
    if folder.exists():
        raise ArtifactError(f"{folder} already exists; pass another version name")
    if "/" in version or "\\" in version or version.startswith("."):
        raise ArtifactError(f"version {version!r} must be a plain folder name (no '/', not starting with '.')")
    clean_stale_temps(root)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        retriever.save(tmp / RETRIEVER_DIR)
        table = items if items is not None else pd.DataFrame({"item_id": retriever.items.ids})
        table = table[table["item_id"].isin(retriever.items.ids)].reset_index(drop=True)
        table.to_parquet(tmp / ITEMS_FILE, index=False)
        write_manifest(tmp, {
            "kind": ARTIFACT_KIND,
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "model": retriever.name,
            "versions": library_versions(),
            "config": config,
            "data": data,
            "metrics": metrics,
            "files": tree_checksums(tmp),  # every file of the version, nested manifests included
        })
    atomic_write_text(root / LATEST, version + "\n")
    return folder


def clean_stale_temps(root: str | Path, older_than_s: float = STALE_TEMP_S) -> list[Path]:
    """Remove the temporary folders (``.*.tmp``, ``.*.old``) a killed save left directly under ``root``
    when nothing in them changed for ``older_than_s`` seconds (a save in progress keeps writing to its
    own); returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for path in root.iterdir():
        if not (path.name.startswith(".") and path.name.endswith((".tmp", ".old"))) or path.is_symlink():
            continue
        try:
            newest = max([p.lstat().st_mtime for p in path.rglob("*")] + [path.lstat().st_mtime])
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        if now - newest >= older_than_s:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            log.warning("removed %s, left behind by an interrupted save", path)
    return removed


def resolve_artifact(path: str | Path) -> Path:
    """A version folder, or the version ``path/LATEST`` names when ``path`` is the artifacts root.

    ``LATEST`` must name a folder directly inside the root (no ``/``, ``..``, absolute path or link out)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        folder = path / name
        inside = (name and name not in (".", "..") and "/" not in name and "\\" not in name
                  and folder.resolve().parent == path.resolve())
        if not inside:
            raise ArtifactError(f"{latest}: names {name!r}, which is not a version folder inside {path}; refused; "
                                f"write the name of a folder under {path} into {LATEST} (or run `shortlist train`)")
        return folder
    raise ArtifactError(
        f"{path}: neither an artifact folder nor an artifacts root with a {LATEST} file; "
        "run `shortlist train` first or pass --artifacts to the folder it wrote"
    )


def latest_version(root: str | Path) -> str | None:
    """What ``root/LATEST`` names now (``None`` when there is no such file): what a hot-swap watcher polls."""
    latest = Path(root) / LATEST
    try:
        return latest.read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def verify_artifact(folder: str | Path) -> dict[str, Any]:
    """Check a version folder without loading a model: its manifest, that it covers every file with a
    matching checksum, and that every file opens; returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind=ARTIFACT_KIND)
    verify_tree(folder, manifest, fix="re-create it with `shortlist train`")
    check_readable(folder, fix="re-create it with `shortlist train`")
    return manifest


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact (see the module docstring); any failure is an
    :class:`~data.errors.ArtifactError` naming the folder or file."""
    folder = resolve_artifact(path)
    manifest = verify_artifact(folder)
    try:
        retriever = load_retriever(folder / RETRIEVER_DIR)
        items = pd.read_parquet(folder / ITEMS_FILE)
    except ShortlistError:
        raise
    except Exception as exc:  # a library's error on bytes that passed the checks above
        raise ArtifactError(f"{folder}: cannot be loaded ({type(exc).__name__}: {exc}); re-create it with "
                            "`shortlist train`") from exc
    if set(items["item_id"]) - set(retriever.items.ids.tolist()):
        raise ArtifactError(f"{folder}: {ITEMS_FILE} lists items the retriever does not know")
    return Artifact(folder=folder, manifest=manifest, retriever=retriever, items=items.set_index("item_id"))
