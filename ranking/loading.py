"""Loading a saved reranker of either variant from its folder: the manifest's ``kind`` says which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.errors import ArtifactError
from data.io import read_manifest

#: The reranker variants: ``"item_tokens"`` (:class:`~ranking.item_ranker.ItemTokenRanker`, the default) and
#: ``"title"`` (:class:`~ranking.cross_encoder.CrossEncoderRanker`, which reads words of item titles).
VARIANTS = ("item_tokens", "title")


def load_ranker(folder: str | Path, **kwargs: Any) -> Any:
    """The ranker saved in ``folder`` (item-token or title cross-encoder), verified against its manifest;
    ``kwargs`` go to that class's ``load`` (``device``; ``load_tokenizer`` for the title variant)."""
    from ranking.cross_encoder import RANKER_KIND as TITLE_KIND
    from ranking.cross_encoder import CrossEncoderRanker
    from ranking.item_ranker import RANKER_KIND as ITEM_KIND
    from ranking.item_ranker import ItemTokenRanker

    kind = read_manifest(folder).get("kind")
    if kind == ITEM_KIND:
        kwargs.pop("load_tokenizer", None)
        return ItemTokenRanker.load(folder, **kwargs)
    if kind == TITLE_KIND:
        return CrossEncoderRanker.load(folder, **kwargs)
    raise ArtifactError(f"{folder}: manifest kind {kind!r} is not a reranker ({ITEM_KIND!r} or {TITLE_KIND!r}); "
                        "pass a folder written by ItemTokenRanker.save or CrossEncoderRanker.save")


__all__ = ["VARIANTS", "load_ranker"]
