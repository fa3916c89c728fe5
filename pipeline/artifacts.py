"""The versioned artifact folder ``shortlist train`` writes and every other command reads.

Layout of ``<root>/<version>/``::

    manifest.json      kind, version, created, library versions, config, data fingerprint, dataset
                       statistics, metrics, and the checksum of every file below
    retriever/         the retriever (its own manifest, tensors and FAISS index)
    items.parquet      the item table (titles and genres for display)

The folder is built under a temporary name and renamed into place; ``<root>/LATEST`` (written atomically
afterwards) names the newest version. Loading verifies every checksum and that the retriever's item
vocabulary matches the item table.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from data.errors import ArtifactError
from data.io import (
    atomic_path,
    atomic_write_text,
    file_checksums,
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
            "files": file_checksums(tmp, [ITEMS_FILE, f"{RETRIEVER_DIR}/manifest.json"]),
        })
    atomic_write_text(root / LATEST, version + "\n")
    return folder


def resolve_artifact(path: str | Path) -> Path:
    """A version folder, or the version ``path/LATEST`` names when ``path`` is the artifacts root."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        return path / latest.read_text().strip()
    raise ArtifactError(
        f"{path}: neither an artifact folder nor an artifacts root with a {LATEST} file; "
        "run `shortlist train` first or pass --artifacts to the folder it wrote"
    )


def load_artifact(path: str | Path) -> Artifact:
    """Load and verify an artifact (see the module docstring)."""
    folder = resolve_artifact(path)
    manifest = read_manifest(folder, kind=ARTIFACT_KIND)
    retriever = load_retriever(folder / RETRIEVER_DIR)
    items = pd.read_parquet(folder / ITEMS_FILE)
    if set(items["item_id"]) - set(retriever.items.ids.tolist()):
        raise ArtifactError(f"{folder}: {ITEMS_FILE} lists items the retriever does not know")
    return Artifact(folder=folder, manifest=manifest, retriever=retriever, items=items.set_index("item_id"))
