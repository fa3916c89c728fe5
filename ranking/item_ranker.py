"""The item-token reranker a pipeline calls: :class:`ItemTokenRanker`.

The same public contract as the title cross-encoder (:class:`~ranking.cross_encoder.CrossEncoderRanker`):
``predict(pairs, batch_size) -> scores``, ``rank(user_or_history, candidates, top_k)``, ``score``,
``score_lists`` (batched offline scoring), ``set_history``, ``save``/``load`` and ``with_backend``, all
under ``torch.inference_mode``; empty input gives empty output; ids outside the catalogue raise
:class:`~data.errors.UnknownIdError` naming them. A request is one pass (:attr:`ItemTokenRanker.mode` is
``"one_pass"``): the history runs once (its keys/values are cached per user, LRU, keyed by the history's
content so a changed history is never stale) and every candidate attends to it and to itself.

New items (:meth:`ItemTokenRanker.add_items`) get content features from the same text model and no id
embedding, so they score from content alone.

**Hybrid head**: a fitted :class:`~ranking.blend.HybridBlend` over this model's score and the retrieval
score and rank may travel in the manifest (``meta["hybrid_head"]``, :meth:`ItemTokenRanker.set_hybrid_head`);
the recommender then serves that blend. It is fitted on validation lists the model never trained on
(:func:`ranking.item_trainer.fit_hybrid_head`), because a retrieval score of a training position is
in-sample (the retriever trained on that event) and would teach the head to trust retrieval too much.
A head that reads the co-visitation feature needs the ranker's :attr:`ItemTokenRanker.covisit` counts
(:mod:`retrieval.covisit`), saved beside the weights as ``covisit.safetensors`` (checksummed in the manifest,
with their own item vocabulary).

Saved form (written atomically): ``model.safetensors`` (every weight and the item feature buffers) and
``manifest.json`` (config, encoder config, item vocabulary, how many items have ids, genre names, tensor
names and checksums). Loading rebuilds the model from the manifest and loads every tensor strictly; any
mismatch raises :class:`~data.errors.ArtifactError`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.dataset import ITEM, USER, Interactions
from data.errors import ArtifactError, ConfigError, DataValidationError, UnknownIdError
from data.io import atomic_path, file_checksums, library_versions, read_manifest, write_manifest
from data.vocab import IdVocab
from ranking.backends import inference_scope
from ranking.history_cache import cached_history
from ranking.item_config import ItemTokenConfig
from ranking.item_model import (
    ItemFeatureTable,
    ItemHistoryState,
    ItemInputs,
    ItemTokenModel,
    build_encoder,
    encoder_from_dict,
    history_tensor,
    id_init,
)
from ranking.weights import load_checked, merged_state_dict

RANKER_KIND = "item_token_ranker"
MODEL_FILE = "model.safetensors"
#: The co-visitation counts the hybrid head may read (:mod:`retrieval.covisit`), when the ranker carries them.
COVISIT_FILE = "covisit.safetensors"
#: Backends of the item-token ranker and their tolerance against fp32 (max |score difference| in units of
#: max(1, std of the fp32 scores)).
ITEM_BACKENDS = {"torch": 1e-5, "torch-int8": 0.15}
#: Candidates of one request scored in one pass (a bound on memory only).
MAX_PASS = 512


def _is_user_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def item_features(item_table: Any, items: IdVocab, config: ItemTokenConfig,
                  genre_names: Sequence[str] | None = None) -> ItemFeatureTable:
    """Content features of ``items`` from ``item_table`` (``title``, ``genres``, ``year``): the MiniLM text
    embedding of ``"title | genres"`` (cached on disk), genres multi-hot, year bucket. ``genre_names`` fixes
    the genre vocabulary (pass the fitted one for new items)."""
    from retrieval.item_features import build_item_features, default_cache_dir, item_rows_table

    cache = None if config.text_cache_dir == "" else (config.text_cache_dir or default_cache_dir())
    features = build_item_features(
        item_rows_table(item_table, items), genre_names=genre_names, use_genres=config.use_genres,
        year_bucket_years=config.year_bucket_years, use_year=config.use_year,
        text_model=config.text_model if config.use_text else "", text_dim=0, text_cache_dir=cache)
    return ItemFeatureTable(text=features.text, genres=features.genres, year_bucket=features.year_bucket,
                            genre_names=tuple(features.genre_names))


class ItemBackend:
    """What runs the model: fp32 torch, or a copy whose encoder layers are dynamic int8 ``nn.Linear``
    (``torch-int8``: per-channel int8 weights, activations quantized per pass; item inputs and head fp32).

    Attributes:
        name: ``"torch"`` or ``"torch-int8"``.
        threads: ``torch.set_num_threads`` while scoring (0 leaves it alone).
        tolerance: see :data:`ITEM_BACKENDS`.
    """

    def __init__(self, model: ItemTokenModel, name: str = "torch", threads: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if name not in ITEM_BACKENDS:
            raise ConfigError(f"backend must be one of {list(ITEM_BACKENDS)} for an item-token ranker, got {name!r}")
        self.name, self.threads, self.device = name, threads, torch.device(device)
        self.tolerance = ITEM_BACKENDS[name]
        if name == "torch-int8":
            if self.device.type != "cpu":
                raise ConfigError("backend 'torch-int8' runs on the CPU only; use 'torch' on a GPU")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            model = copy.deepcopy(model).to("cpu").eval()
            with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
                warnings.simplefilter("ignore")
                model.bert = quantize_dynamic(model.bert, {nn.Linear: per_channel_dynamic_qconfig},
                                              dtype=torch.qint8)
        self.model = model

    def scope(self) -> contextlib.AbstractContextManager[None]:
        return inference_scope(self.model, self.threads)

    def encode_history(self, rows: torch.Tensor, mask: torch.Tensor) -> ItemHistoryState:
        with self.scope():
            return self.model.encode_history(rows.to(self.device), mask.to(self.device))

    def score(self, state: ItemHistoryState, rows: torch.Tensor) -> np.ndarray:
        with self.scope():
            return self.model.score(state, rows.to(self.device)).float().cpu().numpy()


class ItemTokenRanker:
    """Scores and reranks candidates for a history with the item-token model; see the module docstring.

    Args:
        model: the model (adapters merged).
        items: the catalogue vocabulary (row ``i`` is model item row ``i``).
        config: the model config.
        encoder_config: the encoder's Hugging Face config as a dict (saved, to rebuild it).
        genre_names: the genre vocabulary of the item features (for new items).
        meta: anything to keep in the manifest (training log, hybrid head, metrics).
        device: where scoring runs.
    """

    kind = "item_tokens"
    mode = "one_pass"

    def __init__(self, model: ItemTokenModel, items: IdVocab, config: ItemTokenConfig, *,
                 encoder_config: dict[str, Any], genre_names: Sequence[str] = (), meta: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        if model.items.n_items != len(items):
            raise ConfigError(f"the model has {model.items.n_items} item rows for a vocabulary of {len(items)}")
        self.model = model.eval()
        self.items = items
        self.config = config
        self.encoder_config = dict(encoder_config)
        self.genre_names = tuple(genre_names)
        self.meta = dict(meta or {})
        self.device = torch.device(device)
        self.backend = ItemBackend(model, "torch", config.threads, device)
        #: co-visitation counts for the hybrid head's ``"covisit"`` feature (:mod:`retrieval.covisit`), or None
        self.covisit: Any = None
        self._histories: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[Any, tuple[bytes, ItemHistoryState]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, item_table: Any, items: IdVocab, config: ItemTokenConfig | None = None, *,
              item_vectors: tuple[np.ndarray, IdVocab] | None = None, seed: int = 0,
              features: ItemFeatureTable | None = None, device: str | torch.device = "cpu") -> ItemTokenRanker:
        """A new (untrained) ranker over catalogue ``items``, seeded.

        ``item_vectors`` (``(vectors, their id vocabulary)``, e.g. ``retriever.item_embeddings()``)
        initialise the id embeddings of the items they cover (others keep the random init).
        ``features`` skips computing the content features (tests)."""
        from retrieval.item_features import n_year_buckets

        config = config or ItemTokenConfig()
        features = features if features is not None else item_features(item_table, items, config)
        if len(features) != len(items):
            raise DataValidationError(f"features cover {len(features)} items, the catalogue has {len(items)}")
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            encoder = build_encoder(config)
            hidden = int(encoder.config.hidden_size)
            buckets = n_year_buckets(config.year_bucket_years) if config.use_year else 1
            inputs = ItemInputs(features, len(items), config, hidden, buckets)
            model = ItemTokenModel(inputs, encoder, config.max_history, config.head_hidden, config.norm)
        finally:
            torch.random.set_rng_state(state)
        if item_vectors is not None and config.use_ids:
            vectors, vocab = item_vectors
            rows = vocab.rows(items.ids, missing="ignore")
            known = rows >= 0
            if known.any():
                init = model.items.ids.weight.detach().numpy().copy()
                init[known] = id_init(np.asarray(vectors)[rows[known]], config.id_dim)
                with torch.no_grad():
                    model.items.ids.weight.copy_(torch.as_tensor(init))
        return cls(model.to(device), items, config, encoder_config=_encoder_dict(encoder),
                   genre_names=features.genre_names, device=device)

    def with_backend(self, name: str, *, threads: int = 0, device: str = "cpu",
                     cache_dir: str | Path | None = None) -> ItemTokenRanker:
        """A ranker sharing this one's model, catalogue and histories, scoring with backend ``name``
        (``"torch"`` or ``"torch-int8"``), with its own empty history cache. This ranker is unchanged."""
        ranker = copy.copy(self)
        ranker.backend = ItemBackend(self.model, name, threads or self.config.threads, device)
        ranker._cache = OrderedDict()
        ranker.cache_hits = ranker.cache_misses = 0
        return ranker

    # ---- what the pipeline reads ----------------------------------------------------------------
    @property
    def pass_size(self) -> int:
        """Candidates one forward pass of a request scores (a whole request is one pass)."""
        return MAX_PASS

    @property
    def max_history_items(self) -> int:
        """Most history items a request reads."""
        return int(self.config.max_history)

    @property
    def hybrid_head(self) -> dict[str, Any] | None:
        """The fitted hybrid head (a :class:`~ranking.blend.HybridBlend` as a dict), or ``None``."""
        return self.meta.get("hybrid_head")

    @property
    def head_m(self) -> int | None:
        """The shortlist size the hybrid head was chosen for on validation (``None`` without a head)."""
        head = self.hybrid_head
        return int(head["report"]["m"]) if head and "m" in head.get("report", {}) else None

    def set_hybrid_head(self, blend: Any) -> ItemTokenRanker:
        """Carry ``blend`` (a fitted :class:`~ranking.blend.HybridBlend`, or ``None`` to drop it) in the
        manifest, so the recommender serves it with this ranker."""
        if blend is None:
            self.meta.pop("hybrid_head", None)
        else:
            self.meta["hybrid_head"] = blend.to_dict()
        return self

    def candidate_lengths(self) -> np.ndarray:
        """Input tokens per item row as a candidate (one: a token is an item)."""
        return np.ones(len(self.items), dtype=np.float64)

    def history_token_count(self, rows: np.ndarray) -> int:
        """Input tokens a history of ``rows`` costs (the last ``max_history`` items)."""
        return int(min(np.asarray(rows).size, self.config.max_history))

    def request_shape(self, user_or_history: Any, candidates: Any) -> dict[str, int]:
        """What a request costs in tokens: ``history_tokens``, ``candidates`` and ``candidate_tokens``."""
        rows = self._candidate_rows(candidates)
        history = self._history_rows(user_or_history)[0]
        return {"history_tokens": self.history_token_count(history), "candidates": int(rows.size),
                "candidate_tokens": int(rows.size)}

    # ---- histories ------------------------------------------------------------------------------
    def set_history(self, data: Interactions) -> ItemTokenRanker:
        """Take every user's history (item ids in time order) from ``data``; events on items outside the
        catalogue are skipped."""
        frame = data.sorted_frame()
        frame = frame[frame[ITEM].isin(self.items.ids)]
        self._histories = {int(u): g.to_numpy(dtype=np.int64) for u, g in frame.groupby(USER, sort=False)[ITEM]}
        return self

    def history_of(self, user_id: int) -> np.ndarray:
        """The stored history of ``user_id`` (item ids, oldest first; empty for a user never seen)."""
        return self._histories.get(int(user_id), np.empty(0, dtype=np.int64))

    def _rows(self, ids: np.ndarray, what: str) -> np.ndarray:
        rows = self.items.rows(ids, missing="ignore")
        if (rows < 0).any():
            bad = np.asarray(ids)[rows < 0][:5].tolist()
            raise UnknownIdError(f"{what}: unknown item id(s) {bad}; this ranker's catalogue has {len(self.items)} "
                                 "items (add new ones with add_items)")
        return rows

    def _history_rows(self, user_or_history: Any) -> tuple[np.ndarray, Any]:
        """``(item rows oldest first, cache key)`` of a user id or an explicit history of item ids."""
        if _is_user_id(user_or_history):
            ids = self.history_of(int(user_or_history))
            rows = self.items.rows(ids, missing="ignore")
            return rows[rows >= 0], ("user", int(user_or_history))
        values = np.asarray(user_or_history)
        if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
            raise DataValidationError(
                f"user_or_history must be a user id or a 1-D sequence of integer item ids (oldest first); got "
                f"{values.dtype} of shape {values.shape}"
            )
        rows = self._rows(values.astype(np.int64), "history") if values.size else np.empty(0, np.int64)
        kept = rows[-self.config.max_history:]
        return rows, ("history", hashlib.blake2b(kept.tobytes(), digest_size=16).digest())

    def _candidate_rows(self, candidates: Any) -> np.ndarray:
        values = np.asarray(candidates)
        if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
            raise DataValidationError(f"candidates must be a 1-D sequence of integer item ids, got shape "
                                      f"{values.shape}")
        if values.size == 0:
            return np.empty(0, dtype=np.int64)
        return self._rows(values.astype(np.int64), "candidates")

    def _state(self, rows: np.ndarray, key: Any) -> ItemHistoryState:
        kept = np.ascontiguousarray(rows[-self.config.max_history:], dtype=np.int64)
        digest = hashlib.blake2b(kept.tobytes(), digest_size=16).digest()
        state, hit = cached_history(self._cache, self.config.kv_cache_users, key, digest,
                                    lambda: self.backend.encode_history(*history_tensor([kept], self.config.max_history)))
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        return state

    def clear_cache(self) -> None:
        self._cache.clear()

    # ---- scoring --------------------------------------------------------------------------------
    def _score_rows(self, history: np.ndarray, key: Any, rows: np.ndarray, batch_size: int | None = None
                    ) -> np.ndarray:
        if rows.size == 0:
            return np.empty(0, dtype=np.float32)
        state = self._state(history, key)
        size = batch_size or self.pass_size
        out = np.empty(rows.size, dtype=np.float32)
        for start in range(0, rows.size, size):
            chunk = torch.as_tensor(rows[start:start + size][None, :])
            out[start:start + size] = self.backend.score(state, chunk)[0]
        return out

    def score(self, user_or_history: Any, candidates: Any) -> np.ndarray:
        """Scores of ``candidates`` (in their order) for a user id or a history of item ids."""
        rows = self._candidate_rows(candidates)
        if rows.size == 0:
            return np.empty(0, dtype=np.float32)
        history, key = self._history_rows(user_or_history)
        return self._score_rows(history, key, rows)

    def rank(self, user_or_history: Any, candidates: Any, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids, scores)`` of ``candidates`` sorted by score, best first, cut to ``top_k``; ties keep
        the candidates' order; empty ``candidates`` give two empty arrays."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise DataValidationError(f"top_k must be a positive integer or None, got {top_k!r}")
        scores = self.score(user_or_history, candidates)
        if scores.size == 0:
            return np.empty(0, dtype=np.int64), scores
        order = np.argsort(-scores, kind="stable")[:top_k]
        return np.asarray(candidates, dtype=np.int64)[order], scores[order]

    def predict(self, pairs: Sequence[tuple[Any, int]], batch_size: int | None = None) -> np.ndarray:
        """Scores of ``(user_or_history, item_id)`` pairs, in input order. Pairs sharing a history run in
        one pass (``batch_size`` caps the candidates per pass); a score never depends on the other pairs."""
        pairs = list(pairs)
        if not pairs:
            return np.empty(0, dtype=np.float32)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise DataValidationError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        rows = self._candidate_rows(np.asarray([p[1] for p in pairs]))
        groups: dict[Any, tuple[np.ndarray, Any, list[int]]] = {}
        for i, (history, _) in enumerate(pairs):
            h_rows, key = self._history_rows(history)
            groups.setdefault(key, (h_rows, key, []))[2].append(i)
        out = np.empty(len(pairs), dtype=np.float32)
        for h_rows, key, members in groups.values():
            index = np.asarray(members)
            out[index] = self._score_rows(h_rows, key, rows[index], batch_size)
        return out

    def score_lists(self, histories: Sequence[Any], candidates: np.ndarray, *, progress: bool = False,
                    desc: str = "rerank") -> np.ndarray:
        """``(n, M)`` scores of candidate item ids (``-1`` pads, scored ``-inf``) for ``n`` histories (item
        ids oldest first, or user ids): batched offline scoring, ``config.batch_size`` lists per pass."""
        from tqdm.auto import tqdm

        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or candidates.shape[0] != len(histories):
            raise DataValidationError(f"candidates must be a (n, M) array with one row per history; got "
                                      f"{candidates.shape} for {len(histories)} histories")
        out = np.full(candidates.shape, -np.inf, dtype=np.float32)
        if candidates.size == 0:
            return out
        valid = candidates >= 0
        rows = np.zeros(candidates.shape, dtype=np.int64)
        rows[valid] = self._rows(candidates[valid], "candidates")
        history_rows = [self._history_rows(h)[0] for h in histories]
        step = self.config.batch_size
        for start in tqdm(range(0, len(history_rows), step), desc=desc, disable=not progress, unit="batch"):
            stop = min(start + step, len(history_rows))
            h_rows, h_mask = history_tensor(history_rows[start:stop], self.config.max_history)
            state = self.backend.encode_history(h_rows, h_mask)
            scores = self.backend.score(state, torch.as_tensor(rows[start:stop]))
            out[start:stop] = np.where(valid[start:stop], scores, -np.inf)
        return out

    # ---- new items ------------------------------------------------------------------------------
    def add_items(self, item_table: Any) -> ItemTokenRanker:
        """Add items (rows of an item table with ``item_id``, ``title``, ``genres``, ``year``) to the
        catalogue: their content features come from the same text model, and they have no id embedding, so
        they score from content alone. Raises for ids already in the catalogue."""
        new_ids = np.asarray(item_table[ITEM], dtype=np.int64)
        clash = [int(i) for i in new_ids if i in self.items]
        if clash:
            raise DataValidationError(f"add_items: item ids {clash[:5]} are already in the catalogue; pass new "
                                      "items only")
        vocab = IdVocab(new_ids, name="item")
        features = item_features(item_table, vocab, self.config, genre_names=self.genre_names)
        inputs = self.model.items
        device = inputs.year_bucket.device
        inputs.text = torch.cat([inputs.text, torch.as_tensor(features.text, device=device)])
        inputs.genres = torch.cat([inputs.genres, torch.as_tensor(features.genres, device=device)])
        inputs.year_bucket = torch.cat([inputs.year_bucket, torch.as_tensor(features.year_bucket, device=device)])
        self.items = IdVocab(np.concatenate([self.items.ids, new_ids]), name=self.items.name)
        self.backend = ItemBackend(self.model, self.backend.name, self.backend.threads, self.backend.device)
        self.clear_cache()
        return self

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        """Write the ranker to ``folder`` atomically (see the module docstring)."""
        from safetensors.torch import save_file

        state = merged_state_dict(self.model)
        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(state, str(tmp / MODEL_FILE))
            files = [MODEL_FILE]
            extra: dict[str, Any] = {}
            if self.covisit is not None:
                from safetensors.numpy import save_file as save_numpy

                save_numpy(self.covisit.to_tensors(), str(tmp / COVISIT_FILE))
                files.append(COVISIT_FILE)
                extra["covisit"] = self.covisit.to_manifest()
            write_manifest(tmp, {
                "kind": RANKER_KIND,
                "config": self.config.to_dict(),
                "encoder_config": self.encoder_config,
                "items": self.items.to_json_dict(),
                "n_id_items": self.model.items.n_id_items,
                "genre_names": list(self.genre_names),
                "tensor_names": sorted(state),
                "metrics": metrics or {},
                "meta": self.meta,
                "versions": library_versions(),
                **extra,
                "files": file_checksums(tmp, files),
            })
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> ItemTokenRanker:
        """Load a folder written by :meth:`save`; a manifest that does not match the files raises
        :class:`~data.errors.ArtifactError`."""
        from retrieval.item_features import n_year_buckets

        folder = Path(folder)
        manifest = read_manifest(folder, kind=RANKER_KIND)
        if MODEL_FILE not in manifest.get("files", {}):
            raise ArtifactError(f"{folder}: the manifest does not checksum {MODEL_FILE}; re-create the artifact")
        try:
            config = ItemTokenConfig.from_dict(manifest["config"])
            items = IdVocab.from_json_dict(manifest["items"])
            n_id_items = int(manifest["n_id_items"])
            genre_names = tuple(manifest["genre_names"])
            encoder = encoder_from_dict(manifest["encoder_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{folder}: manifest is incomplete or inconsistent ({exc}); re-create the "
                                "artifact") from exc
        state = load_checked(folder, MODEL_FILE, manifest)
        try:
            features = ItemFeatureTable(text=state["items.text"].numpy(), genres=state["items.genres"].numpy(),
                                        year_bucket=state["items.year_bucket"].numpy(), genre_names=genre_names)
            buckets = n_year_buckets(config.year_bucket_years) if config.use_year else 1
            inputs = ItemInputs(features, n_id_items, config, int(encoder.config.hidden_size), buckets)
            model = ItemTokenModel(inputs, encoder, config.max_history, config.head_hidden, config.norm)
            model.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, ConfigError) as exc:
            raise ArtifactError(f"{folder}: the weights do not fit the manifest ({exc}); nothing is "
                                "re-initialised silently, so the artifact is refused; re-create it") from exc
        ranker = cls(model.to(device), items, config, encoder_config=manifest["encoder_config"],
                     genre_names=genre_names, meta=manifest.get("meta", {}), device=device)
        ranker.meta["metrics"] = manifest.get("metrics", {})
        if "covisit" in manifest:
            from safetensors.numpy import load_file

            from retrieval.covisit import Covisitation

            if COVISIT_FILE not in manifest.get("files", {}):
                raise ArtifactError(f"{folder}: the manifest does not checksum {COVISIT_FILE}; re-create the artifact")
            try:
                tensors = load_file(str(folder / COVISIT_FILE))
            except Exception as exc:
                raise ArtifactError(f"{folder / COVISIT_FILE}: cannot read it ({exc}); re-create the artifact") from exc
            ranker.covisit = Covisitation.from_tensors(tensors, manifest["covisit"], str(folder))
        return ranker


def _encoder_dict(encoder: nn.Module) -> dict[str, Any]:
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
            "layer_norm_eps", "vocab_size", "initializer_range")
    values = encoder.config.to_dict()
    return {k: values[k] for k in keep if k in values}


__all__ = ["ITEM_BACKENDS", "RANKER_KIND", "ItemBackend", "ItemTokenRanker", "item_features"]
