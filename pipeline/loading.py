"""Loading what the online recommender serves, with every check: the retriever (a pipeline artifact or a
saved retriever folder), the cross-encoder ranker, a blend and a latency model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.errors import ArtifactError, ConfigError


@dataclass
class ServingParts:
    """The loaded pieces of a :class:`~pipeline.recommender.Recommender`.

    Attributes:
        retriever: the fitted retriever.
        ranker: the cross-encoder ranker, or ``None``.
        blend: the fitted :class:`~ranking.blend.HybridBlend`, or ``None``.
        latency: the latency model, or ``None``.
        items: the artifact's item table, or ``None`` (a bare retriever folder has none).
        info: where each piece came from (artifact version, ranker folder, backend...).
    """

    retriever: Any
    ranker: Any = None
    blend: Any = None
    latency: Any = None
    items: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def load_retriever_and_items(artifact: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(retriever, item table or None, info)`` of a pipeline artifact (a version folder, or a root with
    ``LATEST``) or a saved retriever folder; raises :class:`~data.errors.ArtifactError` for anything else."""
    from data.io import read_manifest
    from pipeline.artifacts import ARTIFACT_KIND, LATEST, load_artifact

    folder = Path(artifact)
    info: dict[str, Any] = {"artifact": str(folder)}
    if not folder.exists():
        raise ArtifactError(f"{folder}: no such folder; pass a pipeline artifact (`shortlist train` writes "
                            "artifacts/LATEST) or a saved retriever folder")
    if (folder / "manifest.json").is_file() and read_manifest(folder).get("kind") != ARTIFACT_KIND:
        from data.errors import ShortlistError
        from data.integrity import check_readable
        from retrieval.registry import load_retriever

        check_readable(folder, fix="re-save the retriever")
        try:
            return load_retriever(folder), None, info
        except ShortlistError:
            raise
        except Exception as exc:  # a library's complaint about bytes that passed the checks
            raise ArtifactError(f"{folder}: the retriever cannot be loaded ({type(exc).__name__}: {exc}); "
                                "re-save it") from exc
    if (folder / "manifest.json").is_file() or (folder / LATEST).is_file():
        loaded = load_artifact(folder)
        info.update(version=loaded.manifest.get("version"), model=loaded.manifest.get("model"),
                    events_folded=(loaded.manifest.get("data") or {}).get("events"))
        return loaded.retriever, loaded.items, info
    raise ArtifactError(f"{folder}: neither an artifact folder, an artifacts root with {LATEST}, nor a "
                        "retriever folder; run `shortlist train` first")


def load_parts(artifact: str | Path, ranker: str | Path | None = None, *, blend: str | Path | None = None,
               latency: str | Path | None = None, threads: int = 1, backend: str = "torch") -> ServingParts:
    """Load and verify the pieces (see :meth:`pipeline.recommender.Recommender.load`); ``threads`` is given
    to a non-torch ranker backend and to the latency model."""
    retriever, items, info = load_retriever_and_items(artifact)
    model = None
    if ranker is not None:
        model = _load_ranker_checked(ranker)
        if backend != "torch":
            if not hasattr(model, "with_backend"):
                raise ConfigError(f"backend {backend!r} needs the ranker's with_backend; use 'torch'")
            changed = model.with_backend(backend, threads=threads)
            model = changed if changed is not None else model
        info.update(ranker=str(ranker), ranker_kind=getattr(model, "kind", "title"), ranker_mode=model.mode,
                    backend=backend, hybrid_head=bool(getattr(model, "hybrid_head", None)))
    fitted_blend = None
    if blend is not None:
        from ranking.blend import HybridBlend

        fitted_blend = HybridBlend.load(blend)
        info["blend"] = str(blend)
    latency_model = None
    if latency is not None:
        from ranking.latency import LatencyModel

        latency_model = LatencyModel.load(latency, threads=threads or None)
        if model is not None:
            latency_model.check_ranker(model, source=latency)
        info["latency"] = str(latency)
    return ServingParts(retriever, model, fitted_blend, latency_model, items, info)


def _load_ranker_checked(folder: str | Path) -> Any:
    """:func:`ranking.loading.load_ranker` after opening every file its manifest lists, with any library
    error turned into an :class:`~data.errors.ArtifactError` naming the folder."""
    from data.errors import ShortlistError
    from data.integrity import check_readable
    from data.io import read_manifest
    from ranking.loading import load_ranker

    fix = "re-create it with `shortlist train-ranker` (or pass another --ranker)"
    manifest = read_manifest(folder)
    check_readable(folder, list(manifest["files"]), fix=fix)
    try:
        return load_ranker(folder, load_tokenizer=False)
    except ShortlistError:
        raise
    except Exception as exc:  # a library's complaint about bytes that passed the checks
        raise ArtifactError(f"{folder}: the ranker cannot be loaded ({type(exc).__name__}: {exc}); {fix}") from exc


def check_vocabulary(retriever: Any, ranker: Any) -> None:
    """Refuse a ranker whose catalogue does not cover every item the retriever can return."""
    ids = retriever.items.ids
    missing = ids[ranker.items.rows(ids, missing="ignore") < 0]
    if missing.size:
        raise ArtifactError(
            f"the reranker's catalogue lacks {missing.size} of the retriever's {ids.size} items (e.g. "
            f"{missing[:5].tolist()}); they come from different data: rebuild the ranker on this artifact's "
            "catalogue or pass the matching artifact"
        )


__all__ = ["ServingParts", "check_vocabulary", "load_parts", "load_retriever_and_items"]
