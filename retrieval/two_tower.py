"""The two-tower retriever: a sequence-aware query tower and a content-aware item tower, served from FAISS.

Training (:meth:`TwoTowerRetriever.fit`) learns both towers with next-item sampled softmax and early
stopping on validation NDCG@10, serving a moving average of the weights (:mod:`retrieval.trainer`); the
item vectors then go into the FAISS index.
At request time the query tower encodes the user's current history (the last ``max_len`` items), so a
new interaction changes the recommendations at once (:meth:`set_history`, :meth:`retrieve_history`), with
no retraining. Users with no history get the popularity fallback. New items are embedded from their
content alone and added to the index with :meth:`add_items`.

Typical use on the protocol::

    model = TwoTowerRetriever().fit(split.history("val"), items=split.items, validation=split)
    model.set_history(split.history("test"))          # the validation item joins the histories
    report = evaluate_retriever(model, split, "test")
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data.config import JsonConfig, require
from data.dataset import ITEM, TIME, USER, Interactions, sequences
from data.errors import ArtifactError, DataValidationError, NotFittedError
from data.protocol import Split
from data.vocab import IdVocab
from retrieval.base import EmbeddingRetriever
from retrieval.index import IndexConfig
from retrieval.item_features import (
    BUNDLED_MINILM,
    ItemFeatures,
    build_item_features,
    default_cache_dir,
    item_rows_table,
    n_year_buckets,
)

log = logging.getLogger(__name__)

_LOSSES = ("sampled_softmax", "full_softmax")

#: The settings that matter, searched on validation by ``shortlist train`` (see
#: :data:`retrieval.registry.SPECS`): the default config first, then the full softmax, then seeded random
#: points of this space.
TWO_TOWER_SEARCH: dict[str, tuple[Any, ...]] = {
    "loss": _LOSSES,
    "n_blocks": (1, 2, 3),
    "dropout": (0.1, 0.2, 0.3),
    "max_len": (100, 200),
    "learning_rate": (1e-3, 3e-3),
    "max_epochs": (20, 30),
}

#: Largest catalogue the search tries the full softmax on: where one training step costs about 3x the
#: sampled softmax's (at most 3.5x). Measured on this machine (``python -m benchmarks.loss_cost``, 1 thread,
#: default config), full/sampled step time: 1.7x at 3,650 items, 3.0x to 3.4x at 6,000 (three runs), 4.7x
#: to 4.9x at 10,000, 7.3x to 7.6x at 25,000, 12x at 100,000 (and the full softmax also trains for more
#: epochs: 30 against 20 on ml-latest-small).
FULL_SOFTMAX_MAX_ITEMS = 6_000


def search_point_allowed(point: dict[str, Any], n_items: int) -> bool:
    """Whether the validation search tries ``point`` on a catalogue of ``n_items``: the exact softmax
    scores every item for every training position, so past :data:`FULL_SOFTMAX_MAX_ITEMS` it costs more
    than the sampled softmax can lose."""
    return point.get("loss") != "full_softmax" or n_items <= FULL_SOFTMAX_MAX_ITEMS


@dataclass
class TwoTowerConfig(JsonConfig):
    """The two-tower retriever: towers, item features, loss, training and serving.

    Attributes:
        dim: embedding size of both towers (the index dimension).
        max_len: most recent history items the query tower reads (and the training window length).
        n_blocks: transformer blocks of the query tower.
        n_heads: attention heads per block (must divide ``dim``).
        ffn_mult: feed-forward hidden size of a block, as a multiple of ``dim``.
        dropout: dropout of the query tower (embeddings, attention, feed-forward).
        id_dropout: probability, per item and training step, of dropping the item's id embedding so its
            content alone must place it (trains the cold-item path).
        use_genres: give the item tower the genres multi-hot.
        use_year: give the item tower the release-year bucket.
        year_bucket_years: width of a year bucket, in years.
        text_model: the text encoder of the item text embedding: ``"bundled-minilm"`` (the bundled
            all-MiniLM-L6-v2), any local Hugging Face folder or hub name, or ``""`` for no text features.
            It runs once per catalogue (cached) and again only for items added later.
        text_dim: the text embedding is projected on its top ``text_dim`` principal directions (fitted on
            the catalogue) before the item tower; 0 keeps the encoder's full width.
        text_batch_size: texts per forward pass of the text encoder.
        text_cache_dir: folder caching text embeddings; ``None`` uses ``$SHORTLIST_CACHE_DIR`` or
            ``~/.cache/shortlist``; ``""`` disables the cache.
        loss: ``"sampled_softmax"`` (in-batch + uniform negatives, logQ correction; the default) or
            ``"full_softmax"`` (exact cross-entropy over the catalogue).
        n_uniform_negatives: uniformly sampled negatives per batch (sampled softmax).
        n_inbatch_negatives: batch positions whose targets serve as negatives (sampled softmax); 0 uses
            every position.
        logq_correction: subtract log Q(item) from the sampled-softmax logits.
        temperature: logits are divided by it.
        batch_size: training windows (user sequences) per step.
        learning_rate: AdamW learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (per-step cosine decay to 0 at ``max_epochs``).
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip; 0 disables.
        ema_epochs: horizon, in epochs, of an exponential moving average of the weights (updated every
            step; ``torch.optim.swa_utils``): validation, early stopping and the served model use the
            average, and training goes on from the raw weights. 0 disables it (the trained weights are
            served). A model saved before this field existed was trained without it and loads with 0.
        max_epochs: most training epochs.
        patience: evaluations without a better validation NDCG@10 before stopping.
        eval_every: epochs between validation evaluations.
        seed: seeds weights, shuffling, dropout and negative sampling.
        threads: ``torch.set_num_threads`` while training and encoding.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"`` (training only;
            serving runs on CPU).
        progress: show progress bars.
        index: the FAISS index of the item vectors (inner product).
    """

    dim: int = 64
    max_len: int = 200
    n_blocks: int = 2
    n_heads: int = 1
    ffn_mult: int = 1
    dropout: float = 0.2
    id_dropout: float = 0.1
    use_genres: bool = True
    use_year: bool = True
    year_bucket_years: int = 5
    text_model: str = BUNDLED_MINILM
    text_dim: int = 64
    text_batch_size: int = 128
    text_cache_dir: str | None = None
    loss: str = "sampled_softmax"
    n_uniform_negatives: int = 256
    n_inbatch_negatives: int = 512
    logq_correction: bool = True
    temperature: float = 1.0
    batch_size: int = 8
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    ema_epochs: float = 1.0
    max_epochs: int = 30
    patience: int = 4
    eval_every: int = 2
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    progress: bool = True
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        for name in ("dim", "max_len", "n_blocks", "n_heads", "year_bucket_years", "text_batch_size",
                     "batch_size", "max_epochs", "patience", "eval_every", "threads", "ffn_mult"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"TwoTowerConfig.{name} must be an integer >= 1, got {value!r}")
        require(isinstance(self.ema_epochs, (int, float)) and not isinstance(self.ema_epochs, bool)
                and self.ema_epochs >= 0, f"TwoTowerConfig.ema_epochs must be a number >= 0 (0 disables the "
                f"weight average), got {self.ema_epochs!r}")
        require(self.dim % self.n_heads == 0,
                f"TwoTowerConfig.n_heads={self.n_heads} must divide dim={self.dim}")
        require(0 <= self.dropout < 1 and 0 <= self.id_dropout <= 1,
                "TwoTowerConfig.dropout must be in [0, 1) and id_dropout in [0, 1]")
        require(self.lr_schedule in ("constant", "cosine"),
                f"TwoTowerConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        require(self.loss in _LOSSES, f"TwoTowerConfig.loss must be one of {list(_LOSSES)}, got {self.loss!r}")
        require(self.text_dim >= 0, f"TwoTowerConfig.text_dim must be >= 0, got {self.text_dim}")
        require(self.n_uniform_negatives >= 0 and self.n_inbatch_negatives >= 0,
                "TwoTowerConfig.n_uniform_negatives and n_inbatch_negatives must be >= 0")
        require(self.temperature > 0, f"TwoTowerConfig.temperature must be > 0, got {self.temperature}")
        require(self.learning_rate > 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
                "TwoTowerConfig.learning_rate must be > 0, weight_decay and grad_clip >= 0")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"TwoTowerConfig.device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")
        require(self.index.metric == "ip",
                "TwoTowerConfig.index.metric must be 'ip': the towers are trained for inner-product scores")
        require(isinstance(self.text_model, str),
                "TwoTowerConfig.text_model must be a string ('' disables text features)")


def leave_last_out(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(rest, last)``: each user's last event (by time, then item) for users with at least 3 events."""
    f = frame.sort_values([USER, TIME, ITEM], kind="stable")
    size = f.groupby(USER)[ITEM].transform("size").to_numpy()
    last = (f.groupby(USER).cumcount(ascending=False).to_numpy() == 0) & (size >= 3)
    return f[~last].reset_index(drop=True), f[last].reset_index(drop=True)


class TwoTowerRetriever(EmbeddingRetriever):
    """Sequence query tower + content item tower; see the module docstring.

    Attributes (after fit/load): ``query_tower``, ``item_tower`` (torch modules on CPU, eval mode),
    ``features`` (:class:`ItemFeatures` of the catalogue), ``item_counts`` (training events per item,
    which drive the item tower's id gate), ``training_log`` (:class:`~retrieval.trainer.TrainingLog`).
    """

    name = "two_tower"
    config_type = TwoTowerConfig

    def __init__(self, config: TwoTowerConfig | None = None) -> None:
        super().__init__(config if config is not None else TwoTowerConfig())
        self.query_tower: Any = None
        self.item_tower: Any = None
        self.features: ItemFeatures | None = None
        self.item_counts: np.ndarray | None = None
        self.training_log: Any = None
        self._sequences: list[np.ndarray] = []
        self._input_table: Any = None
        self._encoder: Any = None
        self._n_id_items = 0

    # ---- learning -------------------------------------------------------------------------------
    def fit(self, data: Interactions, *, items: IdVocab | None = None,
            validation: Split | None = None) -> TwoTowerRetriever:
        """Train on ``data`` and index the item vectors; ``data``'s events become the users' histories.

        Args:
            data: training events (with timestamps; ``data.items`` gives the item content).
            items: the catalogue (default: the items in ``data``).
            validation: a :class:`Split` whose ``history("val")`` is ``data``; training stops early on
                its validation NDCG@10. ``None`` holds out each user's last event of ``data`` for early
                stopping (trained on the rest), then serves with all of ``data`` as history.
        """
        if validation is not None:
            if not isinstance(validation, Split):
                raise DataValidationError(
                    f"validation must be a data.protocol.Split or None, got {type(validation).__name__}"
                )
            if validation.history("val").fingerprint() != data.fingerprint():
                raise DataValidationError(
                    "fit: data is not validation.history('val'); fit on split.history('val') with "
                    "validation=split, or pass validation=None to hold out each user's last event"
                )
        super().fit(data, items=items, validation=validation)
        return self

    def _learn(self, matrix: sp.csr_matrix, *, data: Interactions, validation: Split | None
               ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from retrieval.trainer import ItemInputs, Trainer, torch_threads, training_windows

        c = self.config
        full_frame = data.frame[data.frame[ITEM].isin(self.items.ids)]
        if validation is not None:
            train_frame, split = full_frame, validation
        else:
            train_frame, held_out = leave_last_out(full_frame)
            split = Split(train=data.with_frame(train_frame, name=f"{data.name}:fit"), val=held_out,
                          test=held_out.iloc[:0], users=self.users, items=self.items, kind="internal")
        started = time.perf_counter()
        with torch_threads(c.threads):
            self.features = self._build_features(data.items, self.items)
            train_seqs = sequences(train_frame, self.users, self.items)
            empty = [np.empty(0, np.int64)]
            counts = np.bincount(np.concatenate(train_seqs + empty), minlength=len(self.items))
            target_counts = np.bincount(np.concatenate([s[1:] for s in train_seqs] + empty),
                                        minlength=len(self.items))
            self.item_counts = counts.astype(np.float32)
            self._n_id_items = len(self.items)
            self._sequences = []
            torch.manual_seed(c.seed)
            self._make_towers()
            inputs = ItemInputs.from_numpy(self.features.genres, self.features.year_bucket, self.features.text,
                                           self.item_counts)
            windows_in, windows_out = training_windows(train_seqs, c.max_len)
            if windows_in.shape[0] == 0:
                raise DataValidationError(
                    "fit: no user has two or more training events; the two-tower model learns from "
                    "next-item pairs, so pass longer histories"
                )
            trainer = Trainer(self.query_tower, self.item_tower, self._make_loss(target_counts), inputs, c)
            stage_history = split.history("val")

            def evaluate() -> float:
                from retrieval.evaluate import evaluate_retriever

                self._serve_from(trainer, inputs, stage_history)
                report = evaluate_retriever(self, split, "val", ks=(10,), n_boot=0)
                return report.means["NDCG@10"]

            self.training_log = trainer.fit(windows_in, windows_out, evaluate)
            self.query_tower = trainer.query_tower.cpu().eval()
            self.item_tower = trainer.item_tower.cpu().eval()
            with torch.inference_mode():
                vectors = self.item_tower(*self._item_tensors(inputs)).numpy()
        # back to the fitted history: base.fit set these before _learn; evaluate() changed them
        self.seen = matrix
        self._fingerprint = data.fingerprint()
        self._sequences = sequences(full_frame, self.users, self.items)
        self._set_input_table(vectors)
        log.info("two-tower trained in %.1fs (%s)", time.perf_counter() - started, self.training_log)
        return np.zeros((0, c.dim), dtype=np.float32), vectors

    def _build_features(self, item_table: pd.DataFrame | None, items: IdVocab,
                        fitted: ItemFeatures | None = None) -> ItemFeatures:
        """Features of ``items``; ``fitted`` (the catalogue's) fixes the genre vocabulary and text
        projection, for new items."""
        c = self.config
        cache = None if c.text_cache_dir == "" else (c.text_cache_dir or default_cache_dir())
        return build_item_features(
            item_rows_table(item_table, items),
            genre_names=None if fitted is None else fitted.genre_names,
            use_genres=c.use_genres, year_bucket_years=c.year_bucket_years, use_year=c.use_year,
            text_model=c.text_model, text_dim=c.text_dim,
            text_projection=None if fitted is None else (fitted.text_mean, fitted.text_basis),
            text_batch_size=c.text_batch_size, text_cache_dir=cache, progress=c.progress,
        )

    def _make_towers(self) -> None:
        from retrieval.towers import ItemTower, QueryTower

        c = self.config
        self.item_tower = ItemTower(
            self._n_id_items, c.dim, n_genres=len(self.features.genre_names),
            n_year_buckets=n_year_buckets(c.year_bucket_years) if c.use_year else 1,
            text_dim=self.features.text_dim, id_dropout=c.id_dropout,
        )
        self.query_tower = QueryTower(c.dim, max_len=c.max_len, n_blocks=c.n_blocks, n_heads=c.n_heads,
                                      dropout=c.dropout, ffn_mult=c.ffn_mult)

    def _make_loss(self, counts: np.ndarray) -> Any:
        import torch

        from retrieval.losses import FullSoftmaxLoss, SampledSoftmaxLoss

        c = self.config
        if c.loss == "full_softmax":
            return FullSoftmaxLoss(temperature=c.temperature)
        probs = torch.as_tensor(counts.astype(np.float32) + 1e-3)  # every item has a (tiny) chance
        return SampledSoftmaxLoss(probs, n_uniform=c.n_uniform_negatives, n_inbatch=c.n_inbatch_negatives,
                                  logq_correction=c.logq_correction, temperature=c.temperature)

    @staticmethod
    def _item_tensors(inputs: Any) -> tuple[Any, ...]:
        return inputs.genres.cpu(), inputs.year_bucket.cpu(), inputs.text.cpu(), inputs.counts.cpu()

    def _serve_from(self, trainer: Any, inputs: Any, history: Interactions) -> None:
        """During training: index the current item vectors and serve ``history`` (for evaluate())."""
        import torch

        from retrieval.trainer import item_vectors

        with torch.no_grad():
            vectors = item_vectors(trainer.item_tower, trainer.item_inputs).float().cpu().numpy()
        self.item_factors = np.ascontiguousarray(vectors)
        self._set_input_table(vectors, query_tower=trainer.query_tower)
        self._build_indexes()
        if self._fingerprint != history.fingerprint() or len(self._sequences) != len(self.users):
            self.set_history(history)

    def _set_input_table(self, vectors: np.ndarray, query_tower: Any = None) -> None:
        import torch

        from retrieval.trainer import with_padding_row

        tower = query_tower if query_tower is not None else self.query_tower
        device = next(tower.parameters()).device
        self._input_table = with_padding_row(torch.as_tensor(np.asarray(vectors, dtype=np.float32))).to(device)
        self._encoder = tower

    # ---- history --------------------------------------------------------------------------------
    def set_history(self, data: Interactions) -> TwoTowerRetriever:
        """Replace the users' histories (seen masks and the sequences the query tower reads), no retraining."""
        super().set_history(data)
        known = data.frame[data.frame[USER].isin(self.users.ids) & data.frame[ITEM].isin(self.items.ids)]
        self._sequences = sequences(known, self.users, self.items)
        return self

    def history_rows(self, user_row: int) -> np.ndarray:
        """The item rows of a user's history in time order."""
        return self._sequences[user_row]

    # ---- serving --------------------------------------------------------------------------------
    def encode_histories(self, histories: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Query vectors ``(n, dim)`` of item-row histories (each non-empty; the last ``max_len`` are read),
        encoded in batches of similar length with ``config.threads`` torch threads."""
        import torch

        from retrieval.trainer import pad_right, torch_threads

        if self._input_table is None:
            raise NotFittedError("TwoTowerRetriever: call fit() or load() first")
        tower = self._encoder
        device = self._input_table.device
        out = np.zeros((len(histories), self.config.dim), dtype=np.float32)
        order = np.argsort([min(len(h), self.config.max_len) for h in histories], kind="stable")
        with torch.inference_mode(), torch_threads(self.config.threads):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                seq = torch.as_tensor(pad_right([histories[r] for r in rows], self.config.max_len), device=device)
                out[rows] = tower.encode(seq, self._input_table).float().cpu().numpy()
        return out

    def user_vectors(self, user_rows: np.ndarray) -> np.ndarray:
        """Query vectors of known users, computed now from their stored histories."""
        return self.encode_histories([self._sequences[int(r)] for r in np.asarray(user_rows)])

    def has_query(self, user_rows: np.ndarray) -> np.ndarray:
        """Known users with a non-empty history; the rest get the popularity fallback."""
        return np.array([r >= 0 and self._sequences[r].size > 0 for r in user_rows], dtype=bool)

    def history_query(self, item_rows: np.ndarray) -> np.ndarray:
        """The query tower's vector of a history of item rows (time order; the last ``max_len`` are read)."""
        return self.encode_histories([np.asarray(item_rows, dtype=np.int64)])[0]

    def stored_history(self, user_id: int) -> np.ndarray:
        """The user's sequence (every event, oldest first) as the query tower reads it; empty if unknown."""
        self._check_fitted("stored_history")
        if user_id not in self.users:
            return np.empty(0, dtype=np.int64)
        return self.items.external(self._sequences[self.users.row(int(user_id))])

    def query_latency_ms(self, n_users: int = 200, *, seed: int = 0) -> dict[str, float]:
        """Per-user query-tower latency (ms) over ``n_users`` random known users, one at a time:
        ``{"p50", "p99", "mean", "history_len"}`` (encode only, ``torch.inference_mode``,
        ``config.threads`` threads)."""
        candidates = [r for r in range(len(self.users)) if self._sequences[r].size]
        if not candidates:
            raise NotFittedError("query_latency_ms: no user has a history")
        rng = np.random.default_rng(seed)
        rows = rng.choice(candidates, size=n_users, replace=len(candidates) < n_users)
        times = []
        self.encode_histories([self._sequences[int(rows[0])]])  # warm-up
        for r in rows:
            tick = time.perf_counter()
            self.encode_histories([self._sequences[int(r)]])
            times.append((time.perf_counter() - tick) * 1000)
        lengths = [min(self._sequences[int(r)].size, self.config.max_len) for r in rows]
        return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
                "mean": float(np.mean(times)), "history_len": float(np.mean(lengths))}

    # ---- new items ------------------------------------------------------------------------------
    def embed_new_items(self, item_table: pd.DataFrame) -> np.ndarray:
        """Content-only vectors ``(len(item_table), dim)`` of items (rows of an item table with
        ``item_id``, ``title``, ``genres``, ``year``, ``text``), in the table's row order."""
        import torch

        if self.item_tower is None:
            raise NotFittedError("TwoTowerRetriever: call fit() or load() before embed_new_items()")
        ids = IdVocab(np.asarray(item_table[ITEM], dtype=np.int64), name="item")
        features = self._build_features(item_table, ids, fitted=self.features)
        with torch.inference_mode():
            vectors = self.item_tower.content(
                torch.as_tensor(features.genres), torch.as_tensor(features.year_bucket),
                torch.as_tensor(features.text),
            )
        return vectors.numpy()

    def add_items(self, item_table: pd.DataFrame) -> TwoTowerRetriever:
        """Add new items (ids not in the catalogue) with content-only vectors, and rebuild the index.

        They are retrievable at once, and may appear in histories (:meth:`set_history`,
        :meth:`retrieve_history`). Their popularity is 0. Raises for ids already in the catalogue.
        """
        if self.index is None:
            raise NotFittedError("TwoTowerRetriever: call fit() or load() before add_items()")
        new_ids = np.asarray(item_table[ITEM], dtype=np.int64)
        clash = [int(i) for i in new_ids if i in self.items]
        if clash:
            raise DataValidationError(
                f"add_items: item ids {clash[:5]} are already in the catalogue; pass only new items"
            )
        vectors = self.embed_new_items(item_table)
        ids = IdVocab(new_ids, name="item")
        features = self._build_features(item_table, ids, fitted=self.features)
        n_new = new_ids.size
        self.items = IdVocab(np.concatenate([self.items.ids, new_ids]), name=self.items.name)
        self.features = self.features.concat(features)
        self.item_counts = np.concatenate([self.item_counts, np.zeros(n_new, np.float32)])
        self.popularity = np.concatenate([self.popularity, np.zeros(n_new, np.float32)])
        self.item_factors = np.ascontiguousarray(np.concatenate([self.item_factors, vectors]), dtype=np.float32)
        self.seen = sp.csr_matrix((self.seen.data, self.seen.indices, self.seen.indptr),
                                  shape=(self.seen.shape[0], len(self.items)))
        self._set_input_table(self.item_factors)
        self._build_indexes()
        return self

    # ---- persistence ----------------------------------------------------------------------------
    @classmethod
    def _saved_config(cls, values: dict[str, Any]) -> TwoTowerConfig:
        """A folder saved before ``ema_epochs`` existed was trained without the weight average."""
        return super()._saved_config({"ema_epochs": 0.0, **values})

    def _extra_tensors(self) -> dict[str, np.ndarray]:
        lengths = np.array([s.size for s in self._sequences], dtype=np.int64)
        flat = np.concatenate(self._sequences + [np.empty(0, np.int64)]).astype(np.int64)
        meta = {"genre_names": list(self.features.genre_names), "n_id_items": self._n_id_items,
                "text_dim": self.features.text_dim,
                "training": self.training_log.to_dict() if self.training_log is not None else None}
        out = {
            "seq_items": flat,
            "seq_indptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "item_counts": self.item_counts,
            "meta_json": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy(),
            **self.features.tensors(),
        }
        for prefix, module in (("query.", self.query_tower), ("item.", self.item_tower)):
            for key, value in module.state_dict().items():
                out[prefix + key] = value.detach().cpu().numpy()
        return out

    def _restore_extra(self, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
        import torch

        from retrieval.trainer import TrainingLog

        try:
            meta = json.loads(bytes(tensors["meta_json"].tobytes()).decode("utf-8"))
            self.features = ItemFeatures.from_tensors(tensors, meta["genre_names"])
            self._n_id_items = int(meta["n_id_items"])
            self.item_counts = tensors["item_counts"]
            indptr, flat = tensors["seq_indptr"], tensors["seq_items"]
            self._make_towers()
            for prefix, module in (("query.", self.query_tower), ("item.", self.item_tower)):
                state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
                         if k.startswith(prefix)}
                module.load_state_dict(state)
                module.eval()
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"two-tower artifact is incomplete or inconsistent ({exc}); re-save it") from exc
        if len(self.features) != len(self.items) or indptr.size != len(self.users) + 1:
            raise ArtifactError("two-tower artifact: features or sequences do not match the vocabularies")
        self._sequences = [flat[indptr[i]:indptr[i + 1]].copy() for i in range(len(self.users))]
        self._set_input_table(self.item_factors)
        self.training_log = TrainingLog(**meta["training"]) if meta.get("training") else None


__all__ = ["TwoTowerConfig", "TwoTowerRetriever", "leave_last_out"]
