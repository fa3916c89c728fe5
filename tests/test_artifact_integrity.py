"""Tamper-proof artifacts (issue 14, items 3, 4 and 6): every file of a version is covered from the top
manifest, nested manifests included; an empty or missing checksum list is refused; a damaged file is named
in an ArtifactError (exit code 2 from the CLI), never a library traceback; LATEST cannot point outside the
root; a killed save's temporary folder is cleaned by the next save.

Each case copies the tiny pipeline's artifact, damages it, and checks that nothing loads.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from test_recommender import build_tiny_pipeline

from data.errors import ArtifactError
from data.integrity import tree_checksums
from data.io import sha256_file
from pipeline.artifacts import LATEST, clean_stale_temps, load_artifact, resolve_artifact, save_artifact
from pipeline.loading import load_parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    folder = tmp_path / "root" / "v1"
    shutil.copytree(tiny["artifact"], folder)
    (tmp_path / "root" / LATEST).write_text("v1\n")
    return folder


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def reseal(folder: Path) -> None:
    """Recompute every manifest's checksums, deepest first, as a careless (or hostile) tool would: only a
    file damaged *before* the checksums were taken gets past the checksum check."""
    for manifest in sorted(folder.rglob("manifest.json"), key=lambda p: -len(p.parts)):
        if manifest.parent == folder:
            edit_json(manifest, lambda m: m.__setitem__("files", tree_checksums(folder)))
        else:
            sub = manifest.parent
            edit_json(manifest, lambda m, sub=sub: m.__setitem__(
                "files", {name: sha256_file(sub / name) for name in m.get("files", {})}))


def refused(folder: Path, *needles: str) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(folder)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# ---- item 3: checksums cover every file from the top --------------------------------------------------
def test_the_top_manifest_lists_every_file_of_the_version(tiny):
    manifest = json.loads((tiny["artifact"] / "manifest.json").read_text())
    on_disk = {p.relative_to(tiny["artifact"]).as_posix() for p in tiny["artifact"].rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert "retriever/component_0/manifest.json" in manifest["files"]
    assert "retriever/component_1/index/index.faiss" in manifest["files"]
    hybrid = json.loads((tiny["artifact"] / "retriever" / "manifest.json").read_text())
    assert set(hybrid["files"]) == {"component_0/manifest.json", "component_1/manifest.json"}


def test_an_edited_nested_manifest_is_refused(copy):
    edit_json(copy / "retriever/component_0/manifest.json", lambda m: m.__setitem__("files", {}))
    refused(copy, "retriever/component_0/manifest.json", "checksum")


def test_zeroed_weights_with_an_empty_files_list_are_refused(copy):
    """The issue's case: zeroed tensors, the nested manifest's list emptied, the top left as it was."""
    from safetensors.numpy import load_file, save_file

    tensors = copy / "retriever/component_0/tensors.safetensors"
    save_file({k: np.zeros_like(v) for k, v in load_file(str(tensors)).items()}, str(tensors))
    edit_json(copy / "retriever/component_0/manifest.json", lambda m: m.__setitem__("files", {}))
    refused(copy, "checksum")
    # ... and with the hybrid's and the top's checksums retaken: the nested empty list itself is refused
    hybrid = copy / "retriever"
    edit_json(hybrid / "manifest.json", lambda m: m.__setitem__(
        "files", {name: sha256_file(hybrid / name) for name in m["files"]}))
    edit_json(copy / "manifest.json", lambda m: m.__setitem__("files", tree_checksums(copy)))
    refused(copy, "component_0", "missing or empty")


@pytest.mark.parametrize("files", [{}, None])
def test_an_empty_or_missing_top_list_is_refused(copy, files):
    edit_json(copy / "manifest.json", lambda m: m.__setitem__("files", files) if files is not None
              else m.pop("files"))
    refused(copy, "manifest.json", "missing or empty")


def test_an_unlisted_file_is_refused(copy):
    (copy / "retriever" / "extra.bin").write_bytes(b"\0" * 8)
    refused(copy, "retriever/extra.bin", "not covered")


def test_a_listed_file_outside_the_folder_is_refused(copy):
    edit_json(copy / "manifest.json", lambda m: m["files"].__setitem__("../../etc/passwd", "0" * 64))
    refused(copy, "outside the folder")


def test_a_changed_byte_anywhere_is_refused(copy):
    index = copy / "retriever/component_1/index/index.faiss"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    refused(copy, "retriever/component_1/index/index.faiss", "checksum")


# ---- item 4: damaged files are named, never a raw library error ---------------------------------------
def damage_safetensors_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)  # "header too large"
    path.write_bytes(bytes(data))


def damage_parquet_dictionary(path: Path) -> None:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0)
    title = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == "title")
    data = bytearray(path.read_bytes())
    start = title.dictionary_page_offset + 4
    data[start:start + 4] = b"\xff" * 4
    path.write_bytes(bytes(data))


DAMAGES = [
    ("retriever/component_0/tensors.safetensors", damage_safetensors_header),
    ("retriever/component_1/index/vectors.safetensors", damage_safetensors_header),
    ("items.parquet", damage_parquet_dictionary),
]


@pytest.mark.parametrize("name,damage", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_file_is_named_with_the_fix(copy, name, damage):
    damage(copy / name)
    reseal(copy)  # the checksums now agree: only opening the file can tell
    message = refused(copy, name, "cannot be read", "shortlist train")
    assert "Traceback" not in message


@pytest.mark.parametrize("name,damage", DAMAGES[::2], ids=[d[0] for d in DAMAGES[::2]])
def test_the_cli_exits_2_naming_the_damaged_file(copy, name, damage, capsys):
    from pipeline.cli import main

    damage(copy / name)
    reseal(copy)
    assert main(["recommend", "--user", "1", "--artifacts", str(copy.parent)]) == 2
    err = capsys.readouterr().err
    assert name in err and "error:" in err and "SafetensorError" not in err.split(":")[0]


def test_a_damaged_ranker_is_named(tiny, copy, tmp_path):
    ranker = tmp_path / "ranker"
    shutil.copytree(tiny["ranker"], ranker)
    damage_safetensors_header(ranker / "model.safetensors")
    edit_json(ranker / "manifest.json", lambda m: m["files"].__setitem__(
        "model.safetensors", sha256_file(ranker / "model.safetensors")))
    with pytest.raises(ArtifactError, match="model.safetensors.*cannot be read.*train-ranker"):
        load_parts(copy, ranker)


def test_a_ranker_manifest_without_checksums_is_refused(tiny, copy, tmp_path):
    ranker = tmp_path / "ranker"
    shutil.copytree(tiny["ranker"], ranker)
    edit_json(ranker / "manifest.json", lambda m: m.__setitem__("files", {}))
    with pytest.raises(ArtifactError, match="missing or empty"):
        load_parts(copy, ranker)


# ---- item 6: LATEST and leftovers --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../elsewhere", "/etc", "..", "v1/../../x", ""])
def test_latest_must_name_a_folder_inside_the_root(copy, name):
    outside = copy.parent.parent / "elsewhere"
    shutil.copytree(copy, outside)
    (copy.parent / LATEST).write_text(name + "\n")
    with pytest.raises(ArtifactError, match="inside"):
        resolve_artifact(copy.parent)


def test_a_symlinked_version_outside_the_root_is_refused(copy):
    outside = copy.parent.parent / "elsewhere"
    shutil.copytree(copy, outside)
    os.symlink(outside, copy.parent / "link")
    (copy.parent / LATEST).write_text("link\n")
    with pytest.raises(ArtifactError, match="inside"):
        resolve_artifact(copy.parent)


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(tiny, tmp_path):
    from retrieval.registry import load_retriever

    root = tmp_path / "root"
    stale = root / ".v0.abc123.tmp"
    (stale / "v0" / "retriever").mkdir(parents=True)
    (stale / "v0" / "retriever" / "half.safetensors").write_bytes(b"\0" * 16)
    fresh = root / ".v9.def456.tmp"  # a save in progress: kept
    fresh.mkdir()
    old = time.time() - 3600
    for path in [stale, *stale.rglob("*")]:
        os.utime(path, (old, old))
    assert clean_stale_temps(root) == [stale]
    assert not stale.exists() and fresh.exists()
    (stale / "v0").mkdir(parents=True)
    for path in [stale, stale / "v0"]:
        os.utime(path, (old, old))
    retriever = load_retriever(tiny["artifact"] / "retriever")
    save_artifact(root, retriever, None, config={}, data={}, metrics={}, version="v2")
    assert not stale.exists() and (root / "v2").is_dir() and (root / LATEST).read_text().strip() == "v2"
    assert load_artifact(root).manifest["version"] == "v2"
