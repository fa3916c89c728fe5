"""The reranker a pipeline calls: :class:`CrossEncoderRanker`.

It owns a :class:`~ranking.encoder.CrossEncoder` (adapters merged), the pre-tokenized catalogue
(:class:`~ranking.text.ItemTokens`), the users' histories, and an LRU cache of history keys/values for the
one-pass mode. Scoring never tokenizes a string and always runs under ``torch.inference_mode``.

Histories are external item ids oldest first (the order of :class:`~data.dataset.Interactions`); a user
id stands for the history set with :meth:`CrossEncoderRanker.set_history` (an unknown user has an empty
history). Candidates are external item ids; ids outside the catalogue raise
:class:`~data.errors.UnknownIdError` naming them.

Saved form (:meth:`~CrossEncoderRanker.save`, written atomically): ``model.safetensors`` (the merged
encoder and the head, every tensor), ``item_tokens.safetensors``, ``tokenizer/`` and ``manifest.json``
(ranker config, encoder config, base model, item vocabulary, special tokens, checksums). Loading rebuilds
the encoder from its config and loads every tensor strictly, so nothing (the head in particular) is ever
silently re-initialised; a manifest that does not match the tensors raises
:class:`~data.errors.ArtifactError`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.dataset import ITEM, USER, Interactions
from data.errors import ArtifactError, ConfigError, DataValidationError
from data.io import atomic_path, file_checksums, library_versions, read_manifest, write_manifest
from data.vocab import IdVocab
from ranking.backends import ScoringBackend, TorchBackend, make_backend
from ranking.config import RankerConfig
from ranking.encoder import CrossEncoder, encoder_from_config, load_base
from ranking.history_cache import cached_history
from ranking.inputs import candidate_batch, history_batch, length_buckets, pairwise_batch
from ranking.scoring import score_lists
from ranking.text import ItemTokens, SpecialTokens
from ranking.weights import load_checked, merged_state_dict

log = logging.getLogger(__name__)

RANKER_KIND = "cross_encoder"
MODEL_FILE = "model.safetensors"
TOKENS_FILE = "item_tokens.safetensors"
TOKENIZER_DIR = "tokenizer"


def _is_user_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


#: Most candidates of one one-pass request scored in a single forward pass.
ONE_PASS_MAX_BUCKET = 256


class CrossEncoderRanker:
    """Scores and reranks candidate items for a user's history; see the module docstring.

    The *title* variant of the reranker (its tokens are words of item titles); the item-token variant is
    :class:`~ranking.item_ranker.ItemTokenRanker`, with the same public contract.

    Args:
        model: the cross-encoder (adapters merged).
        tokens: the pre-tokenized catalogue.
        config: the ranker config (its ``mode`` is the mode the model was trained for).
        encoder_config: the encoder's Hugging Face config as a dict (saved, to rebuild it).
        tokenizer: the tokenizer (saved beside the model); optional once ``tokens`` exist.
        meta: anything to keep in the manifest (training log, metrics).
        device: where scoring runs.
    """

    def __init__(self, model: CrossEncoder, tokens: ItemTokens, config: RankerConfig, *,
                 encoder_config: dict[str, Any], tokenizer: Any = None, meta: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.tokens = tokens
        self.config = config
        self.encoder_config = dict(encoder_config)
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.backend: ScoringBackend = TorchBackend(model, device, config.threads)
        self._histories: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[Any, tuple[bytes, Any]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        needed = config.text.history_tokens + config.text.item_tokens + 1
        if needed > model.max_positions:
            raise ConfigError(
                f"history_tokens + item_tokens + 1 = {needed} exceeds the encoder's {model.max_positions} "
                "positions; lower TextConfig.history_tokens or item_tokens"
            )

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, item_table: Any, items: IdVocab, config: RankerConfig | None = None, *, seed: int = 0,
              encoder: torch.nn.Module | None = None, tokenizer: Any = None,
              device: str | torch.device = "cpu") -> CrossEncoderRanker:
        """A new ranker over catalogue ``items``: the base encoder (``config.base_model``, or ``encoder`` and
        ``tokenizer`` given directly) with a freshly initialised head (seeded), and every item's text
        tokenized once from ``item_table``."""
        config = config or RankerConfig()
        if encoder is None:
            encoder, tokenizer, _ = load_base(config.base_model)
        elif tokenizer is None:
            raise ConfigError("build: pass the tokenizer together with the encoder")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = CrossEncoder(encoder, config.head_hidden, config.head_dropout, config.pairwise_pooling).to(device)
        torch.random.set_rng_state(generator_state)
        tokens = ItemTokens.build(item_table, items, tokenizer, config.text)
        return cls(model, tokens, config, encoder_config=encoder.config.to_dict(), tokenizer=tokenizer,
                   device=device)

    def with_backend(self, name: str, *, threads: int = 0, device: str = "cpu",
                     cache_dir: str | Path | None = None) -> CrossEncoderRanker:
        """A ranker sharing this one's model, tokens, config and histories but scoring with backend ``name``
        (see :func:`ranking.backends.make_backend`; ``threads`` 0 means ``config.threads``), with its own
        empty KV cache (cached states are backend specific). This ranker is unchanged."""
        ranker = copy.copy(self)
        ranker.backend = make_backend(name, self.model, threads=threads or self.config.threads, device=device,
                                      cache_dir=cache_dir)
        ranker._cache = OrderedDict()
        ranker.cache_hits = ranker.cache_misses = 0
        return ranker

    kind = "title"

    @property
    def items(self) -> IdVocab:
        return self.tokens.items

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def max_history_items(self) -> int:
        """Most history items a request reads."""
        return int(self.config.text.history_items)

    @property
    def hybrid_head(self) -> dict[str, Any] | None:
        """A fitted hybrid blend carried in the manifest (``meta["hybrid_head"]``), or ``None``."""
        return self.meta.get("hybrid_head")

    def candidate_lengths(self) -> np.ndarray:
        """Input tokens per item row as a candidate (its text cut to ``item_tokens``, plus ``[SEP]``)."""
        return np.array([self.tokens.candidate(r).size for r in range(len(self.items))], dtype=np.float64)

    def history_token_count(self, rows: np.ndarray) -> int:
        """Input tokens a history of item ``rows`` (oldest first) costs."""
        return int(self.tokens.history(np.asarray(rows, dtype=np.int64)).size)

    def add_items(self, item_table: Any) -> CrossEncoderRanker:
        """Add items (rows of an item table with ``item_id``, ``title``, ``genres``, ``year``): their text is
        tokenized with the saved tokenizer, so they score from content like any other item. Raises for ids
        already in the catalogue, or when the ranker was loaded without its tokenizer."""
        from ranking.text import ItemTokens

        if self.tokenizer is None:
            raise ConfigError("add_items needs the tokenizer; load the ranker with load_tokenizer=True")
        new_ids = np.asarray(item_table[ITEM], dtype=np.int64)
        clash = [int(i) for i in new_ids if i in self.items]
        if clash:
            raise DataValidationError(f"add_items: item ids {clash[:5]} are already in the catalogue; pass new "
                                      "items only")
        added = ItemTokens.build(item_table, IdVocab(new_ids, name="item"), self.tokenizer, self.tokens.config)
        old = self.tokens
        flat = np.concatenate([old.flat, added.flat])
        offsets = np.concatenate([old.offsets, old.offsets[-1] + added.offsets[1:]])
        items = IdVocab(np.concatenate([old.items.ids, new_ids]), name=old.items.name)
        self.tokens = ItemTokens(items, flat, offsets, old.special, old.config)
        self.clear_cache()
        return self

    # ---- histories ------------------------------------------------------------------------------
    def set_history(self, data: Interactions) -> CrossEncoderRanker:
        """Take every user's history (item ids in time order) from ``data``; events on items outside the
        catalogue are skipped. Cached keys/values of users whose history changed are recomputed on use."""
        frame = data.sorted_frame()
        frame = frame[frame[ITEM].isin(self.items.ids)]
        self._histories = {int(u): g.to_numpy(dtype=np.int64) for u, g in frame.groupby(USER, sort=False)[ITEM]}
        return self

    def history_of(self, user_id: int) -> np.ndarray:
        """The stored history of ``user_id`` (empty for a user never seen)."""
        return self._histories.get(int(user_id), np.empty(0, dtype=np.int64))

    def _history(self, user_or_history: Any) -> tuple[np.ndarray, Any]:
        """``(history token ids, cache key)`` of a user id or an explicit history of item ids."""
        if _is_user_id(user_or_history):
            rows = self.items.rows(self.history_of(int(user_or_history)), missing="ignore")
            return self.tokens.history(rows[rows >= 0]), ("user", int(user_or_history))
        values = np.asarray(user_or_history)
        if values.ndim != 1:
            raise DataValidationError(
                f"user_or_history must be a user id or a 1-D sequence of item ids (oldest first); got shape "
                f"{values.shape}"
            )
        rows = self.tokens.rows(values.astype(np.int64) if values.size else np.empty(0, np.int64), "history")
        ids = self.tokens.history(rows)
        return ids, ("history", hashlib.blake2b(ids.tobytes(), digest_size=16).digest())

    def _state(self, history_ids: np.ndarray, key: Any) -> Any:
        """History keys/values from the LRU cache, computed when missing or when the history changed."""
        digest = hashlib.blake2b(history_ids.tobytes(), digest_size=16).digest()
        state, hit = cached_history(self._cache, self.config.kv_cache_users, key, digest,
                                    lambda: self.backend.encode_history(*history_batch([history_ids],
                                                                                       self.tokens.special.pad)))
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        return state

    def clear_cache(self) -> None:
        self._cache.clear()

    # ---- scoring --------------------------------------------------------------------------------
    def _candidate_rows(self, candidates: Any) -> np.ndarray:
        values = np.asarray(candidates)
        if values.ndim != 1:
            raise DataValidationError(f"candidates must be a 1-D sequence of item ids, got shape {values.shape}")
        if values.size == 0:
            return np.empty(0, dtype=np.int64)
        return self.tokens.rows(values, "candidate")

    def _score_rows(self, history_ids: np.ndarray, key: Any, rows: np.ndarray,
                    batch_size: int | None = None) -> np.ndarray:
        """Scores of candidate item ``rows`` for one history, in length-sorted buckets."""
        if rows.size == 0:
            return np.empty(0, dtype=np.float32)
        pad = self.tokens.special.pad
        candidates = self.tokens.candidates(rows)
        out = np.empty(rows.size, dtype=np.float32)
        buckets = length_buckets([c.size for c in candidates], batch_size or self.pass_size)
        if self.mode == "pairwise":
            for index in buckets:
                batch = pairwise_batch([history_ids] * index.size, [candidates[i] for i in index], pad)
                out[index] = self.backend.score_pairs(batch)
            return out
        state = self._state(history_ids, key)
        for index in buckets:
            ids, mask = candidate_batch([candidates[i] for i in index], pad)
            out[index] = self.backend.score_candidates(state, ids, mask)
        return out

    @property
    def pass_size(self) -> int:
        """Most candidates one forward pass of a request scores: ``config.bucket_size`` in the pairwise mode;
        in the one-pass mode all of a request's candidates share one history and one pass over all of them
        is fastest (measured at M=50), so ``ONE_PASS_MAX_BUCKET`` (or a larger ``bucket_size``) only bounds
        memory. The latency model counts forward passes with it."""
        if self.mode == "pairwise":
            return self.config.bucket_size
        return max(self.config.bucket_size, ONE_PASS_MAX_BUCKET)

    def request_shape(self, user_or_history: Any, candidates: Any) -> dict[str, int]:
        """What a request costs in tokens (what a latency model reads): ``history_tokens``, ``candidates``
        and ``candidate_tokens`` (their total, ``[SEP]`` included)."""
        rows = self._candidate_rows(candidates)
        history_ids, _ = self._history(user_or_history)
        lengths = [c.size for c in self.tokens.candidates(rows)]
        return {"history_tokens": int(history_ids.size), "candidates": int(rows.size),
                "candidate_tokens": int(sum(lengths))}

    def score(self, user_or_history: Any, candidates: Any) -> np.ndarray:
        """Scores of ``candidates`` (in their order) for a user id or a history of item ids."""
        rows = self._candidate_rows(candidates)
        if rows.size == 0:
            return np.empty(0, dtype=np.float32)
        history_ids, key = self._history(user_or_history)
        return self._score_rows(history_ids, key, rows)

    def rank(self, user_or_history: Any, candidates: Any, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids, scores)`` of ``candidates`` sorted by score, best first, cut to ``top_k``.

        Ties keep the candidates' order. Empty ``candidates`` give two empty arrays.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise DataValidationError(f"top_k must be a positive integer or None, got {top_k!r}")
        ids = np.asarray(candidates)
        scores = self.score(user_or_history, candidates)
        if scores.size == 0:
            return np.empty(0, dtype=np.int64), scores
        order = np.argsort(-scores, kind="stable")[:top_k]
        return ids.astype(np.int64)[order], scores[order]

    def predict(self, pairs: Sequence[tuple[Any, int]], batch_size: int | None = None) -> np.ndarray:
        """Scores of ``(user_or_history, item_id)`` pairs, in input order.

        Pairs sharing a history are scored together (one history pass in the one-pass mode); a pair's score
        never depends on the other pairs. ``batch_size`` caps the candidates per forward pass (default
        ``config.bucket_size``).
        """
        pairs = list(pairs)
        if not pairs:
            return np.empty(0, dtype=np.float32)
        items = np.asarray([p[1] for p in pairs])
        rows = self._candidate_rows(items)
        groups: dict[bytes, tuple[np.ndarray, Any, list[int]]] = {}
        for i, (history, _) in enumerate(pairs):
            history_ids, key = self._history(history)
            groups.setdefault(history_ids.tobytes(), (history_ids, key, []))[2].append(i)
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise DataValidationError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        out = np.empty(len(pairs), dtype=np.float32)
        for history_ids, key, members in groups.values():
            index = np.asarray(members)
            out[index] = self._score_rows(history_ids, key, rows[index], batch_size)
        return out

    def score_lists(self, histories: Sequence[Any], candidates: np.ndarray, *, progress: bool = False,
                    desc: str = "rerank") -> np.ndarray:
        """``(n, M)`` scores of candidate item ids (``-1`` pads) for ``n`` histories (item ids, oldest first,
        or user ids): batched offline scoring for evaluation; ``-inf`` on padding."""
        candidates = np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or candidates.shape[0] != len(histories):
            raise DataValidationError(
                f"candidates must be a (n, M) array with one row per history; got {candidates.shape} for "
                f"{len(histories)} histories"
            )
        rows = np.full(candidates.shape, -1, dtype=np.int64)
        valid = candidates >= 0
        rows[valid] = self.tokens.rows(candidates[valid], "candidate")
        history_rows = []
        for h in histories:
            ids = self.history_of(int(h)) if _is_user_id(h) else np.asarray(h, dtype=np.int64)
            r = self.items.rows(ids, missing="ignore")
            history_rows.append(r[r >= 0])
        return score_lists(self.backend, self.tokens, self.mode, history_rows, rows,
                           batch_size=self.config.batch_size, progress=progress, desc=desc)

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
        """Write the ranker to ``folder`` atomically (see the module docstring)."""
        from safetensors.numpy import save_file as save_numpy
        from safetensors.torch import save_file

        state = merged_state_dict(self.model)
        folder = Path(folder)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(state, str(tmp / MODEL_FILE))
            save_numpy({k: np.ascontiguousarray(v) for k, v in self.tokens.to_tensors().items()},
                       str(tmp / TOKENS_FILE))
            files = [MODEL_FILE, TOKENS_FILE]
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
                files += sorted(str(p.relative_to(tmp)) for p in (tmp / TOKENIZER_DIR).rglob("*") if p.is_file())
            write_manifest(tmp, {
                "kind": RANKER_KIND,
                "config": self.config.to_dict(),
                "encoder_config": self.encoder_config,
                "base_model": self.config.base_model,
                "special_tokens": self.tokens.special.to_dict(),
                "items": self.items.to_json_dict(),
                "item_tokens_fingerprint": self.tokens.fingerprint(),
                "tensor_names": sorted(state),
                "metrics": metrics or {},
                "meta": self.meta,
                "versions": library_versions(),
                "files": file_checksums(tmp, files),
            })
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu",
             load_tokenizer: bool = True) -> CrossEncoderRanker:
        """Load a folder written by :meth:`save`; a manifest that does not match the files raises
        :class:`~data.errors.ArtifactError`."""
        from safetensors.numpy import load_file as load_numpy

        folder = Path(folder)
        manifest = read_manifest(folder, kind=RANKER_KIND)
        try:
            config = RankerConfig.from_dict(manifest["config"])
            items = IdVocab.from_json_dict(manifest["items"])
            special = SpecialTokens.from_dict(manifest["special_tokens"])
            encoder = encoder_from_config(manifest["encoder_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{folder}: manifest is incomplete or inconsistent ({exc}); re-create the "
                                "artifact") from exc
        model = CrossEncoder(encoder, config.head_hidden, config.head_dropout, config.pairwise_pooling)
        state = load_checked(folder, MODEL_FILE, manifest)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch: the manifest's encoder config is not these weights'
            raise ArtifactError(f"{folder}: the weights do not fit the manifest's encoder config ({exc}); "
                                "re-create the artifact") from exc
        if missing or unexpected:
            raise ArtifactError(
                f"{folder}: weights and model disagree (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                "nothing may be re-initialised silently, so the artifact is refused; re-create it"
            )
        tokens = ItemTokens.from_tensors(load_numpy(str(folder / TOKENS_FILE)), special, config.text, items)
        if tokens.fingerprint() != manifest.get("item_tokens_fingerprint"):
            raise ArtifactError(f"{folder}: item tokens do not match the manifest's fingerprint; re-create it")
        tokenizer = None
        if load_tokenizer and (folder / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
        ranker = cls(model.to(device), tokens, config, encoder_config=manifest["encoder_config"],
                     tokenizer=tokenizer, meta=manifest.get("meta", {}), device=device)
        ranker.meta["metrics"] = manifest.get("metrics", {})
        return ranker
