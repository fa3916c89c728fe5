"""Whole-tree integrity of a saved folder: every file covered by the top manifest, and every file readable.

:func:`tree_checksums` lists the SHA-256 of *every* file under a folder (nested manifests included);
:func:`verify_tree` refuses a folder whose top manifest has no ``files`` list, leaves a file out, lists a
file that is missing, names a path outside the folder, or whose checksums differ. So a nested manifest
(``retriever/component_0/manifest.json``) cannot be edited without the top manifest noticing, and an empty
``"files": {}`` never turns verification off.

:func:`check_readable` opens each file by its format (the safetensors header, the whole Parquet file, JSON)
so a damaged file is reported as an :class:`~data.errors.ArtifactError` naming it and the fix, instead of a
library's raw ``SafetensorError`` or ``ArrowInvalid`` deep in a loader.

This protects against damage and careless edits. It is not a signature: whoever can rewrite every file can
rewrite the top manifest too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from data.errors import ArtifactError
from data.io import MANIFEST_NAME, sha256_file

#: How to re-create a damaged artifact (appended to every message unless the caller gives its own).
DEFAULT_FIX = "re-create it (`shortlist train` for a pipeline artifact, `shortlist train-ranker` for a ranker)"


def tree_files(folder: str | Path) -> list[str]:
    """Every regular file under ``folder`` but its top ``manifest.json``, as sorted POSIX relative paths."""
    folder = Path(folder)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(n for n in names if n != MANIFEST_NAME)


def tree_checksums(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (but its top manifest)."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in tree_files(folder)}


def safe_member(folder: Path, name: Any) -> Path:
    """``folder / name`` for a manifest entry that stays inside ``folder`` (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{folder}: manifest lists a file name {name!r} that is not a path; {DEFAULT_FIX}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise ArtifactError(f"{folder}: manifest lists {name!r}, a path outside the folder; refused; {DEFAULT_FIX}")
    return folder / pure


def verify_tree(folder: str | Path, manifest: dict[str, Any], *, fix: str = DEFAULT_FIX) -> None:
    """Check that ``manifest["files"]`` covers exactly the files under ``folder``, each with its checksum."""
    folder = Path(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{folder / MANIFEST_NAME}: no checksums (\"files\" is missing or empty), so nothing "
                            f"could be verified; refused; {fix}")
    for name in files:
        safe_member(folder, name)
    present = tree_files(folder)
    unlisted = [n for n in present if n not in files]
    if unlisted:
        raise ArtifactError(f"{folder / unlisted[0]}: not covered by the checksums of {folder / MANIFEST_NAME} "
                            f"({len(unlisted)} unlisted file(s)); refused; {fix}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise ArtifactError(f"{path}: listed in {folder / MANIFEST_NAME} but missing (or a link); {fix}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: checksum {actual[:12]} does not match the manifest's "
                                f"{str(expected)[:12]}; the file is corrupted or from another artifact; {fix}")


def check_readable(folder: str | Path, names: Iterable[str] | None = None, *, fix: str = DEFAULT_FIX) -> None:
    """Open every ``.safetensors`` (header), ``.parquet`` (whole file) and ``.json`` file under ``folder``
    (or only ``names``); a damaged one raises :class:`~data.errors.ArtifactError` naming it."""
    folder = Path(folder)
    for name in (tree_files(folder) + [MANIFEST_NAME]) if names is None else names:
        path = folder / name
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            elif path.suffix == ".parquet":
                import pyarrow.parquet as pq

                pq.read_table(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except ArtifactError:
            raise
        except Exception as exc:  # any library's complaint about the bytes becomes one error
            raise ArtifactError(f"{path}: cannot be read ({type(exc).__name__}: {_short(exc)}); the file is "
                                f"damaged; {fix}") from exc


def _check_safetensors(path: Path) -> None:
    """Parse the header and check every tensor's byte range against the file size."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        keys = list(handle.keys())
    if not keys:
        raise ArtifactError(f"{path}: holds no tensors; the file is damaged; {DEFAULT_FIX}")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["DEFAULT_FIX", "check_readable", "safe_member", "tree_checksums", "tree_files", "verify_tree"]
