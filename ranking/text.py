"""Item and history text as token ids, tokenized once per catalogue.

Every item's text (the item table's ``text`` column, ``"Toy Story (1995) | Adventure, Animation"``:
title, year and genres) is tokenized once when the ranker is built and kept as one flat int32 array plus
offsets. A request never tokenizes a string: a candidate is its cached ids cut to ``item_tokens``, and a
history is ``[CLS]`` + the newest item's ids + separator + the next newest ... + ``[SEP]``, within
``history_tokens``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from data.dataset import ITEM
from data.errors import ArtifactError, DataValidationError
from data.items import default_text
from data.vocab import IdVocab
from ranking.config import TextConfig


def item_texts(item_table: pd.DataFrame | None, items: IdVocab) -> list[str]:
    """The text of every item of ``items``, in row order.

    Uses the table's ``text`` column, else ``title`` and ``genres``; an item missing from the table (or
    with empty text) gets ``"item <id>"`` so it still has tokens.
    """
    if item_table is None:
        return [f"item {i}" for i in items.ids]
    if ITEM not in item_table.columns:
        raise DataValidationError("item_table: missing column 'item_id'; pass the dataset's item table")
    if "text" in item_table.columns:
        text = item_table["text"].fillna("").astype(str)
    elif "title" in item_table.columns:
        genres = item_table["genres"].fillna("").astype(str) if "genres" in item_table.columns else [""] * len(
            item_table)
        text = pd.Series([default_text(str(t), g) for t, g in zip(item_table["title"].fillna(""), genres)],
                         index=item_table.index)
    else:
        raise DataValidationError("item_table: needs a 'text' or a 'title' column to build the reranker's text")
    lookup = dict(zip(item_table[ITEM].to_numpy(dtype=np.int64).tolist(), text.tolist()))
    return [lookup.get(int(i)) or f"item {int(i)}" for i in items.ids]


@dataclass
class SpecialTokens:
    """Token ids the inputs need.

    Attributes:
        cls: the sequence start (``[CLS]`` / ``<s>``).
        sep: the segment end (``[SEP]`` / ``</s>``).
        pad: padding.
        separator: the ids of ``TextConfig.separator`` (between two history items).
    """

    cls: int
    sep: int
    pad: int
    separator: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, separator: str) -> SpecialTokens:
        ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad")}
        if ids["cls"] is None:
            ids["cls"] = getattr(tokenizer, "bos_token_id", None)
        if ids["sep"] is None:
            ids["sep"] = getattr(tokenizer, "eos_token_id", None)
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise DataValidationError(
                f"tokenizer has no {missing} token(s); use a BERT-family tokenizer with [CLS], [SEP] and [PAD]"
            )
        sep_ids = tuple(int(i) for i in tokenizer(separator, add_special_tokens=False)["input_ids"])
        return cls(int(ids["cls"]), int(ids["sep"]), int(ids["pad"]), sep_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "sep": self.sep, "pad": self.pad, "separator": list(self.separator)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpecialTokens:
        return cls(int(values["cls"]), int(values["sep"]), int(values["pad"]),
                   tuple(int(i) for i in values["separator"]))


class ItemTokens:
    """The pre-tokenized catalogue: per item row, its text's token ids (no special tokens).

    Args:
        items: the catalogue; row ``i`` of ``offsets`` belongs to ``items.ids[i]``.
        flat: every item's ids, concatenated (int32).
        offsets: ``(n_items + 1,)`` int64 boundaries into ``flat``.
        special: the special token ids.
        config: the text budgets.
    """

    def __init__(self, items: IdVocab, flat: np.ndarray, offsets: np.ndarray, special: SpecialTokens,
                 config: TextConfig) -> None:
        flat = np.asarray(flat, dtype=np.int32)
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (len(items) + 1,) or offsets[0] != 0 or offsets[-1] != flat.size or (
                np.diff(offsets) < 0).any():
            raise ArtifactError(
                f"item tokens: offsets of shape {offsets.shape} do not fit {len(items)} items and "
                f"{flat.size} token ids; rebuild the token cache from the item table"
            )
        self.items = items
        self.flat = flat
        self.offsets = offsets
        self.special = special
        self.config = config
        cut = config.item_tokens
        self._candidates = [np.append(flat[s:min(e, s + cut)], special.sep).astype(np.int64)
                            for s, e in itertools.pairwise(offsets)]
        hcut = config.history_item_tokens
        self._history_items = [flat[s:min(e, s + hcut)].astype(np.int64) for s, e in itertools.pairwise(offsets)]

    @classmethod
    def build(cls, item_table: pd.DataFrame | None, items: IdVocab, tokenizer: Any,
              config: TextConfig | None = None) -> ItemTokens:
        """Tokenize every item's text once (see :func:`item_texts`)."""
        config = config or TextConfig()
        texts = item_texts(item_table, items)
        longest = max(config.item_tokens, config.history_item_tokens)
        encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=longest)["input_ids"] \
            if texts else []
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter((t for e in encoded for t in e), dtype=np.int32, count=int(lengths.sum()))
        return cls(items, flat, offsets, SpecialTokens.from_tokenizer(tokenizer, config.separator), config)

    def __len__(self) -> int:
        return len(self.items)

    def rows(self, item_ids: Any, what: str = "candidate") -> np.ndarray:
        """Rows of external ``item_ids``; unknown ids raise :class:`~data.errors.UnknownIdError` naming them."""
        try:
            return self.items.rows(item_ids, missing="raise")
        except KeyError as exc:
            raise type(exc)(f"{what} items: {exc}; rank only items of the catalogue the ranker was built "
                            "with (or rebuild it with the new items)") from None

    def candidate(self, row: int) -> np.ndarray:
        """Token ids of the candidate at item ``row``: its text cut to ``item_tokens``, then ``[SEP]``."""
        return self._candidates[row]

    def candidates(self, rows: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        return [self._candidates[int(r)] for r in rows]

    def history(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[CLS] newest ; older ; ... [SEP]`` from history item ``rows`` in chronological order (oldest
        first), with at most ``history_items`` items and ``history_tokens`` tokens; an item that does not
        fit whole is dropped with everything older."""
        c, s = self.config, self.special
        budget = c.history_tokens - 2
        out: list[int] = [s.cls]
        rows = np.asarray(rows, dtype=np.int64)
        for count, row in enumerate(rows[::-1][: c.history_items]):
            piece = self._history_items[int(row)]
            extra = piece.size + (len(s.separator) if count else 0)
            if extra > budget:
                break
            if count:
                out.extend(s.separator)
            out.extend(piece.tolist())
            budget -= extra
        out.append(s.sep)
        return np.asarray(out, dtype=np.int64)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.items.fingerprint().encode())
        digest.update(self.flat.tobytes())
        digest.update(self.offsets.tobytes())
        return digest.hexdigest()[:16]

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"item_token_ids": self.flat, "item_token_offsets": self.offsets, "item_ids": self.items.ids}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], special: SpecialTokens, config: TextConfig,
                     items: IdVocab) -> ItemTokens:
        if not np.array_equal(tensors["item_ids"], items.ids):
            raise ArtifactError("item tokens: the cached item ids differ from the manifest's item vocabulary; "
                                "the artifact is inconsistent, re-create it")
        return cls(items, tensors["item_token_ids"], tensors["item_token_offsets"], special, config)
