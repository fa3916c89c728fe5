"""External ids <-> internal row numbers.

External ids are what users know (MovieLens ``movieId``); rows are what arrays index. Every saved
artifact stores its vocabularies and checks them at load time, so a model can never be paired with an
index built over another catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from data.errors import DataValidationError, UnknownIdError
from data.io import fingerprint_arrays


class IdVocab:
    """An ordered set of unique int64 external ids; row ``i`` is ``ids[i]``.

    >>> v = IdVocab([10, 3, 7]); v.rows([7, 10]).tolist()
    [2, 0]
    """

    def __init__(self, ids: Iterable[int] | np.ndarray, name: str = "id") -> None:
        array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if array.ndim != 1:
            raise DataValidationError(f"IdVocab({name}): ids must be 1-D, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise DataValidationError(
                f"IdVocab({name}): ids must be integers, got dtype {array.dtype}; map string ids to ints first"
            )
        self.ids = array.astype(np.int64, copy=True)
        self.name = name
        self._index = pd.Index(self.ids)
        if not self._index.is_unique:
            dup = self._index[self._index.duplicated()][:5].tolist()
            raise DataValidationError(f"IdVocab({name}): ids must be unique; duplicates include {dup}")

    @classmethod
    def from_values(cls, values: Iterable[int] | np.ndarray, name: str = "id") -> IdVocab:
        """Vocabulary of the sorted unique values (a deterministic row order)."""
        return cls(np.unique(np.asarray(values, dtype=np.int64)), name=name)

    def __len__(self) -> int:
        return int(self.ids.size)

    def __contains__(self, external_id: object) -> bool:
        try:
            return int(external_id) in self._index  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdVocab) and np.array_equal(self.ids, other.ids)

    def __repr__(self) -> str:
        return f"IdVocab(name={self.name!r}, size={len(self)})"

    def rows(self, external_ids: Any, missing: str = "raise") -> np.ndarray:
        """Rows of ``external_ids`` (scalar or array-like).

        ``missing="raise"`` raises :class:`UnknownIdError` naming the unknown ids; ``missing="ignore"``
        returns -1 for them.
        """
        values = np.atleast_1d(np.asarray(external_ids))
        if values.size and not np.issubdtype(values.dtype, np.integer):
            try:
                values = values.astype(np.int64)
            except (TypeError, ValueError) as exc:
                raise UnknownIdError(f"{self.name} ids must be integers, got {values[:5].tolist()}") from exc
        rows = self._index.get_indexer(values.astype(np.int64, copy=False)).astype(np.int64)
        if missing == "raise" and (rows < 0).any():
            unknown = values[rows < 0][:5].tolist()
            raise UnknownIdError(
                f"unknown {self.name} id(s) {unknown} (of {int((rows < 0).sum())}); "
                f"the vocabulary holds {len(self)} ids, e.g. {self.ids[:3].tolist()}"
            )
        return rows

    def row(self, external_id: int) -> int:
        return int(self.rows([external_id])[0])

    def external(self, rows: Any) -> np.ndarray:
        """External ids of ``rows``; row -1 (padding) maps to id -1."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full(rows.shape, -1, dtype=np.int64)
        valid = rows >= 0
        out[valid] = self.ids[rows[valid]]
        return out

    def fingerprint(self) -> str:
        return fingerprint_arrays(self.ids)

    def to_list(self) -> list[int]:
        return self.ids.tolist()

    def to_json_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ids": self.to_list(), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json_dict(cls, payload: dict[str, Any]) -> IdVocab:
        vocab = cls(np.asarray(payload["ids"], dtype=np.int64), name=payload.get("name", "id"))
        expected = payload.get("fingerprint")
        if expected is not None and expected != vocab.fingerprint():
            from data.errors import ArtifactError

            raise ArtifactError(f"vocabulary {vocab.name!r}: fingerprint mismatch; the file is corrupted")
        return vocab
