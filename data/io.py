"""Atomic writes, manifests and fingerprints for every artifact shortlist saves.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over the
target, so a crash never leaves a half-written model behind. A folder is built under a temporary name
and renamed into place the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import ArtifactError

MANIFEST_NAME = "manifest.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (file or folder).

    Use for writers that insist on a filename (``faiss.write_index``, ``safetensors.save_file``,
    ``DataFrame.to_parquet``) or for a whole artifact folder. An existing folder at ``path`` is replaced
    only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise ArtifactError(f"atomic_path: nothing was written to {target}")
        if target.is_dir() and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """A short SHA-256 of the arrays' dtypes, shapes and bytes: identifies the exact training data."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read ``folder/manifest.json``; check its ``kind`` and that every file it lists has its checksum."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; this is not a shortlist artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc}); re-create the artifact") from exc
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(
            f"{folder}: manifest kind is {manifest.get('kind')!r}, expected {kind!r}; "
            "pass the folder that holds that kind of artifact"
        )
    # -- issue 14: an empty or missing checksum list, or a path outside the folder, is refused --------
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: no checksums (\"files\" is missing or empty), so the folder cannot be "
                            "verified; refused; re-create the artifact")
    for name in files:
        if not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
            raise ArtifactError(f"{path}: lists {name!r}, a path outside the folder; refused; re-create the artifact")
    # -- end issue 14 ----------------------------------------------------------------------------------
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{folder}: manifest lists {name} but it is missing; re-create the artifact")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: checksum {actual[:12]} does not match the manifest's {expected[:12]}; "
                "the file is corrupted or from another artifact; re-create the artifact"
            )
    return manifest


def file_checksums(folder: str | Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(Path(folder) / name) for name in names}


def library_versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on, for its manifest."""
    import importlib.metadata as md

    versions = {}
    for dist in ("shortlist", "numpy", "faiss-cpu", "implicit", "torch", "transformers", "peft"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
